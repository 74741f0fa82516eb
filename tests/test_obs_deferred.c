/* Observations whose sums stay on the device (the CUDA backend since
 * pvl_observe stopped waiting for the device): the host bookkeeping in
 * compress.c that fetches them, drops and replaces them and refuses a
 * non-finite one. A "deferred" backend (the CPU backend, but observe adds
 * each call's result into a private "device" copy and leaves the host
 * arrays stale, as CUDA does) runs next to a plain CPU cache: every result
 * must match, and every read of an observation must have fetched it first,
 * else it reads stale host arrays and differs. */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

enum { L = 3, HQ = 4, HKV = 2, D = 8, BS = 4, NB = 96, M = 40 };
static const pvl_span k_visual = {4, 28};

/* ---- the deferred backend ---- */

typedef struct dev_sums {
  uint32_t n_keys;
  double *raw;
  uint32_t *seen;
  uint64_t *below, *total;
} dev_sums;

static struct {
  int fetch_calls;   /* obs_fetch calls */
  int fetched;       /* stale observations brought over */
  int released;      /* obs_release calls */
  int live;          /* device sums allocated and not released */
  bool fail_observe; /* the next observe fails after its allocation */
} g;

static pvl_backend_ops g_def;

static void sums_free(dev_sums *d) {
  free(d->raw);
  free(d->seen);
  free(d->below);
  free(d->total);
  free(d);
}

static dev_sums *sums_new(uint32_t n, uint32_t hq) {
  dev_sums *d = calloc(1, sizeof(*d));
  cr_assert_not_null(d);
  d->n_keys = n;
  d->raw = calloc(n, sizeof(double));
  d->seen = calloc(n, sizeof(uint32_t));
  d->below = calloc(hq, sizeof(uint64_t));
  d->total = calloc(hq, sizeof(uint64_t));
  cr_assert(d->raw && d->seen && d->below && d->total);
  g.live++;
  return d;
}

static pvl_status def_observe(pvl_cache *c, const pvl_table *t, const void *q,
                              uint32_t first_pos, uint32_t n_rows, float scale,
                              float log_p, pvl_obs *obs, void *stream) {
  const uint32_t hq = c->cfg.num_q_heads, n = t->n_tokens;
  cr_assert(obs->dev != NULL || obs->n_rows == 0,
            "an observed observation lost its device sums");
  /* This call's result alone: the CPU observe into zeroed arrays. */
  dev_sums *one = sums_new(n, hq);
  pvl_obs tmp = {.n_keys = n,
                 .raw = one->raw,
                 .seen = one->seen,
                 .below = one->below,
                 .total = one->total};
  pvl_status st = pvl__cpu_backend.observe(c, t, q, first_pos, n_rows, scale,
                                           log_p, &tmp, stream);
  g.live--; /* `one` is scratch, not an observation's sums */
  if (st == PVL_SUCCESS && g.fail_observe) {
    g.fail_observe = false;
    st = pvl__fail(c, PVL_ERR_CUDA, __func__, "injected device failure");
  }
  if (st != PVL_SUCCESS) {
    sums_free(one);
    return st;
  }
  dev_sums *d = obs->dev;
  if (!d) {
    d = sums_new(n, hq);
    obs->dev = d;
  }
  cr_assert_eq(d->n_keys, n, "device sums of another table size");
  for (uint32_t j = 0; j < n; j++) {
    d->raw[j] += one->raw[j];
    d->seen[j] += one->seen[j];
  }
  for (uint32_t h = 0; h < hq; h++) {
    d->below[h] += one->below[h];
    d->total[h] += one->total[h];
  }
  sums_free(one);
  obs->stale = true;
  return PVL_SUCCESS;
}

static pvl_status def_fetch(pvl_cache *c, pvl_obs *const *obs, uint32_t n,
                            void *stream) {
  (void)stream;
  g.fetch_calls++;
  const uint32_t hq = c->cfg.num_q_heads;
  for (uint32_t i = 0; i < n; i++) {
    pvl_obs *o = obs[i];
    if (!o || !o->stale) continue;
    const dev_sums *d = o->dev;
    cr_assert_not_null(d, "a stale observation without device sums");
    cr_assert_eq(d->n_keys, o->n_keys);
    memcpy(o->raw, d->raw, d->n_keys * sizeof(double));
    memcpy(o->seen, d->seen, d->n_keys * sizeof(uint32_t));
    memcpy(o->below, d->below, hq * sizeof(uint64_t));
    memcpy(o->total, d->total, hq * sizeof(uint64_t));
    o->stale = false;
    g.fetched++;
  }
  return PVL_SUCCESS;
}

static void def_release(pvl_cache *c, pvl_obs *o) {
  (void)c;
  g.released++;
  g.live--;
  sums_free(o->dev);
  o->dev = NULL;
}

/* A cache whose observations behave as on CUDA, and its plain twin, with
 * the same sequence and K/V. */
typedef struct twin {
  pvl_cache *def, *cpu;
  pvl_seq_id sd, sc;
} twin;

static void twin_init(twin *t) {
  memset(&g, 0, sizeof(g));
  g_def = pvl__cpu_backend;
  g_def.name = "deferred";
  g_def.observe = def_observe;
  g_def.obs_fetch = def_fetch;
  g_def.obs_release = def_release;
  pvl_config cfg = tu_config(L, HQ, HKV, D, BS, NB, PVL_DTYPE_F32);
  t->def = tu_cache_new(&cfg);
  t->def->be = &g_def;
  t->cpu = tu_cache_new(&cfg);
  TU_OK(t->def, pvl_seq_add(t->def, M, &k_visual, 1, &t->sd));
  TU_OK(t->cpu, pvl_seq_add(t->cpu, M, &k_visual, 1, &t->sc));
  const size_t n = (size_t)M * HKV * D;
  float *k = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
  tu_rng r;
  tu_rng_init(&r, 2024);
  for (uint32_t l = 0; l < L; l++) {
    tu_fill(&r, PVL_DTYPE_F32, -1.0f, 1.0f, NULL, k, n);
    tu_fill(&r, PVL_DTYPE_F32, -1.0f, 1.0f, NULL, v, n);
    TU_OK(t->def, pvl_kv_write(t->def, t->sd, l, 0, M, k, v, NULL));
    TU_OK(t->cpu, pvl_kv_write(t->cpu, t->sc, l, 0, M, k, v, NULL));
  }
  free(k);
  free(v);
}

static void twin_fini(twin *t) {
  pvl_cache_destroy(t->def);
  pvl_cache_destroy(t->cpu);
  cr_assert_eq(g.live, 0, "%d device sums never released", g.live);
}

static float *make_q(uint32_t rows, uint64_t seed) {
  const size_t n = (size_t)rows * HQ * D;
  float *q = malloc(n * sizeof(float));
  tu_rng r;
  tu_rng_init(&r, seed);
  tu_fill(&r, PVL_DTYPE_F32, -2.0f, 2.0f, NULL, q, n);
  return q;
}

/* Observes rows [first, first + rows) of `layer` in both caches. */
static void observe_both(twin *t, uint32_t layer, uint32_t first, uint32_t rows,
                         uint64_t seed) {
  float *q = make_q(rows, seed);
  TU_OK(t->def,
        pvl_observe(t->def, t->sd, layer, q, first, rows, 0.01f, 0.0f, NULL));
  TU_OK(t->cpu,
        pvl_observe(t->cpu, t->sc, layer, q, first, rows, 0.01f, 0.0f, NULL));
  free(q);
}

/* pvl_seq_observation of both caches must agree exactly. */
static void expect_same_observation(twin *t, uint32_t layer) {
  float gd[HQ], gc[HQ], gld, glc, rd[M + 8], rc[M + 8];
  uint32_t sd[M + 8], sc[M + 8], nkd, nkc, nrd, nrc;
  TU_OK(t->def, pvl_seq_observation(t->def, t->sd, layer, gd, &gld, rd, sd,
                                    M + 8, &nkd, &nrd));
  TU_OK(t->cpu, pvl_seq_observation(t->cpu, t->sc, layer, gc, &glc, rc, sc,
                                    M + 8, &nkc, &nrc));
  cr_assert_eq(nkd, nkc);
  cr_assert_eq(nrd, nrc);
  cr_assert_eq(memcmp(gd, gc, sizeof(gd)), 0, "layer %u: gamma differs", layer);
  cr_assert_eq(memcmp(rd, rc, nkd * sizeof(float)), 0,
               "layer %u: raw sums differ", layer);
  cr_assert_eq(memcmp(sd, sc, nkd * sizeof(uint32_t)), 0,
               "layer %u: seen counts differ", layer);
}

Test(obs_deferred, observing_never_fetches_reading_fetches_once) {
  twin t;
  twin_init(&t);
  /* A prefill: every layer, two calls each, queued with no fetch. */
  for (uint32_t l = 0; l < L; l++) {
    observe_both(&t, l, 28, 6, 100 + l);
    observe_both(&t, l, 34, 6, 200 + l);
  }
  cr_assert_eq(g.fetch_calls, 0, "pvl_observe fetched (waited)");
  expect_same_observation(&t, 1);
  cr_assert_eq(g.fetched, 1, "only the layer read comes over");
  /* Read again: already current, nothing to fetch. */
  const int calls = g.fetch_calls;
  expect_same_observation(&t, 1);
  cr_assert_eq(g.fetch_calls, calls);
  /* More rows after a read: stale again, and summed on the old sums. */
  observe_both(&t, 1, 28, 3, 300);
  expect_same_observation(&t, 1);
  cr_assert_eq(g.fetched, 2);
  twin_fini(&t);
}

Test(obs_deferred, compress_fetches_every_layer_in_one_call) {
  twin t;
  twin_init(&t);
  for (uint32_t l = 0; l < L; l++) observe_both(&t, l, 28, 12, 400 + l);
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.3f;
  uint32_t bd[L], bc[L], kd[L], kc[L];
  float dd[L], dc[L];
  pvl_compress_report rd = {.budget = bd, .kept = kd, .density = dd};
  pvl_compress_report rc = {.budget = bc, .kept = kc, .density = dc};
  TU_OK(t.def, pvl_compress(t.def, t.sd, &p, &rd, NULL));
  TU_OK(t.cpu, pvl_compress(t.cpu, t.sc, &p, &rc, NULL));
  cr_assert_eq(g.fetch_calls, 1, "one wait for all layers, not %d",
               g.fetch_calls);
  cr_assert_eq(g.fetched, L);
  cr_assert_eq(g.released, L, "compress drops every observation");
  cr_assert_eq(memcmp(bd, bc, sizeof(bd)), 0, "budgets differ");
  cr_assert_eq(memcmp(dd, dc, sizeof(dd)), 0, "densities differ");
  cr_assert_eq(rd.kept_total, rc.kept_total);
  /* The same tokens kept, in the same slots. */
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t n = tu_layer_tokens(t.cpu, t.sc, l);
    cr_assert_eq(tu_layer_tokens(t.def, t.sd, l), n);
    const size_t e = (size_t)n * HKV * D;
    float *a = malloc(2 * e * sizeof(float)),
          *b = malloc(2 * e * sizeof(float));
    TU_OK(t.def, pvl_kv_read(t.def, t.sd, l, 0, n, a, a + e, NULL));
    TU_OK(t.cpu, pvl_kv_read(t.cpu, t.sc, l, 0, n, b, b + e, NULL));
    cr_assert_eq(memcmp(a, b, 2 * e * sizeof(float)), 0,
                 "layer %u kept other tokens", l);
    free(a);
    free(b);
  }
  twin_fini(&t);
}

Test(obs_deferred, changed_layer_replaces_the_observation_and_frees_it) {
  twin t;
  twin_init(&t);
  observe_both(&t, 0, 28, 8, 500);
  cr_assert_eq(g.live, 1);
  /* A new token: the layer changed, so the observation is stale in the
   * other sense (another table) and the next observe starts afresh. */
  TU_OK(t.def, pvl_seq_append(t.def, &t.sd, 1, NULL));
  TU_OK(t.cpu, pvl_seq_append(t.cpu, &t.sc, 1, NULL));
  observe_both(&t, 0, 30, 8, 501);
  cr_assert_eq(g.live, 1, "the replaced observation's sums leaked");
  cr_assert_eq(g.released, 1);
  expect_same_observation(&t, 0);
  /* A failing observe leaves the current observation as it was: */
  float *q = make_q(4, 502);
  g.fail_observe = true;
  TU_IS(PVL_ERR_CUDA, pvl_observe(t.def, t.sd, 0, q, 28, 4, 0.01f, 0.0f, NULL));
  expect_same_observation(&t, 0);
  /* ... and one on a fresh observation frees what it allocated. */
  TU_OK(t.def, pvl_seq_append(t.def, &t.sd, 1, NULL));
  TU_OK(t.cpu, pvl_seq_append(t.cpu, &t.sc, 1, NULL));
  g.fail_observe = true;
  const int live = g.live;
  TU_IS(PVL_ERR_CUDA, pvl_observe(t.def, t.sd, 0, q, 28, 4, 0.01f, 0.0f, NULL));
  cr_assert_eq(g.live, live, "a failed fresh observation leaked its sums");
  TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(t.def, t.sd, 0, NULL, NULL, NULL,
                                               NULL, 0, NULL, NULL));
  free(q);
  /* Freeing the sequence releases the rest (twin_fini checks none live). */
  observe_both(&t, 2, 28, 4, 503);
  TU_OK(t.def, pvl_seq_free(t.def, t.sd));
  cr_assert_eq(g.live, 0);
  twin_fini(&t);
}

Test(obs_deferred, decode_cap_fetches_its_layer) {
  twin t;
  twin_init(&t);
  observe_both(&t, 2, 20, 20, 600);
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_H2O);
  p.decode_cap = 24;
  uint32_t dd = 0, dc = 0;
  TU_OK(t.def, pvl_decode_cap(t.def, t.sd, 2, &p, &dd, NULL));
  TU_OK(t.cpu, pvl_decode_cap(t.cpu, t.sc, 2, &p, &dc, NULL));
  cr_assert_eq(dd, 1);
  cr_assert_eq(dc, 1);
  cr_assert_eq(g.fetched, 1);
  const uint32_t n = tu_layer_tokens(t.cpu, t.sc, 2);
  cr_assert_eq(tu_layer_tokens(t.def, t.sd, 2), n);
  const size_t e = (size_t)n * HKV * D;
  float *a = malloc(2 * e * sizeof(float)), *b = malloc(2 * e * sizeof(float));
  TU_OK(t.def, pvl_kv_read(t.def, t.sd, 2, 0, n, a, a + e, NULL));
  TU_OK(t.cpu, pvl_kv_read(t.cpu, t.sc, 2, 0, n, b, b + e, NULL));
  cr_assert_eq(memcmp(a, b, 2 * e * sizeof(float)), 0,
               "the cap kept other tokens");
  free(a);
  free(b);
  twin_fini(&t);
}

/* The non-finite contract holds for sums that were on the device: the
 * host arrays are zeros until fetched, so only a check after the fetch
 * sees the NaN. */
Test(obs_deferred, non_finite_device_sum_is_refused) {
  twin t;
  twin_init(&t);
  /* +Inf in key 5 of layer 1: every window row sees it. */
  const size_t n = (size_t)HKV * D;
  float k[HKV * D], v[HKV * D];
  for (size_t i = 0; i < n; i++) k[i] = v[i] = 0.5f;
  k[3] = INFINITY;
  TU_OK(t.def, pvl_kv_write(t.def, t.sd, 1, 5, 1, k, v, NULL));
  for (uint32_t l = 0; l < L; l++) {
    float *q = make_q(12, 700 + l);
    TU_OK(t.def, pvl_observe(t.def, t.sd, l, q, 28, 12, 0.01f, 0.0f, NULL));
    free(q);
  }
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.3f;
  const uint32_t before = tu_layer_tokens(t.def, t.sd, 1);
  TU_IS(PVL_ERR_BAD_STATE, pvl_compress(t.def, t.sd, &p, NULL, NULL));
  cr_assert_not_null(strstr(pvl_cache_last_error(t.def), "layer 1"), "%s",
                     pvl_cache_last_error(t.def));
  cr_assert_eq(tu_layer_tokens(t.def, t.sd, 1), before);
  /* The fetched sums are what pvl_seq_observation returns: not finite. */
  float raw[M];
  TU_OK(t.def, pvl_seq_observation(t.def, t.sd, 1, NULL, NULL, raw, NULL, M,
                                   NULL, NULL));
  bool bad = false;
  for (uint32_t j = 0; j < M; j++) bad |= !isfinite(raw[j]);
  cr_assert(bad, "the non-finite sum was lost on the way to the host");
  twin_fini(&t);
}
