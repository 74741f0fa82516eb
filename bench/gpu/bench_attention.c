/* Decode attention on the GPU over compacted per-layer pages: time per call,
 * bytes of K/V read per second, and that as a fraction of a device-to-device
 * copy bandwidth measured in the same run, at keep ratio 1.0 and 0.1, over
 * contexts and batch sizes (or the cases named with --case). Each case
 * rotates over enough layers that one rotation reads at least three times
 * the device's L2 (a 1 x 2K case alone fits in the 60 MB L2 of an H200 and
 * would be timed from cache), and is timed twice: calls launched one by
 * one, and the same calls replayed from a CUDA graph, whose time is the
 * kernel's own when host launch overhead would dominate a small case. One
 * CSV line per case. Not run by ctest; needs a CUDA build and a GPU. */
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
  uint32_t layers;
  double us_graph, us_eager, kv_bytes, gbs;
} result;

/* Layers to rotate over so one rotation reads >= 3 x L2: every call then
 * finds its K/V evicted by the calls since its previous turn. */
static uint32_t layers_for(uint32_t batch, uint32_t n_keep, size_t row,
                           int l2_bytes) {
  const double per_layer = (double)batch * (n_keep + 1) * row * 2 * 2;
  double n = ceil(3.0 * (double)l2_bytes / per_layer);
  if (n < 4) n = 4;
  if (n > 512) n = 512;
  return (uint32_t)n;
}

static uint32_t keep_count(uint32_t ctx, double keep) {
  uint32_t n = keep >= 1.0 ? ctx : (uint32_t)(ctx * keep);
  return n ? n : 1;
}

/* Median of REPS timings of `calls` attention calls over the layers in
 * rotation, per call in microseconds: launched one by one (graph == NULL)
 * or as one replay of the captured graph. `cache` names errors (CK). */
static double time_calls(pvl_cache *cache, pvl_plan *plan, uint32_t layers,
                         int calls, const void *q, void *out, cudaStream_t s,
                         cudaGraphExec_t graph) {
  enum { REPS = 15 };
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  float ms[REPS];
  for (int r = -2; r < REPS; r++) { /* two warm-up rounds */
    CU(cudaEventRecord(e0, s));
    if (graph) {
      CU(cudaGraphLaunch(graph, s));
    } else {
      for (int i = 0; i < calls; i++)
        CK(pvl_attention_decode(plan, (uint32_t)i % layers, q, out, 0, s));
    }
    CU(cudaEventRecord(e1, s));
    CU(cudaEventSynchronize(e1));
    if (r >= 0) CU(cudaEventElapsedTime(&ms[r], e0, e1));
  }
  qsort(ms, REPS, sizeof(float), cmp_f);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ms[REPS / 2] * 1e3 / calls;
}

/* A bf16 CUDA cache of the benchmark's shape with num_blocks blocks. */
static pvl_cache *make_cache(uint32_t layers, uint32_t hq, uint32_t hkv,
                             uint32_t d, uint32_t bs, uint32_t num_blocks) {
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CUDA;
  cfg.dtype = PVL_DTYPE_BF16;
  cfg.num_layers = layers;
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = d;
  cfg.block_size = bs;
  cfg.num_blocks = num_blocks;
  pvl_cache *cache = NULL;
  CK(pvl_cache_create(&cfg, &cache));
  return cache;
}

/* n random bf16 elements on the device: the K (and V) every write reads. */
static void *random_device_bf16(size_t n) {
  uint16_t *h = malloc(n * 2);
  for (size_t i = 0; i < n; i++) h[i] = rand_bf16();
  void *dev;
  CU(cudaMalloc(&dev, n * 2));
  CU(cudaMemcpy(dev, h, n * 2, cudaMemcpyHostToDevice));
  free(h);
  return dev;
}

/* The decode step both kinds of case time: one slot appended to every
 * sequence, the plan built, random queries, the new token written in every
 * layer, and a stream of our own (graphs cannot be captured on the legacy
 * one). */
typedef struct step {
  pvl_plan *plan;
  void *q, *out;
  size_t qn;
  cudaStream_t s;
  int calls; /* attention calls per timing, rotating over the layers */
} step;

static step step_prepare(pvl_cache *cache, pvl_seq_id *seqs, uint32_t batch,
                         uint32_t layers, uint32_t hq, uint32_t d,
                         void *dkv) {
  step st;
  CK(pvl_seq_append(cache, seqs, batch, NULL));
  CK(pvl_plan_create(cache, batch, 0, &st.plan));
  CK(pvl_plan_build(st.plan, seqs, batch, NULL));
  st.qn = (size_t)batch * hq * d;
  CU(cudaMalloc(&st.q, st.qn * 2));
  CU(cudaMalloc(&st.out, st.qn * 2));
  uint16_t *hq16 = malloc(st.qn * 2);
  for (size_t i = 0; i < st.qn; i++) hq16[i] = rand_bf16();
  CU(cudaMemcpy(st.q, hq16, st.qn * 2, cudaMemcpyHostToDevice));
  free(hq16);
  for (uint32_t l = 0; l < layers; l++)
    CK(pvl_plan_kv_write(st.plan, l, dkv, dkv, NULL));
  CU(cudaDeviceSynchronize());
  CU(cudaStreamCreateWithFlags(&st.s, cudaStreamNonBlocking));
  st.calls = layers < 8 ? 2 * (int)layers : (int)layers;
  return st;
}

/* Per-call time (us) of the step's attention calls replayed from one
 * captured CUDA graph. */
static double step_graph_us(pvl_cache *cache, const step *st,
                            uint32_t layers) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CU(cudaStreamBeginCapture(st->s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < st->calls; i++)
    CK(pvl_attention_decode(st->plan, (uint32_t)i % layers, st->q, st->out, 0,
                            st->s));
  CU(cudaStreamEndCapture(st->s, &graph));
  CU(cudaGraphInstantiate(&exec, graph, 0));
  const double us = time_calls(cache, st->plan, layers, st->calls, st->q,
                               st->out, st->s, exec);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return us;
}

static void step_release(step *st) {
  cudaStreamDestroy(st->s);
  cudaFree(st->q);
  cudaFree(st->out);
  pvl_plan_destroy(st->plan);
}

/* One case: `batch` sequences of `ctx` prompt tokens in `layers` layers,
 * compacted to keep * ctx tokens (every 1/keep-th token, through
 * pvl_seq_retain, so the kernel reads compacted blocks), one decode slot
 * appended; times pvl_attention_decode rotating over the layers. */
static result run_case(uint32_t batch, uint32_t ctx, double keep,
                       uint32_t layers, uint32_t hq, uint32_t hkv,
                       uint32_t d, uint32_t bs) {
  const uint32_t n_keep = keep_count(ctx, keep);
  /* Each layer is compacted right after it is written: the kept blocks of
   * every layer, one whole layer in flight, the decode slots. */
  pvl_cache *cache = make_cache(
      layers, hq, hkv, d, bs,
      (uint32_t)((uint64_t)batch * layers * (n_keep / bs + 3) + ctx / bs + 3 +
                 64));
  const size_t row = (size_t)hkv * d;
  void *dkv = random_device_bf16((size_t)ctx * row);
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
  step st = step_prepare(cache, seqs, batch, layers, hq, d, dkv);
  result res;
  res.layers = layers;
  res.us_eager = time_calls(cache, st.plan, layers, st.calls, st.q, st.out,
                            st.s, NULL);
  res.us_graph = step_graph_us(cache, &st, layers);
  /* Bytes the call must move: every kept K and V row once, q and out. */
  res.kv_bytes =
      (double)batch * (n_keep + 1) * row * 2 * 2 + 2.0 * st.qn * 2;
  res.gbs = res.kv_bytes / (res.us_graph * 1e-6) / 1e9;
  step_release(&st);
  cudaFree(dkv);
  pvl_cache_destroy(cache);
  free(idx);
  free(seqs);
  return res;
}

/* Graph-replay time per call (us) of a batch whose row b holds len[b]
 * prompt tokens (plus one decode slot) in every layer, bf16, uncompacted:
 * the skewed-vs-balanced pair below. */
static double run_lengths(uint32_t batch, const uint32_t *len, uint32_t hq,
                          uint32_t hkv, uint32_t d, uint32_t bs, int l2) {
  const size_t row = (size_t)hkv * d;
  uint64_t tokens = 0;
  uint32_t longest = 0;
  for (uint32_t b = 0; b < batch; b++) {
    tokens += len[b] + 1;
    if (len[b] > longest) longest = len[b];
  }
  /* Rotate over enough layers that one rotation reads >= 3 x L2. */
  const double per_layer = (double)tokens * row * 2 * 2;
  uint32_t layers = (uint32_t)ceil(3.0 * l2 / per_layer);
  if (layers < 4) layers = 4;
  pvl_cache *cache =
      make_cache(layers, hq, hkv, d, bs,
                 (uint32_t)((tokens / bs + 2 * batch) * layers + 64));
  void *dkv = random_device_bf16((size_t)longest * row);
  pvl_seq_id *seqs = malloc(batch * sizeof(pvl_seq_id));
  for (uint32_t b = 0; b < batch; b++) {
    CK(pvl_seq_add(cache, len[b], NULL, 0, &seqs[b]));
    for (uint32_t l = 0; l < layers; l++)
      CK(pvl_kv_write(cache, seqs[b], l, 0, len[b], dkv, dkv, NULL));
  }
  step st = step_prepare(cache, seqs, batch, layers, hq, d, dkv);
  const double us = step_graph_us(cache, &st, layers);
  step_release(&st);
  cudaFree(dkv);
  pvl_cache_destroy(cache);
  free(seqs);
  return us;
}

/* Issue 9's skew target: 63 x 4K + 1 x 128K tokens against 64 rows of the
 * same total (6080 each), bf16, 8 KV heads, 32 query heads, head_dim 128;
 * the split plan follows the real lengths, so the skewed batch should take
 * at most 1.3 x the balanced one's time. */
static void skew_pair(int l2) {
  enum { B = 64 };
  uint32_t skew[B], flat[B];
  for (int b = 0; b < B; b++) {
    skew[b] = b + 1 == B ? 131072 : 4096;
    flat[b] = (63 * 4096 + 131072) / B;
  }
  const double us_skew = run_lengths(B, skew, 32, 8, 128, 16, l2);
  const double us_flat = run_lengths(B, flat, 32, 8, 128, 16, l2);
  printf("# skew: 63 x 4096 + 1 x 131072 tokens %.2f us/call, balanced "
         "64 x %u tokens %.2f us/call, ratio %.3f (target <= 1.3)\n",
         us_skew, flat[0], us_flat, us_skew / us_flat);
  fflush(stdout);
}

static int usage(int rc) {
  printf("usage: bench_attention [--quick] [--case BATCH,CTX]... [--keep K] "
         "[--skew]\n"
         "bf16, 8 KV heads, 32 query heads, head_dim 128, block 16;\n"
         "default: contexts 2K..128K x batch 1..128 at keep 1.0 and 0.1.\n"
         "--case times only the named cases (repeatable), --keep only that\n"
         "keep ratio in (0, 1]. Columns: us_per_call from a CUDA graph\n"
         "replay (the kernels' time), us_eager launched one by one, the\n"
         "layers rotated over (>= 3 x L2 read per rotation).\n"
         "--skew times only the skewed-vs-balanced pair (63 x 4K + 1 x 128K\n"
         "tokens against 64 x 6080), which a default run times last.\n");
  return rc;
}

int main(int argc, char **argv) {
  enum { MAX_CASES = 64 };
  uint32_t cb[MAX_CASES], cc[MAX_CASES];
  int n_cases = 0, quick = 0, skew_only = 0;
  double only_keep = 0.0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) {
      quick = 1;
    } else if (!strcmp(argv[i], "--skew")) {
      skew_only = 1;
    } else if (!strcmp(argv[i], "--case") && i + 1 < argc) {
      unsigned b = 0, c = 0;
      char tail = 0;
      if (n_cases == MAX_CASES ||
          sscanf(argv[++i], "%u,%u%c", &b, &c, &tail) != 2 || b == 0 ||
          c == 0) {
        fprintf(stderr, "bad --case %s (BATCH,CTX, both > 0)\n", argv[i]);
        return usage(2);
      }
      cb[n_cases] = b;
      cc[n_cases++] = c;
    } else if (!strcmp(argv[i], "--keep") && i + 1 < argc) {
      char *end = NULL;
      only_keep = strtod(argv[++i], &end);
      if (!end || *end || !(only_keep > 0.0 && only_keep <= 1.0)) {
        fprintf(stderr, "bad --keep %s (in (0, 1])\n", argv[i]);
        return usage(2);
      }
    } else {
      return usage(strcmp(argv[i], "--help") ? 2 : 0);
    }
  }
  int dev = 0;
  CU(cudaGetDevice(&dev));
  struct cudaDeviceProp prop;
  CU(cudaGetDeviceProperties(&prop, dev));
  int l2 = 0;
  CU(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const double copy_bw = copy_bandwidth();
  printf("# device: %s, L2 %.0f MB, copy bandwidth (read+write): %.0f GB/s\n",
         prop.name, l2 / 1e6, copy_bw / 1e9);
  if (skew_only) {
    skew_pair(l2);
    return 0;
  }
  printf("batch,context,keep,layers,us_per_call,us_eager,bytes,GB_per_s,"
         "fraction_of_copy\n");
  const uint32_t ctxs[] = {2048, 4096, 8192, 32768, 131072};
  const uint32_t batches[] = {1, 8, 64, 128};
  const int named = n_cases > 0;
  if (n_cases == 0)
    for (int ci = 0; ci < 5; ci++)
      for (int bi = 0; bi < 4; bi++) {
        if (quick && !(ctxs[ci] == 4096 && batches[bi] == 64) &&
            !(ctxs[ci] == 32768 && batches[bi] == 1))
          continue;
        cb[n_cases] = batches[bi];
        cc[n_cases++] = ctxs[ci];
      }
  const double keeps[] = {1.0, 0.1};
  const size_t row = 8 * 128;
  for (int i = 0; i < n_cases; i++)
    for (int ki = 0; ki < 2; ki++) {
      const double keep = only_keep > 0.0 ? only_keep : keeps[ki];
      if (only_keep > 0.0 && ki > 0) break;
      const uint32_t batch = cb[i], ctx = cc[i];
      const uint32_t layers = layers_for(batch, keep_count(ctx, keep), row, l2);
      /* Keep the pool under ~24 GiB (a named case is run regardless). */
      const double gib = (double)batch * layers *
                         (keep_count(ctx, keep) + 48.0) * row * 2 * 2 /
                         (1u << 30);
      if (gib > 24.0 && !named) continue;
      result r = run_case(batch, ctx, keep, layers, 32, 8, 128, 16);
      printf("%u,%u,%.2f,%u,%.2f,%.2f,%.0f,%.1f,%.3f\n", batch, ctx, keep,
             r.layers, r.us_graph, r.us_eager, r.kv_bytes, r.gbs,
             r.gbs * 1e9 / copy_bw);
      fflush(stdout);
    }
  if (!named) skew_pair(l2);
  return 0;
}
