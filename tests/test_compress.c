/* Observation and compression over random inputs (many seeds): budgets and
 * selections keep their documented bounds and rules, observation equals a
 * dense double-precision softmax whatever the page layout, compression
 * returns exactly the memory it promises and keeps exactly the data it
 * reports, failures change nothing, forks survive, and the decode cap holds.
 * Expected values come from independent reference code in this file. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pagedvl.h"
#include "testutil.h"

#define CHECK_CACHE(c)                                                       \
  do {                                                                       \
    char chk_msg_[512] = "";                                                 \
    pvl_status chk_st_ = pvl__cache_check((c), chk_msg_, sizeof(chk_msg_));  \
    cr_assert_eq(chk_st_, PVL_SUCCESS, "%s:%d: pvl__cache_check: %s",        \
                 __FILE__, __LINE__, chk_msg_);                              \
  } while (0)

/* ---- randomness ---- */

typedef struct rng {
  uint64_t s;
} rng;

static uint64_t rnext(rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
static rng rseed(uint64_t seed) {
  rng r = {seed * 0x2545F4914F6CDD1DULL + 12345};
  rnext(&r);
  return r;
}
static uint32_t rbelow(rng *r, uint32_t n) { return (uint32_t)(rnext(r) % n); }
static uint32_t rrange(rng *r, uint32_t lo, uint32_t hi) {
  return lo + rbelow(r, hi - lo + 1);
}
static float runif(rng *r, float lo, float hi) {
  return lo + (hi - lo) * (float)((double)(rnext(r) >> 40) / 16777216.0);
}

/* ---- caches ---- */

/* An f32 CPU cache (testutil's, which asserts the creation). */
static pvl_cache *mk_cache(uint32_t L, uint32_t hq, uint32_t hkv, uint32_t d,
                           uint32_t bs, uint32_t nb) {
  return tu_cache(L, hq, hkv, d, bs, nb, PVL_DTYPE_F32);
}

static pvl_policy pol(pvl_policy_kind kind) {
  pvl_policy p;
  cr_assert_eq(pvl_policy_init(&p, kind), PVL_SUCCESS);
  return p;
}

static uint32_t cdiv(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

static uint32_t free_blocks(const pvl_cache *c) {
  pvl_stats st;
  cr_assert_eq(pvl_cache_get_stats(c, &st), PVL_SUCCESS);
  return st.free_blocks;
}

static void layer_size(const pvl_cache *c, pvl_seq_id s, uint32_t l,
                       uint32_t *nt, uint32_t *nb) {
  pvl_status st = pvl_seq_layer_size(c, s, l, nt, nb);
  cr_assert_eq(st, PVL_SUCCESS, "pvl_seq_layer_size: %s",
               pvl_cache_last_error(c));
}

/* Host copy of a sequence's K/V by logical position: [L] -> [cap][hkv][d]. */
typedef struct hostkv {
  uint32_t L, hq, hkv, d, cap;
  float **k, **v;
} hostkv;

static hostkv hk_new(uint32_t L, uint32_t hq, uint32_t hkv, uint32_t d,
                     uint32_t cap) {
  hostkv h = {L, hq, hkv, d, cap, calloc(L, sizeof(float *)),
              calloc(L, sizeof(float *))};
  for (uint32_t l = 0; l < L; l++) {
    h.k[l] = calloc((size_t)cap * hkv * d, sizeof(float));
    h.v[l] = calloc((size_t)cap * hkv * d, sizeof(float));
  }
  return h;
}

static void hk_free(hostkv *h) {
  for (uint32_t l = 0; l < h->L; l++) {
    free(h->k[l]);
    free(h->v[l]);
  }
  free(h->k);
  free(h->v);
}

static size_t hk_row(const hostkv *h) { return (size_t)h->hkv * h->d; }

/* Random K/V for positions [first, first + n) of every layer, written into
 * slots [slot, slot + n). */
static void hk_write(pvl_cache *c, pvl_seq_id s, hostkv *h, rng *r,
                     uint32_t first, uint32_t n, uint32_t slot, float amp) {
  const size_t row = hk_row(h);
  for (uint32_t l = 0; l < h->L; l++) {
    float *k = h->k[l] + first * row, *v = h->v[l] + first * row;
    for (size_t i = 0; i < n * row; i++) {
      k[i] = runif(r, -amp, amp);
      v[i] = runif(r, -1.0f, 1.0f);
    }
    TU_OK(c, pvl_kv_write(c, s, l, slot, n, k, v, NULL));
  }
}

/* Asserts that the n slots of layer l hold the host tokens at pos[]. */
static void check_data(const pvl_cache *c, pvl_seq_id s, const hostkv *h,
                       uint32_t l, const uint32_t *pos, uint32_t n,
                       const char *ctx) {
  const size_t row = hk_row(h);
  float *k = malloc((n ? n : 1) * row * sizeof(float));
  float *v = malloc((n ? n : 1) * row * sizeof(float));
  pvl_status st = pvl_kv_read(c, s, l, 0, n, k, v, NULL);
  cr_assert_eq(st, PVL_SUCCESS, "%s: pvl_kv_read: %s", ctx,
               pvl_cache_last_error(c));
  for (uint32_t i = 0; i < n; i++) {
    cr_assert(memcmp(k + i * row, h->k[l] + (size_t)pos[i] * row,
                     row * sizeof(float)) == 0,
              "%s: layer %u slot %u: K is not position %u's", ctx, l, i,
              pos[i]);
    cr_assert(memcmp(v + i * row, h->v[l] + (size_t)pos[i] * row,
                     row * sizeof(float)) == 0,
              "%s: layer %u slot %u: V is not position %u's", ctx, l, i,
              pos[i]);
  }
  free(k);
  free(v);
}

static uint32_t get_positions(const pvl_cache *c, pvl_seq_id s, uint32_t l,
                              uint32_t *pos, uint32_t cap) {
  uint32_t n = 0;
  pvl_status st = pvl_seq_positions(c, s, l, pos, cap, &n);
  cr_assert_eq(st, PVL_SUCCESS, "pvl_seq_positions: %s",
               pvl_cache_last_error(c));
  return n;
}

/* Random queries [rows][hq][d]. */
static float *rand_q(rng *r, uint32_t rows, uint32_t hq, uint32_t d,
                     float amp) {
  size_t n = (size_t)rows * hq * d;
  float *q = malloc((n ? n : 1) * sizeof(float));
  for (size_t i = 0; i < n; i++) q[i] = runif(r, -amp, amp);
  return q;
}

/* Admits filler sequences around the target so its blocks come from holes
 * of freed sequences: the target's page tables are fragmented. Returns the
 * target; fillers[] (n_fill) stay live. */
static pvl_seq_id add_fragmented(pvl_cache *c, rng *r, uint32_t m,
                                 const pvl_span *spans, uint32_t n_spans,
                                 pvl_seq_id *fillers, uint32_t *n_fill) {
  pvl_seq_id tmp[8];
  *n_fill = 0;
  for (int i = 0; i < 8; i++) TU_OK(c, pvl_seq_add(c, rrange(r, 1, 9), NULL, 0, &tmp[i]));
  for (int i = 0; i < 8; i++) {
    if (i % 2)
      TU_OK(c, pvl_seq_free(c, tmp[i]));
    else
      fillers[(*n_fill)++] = tmp[i];
  }
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, m, spans, n_spans, &s));
  TU_OK(c, pvl_seq_add(c, rrange(r, 1, 7), NULL, 0, &fillers[(*n_fill)++]));
  return s;
}

/* ======================================================================== */
/* Dense reference observation                                              */
/* ======================================================================== */

typedef struct refobs {
  double *raw;
  uint32_t *seen;
  uint64_t *below_min, *below_max, *total; /* [hq] */
} refobs;

/* keys [n_keys][hkv][d] at positions kpos[]; q [rows][hq][d] at positions
 * first + i. Logits in double; entries within 1e-4 of the Eq. 1 threshold
 * count as either side (the library computes dot products in float). */
static void ref_observe(const float *keys, const uint32_t *kpos,
                        uint32_t n_keys, const float *q, uint32_t first,
                        uint32_t rows, uint32_t hq, uint32_t hkv, uint32_t d,
                        double scale, double log_p, refobs *o) {
  const uint32_t grp = hq / hkv;
  double *s = malloc((n_keys ? n_keys : 1) * sizeof(double));
  for (uint32_t i = 0; i < rows; i++) {
    const uint32_t P = first + i;
    for (uint32_t j = 0; j < n_keys; j++)
      if (kpos[j] <= P) o->seen[j]++;
    for (uint32_t h = 0; h < hq; h++) {
      const float *qv = q + ((size_t)i * hq + h) * d;
      double mx = -INFINITY;
      uint32_t nv = 0;
      for (uint32_t j = 0; j < n_keys; j++) {
        if (kpos[j] > P) continue;
        const float *kv = keys + ((size_t)j * hkv + h / grp) * d;
        double dot = 0.0;
        for (uint32_t e = 0; e < d; e++) dot += (double)qv[e] * kv[e];
        s[j] = dot * scale;
        if (s[j] > mx) mx = s[j];
        nv++;
      }
      if (!nv) continue;
      double sum = 0.0;
      for (uint32_t j = 0; j < n_keys; j++)
        if (kpos[j] <= P) sum += exp(s[j] - mx);
      for (uint32_t j = 0; j < n_keys; j++) {
        if (kpos[j] > P) continue;
        o->raw[j] += exp(s[j] - mx) / sum;
        o->total[h]++;
        o->below_min[h] += s[j] < mx + log_p - 1e-4;
        o->below_max[h] += s[j] < mx + log_p + 1e-4;
      }
    }
  }
  free(s);
}

static refobs ref_new(uint32_t n_keys, uint32_t hq) {
  refobs o = {calloc(n_keys + 1, sizeof(double)),
              calloc(n_keys + 1, sizeof(uint32_t)),
              calloc(hq, sizeof(uint64_t)), calloc(hq, sizeof(uint64_t)),
              calloc(hq, sizeof(uint64_t))};
  return o;
}

static void ref_free(refobs *o) {
  free(o->raw);
  free(o->seen);
  free(o->below_min);
  free(o->below_max);
  free(o->total);
}

/* Compares the layer's observation with the reference. */
static void compare_obs(const pvl_cache *c, pvl_seq_id s, uint32_t l,
                        const refobs *ref, uint32_t n_keys, uint32_t rows,
                        uint32_t hq, const char *ctx) {
  float *raw = malloc((n_keys + 1) * sizeof(float));
  uint32_t *seen = malloc((n_keys + 1) * sizeof(uint32_t));
  float *gamma = malloc(hq * sizeof(float));
  float gl;
  uint32_t nk, nr;
  pvl_status st = pvl_seq_observation(c, s, l, gamma, &gl, raw, seen,
                                      n_keys + 1, &nk, &nr);
  cr_assert_eq(st, PVL_SUCCESS, "%s: pvl_seq_observation: %s", ctx,
               pvl_cache_last_error(c));
  cr_assert_eq(nk, n_keys, "%s: n_keys %u, expected %u", ctx, nk, n_keys);
  cr_assert_eq(nr, rows, "%s: n_rows %u, expected %u", ctx, nr, rows);
  for (uint32_t j = 0; j < n_keys; j++) {
    const double want = ref->raw[j];
    cr_assert(fabs(raw[j] - want) <= 1e-5 * fabs(want) + 1e-7,
              "%s: layer %u raw[%u] = %.9g, reference %.9g", ctx, l, j,
              (double)raw[j], want);
    cr_assert_eq(seen[j], ref->seen[j], "%s: layer %u seen[%u] = %u, "
                 "reference %u", ctx, l, j, seen[j], ref->seen[j]);
  }
  double gsum = 0.0;
  for (uint32_t h = 0; h < hq; h++) {
    const double tot = (double)ref->total[h];
    const double below = tot > 0 ? floor((double)gamma[h] * tot + 0.5) : 0;
    cr_assert(below >= (double)ref->below_min[h] &&
                  below <= (double)ref->below_max[h],
              "%s: layer %u head %u: %g of %g entries below, reference "
              "[%llu, %llu]",
              ctx, l, h, below, tot, (unsigned long long)ref->below_min[h],
              (unsigned long long)ref->below_max[h]);
    gsum += gamma[h];
  }
  cr_assert(fabs(gl - gsum / hq) <= 1e-6, "%s: gamma_layer %g, mean %g", ctx,
            (double)gl, gsum / hq);
  free(raw);
  free(seen);
  free(gamma);
}

static bool fragmented(const pvl_cache *c, pvl_seq_id s, uint32_t l) {
  int32_t ids[512];
  uint32_t n = 0;
  if (pvl_seq_blocks(c, s, l, ids, 512, &n) != PVL_SUCCESS) return false;
  for (uint32_t i = 1; i < n; i++)
    if (ids[i] != ids[i - 1] + 1) return true;
  return false;
}

Test(observe, matches_dense_reference_on_fragmented_pages) {
  const uint32_t block_sizes[3] = {1, 4, 16};
  const uint32_t heads[3][2] = {{4, 2}, {2, 2}, {3, 1}};
  int n_frag = 0, n_cases = 0;
  for (int bi = 0; bi < 3; bi++) {
    for (uint64_t seed = 0; seed < 12; seed++) {
      rng r = rseed(seed * 31 + (uint64_t)bi);
      const uint32_t bs = block_sizes[bi];
      const uint32_t hq = heads[seed % 3][0], hkv = heads[seed % 3][1];
      const uint32_t d = 1u << rrange(&r, 1, 4), L = 2;
      const uint32_t m = rrange(&r, 1, 70);
      pvl_cache *c = mk_cache(L, hq, hkv, d, bs, 2000);
      pvl_seq_id fill[8];
      uint32_t nf;
      pvl_seq_id s = add_fragmented(c, &r, m, NULL, 0, fill, &nf);
      hostkv h = hk_new(L, hq, hkv, d, m);
      hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
      for (uint32_t l = 0; l < L; l++) n_frag += fragmented(c, s, l);
      n_cases++;
      /* Rows: a random range of the prompt's queries (rows past the
       * sequence's tokens are refused), observed in up to three chunks. */
      const uint32_t first = rbelow(&r, m);
      const uint32_t rows = rrange(&r, 1, m - first);
      const float p = seed % 2 ? 0.01f : 0.2f;
      const float scale = seed % 3 == 0 ? 0.0f : runif(&r, 0.3f, 2.0f);
      const double sc = scale == 0.0f ? 1.0 / sqrt((double)d) : scale;
      uint32_t *kpos = malloc(m * sizeof(uint32_t));
      for (uint32_t j = 0; j < m; j++) kpos[j] = j;
      for (uint32_t l = 0; l < L; l++) {
        float *q = rand_q(&r, rows, hq, d, 1.5f);
        uint32_t done = 0;
        while (done < rows) {
          uint32_t n = rrange(&r, 1, rows - done);
          TU_OK(c, pvl_observe(c, s, l, q + (size_t)done * hq * d, first + done,
                            n, p, scale, NULL));
          done += n;
        }
        refobs ref = ref_new(m, hq);
        ref_observe(h.k[l], kpos, m, q, first, rows, hq, hkv, d, sc,
                    log((double)p), &ref);
        char ctx[96];
        snprintf(ctx, sizeof(ctx), "bs %u seed %llu m %u rows [%u,+%u)", bs,
                 (unsigned long long)seed, m, first, rows);
        compare_obs(c, s, l, &ref, m, rows, hq, ctx);
        ref_free(&ref);
        free(q);
      }
      free(kpos);
      hk_free(&h);
      CHECK_CACHE(c);
      pvl_cache_destroy(c);
    }
  }
  /* The layouts really were fragmented (else this test proves little). */
  cr_assert(n_frag >= n_cases / 2, "only %d of %d cases fragmented", n_frag,
            n_cases);
}

Test(observe, matches_reference_after_retain_and_decode) {
  /* Keys at non-identity positions (a retained layer plus decode tokens):
   * a row sees the keys whose logical position is <= its own. */
  for (uint64_t seed = 0; seed < 16; seed++) {
    rng r = rseed(1000 + seed);
    const uint32_t L = 1, hq = 4, hkv = 2, d = 8, bs = 1u << rbelow(&r, 4);
    const uint32_t m = rrange(&r, 4, 60), nd = rrange(&r, 1, 10);
    pvl_cache *c = mk_cache(L, hq, hkv, d, bs, 1000);
    pvl_seq_id fill[8];
    uint32_t nf;
    pvl_seq_id s = add_fragmented(c, &r, m, NULL, 0, fill, &nf);
    hostkv h = hk_new(L, hq, hkv, d, m + nd);
    hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
    /* Keep a random subset of the prompt. */
    uint32_t *keep = malloc(m * sizeof(uint32_t)), nk = 0;
    for (uint32_t j = 0; j < m; j++)
      if (rbelow(&r, 3) == 0 || j == 0) keep[nk++] = j;
    TU_OK(c, pvl_seq_retain(c, s, 0, keep, nk, NULL));
    for (uint32_t t = 0; t < nd; t++) {
      TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
      hk_write(c, s, &h, &r, m + t, 1, nk + t, 1.5f);
    }
    const uint32_t n_keys = nk + nd;
    uint32_t *kpos = malloc(n_keys * sizeof(uint32_t));
    for (uint32_t i = 0; i < nk; i++) kpos[i] = keep[i];
    for (uint32_t t = 0; t < nd; t++) kpos[nk + t] = m + t;
    uint32_t *pos = malloc(n_keys * sizeof(uint32_t));
    cr_assert_eq(get_positions(c, s, 0, pos, n_keys), n_keys);
    for (uint32_t i = 0; i < n_keys; i++)
      cr_assert_eq(pos[i], kpos[i], "slot %u at position %u, expected %u", i,
                   pos[i], kpos[i]);
    /* Gather the keys in slot order for the reference. */
    const size_t row = hk_row(&h);
    float *keys = malloc(n_keys * row * sizeof(float));
    for (uint32_t i = 0; i < n_keys; i++)
      memcpy(keys + i * row, h.k[0] + (size_t)kpos[i] * row,
             row * sizeof(float));
    const uint32_t first = rbelow(&r, m + nd), rows = m + nd - first;
    float *q = rand_q(&r, rows, hq, d, 1.5f);
    TU_OK(c, pvl_observe(c, s, 0, q, first, rows, 0.05f, 0.0f, NULL));
    refobs ref = ref_new(n_keys, hq);
    ref_observe(keys, kpos, n_keys, q, first, rows, hq, hkv, d,
                1.0 / sqrt((double)d), log(0.05), &ref);
    char ctx[64];
    snprintf(ctx, sizeof(ctx), "seed %llu", (unsigned long long)seed);
    compare_obs(c, s, 0, &ref, n_keys, rows, hq, ctx);
    ref_free(&ref);
    free(q);
    free(keys);
    free(pos);
    free(kpos);
    free(keep);
    hk_free(&h);
    pvl_cache_destroy(c);
  }
}

/* The CPU observation splits its rows into units of 128 and may run them
 * on several threads and in AVX2 or AVX-512 copies (PVL_CPU_THREADS,
 * PVL_CPU_ISA, read at cache creation). Over a prompt long enough for many
 * units, rounds and threads, observed in two chunks that do not align with
 * the units: the same bits for every thread count and instruction set
 * (an ISA the machine lacks falls back to one it has), and the dense
 * reference's values. */
Test(observe, same_bits_for_any_threads_and_isa) {
  const uint32_t hq = 8, hkv = 2, d = 40, m = 700, split = 333;
  const char *const settings[][2] = {
      {"1", "generic"}, {"1", "avx2"}, {"1", NULL}, {"2", NULL},
      {"3", "generic"}, {"5", "avx2"}, {"2", NULL}};
  const size_t n_set = sizeof(settings) / sizeof(settings[0]);
  double *raw0 = malloc(m * sizeof(double));
  uint32_t *seen0 = malloc(m * sizeof(uint32_t));
  uint64_t below0[8], total0[8];
  for (size_t si = 0; si < n_set; si++) {
    cr_assert_eq(setenv("PVL_CPU_THREADS", settings[si][0], 1), 0);
    if (settings[si][1])
      cr_assert_eq(setenv("PVL_CPU_ISA", settings[si][1], 1), 0);
    else
      cr_assert_eq(unsetenv("PVL_CPU_ISA"), 0);
    rng r = rseed(77);
    pvl_cache *c = mk_cache(1, hq, hkv, d, 16, 200);
    pvl_seq_id fill[8];
    uint32_t nf;
    pvl_seq_id s = add_fragmented(c, &r, m, NULL, 0, fill, &nf);
    hostkv h = hk_new(1, hq, hkv, d, m);
    hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
    float *q = rand_q(&r, m, hq, d, 1.5f);
    TU_OK(c, pvl_observe(c, s, 0, q, 0, split, 0.01f, 0.0f, NULL));
    TU_OK(c, pvl_observe(c, s, 0, q + (size_t)split * hq * d, split, m - split,
                         0.01f, 0.0f, NULL));
    const pvl_obs *o = pvl__seq_get(c, s)->obs[0];
    cr_assert_eq(o->n_keys, m);
    if (si == 0) {
      uint32_t *kpos = malloc(m * sizeof(uint32_t));
      for (uint32_t j = 0; j < m; j++) kpos[j] = j;
      refobs ref = ref_new(m, hq);
      ref_observe(h.k[0], kpos, m, q, 0, m, hq, hkv, d, 1.0 / sqrt((double)d),
                  log(0.01), &ref);
      compare_obs(c, s, 0, &ref, m, m, hq, "700 rows, 1 thread, generic");
      ref_free(&ref);
      free(kpos);
      memcpy(raw0, o->raw, m * sizeof(double));
      memcpy(seen0, o->seen, m * sizeof(uint32_t));
      memcpy(below0, o->below, sizeof(below0));
      memcpy(total0, o->total, sizeof(total0));
    } else {
      for (uint32_t j = 0; j < m; j++) {
        cr_assert(memcmp(&o->raw[j], &raw0[j], sizeof(double)) == 0,
                  "threads %s, isa %s: raw[%u] = %.17g, 1 thread generic "
                  "%.17g",
                  settings[si][0], settings[si][1] ? settings[si][1] : "best",
                  j, o->raw[j], raw0[j]);
        cr_assert_eq(o->seen[j], seen0[j]);
      }
      for (uint32_t hh = 0; hh < hq; hh++) {
        cr_assert_eq(o->below[hh], below0[hh], "head %u", hh);
        cr_assert_eq(o->total[hh], total0[hh], "head %u", hh);
      }
    }
    free(q);
    hk_free(&h);
    CHECK_CACHE(c);
    pvl_cache_destroy(c);
  }
  unsetenv("PVL_CPU_THREADS");
  unsetenv("PVL_CPU_ISA");
  free(raw0);
  free(seen0);
}

/* ======================================================================== */
/* Budgets: properties over random inputs                                   */
/* ======================================================================== */

static uint32_t rhu(double x) { return (uint32_t)floor(x + 0.5); }

/* True if x is within eps of a rounding boundary (k + 0.5). */
static bool near_half(double x) {
  double f = x - floor(x);
  return fabs(f - 0.5) < 1e-7;
}

Test(budgets, random_properties) {
  for (uint64_t seed = 0; seed < 3000; seed++) {
    rng r = rseed(seed);
    const uint32_t L = rrange(&r, 1, 40);
    const uint32_t m = rbelow(&r, 4) == 0 ? rrange(&r, 1, 20)
                                          : rrange(&r, 1, 5000);
    /* Binary fractions: the products below are exact in float and double,
     * so no rounding ambiguity between the spec and the code. */
    const float alpha = (float)rrange(&r, 1, 1024) / 1024.0f;
    const float mlr = (float)rrange(&r, 1, 200) / 1024.0f;
    float *dens = malloc(L * sizeof(float));
    const int zero_all = rbelow(&r, 10) == 0;
    for (uint32_t l = 0; l < L; l++) {
      uint32_t kind = rbelow(&r, 5);
      dens[l] = zero_all || kind == 0 ? 0.0f
                : kind == 1           ? 1.0f
                                      : (float)rrange(&r, 1, 4096) / 4096.0f;
    }
    uint32_t *k = malloc(L * sizeof(uint32_t));
    pvl_policy p = pol(PVL_POLICY_VLCACHE);
    p.keep_ratio = alpha;
    p.min_layer_ratio = mlr;

    /* Algorithm 1 as written. */
    TU_OK(NULL, pvl_policy_budgets(&p, L, m, dens, k));
    double Z = 0.0;
    for (uint32_t l = 0; l < L; l++) Z += dens[l];
    for (uint32_t l = 0; l < L; l++) {
      double beta = Z > 0 ? dens[l] / Z * alpha * L : alpha;
      beta = beta < mlr ? mlr : beta > 1.0 ? 1.0 : beta;
      double x = beta * m;
      uint32_t want = rhu(x);
      if (want < 1) want = 1;
      if (want > m) want = m;
      cr_assert(k[l] >= 1 && k[l] <= m, "seed %llu: k[%u] = %u outside "
                "[1, %u]", (unsigned long long)seed, l, k[l], m);
      if (!near_half(x))
        cr_assert_eq(k[l], want, "seed %llu L %u m %u alpha %g: k[%u] = %u, "
                     "Algorithm 1 gives %u (beta %g)",
                     (unsigned long long)seed, L, m, (double)alpha, l, k[l],
                     want, beta);
    }

    /* Water-filling: sum exactly T, bounds, and each k_l within one unit
     * of clip(lambda d_l m, lo, m) for the lambda that sums to T (found
     * here by an independent bisection). */
    p.renormalize = 1;
    TU_OK(NULL, pvl_policy_budgets(&p, L, m, dens, k));
    uint32_t lo = (uint32_t)ceil((double)mlr * m);
    if (lo < 1) lo = 1;
    if (lo > m) lo = m;
    double T = floor((double)alpha * L * m + 0.5);
    if (T < (double)L * lo) T = (double)L * lo;
    if (T > (double)L * m) T = (double)L * m;
    uint64_t sum = 0;
    for (uint32_t l = 0; l < L; l++) {
      cr_assert(k[l] >= lo && k[l] <= m, "seed %llu: renormalized k[%u] = %u "
                "outside [%u, %u]", (unsigned long long)seed, l, k[l], lo, m);
      sum += k[l];
    }
    cr_assert_eq((double)sum, T, "seed %llu: renormalized sum %llu, T = %g",
                 (unsigned long long)seed, (unsigned long long)sum, T);
    /* The shares x_l the budgets round: Z = 0 -> T / L each; else layers
     * of density 0 get lo, unless the others all at m leave more, which
     * they then share evenly; the others get clip(lambda d_l m, lo, m)
     * with lambda (independent bisection) making the total T. */
    double *x = malloc(L * sizeof(double));
    uint32_t nz = 0;
    for (uint32_t l = 0; l < L; l++) nz += dens[l] > 0.0f;
    const uint32_t z = L - nz;
    if (Z == 0.0) {
      for (uint32_t l = 0; l < L; l++) x[l] = T / L;
    } else if (z > 0 && (double)nz * m + (double)z * lo < T) {
      for (uint32_t l = 0; l < L; l++)
        x[l] = dens[l] > 0.0f ? (double)m : (T - (double)nz * m) / z;
    } else {
      const double target = T - (double)z * lo;
      double a = 0.0, b = 1.0, fs;
#define WF_SUM(lam, out)                                                     \
  do {                                                                       \
    out = 0.0;                                                               \
    for (uint32_t l_ = 0; l_ < L; l_++) {                                    \
      if (dens[l_] == 0.0f) continue;                                        \
      double x_ = (lam) * (double)dens[l_] * m;                              \
      out += x_ < lo ? lo : x_ > m ? m : x_;                                 \
    }                                                                        \
  } while (0)
      for (;;) {
        WF_SUM(b, fs);
        if (fs >= target || b > 1e15) break;
        b *= 2;
      }
      for (int it = 0; it < 200; it++) {
        double mid = 0.5 * (a + b);
        WF_SUM(mid, fs);
        if (fs < target)
          a = mid;
        else
          b = mid;
      }
#undef WF_SUM
      for (uint32_t l = 0; l < L; l++) {
        double v = b * (double)dens[l] * m;
        x[l] = dens[l] == 0.0f ? lo : v < lo ? lo : v > m ? m : v;
      }
    }
    for (uint32_t l = 0; l < L; l++) {
      cr_assert(fabs((double)k[l] - x[l]) < 1.0 + 1e-6,
                "seed %llu L %u m %u: renormalized k[%u] = %u, share %g "
                "(d = %g)",
                (unsigned long long)seed, L, m, l, k[l], x[l],
                (double)dens[l]);
      /* Denser layers never get less. */
      for (uint32_t j = 0; j < L; j++)
        if (dens[j] > dens[l])
          cr_assert(k[j] >= k[l], "seed %llu: d[%u] > d[%u] but k %u < %u",
                    (unsigned long long)seed, j, l, k[j], k[l]);
    }
    free(x);

    /* Uniform. */
    const pvl_policy_kind uni[3] = {PVL_POLICY_STREAMING, PVL_POLICY_H2O,
                                    PVL_POLICY_SNAPKV};
    for (int i = 0; i < 3; i++) {
      pvl_policy u = pol(uni[i]);
      u.keep_ratio = alpha;
      TU_OK(NULL, pvl_policy_budgets(&u, L, m, NULL, k));
      uint32_t want = rhu((double)alpha * m);
      if (want < 1) want = 1;
      for (uint32_t l = 0; l < L; l++)
        cr_assert_eq(k[l], want, "seed %llu: uniform k = %u, expected %u",
                     (unsigned long long)seed, k[l], want);
    }

    /* PyramidKV, the header's formula. */
    pvl_policy py = pol(PVL_POLICY_PYRAMIDKV);
    py.keep_ratio = alpha;
    py.snap_window = rrange(&r, 1, 64);
    py.pyramid_beta = (float)rrange(&r, 1, 40) / 2.0f;
    if (py.pyramid_beta < 1.0f) py.pyramid_beta = 1.0f;
    TU_OK(NULL, pvl_policy_budgets(&py, L, m, NULL, k));
    {
      const double w = py.snap_window, C = (double)alpha * m;
      double plo = C / py.pyramid_beta, phi = 2 * C - plo;
      if (phi >= m - w) {
        phi = m - w;
        plo = 2 * C - phi;
      }
      const bool pyramid = L >= 2 && m >= phi && phi >= plo && plo >= w;
      uint32_t uni_k = rhu(C);
      if (uni_k < 1) uni_k = 1;
      for (uint32_t l = 0; l < L; l++) {
        cr_assert(k[l] >= 1 && k[l] <= m);
        if (l) cr_assert(k[l] <= k[l - 1], "pyramid budgets must not grow");
        if (!pyramid) {
          cr_assert_eq(k[l], uni_k, "seed %llu: pyramid fallback k = %u, "
                       "expected %u", (unsigned long long)seed, k[l], uni_k);
        } else {
          double x = phi - l * (phi - plo) / (L - 1);
          if (!near_half(x))
            cr_assert_eq(k[l], rhu(x), "seed %llu L %u m %u: pyramid k[%u] = "
                         "%u, expected round(%g)", (unsigned long long)seed,
                         L, m, l, k[l], x);
        }
      }
    }
    free(k);
    free(dens);
  }
}

/* ======================================================================== */
/* Selection: properties over random inputs                                 */
/* ======================================================================== */

/* Independent ranking scores from an observation (double precision). */
static void ref_scores(const pvl_policy *p, uint32_t m, const float *raw,
                       const uint32_t *seen, uint32_t n_rows, double *out) {
  switch (p->kind) {
  case PVL_POLICY_H2O:
    for (uint32_t j = 0; j < m; j++)
      out[j] = seen[j] ? (double)raw[j] / seen[j] : 0.0;
    break;
  case PVL_POLICY_SNAPKV:
  case PVL_POLICY_PYRAMIDKV: {
    const uint32_t w = p->snap_window < m ? p->snap_window : m, n = m - w;
    const int64_t half = p->pool_kernel / 2;
    for (uint32_t j = 0; j < n; j++) {
      double acc = 0.0;
      for (int64_t t = (int64_t)j - half; t <= (int64_t)j + half; t++)
        if (t >= 0 && t < (int64_t)n) acc += raw[t];
      out[j] = acc / n_rows / p->pool_kernel;
    }
    for (uint32_t j = n; j < m; j++) out[j] = HUGE_VAL;
    break;
  }
  default:
    for (uint32_t j = 0; j < m; j++) out[j] = raw[j];
  }
}

static uint32_t ref_recent(const pvl_policy *p, uint32_t m, uint32_t k) {
  uint32_t r = (uint32_t)ceilf(p->recent_ratio * (float)k);
  if (p->kind == PVL_POLICY_SNAPKV || p->kind == PVL_POLICY_PYRAMIDKV) {
    uint32_t w = p->snap_window < m ? p->snap_window : m;
    if (r < w) r = w;
  }
  return r < k ? r : k;
}

/* Checks a selection of k of m candidates against the policy's rule.
 * score: reference scores (scored kinds) or NULL. Near-ties (within float
 * rounding) may go either way. */
static void check_selection(const pvl_policy *p, uint32_t m, uint32_t k,
                            const double *score, const uint32_t *keep,
                            uint32_t n, const char *ctx) {
  const uint32_t kk = k < m ? k : m;
  cr_assert_eq(n, kk, "%s: kept %u, expected min(%u, %u)", ctx, n, k, m);
  for (uint32_t i = 0; i < n; i++) {
    cr_assert(keep[i] < m, "%s: keep[%u] = %u >= m = %u", ctx, i, keep[i], m);
    if (i)
      cr_assert(keep[i] > keep[i - 1], "%s: keep not strictly ascending at "
                "%u (%u, %u)", ctx, i, keep[i - 1], keep[i]);
  }
  if (kk == m || p->kind == PVL_POLICY_FULL) {
    for (uint32_t i = 0; i < n; i++) cr_assert_eq(keep[i], i, "%s", ctx);
    return;
  }
  if (p->kind == PVL_POLICY_STREAMING) {
    const uint32_t sinks = p->sink_tokens < kk ? p->sink_tokens : kk;
    for (uint32_t i = 0; i < n; i++) {
      uint32_t want = i < sinks ? i : m - (kk - i);
      cr_assert_eq(keep[i], want, "%s: streaming keep[%u] = %u, expected %u",
                   ctx, i, keep[i], want);
    }
    return;
  }
  const uint32_t r = ref_recent(p, m, kk), rest = kk - r;
  /* The recent window: the last r entries are m - r .. m - 1. */
  for (uint32_t i = 0; i < r; i++)
    cr_assert_eq(keep[rest + i], m - r + i, "%s: recent window (r = %u) "
                 "missing position %u", ctx, r, m - r + i);
  /* Top scores among [0, m - r): min over kept >= max over dropped. */
  uint8_t *in = calloc(m, 1);
  for (uint32_t i = 0; i < rest; i++) in[keep[i]] = 1;
  double kept_min = HUGE_VAL, drop_max = -HUGE_VAL;
  uint32_t at_min = 0, at_max = 0;
  for (uint32_t j = 0; j < m - r; j++) {
    if (in[j] && score[j] < kept_min) kept_min = score[j], at_min = j;
    if (!in[j] && score[j] > drop_max) drop_max = score[j], at_max = j;
  }
  free(in);
  if (rest && rest < m - r) {
    const double tol = 1e-6 * fabs(drop_max) + 1e-12;
    cr_assert(kept_min >= drop_max - tol,
              "%s: kept position %u (score %.9g) over dropped position %u "
              "(score %.9g)",
              ctx, at_min, kept_min, at_max, drop_max);
  }
}

Test(select, random_properties) {
  const pvl_policy_kind kinds[6] = {PVL_POLICY_FULL,   PVL_POLICY_STREAMING,
                                    PVL_POLICY_H2O,    PVL_POLICY_SNAPKV,
                                    PVL_POLICY_PYRAMIDKV, PVL_POLICY_VLCACHE};
  for (uint64_t seed = 0; seed < 1500; seed++) {
    rng r = rseed(77 + seed);
    pvl_policy p = pol(kinds[seed % 6]);
    const uint32_t m = rrange(&r, 1, 300);
    const uint32_t k = rbelow(&r, 8) == 0 ? rrange(&r, 0, m + 5)
                                          : rrange(&r, 0, m);
    p.recent_ratio = (float)rrange(&r, 0, 10) / 10.0f;
    p.snap_window = rrange(&r, 1, 40);
    p.sink_tokens = rrange(&r, 0, 8);
    float *sc = malloc(m * sizeof(float));
    double *dsc = malloc(m * sizeof(double));
    /* Few distinct values, so exact ties are frequent. */
    const uint32_t levels = rrange(&r, 1, 12);
    for (uint32_t j = 0; j < m; j++) {
      sc[j] = (float)rbelow(&r, levels);
      dsc[j] = sc[j];
    }
    uint32_t *keep = malloc((m + 1) * sizeof(uint32_t)), n = 0;
    if (p.kind == PVL_POLICY_FULL && k < m) {
      /* full keeps everything; a smaller budget is refused. */
      TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, m, k, sc, keep, &n));
      free(keep);
      free(sc);
      free(dsc);
      continue;
    }
    TU_OK(NULL, pvl_policy_select(&p, m, k, sc, keep, &n));
    char ctx[96];
    snprintf(ctx, sizeof(ctx), "seed %llu %s m %u k %u",
             (unsigned long long)seed, pvl_policy_name(p.kind), m, k);
    check_selection(&p, m, k, dsc, keep, n, ctx);
    /* Exact ties break toward the later position: an exactly computable
     * expected set. Sort candidates by (score desc, index desc). */
    if (p.kind >= PVL_POLICY_H2O && k < m) {
      const uint32_t r0 = ref_recent(&p, m, k), rest = k - r0;
      uint8_t *want = calloc(m, 1);
      uint32_t taken = 0;
      for (int lv = (int)levels - 1; lv >= 0 && taken < rest; lv--)
        for (int64_t j = (int64_t)(m - r0) - 1; j >= 0 && taken < rest; j--)
          if (sc[j] == (float)lv) want[j] = 1, taken++;
      for (uint32_t j = m - r0; j < m; j++) want[j] = 1;
      uint32_t i = 0;
      for (uint32_t j = 0; j < m; j++)
        if (want[j]) {
          cr_assert(i < n && keep[i] == j, "%s: expected position %u kept "
                    "(ties toward the later position)", ctx, j);
          i++;
        }
      free(want);
    }
    free(keep);
    free(sc);
    free(dsc);
  }
}

/* ======================================================================== */
/* Compression end to end                                                   */
/* ======================================================================== */

typedef struct ccase {
  uint32_t L, hq, hkv, d, bs, m, nd;
  pvl_policy_kind kind;
  uint64_t seed;
} ccase;

/* Observes the rows the policy needs, on every layer, with random Q. */
static void observe_for(pvl_cache *c, pvl_seq_id s, const pvl_policy *p,
                        const ccase *cc, rng *r) {
  uint32_t first, n, fb;
  TU_OK(c, pvl_policy_rows(p, c, s, &first, &n, &fb));
  for (uint32_t l = 0; l < cc->L; l++) {
    if (!n) continue;
    float *q = rand_q(r, n, cc->hq, cc->d, 1.5f);
    /* Two chunks: observation accumulates. */
    uint32_t h = n / 2;
    if (h) TU_OK(c, pvl_observe(c, s, l, q, first, h, p->threshold, 0.0f, NULL));
    TU_OK(c, pvl_observe(c, s, l, q + (size_t)h * cc->hq * cc->d, first + h,
                      n - h, p->threshold, 0.0f, NULL));
    free(q);
  }
}

static void run_case(const ccase *cc) {
  rng r = rseed(cc->seed * 7919 + (uint64_t)cc->kind * 13 + cc->bs);
  const uint32_t L = cc->L, m = cc->m, nd = cc->nd, bs = cc->bs;
  char ctx[128];
  snprintf(ctx, sizeof(ctx), "%s seed %llu bs %u m %u nd %u",
           pvl_policy_name(cc->kind), (unsigned long long)cc->seed, bs, m, nd);
  pvl_cache *c = mk_cache(L, cc->hq, cc->hkv, cc->d, bs, 4000);
  pvl_span vis = {0, 0};
  uint32_t n_vis = 0;
  if (m >= 3 && rbelow(&r, 4)) {
    vis.begin = rbelow(&r, m - 1);
    vis.end = rrange(&r, vis.begin + 1, m);
    n_vis = 1;
  }
  pvl_seq_id fill[8];
  uint32_t nf;
  pvl_seq_id s = add_fragmented(c, &r, m, n_vis ? &vis : NULL, n_vis, fill,
                                &nf);
  hostkv h = hk_new(L, cc->hq, cc->hkv, cc->d, m + nd);
  hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
  for (uint32_t t = 0; t < nd; t++) {
    TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
    hk_write(c, s, &h, &r, m + t, 1, m + t, 1.5f);
  }
  pvl_policy p = pol(cc->kind);
  p.keep_ratio = (float)rrange(&r, 1, 100) / 100.0f;
  if (cc->kind == PVL_POLICY_VLCACHE) {
    p.renormalize = rbelow(&r, 2);
    p.threshold = rbelow(&r, 2) ? 0.01f : 0.3f;
  }
  if (cc->kind == PVL_POLICY_PYRAMIDKV || cc->kind == PVL_POLICY_SNAPKV) {
    p.snap_window = rrange(&r, 1, 16);
    p.pyramid_beta = (float)rrange(&r, 1, 8);
  }
  const bool scored = cc->kind >= PVL_POLICY_H2O;
  observe_for(c, s, &p, cc, &r);

  /* What the observation says, before compress consumes it. */
  float *dens = malloc(L * sizeof(float));
  float **raw = calloc(L, sizeof(float *));
  uint32_t **seen = calloc(L, sizeof(uint32_t *));
  uint32_t *nrows = calloc(L, sizeof(uint32_t));
  for (uint32_t l = 0; l < L; l++) {
    dens[l] = 1.0f;
    if (!scored) continue;
    raw[l] = malloc((m + nd) * sizeof(float));
    seen[l] = malloc((m + nd) * sizeof(uint32_t));
    float gl;
    TU_OK(c, pvl_seq_observation(c, s, l, NULL, &gl, raw[l], seen[l], m + nd,
                              NULL, &nrows[l]));
    if (cc->kind == PVL_POLICY_VLCACHE) dens[l] = 1.0f - gl;
  }
  uint32_t *budget = malloc(L * sizeof(uint32_t));

  uint32_t blocks_before = 0;
  for (uint32_t l = 0; l < L; l++) {
    uint32_t nt, nb;
    layer_size(c, s, l, &nt, &nb);
    cr_assert_eq(nt, m + nd);
    blocks_before += nb;
  }
  const uint32_t free_before = free_blocks(c);

  pvl_compress_report rep;
  memset(&rep, 0, sizeof(rep));
  uint32_t *rb = malloc(L * sizeof(uint32_t)), *rk = malloc(L * sizeof(uint32_t));
  float *rd = malloc(L * sizeof(float));
  rep.budget = rb;
  rep.kept = rk;
  rep.density = rd;
  TU_OK(c, pvl_compress(c, s, &p, &rep, NULL));
  CHECK_CACHE(c);

  /* Densities: 1 - gamma_l of the observation (VL-Cache), else 1; the
   * budgets are Algorithm 1's of exactly those (tested by hand in
   * test_policy.c). */
  for (uint32_t l = 0; l < L; l++)
    cr_assert(fabs((double)rd[l] - dens[l]) <= 1e-6,
              "%s: report density[%u] = %.9g, expected %.9g", ctx, l,
              (double)rd[l], (double)dens[l]);
  TU_OK(NULL, pvl_policy_budgets(&p, L, m, rd, budget));

  /* Report. */
  uint32_t wf, wn, wfb;
  TU_OK(c, pvl_policy_rows(&p, c, s, &wf, &wn, &wfb));
  cr_assert_eq(rep.n_prompt, m, "%s", ctx);
  cr_assert(rep.window_first == wf && rep.window_rows == wn &&
                rep.window_fallback == wfb,
            "%s: report window %u+%u fb %u, rows say %u+%u fb %u", ctx,
            rep.window_first, rep.window_rows, rep.window_fallback, wf, wn,
            wfb);
  if (cc->kind == PVL_POLICY_VLCACHE)
    cr_assert_eq(wfb, (uint32_t)(n_vis == 0 || vis.end == m), "%s", ctx);
  uint64_t kept_total = 0;
  uint32_t blocks_after = 0, fresh = 0, returned = 0;
  uint32_t *pos = malloc((m + nd + 1) * sizeof(uint32_t));
  double *sc = malloc((m + 1) * sizeof(double));
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t kl = budget[l] < m ? budget[l] : m;
    cr_assert_eq(rb[l], budget[l], "%s: report budget[%u] = %u, expected %u",
                 ctx, l, rb[l], budget[l]);
    cr_assert_eq(rk[l], kl, "%s: report kept[%u]", ctx, l);
    kept_total += kl;
    /* Memory: exactly the blocks the kept tokens need. */
    uint32_t nt, nb;
    layer_size(c, s, l, &nt, &nb);
    cr_assert_eq(nt, kl + nd, "%s: layer %u holds %u tokens, expected %u",
                 ctx, l, nt, kl + nd);
    cr_assert_eq(nb, cdiv(kl + nd, bs), "%s: layer %u holds %u blocks for %u "
                 "tokens (block_size %u)", ctx, l, nb, kl + nd, bs);
    blocks_after += nb;
    /* Selection: positions = the kept prompt positions, then the decode
     * tokens, all in order. */
    cr_assert_eq(get_positions(c, s, l, pos, m + nd), kl + nd);
    for (uint32_t t = 0; t < nd; t++)
      cr_assert_eq(pos[kl + t], m + t, "%s: decode token %u moved", ctx, t);
    if (scored) ref_scores(&p, m, raw[l], seen[l], nrows[l], sc);
    char lctx[160];
    snprintf(lctx, sizeof(lctx), "%s layer %u k %u", ctx, l, kl);
    check_selection(&p, m, kl, scored ? sc : NULL, pos, kl, lctx);
    /* Data: every kept token is the original token of that position. */
    check_data(c, s, &h, l, pos, kl + nd, lctx);
    /* Compaction: blocks before the first moved token stay; the rest of
     * the kept tokens are gathered into fresh blocks; the old blocks from
     * there on return to the pool (none is shared here). */
    const uint32_t n = kl + nd, n_final = cdiv(n, bs);
    uint32_t pre = 0;
    while (pre < n && pos[pre] == pre) pre++;
    const uint32_t stay = pre < n ? pre / bs : n_final;
    fresh += n_final - stay;
    returned += cdiv(m + nd, bs) - stay;
  }
  cr_assert_eq(rep.kept_total, kept_total, "%s", ctx);
  cr_assert(fabs(rep.keep_ratio - (double)kept_total / ((double)L * m)) < 1e-12,
            "%s: keep_ratio %g", ctx, rep.keep_ratio);
  cr_assert_eq(rep.blocks_before, blocks_before, "%s", ctx);
  cr_assert_eq(rep.blocks_after, blocks_after, "%s", ctx);
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.total_blocks, blocks_after, "%s", ctx);
  cr_assert_eq(info.total_tokens, kept_total + (uint64_t)L * nd, "%s", ctx);
  const uint32_t free_after = free_blocks(c);
  cr_assert_eq(free_after - free_before, blocks_before - blocks_after,
               "%s: the pool gained %u free blocks, the sequence gave up %u",
               ctx, free_after - free_before, blocks_before - blocks_after);
  cr_assert_eq(rep.blocks_freed, returned,
               "%s: report.blocks_freed %u, expected %u returned (and %u "
               "fresh)", ctx, rep.blocks_freed, returned, fresh);
  cr_assert_eq(rep.blocks_freed - fresh, free_after - free_before, "%s", ctx);
  /* The report alone says how the pool's free count moved. */
  cr_assert_eq(rep.blocks_taken, fresh, "%s: report.blocks_taken %u, %u fresh",
               ctx, rep.blocks_taken, fresh);
  cr_assert_eq((int64_t)free_after - (int64_t)free_before,
               (int64_t)rep.blocks_freed - (int64_t)rep.blocks_taken,
               "%s: free %u -> %u, report freed %u taken %u", ctx,
               free_before, free_after, rep.blocks_freed, rep.blocks_taken);
  /* The observation was consumed; a second compress is refused. */
  if (scored)
    TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL,
                                              0, NULL, NULL));
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &p, NULL, NULL));
  /* Decode goes on after compression: the next position is m + nd. */
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  for (uint32_t l = 0; l < L; l++) {
    uint32_t n = get_positions(c, s, l, pos, m + nd + 1);
    cr_assert_eq(pos[n - 1], m + nd, "%s: layer %u: the token appended "
                 "after compression is at position %u", ctx, l, pos[n - 1]);
    if (n > 1) cr_assert(pos[n - 2] < m + nd);
  }
  /* Fillers are untouched, and freeing everything returns every block. */
  for (uint32_t i = 0; i < nf; i++) {
    uint32_t nt, nb;
    layer_size(c, fill[i], 0, &nt, &nb);
    cr_assert(nt >= 1 && nt <= 9);
    TU_OK(c, pvl_seq_free(c, fill[i]));
  }
  TU_OK(c, pvl_seq_free(c, s));
  cr_assert_eq(free_blocks(c), 4000, "%s: blocks leaked", ctx);
  CHECK_CACHE(c);

  for (uint32_t l = 0; l < L; l++) {
    free(raw[l]);
    free(seen[l]);
  }
  free(raw);
  free(seen);
  free(nrows);
  free(dens);
  free(budget);
  free(rb);
  free(rk);
  free(rd);
  free(pos);
  free(sc);
  hk_free(&h);
  pvl_cache_destroy(c);
}

Test(compress, every_policy_random_cases) {
  const uint32_t block_sizes[3] = {1, 4, 16};
  for (int kind = 0; kind < 6; kind++) {
    for (uint64_t seed = 0; seed < 24; seed++) {
      rng r = rseed(seed + 100 * (uint64_t)kind);
      ccase cc = {.L = rrange(&r, 1, 4),
                  .hq = 4,
                  .hkv = seed % 2 ? 2 : 1,
                  .d = 4,
                  .bs = block_sizes[seed % 3],
                  .m = seed < 2 ? rrange(&r, 1, 6) : rrange(&r, 7, 120),
                  .nd = seed % 3 == 1 ? rrange(&r, 1, 20) : 0,
                  .kind = (pvl_policy_kind)kind,
                  .seed = seed};
      run_case(&cc);
    }
  }
}

Test(compress, paper_setup_vlcache_and_pyramid) {
  /* Default policies (alpha 0.1, p 0.01, window 32, beta 20) on longer
   * prompts, where the recent window and the pyramid actually bite. */
  const pvl_policy_kind kinds[3] = {PVL_POLICY_VLCACHE, PVL_POLICY_PYRAMIDKV,
                                    PVL_POLICY_SNAPKV};
  for (int i = 0; i < 3; i++) {
    for (uint64_t seed = 0; seed < 2; seed++) {
      ccase cc = {.L = 4, .hq = 2, .hkv = 1, .d = 4, .bs = 16,
                  .m = 700 + 97 * (uint32_t)seed, .nd = (uint32_t)seed * 5,
                  .kind = kinds[i], .seed = 50 + seed};
      run_case(&cc);
    }
  }
}

/* ======================================================================== */
/* Forks, failures and bad states                                           */
/* ======================================================================== */

Test(compress, fork_sharing_blocks_stays_intact) {
  for (uint64_t seed = 0; seed < 6; seed++) {
    rng r = rseed(500 + seed);
    const uint32_t L = 3, hq = 2, hkv = 1, d = 4, bs = seed % 2 ? 4 : 16;
    const uint32_t m = rrange(&r, 30, 90);
    pvl_cache *c = mk_cache(L, hq, hkv, d, bs, 600);
    pvl_seq_id s, f;
    TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s));
    hostkv h = hk_new(L, hq, hkv, d, m + 1);
    hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
    TU_OK(c, pvl_seq_fork(c, s, &f));
    pvl_policy p = pol(seed % 3 == 0 ? PVL_POLICY_STREAMING
                       : seed % 3 == 1 ? PVL_POLICY_H2O
                                       : PVL_POLICY_VLCACHE);
    p.keep_ratio = 0.3f;
    ccase cc = {.L = L, .hq = hq, .hkv = hkv, .d = d, .bs = bs, .m = m};
    observe_for(c, s, &p, &cc, &r);

    /* Expected pool use: each layer gathers what follows its identity
     * prefix into fresh blocks and frees nothing (every block is shared). */
    const uint32_t free_before = free_blocks(c);
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    TU_OK(c, pvl_compress(c, s, &p, &rep, NULL));
    CHECK_CACHE(c);
    uint32_t *pos = malloc((m + 1) * sizeof(uint32_t));
    uint32_t fresh = 0;
    for (uint32_t l = 0; l < L; l++) {
      uint32_t n = get_positions(c, s, l, pos, m);
      uint32_t pre = 0;
      while (pre < n && pos[pre] == pre) pre++;
      const uint32_t n_final = cdiv(n, bs);
      fresh += n_final - (pre < n ? pre / bs : n_final);
      check_data(c, s, &h, l, pos, n, "compressed parent");
    }
    cr_assert_eq(free_blocks(c), free_before - fresh,
                 "seed %llu: free %u, expected %u - %u fresh blocks",
                 (unsigned long long)seed, free_blocks(c), free_before, fresh);
    cr_assert(rep.blocks_freed == 0 && rep.blocks_taken == fresh,
              "seed %llu: report freed %u taken %u, expected 0 and %u",
              (unsigned long long)seed, rep.blocks_freed, rep.blocks_taken,
              fresh);
    /* The fork: all m tokens, identity positions, original data. */
    for (uint32_t l = 0; l < L; l++) {
      uint32_t nt, nb;
      layer_size(c, f, l, &nt, &nb);
      cr_assert(nt == m && nb == cdiv(m, bs));
      cr_assert_eq(get_positions(c, f, l, pos, m), m);
      for (uint32_t i = 0; i < m; i++) cr_assert_eq(pos[i], i);
      check_data(c, f, &h, l, pos, m, "fork");
    }
    /* The fork can be compressed on its own. */
    observe_for(c, f, &p, &cc, &r);
    TU_OK(c, pvl_compress(c, f, &p, NULL, NULL));
    CHECK_CACHE(c);
    for (uint32_t l = 0; l < L; l++) {
      uint32_t n = get_positions(c, f, l, pos, m);
      check_data(c, f, &h, l, pos, n, "compressed fork");
      n = get_positions(c, s, l, pos, m);
      check_data(c, s, &h, l, pos, n, "parent after fork compressed");
    }
    TU_OK(c, pvl_seq_free(c, s));
    TU_OK(c, pvl_seq_free(c, f));
    cr_assert_eq(free_blocks(c), 600);
    free(pos);
    hk_free(&h);
    pvl_cache_destroy(c);
  }
}

Test(compress, append_after_prefix_selection_gets_next_position) {
  /* m 8, streaming keep 0.5 -> k 4 = the 4 sinks: the kept set is the
   * prefix [0, 4), nothing moves. The next decode token is position 8 (the
   * sequence's next logical position), so pvl_seq_positions must say 8 and
   * a prompt row at position 5 must not see it (causal rule on logical
   * positions). */
  pvl_cache *c = mk_cache(1, 1, 1, 2, 4, 16);
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, 8, NULL, 0, &s));
  float kv[9][2] = {{0}};
  TU_OK(c, pvl_kv_write(c, s, 0, 0, 8, kv, kv, NULL));
  pvl_policy p = pol(PVL_POLICY_STREAMING);
  p.keep_ratio = 0.5f;
  TU_OK(c, pvl_compress(c, s, &p, NULL, NULL));
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.position, 9);
  uint32_t pos[8], n = get_positions(c, s, 0, pos, 8);
  cr_assert_eq(n, 5);
  for (uint32_t i = 0; i < 4; i++) cr_assert_eq(pos[i], i);
  cr_assert_eq(pos[4], 8,
               "the token appended after compression is reported at position "
               "%u, expected 8 (prompt 8 + first decode token)",
               pos[4]);
  const float q[2] = {0, 0};
  TU_OK(c, pvl_observe(c, s, 0, q, 5, 1, 0.01f, 1.0f, NULL));
  uint32_t seen[5];
  TU_OK(c, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, seen, 5, NULL, NULL));
  cr_assert_eq(seen[4], 0, "a row at position 5 saw the decode token at "
               "position 8");
  pvl_cache_destroy(c);
}

Test(compress, report_blocks_freed_with_shared_blocks) {
  /* L 1, bs 4, m 40, forked: every block is shared. Streaming keep 0.5
   * keeps 0..3 and 24..39: block 0 stays, 4 fresh blocks are gathered and
   * the 9 old blocks only lose the parent's reference. No block returns to
   * the free list: blocks_freed = 0 (the free count fell by 4). */
  pvl_cache *c = mk_cache(1, 1, 1, 2, 4, 20);
  pvl_seq_id s, f;
  TU_OK(c, pvl_seq_add(c, 40, NULL, 0, &s));
  TU_OK(c, pvl_seq_fork(c, s, &f));
  const uint32_t free_before = free_blocks(c);
  pvl_policy p = pol(PVL_POLICY_STREAMING);
  p.keep_ratio = 0.5f;
  pvl_compress_report rep;
  memset(&rep, 0, sizeof(rep));
  TU_OK(c, pvl_compress(c, s, &p, &rep, NULL));
  cr_assert_eq(free_blocks(c), free_before - 4);
  cr_assert_eq(rep.blocks_before, 10);
  cr_assert_eq(rep.blocks_after, 5);
  cr_assert_eq(rep.blocks_freed, 0,
               "report.blocks_freed = %u although no block returned to the "
               "pool (free %u -> %u)",
               rep.blocks_freed, free_before, free_blocks(c));
  /* The sequence gave up 5 blocks, but the pool lost 4: freed - taken, not
   * before - after, is the pool's change when blocks are shared. */
  cr_assert_eq(rep.blocks_taken, 4, "blocks_taken %u", rep.blocks_taken);
  /* The fork can still be compressed; its blocks are its own now except
   * block 0, which both keep in place: 9 return, 4 fresh are taken. */
  TU_OK(c, pvl_compress(c, f, &p, &rep, NULL));
  cr_assert_eq(rep.blocks_freed, 9, "fork: blocks_freed %u", rep.blocks_freed);
  cr_assert_eq(rep.blocks_taken, 4, "fork: blocks_taken %u", rep.blocks_taken);
  cr_assert_eq(free_blocks(c), free_before - 4 + 9 - 4);
  CHECK_CACHE(c);
  pvl_cache_destroy(c);
}

/* Everything observable about one sequence, to assert "nothing changed". */
typedef struct snap {
  pvl_stats st;
  uint32_t L, nt[8], nb[8];
  int32_t ids[8][64];
  uint32_t pos[8][256];
  float *k[8], *v[8];
  size_t row;
} snap;

static void snap_take(const pvl_cache *c, pvl_seq_id s, uint32_t L, size_t row,
                      snap *o) {
  memset(o, 0, sizeof(*o));
  o->L = L;
  o->row = row;
  cr_assert_eq(pvl_cache_get_stats(c, &o->st), PVL_SUCCESS);
  for (uint32_t l = 0; l < L; l++) {
    uint32_t n;
    layer_size(c, s, l, &o->nt[l], &o->nb[l]);
    TU_OK(c, pvl_seq_blocks(c, s, l, o->ids[l], 64, &n));
    get_positions(c, s, l, o->pos[l], 256);
    o->k[l] = malloc((o->nt[l] + 1) * row * sizeof(float));
    o->v[l] = malloc((o->nt[l] + 1) * row * sizeof(float));
    TU_OK(c, pvl_kv_read(c, s, l, 0, o->nt[l], o->k[l], o->v[l], NULL));
  }
}

static void snap_same(const pvl_cache *c, pvl_seq_id s, const snap *a,
                      bool stats, const char *ctx) {
  snap b;
  snap_take(c, s, a->L, a->row, &b);
  if (stats)
    cr_assert(a->st.free_blocks == b.st.free_blocks &&
                  a->st.used_blocks == b.st.used_blocks &&
                  a->st.shared_blocks == b.st.shared_blocks &&
                  a->st.num_seqs == b.st.num_seqs &&
                  a->st.tokens == b.st.tokens,
              "%s: stats changed (free %u -> %u, shared %u -> %u, tokens "
              "%llu -> %llu)",
              ctx, a->st.free_blocks, b.st.free_blocks, a->st.shared_blocks,
              b.st.shared_blocks, (unsigned long long)a->st.tokens,
              (unsigned long long)b.st.tokens);
  for (uint32_t l = 0; l < a->L; l++) {
    cr_assert(a->nt[l] == b.nt[l] && a->nb[l] == b.nb[l],
              "%s: layer %u size changed", ctx, l);
    cr_assert(memcmp(a->ids[l], b.ids[l], sizeof(a->ids[l])) == 0,
              "%s: layer %u block ids changed", ctx, l);
    cr_assert(memcmp(a->pos[l], b.pos[l], sizeof(a->pos[l])) == 0,
              "%s: layer %u positions changed", ctx, l);
    cr_assert(memcmp(a->k[l], b.k[l], a->nt[l] * a->row * sizeof(float)) ==
                      0 &&
                  memcmp(a->v[l], b.v[l], a->nt[l] * a->row * sizeof(float)) ==
                      0,
              "%s: layer %u data changed", ctx, l);
    free(b.k[l]);
    free(b.v[l]);
  }
  CHECK_CACHE(c);
}

static void snap_free(snap *a) {
  for (uint32_t l = 0; l < a->L; l++) {
    free(a->k[l]);
    free(a->v[l]);
  }
}

Test(compress, out_of_blocks_changes_nothing) {
  /* L 2, bs 4, m 40 (10 blocks a layer); streaming keeps 20 = sinks 0..3
   * and 24..39: block 0 stays, 4 fresh blocks are needed per layer. A
   * filler takes every other block: free = 0. */
  const pvl_policy_kind kinds[2] = {PVL_POLICY_STREAMING, PVL_POLICY_H2O};
  for (int i = 0; i < 2; i++) {
    const uint32_t L = 2, bs = 4, m = 40, filler_blocks = 6;
    pvl_cache *c = mk_cache(L, 2, 1, 4, bs, 2 * 10 + L * filler_blocks);
    rng r = rseed(9 + (uint64_t)i);
    pvl_seq_id s, fl;
    TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s));
    hostkv h = hk_new(L, 2, 1, 4, m);
    hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
    TU_OK(c, pvl_seq_add(c, filler_blocks * bs, NULL, 0, &fl));
    cr_assert_eq(free_blocks(c), 0);
    pvl_policy p = pol(kinds[i]);
    p.keep_ratio = 0.5f;
    p.recent_ratio = 1.0f; /* h2o: keep the recent 20 too (moves tokens) */
    ccase cc = {.L = L, .hq = 2, .hkv = 1, .d = 4, .bs = bs, .m = m};
    observe_for(c, s, &p, &cc, &r);
    float raw_before[40] = {0};
    if (kinds[i] == PVL_POLICY_H2O)
      TU_OK(c, pvl_seq_observation(c, s, 1, NULL, NULL, raw_before, NULL, 40,
                                NULL, NULL));
    snap a;
    snap_take(c, s, L, 4, &a);
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    TU_IS(PVL_ERR_OUT_OF_BLOCKS, pvl_compress(c, s, &p, &rep, NULL));
    snap_same(c, s, &a, true, pvl_policy_name(kinds[i]));
    snap_free(&a);
    /* Still observed (h2o), still compressible once blocks are free. */
    if (kinds[i] == PVL_POLICY_H2O) {
      float raw_after[40];
      TU_OK(c, pvl_seq_observation(c, s, 1, NULL, NULL, raw_after, NULL, 40,
                                NULL, NULL));
      cr_assert(memcmp(raw_before, raw_after, sizeof(raw_after)) == 0);
    }
    TU_OK(c, pvl_seq_free(c, fl));
    TU_OK(c, pvl_compress(c, s, &p, &rep, NULL));
    uint32_t nt, nb, pos[40];
    for (uint32_t l = 0; l < L; l++) {
      layer_size(c, s, l, &nt, &nb);
      cr_assert(nt == 20 && nb == 5);
      get_positions(c, s, l, pos, 40);
      check_data(c, s, &h, l, pos, nt, "after retry");
    }
    CHECK_CACHE(c);
    hk_free(&h);
    pvl_cache_destroy(c);
  }
}

Test(compress, out_of_blocks_at_a_later_layer_changes_nothing) {
  /* L 3, bs 4, m 40, forked: every block is shared, so compacting a layer
   * frees nothing and takes 4 fresh blocks (streaming keep 20: 0..3 stay,
   * 24..39 move). With 11 free blocks layers 0 and 1 fit, layer 2 does
   * not: nothing may change. With 12 it succeeds and leaves 0 free. */
  for (uint32_t extra = 11; extra <= 12; extra++) {
    const uint32_t L = 3, bs = 4, m = 40;
    pvl_cache *c = mk_cache(L, 1, 1, 4, bs, L * 10 + extra);
    rng r = rseed(extra);
    pvl_seq_id s, f;
    TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s));
    hostkv h = hk_new(L, 1, 1, 4, m);
    hk_write(c, s, &h, &r, 0, m, 0, 1.0f);
    TU_OK(c, pvl_seq_fork(c, s, &f));
    cr_assert_eq(free_blocks(c), extra);
    pvl_policy p = pol(PVL_POLICY_STREAMING);
    p.keep_ratio = 0.5f;
    snap a, af;
    snap_take(c, s, L, 4, &a);
    snap_take(c, f, L, 4, &af);
    if (extra == 11) {
      TU_IS(PVL_ERR_OUT_OF_BLOCKS, pvl_compress(c, s, &p, NULL, NULL));
      snap_same(c, s, &a, true, "parent");
      snap_same(c, f, &af, true, "fork");
    } else {
      TU_OK(c, pvl_compress(c, s, &p, NULL, NULL));
      cr_assert_eq(free_blocks(c), 0);
      snap_same(c, f, &af, false, "fork");
      uint32_t pos[40];
      for (uint32_t l = 0; l < L; l++) {
        uint32_t n = get_positions(c, s, l, pos, 40);
        cr_assert_eq(n, 20);
        check_data(c, s, &h, l, pos, n, "parent");
      }
    }
    snap_free(&a);
    snap_free(&af);
    hk_free(&h);
    CHECK_CACHE(c);
    pvl_cache_destroy(c);
  }
}

Test(compress, bad_states) {
  const uint32_t L = 2, bs = 4, m = 24;
  pvl_cache *c = mk_cache(L, 2, 1, 4, bs, 200);
  rng r = rseed(4242);
  const pvl_span vis = {2, 16};
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, m, &vis, 1, &s));
  hostkv h = hk_new(L, 2, 1, 4, m + 2);
  hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
  ccase cc = {.L = L, .hq = 2, .hkv = 1, .d = 4, .bs = bs, .m = m};
  const pvl_policy_kind scored[4] = {PVL_POLICY_H2O, PVL_POLICY_SNAPKV,
                                     PVL_POLICY_PYRAMIDKV,
                                     PVL_POLICY_VLCACHE};
  snap a;
  snap_take(c, s, L, 4, &a);
  /* Not observed. */
  for (int i = 0; i < 4; i++) {
    pvl_policy p = pol(scored[i]);
    TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &p, NULL, NULL));
  }
  snap_same(c, s, &a, true, "not observed");
  /* Observed with zero rows: still nothing observed. */
  TU_OK(c, pvl_observe(c, s, 0, NULL, 20, 0, 0.01f, 0.0f, NULL));
  TU_OK(c, pvl_observe(c, s, 1, NULL, 20, 0, 0.01f, 0.0f, NULL));
  pvl_policy v = pol(PVL_POLICY_VLCACHE);
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &v, NULL, NULL));
  /* Only layer 0 observed. */
  float *q = rand_q(&r, 8, 2, 4, 1.0f);
  TU_OK(c, pvl_observe(c, s, 0, q, 16, 8, 0.01f, 0.0f, NULL));
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &v, NULL, NULL));
  snap_same(c, s, &a, true, "one layer observed");
  snap_free(&a);
  /* Observed, then appended: the observation no longer matches. */
  observe_for(c, s, &v, &cc, &r);
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  hk_write(c, s, &h, &r, m, 1, m, 1.5f);
  snap_take(c, s, L, 4, &a);
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &v, NULL, NULL));
  snap_same(c, s, &a, true, "observed then appended");
  snap_free(&a);
  /* Observed again (over the 25 keys): fine. */
  observe_for(c, s, &v, &cc, &r);
  TU_OK(c, pvl_compress(c, s, &v, NULL, NULL));
  /* Already compressed: refused, by any policy. */
  snap_take(c, s, L, 4, &a);
  pvl_policy st = pol(PVL_POLICY_STREAMING);
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &st, NULL, NULL));
  pvl_policy fu = pol(PVL_POLICY_FULL);
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s, &fu, NULL, NULL));
  snap_same(c, s, &a, true, "already compressed");
  snap_free(&a);
  /* A layer retained by hand: its slots are no longer prompt positions. */
  pvl_seq_id s2;
  TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s2));
  const uint32_t keep[3] = {0, 5, 9};
  TU_OK(c, pvl_seq_retain(c, s2, 1, keep, 3, NULL));
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(c, s2, &st, NULL, NULL));
  /* Unknown sequence. */
  TU_IS(PVL_ERR_UNKNOWN_SEQUENCE, pvl_compress(c, s2 + 77777, &st, NULL, NULL));
  TU_OK(c, pvl_seq_free(c, s2));
  TU_IS(PVL_ERR_UNKNOWN_SEQUENCE, pvl_compress(c, s2, &st, NULL, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_compress(NULL, s, &st, NULL, NULL));
  CHECK_CACHE(c);
  free(q);
  hk_free(&h);
  pvl_cache_destroy(c);
}

/* ======================================================================== */
/* Decode cap                                                               */
/* ======================================================================== */

Test(decode_cap, recompresses_past_the_cap) {
  const pvl_policy_kind kinds[3] = {PVL_POLICY_VLCACHE, PVL_POLICY_H2O,
                                    PVL_POLICY_STREAMING};
  for (int i = 0; i < 3; i++) {
    const uint32_t L = 2, hq = 4, hkv = 2, d = 4, bs = 4, m = 20, nd = 8;
    pvl_cache *c = mk_cache(L, hq, hkv, d, bs, 300);
    rng r = rseed(31 + (uint64_t)i);
    pvl_seq_id s;
    TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s));
    hostkv h = hk_new(L, hq, hkv, d, m + nd);
    hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
    for (uint32_t t = 0; t < nd; t++) {
      TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
      hk_write(c, s, &h, &r, m + t, 1, m + t, 1.5f);
    }
    pvl_policy p = pol(kinds[i]);
    p.decode_cap = 24;
    p.decode_cap_slack = 4; /* down to 20 */
    const bool scored = kinds[i] != PVL_POLICY_STREAMING;
    uint32_t did = 7;
    if (scored) {
      /* No observation of the decode queries yet. */
      TU_IS(PVL_ERR_BAD_STATE, pvl_decode_cap(c, s, 0, &p, &did, NULL));
      cr_assert_eq(did, 7);
    }
    /* Observe the recent decode queries (positions 20..27). */
    float *q = rand_q(&r, nd, hq, d, 1.5f);
    float raw[28];
    uint32_t seen[28], nr = 0;
    if (scored) {
      TU_OK(c, pvl_observe(c, s, 0, q, m, nd, 0.01f, 0.0f, NULL));
      TU_OK(c, pvl_seq_observation(c, s, 0, NULL, NULL, raw, seen, 28, NULL,
                                &nr));
    }
    const uint32_t free_before = free_blocks(c);
    TU_OK(c, pvl_decode_cap(c, s, 0, &p, &did, NULL));
    cr_assert_eq(did, 1);
    uint32_t nt, nb, pos[28];
    layer_size(c, s, 0, &nt, &nb);
    cr_assert_eq(nt, 20, "%s: decode_cap - slack = 20 tokens, got %u",
                 pvl_policy_name(kinds[i]), nt);
    cr_assert_eq(nb, 5);
    cr_assert_eq(free_blocks(c), free_before + 2); /* 7 blocks -> 5 */
    get_positions(c, s, 0, pos, 28);
    double sc[28];
    if (scored) ref_scores(&p, 28, raw, seen, nr, sc);
    char ctx[64];
    snprintf(ctx, sizeof(ctx), "decode cap %s", pvl_policy_name(kinds[i]));
    /* Positions = slots here (the layer was uncompressed): the rule is
     * the selection of 20 of 28 candidates, recent ceil(0.1 * 20) = 2. */
    check_selection(&p, 28, 20, scored ? sc : NULL, pos, 20, ctx);
    if (scored) cr_assert(pos[18] == 26 && pos[19] == 27);
    check_data(c, s, &h, 0, pos, 20, ctx);
    /* Layer 1 was not touched; its cap works on its own observation. */
    layer_size(c, s, 1, &nt, &nb);
    cr_assert_eq(nt, 28);
    if (scored) {
      TU_IS(PVL_ERR_BAD_STATE, pvl_decode_cap(c, s, 1, &p, &did, NULL));
      TU_OK(c, pvl_observe(c, s, 1, q, m, nd, 0.01f, 0.0f, NULL));
    }
    TU_OK(c, pvl_decode_cap(c, s, 1, &p, &did, NULL));
    cr_assert_eq(did, 1);
    layer_size(c, s, 1, &nt, &nb);
    cr_assert_eq(nt, 20);
    /* Within the cap now: nothing to do (did = 0), even unobserved. */
    TU_OK(c, pvl_decode_cap(c, s, 0, &p, &did, NULL));
    cr_assert_eq(did, 0);
    /* Exactly at the cap: nothing either. */
    for (int t = 0; t < 4; t++) TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
    layer_size(c, s, 0, &nt, &nb);
    cr_assert_eq(nt, 24);
    TU_OK(c, pvl_decode_cap(c, s, 0, &p, &did, NULL));
    cr_assert_eq(did, 0);
    layer_size(c, s, 0, &nt, &nb);
    cr_assert_eq(nt, 24);
    CHECK_CACHE(c);
    free(q);
    hk_free(&h);
    pvl_cache_destroy(c);
  }
}

Test(decode_cap, after_compression_keeps_positions_ascending) {
  /* m 40, streaming keep 0.25 -> 10 tokens per layer: positions 0..3 and
   * 34..39. 15 decode tokens (40..54): 25 slots. Cap 16, slack 0 -> the
   * default 16/8 = 2 -> 14 tokens: sinks 0..3 and the last 10 slots,
   * positions 45..54. */
  const uint32_t L = 2, bs = 4, m = 40, nd = 15;
  pvl_cache *c = mk_cache(L, 1, 1, 4, bs, 200);
  rng r = rseed(8);
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, m, NULL, 0, &s));
  hostkv h = hk_new(L, 1, 1, 4, m + nd);
  hk_write(c, s, &h, &r, 0, m, 0, 1.5f);
  pvl_policy p = pol(PVL_POLICY_STREAMING);
  p.keep_ratio = 0.25f;
  TU_OK(c, pvl_compress(c, s, &p, NULL, NULL));
  for (uint32_t t = 0; t < nd; t++) {
    TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
    hk_write(c, s, &h, &r, m + t, 1, 10 + t, 1.5f);
  }
  p.decode_cap = 16;
  uint32_t did = 0, pos[32];
  TU_OK(c, pvl_decode_cap(c, s, 0, &p, &did, NULL));
  cr_assert_eq(did, 1);
  uint32_t n = get_positions(c, s, 0, pos, 32);
  cr_assert_eq(n, 14);
  const uint32_t want[14] = {0, 1, 2, 3, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54};
  for (uint32_t i = 0; i < 14; i++)
    cr_assert_eq(pos[i], want[i], "pos[%u] = %u, expected %u", i, pos[i],
                 want[i]);
  check_data(c, s, &h, 0, pos, n, "streaming cap");

  /* h2o on layer 1: observe the decode queries over the compressed layer
   * (keys at positions 0..3, 34..54), then cap: ascending positions, the
   * recent ceil(0.1 * 14) = 2 kept, the rest by raw / seen. */
  pvl_policy hp = pol(PVL_POLICY_H2O);
  hp.decode_cap = 16;
  float *q = rand_q(&r, nd, 1, 4, 1.5f);
  TU_OK(c, pvl_observe(c, s, 1, q, m, nd, 0.01f, 0.0f, NULL));
  float raw[25];
  uint32_t seen[25], nr;
  TU_OK(c, pvl_seq_observation(c, s, 1, NULL, NULL, raw, seen, 25, NULL, &nr));
  uint32_t before[25];
  cr_assert_eq(get_positions(c, s, 1, before, 25), 25);
  TU_OK(c, pvl_decode_cap(c, s, 1, &hp, &did, NULL));
  cr_assert_eq(did, 1);
  n = get_positions(c, s, 1, pos, 32);
  cr_assert_eq(n, 14);
  /* Map the kept positions back to slots of the 25-slot layer. */
  uint32_t slots[14];
  for (uint32_t i = 0; i < n; i++) {
    uint32_t j = 0;
    while (j < 25 && before[j] != pos[i]) j++;
    cr_assert(j < 25, "position %u was not in the layer", pos[i]);
    slots[i] = j;
  }
  double sc[25];
  ref_scores(&hp, 25, raw, seen, nr, sc);
  check_selection(&hp, 25, 14, sc, slots, 14, "h2o cap");
  check_data(c, s, &h, 1, pos, n, "h2o cap");
  /* Invalid: no cap, or the full policy. */
  hp.decode_cap = 0;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_decode_cap(c, s, 1, &hp, &did, NULL));
  pvl_policy fu = pol(PVL_POLICY_FULL);
  fu.decode_cap = 4;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_decode_cap(c, s, 1, &fu, &did, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_decode_cap(c, s, 1, &p, NULL, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_decode_cap(c, s, 2, &p, &did, NULL));
  CHECK_CACHE(c);
  free(q);
  hk_free(&h);
  pvl_cache_destroy(c);
}
