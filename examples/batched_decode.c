/* batched_decode: the main job of libpagedvl end to end, on synthetic
 * requests shaped like a vision-language model's: admit as many requests as
 * the pool holds, prefill their K/V layer by layer (and, with --policy,
 * compress each prompt as soon as it is written, VL-Cache style, so more
 * requests fit), then decode the batch step by step (append, incremental plan,
 * per-layer write + attention) and print what it cost. K, V and Q are random:
 * this exercises the cache, not a model.
 *
 * Defaults follow LLaVA-v1.6-Mistral-7B on a GPU (32 layers, 32 query heads,
 * 8 KV heads, head_dim 128, 5 image tiles x 576 = 2880 visual tokens plus a
 * 60-token text prompt) and a small geometry on the CPU backend, so the run
 * ends in seconds there. Run with --help for the flags. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pagedvl.h"

/* ------------------------------------------------------------------------ */
/* Options                                                                  */
/* ------------------------------------------------------------------------ */

/* -1 = not given on the command line: filled from the backend's defaults. */
typedef struct options {
  long long layers, q_heads, kv_heads, head_dim, block_size, blocks;
  long long visual, text, steps, requests, seed;
  int dtype;          /* pvl_dtype, or -1 */
  int backend;        /* pvl_backend; PVL_BACKEND_AUTO unless --backend */
  const char *policy; /* "none" (no compression) or a pvl_policy_name */
  double keep;        /* --keep, or -1 for the policy's default */
} options;

typedef struct defaults {
  long long layers, q_heads, kv_heads, head_dim, block_size, blocks;
  long long visual, text, steps;
} defaults;

/* LLaVA-v1.6-Mistral-7B. blocks = 0: the CUDA backend sizes the pool from the
 * device's free memory (pvl_config.memory_fraction). */
static const defaults k_gpu_defaults = {32, 32, 8, 128, 16, 0, 2880, 60, 128};
/* Small enough that 32 steps of the reference attention take seconds on two
 * cores, large enough to admit a dozen requests and cross block boundaries. */
static const defaults k_cpu_defaults = {4, 8, 2, 64, 16, 2048, 600, 32, 32};

static void usage(FILE *f, const char *argv0) {
  fprintf(f,
          "usage: %s [options]\n"
          "\n"
          "Admits synthetic VLM requests into a libpagedvl cache until the "
          "pool is\nfull (or --requests), prefills them, and decodes them "
          "as one batch.\n"
          "\n"
          "  --backend cpu|cuda|auto  backend (default auto: CUDA when built "
          "and a GPU\n"
          "                           is usable, else CPU)\n"
          "  --dtype f16|bf16|f32     K/V/Q element type (default f16; f32 "
          "is CPU only)\n"
          "  --layers N               transformer layers\n"
          "  --q-heads N              query heads\n"
          "  --kv-heads N             KV heads (divides --q-heads)\n"
          "  --head-dim N             head dimension\n"
          "  --block-size N           tokens per block\n"
          "  --blocks N               blocks in the pool (0 = from free GPU "
          "memory, CUDA)\n"
          "  --visual N               visual tokens per request\n"
          "  --text N                 text tokens per request\n"
          "  --steps N                decode steps\n"
          "  --requests N             admit at most N requests (default 0 = "
          "as many as fit)\n"
          "  --seed N                 random seed (default 1)\n"
          "  --policy NAME            compress every prompt after prefill: "
          "vlcache,\n"
          "                           snapkv, pyramidkv, h2o, streaming, "
          "full, or none\n"
          "                           (default none)\n"
          "  --keep R                 keep ratio of --policy, in (0, 1] "
          "(default 0.1)\n"
          "  --help                   this text\n"
          "\n"
          "Defaults by backend (layers, q/kv heads, head_dim, block, blocks, "
          "visual,\ntext, steps):\n"
          "  cuda: %lld, %lld/%lld, %lld, %lld, %lld (auto), %lld, %lld, "
          "%lld  (LLaVA-v1.6-Mistral-7B)\n"
          "  cpu:  %lld, %lld/%lld, %lld, %lld, %lld, %lld, %lld, %lld\n",
          argv0, k_gpu_defaults.layers, k_gpu_defaults.q_heads,
          k_gpu_defaults.kv_heads, k_gpu_defaults.head_dim,
          k_gpu_defaults.block_size, k_gpu_defaults.blocks,
          k_gpu_defaults.visual, k_gpu_defaults.text, k_gpu_defaults.steps,
          k_cpu_defaults.layers, k_cpu_defaults.q_heads,
          k_cpu_defaults.kv_heads, k_cpu_defaults.head_dim,
          k_cpu_defaults.block_size, k_cpu_defaults.blocks,
          k_cpu_defaults.visual, k_cpu_defaults.text, k_cpu_defaults.steps);
}

static int parse_uint(const char *flag, const char *s, long long max,
                      long long *out) {
  char *end = NULL;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (errno || end == s || *end != '\0' || v < 0 || v > max) {
    fprintf(stderr,
            "batched_decode: %s expects an integer in [0, %lld], "
            "got '%s'\n",
            flag, max, s);
    return -1;
  }
  *out = v;
  return 0;
}

/* Returns 0 to run, 1 after --help, -1 on a bad command line. */
static int parse_args(int argc, char **argv, options *o) {
  long long *const fields[] = {&o->layers,   &o->q_heads,    &o->kv_heads,
                               &o->head_dim, &o->block_size, &o->blocks,
                               &o->visual,   &o->text,       &o->steps,
                               &o->requests, &o->seed};
  static const char *const names[] = {
      "--layers",     "--q-heads",  "--kv-heads", "--head-dim",
      "--block-size", "--blocks",   "--visual",   "--text",
      "--steps",      "--requests", "--seed"};
  for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
    *fields[i] = -1;
  o->dtype = -1;
  o->backend = PVL_BACKEND_AUTO;
  o->policy = "none";
  o->keep = -1.0;

  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
      usage(stdout, argv[0]);
      return 1;
    }
    /* --flag value or --flag=value */
    char flag[32];
    const char *val = NULL;
    const char *eq = strchr(arg, '=');
    size_t flen = eq ? (size_t)(eq - arg) : strlen(arg);
    if (flen >= sizeof(flag)) flen = sizeof(flag) - 1;
    memcpy(flag, arg, flen);
    flag[flen] = '\0';
    size_t k = 0;
    while (k < sizeof(names) / sizeof(names[0]) && strcmp(flag, names[k])) k++;
    if (k == sizeof(names) / sizeof(names[0]) && strcmp(flag, "--backend") &&
        strcmp(flag, "--dtype") && strcmp(flag, "--policy") &&
        strcmp(flag, "--keep")) {
      fprintf(stderr, "batched_decode: unknown option '%s' (see --help)\n",
              arg);
      return -1;
    }
    if (eq) {
      val = eq + 1;
    } else if (i + 1 < argc) {
      val = argv[++i];
    } else {
      fprintf(stderr, "batched_decode: %s needs a value (see --help)\n", arg);
      return -1;
    }

    if (!strcmp(flag, "--backend")) {
      if (!strcmp(val, "cpu"))
        o->backend = PVL_BACKEND_CPU;
      else if (!strcmp(val, "cuda"))
        o->backend = PVL_BACKEND_CUDA;
      else if (!strcmp(val, "auto"))
        o->backend = PVL_BACKEND_AUTO;
      else {
        fprintf(stderr, "batched_decode: --backend cpu|cuda|auto, got '%s'\n",
                val);
        return -1;
      }
      continue;
    }
    if (!strcmp(flag, "--policy")) {
      o->policy = val; /* checked by pvl_policy_parse */
      continue;
    }
    if (!strcmp(flag, "--keep")) {
      char *end = NULL;
      errno = 0;
      o->keep = strtod(val, &end);
      if (errno || end == val || *end != '\0' || !(o->keep > 0.0) ||
          o->keep > 1.0) {
        fprintf(stderr,
                "batched_decode: --keep expects a ratio in (0, 1], "
                "got '%s'\n",
                val);
        return -1;
      }
      continue;
    }
    if (!strcmp(flag, "--dtype")) {
      if (!strcmp(val, "f16"))
        o->dtype = PVL_DTYPE_F16;
      else if (!strcmp(val, "bf16"))
        o->dtype = PVL_DTYPE_BF16;
      else if (!strcmp(val, "f32"))
        o->dtype = PVL_DTYPE_F32;
      else {
        fprintf(stderr, "batched_decode: --dtype f16|bf16|f32, got '%s'\n",
                val);
        return -1;
      }
      continue;
    }
    long long max =
        fields[k] == &o->seed ? (long long)INT64_MAX : (long long)UINT32_MAX;
    if (parse_uint(flag, val, max, fields[k]) != 0) return -1;
  }
  return 0;
}

static void apply_defaults(options *o, const defaults *d) {
  if (o->layers < 0) o->layers = d->layers;
  if (o->q_heads < 0) o->q_heads = d->q_heads;
  if (o->kv_heads < 0) o->kv_heads = d->kv_heads;
  if (o->head_dim < 0) o->head_dim = d->head_dim;
  if (o->block_size < 0) o->block_size = d->block_size;
  if (o->blocks < 0) o->blocks = d->blocks;
  if (o->visual < 0) o->visual = d->visual;
  if (o->text < 0) o->text = d->text;
  if (o->steps < 0) o->steps = d->steps;
  if (o->requests < 0) o->requests = 0;
  if (o->seed < 0) o->seed = 1;
  if (o->dtype < 0) o->dtype = PVL_DTYPE_F16;
}

/* ------------------------------------------------------------------------ */
/* Where K, V, Q and the outputs live                                       */
/* ------------------------------------------------------------------------ */

/* libpagedvl borrows data pointers where its backend computes: host memory
 * on the CPU backend, device memory on the CUDA backend. Every buffer of this
 * example goes through the functions below, so the device path is in one
 * place: malloc/memcpy on the CPU, cudaMalloc/cudaMemcpy when the example was
 * built against the CUDA runtime (PVL_EXAMPLE_CUDA, set by CMake when the
 * library has its CUDA backend). */
#if PVL_EXAMPLE_CUDA
#include <cuda_runtime_api.h>

static int cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return 1;
  fprintf(stderr, "batched_decode: %s: %s\n", what, cudaGetErrorString(e));
  return 0;
}
#endif

static int buffers_supported(pvl_backend be) {
#if PVL_EXAMPLE_CUDA
  return be == PVL_BACKEND_CPU || be == PVL_BACKEND_CUDA;
#else
  return be == PVL_BACKEND_CPU;
#endif
}

static const char k_no_cuda[] =
    "batched_decode: the cache got the CUDA backend, but this example was "
    "built\nwithout the CUDA runtime. Run with --backend cpu, or rebuild with "
    "CUDA found.\n";

static void *buf_alloc(pvl_backend be, size_t bytes) {
  if (be == PVL_BACKEND_CPU) return malloc(bytes ? bytes : 1);
#if PVL_EXAMPLE_CUDA
  void *p = NULL;
  return cuda_ok(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc") ? p : NULL;
#else
  fputs(k_no_cuda, stderr);
  return NULL;
#endif
}

static void buf_free(pvl_backend be, void *p) {
  if (be == PVL_BACKEND_CPU) free(p);
#if PVL_EXAMPLE_CUDA
  else if (p) cudaFree(p);
#endif
}

/* Host -> buffer and buffer -> host copies. 0 on success. */
static int buf_upload(pvl_backend be, void *dst, const void *src, size_t n) {
  if (be == PVL_BACKEND_CPU) {
    memcpy(dst, src, n);
    return 0;
  }
#if PVL_EXAMPLE_CUDA
  return cuda_ok(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice),
                 "cudaMemcpy to the device") ? 0 : -1;
#else
  return -1;
#endif
}

static int buf_download(pvl_backend be, void *dst, const void *src, size_t n) {
  if (be == PVL_BACKEND_CPU) {
    memcpy(dst, src, n);
    return 0;
  }
#if PVL_EXAMPLE_CUDA
  return cuda_ok(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost),
                 "cudaMemcpy from the device") ? 0 : -1;
#else
  return -1;
#endif
}

/* Waits for the work queued on the default stream (timing). */
static int buf_sync(pvl_backend be) {
  if (be == PVL_BACKEND_CPU) return 0;
#if PVL_EXAMPLE_CUDA
  return cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize") ? 0 : -1;
#else
  return -1;
#endif
}

/* ------------------------------------------------------------------------ */
/* Random data and element types                                            */
/* ------------------------------------------------------------------------ */

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static float rng_float(uint64_t *s) {
  return (float)(rng_next(s) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/* fp32 -> fp16 / bf16, round to nearest even (the values here are finite
 * and small, but the conversions are complete). */
static uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u)
    return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0));
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow */
  if (x < 0x38800000u) { /* subnormal half: round(|f| * 2^24) */
    float a;
    memcpy(&a, &x, sizeof(a));
    return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f));
  }
  uint32_t h = ((x - 0x38000000u) >> 13); /* rebias exponent 127 -> 15 */
  uint32_t rest = x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t x;
  if (exp == 0x1f) {
    x = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    float f = (float)man * (1.0f / 16777216.0f);
    return sign ? -f : f;
  } else {
    x = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &x, sizeof(f));
  return f;
}

static uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof(x));
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

static float bf16_to_f32(uint16_t h) {
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, sizeof(f));
  return f;
}

static void store_elem(pvl_dtype dt, void *dst, size_t i, float v) {
  if (dt == PVL_DTYPE_F32)
    ((float *)dst)[i] = v;
  else if (dt == PVL_DTYPE_F16)
    ((uint16_t *)dst)[i] = f32_to_f16(v);
  else
    ((uint16_t *)dst)[i] = f32_to_bf16(v);
}

static float load_elem(pvl_dtype dt, const void *src, size_t i) {
  if (dt == PVL_DTYPE_F32) return ((const float *)src)[i];
  if (dt == PVL_DTYPE_F16) return f16_to_f32(((const uint16_t *)src)[i]);
  return bf16_to_f32(((const uint16_t *)src)[i]);
}

/* Observation queries with the structure VL-Cache measures in real VLMs:
 * the rows of layer l lean toward a few salient image tokens' keys with a
 * strength that is zero for the first two layers and grows after, so early
 * layers attend densely and late ones sparsely. Random queries alone would
 * give every layer the same dense attention, and sparsity-aware budgets
 * would come out uniform. k is the request's K of this layer, token-major
 * [n_prompt][hkv][d] in dtype dt (host memory); q gets [n_rows][hq][d]. */
static void window_queries(pvl_dtype dt, const void *k, uint32_t hkv,
                           uint32_t hq, uint32_t d, pvl_span image,
                           uint32_t l, uint32_t L, uint32_t n_rows,
                           uint64_t *rng, void *q, float *u) {
  const float sharp =
      (l < 2 || L < 3) ? 0.0f : 1.5f * (float)(l - 1) / (float)(L - 2);
  const uint32_t len = image.end - image.begin, grp = hq / hkv;
  for (uint32_t g = 0; g < hkv; g++) {
    /* u = unit sum of 8 salient keys, spread over the image */
    float norm = 0.0f;
    for (uint32_t e = 0; e < d; e++) u[e] = 0.0f;
    for (uint32_t t = 0; len > 0 && t < 8; t++) {
      size_t tok = image.begin + (size_t)(2 * t + 1) * len / 16;
      for (uint32_t e = 0; e < d; e++)
        u[e] += load_elem(dt, k, (tok * hkv + g) * d + e);
    }
    for (uint32_t e = 0; e < d; e++) norm += u[e] * u[e];
    norm = norm > 0.0f ? sqrtf(norm) : 1.0f;
    for (uint32_t i = 0; i < n_rows; i++)
      for (uint32_t h = g * grp; h < (g + 1) * grp; h++)
        for (uint32_t e = 0; e < d; e++)
          store_elem(dt, q, ((size_t)i * hq + h) * d + e,
                     rng_float(rng) +
                         sharp * 2.0f * sqrtf((float)d) * u[e] / norm);
  }
}

static const char *dtype_name(pvl_dtype dt) {
  return dt == PVL_DTYPE_F32 ? "f32" : dt == PVL_DTYPE_F16 ? "f16" : "bf16";
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* The run                                                                  */
/* ------------------------------------------------------------------------ */

/* Prints why a libpagedvl call failed: the status and the cache's message
 * (or the creation message when there is no cache yet). */
static void report(const pvl_cache *cache, const char *what, pvl_status st) {
  fprintf(stderr, "batched_decode: %s failed: %s\n  %s\n", what,
          pvl_status_string(st),
          cache ? pvl_cache_last_error(cache) : pvl_create_last_error());
}

#define CHECK(call)                                                            \
  do {                                                                         \
    pvl_status st_ = (call);                                                   \
    if (st_ != PVL_SUCCESS) {                                                  \
      report(cache, #call, st_);                                               \
      goto cleanup;                                                            \
    }                                                                          \
  } while (0)

/* Which backend PVL_BACKEND_AUTO resolves to, from a throwaway one-block
 * cache (a geometry every backend supports), so the run can pick defaults
 * that fit it. */
static pvl_status probe_backend(pvl_backend want, pvl_backend *out) {
  pvl_config cfg;
  pvl_status st = pvl_config_init(&cfg);
  if (st != PVL_SUCCESS) return st;
  cfg.backend = want;
  cfg.num_layers = 1;
  cfg.num_q_heads = 1;
  cfg.num_kv_heads = 1;
  cfg.head_dim = 64;
  cfg.block_size = 16;
  cfg.num_blocks = 1;
  cfg.max_seqs = 1;
  pvl_cache *probe = NULL;
  st = pvl_cache_create(&cfg, &probe);
  if (st != PVL_SUCCESS) return st;
  st = pvl_cache_config(probe, &cfg);
  pvl_cache_destroy(probe);
  if (st == PVL_SUCCESS) *out = cfg.backend;
  return st;
}

int main(int argc, char **argv) {
  int rc = EXIT_FAILURE;
  options opt;
  int parsed = parse_args(argc, argv, &opt);
  if (parsed != 0) return parsed > 0 ? EXIT_SUCCESS : EXIT_FAILURE;

  pvl_status st = PVL_SUCCESS;
  pvl_cache *cache = NULL;
  pvl_plan *plan = NULL;
  pvl_seq_id *ids = NULL;
  uint32_t *layer_budget = NULL;
  void *qwin = NULL, *qwin_host = NULL;
  float *layer_density = NULL;
  uint32_t n_seqs = 0;
  pvl_backend be = PVL_BACKEND_CPU;
  void *prefill_buf = NULL, *step_buf = NULL, *out_buf = NULL; /* backend */
  void *host = NULL; /* host staging */
  pvl_policy policy;
  int compress = 0;

  if (pvl_version() / 10000 != PVL_VERSION / 10000) { /* SONAME major */
    fprintf(stderr, "batched_decode: built against libpagedvl %d, loaded %u\n",
            PVL_VERSION, pvl_version());
    return EXIT_FAILURE;
  }

  /* 1. The backend decides the defaults: a 7B VLM on a GPU, a toy on the
   *    CPU. */
  st = probe_backend((pvl_backend)opt.backend, &be);
  if (st != PVL_SUCCESS) {
    report(NULL, "creating a cache on the requested backend", st);
    goto cleanup;
  }
  apply_defaults(&opt,
                 be == PVL_BACKEND_CUDA ? &k_gpu_defaults : &k_cpu_defaults);
  const pvl_dtype dt = (pvl_dtype)opt.dtype;
  const uint64_t n_prompt64 = (uint64_t)(opt.visual + opt.text);
  if (n_prompt64 == 0 || n_prompt64 + (uint64_t)opt.steps > UINT32_MAX) {
    fprintf(stderr, "batched_decode: --visual + --text must be >= 1 and, "
                    "with --steps, fit in 32 bits\n");
    goto cleanup;
  }
  const uint32_t n_prompt = (uint32_t)n_prompt64;
  const uint32_t steps = (uint32_t)opt.steps;
  if (strcmp(opt.policy, "none") != 0) {
    pvl_policy_kind kind;
    CHECK(pvl_policy_parse(opt.policy, &kind));
    CHECK(pvl_policy_init(&policy, kind));
    if (opt.keep > 0.0) policy.keep_ratio = (float)opt.keep;
    compress = 1;
  }

  /* 2. The cache, on the backend the probe found. */
  pvl_config cfg;
  CHECK(pvl_config_init(&cfg));
  cfg.backend = be;
  cfg.dtype = dt;
  cfg.num_layers = (uint32_t)opt.layers;
  cfg.num_q_heads = (uint32_t)opt.q_heads;
  cfg.num_kv_heads = (uint32_t)opt.kv_heads;
  cfg.head_dim = (uint32_t)opt.head_dim;
  cfg.block_size = (uint32_t)opt.block_size;
  cfg.num_blocks = (uint32_t)opt.blocks;
  CHECK(pvl_cache_create(&cfg, &cache));
  CHECK(pvl_cache_config(cache, &cfg)); /* backend resolved, pool sized */
  be = cfg.backend;
  if (!buffers_supported(be)) {
    fputs(k_no_cuda, stderr);
    goto cleanup;
  }
  const uint32_t L = cfg.num_layers, hq = cfg.num_q_heads;
  const uint32_t hkv = cfg.num_kv_heads, d = cfg.head_dim;
  const size_t esz = pvl_dtype_size(dt);

  /* 3. Data. Random elements in backend memory; every K, V and Q of the
   *    run is a window into them at a varying offset. The prefill pool
   *    holds one request's prompt (queries are the widest rows); the decode
   *    pool, made after admission, one step of the batch. */
  const size_t row_kv = (size_t)hkv * d, row_q = (size_t)hq * d;
  const size_t wrap = 64 * row_q; /* offsets cycle through this */
  const size_t n_prefill = (size_t)n_prompt * row_q + wrap;
  prefill_buf = buf_alloc(be, n_prefill * esz);
  host = malloc(n_prefill * esz);
  if (!prefill_buf || !host) {
    fprintf(stderr, "batched_decode: cannot allocate %zu bytes of data\n",
            n_prefill * esz);
    goto cleanup;
  }
  uint64_t rng = (uint64_t)opt.seed;
  for (size_t i = 0; i < n_prefill; i++)
    store_elem(dt, host, i, rng_float(&rng));
  if (buf_upload(be, prefill_buf, host, n_prefill * esz) != 0) goto cleanup;
#define AT(buf, off) ((const char *)(buf) + ((off) % wrap) * esz)

  /* 4. Admission, prefill and (with --policy) compression, one request at
   *    a time as a server does. Like vLLM's scheduler, ask before adding,
   *    and keep room for every admitted request's decode growth so that
   *    the decode loop never runs out of blocks (a server would preempt
   *    instead). Compression returns most of a request's blocks to the
   *    pool at once, so more requests fit. */
  uint64_t prompt_blocks = 0, life_blocks = 0;
  CHECK(pvl_blocks_for_prompt(cache, n_prompt, &prompt_blocks));
  CHECK(pvl_blocks_for_prompt(cache, n_prompt + steps, &life_blocks));
  /* Decode growth: exact for full prompts; after compression a layer may
   * end anywhere inside a block, so one more block per layer. */
  const uint64_t growth = life_blocks - prompt_blocks + (compress ? L : 0);
  pvl_stats stats;
  CHECK(pvl_cache_get_stats(cache, &stats));
  uint64_t free_blocks = stats.free_blocks, reserved = 0;
  uint32_t max_req = cfg.max_seqs;
  if (opt.requests > 0 && (uint64_t)opt.requests < max_req)
    max_req = (uint32_t)opt.requests;
  ids = malloc((size_t)max_req * sizeof(*ids));
  if (!ids) {
    fprintf(stderr, "batched_decode: out of host memory\n");
    goto cleanup;
  }
  /* A LLaVA prompt: a short system prefix, the image, then the question. */
  const uint32_t prefix = opt.text < 5 ? (uint32_t)opt.text : 5;
  const pvl_span image = {prefix, prefix + (uint32_t)opt.visual};
  const uint32_t n_spans = opt.visual > 0 ? 1 : 0;
  const char *stopped_by = "--requests";
  double t_prefill = 0.0, t_compress = 0.0, kept_ratio_sum = 0.0;
  uint64_t blocks_freed = 0;
  uint32_t n_fallback = 0;
  /* The first request's per-layer budgets and densities, for the table. */
  layer_budget = calloc(L, sizeof(*layer_budget));
  layer_density = calloc(L, sizeof(*layer_density));
  if (!layer_budget || !layer_density) {
    fprintf(stderr, "batched_decode: out of host memory\n");
    goto cleanup;
  }
  /* What fits without compression, for the comparison: every request
   * holds its prompt plus its decode growth. */
  const uint64_t fit_plain = life_blocks ? stats.free_blocks / life_blocks : 0;
  while (n_seqs < max_req) {
    pvl_admit admit;
    CHECK(pvl_can_add(cache, n_prompt, &admit));
    if (admit == PVL_ADMIT_NEVER) {
      fprintf(stderr,
              "batched_decode: one request of %u tokens needs %" PRIu64
              " blocks; the pool has %u (raise --blocks)\n",
              n_prompt, prompt_blocks, cfg.num_blocks);
      goto cleanup;
    }
    if (admit == PVL_ADMIT_LATER) {
      stopped_by = n_seqs == cfg.max_seqs ? "max_seqs" : "pool full";
      break;
    }
    /* Compaction gathers the kept tokens into fresh blocks first: at most
     * the final block count, bounded here by the prompt's. */
    const uint64_t transient = compress ? prompt_blocks : 0;
    if (free_blocks < reserved + prompt_blocks + transient + growth) {
      stopped_by = "pool full, room kept for decode";
      break;
    }
    pvl_seq_id id;
    st = pvl_seq_add(cache, n_prompt, n_spans ? &image : NULL, n_spans, &id);
    if (st == PVL_ERR_OUT_OF_BLOCKS) { /* nothing was reserved */
      stopped_by = "pool full";
      break;
    }
    CHECK(st);
    ids[n_seqs++] = id;
    free_blocks -= prompt_blocks;
    reserved += growth;

    /* Prefill: every prompt token of every layer, as the model's prefill
     * produces them (K after RoPE). */
    double t0 = now_s();
    const size_t r = n_seqs - 1;
    for (uint32_t l = 0; l < L; l++) {
      size_t off = (r * L + l) * 7 * row_kv;
      CHECK(pvl_kv_write(cache, id, l, 0, n_prompt, AT(prefill_buf, off),
                         AT(prefill_buf, off + row_kv), NULL));
    }
    if (buf_sync(be) != 0) goto cleanup;
    t_prefill += now_s() - t0;
    if (!compress) continue;

    /* Compression: the policy names the prompt queries it needs (VL-Cache:
     * the post-vision window), each layer observes them against its cached
     * K, then one call budgets, selects and compacts every layer. */
    t0 = now_s();
    uint32_t first = 0, n_rows = 0, fallback = 0;
    CHECK(pvl_policy_rows(&policy, cache, id, &first, &n_rows, &fallback));
    if (n_rows > 0 && !qwin) {
      /* The widest window any policy asks for is the whole prompt (H2O). */
      qwin = buf_alloc(be, (size_t)n_prompt * row_q * esz);
      qwin_host = malloc((size_t)n_prompt * row_q * esz + d * sizeof(float));
      if (!qwin || !qwin_host) {
        fprintf(stderr, "batched_decode: out of memory for queries\n");
        goto cleanup;
      }
    }
    for (uint32_t l = 0; n_rows > 0 && l < L; l++) {
      const size_t off = (r * L + l) * 7 * row_kv; /* this layer's K */
      float *u = (float *)((char *)qwin_host + (size_t)n_rows * row_q * esz);
      window_queries(dt, (const char *)host + (off % wrap) * esz, hkv, hq, d,
                     image, l, L, n_rows, &rng, qwin_host, u);
      if (buf_upload(be, qwin, qwin_host, (size_t)n_rows * row_q * esz) != 0)
        goto cleanup;
      CHECK(pvl_observe(cache, id, l, qwin, first, n_rows, policy.threshold,
                        0.0f, NULL));
    }
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    if (r == 0) {
      rep.budget = layer_budget;
      rep.density = layer_density;
    }
    CHECK(pvl_compress(cache, id, &policy, &rep, NULL));
    if (buf_sync(be) != 0) goto cleanup;
    t_compress += now_s() - t0;
    free_blocks += (uint64_t)rep.blocks_before - rep.blocks_after;
    blocks_freed += rep.blocks_freed;
    kept_ratio_sum += rep.keep_ratio;
    n_fallback += rep.window_fallback;
  }
  if (n_seqs == 0) {
    fprintf(stderr,
            "batched_decode: the pool (%u blocks) cannot hold one request "
            "with its %u decode steps (%" PRIu64 " blocks); raise --blocks\n",
            cfg.num_blocks, steps,
            life_blocks + (compress ? prompt_blocks : 0));
    goto cleanup;
  }

  /* 5. The decode step's data: random K/V/Q rows for the whole batch. */
  const size_t n_step = (size_t)n_seqs * row_q + wrap;
  const size_t out_bytes = (size_t)n_seqs * row_q * esz;
  void *host2 =
      realloc(host, (n_step * esz > out_bytes ? n_step * esz : out_bytes));
  if (!host2) {
    fprintf(stderr, "batched_decode: out of host memory\n");
    goto cleanup;
  }
  host = host2;
  step_buf = buf_alloc(be, n_step * esz);
  out_buf = buf_alloc(be, out_bytes);
  if (!step_buf || !out_buf) {
    fprintf(stderr, "batched_decode: cannot allocate %zu bytes of data\n",
            n_step * esz + out_bytes);
    goto cleanup;
  }
  for (size_t i = 0; i < n_step; i++) store_elem(dt, host, i, rng_float(&rng));
  if (buf_upload(be, step_buf, host, n_step * esz) != 0) goto cleanup;

  /* 6. Decode: one batch, one plan. Per step: a slot for every sequence in
   *    every layer, the plan updated with what changed, then per layer the
   *    new token's K/V and the attention of its query. */
  CHECK(pvl_plan_create(cache, n_seqs, 0, &plan));
  uint64_t first_bytes = 0, sum_bytes = 0, max_bytes = 0;
  uint32_t peak_used = 0;
  const double t_decode0 = now_s();
  for (uint32_t s = 0; s < steps; s++) {
    CHECK(pvl_seq_append(cache, ids, n_seqs, NULL));
    CHECK(pvl_plan_build(plan, ids, n_seqs, NULL));
    pvl_plan_info info;
    CHECK(pvl_plan_get_info(plan, &info));
    if (s == 0) {
      first_bytes = info.last_update_bytes;
    } else {
      sum_bytes += info.last_update_bytes;
      if (info.last_update_bytes > max_bytes)
        max_bytes = info.last_update_bytes;
    }
    for (uint32_t l = 0; l < L; l++) {
      size_t off = ((size_t)s * L + l) * 3 * row_q;
      CHECK(pvl_plan_kv_write(plan, l, AT(step_buf, off),
                              AT(step_buf, off + row_kv), NULL));
      CHECK(pvl_attention_decode(plan, l, AT(step_buf, off + 2 * row_kv),
                                 out_buf, 0.0f, NULL));
    }
  }
  if (buf_sync(be) != 0) goto cleanup;
  const double t_decode = now_s() - t_decode0;
#undef AT

  CHECK(pvl_cache_get_stats(cache, &stats));
  peak_used = stats.used_blocks; /* nothing is freed during the run */

  /* The last layer's output of the last step: finite, and a checksum to
   * compare runs (same seed and flags give the same value on one backend). */
  double checksum = 0.0;
  if (steps > 0) {
    if (buf_download(be, host, out_buf, out_bytes) != 0) goto cleanup;
    for (size_t i = 0; i < (size_t)n_seqs * row_q; i++) {
      float v = load_elem(dt, host, i);
      if (!isfinite(v)) {
        fprintf(stderr, "batched_decode: output element %zu is %g\n", i,
                (double)v);
        goto cleanup;
      }
      checksum += fabs((double)v);
    }
  }

  /* 7. Report. */
  const uint64_t decode_tokens = (uint64_t)steps * n_seqs;
  printf("libpagedvl %u.%u.%u  batched_decode\n", PVL_VERSION_MAJOR,
         PVL_VERSION_MINOR, PVL_VERSION_PATCH);
  printf("  %-20s %s\n", "backend", be == PVL_BACKEND_CUDA ? "cuda" : "cpu");
  printf("  %-20s %s, %u layers, %u q / %u kv heads, head_dim %u, "
         "block %u\n",
         "model", dtype_name(dt), L, hq, hkv, d, cfg.block_size);
  printf("  %-20s %u tokens (%lld visual + %lld text)\n", "prompt/request",
         n_prompt, opt.visual, opt.text);
  printf("  %-20s %u (%s)\n", "requests admitted", n_seqs, stopped_by);
  printf("  %-20s %" PRIu64 "\n", "prompt tokens", (uint64_t)n_prompt * n_seqs);
  printf("  %-20s %" PRIu64 " (%u steps x %u)\n", "decode tokens",
         decode_tokens, steps, n_seqs);
  printf("  %-20s %u / %u (%.1f %%, %.1f MiB of %.1f MiB)\n",
         "blocks used/total", peak_used, stats.num_blocks,
         100.0 * peak_used / (stats.num_blocks ? stats.num_blocks : 1),
         (double)peak_used * (double)stats.block_bytes / 1048576.0,
         (double)stats.pool_bytes / 1048576.0);
  printf("  %-20s %.3f s (%.0f tokens/s)\n", "prefill writes", t_prefill,
         t_prefill > 0 ? (double)n_prompt * n_seqs / t_prefill : 0.0);
  if (compress) {
    printf("  %-20s %s, keep ratio %.3f asked, %.3f realised%s\n",
           "compression", pvl_policy_name(policy.kind),
           (double)policy.keep_ratio, kept_ratio_sum / n_seqs,
           n_fallback ? " (no post-vision window: fell back)" : "");
    printf("  %-20s %.3f s, %" PRIu64 " blocks freed\n", "observe+compress",
           t_compress, blocks_freed);
    const uint64_t plain = fit_plain < max_req ? fit_plain : max_req;
    printf("  %-20s %" PRIu64 " requests fit uncompressed; the freed blocks "
           "admitted %lld more (%.1fx)\n",
           "memory", plain, (long long)n_seqs - (long long)plain,
           plain ? (double)n_seqs / (double)plain : 0.0);
    /* Per-layer budgets of the first request: sparsity-aware policies give
     * dense layers more tokens. */
    printf("  per-layer budget of request 0 (of %u prompt tokens):\n",
           n_prompt);
    uint32_t max_b = 1;
    for (uint32_t l = 0; l < L; l++)
      if (layer_budget[l] > max_b) max_b = layer_budget[l];
    for (uint32_t l = 0; l < L; l++) {
      char bar[41];
      uint32_t w = (uint32_t)((uint64_t)layer_budget[l] * 40 / max_b);
      memset(bar, '#', w);
      bar[w] = '\0';
      printf("    layer %3u  density %.3f  keep %6u  %s\n", l,
             (double)layer_density[l], layer_budget[l], bar);
    }
  }
  printf("  %-20s %.3f s\n", "decode", t_decode);
  printf("  %-20s %.1f\n", "steps per second",
         t_decode > 0 ? steps / t_decode : 0.0);
  printf("  %-20s %.1f\n", "tokens per second",
         t_decode > 0 ? (double)decode_tokens / t_decode : 0.0);
  printf("  %-20s first %" PRIu64 ", then mean %.0f, max %" PRIu64 "\n",
         "plan bytes/step", first_bytes,
         steps > 1 ? (double)sum_bytes / (steps - 1) : 0.0, max_bytes);
  printf("  %-20s %.6e\n", "output checksum", checksum);
  rc = EXIT_SUCCESS;

cleanup:
  /* Sequences and plans also go with the cache; freeing them shows the
   * calls a server makes when a request finishes. */
  for (uint32_t r = 0; r < n_seqs && cache; r++) {
    st = pvl_seq_free(cache, ids[r]);
    if (st != PVL_SUCCESS) {
      report(cache, "pvl_seq_free", st);
      rc = EXIT_FAILURE;
    }
  }
  pvl_plan_destroy(plan);
  pvl_cache_destroy(cache);
  free(layer_budget);
  free(layer_density);
  free(qwin_host);
  buf_free(be, qwin);
  buf_free(be, prefill_buf);
  buf_free(be, step_buf);
  buf_free(be, out_buf);
  free(host);
  free(ids);
  return rc;
}
