/* Non-finite inputs (Inf, NaN, and finite values whose q . k overflows
 * float) in observation, compression and decode attention, on the CPU
 * backend. The contract (pagedvl.h, conventions): pvl_observe refuses a
 * non-finite q and accumulates nothing; an observation whose per-key sums
 * became non-finite is refused by pvl_compress (scored policies) and
 * pvl_decode_cap with BAD_STATE, naming the layer, and nothing changes; the
 * result never depends on memory the library did not write, so runs whose
 * allocator fills new memory differently end identically; decode attention
 * succeeds and confines non-finite values to the outputs that read them. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

enum { L = 2, HQ = 4, HKV = 2, D = 8, BS = 4, NB = 64, M = 40 };
/* Prompt positions [4, 28) are visual: VL-Cache observes [28, 40). */
static const pvl_span k_visual = {4, 28};
/* The layer the bad input goes to; layer 0 stays finite. */
enum { BAD_LAYER = 1 };

/* ---- an allocator that fills new memory with a pattern ---- */

typedef struct fill_alloc {
  pvl_allocator a;
  int mode; /* 0: 0x00, 1: 0xff, 2: 0x7f, 3: random bytes */
  uint64_t state;
} fill_alloc;

static const char *const k_fill_names[4] = {"0x00", "0xff", "0x7f", "random"};

static void *fa_alloc(void *ctx, size_t size, size_t align) {
  fill_alloc *f = ctx;
  void *p = NULL;
  if (align < sizeof(void *)) align = sizeof(void *);
  if (posix_memalign(&p, align, size ? size : 1) != 0) return NULL;
  unsigned char *b = p;
  switch (f->mode) {
  case 0: memset(b, 0x00, size); break;
  case 1: memset(b, 0xff, size); break;
  case 2: memset(b, 0x7f, size); break;
  default:
    for (size_t i = 0; i < size; i++) {
      f->state = f->state * 6364136223846793005ull + 1442695040888963407ull;
      b[i] = (unsigned char)(f->state >> 56);
    }
  }
  return p;
}

static void fa_free(void *ctx, void *p, size_t size, size_t align) {
  (void)ctx;
  (void)size;
  (void)align;
  free(p);
}

static void fa_init(fill_alloc *f, int mode) {
  f->a.alloc = fa_alloc;
  f->a.free = fa_free;
  f->a.ctx = f;
  f->mode = mode;
  f->state = 0x9e3779b97f4a7c15ull;
}

/* ---- fixture: one 40-token sequence with finite K/V ---- */

typedef enum poison {
  POISON_NAN_Q,     /* one element of one query row is NaN */
  POISON_INF_K,     /* +Inf in the K of a key every window row sees */
  POISON_BIG_Q,     /* a query row of 3e38 (finite): q . k overflows to +Inf */
  POISON_NEG_BIG_Q, /* a query row of -3e38: every logit of the row -Inf */
  POISON_COUNT
} poison;

static const char *const k_poison_names[POISON_COUNT] = {"NaN q", "+Inf K",
                                                         "3e38 q", "-3e38 q"};

typedef struct fixture {
  fill_alloc fa;
  pvl_cache *c;
  pvl_seq_id s;
  pvl_dtype dt;
} fixture;

static void fx_init(fixture *F, pvl_dtype dt, int fill) {
  fa_init(&F->fa, fill);
  pvl_config cfg = tu_config(L, HQ, HKV, D, BS, NB, dt);
  cfg.allocator = &F->fa.a;
  F->c = tu_cache_new(&cfg);
  F->dt = dt;
  TU_OK(F->c, pvl_seq_add(F->c, M, &k_visual, 1, &F->s));
  /* K in [0.25, 0.75): every component positive, so a query row of +3e38
   * gives +Inf logits and one of -3e38 gives -Inf logits for every key. */
  const size_t es = pvl_dtype_size(dt), n = (size_t)M * HKV * D;
  char *k = malloc(n * es), *v = malloc(n * es);
  tu_rng r;
  tu_rng_init(&r, 77);
  for (uint32_t l = 0; l < L; l++) {
    tu_fill(&r, dt, 0.25f, 0.75f, NULL, k, n);
    tu_fill(&r, dt, -1.0f, 1.0f, NULL, v, n);
    TU_OK(F->c, pvl_kv_write(F->c, F->s, l, 0, M, k, v, NULL));
  }
  free(k);
  free(v);
}

static void fx_fini(fixture *F) { pvl_cache_destroy(F->c); }

/* Random finite queries for rows [0, n) in the cache dtype. */
static void *make_q(pvl_dtype dt, uint32_t n, uint64_t seed) {
  const size_t cnt = (size_t)n * HQ * D;
  void *q = malloc((cnt ? cnt : 1) * pvl_dtype_size(dt));
  tu_rng r;
  tu_rng_init(&r, seed);
  tu_fill(&r, dt, -1.0f, 1.0f, NULL, q, cnt);
  return q;
}

/* Element (row, head, e) of a query buffer := x (representable in dt). */
static void q_set(pvl_dtype dt, void *q, uint32_t row, uint32_t head,
                  uint32_t e, float x) {
  const size_t i = ((size_t)row * HQ + head) * D + e;
  tu_encode(dt, &x, (char *)q + i * pvl_dtype_size(dt), 1);
}

/* Puts the poison into the fixture (K) or into the BAD_LAYER query rows
 * (n rows). Row 1 of the rows is the one poisoned. */
static void apply_poison(fixture *F, poison kind, void *q, uint32_t n) {
  cr_assert_geq(n, 2);
  switch (kind) {
  case POISON_NAN_Q: {
    const size_t i = ((size_t)1 * HQ + 1) * D + 3;
    tu_poison(F->dt, (char *)q + i * pvl_dtype_size(F->dt), 1);
    break;
  }
  case POISON_BIG_Q:
  case POISON_NEG_BIG_Q: {
    const float x = tu_round(F->dt, kind == POISON_BIG_Q ? 3e38f : -3e38f);
    cr_assert(isfinite(x), "3e38 must be finite in the dtype");
    for (uint32_t h = 0; h < HQ; h++)
      for (uint32_t e = 0; e < D; e++) q_set(F->dt, q, 1, h, e, x);
    break;
  }
  case POISON_INF_K: {
    /* Slot 30: before every window row of every policy here. */
    const size_t es = pvl_dtype_size(F->dt), n_el = (size_t)HKV * D;
    char *k = malloc(n_el * es), *v = malloc(n_el * es);
    TU_OK(F->c, pvl_kv_read(F->c, F->s, BAD_LAYER, 30, 1, k, v, NULL));
    const float inf = INFINITY;
    tu_encode(F->dt, &inf, k, 1);
    TU_OK(F->c, pvl_kv_write(F->c, F->s, BAD_LAYER, 30, 1, k, v, NULL));
    free(k);
    free(v);
    break;
  }
  default: cr_assert_fail("unknown poison");
  }
}

static pvl_policy policy_of(pvl_policy_kind kind) {
  pvl_policy p;
  cr_assert_eq(pvl_policy_init(&p, kind), PVL_SUCCESS);
  /* Budgets past the snap window, so snapkv and pyramidkv rank scores. */
  p.keep_ratio = 0.5f;
  p.snap_window = 8;
  return p;
}

/* Observes every layer with the policy's rows; the BAD_LAYER rows carry
 * the poison. Returns the status of the BAD_LAYER observation (the others
 * must succeed). */
static pvl_status observe_all(fixture *F, const pvl_policy *p, poison kind) {
  uint32_t first = 0, n = 0, fb = 0;
  TU_OK(F->c, pvl_policy_rows(p, F->c, F->s, &first, &n, &fb));
  if (kind == POISON_INF_K) apply_poison(F, kind, NULL, 2);
  pvl_status bad = PVL_SUCCESS;
  for (uint32_t l = 0; l < L; l++) {
    void *q = make_q(F->dt, n, 100 + l);
    if (l == BAD_LAYER && kind != POISON_INF_K) apply_poison(F, kind, q, n);
    pvl_status st =
        pvl_observe(F->c, F->s, l, q, first, n, p->threshold, 0.0f, NULL);
    if (l == BAD_LAYER)
      bad = st;
    else
      cr_assert_eq(st, PVL_SUCCESS, "layer %u: %s", l,
                   pvl_cache_last_error(F->c));
    free(q);
  }
  return bad;
}

/* The whole scenario for one policy: observe, then compress (or, with
 * cap_layer, decode_cap on BAD_LAYER). Asserts the contract and returns a
 * snapshot of the final state. */
static tu_snap *run_scenario(fixture *F, pvl_policy_kind kind, poison pz,
                             bool decode_cap, const char *ctx) {
  pvl_policy p = policy_of(kind);
  if (decode_cap) {
    p.decode_cap = 16;
    p.decode_cap_slack = 2;
  }
  tu_snap *before = tu_snap_take(F->c, &F->s, 1, true);
  pvl_status ost = observe_all(F, &p, pz);
  if (pz == POISON_NAN_Q) {
    /* The CPU backend refuses the query itself, and keeps nothing of it. */
    cr_assert_eq(ost, PVL_ERR_INVALID_ARGUMENT, "%s: pvl_observe -> %s", ctx,
                 pvl_status_string(ost));
    const char *msg = pvl_cache_last_error(F->c);
    cr_assert(strstr(msg, "pvl_observe") && strstr(msg, "row 1") &&
                  strstr(msg, "head 1"),
              "%s: message \"%s\" does not name the function, row and head",
              ctx, msg);
    TU_IS(PVL_ERR_BAD_STATE,
          pvl_seq_observation(F->c, F->s, BAD_LAYER, NULL, NULL, NULL, NULL, 0,
                              NULL, NULL));
    TU_UNCHANGED(F->c, before, &F->s, 1, true);
    tu_snap_free(before);
    return tu_snap_take(F->c, &F->s, 1, true);
  }
  cr_assert_eq(ost, PVL_SUCCESS, "%s: pvl_observe: %s", ctx,
               pvl_cache_last_error(F->c));
  tu_snap_free(before);
  /* The observation holds the non-finite sums as they are. */
  float raw[M];
  uint32_t nk = 0;
  TU_OK(F->c, pvl_seq_observation(F->c, F->s, BAD_LAYER, NULL, NULL, raw, NULL,
                                  M, &nk, NULL));
  bool any = false;
  for (uint32_t j = 0; j < nk; j++) any |= !isfinite(raw[j]);
  cr_assert(any, "%s: the observation of layer %d is finite", ctx, BAD_LAYER);

  before = tu_snap_take(F->c, &F->s, 1, true);
  pvl_status st;
  const char *fn;
  if (decode_cap) {
    uint32_t did = 77;
    st = pvl_decode_cap(F->c, F->s, BAD_LAYER, &p, &did, NULL);
    cr_assert_eq(did, 77, "%s: did written on failure", ctx);
    fn = "pvl_decode_cap";
  } else {
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    st = pvl_compress(F->c, F->s, &p, &rep, NULL);
    fn = "pvl_compress";
  }
  cr_assert_eq(st, PVL_ERR_BAD_STATE, "%s: %s -> %s (%s)", ctx, fn,
               pvl_status_string(st), pvl_cache_last_error(F->c));
  const char *msg = pvl_cache_last_error(F->c);
  cr_assert(strstr(msg, fn) && strstr(msg, "layer 1") &&
                strstr(msg, "not finite"),
            "%s: message \"%s\"", ctx, msg);
  TU_UNCHANGED(F->c, before, &F->s, 1, true);
  tu_snap_free(before);
  TU_CHECK(F->c);
  return tu_snap_take(F->c, &F->s, 1, true);
}

static const pvl_policy_kind k_scored[4] = {PVL_POLICY_VLCACHE, PVL_POLICY_H2O,
                                            PVL_POLICY_SNAPKV,
                                            PVL_POLICY_PYRAMIDKV};

/* Every poison x scored policy (and decode_cap) x dtype x allocator fill
 * pattern: the call fails, nothing changes, and the final state is the same
 * whatever the allocator filled new memory with. */
static void run_all(pvl_dtype dt, poison pz) {
  for (int pi = 0; pi < 5; pi++) {
    const bool cap = pi == 4;
    const pvl_policy_kind kind = cap ? PVL_POLICY_VLCACHE : k_scored[pi];
    tu_snap *first = NULL;
    for (int fill = 0; fill < 4; fill++) {
      char ctx[128];
      snprintf(ctx, sizeof(ctx), "%s, %s%s, %s, fill %s", k_poison_names[pz],
               pvl_policy_name(kind), cap ? " decode_cap" : "",
               dt == PVL_DTYPE_F32 ? "f32" : "bf16", k_fill_names[fill]);
      fixture F;
      fx_init(&F, dt, fill);
      tu_snap *end = run_scenario(&F, kind, pz, cap, ctx);
      if (!first) {
        first = end;
      } else {
        char why[512] = "";
        const bool eq = tu_snap_equal(first, end, why, sizeof(why));
        tu_snap_free(end);
        cr_assert(eq, "%s: ends unlike fill 0x00: %s", ctx, why);
      }
      fx_fini(&F);
    }
    tu_snap_free(first);
  }
}

Test(nonfinite, nan_query_row_is_refused_by_observe) {
  run_all(PVL_DTYPE_F32, POISON_NAN_Q);
  run_all(PVL_DTYPE_BF16, POISON_NAN_Q);
}

Test(nonfinite, inf_key_fails_compress_and_decode_cap) {
  run_all(PVL_DTYPE_F32, POISON_INF_K);
  run_all(PVL_DTYPE_BF16, POISON_INF_K);
}

Test(nonfinite, overflowing_query_fails_compress_and_decode_cap) {
  run_all(PVL_DTYPE_F32, POISON_BIG_Q);
  run_all(PVL_DTYPE_BF16, POISON_BIG_Q);
}

Test(nonfinite, all_neg_inf_logits_fail_compress_and_decode_cap) {
  run_all(PVL_DTYPE_F32, POISON_NEG_BIG_Q);
  run_all(PVL_DTYPE_BF16, POISON_NEG_BIG_Q);
}

/* A refused NaN chunk leaves an observation made of good chunks exactly as
 * it was, and compression from it succeeds. */
Test(nonfinite, nan_chunk_leaves_the_observation_as_it_was) {
  fixture F;
  fx_init(&F, PVL_DTYPE_F32, 0);
  pvl_policy p = policy_of(PVL_POLICY_H2O);
  for (uint32_t l = 0; l < L; l++) {
    void *q = make_q(F.dt, M, 200 + l);
    TU_OK(F.c, pvl_observe(F.c, F.s, l, q, 0, 20, p.threshold, 0.0f, NULL));
    float raw0[M], gam0[HQ], raw1[M], gam1[HQ];
    uint32_t seen0[M], seen1[M], nr0 = 0, nr1 = 0;
    TU_OK(F.c, pvl_seq_observation(F.c, F.s, l, gam0, NULL, raw0, seen0, M,
                                   NULL, &nr0));
    char *rest = (char *)q + (size_t)20 * HQ * D * sizeof(float);
    q_set(F.dt, rest, 5, 3, 7, NAN);
    TU_IS(PVL_ERR_INVALID_ARGUMENT,
          pvl_observe(F.c, F.s, l, rest, 20, 20, p.threshold, 0.0f, NULL));
    TU_OK(F.c, pvl_seq_observation(F.c, F.s, l, gam1, NULL, raw1, seen1, M,
                                   NULL, &nr1));
    cr_assert_eq(nr1, nr0);
    cr_assert_arr_eq(raw1, raw0, sizeof(raw0), "layer %u: raw changed", l);
    cr_assert_arr_eq(seen1, seen0, sizeof(seen0));
    cr_assert_arr_eq(gam1, gam0, sizeof(gam0));
    free(q);
  }
  TU_OK(F.c, pvl_compress(F.c, F.s, &p, NULL, NULL));
  TU_CHECK(F.c);
  fx_fini(&F);
}

/* The way out the header gives: a sequence whose observation is not finite
 * can still be compressed by the policies that read no observation. */
Test(nonfinite, full_and_streaming_ignore_a_non_finite_observation) {
  const pvl_policy_kind kinds[2] = {PVL_POLICY_FULL, PVL_POLICY_STREAMING};
  for (int i = 0; i < 2; i++) {
    fixture F;
    fx_init(&F, PVL_DTYPE_F32, 1);
    pvl_policy vl = policy_of(PVL_POLICY_VLCACHE);
    cr_assert_eq(observe_all(&F, &vl, POISON_BIG_Q), PVL_SUCCESS);
    TU_IS(PVL_ERR_BAD_STATE, pvl_compress(F.c, F.s, &vl, NULL, NULL));
    pvl_policy p = policy_of(kinds[i]);
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    TU_OK(F.c, pvl_compress(F.c, F.s, &p, &rep, NULL));
    const uint32_t want = kinds[i] == PVL_POLICY_FULL ? M : M / 2;
    for (uint32_t l = 0; l < L; l++)
      cr_assert_eq(tu_layer_tokens(F.c, F.s, l), want, "%s layer %u",
                   pvl_policy_name(kinds[i]), l);
    TU_CHECK(F.c);
    fx_fini(&F);
  }
}

/* ---- decode attention ---- */

/* q . k overflowing float (3e38 in f32 or bf16), and every logit -Inf:
 * PVL_SUCCESS; that (sequence, head) output is all NaN; the other heads of
 * the sequence and the other sequence match the reference. A -Inf logit
 * among finite ones weighs 0. */
static void attention_case(pvl_dtype dt) {
  enum { N = 6 };
  pvl_config cfg = tu_config(1, HQ, HKV, D, BS, 16, dt);
  pvl_cache *c = tu_cache_new(&cfg);
  pvl_seq_id ids[2];
  float k[2][N * HKV * D], v[2][N * HKV * D];
  tu_rng r;
  tu_rng_init(&r, 5);
  for (int b = 0; b < 2; b++) {
    ids[b] = tu_add(c, N);
    tu_fill(&r, dt, 0.25f, 0.75f, k[b], NULL, N * HKV * D);
    tu_fill(&r, dt, -1.0f, 1.0f, v[b], NULL, N * HKV * D);
  }
  /* Sequence 1, KV head 1: component 0 of every key is 0 but key 2's,
   * -2: a query (3e38, 0, ..., 0) gives logits 0, and -Inf for key 2. */
  for (int j = 0; j < N; j++) k[1][((size_t)j * HKV + 1) * D] = j == 2 ? -2 : 0;
  const size_t es = pvl_dtype_size(dt);
  char *kb = malloc(N * HKV * D * es), *vb = malloc(N * HKV * D * es);
  for (int b = 0; b < 2; b++) {
    tu_encode(dt, k[b], kb, N * HKV * D);
    tu_encode(dt, v[b], vb, N * HKV * D);
    TU_OK(c, pvl_kv_write(c, ids[b], 0, 0, N, kb, vb, NULL));
  }
  pvl_plan *plan = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &plan));
  TU_OK(c, pvl_plan_build(plan, ids, 2, NULL));

  float q[2][HQ * D];
  tu_fill(&r, dt, -1.0f, 1.0f, &q[0][0], NULL, 2 * HQ * D);
  const float big = tu_round(dt, 3e38f);
  for (int e = 0; e < D; e++) {
    q[0][0 * D + e] = big;                 /* seq 0 head 0: +Inf logits */
    q[0][2 * D + e] = -big;                /* seq 0 head 2: every logit -Inf */
    q[1][3 * D + e] = e == 0 ? big : 0.0f; /* seq 1 head 3: one -Inf */
  }
  char *qb = malloc(2 * HQ * D * es), *ob = malloc(2 * HQ * D * es);
  tu_encode(dt, &q[0][0], qb, 2 * HQ * D);
  tu_poison(dt, ob, 2 * HQ * D);
  TU_OK(c, pvl_attention_decode(plan, 0, qb, ob, 0.0f, NULL));
  float out[2][HQ * D];
  tu_decode(dt, ob, &out[0][0], 2 * HQ * D);

  const double scale = 1.0 / sqrt((double)D);
  for (int b = 0; b < 2; b++) {
    double ref[HQ * D];
    tu_ref_attention(q[b], k[b], v[b], N, HQ, HKV, D, scale, ref);
    for (int h = 0; h < HQ; h++) {
      const bool undefined = b == 0 && (h == 0 || h == 2);
      for (int e = 0; e < D; e++) {
        const float o = out[b][h * D + e];
        if (undefined) {
          cr_assert(isnan(o),
                    "dtype %d seq %d head %d [%d] = %g, expected "
                    "NaN",
                    (int)dt, b, h, e, (double)o);
          continue;
        }
        double want = ref[h * D + e];
        if (b == 1 && h == 3) {
          /* Keys other than 2 have equal logits: the mean of their V. */
          want = 0.0;
          for (int j = 0; j < N; j++)
            if (j != 2) want += v[1][((size_t)j * HKV + 1) * D + e];
          want /= N - 1;
        }
        cr_assert(isfinite(o) &&
                      fabs(o - want) <= tu_eps(dt) * (1 + fabs(want)),
                  "dtype %d seq %d head %d [%d] = %g, expected %g", (int)dt, b,
                  h, e, (double)o, want);
      }
    }
  }
  free(kb);
  free(vb);
  free(qb);
  free(ob);
  pvl_cache_destroy(c);
}

Test(nonfinite, attention_overflow_is_confined_to_its_outputs) {
  attention_case(PVL_DTYPE_F32);
  attention_case(PVL_DTYPE_BF16);
}
