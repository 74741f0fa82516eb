/* Decode attention on the GPU over compacted per-layer pages: time per call,
 * bytes of K/V read per second, and that as a fraction of a device-to-device
 * copy bandwidth measured in the same run, at keep ratio 1.0 and 0.1, over
 * contexts and batch sizes. One CSV line per case plus a table. Not run by
 * ctest; needs a CUDA build and a GPU. */
#define _POSIX_C_SOURCE 199309L
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pagedvl.h"

#define CK(call)                                                            \
  do {                                                                      \
    pvl_status s_ = (call);                                                 \
    if (s_ != PVL_SUCCESS) {                                                \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__,                \
              pvl_status_string(s_),                                        \
              cache ? pvl_cache_last_error(cache) : pvl_create_last_error()); \
      exit(1);                                                              \
    }                                                                       \
  } while (0)
#define CU(call)                                                            \
  do {                                                                      \
    cudaError_t e_ = (call);                                                \
    if (e_ != cudaSuccess) {                                                \
      fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__,                    \
              cudaGetErrorString(e_));                                      \
      exit(1);                                                              \
    }                                                                       \
  } while (0)

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static uint16_t rand_bf16(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  float f = (float)((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static int cmp_f(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

/* Device-to-device copy bandwidth, counting bytes read plus written. */
static double copy_bandwidth(void) {
  const size_t bytes = (size_t)1 << 30;
  void *a, *b;
  CU(cudaMalloc(&a, bytes));
  CU(cudaMalloc(&b, bytes));
  CU(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  for (int i = 0; i < 3; i++) CU(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  float ms[10];
  for (int i = 0; i < 10; i++) {
    CU(cudaEventRecord(e0, 0));
    CU(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
    CU(cudaEventRecord(e1, 0));
    CU(cudaEventSynchronize(e1));
    CU(cudaEventElapsedTime(&ms[i], e0, e1));
  }
  qsort(ms, 10, sizeof(float), cmp_f);
  cudaFree(a);
  cudaFree(b);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return 2.0 * bytes / (ms[5] * 1e-3);
}

typedef struct result {
  double us, kv_bytes, gbs;
} result;

/* One case: `batch` sequences of `ctx` prompt tokens in `layers` layers,
 * compacted to keep * ctx tokens (every 1/keep-th token, through
 * pvl_seq_retain, so the kernel reads compacted blocks), one decode slot
 * appended; times pvl_attention_decode rotating over the layers so
 * consecutive calls do not hit in L2. */
static result run_case(uint32_t batch, uint32_t ctx, double keep,
                       uint32_t layers, uint32_t hq, uint32_t hkv,
                       uint32_t d, uint32_t bs) {
  pvl_cache *cache = NULL;
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CUDA;
  cfg.dtype = PVL_DTYPE_BF16;
  cfg.num_layers = layers;
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = d;
  cfg.block_size = bs;
  cfg.num_blocks = (uint32_t)((uint64_t)batch * layers * (ctx / bs + 3) + 64);
  CK(pvl_cache_create(&cfg, &cache));
  const size_t row = (size_t)hkv * d;
  uint16_t *h = malloc((size_t)ctx * row * 2);
  for (size_t i = 0; i < (size_t)ctx * row; i++) h[i] = rand_bf16();
  void *dkv;
  CU(cudaMalloc(&dkv, (size_t)ctx * row * 2));
  CU(cudaMemcpy(dkv, h, (size_t)ctx * row * 2, cudaMemcpyHostToDevice));
  uint32_t n_keep = keep >= 1.0 ? ctx : (uint32_t)(ctx * keep);
  if (n_keep == 0) n_keep = 1;
  uint32_t *idx = malloc((size_t)n_keep * sizeof(uint32_t));
  for (uint32_t i = 0; i < n_keep; i++)
    idx[i] = (uint32_t)((uint64_t)i * ctx / n_keep);
  pvl_seq_id *seqs = malloc(batch * sizeof(pvl_seq_id));
  for (uint32_t b = 0; b < batch; b++) {
    CK(pvl_seq_add(cache, ctx, NULL, 0, &seqs[b]));
    for (uint32_t l = 0; l < layers; l++) {
      CK(pvl_kv_write(cache, seqs[b], l, 0, ctx, dkv, dkv, NULL));
      if (n_keep < ctx)
        CK(pvl_seq_retain(cache, seqs[b], l, idx, n_keep, NULL));
    }
  }
  CK(pvl_seq_append(cache, seqs, batch, NULL));
  pvl_plan *plan;
  CK(pvl_plan_create(cache, batch, 0, &plan));
  CK(pvl_plan_build(plan, seqs, batch, NULL));
  const size_t qn = (size_t)batch * hq * d;
  void *q, *out;
  CU(cudaMalloc(&q, qn * 2));
  CU(cudaMalloc(&out, qn * 2));
  uint16_t *hq16 = malloc(qn * 2);
  for (size_t i = 0; i < qn; i++) hq16[i] = rand_bf16();
  CU(cudaMemcpy(q, hq16, qn * 2, cudaMemcpyHostToDevice));
  free(hq16);
  for (uint32_t l = 0; l < layers; l++)
    CK(pvl_plan_kv_write(plan, l, dkv, dkv, NULL));
  CU(cudaDeviceSynchronize());

  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  for (int i = 0; i < 5; i++)
    CK(pvl_attention_decode(plan, (uint32_t)i % layers, q, out, 0, NULL));
  enum { REPS = 15, CALLS = 8 };
  float ms[REPS];
  for (int r = 0; r < REPS; r++) {
    CU(cudaEventRecord(e0, 0));
    for (int i = 0; i < CALLS; i++)
      CK(pvl_attention_decode(plan, (uint32_t)i % layers, q, out, 0, NULL));
    CU(cudaEventRecord(e1, 0));
    CU(cudaEventSynchronize(e1));
    CU(cudaEventElapsedTime(&ms[r], e0, e1));
  }
  qsort(ms, REPS, sizeof(float), cmp_f);
  result res;
  res.us = ms[REPS / 2] * 1e3 / CALLS;
  /* Bytes the call must move: every kept K and V row once, q and out. */
  res.kv_bytes = (double)batch * (n_keep + 1) * row * 2 * 2 + 2.0 * qn * 2;
  res.gbs = res.kv_bytes / (res.us * 1e-6) / 1e9;
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(q);
  cudaFree(out);
  cudaFree(dkv);
  pvl_plan_destroy(plan);
  pvl_cache_destroy(cache);
  free(h);
  free(idx);
  free(seqs);
  return res;
}

int main(int argc, char **argv) {
  int quick = argc > 1 && !strcmp(argv[1], "--quick");
  if (argc > 1 && !quick) {
    printf("usage: bench_attention [--quick]\n"
           "bf16, 8 KV heads, 32 query heads, head_dim 128, block 16;\n"
           "contexts 2K..128K x batch 1..128 at keep 1.0 and 0.1.\n");
    return 0;
  }
  int dev = 0;
  CU(cudaGetDevice(&dev));
  struct cudaDeviceProp prop;
  CU(cudaGetDeviceProperties(&prop, dev));
  const double copy_bw = copy_bandwidth();
  printf("# device: %s, copy bandwidth (read+write): %.0f GB/s\n", prop.name,
         copy_bw / 1e9);
  printf("batch,context,keep,us_per_call,bytes,GB_per_s,fraction_of_copy\n");
  const uint32_t ctxs[] = {2048, 4096, 8192, 32768, 131072};
  const uint32_t batches[] = {1, 8, 64, 128};
  const double keeps[] = {1.0, 0.1};
  for (int ci = 0; ci < 5; ci++)
    for (int bi = 0; bi < 4; bi++)
      for (int ki = 0; ki < 2; ki++) {
        uint32_t ctx = ctxs[ci], batch = batches[bi];
        /* Keep the pool under ~24 GiB: batch * ctx * 4 layers * 4 KiB. */
        double gib = (double)batch * ctx * 4 * 8 * 128 * 2 * 2 / (1u << 30);
        if (gib > 24.0) continue;
        if (quick && !(ctx == 4096 && batch == 64) &&
            !(ctx == 32768 && batch == 1))
          continue;
        result r = run_case(batch, ctx, keeps[ki], 4, 32, 8, 128, 16);
        printf("%u,%u,%.1f,%.2f,%.0f,%.1f,%.3f\n", batch, ctx, keeps[ki],
               r.us, r.kv_bytes, r.gbs, r.gbs * 1e9 / copy_bw);
        fflush(stdout);
      }
  return 0;
}
