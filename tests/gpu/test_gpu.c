/* GPU tests: every CUDA kernel against its CPU twin. Two caches, one per
 * backend, receive the same operations and the same data; their outputs are
 * compared with tolerance atol + |ref| * eps (attention, observe) or
 * exactly (data movement, selections away from ties). Skips visibly when no
 * CUDA device is usable. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, nanosleep */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* ---- helpers ---- */

/* Without a usable device every test skips, and says so on stderr with a
 * fixed marker that ctest's SKIP_REGULAR_EXPRESSION turns into "Skipped" in
 * its normal output. PVL_REQUIRE_GPU=1 (set by runs that were meant to use
 * the GPU) turns the skip into a failure, so such a run cannot pass having
 * tested nothing. */
static void require_gpu(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();
    const char *why = e != cudaSuccess ? cudaGetErrorName(e) : "0 devices";
    const char *req = getenv("PVL_REQUIRE_GPU");
    if (req && strcmp(req, "0") != 0)
      cr_assert_fail("PVL_REQUIRE_GPU is set but no CUDA device is usable "
                     "(%s)",
                     why);
    fprintf(stderr, "PVL_GPU_SKIPPED: no CUDA device (%s)\n", why);
    cr_skip_test("no CUDA device (%s): GPU test skipped", why);
  }
}

static uint64_t rng_state;
static uint64_t rng_next(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static float rng_unit(void) { /* [-1, 1) */
  return (float)((rng_next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
static uint32_t rng_below(uint32_t n) { return (uint32_t)(rng_next() % n); }

/* n random elements of dtype, scaled, in host memory. */
static void *rand_host(pvl_dtype dt, size_t n, float scale) {
  size_t es = pvl_dtype_size(dt);
  char *p = malloc(n * es + 1);
  cr_assert_not_null(p);
  for (size_t i = 0; i < n; i++) {
    float f = rng_unit() * scale;
    if (dt == PVL_DTYPE_F16) {
      uint16_t h = pvl__f32_to_f16(f);
      memcpy(p + i * 2, &h, 2);
    } else if (dt == PVL_DTYPE_BF16) {
      uint16_t h = pvl__f32_to_bf16(f);
      memcpy(p + i * 2, &h, 2);
    } else {
      memcpy(p + i * 4, &f, 4);
    }
  }
  return p;
}

static void *to_dev(const void *h, size_t bytes) {
  void *d = NULL;
  cr_assert_eq(cudaMalloc(&d, bytes ? bytes : 1), cudaSuccess);
  if (bytes) cr_assert_eq(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

static void from_dev(void *h, const void *d, size_t bytes) {
  cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess, "kernel failed: %s",
               cudaGetErrorString(cudaGetLastError()));
  cr_assert_eq(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

static float elem(pvl_dtype dt, const void *p, size_t i) {
  float f;
  pvl__load_f32(dt, (const char *)p + i * pvl_dtype_size(dt), &f, 1);
  return f;
}

/* A pair of caches with the same geometry on both backends. */
typedef struct twin {
  pvl_cache *cpu, *gpu;
  pvl_config cfg;
} twin;

static twin twin_make(pvl_dtype dt, uint32_t layers, uint32_t hq,
                      uint32_t hkv, uint32_t d, uint32_t bs, uint32_t blocks) {
  twin t;
  pvl_config_init(&t.cfg);
  t.cfg.dtype = dt;
  t.cfg.num_layers = layers;
  t.cfg.num_q_heads = hq;
  t.cfg.num_kv_heads = hkv;
  t.cfg.head_dim = d;
  t.cfg.block_size = bs;
  t.cfg.num_blocks = blocks;
  t.cfg.backend = PVL_BACKEND_CPU;
  cr_assert_eq(pvl_cache_create(&t.cfg, &t.cpu), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  t.cfg.backend = PVL_BACKEND_CUDA;
  cr_assert_eq(pvl_cache_create(&t.cfg, &t.gpu), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  return t;
}

static void twin_free(twin *t) {
  pvl_cache_destroy(t->cpu);
  pvl_cache_destroy(t->gpu);
}

#define OK2(t, call_cpu, call_gpu)                                          \
  do {                                                                      \
    pvl_status a_ = (call_cpu), b_ = (call_gpu);                            \
    cr_assert_eq(a_, PVL_SUCCESS, "cpu: %s", pvl_cache_last_error((t)->cpu)); \
    cr_assert_eq(b_, PVL_SUCCESS, "gpu: %s", pvl_cache_last_error((t)->gpu)); \
  } while (0)

/* Admits a sequence of n tokens in both caches and writes the same random
 * K/V into every layer. */
static void twin_admit(twin *t, uint32_t n, pvl_seq_id *sc, pvl_seq_id *sg) {
  OK2(t, pvl_seq_add(t->cpu, n, NULL, 0, sc), pvl_seq_add(t->gpu, n, NULL, 0, sg));
  const size_t cnt = (size_t)n * t->cfg.num_kv_heads * t->cfg.head_dim;
  const size_t bytes = cnt * pvl_dtype_size(t->cfg.dtype);
  for (uint32_t l = 0; l < t->cfg.num_layers; l++) {
    void *k = rand_host(t->cfg.dtype, cnt, 1.0f);
    void *v = rand_host(t->cfg.dtype, cnt, 1.0f);
    void *dk = to_dev(k, bytes), *dv = to_dev(v, bytes);
    OK2(t, pvl_kv_write(t->cpu, *sc, l, 0, n, k, v, NULL),
        pvl_kv_write(t->gpu, *sg, l, 0, n, dk, dv, NULL));
    cudaDeviceSynchronize();
    cudaFree(dk);
    cudaFree(dv);
    free(k);
    free(v);
  }
}

/* Compares out (GPU, device) with ref (CPU, host): |o - r| <= atol +
 * |r| * eps, and no NaN (the output was poisoned). */
static void expect_close(pvl_dtype dt, const void *ref, const void *dev_out,
                         size_t n, float atol, float eps, const char *what) {
  size_t bytes = n * pvl_dtype_size(dt);
  void *o = malloc(bytes);
  from_dev(o, dev_out, bytes);
  double worst = 0.0;
  for (size_t i = 0; i < n; i++) {
    float r = elem(dt, ref, i), g = elem(dt, o, i);
    cr_assert(!isnan(g), "%s: element %zu unwritten or NaN", what, i);
    double err = fabs((double)g - r), tol = atol + fabs(r) * eps;
    if (err / tol > worst) worst = err / tol;
    cr_assert(err <= tol, "%s: element %zu: gpu %g cpu %g (tol %g)", what, i,
              (double)g, (double)r, tol);
  }
  free(o);
}

static float tol_eps(pvl_dtype dt) { return dt == PVL_DTYPE_BF16 ? 1e-2f : 1e-3f; }

/* ---- attention over a grid ---- */

/* One case: batch of `batch` sequences of random lengths up to max_len
 * (plus one decode step), attention of every layer compared. Queries are
 * uniform in [-qscale, qscale): 2 gives near-uniform softmax, 16 a peaky
 * one where a wrong rescale of the running max shows. empty_row >= 0: that
 * row's layer is emptied (retain of nothing) after the kv_write, so the
 * kernel meets a zero-token row. long_len > 0: a skewed batch instead, every
 * row max_len tokens but the last, which has long_len. */
static void attention_case_skew(pvl_dtype dt, uint32_t d, uint32_t bs,
                                uint32_t hkv, uint32_t gqa, uint32_t batch,
                                uint32_t max_len, float qscale,
                                int64_t empty_row, uint32_t long_len) {
  const uint32_t hq = hkv * gqa, layers = 2;
  uint64_t need = 0;
  uint32_t *len = malloc(batch * sizeof(uint32_t));
  for (uint32_t b = 0; b < batch; b++) {
    len[b] = long_len ? (b + 1 == batch ? long_len : max_len)
                      : 1 + rng_below(max_len);
    need += (len[b] / bs + 2) * layers;
  }
  twin t = twin_make(dt, layers, hq, hkv, d, bs, (uint32_t)need + 16);
  pvl_seq_id *sc = malloc(batch * sizeof(pvl_seq_id));
  pvl_seq_id *sg = malloc(batch * sizeof(pvl_seq_id));
  for (uint32_t b = 0; b < batch; b++) twin_admit(&t, len[b], &sc[b], &sg[b]);
  /* One decode step, so the plan's n_appended path is exercised too. */
  OK2(&t, pvl_seq_append(t.cpu, sc, batch, NULL),
      pvl_seq_append(t.gpu, sg, batch, NULL));
  pvl_plan *pc, *pg;
  OK2(&t, pvl_plan_create(t.cpu, batch, 0, &pc),
      pvl_plan_create(t.gpu, batch, 0, &pg));
  OK2(&t, pvl_plan_build(pc, sc, batch, NULL), pvl_plan_build(pg, sg, batch, NULL));
  const size_t es = pvl_dtype_size(dt);
  const size_t nkv = (size_t)batch * hkv * d, nq = (size_t)batch * hq * d;
  for (uint32_t l = 0; l < layers; l++) {
    void *k = rand_host(dt, nkv, 1.0f), *v = rand_host(dt, nkv, 1.0f);
    void *q = rand_host(dt, nq, qscale);
    void *dk = to_dev(k, nkv * es), *dv = to_dev(v, nkv * es);
    void *dq = to_dev(q, nq * es), *dout = NULL;
    cr_assert_eq(cudaMalloc(&dout, nq * es), cudaSuccess);
    cr_assert_eq(cudaMemset(dout, 0xff, nq * es), cudaSuccess); /* NaN */
    void *out = malloc(nq * es);
    OK2(&t, pvl_plan_kv_write(pc, l, k, v, NULL),
        pvl_plan_kv_write(pg, l, dk, dv, NULL));
    if (empty_row >= 0) {
      OK2(&t, pvl_seq_retain(t.cpu, sc[empty_row], l, NULL, 0, NULL),
          pvl_seq_retain(t.gpu, sg[empty_row], l, NULL, 0, NULL));
      OK2(&t, pvl_plan_build(pc, sc, batch, NULL),
          pvl_plan_build(pg, sg, batch, NULL));
    }
    OK2(&t, pvl_attention_decode(pc, l, q, out, 0.0f, NULL),
        pvl_attention_decode(pg, l, dq, dout, 0.0f, NULL));
    char what[200];
    snprintf(what, sizeof(what),
             "attention dt=%d d=%u bs=%u hkv=%u gqa=%u batch=%u max_len=%u "
             "qscale=%g empty_row=%lld long_len=%u layer=%u",
             (int)dt, d, bs, hkv, gqa, batch, max_len, (double)qscale,
             (long long)empty_row, long_len, l);
    expect_close(dt, out, dout, nq, 1e-3f, tol_eps(dt), what);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
    cudaFree(dout);
    free(k);
    free(v);
    free(q);
    free(out);
  }
  pvl_plan_destroy(pc);
  pvl_plan_destroy(pg);
  twin_free(&t);
  free(len);
  free(sc);
  free(sg);
}

static void attention_case_ex(pvl_dtype dt, uint32_t d, uint32_t bs,
                              uint32_t hkv, uint32_t gqa, uint32_t batch,
                              uint32_t max_len, float qscale,
                              int64_t empty_row) {
  attention_case_skew(dt, d, bs, hkv, gqa, batch, max_len, qscale, empty_row,
                      0);
}

static void attention_case(pvl_dtype dt, uint32_t d, uint32_t bs,
                           uint32_t gqa, uint32_t batch, uint32_t max_len) {
  attention_case_ex(dt, d, bs, 2, gqa, batch, max_len, 2.0f, -1);
}

Test(gpu, attention_grid) {
  require_gpu();
  rng_state = 0x1234;
  const pvl_dtype dts[] = {PVL_DTYPE_F16, PVL_DTYPE_BF16};
  const uint32_t ds[] = {64, 128, 256}, bss[] = {16, 32}, gqas[] = {1, 2, 4, 8};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 3; b++)
      for (int c = 0; c < 2; c++)
        for (int e = 0; e < 4; e++)
          attention_case(dts[a], ds[b], bss[c], gqas[e], 1 + rng_below(8),
                         300);
}

Test(gpu, attention_long_context_split_k) {
  require_gpu();
  rng_state = 0x5678;
  attention_case(PVL_DTYPE_BF16, 128, 16, 4, 1, 32768);
  attention_case(PVL_DTYPE_F16, 128, 32, 4, 2, 16384);
  attention_case(PVL_DTYPE_F16, 64, 16, 8, 1, 8192);
}

Test(gpu, attention_large_batch) {
  require_gpu();
  rng_state = 0x9abc;
  attention_case(PVL_DTYPE_BF16, 128, 16, 4, 128, 256);
  attention_case(PVL_DTYPE_F16, 128, 16, 4, 64, 1024);
}

/* The path with one split per row (no combine pass: the main kernel
 * normalises and stores, and zeroes empty rows) runs once the batch alone
 * fills kSlotsPerSm CTAs per SM: batch * kv_heads >= 2 * SMs. Sized from
 * the device actually present, with a zero-token row. */
Test(gpu, attention_one_split_per_row_with_empty_row) {
  require_gpu();
  rng_state = 0x9abd;
  int dev = 0, sms = 0;
  cr_assert_eq(cudaGetDevice(&dev), cudaSuccess);
  cr_assert_eq(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
               cudaSuccess);
  const uint32_t hkv = 8, batch = (uint32_t)(2 * sms + hkv - 1) / hkv + 3;
  attention_case_ex(PVL_DTYPE_F16, 128, 16, hkv, 4, batch, 600, 2.0f, 5);
  attention_case_ex(PVL_DTYPE_BF16, 64, 32, hkv, 1, batch, 300, 16.0f, 0);
  /* And a split batch with an empty row, so both paths meet one. */
  attention_case_ex(PVL_DTYPE_BF16, 128, 16, 2, 4, 3, 5000, 2.0f, 1);
}

/* Skewed batches (issue 9): the split plan is made on the device from the
 * real lengths, so one long row among many short ones is cut into many
 * items while the short rows stay whole. 63 x 4K + 1 x 128K tokens at 8 KV
 * heads (the case bench_attention times against a balanced batch), a
 * skewed batch with an empty row, and one where the long row is short
 * enough to stay whole next to the others. */
Test(gpu, attention_skewed_batch) {
  require_gpu();
  rng_state = 0x9ac0;
  attention_case_skew(PVL_DTYPE_F16, 128, 16, 8, 4, 64, 4096, 2.0f, -1,
                      131072);
  attention_case_skew(PVL_DTYPE_BF16, 64, 32, 2, 8, 16, 300, 16.0f, 3, 20000);
  attention_case_skew(PVL_DTYPE_BF16, 128, 16, 8, 2, 40, 1000, 2.0f, 0, 2000);
}

/* Peaky softmax: queries scaled by 16 give logits with a std of about 5
 * instead of 0.67, so the running-max rescale between key chunks and
 * between splits matters. The header's tolerance (1e-3 relative on fp16,
 * 1e-2 on bf16, fp32 accumulation) still holds. */
Test(gpu, attention_peaky_queries) {
  require_gpu();
  rng_state = 0x9abe;
  const pvl_dtype dts[] = {PVL_DTYPE_F16, PVL_DTYPE_BF16};
  const uint32_t ds[] = {64, 128, 256};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 3; b++) {
      attention_case_ex(dts[a], ds[b], 16, 2, 4, 2, 9000, 16.0f, -1);
      attention_case_ex(dts[a], ds[b], 32, 2, 8, 5, 700, 16.0f, -1);
    }
}

/* ---- data movement: kv_read, copy-on-write, compaction ---- */

static void expect_layers_equal(twin *t, pvl_seq_id sc, pvl_seq_id sg) {
  const size_t es = pvl_dtype_size(t->cfg.dtype);
  for (uint32_t l = 0; l < t->cfg.num_layers; l++) {
    uint32_t nc, bc, ng, bg;
    OK2(t, pvl_seq_layer_size(t->cpu, sc, l, &nc, &bc),
        pvl_seq_layer_size(t->gpu, sg, l, &ng, &bg));
    cr_assert_eq(nc, ng, "layer %u: %u vs %u tokens", l, nc, ng);
    if (nc == 0) continue;
    size_t bytes = (size_t)nc * t->cfg.num_kv_heads * t->cfg.head_dim * es;
    void *kc = malloc(bytes), *vc = malloc(bytes);
    void *kg = malloc(bytes), *vg = malloc(bytes);
    void *dk, *dv;
    cr_assert_eq(cudaMalloc(&dk, bytes), cudaSuccess);
    cr_assert_eq(cudaMalloc(&dv, bytes), cudaSuccess);
    OK2(t, pvl_kv_read(t->cpu, sc, l, 0, nc, kc, vc, NULL),
        pvl_kv_read(t->gpu, sg, l, 0, ng, dk, dv, NULL));
    from_dev(kg, dk, bytes);
    from_dev(vg, dv, bytes);
    cr_assert(memcmp(kc, kg, bytes) == 0, "layer %u: K differs", l);
    cr_assert(memcmp(vc, vg, bytes) == 0, "layer %u: V differs", l);
    cudaFree(dk);
    cudaFree(dv);
    free(kc);
    free(vc);
    free(kg);
    free(vg);
  }
}

Test(gpu, fork_cow_and_retain_match_cpu) {
  require_gpu();
  rng_state = 0xdef0;
  twin t = twin_make(PVL_DTYPE_F16, 3, 8, 2, 128, 16, 512);
  pvl_seq_id sc, sg, fc, fg;
  twin_admit(&t, 37, &sc, &sg);
  OK2(&t, pvl_seq_fork(t.cpu, sc, &fc), pvl_seq_fork(t.gpu, sg, &fg));
  pvl_seq_id bc[2] = {sc, fc}, bgp[2] = {sg, fg};
  OK2(&t, pvl_seq_append(t.cpu, bc, 2, NULL), pvl_seq_append(t.gpu, bgp, 2, NULL));
  expect_layers_equal(&t, sc, sg);
  expect_layers_equal(&t, fc, fg);
  uint32_t keep[20];
  for (int rep = 0; rep < 3; rep++) {
    uint32_t n;
    OK2(&t, pvl_seq_layer_size(t.cpu, sc, (uint32_t)rep, &n, &(uint32_t){0}),
        PVL_SUCCESS);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && k < 20; i++)
      if (rng_below(3) == 0 || i == n - 1) keep[k++] = i;
    OK2(&t, pvl_seq_retain(t.cpu, sc, (uint32_t)rep, keep, k, NULL),
        pvl_seq_retain(t.gpu, sg, (uint32_t)rep, keep, k, NULL));
  }
  expect_layers_equal(&t, sc, sg);
  expect_layers_equal(&t, fc, fg);
  twin_free(&t);
}

/* ---- observe ---- */

/* One observe case compared with the CPU twin: m keys, the last `rows`
 * prompt positions as queries. retain_every > 0 first compacts the layer
 * to every retain_every-th slot (plus the last), so key positions are no
 * longer slot indices and the causal mask must read the position map. */
static void observe_case(pvl_dtype dt, uint32_t d, uint32_t bs, uint32_t gqa,
                         uint32_t m, uint32_t rows, uint32_t retain_every) {
  const uint32_t hkv = 2, hq = hkv * gqa;
  twin t = twin_make(dt, 1, hq, hkv, d, bs, 2 * (m / bs + 2) + 8);
  pvl_seq_id sc, sg;
  twin_admit(&t, m, &sc, &sg);
  uint32_t n_keys = m;
  if (retain_every > 0) {
    uint32_t *keep = malloc(m * sizeof(uint32_t));
    n_keys = 0;
    for (uint32_t i = 0; i < m; i++)
      if (i % retain_every == 0 || i == m - 1) keep[n_keys++] = i;
    OK2(&t, pvl_seq_retain(t.cpu, sc, 0, keep, n_keys, NULL),
        pvl_seq_retain(t.gpu, sg, 0, keep, n_keys, NULL));
    free(keep);
  }
  const uint32_t first = m - rows;
  const size_t nq = (size_t)rows * hq * d, es = pvl_dtype_size(dt);
  void *q = rand_host(dt, nq, 3.0f), *dq = to_dev(q, nq * es);
  OK2(&t, pvl_observe(t.cpu, sc, 0, q, first, rows, 0.01f, 0.0f, NULL),
      pvl_observe(t.gpu, sg, 0, dq, first, rows, 0.01f, 0.0f, NULL));
  float *rc = malloc(n_keys * sizeof(float)), *rg = malloc(n_keys * sizeof(float));
  uint32_t *seen_c = malloc(n_keys * 4), *seen_g = malloc(n_keys * 4);
  float gc, gg;
  uint32_t nk, nr;
  OK2(&t,
      pvl_seq_observation(t.cpu, sc, 0, NULL, &gc, rc, seen_c, n_keys, &nk, &nr),
      pvl_seq_observation(t.gpu, sg, 0, NULL, &gg, rg, seen_g, n_keys, &nk, &nr));
  cr_assert_eq(nk, n_keys);
  for (uint32_t j = 0; j < n_keys; j++) {
    cr_assert_eq(seen_c[j], seen_g[j], "seen[%u] (d %u bs %u m %u retain %u)",
                 j, d, bs, m, retain_every);
    cr_assert(fabsf(rc[j] - rg[j]) <= 1e-4f + 1e-3f * fabsf(rc[j]),
              "raw[%u]: cpu %g gpu %g (d %u bs %u gqa %u m %u rows %u "
              "retain %u)",
              j, rc[j], rg[j], d, bs, gqa, m, rows, retain_every);
  }
  /* Threshold counts may differ only for logits within rounding of the
   * threshold. */
  cr_assert(fabsf(gc - gg) <= 1e-3f, "gamma cpu %g gpu %g", gc, gg);
  cudaFree(dq);
  free(q);
  free(rc);
  free(rg);
  free(seen_c);
  free(seen_g);
  twin_free(&t);
}

Test(gpu, observe_matches_cpu) {
  require_gpu();
  rng_state = 0x1111;
  const pvl_dtype dts[] = {PVL_DTYPE_F16, PVL_DTYPE_BF16};
  for (int a = 0; a < 2; a++)
    for (uint32_t gqa = 1; gqa <= 8; gqa *= 2)
      observe_case(dts[a], 128, 16, gqa, 700, 60, 0);
}

/* head_dim 64 and 256, block size 32, pass 1 without key splits (a single
 * key tile; and many row tiles), and a compacted table whose key positions
 * are not slot indices. */
Test(gpu, observe_shapes_and_retained_tables) {
  require_gpu();
  rng_state = 0x1112;
  observe_case(PVL_DTYPE_F16, 64, 32, 4, 900, 80, 0);
  observe_case(PVL_DTYPE_BF16, 256, 16, 2, 500, 40, 0);
  observe_case(PVL_DTYPE_F16, 256, 32, 8, 333, 33, 0);
  observe_case(PVL_DTYPE_F16, 128, 16, 4, 40, 40, 0);     /* one key tile */
  observe_case(PVL_DTYPE_BF16, 128, 32, 2, 3000, 2048, 0); /* many rows */
  observe_case(PVL_DTYPE_F16, 128, 16, 4, 1200, 100, 3);
  observe_case(PVL_DTYPE_BF16, 64, 32, 2, 800, 64, 5);
}

/* ---- select (CUB) against the CPU selection ---- */

Test(gpu, select_top_matches_cpu) {
  require_gpu();
  rng_state = 0x2222;
  const uint32_t n_seg = 6;
  int32_t seg_off[7], n_top[6], keep_off[6];
  uint32_t total = 0, total_keep = 0;
  for (uint32_t s = 0; s < n_seg; s++) {
    uint32_t len = 1 + rng_below(5000);
    seg_off[s] = (int32_t)total;
    n_top[s] = (int32_t)rng_below(len + 1);
    keep_off[s] = (int32_t)total_keep;
    total += len;
    total_keep += (uint32_t)n_top[s];
  }
  seg_off[n_seg] = (int32_t)total;
  float *scores = malloc(total * sizeof(float));
  /* Coarse values, so ties are frequent and the tie rule is tested. */
  for (uint32_t i = 0; i < total; i++) scores[i] = (float)rng_below(50);
  float *d_scores = to_dev(scores, total * sizeof(float));
  int32_t *d_seg = to_dev(seg_off, sizeof(seg_off));
  int32_t *d_top = to_dev(n_top, sizeof(n_top));
  int32_t *d_koff = to_dev(keep_off, sizeof(keep_off));
  int32_t *d_keep = NULL;
  cr_assert_eq(cudaMalloc((void **)&d_keep, (total_keep + 1) * 4), cudaSuccess);
  size_t ws_bytes = pvlk_select_workspace_bytes(total, n_seg);
  void *ws = NULL;
  cr_assert_eq(cudaMalloc(&ws, ws_bytes ? ws_bytes : 1), cudaSuccess);
  cr_assert_eq(pvlk_select_top(d_scores, d_seg, d_top, d_koff, n_seg, total,
                               d_keep, ws, ws_bytes, NULL),
               PVL_SUCCESS);
  int32_t *keep = malloc((total_keep + 1) * 4);
  from_dev(keep, d_keep, total_keep * 4);
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  p.recent_ratio = 0.0f; /* the kernel selects the top part only */
  for (uint32_t s = 0; s < n_seg; s++) {
    uint32_t len = (uint32_t)(seg_off[s + 1] - seg_off[s]);
    uint32_t *ref = malloc((len + 1) * sizeof(uint32_t));
    cr_assert_eq(pvl__select(pvl__default_allocator(), &p, len,
                             (uint32_t)n_top[s], scores + seg_off[s], ref),
                 PVL_SUCCESS);
    for (int32_t i = 0; i < n_top[s]; i++)
      cr_assert_eq((uint32_t)keep[keep_off[s] + i], ref[i],
                   "segment %u, kept %d: gpu %d cpu %u", s, i,
                   keep[keep_off[s] + i], ref[i]);
    free(ref);
  }
  cudaFree(d_scores);
  cudaFree(d_seg);
  cudaFree(d_top);
  cudaFree(d_koff);
  cudaFree(d_keep);
  cudaFree(ws);
  free(scores);
  free(keep);
}

/* Kept positions of one layer on both backends (ascending, n each): they
 * may differ only where scores tie within rounding, so 99 % must agree. */
static void expect_same_kept(const uint32_t *pc, const uint32_t *pg,
                             uint32_t n, uint32_t layer) {
  uint32_t same = 0;
  for (uint32_t i = 0, j = 0; i < n && j < n;) {
    if (pc[i] == pg[j]) {
      same++;
      i++;
      j++;
    } else if (pc[i] < pg[j]) {
      i++;
    } else {
      j++;
    }
  }
  cr_assert(same * 100 >= n * 99, "layer %u: %u of %u kept positions agree",
            layer, same, n);
}

/* ---- compress end to end ---- */

Test(gpu, compress_keeps_the_same_tokens) {
  require_gpu();
  rng_state = 0x3333;
  twin t = twin_make(PVL_DTYPE_F16, 4, 8, 2, 128, 16, 1024);
  pvl_span vis = {8, 520};
  pvl_seq_id sc, sg;
  const uint32_t m = 600;
  OK2(&t, pvl_seq_add(t.cpu, m, &vis, 1, &sc), pvl_seq_add(t.gpu, m, &vis, 1, &sg));
  const size_t es = 2, cnt = (size_t)m * 2 * 128;
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  uint32_t first, rows, fb;
  cr_assert_eq(pvl_policy_rows(&p, t.cpu, sc, &first, &rows, &fb), PVL_SUCCESS);
  for (uint32_t l = 0; l < 4; l++) {
    void *k = rand_host(PVL_DTYPE_F16, cnt, 1.0f + l);
    void *v = rand_host(PVL_DTYPE_F16, cnt, 1.0f);
    void *q = rand_host(PVL_DTYPE_F16, (size_t)rows * 8 * 128, 2.0f);
    void *dk = to_dev(k, cnt * es), *dv = to_dev(v, cnt * es);
    void *dq = to_dev(q, (size_t)rows * 8 * 128 * es);
    OK2(&t, pvl_kv_write(t.cpu, sc, l, 0, m, k, v, NULL),
        pvl_kv_write(t.gpu, sg, l, 0, m, dk, dv, NULL));
    OK2(&t, pvl_observe(t.cpu, sc, l, q, first, rows, p.threshold, 0, NULL),
        pvl_observe(t.gpu, sg, l, dq, first, rows, p.threshold, 0, NULL));
    cudaDeviceSynchronize();
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
    free(k);
    free(v);
    free(q);
  }
  pvl_compress_report rc = {0}, rg = {0};
  OK2(&t, pvl_compress(t.cpu, sc, &p, &rc, NULL), pvl_compress(t.gpu, sg, &p, &rg, NULL));
  cr_assert_eq(rc.kept_total, rg.kept_total);
  cr_assert_eq(rc.blocks_freed, rg.blocks_freed);
  for (uint32_t l = 0; l < 4; l++) {
    uint32_t pc[600], pg[600], nc, ng;
    OK2(&t, pvl_seq_positions(t.cpu, sc, l, pc, 600, &nc),
        pvl_seq_positions(t.gpu, sg, l, pg, 600, &ng));
    cr_assert_eq(nc, ng);
    expect_same_kept(pc, pg, nc, l);
  }
  twin_free(&t);
}

/* ---- a decode step captured in a CUDA graph ---- */

/* The claim: a plan's buffers have a fixed place and its lengths live on the
 * device, so one captured step (kv_write + attention) replays correctly for
 * later steps after pvl_seq_append + pvl_plan_build, with no recapture.
 * Lengths grow across a block boundary during the replays. */
Test(gpu, decode_step_in_cuda_graph) {
  require_gpu();
  rng_state = 0x4444;
  twin t = twin_make(PVL_DTYPE_BF16, 2, 16, 4, 128, 16, 256);
  pvl_seq_id sc[3], sg[3];
  for (int i = 0; i < 3; i++) twin_admit(&t, 100 + 37 * (uint32_t)i, &sc[i], &sg[i]);
  OK2(&t, pvl_seq_append(t.cpu, sc, 3, NULL), pvl_seq_append(t.gpu, sg, 3, NULL));
  pvl_plan *pc, *pg;
  OK2(&t, pvl_plan_create(t.cpu, 4, 0, &pc), pvl_plan_create(t.gpu, 4, 0, &pg));
  OK2(&t, pvl_plan_build(pc, sc, 3, NULL), pvl_plan_build(pg, sg, 3, NULL));
  const size_t nq = 3 * 16 * 128, nkv = 3 * 4 * 128, es = 2;
  void *q = rand_host(PVL_DTYPE_BF16, nq, 2.0f), *k = rand_host(PVL_DTYPE_BF16, nkv, 1.0f);
  void *v = rand_host(PVL_DTYPE_BF16, nkv, 1.0f), *out = malloc(nq * es);
  void *dq = to_dev(q, nq * es), *dk = to_dev(k, nkv * es), *dv = to_dev(v, nkv * es);
  void *dout;
  cr_assert_eq(cudaMalloc(&dout, nq * es), cudaSuccess);
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreate(&s), cudaSuccess);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cr_assert_eq(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  cr_assert_eq(pvl_plan_kv_write(pg, 1, dk, dv, s), PVL_SUCCESS, "%s",
               pvl_cache_last_error(t.gpu));
  cr_assert_eq(pvl_attention_decode(pg, 1, dq, dout, 0.0f, s), PVL_SUCCESS,
               "%s", pvl_cache_last_error(t.gpu));
  cr_assert_eq(cudaStreamEndCapture(s, &graph), cudaSuccess);
  cr_assert_eq(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int step = 0; step < 20; step++) {
    if (step > 0) {
      /* Next step: new slots, the plan's changes sent on the graph's
       * stream, new inputs in the same device buffers, replay. */
      OK2(&t, pvl_seq_append(t.cpu, sc, 3, NULL),
          pvl_seq_append(t.gpu, sg, 3, s));
      OK2(&t, pvl_plan_build(pc, sc, 3, NULL), pvl_plan_build(pg, sg, 3, s));
      free(q);
      free(k);
      free(v);
      q = rand_host(PVL_DTYPE_BF16, nq, 2.0f);
      k = rand_host(PVL_DTYPE_BF16, nkv, 1.0f);
      v = rand_host(PVL_DTYPE_BF16, nkv, 1.0f);
      cr_assert_eq(cudaMemcpyAsync(dq, q, nq * es, cudaMemcpyHostToDevice, s), cudaSuccess);
      cr_assert_eq(cudaMemcpyAsync(dk, k, nkv * es, cudaMemcpyHostToDevice, s), cudaSuccess);
      cr_assert_eq(cudaMemcpyAsync(dv, v, nkv * es, cudaMemcpyHostToDevice, s), cudaSuccess);
    }
    cr_assert_eq(cudaMemsetAsync(dout, 0xff, nq * es, s), cudaSuccess); /* NaN */
    cr_assert_eq(cudaGraphLaunch(exec, s), cudaSuccess);
    cr_assert_eq(cudaStreamSynchronize(s), cudaSuccess);
    cr_assert_eq(pvl_plan_kv_write(pc, 1, k, v, NULL), PVL_SUCCESS);
    cr_assert_eq(pvl_attention_decode(pc, 1, q, out, 0.0f, NULL), PVL_SUCCESS);
    char what[64];
    snprintf(what, sizeof(what), "graph replay, step %d", step);
    expect_close(PVL_DTYPE_BF16, out, dout, nq, 1e-3f, 1e-2f, what);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  free(q);
  free(k);
  free(v);
  free(out);
  pvl_plan_destroy(pc);
  pvl_plan_destroy(pg);
  twin_free(&t);
}

Test(gpu, unsupported_shapes_are_refused) {
  require_gpu();
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CUDA;
  cfg.num_layers = 1;
  cfg.num_q_heads = 4;
  cfg.num_kv_heads = 4;
  cfg.head_dim = 96; /* not a kernel shape */
  cfg.block_size = 16;
  cfg.num_blocks = 8;
  pvl_cache *c = NULL;
  cr_assert_eq(pvl_cache_create(&cfg, &c), PVL_ERR_UNSUPPORTED);
  cr_assert_null(c);
}

/* ---- non-finite observation inputs ---- */

/* The GPU does not read q on the host, so non-finite inputs reach the
 * observe kernel: a NaN query element, +Inf in a cached K, or q . k
 * overflowing float (bf16 3e38 against positive keys: +Inf logits; -3e38:
 * every logit of the row -Inf). Each must leave non-finite per-key sums,
 * which pvl_compress and pvl_decode_cap refuse with BAD_STATE naming the
 * layer, changing nothing (pagedvl.h, conventions). A finite control
 * compresses. Layer 1 gets the bad input. */
typedef enum nf_kind {
  NF_NONE,
  NF_NAN_Q,
  NF_INF_K,
  NF_BIG_Q,
  NF_NEG_BIG_Q
} nf_kind;

static void put_elem(pvl_dtype dt, void *p, size_t i, float f) {
  if (dt == PVL_DTYPE_F16) {
    uint16_t h = pvl__f32_to_f16(f);
    memcpy((char *)p + i * 2, &h, 2);
  } else {
    uint16_t h = pvl__f32_to_bf16(f);
    memcpy((char *)p + i * 2, &h, 2);
  }
}

static void nonfinite_case(pvl_dtype dt, nf_kind kind, bool cap) {
  const uint32_t L = 2, hq = 4, hkv = 2, d = 64, m = 64;
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CUDA;
  cfg.dtype = dt;
  cfg.num_layers = L;
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = d;
  cfg.block_size = 16;
  cfg.num_blocks = 64;
  pvl_cache *c = NULL;
  cr_assert_eq(pvl_cache_create(&cfg, &c), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  const pvl_span vis = {4, 40}; /* VL-Cache observes rows [40, 64) */
  pvl_seq_id s;
  cr_assert_eq(pvl_seq_add(c, m, &vis, 1, &s), PVL_SUCCESS);
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.5f;
  if (cap) {
    p.decode_cap = 16;
    p.decode_cap_slack = 2;
  }
  uint32_t first, rows, fb;
  cr_assert_eq(pvl_policy_rows(&p, c, s, &first, &rows, &fb), PVL_SUCCESS);
  const size_t es = pvl_dtype_size(dt), cnt = (size_t)m * hkv * d;
  const size_t nq = (size_t)rows * hq * d;
  void *k = malloc(cnt * es), *v = malloc(cnt * es), *q = malloc(nq * es);
  for (uint32_t l = 0; l < L; l++) {
    /* Keys in [0.25, 0.75): every component positive. */
    for (size_t i = 0; i < cnt; i++) {
      put_elem(dt, k, i, 0.5f + 0.25f * rng_unit());
      put_elem(dt, v, i, rng_unit());
    }
    for (size_t i = 0; i < nq; i++) put_elem(dt, q, i, rng_unit());
    if (l == 1) {
      if (kind == NF_INF_K) /* slot 50, seen by rows 50..63 */
        put_elem(dt, k, (size_t)50 * hkv * d + 5, INFINITY);
      if (kind == NF_NAN_Q) put_elem(dt, q, ((size_t)1 * hq + 1) * d + 3, NAN);
      if (kind == NF_BIG_Q || kind == NF_NEG_BIG_Q)
        for (size_t e = 0; e < (size_t)hq * d; e++)
          put_elem(dt, q, (size_t)hq * d + e,
                   kind == NF_BIG_Q ? 3e38f : -3e38f);
    }
    void *dk = to_dev(k, cnt * es), *dv = to_dev(v, cnt * es);
    void *dq = to_dev(q, nq * es);
    cr_assert_eq(pvl_kv_write(c, s, l, 0, m, dk, dv, NULL), PVL_SUCCESS, "%s",
                 pvl_cache_last_error(c));
    cr_assert_eq(pvl_observe(c, s, l, dq, first, rows, p.threshold, 0, NULL),
                 PVL_SUCCESS, "%s", pvl_cache_last_error(c));
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
  }
  free(k);
  free(v);
  free(q);
  pvl_stats st0, st1;
  pvl_seq_info in0, in1;
  uint32_t pos0[64], pos1[64], n0 = 0, n1 = 0;
  cr_assert_eq(pvl_cache_get_stats(c, &st0), PVL_SUCCESS);
  cr_assert_eq(pvl_seq_get_info(c, s, &in0), PVL_SUCCESS);
  cr_assert_eq(pvl_seq_positions(c, s, 1, pos0, 64, &n0), PVL_SUCCESS);
  uint32_t did = 77;
  const pvl_status got = cap ? pvl_decode_cap(c, s, 1, &p, &did, NULL)
                             : pvl_compress(c, s, &p, NULL, NULL);
  const char *what = cap ? "pvl_decode_cap" : "pvl_compress";
  if (kind == NF_NONE) {
    cr_assert_eq(got, PVL_SUCCESS, "%s, finite control: %s", what,
                 pvl_cache_last_error(c));
  } else {
    cr_assert_eq(got, PVL_ERR_BAD_STATE, "%s, dtype %d, kind %d: %s (%s)", what,
                 (int)dt, (int)kind, pvl_status_string(got),
                 pvl_cache_last_error(c));
    cr_assert(strstr(pvl_cache_last_error(c), "layer 1"), "%s",
              pvl_cache_last_error(c));
    cr_assert_eq(did, 77);
    cr_assert_eq(pvl_cache_get_stats(c, &st1), PVL_SUCCESS);
    cr_assert_eq(pvl_seq_get_info(c, s, &in1), PVL_SUCCESS);
    cr_assert_eq(pvl_seq_positions(c, s, 1, pos1, 64, &n1), PVL_SUCCESS);
    cr_assert(memcmp(&st0, &st1, sizeof(st0)) == 0, "pool stats changed");
    cr_assert(memcmp(&in0, &in1, sizeof(in0)) == 0, "sequence changed");
    cr_assert(n0 == n1 && memcmp(pos0, pos1, n0 * 4) == 0, "positions changed");
  }
  pvl_cache_destroy(c);
}

Test(gpu, non_finite_observation_is_refused) {
  require_gpu();
  rng_state = 0x5555;
  for (int cap = 0; cap < 2; cap++) {
    const nf_kind f16_kinds[] = {NF_NONE, NF_NAN_Q, NF_INF_K};
    for (int i = 0; i < 3; i++)
      nonfinite_case(PVL_DTYPE_F16, f16_kinds[i], cap);
    for (int kind = NF_NONE; kind <= NF_NEG_BIG_Q; kind++)
      nonfinite_case(PVL_DTYPE_BF16, (nf_kind)kind, cap);
  }
}

/* ---- observe queued without waiting (issue 9, section 3) ---- */

/* A host function on the stream that holds it until the test thread opens
 * the gate (or 20 s pass). While it holds, nothing queued behind it runs,
 * so a pvl_observe that waited for its stream would block until the
 * timeout: the gate then reports it. */
typedef struct gate {
  _Atomic int open;
  _Atomic int timed_out;
} gate;

static void CUDART_CB gate_hold(void *arg) {
  gate *g = arg;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  while (!atomic_load(&g->open)) {
    clock_gettime(CLOCK_MONOTONIC, &t);
    if (t.tv_sec - t0.tv_sec > 20) {
      atomic_store(&g->timed_out, 1);
      return;
    }
    struct timespec nap = {0, 100000};
    nanosleep(&nap, NULL);
  }
}

/* A whole prefill (every layer) observed on a held stream returns without
 * the device having run any of it; pvl_compress then fetches every layer
 * and keeps what the CPU twin keeps. */
Test(gpu, observe_prefill_queued_then_compress_matches_cpu) {
  require_gpu();
  rng_state = 0x5555;
  enum { LAYERS = 6, HQ = 8, HKV = 2, D = 128, M = 600 };
  twin t = twin_make(PVL_DTYPE_F16, LAYERS, HQ, HKV, D, 16, 1024);
  pvl_span vis = {8, 520};
  pvl_seq_id sc, sg;
  OK2(&t, pvl_seq_add(t.cpu, M, &vis, 1, &sc),
      pvl_seq_add(t.gpu, M, &vis, 1, &sg));
  pvl_policy p;
  pvl_policy_init(&p, PVL_POLICY_VLCACHE);
  uint32_t first, rows, fb;
  cr_assert_eq(pvl_policy_rows(&p, t.cpu, sc, &first, &rows, &fb), PVL_SUCCESS);
  const size_t es = 2, cnt = (size_t)M * HKV * D, nq = (size_t)rows * HQ * D;
  void *dq[LAYERS];
  for (uint32_t l = 0; l < LAYERS; l++) {
    void *k = rand_host(PVL_DTYPE_F16, cnt, 1.0f + (float)l);
    void *v = rand_host(PVL_DTYPE_F16, cnt, 1.0f);
    void *q = rand_host(PVL_DTYPE_F16, nq, 2.0f);
    void *dk = to_dev(k, cnt * es), *dv = to_dev(v, cnt * es);
    dq[l] = to_dev(q, nq * es);
    OK2(&t, pvl_kv_write(t.cpu, sc, l, 0, M, k, v, NULL),
        pvl_kv_write(t.gpu, sg, l, 0, M, dk, dv, NULL));
    OK2(&t, pvl_observe(t.cpu, sc, l, q, first, rows, p.threshold, 0, NULL),
        PVL_SUCCESS);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(dk);
    cudaFree(dv);
    free(k);
    free(v);
    free(q);
  }
  cudaStream_t s;
  cr_assert_eq(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
               cudaSuccess);
  gate g;
  atomic_init(&g.open, 0);
  atomic_init(&g.timed_out, 0);
  cr_assert_eq(cudaLaunchHostFunc(s, gate_hold, &g), cudaSuccess);
  for (uint32_t l = 0; l < LAYERS; l++)
    cr_assert_eq(
        pvl_observe(t.gpu, sg, l, dq[l], first, rows, p.threshold, 0, s),
        PVL_SUCCESS, "layer %u: %s", l, pvl_cache_last_error(t.gpu));
  /* Nothing of it has run: the stream is still held. (NotReady is not an
   * error, but clear the slot so no launch check below can see it.) */
  cr_assert_eq(cudaStreamQuery(s), cudaErrorNotReady);
  (void)cudaGetLastError();
  cr_assert_not(atomic_load(&g.timed_out), "pvl_observe waited for the device");
  atomic_store(&g.open, 1);
  pvl_compress_report rc = {0}, rg = {0};
  OK2(&t, pvl_compress(t.cpu, sc, &p, &rc, NULL),
      pvl_compress(t.gpu, sg, &p, &rg, s));
  cr_assert_not(atomic_load(&g.timed_out));
  cr_assert_eq(rc.kept_total, rg.kept_total);
  for (uint32_t l = 0; l < LAYERS; l++) {
    uint32_t pc[M], pg[M], nc, ng;
    OK2(&t, pvl_seq_positions(t.cpu, sc, l, pc, M, &nc),
        pvl_seq_positions(t.gpu, sg, l, pg, M, &ng));
    cr_assert_eq(nc, ng, "layer %u", l);
    expect_same_kept(pc, pg, nc, l);
  }
  cudaStreamDestroy(s);
  for (uint32_t l = 0; l < LAYERS; l++) cudaFree(dq[l]);
  twin_free(&t);
}

/* Observations summed over several calls on the device equal the host's
 * sums of the same calls, and a read between calls leaves them right. */
Test(gpu, observe_accumulates_over_calls_on_device) {
  require_gpu();
  rng_state = 0x5556;
  twin t = twin_make(PVL_DTYPE_BF16, 1, 8, 2, 128, 16, 128);
  pvl_seq_id sc, sg;
  twin_admit(&t, 400, &sc, &sg);
  const size_t nq = (size_t)50 * 8 * 128;
  for (int call = 0; call < 4; call++) {
    void *q = rand_host(PVL_DTYPE_BF16, nq, 3.0f), *dq = to_dev(q, nq * 2);
    OK2(&t, pvl_observe(t.cpu, sc, 0, q, 350, 50, 0.01f, 0.0f, NULL),
        pvl_observe(t.gpu, sg, 0, dq, 350, 50, 0.01f, 0.0f, NULL));
    if (call == 1) { /* a read in between: fetched, then summed on */
      uint32_t nk, nr;
      OK2(&t,
          pvl_seq_observation(t.cpu, sc, 0, NULL, NULL, NULL, NULL, 0, &nk,
                              &nr),
          pvl_seq_observation(t.gpu, sg, 0, NULL, NULL, NULL, NULL, 0, &nk,
                              &nr));
    }
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cudaFree(dq);
    free(q);
  }
  float rc[400], rg[400];
  uint32_t nc, ng, rowc, rowg;
  OK2(&t,
      pvl_seq_observation(t.cpu, sc, 0, NULL, NULL, rc, NULL, 400, &nc, &rowc),
      pvl_seq_observation(t.gpu, sg, 0, NULL, NULL, rg, NULL, 400, &ng, &rowg));
  cr_assert_eq(nc, ng);
  cr_assert_eq(rowc, 200);
  cr_assert_eq(rowg, 200);
  for (uint32_t j = 0; j < nc; j++)
    cr_assert(fabsf(rc[j] - rg[j]) <= 4e-4f + 1e-3f * fabsf(rc[j]),
              "raw[%u]: cpu %g gpu %g", j, rc[j], rg[j]);
  twin_free(&t);
}

/* ---- errors name the CUDA error ---- */

/* A launch that fails must say which CUDA error it met, not only which
 * launcher. An attention over an unmapped q faults on the device; the
 * error is sticky, so the next launch fails with it and its message must
 * name it. Criterion runs each test in its own process, so the broken
 * context dies with this one. */
Test(gpu, launch_failure_names_the_cuda_error) {
  require_gpu();
  rng_state = 0x6666;
  twin t = twin_make(PVL_DTYPE_F16, 1, 8, 2, 128, 16, 64);
  pvl_seq_id sc, sg;
  twin_admit(&t, 200, &sc, &sg);
  pvl_plan *pg;
  cr_assert_eq(pvl_plan_create(t.gpu, 1, 0, &pg), PVL_SUCCESS);
  cr_assert_eq(pvl_plan_build(pg, &sg, 1, NULL), PVL_SUCCESS, "%s",
               pvl_cache_last_error(t.gpu));
  void *dout;
  cr_assert_eq(cudaMalloc(&dout, 8 * 128 * 2), cudaSuccess);
  void *bad_q = (void *)(uintptr_t)0x10000; /* aligned, never mapped */
  cr_assert_eq(pvl_attention_decode(pg, 0, bad_q, dout, 0.0f, NULL),
               PVL_SUCCESS, "%s", pvl_cache_last_error(t.gpu));
  const cudaError_t e = cudaDeviceSynchronize();
  cr_assert_neq(e, cudaSuccess, "a read of an unmapped address succeeded");
  const pvl_status st = pvl_attention_decode(pg, 0, dout, dout, 0.0f, NULL);
  cr_assert_eq(st, PVL_ERR_CUDA, "%s", pvl_status_string(st));
  const char *msg = pvl_cache_last_error(t.gpu);
  cr_assert_not_null(strstr(msg, cudaGetErrorName(e)),
                     "the message does not name %s: %s", cudaGetErrorName(e),
                     msg);
  /* No teardown: the context is gone; the process ends with the test. */
}
