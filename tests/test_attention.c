/* Paged equals contiguous: decode attention through a plan over deliberately
 * fragmented page tables (interleaved admissions and appends, freed
 * spacers, retained layers) equals a dense double reference over the same
 * tokens laid out contiguously, over a grid of head_dim x block_size x GQA
 * ratio x dtype with random lengths and batches. Outputs are poisoned
 * before every call, so an unwritten element fails. */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

/* What the test wrote into one (sequence, layer), as exact values. */
typedef struct truth {
  uint32_t n, cap;
  float *k, *v; /* [cap][hkv][d] */
} truth;

typedef struct scene {
  pvl_config cfg;
  pvl_cache *c;
  uint32_t B, L, hq, hkv, d;
  size_t row; /* hkv * d */
  pvl_seq_id seqs[8];
  truth t[8][2];
  pvl_plan *plan;
} scene;

static double tol(pvl_dtype dt, double ref) {
  return 1e-5 + tu_eps(dt) * fabs(ref);
}

static bool close_enough(pvl_dtype dt, const float *out, const double *ref,
                         size_t n, size_t *bad) {
  for (size_t i = 0; i < n; i++) {
    if (!(fabs((double)out[i] - ref[i]) <= tol(dt, ref[i]))) {
      if (bad) *bad = i;
      return false;
    }
  }
  return true;
}

static void truth_push(scene *S, truth *t, const float *k, const float *v,
                       uint32_t n) {
  if (t->n + n > t->cap) {
    t->cap = (t->n + n) * 2;
    t->k = realloc(t->k, t->cap * S->row * sizeof(float));
    t->v = realloc(t->v, t->cap * S->row * sizeof(float));
  }
  memcpy(t->k + t->n * S->row, k, n * S->row * sizeof(float));
  memcpy(t->v + t->n * S->row, v, n * S->row * sizeof(float));
  t->n += n;
}

/* Writes n fresh random tokens at slots [first, first + n) of (s, l) and
 * records them. */
static void write_tokens(scene *S, tu_rng *r, pvl_seq_id s, uint32_t l,
                         uint32_t first, uint32_t n, truth *t) {
  const pvl_dtype dt = S->cfg.dtype;
  const size_t es = pvl_dtype_size(dt), m = (size_t)n * S->row;
  float *k = malloc(m * sizeof(float)), *v = malloc(m * sizeof(float));
  char *kb = malloc(m * es), *vb = malloc(m * es);
  tu_fill(r, dt, -1, 1, k, kb, m);
  tu_fill(r, dt, -1, 1, v, vb, m);
  TU_OK(S->c, pvl_kv_write(S->c, s, l, first, n, kb, vb, NULL));
  if (t) {
    cr_assert_eq(first, t->n);
    truth_push(S, t, k, v, n);
  }
  free(k);
  free(v);
  free(kb);
  free(vb);
}

/* Reads (s, l) back and asserts it equals the truth exactly. */
static void expect_readback(scene *S, pvl_seq_id s, uint32_t l,
                            const truth *t) {
  const pvl_dtype dt = S->cfg.dtype;
  const size_t es = pvl_dtype_size(dt), m = ((size_t)t->n + 1) * S->row;
  cr_assert_eq(tu_layer_tokens(S->c, s, l), t->n);
  char *kb = malloc(m * es), *vb = malloc(m * es);
  float *k = malloc(m * sizeof(float)), *v = malloc(m * sizeof(float));
  TU_OK(S->c, pvl_kv_read(S->c, s, l, 0, t->n, kb, vb, NULL));
  tu_decode(dt, kb, k, (size_t)t->n * S->row);
  tu_decode(dt, vb, v, (size_t)t->n * S->row);
  cr_assert_arr_eq(k, t->k, (size_t)t->n * S->row * sizeof(float),
                   "K read back differs from what was written (layer %u)", l);
  cr_assert_arr_eq(v, t->v, (size_t)t->n * S->row * sizeof(float),
                   "V read back differs from what was written (layer %u)", l);
  free(kb);
  free(vb);
  free(k);
  free(v);
}

static void retain_truth(scene *S, truth *t, const uint32_t *keep, uint32_t k) {
  for (uint32_t i = 0; i < k; i++) {
    memmove(t->k + i * S->row, t->k + keep[i] * S->row, S->row * sizeof(float));
    memmove(t->v + i * S->row, t->v + keep[i] * S->row, S->row * sizeof(float));
  }
  t->n = k;
}

/* Builds a scene: B sequences reaching random lengths in [1, max_len]
 * through interleaved admissions and appends among spacer sequences that
 * come and go, then retains in some layers (one layer emptied if
 * empty_one). Ends with a plan over the batch in random order. */
static void scene_build(scene *S, tu_rng *r, uint32_t d, uint32_t bs,
                        uint32_t grp, pvl_dtype dt, uint32_t B,
                        uint32_t max_len, bool empty_one) {
  memset(S, 0, sizeof(*S));
  S->B = B;
  S->L = 2;
  S->hkv = grp == 8 ? 1 : 2;
  S->hq = S->hkv * grp;
  S->d = d;
  S->row = (size_t)S->hkv * d;
  const uint32_t per_seq = S->L * (tu_ceil_div(max_len, bs) + 1);
  S->cfg = tu_config(S->L, S->hq, S->hkv, d, bs, 2 * B * per_seq + 64, dt);
  S->cfg.max_seqs = 32;
  S->c = tu_cache_new(&S->cfg);
  pvl_cache *c = S->c;

  uint32_t target[8];
  pvl_seq_id spacers[16];
  uint32_t n_sp = 0;
  for (uint32_t b = 0; b < B; b++) {
    target[b] = tu_range(r, 1, max_len);
    spacers[n_sp++] = tu_add(c, tu_range(r, 1, 2 * bs));
    uint32_t p = tu_range(r, 1, target[b]);
    S->seqs[b] = tu_add(c, p);
    for (uint32_t l = 0; l < S->L; l++) {
      /* Prefill in uneven chunks. */
      uint32_t at = 0;
      while (at < p) {
        uint32_t n = tu_range(r, 1, p - at);
        write_tokens(S, r, S->seqs[b], l, at, n, &S->t[b][l]);
        at += n;
      }
    }
  }
  /* Decode: random sub-batches, with spacers growing, leaving and coming
   * back, so the blocks of one table are scattered over the pool. */
  for (;;) {
    pvl_seq_id batch[24];
    uint32_t n = 0, who[24];
    for (uint32_t b = 0; b < B; b++)
      if (S->t[b][0].n < target[b] && tu_below(r, 3) != 0) {
        who[n] = b;
        batch[n++] = S->seqs[b];
      }
    const uint32_t n_targets = n;
    bool done = true;
    for (uint32_t b = 0; b < B; b++) done &= S->t[b][0].n >= target[b];
    if (done) break;
    for (uint32_t i = 0; i < n_sp; i++)
      if (tu_below(r, 2) && tu_layer_tokens(c, spacers[i], 0) < 4 * bs)
        batch[n++] = spacers[i];
    if (n == 0) continue;
    TU_OK(c, pvl_seq_append(c, batch, n, NULL));
    for (uint32_t i = 0; i < n_targets; i++) {
      const uint32_t b = who[i];
      for (uint32_t l = 0; l < S->L; l++)
        write_tokens(S, r, S->seqs[b], l, S->t[b][l].n, 1, &S->t[b][l]);
    }
    if (n_sp > 0 && tu_below(r, 4) == 0) {
      uint32_t i = tu_below(r, n_sp);
      TU_OK(c, pvl_seq_free(c, spacers[i]));
      spacers[i] = tu_add(c, tu_range(r, 1, 3 * bs));
    }
  }
  for (uint32_t i = 0; i < n_sp; i++) TU_OK(c, pvl_seq_free(c, spacers[i]));

  /* Compress some layers so the layers of one sequence differ. */
  for (uint32_t b = 0; b < B; b++) {
    for (uint32_t l = 0; l < S->L; l++) {
      if (tu_below(r, 3) != 0) continue;
      truth *t = &S->t[b][l];
      uint32_t k = tu_range(r, t->n > 1 ? 1 : 0, t->n);
      uint32_t *keep = malloc((t->n + 1) * sizeof(uint32_t));
      tu_subset(r, t->n, k, keep);
      TU_OK(c, pvl_seq_retain(c, S->seqs[b], l, keep, k, NULL));
      retain_truth(S, t, keep, k);
      free(keep);
    }
  }
  if (empty_one) {
    uint32_t b = tu_below(r, B);
    TU_OK(c, pvl_seq_retain(c, S->seqs[b], 1, NULL, 0, NULL));
    S->t[b][1].n = 0;
  }
  for (uint32_t b = 0; b < B; b++)
    for (uint32_t l = 0; l < S->L; l++)
      expect_readback(S, S->seqs[b], l, &S->t[b][l]);
  TU_CHECK(c);

  /* The batch in random order (the truth follows). */
  for (uint32_t i = B; i > 1; i--) {
    uint32_t j = tu_below(r, i);
    pvl_seq_id s = S->seqs[i - 1];
    S->seqs[i - 1] = S->seqs[j];
    S->seqs[j] = s;
    for (uint32_t l = 0; l < S->L; l++) {
      truth t = S->t[i - 1][l];
      S->t[i - 1][l] = S->t[j][l];
      S->t[j][l] = t;
    }
  }
  TU_OK(c, pvl_plan_create(c, B, 0, &S->plan));
  TU_OK(c, pvl_plan_build(S->plan, S->seqs, B, NULL));
}

static void scene_free(scene *S) {
  for (uint32_t b = 0; b < S->B; b++)
    for (uint32_t l = 0; l < S->L; l++) {
      free(S->t[b][l].k);
      free(S->t[b][l].v);
    }
  pvl_cache_destroy(S->c);
}

/* Runs attention on `layer` with random q and checks every row against the
 * dense reference (and an emptied row against exact zeros). */
static void check_layer(scene *S, tu_rng *r, uint32_t layer, float scale,
                        const char *what) {
  const pvl_dtype dt = S->cfg.dtype;
  const size_t es = pvl_dtype_size(dt), m = (size_t)S->B * S->hq * S->d;
  float *q = malloc(m * sizeof(float)), *out = malloc(m * sizeof(float));
  char *qb = malloc(m * es), *ob = malloc(m * es);
  double *ref = malloc((size_t)S->hq * S->d * sizeof(double));
  tu_fill(r, dt, -1, 1, q, qb, m);
  tu_poison(dt, ob, m);
  TU_OK(S->c, pvl_attention_decode(S->plan, layer, qb, ob, scale, NULL));
  tu_decode(dt, ob, out, m);
  const double sc = scale == 0.0f ? 1.0 / sqrt((double)S->d) : (double)scale;
  for (uint32_t b = 0; b < S->B; b++) {
    const truth *t = &S->t[b][layer];
    const size_t o = (size_t)b * S->hq * S->d;
    tu_ref_attention(q + o, t->k, t->v, t->n, S->hq, S->hkv, S->d, sc, ref);
    size_t bad = 0;
    bool ok = close_enough(dt, out + o, ref, (size_t)S->hq * S->d, &bad);
    cr_assert(ok,
              "%s: seed %llu dtype %d d %u bs %u Hq %u Hkv %u layer %u row %u "
              "(len %u) head %zu dim %zu: %.8g, reference %.8g",
              what, (unsigned long long)r->seed, (int)dt, S->d,
              S->cfg.block_size, S->hq, S->hkv, layer, b, t->n, bad / S->d,
              bad % S->d, (double)out[o + bad], ref[bad]);
    if (t->n == 0)
      for (size_t i = 0; i < (size_t)S->hq * S->d; i++)
        cr_assert_eq(out[o + i], 0.0f, "%s: an empty layer must give zeros",
                     what);
  }
  free(q);
  free(out);
  free(qb);
  free(ob);
  free(ref);
}

static bool scene_fragmented(scene *S) {
  int32_t *ids = malloc(S->cfg.num_blocks * sizeof(int32_t));
  bool any = false;
  for (uint32_t b = 0; b < S->B; b++)
    for (uint32_t l = 0; l < S->L; l++) {
      uint32_t n = tu_blocks(S->c, S->seqs[b], l, ids, S->cfg.num_blocks);
      any |= tu_fragmented(ids, n);
    }
  free(ids);
  return any;
}

static void grid(pvl_dtype dt, const char *name) {
  tu_rng r;
  tu_rng_init(&r, tu_seed(name));
  const uint32_t dims[] = {8, 64, 128};
  const uint32_t bss[] = {1, 4, 16, 32};
  const uint32_t grps[] = {1, 2, 4, 8};
  int cases = 0, fragmented = 0;
  for (int di = 0; di < 3; di++)
    for (int bi = 0; bi < 4; bi++)
      for (int gi = 0; gi < 4; gi++) {
        scene S;
        const uint32_t B = tu_range(&r, 1, 8);
        scene_build(&S, &r, dims[di], bss[bi], grps[gi], dt, B, 300,
                    tu_below(&r, 4) == 0);
        fragmented += scene_fragmented(&S);
        cases++;
        for (uint32_t l = 0; l < S.L; l++) check_layer(&S, &r, l, 0.0f, name);
        scene_free(&S);
      }
  cr_log_info("%s: %d cases, %d with fragmented tables", name, cases,
              fragmented);
  cr_assert_geq(fragmented, cases * 3 / 4,
                "only %d of %d cases had scattered tables", fragmented, cases);
}

Test(attention, paged_equals_dense_f32, .timeout = 300) {
  grid(PVL_DTYPE_F32, "attention.paged_equals_dense_f32");
}
Test(attention, paged_equals_dense_f16, .timeout = 300) {
  grid(PVL_DTYPE_F16, "attention.paged_equals_dense_f16");
}
Test(attention, paged_equals_dense_bf16, .timeout = 300) {
  grid(PVL_DTYPE_BF16, "attention.paged_equals_dense_bf16");
}

/* The same tokens in a fresh cache per sequence, so every table is
 * contiguous: the paged and the contiguous outputs agree. */
Test(attention, paged_equals_contiguous_cache) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.paged_equals_contiguous_cache"));
  const pvl_dtype dts[] = {PVL_DTYPE_F32, PVL_DTYPE_F16, PVL_DTYPE_BF16};
  for (int di = 0; di < 3; di++) {
    const pvl_dtype dt = dts[di];
    scene S;
    scene_build(&S, &r, 64, 16, 4, dt, 6, 200, false);
    cr_assert(scene_fragmented(&S));
    const size_t es = pvl_dtype_size(dt);
    const size_t m = (size_t)S.B * S.hq * S.d, mrow = (size_t)S.hq * S.d;
    float *q = malloc(m * sizeof(float));
    char *qb = malloc(m * es), *o1 = malloc(m * es), *o2 = malloc(mrow * es);
    float *f1 = malloc(m * sizeof(float)), *f2 = malloc(mrow * sizeof(float));
    for (uint32_t l = 0; l < S.L; l++) {
      tu_fill(&r, dt, -1, 1, q, qb, m);
      tu_poison(dt, o1, m);
      TU_OK(S.c, pvl_attention_decode(S.plan, l, qb, o1, 0.0f, NULL));
      tu_decode(dt, o1, f1, m);
      for (uint32_t b = 0; b < S.B; b++) {
        const truth *t = &S.t[b][l];
        pvl_cache *c2 = tu_cache_new(&S.cfg);
        pvl_seq_id id = tu_add(c2, t->n ? t->n : 1);
        if (!t->n) TU_OK(c2, pvl_seq_retain(c2, id, l, NULL, 0, NULL));
        char *kb = malloc(((size_t)t->n + 1) * S.row * es);
        char *vb = malloc(((size_t)t->n + 1) * S.row * es);
        tu_encode(dt, t->k, kb, (size_t)t->n * S.row);
        tu_encode(dt, t->v, vb, (size_t)t->n * S.row);
        TU_OK(c2, pvl_kv_write(c2, id, l, 0, t->n, kb, vb, NULL));
        free(kb);
        free(vb);
        int32_t blocks[64];
        uint32_t nb = tu_blocks(c2, id, l, blocks, 64);
        cr_assert_not(tu_fragmented(blocks, nb), "the copy is not contiguous");
        pvl_plan *p2 = NULL;
        TU_OK(c2, pvl_plan_create(c2, 1, 0, &p2));
        TU_OK(c2, pvl_plan_build(p2, &id, 1, NULL));
        tu_poison(dt, o2, mrow);
        TU_OK(c2,
              pvl_attention_decode(p2, l, qb + b * mrow * es, o2, 0.0f, NULL));
        tu_decode(dt, o2, f2, mrow);
        for (size_t i = 0; i < mrow; i++)
          cr_assert(fabs(f1[b * mrow + i] - f2[i]) <= tol(dt, f2[i]),
                    "dtype %d layer %u row %u elem %zu: paged %g, contiguous "
                    "%g",
                    (int)dt, l, b, i, (double)f1[b * mrow + i], (double)f2[i]);
        pvl_cache_destroy(c2);
      }
    }
    free(q);
    free(qb);
    free(o1);
    free(o2);
    free(f1);
    free(f2);
    scene_free(&S);
  }
}

Test(attention, empty_layer_gives_zeros) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.empty_layer_gives_zeros"));
  const pvl_dtype dts[] = {PVL_DTYPE_F32, PVL_DTYPE_F16, PVL_DTYPE_BF16};
  for (int di = 0; di < 3; di++) {
    scene S;
    scene_build(&S, &r, 8, 4, 2, dts[di], 4, 40, true);
    /* check_layer asserts exact zeros for the emptied row */
    for (uint32_t l = 0; l < S.L; l++) check_layer(&S, &r, l, 0.0f, "empty");
    scene_free(&S);
  }
  /* A batch where every row of the layer is empty. */
  pvl_cache *c = tu_cache(1, 2, 1, 8, 4, 16, PVL_DTYPE_F32);
  pvl_seq_id s[2] = {tu_add(c, 3), tu_add(c, 9)};
  TU_OK(c, pvl_seq_retain(c, s[0], 0, NULL, 0, NULL));
  TU_OK(c, pvl_seq_retain(c, s[1], 0, NULL, 0, NULL));
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  float q[2 * 2 * 8], out[2 * 2 * 8];
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, q, NULL, 32);
  tu_poison(PVL_DTYPE_F32, out, 32);
  TU_OK(c, pvl_attention_decode(p, 0, q, out, 0.0f, NULL));
  for (int i = 0; i < 32; i++) cr_assert_eq(out[i], 0.0f, "elem %d", i);
  pvl_cache_destroy(c);
}

Test(attention, custom_scale) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.custom_scale"));
  scene S;
  scene_build(&S, &r, 64, 16, 2, PVL_DTYPE_F32, 3, 100, false);
  check_layer(&S, &r, 0, 0.37f, "scale 0.37");
  check_layer(&S, &r, 1, 2.0f, "scale 2");
  check_layer(&S, &r, 1, 1e-3f, "scale 1e-3");
  scene_free(&S);
}

/* The newest token written through pvl_plan_kv_write is where attention
 * sees it: its key is made to dominate, so the output is its value. */
Test(attention, plan_kv_write_is_seen_by_attention) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.plan_kv_write_is_seen"));
  const pvl_dtype dts[] = {PVL_DTYPE_F32, PVL_DTYPE_F16, PVL_DTYPE_BF16};
  for (int di = 0; di < 3; di++) {
    const pvl_dtype dt = dts[di];
    scene S;
    scene_build(&S, &r, 64, 16, 2, dt, 5, 120, false);
    TU_OK(S.c, pvl_seq_append(S.c, S.seqs, S.B, NULL));
    TU_OK(S.c, pvl_plan_build(S.plan, S.seqs, S.B, NULL));
    const size_t es = pvl_dtype_size(dt);
    const size_t mk = (size_t)S.B * S.row, mq = (size_t)S.B * S.hq * S.d;
    for (uint32_t l = 0; l < S.L; l++) {
      float *k = malloc(mk * sizeof(float)), *v = malloc(mk * sizeof(float));
      char *kb = malloc(mk * es), *vb = malloc(mk * es);
      float *q = malloc(mq * sizeof(float));
      char *qb = malloc(mq * es), *ob = malloc(mq * es);
      float *out = malloc(mq * sizeof(float));
      tu_fill(&r, dt, -1, 1, q, NULL, mq);
      /* k_new = 16 * q of the group's first head: q . k_new dwarfs the
       * rest; v_new in [2, 3] is recognisable. */
      for (uint32_t b = 0; b < S.B; b++)
        for (uint32_t h = 0; h < S.hkv; h++)
          for (uint32_t e = 0; e < S.d; e++) {
            const uint32_t grp = S.hq / S.hkv;
            for (uint32_t g = 0; g < grp; g++) /* same q in the group */
              q[((size_t)b * S.hq + h * grp + g) * S.d + e] =
                  q[((size_t)b * S.hq + h * grp) * S.d + e];
            k[((size_t)b * S.hkv + h) * S.d + e] =
                tu_round(dt, 16.0f * q[((size_t)b * S.hq + h * grp) * S.d + e]);
          }
      tu_encode(dt, q, qb, mq);
      tu_encode(dt, k, kb, mk);
      tu_fill(&r, dt, 2, 3, v, vb, mk);
      TU_OK(S.c, pvl_plan_kv_write(S.plan, l, kb, vb, NULL));
      for (uint32_t b = 0; b < S.B; b++) {
        truth_push(&S, &S.t[b][l], k + b * S.row, v + b * S.row, 1);
        expect_readback(&S, S.seqs[b], l, &S.t[b][l]);
      }
      tu_poison(dt, ob, mq);
      TU_OK(S.c, pvl_attention_decode(S.plan, l, qb, ob, 0.0f, NULL));
      tu_decode(dt, ob, out, mq);
      double ref[16 * 128];
      for (uint32_t b = 0; b < S.B; b++) {
        const truth *t = &S.t[b][l];
        tu_ref_attention(q + (size_t)b * S.hq * S.d, t->k, t->v, t->n, S.hq,
                         S.hkv, S.d, 1.0 / sqrt((double)S.d), ref);
        size_t bad = 0;
        cr_assert(close_enough(dt, out + (size_t)b * S.hq * S.d, ref,
                               (size_t)S.hq * S.d, &bad),
                  "dtype %d layer %u row %u elem %zu: %g vs %g", (int)dt, l, b,
                  bad, (double)out[(size_t)b * S.hq * S.d + bad], ref[bad]);
        /* The new token dominates: the output is close to its value. */
        for (uint32_t h = 0; h < S.hq; h++) {
          const uint32_t kvh = h / (S.hq / S.hkv);
          for (uint32_t e = 0; e < S.d; e++) {
            double o = out[((size_t)b * S.hq + h) * S.d + e];
            double want = v[((size_t)b * S.hkv + kvh) * S.d + e];
            cr_assert(fabs(o - want) < 0.5,
                      "dtype %d layer %u row %u head %u: %g, newest value %g",
                      (int)dt, l, b, h, o, want);
          }
        }
      }
      free(k);
      free(v);
      free(kb);
      free(vb);
      free(q);
      free(qb);
      free(ob);
      free(out);
    }
    scene_free(&S);
  }
}

/* The comparison is not a tautology: a reference that misses one token, or
 * an output that is off by one f16 step too many, is caught. */
Test(attention, checker_catches_wrong_answers) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.checker_catches_wrong_answers"));
  scene S;
  scene_build(&S, &r, 8, 4, 1, PVL_DTYPE_F32, 2, 30, false);
  const size_t m = (size_t)S.B * S.hq * S.d;
  float *q = malloc(m * sizeof(float)), *out = malloc(m * sizeof(float));
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, q, NULL, m);
  TU_OK(S.c, pvl_attention_decode(S.plan, 0, q, out, 0.0f, NULL));
  double ref[64];
  uint32_t b = 0;
  while (b + 1 < S.B && S.t[b][0].n < 2) b++;
  const truth *t = &S.t[b][0];
  const float *qb = q + (size_t)b * S.hq * S.d,
              *ob = out + (size_t)b * S.hq * S.d;
  cr_assert_gt(t->n, 1);
  tu_ref_attention(qb, t->k, t->v, t->n, S.hq, S.hkv, S.d, 1 / sqrt(8.0), ref);
  cr_assert(close_enough(PVL_DTYPE_F32, ob, ref, (size_t)S.hq * S.d, NULL));
  tu_ref_attention(qb, t->k, t->v, t->n - 1, S.hq, S.hkv, S.d, 1 / sqrt(8.0),
                   ref);
  cr_assert_not(close_enough(PVL_DTYPE_F32, ob, ref, (size_t)S.hq * S.d, NULL),
                "a reference without the last token still matched");
  /* An f16 output error of 3 ulps at magnitude 0.5 exceeds the tolerance. */
  const double x = 0.5, ulp = ldexp(1.0, -11);
  float o = (float)(x + 3 * ulp);
  cr_assert_not(close_enough(PVL_DTYPE_F16, &o, &x, 1, NULL));
  o = (float)(x + ulp);
  cr_assert(close_enough(PVL_DTYPE_F16, &o, &x, 1, NULL));
  float nan = NAN;
  cr_assert_not(close_enough(PVL_DTYPE_F32, &nan, &x, 1, NULL),
                "a NaN output passed");
  free(q);
  free(out);
  scene_free(&S);
}

/* The library's converters agree bit for bit with the independent ones
 * used by these tests (round to nearest even). */
Test(attention, dtype_conversion_matches_independent_rounding) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("attention.dtype_conversion"));
  const float edges[] = {0.0f,
                         -0.0f,
                         1.0f,
                         -1.0f,
                         65504.0f,
                         65519.0f,
                         65520.0f,
                         1e6f,
                         -1e6f,
                         6.103515625e-05f,
                         6.0e-05f,
                         5.960464477539063e-08f,
                         2.98e-08f,
                         2.9802322387695312e-08f,
                         1e-10f,
                         3.0e38f,
                         3.3961776e38f,
                         1.00048828125f,
                         1.000732421875f,
                         1.0009765625f,
                         1.00390625f,
                         1.005859375f,
                         INFINITY,
                         -INFINITY};
  for (int i = 0; i < 200000; i++) {
    float x;
    if (i < (int)(sizeof(edges) / sizeof(edges[0]))) {
      x = edges[i];
    } else {
      uint32_t u = (uint32_t)tu_next(&r);
      if ((u & 0x7f800000u) == 0x7f800000u) continue;            /* inf/nan */
      if (i % 2) u = (u & 0x807fffffu) | ((u % 50 + 100) << 23); /* mid */
      memcpy(&x, &u, 4);
    }
    uint16_t h, b;
    tu_encode(PVL_DTYPE_F16, (float[]){tu_round(PVL_DTYPE_F16, x)}, &h, 1);
    tu_encode(PVL_DTYPE_BF16, (float[]){tu_round(PVL_DTYPE_BF16, x)}, &b, 1);
    cr_assert_eq(pvl__f32_to_f16(x), h, "f16(%a): library %04x, test %04x",
                 (double)x, pvl__f32_to_f16(x), h);
    cr_assert_eq(pvl__f32_to_bf16(x), b, "bf16(%a): library %04x, test %04x",
                 (double)x, pvl__f32_to_bf16(x), b);
    float back;
    tu_decode(PVL_DTYPE_F16, &h, &back, 1);
    cr_assert(pvl__f16_to_f32(h) == back, "f16 %04x decodes differently", h);
    tu_decode(PVL_DTYPE_BF16, &b, &back, 1);
    cr_assert(pvl__bf16_to_f32(b) == back, "bf16 %04x decodes differently", b);
  }
}
