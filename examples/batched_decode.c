/* batched_decode: the main job of libpagedvl end to end, on synthetic
 * requests shaped like a vision-language model's: admit as many requests as
 * the pool holds, prefill their K/V layer by layer, compress each prompt as
 * soon as it is written (VL-Cache by default, --policy to choose), then
 * decode the batch step by step (append, incremental plan, per-layer write +
 * attention). The same run without compression, on the same pool, comes
 * first, and the two are printed side by side. K, V and Q are random: this
 * exercises the cache, not a model.
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
  const char *policy; /* a pvl_policy_name compared with no compression,
                         or "none" (no compression only) */
  double keep;        /* --keep, or -1 for the policy's default */
  int json;           /* --json: totals as one JSON object */
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
          "pool is\nfull (or --requests), prefills them, compresses each "
          "prompt, and decodes\nthem as one batch; then prints this run "
          "next to the same run without\ncompression on the same pool.\n"
          "\n"
          "  --backend cpu|cuda|auto  backend (default auto: CUDA when built, "
          "a GPU is\n"
          "                           usable and its kernels take the shape "
          "and dtype,\n"
          "                           else CPU)\n"
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
          "  --policy NAME            compression compared with none: "
          "vlcache,\n"
          "                           snapkv, pyramidkv, h2o, streaming, "
          "full (default\n"
          "                           vlcache); none: only the run without "
          "compression\n"
          "  --keep R                 keep ratio of the policy, in (0, 1] "
          "(default 0.1)\n"
          "  --json                   print the totals as one JSON object\n"
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
  o->policy = NULL;
  o->keep = -1.0;
  o->json = 0;

  for (int i = 1; i < argc; i++) {
    const char *arg = argv[i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
      usage(stdout, argv[0]);
      return 1;
    }
    if (!strcmp(arg, "--json")) {
      o->json = 1;
      continue;
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
  if (!o->policy) {
    o->policy = "vlcache";
  } else if (!strcmp(o->policy, "none") && o->keep > 0.0) {
    /* Silently dropping it would hide a mistake. */
    fprintf(stderr, "batched_decode: --keep sets the keep ratio of a "
                    "compression policy; --policy none compresses nothing\n");
    return -1;
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
  else if (p)
    cudaFree(p);
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
                 "cudaMemcpy to the device")
             ? 0
             : -1;
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
                 "cudaMemcpy from the device")
             ? 0
             : -1;
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
                           uint32_t hq, uint32_t d, pvl_span image, uint32_t l,
                           uint32_t L, uint32_t n_rows, uint64_t *rng, void *q,
                           float *u) {
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

/* Turns the options into a cache config (num_blocks as given). */
static void config_from(const options *o, pvl_config *cfg) {
  pvl_config_init(cfg);
  cfg->backend = (pvl_backend)o->backend;
  cfg->dtype = (pvl_dtype)o->dtype;
  cfg->num_layers = (uint32_t)o->layers;
  cfg->num_q_heads = (uint32_t)o->q_heads;
  cfg->num_kv_heads = (uint32_t)o->kv_heads;
  cfg->head_dim = (uint32_t)o->head_dim;
  cfg->block_size = (uint32_t)o->block_size;
  cfg->num_blocks = (uint32_t)o->blocks;
}

/* Which backend a one-block cache of this shape and dtype gets (the pool
 * size does not change the choice, and one block costs nothing to make). */
static pvl_status probe(const options *o, pvl_backend want, pvl_backend *out) {
  pvl_config cfg;
  config_from(o, &cfg);
  cfg.backend = want;
  cfg.num_blocks = 1;
  cfg.max_seqs = 1;
  pvl_cache *c = NULL;
  pvl_status st = pvl_cache_create(&cfg, &c);
  if (st != PVL_SUCCESS) return st;
  st = pvl_cache_config(c, &cfg);
  pvl_cache_destroy(c);
  if (st == PVL_SUCCESS) *out = cfg.backend;
  return st;
}

/* Creates the run's cache. The backend sets the defaults of the flags not
 * given (a 7B VLM on a GPU, a toy on the CPU), and PVL_BACKEND_AUTO picks
 * the backend for the real shape and dtype: CUDA when it is built, a device
 * is usable and the kernels take them, else the CPU. `why` receives the
 * reason AUTO chose the CPU, in the library's words. */
static pvl_status make_cache(options *o, pvl_cache **out, char *why,
                             size_t why_len) {
  why[0] = '\0';
  options tried = *o;
  int cuda = 0;
  pvl_status st = pvl_backend_available(PVL_BACKEND_CUDA, 0, &cuda);
  if (st != PVL_SUCCESS) return st;
  pvl_backend got = PVL_BACKEND_CPU;
  if (o->backend == PVL_BACKEND_CUDA ||
      (o->backend == PVL_BACKEND_AUTO && cuda)) {
    apply_defaults(&tried, &k_gpu_defaults);
    if (o->backend == PVL_BACKEND_AUTO &&
        probe(&tried, PVL_BACKEND_AUTO, &got) == PVL_SUCCESS &&
        got == PVL_BACKEND_CPU) {
      /* The kernels refuse this shape or dtype: the CPU it is, with the
       * CPU's defaults for what was not given. */
      tried = *o;
      apply_defaults(&tried, &k_cpu_defaults);
    }
  } else {
    apply_defaults(&tried, &k_cpu_defaults);
  }
  if (o->backend == PVL_BACKEND_AUTO) {
    /* Ask CUDA itself why, when AUTO will not take it. */
    pvl_backend b = PVL_BACKEND_CPU;
    if (probe(&tried, PVL_BACKEND_AUTO, &b) == PVL_SUCCESS &&
        b == PVL_BACKEND_CPU) {
      if (probe(&tried, PVL_BACKEND_CUDA, &b) != PVL_SUCCESS)
        snprintf(why, why_len, "%s", pvl_create_last_error());
      else
        snprintf(why, why_len, "the CUDA backend was not chosen");
    }
  }
  *o = tried;
  pvl_config cfg;
  config_from(o, &cfg);
  return pvl_cache_create(&cfg, out);
}

/* What one run (one policy, or none) did. Block counts are sums over the
 * requests; "lifetime" blocks are what a request holds after its last
 * decode step. */
typedef struct pass {
  const char *policy;      /* "none" or the policy's name */
  float keep_ratio;        /* asked; 1 for none */
  uint32_t requests;       /* admitted */
  const char *stopped_by;  /* why admission stopped */
  uint32_t compressed;     /* requests pvl_compress compacted */
  uint32_t not_compressed; /* refused for lack of transient blocks */
  uint32_t fallback;       /* requests with no post-vision window */
  uint64_t prompt_tokens, decode_tokens;
  uint64_t kept_tokens;  /* prompt tokens kept over layers, compressed */
  double keep_ratio_sum; /* realised, over the compressed requests */
  uint64_t blocks_before, blocks_after, blocks_freed, blocks_taken;
  uint64_t reserved;  /* lifetime blocks of every admitted request */
  uint32_t peak_used; /* most blocks in use after any call */
  uint32_t final_used, final_free;
  uint64_t final_tokens; /* pvl_stats.tokens after the last step */
  double t_prefill, t_compress, t_decode;
  uint64_t plan_first, plan_sum, plan_max;
  double checksum;
} pass;

/* Everything the runs share: the cache, the shape, the data. */
typedef struct run {
  pvl_cache *cache;
  pvl_backend be;
  pvl_dtype dt;
  uint32_t L, hq, hkv, d, bs, num_blocks, n_prompt, steps, max_req;
  uint64_t prompt_blocks, life_blocks, seed;
  pvl_span image;
  uint32_t n_spans;
  size_t row_kv, row_q, wrap, esz;
  void *prefill_buf;  /* random K/V/Q rows, backend memory */
  void *prefill_host; /* the same on the host (observation queries) */
  void *qwin, *qwin_host;
  pvl_seq_id *ids;
  uint32_t *layer_budget; /* request 0 of the compressed run */
  float *layer_density;
} run;

static void sample_peak(const run *R, pass *P) {
  pvl_stats s;
  if (pvl_cache_get_stats(R->cache, &s) == PVL_SUCCESS &&
      s.used_blocks > P->peak_used)
    P->peak_used = s.used_blocks;
}

/* One run on the cache, which it leaves empty. policy = NULL: no
 * compression. Returns 0 or -1 (message printed). */
static int run_pass(run *R, const pvl_policy *policy, pass *P) {
  pvl_cache *const cache = R->cache;
  const pvl_backend be = R->be;
  const pvl_dtype dt = R->dt;
  const uint32_t L = R->L, n_prompt = R->n_prompt, steps = R->steps;
  const size_t row_kv = R->row_kv, row_q = R->row_q, wrap = R->wrap;
  const size_t esz = R->esz;
  pvl_plan *plan = NULL;
  void *step_buf = NULL, *out_buf = NULL, *host = NULL;
  uint32_t n_seqs = 0;
  int rc = -1;
  pvl_status st;
  uint64_t rng = R->seed * 0x9e3779b97f4a7c15ull + 7; /* same per run */
  memset(P, 0, sizeof(*P));
  P->policy = policy ? pvl_policy_name(policy->kind) : "none";
  P->keep_ratio = policy ? policy->keep_ratio : 1.0f;
  P->stopped_by = "--requests";
#define AT(buf, off) ((const char *)(buf) + ((off) % wrap) * esz)

  /* Admission, prefill and compression, one request at a time as a server
   * does. Each admitted request reserves its lifetime blocks: its prompt
   * plus its decode growth, the same in both runs, so the decode loop never
   * runs out (a server would preempt instead). Compression lowers the
   * reservation to what the kept tokens plus the decode steps need, which
   * is never more, so compression never admits fewer requests. Compaction
   * also needs up to one layer's prompt blocks of fresh ones at once, only
   * while it runs: they come from blocks no decode step has used yet, and
   * if even those are short, pvl_compress refuses, changes nothing, and the
   * request stays uncompressed within its reservation. */
  while (n_seqs < R->max_req) {
    pvl_admit admit;
    CHECK(pvl_can_add(cache, n_prompt, &admit));
    if (admit != PVL_ADMIT_OK) {
      P->stopped_by = "pool full";
      break;
    }
    if (P->reserved + R->life_blocks > R->num_blocks) {
      P->stopped_by = "pool full with the decode steps' blocks";
      break;
    }
    pvl_seq_id id;
    st = pvl_seq_add(cache, n_prompt, R->n_spans ? &R->image : NULL, R->n_spans,
                     &id);
    if (st == PVL_ERR_OUT_OF_BLOCKS) { /* nothing was reserved */
      P->stopped_by = "pool full";
      break;
    }
    CHECK(st);
    R->ids[n_seqs++] = id;
    P->reserved += R->life_blocks;
    sample_peak(R, P);

    /* Prefill: every prompt token of every layer, as the model's prefill
     * produces them (K after RoPE). */
    double t0 = now_s();
    const size_t r = n_seqs - 1;
    for (uint32_t l = 0; l < L; l++) {
      size_t off = (r * L + l) * 7 * row_kv;
      CHECK(pvl_kv_write(cache, id, l, 0, n_prompt, AT(R->prefill_buf, off),
                         AT(R->prefill_buf, off + row_kv), NULL));
    }
    if (buf_sync(be) != 0) goto cleanup;
    P->t_prefill += now_s() - t0;
    if (!policy) continue;

    /* Compression: the policy names the prompt queries it needs (VL-Cache:
     * the post-vision window), each layer observes them against its cached
     * K, then one call budgets, selects and compacts every layer. */
    t0 = now_s();
    uint32_t first = 0, n_rows = 0, fallback = 0;
    CHECK(pvl_policy_rows(policy, cache, id, &first, &n_rows, &fallback));
    for (uint32_t l = 0; n_rows > 0 && l < L; l++) {
      const size_t off = (r * L + l) * 7 * row_kv; /* this layer's K */
      float *u = (float *)((char *)R->qwin_host + (size_t)n_rows * row_q * esz);
      window_queries(dt, (const char *)R->prefill_host + (off % wrap) * esz,
                     R->hkv, R->hq, R->d, R->image, l, L, n_rows, &rng,
                     R->qwin_host, u);
      if (buf_upload(be, R->qwin, R->qwin_host, (size_t)n_rows * row_q * esz) !=
          0)
        goto cleanup;
      CHECK(pvl_observe(cache, id, l, R->qwin, first, n_rows, policy->threshold,
                        0.0f, NULL));
    }
    pvl_compress_report rep;
    memset(&rep, 0, sizeof(rep));
    if (P->compressed == 0) {
      rep.budget = R->layer_budget;
      rep.density = R->layer_density;
    }
    st = pvl_compress(cache, id, policy, &rep, NULL);
    if (st == PVL_ERR_OUT_OF_BLOCKS) { /* nothing changed, see above */
      P->not_compressed++;
      continue;
    }
    CHECK(st);
    if (buf_sync(be) != 0) goto cleanup;
    P->t_compress += now_s() - t0;
    P->compressed++;
    P->kept_tokens += rep.kept_total;
    P->keep_ratio_sum += rep.keep_ratio;
    P->fallback += rep.window_fallback;
    P->blocks_before += rep.blocks_before;
    P->blocks_after += rep.blocks_after;
    P->blocks_freed += rep.blocks_freed;
    P->blocks_taken += rep.blocks_taken;
    /* The new lifetime: each layer's kept tokens plus the decode steps. */
    uint64_t lifetime = 0;
    for (uint32_t l = 0; l < L; l++) {
      uint32_t nt, nb;
      CHECK(pvl_seq_layer_size(cache, id, l, &nt, &nb));
      lifetime += ((uint64_t)nt + steps + R->bs - 1) / R->bs;
    }
    P->reserved -= R->life_blocks - lifetime;
    sample_peak(R, P);
  }
  if (n_seqs == 0) {
    fprintf(stderr, "batched_decode: admitted no request (%s)\n",
            P->stopped_by);
    goto cleanup;
  }
  P->requests = n_seqs;
  P->prompt_tokens = (uint64_t)n_prompt * n_seqs;

  /* The decode step's data: random K/V/Q rows for the whole batch. */
  const size_t n_step = (size_t)n_seqs * row_q + wrap;
  const size_t out_bytes = (size_t)n_seqs * row_q * esz;
  host = malloc(n_step * esz > out_bytes ? n_step * esz : out_bytes);
  step_buf = buf_alloc(be, n_step * esz);
  out_buf = buf_alloc(be, out_bytes);
  if (!host || !step_buf || !out_buf) {
    fprintf(stderr, "batched_decode: cannot allocate %zu bytes of data\n",
            n_step * esz + out_bytes);
    goto cleanup;
  }
  for (size_t i = 0; i < n_step; i++) store_elem(dt, host, i, rng_float(&rng));
  if (buf_upload(be, step_buf, host, n_step * esz) != 0) goto cleanup;

  /* Decode: one batch, one plan. Per step: a slot for every sequence in
   * every layer, the plan updated with what changed, then per layer the
   * new token's K/V and the attention of its query. */
  CHECK(pvl_plan_create(cache, n_seqs, 0, &plan));
  const double t_decode0 = now_s();
  for (uint32_t s = 0; s < steps; s++) {
    CHECK(pvl_seq_append(cache, R->ids, n_seqs, NULL));
    CHECK(pvl_plan_build(plan, R->ids, n_seqs, NULL));
    pvl_plan_info info;
    CHECK(pvl_plan_get_info(plan, &info));
    if (s == 0) {
      P->plan_first = info.last_update_bytes;
    } else {
      P->plan_sum += info.last_update_bytes;
      if (info.last_update_bytes > P->plan_max)
        P->plan_max = info.last_update_bytes;
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
  P->t_decode = now_s() - t_decode0;
  P->decode_tokens = (uint64_t)steps * n_seqs;
#undef AT

  pvl_stats stats;
  CHECK(pvl_cache_get_stats(cache, &stats));
  P->final_used = stats.used_blocks;
  P->final_free = stats.free_blocks;
  P->final_tokens = stats.tokens;
  sample_peak(R, P);

  /* The last layer's output of the last step: finite, and a checksum to
   * compare runs (same seed and flags give the same value on one backend). */
  if (steps > 0) {
    if (buf_download(be, host, out_buf, out_bytes) != 0) goto cleanup;
    for (size_t i = 0; i < (size_t)n_seqs * row_q; i++) {
      float v = load_elem(dt, host, i);
      if (!isfinite(v)) {
        fprintf(stderr, "batched_decode: output element %zu is %g\n", i,
                (double)v);
        goto cleanup;
      }
      P->checksum += fabs((double)v);
    }
  }
  rc = 0;

cleanup:
  /* Freeing each sequence, as a server does when a request finishes,
   * leaves the pool empty for the next run. */
  for (uint32_t r = 0; r < n_seqs; r++) {
    st = pvl_seq_free(cache, R->ids[r]);
    if (st != PVL_SUCCESS) {
      report(cache, "pvl_seq_free", st);
      rc = -1;
    }
  }
  pvl_plan_destroy(plan);
  buf_free(be, step_buf);
  buf_free(be, out_buf);
  free(host);
  return rc;
}

/* "12" or "-" for a count that a run without compression does not have. */
static const char *cell_u(char *buf, size_t len, int have, uint64_t v) {
  if (have)
    snprintf(buf, len, "%" PRIu64, v);
  else
    snprintf(buf, len, "-");
  return buf;
}

/* s as a JSON string body: quotes, backslashes and control bytes escaped. */
static void json_str(const char *s) {
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      printf("\\%c", *s);
    else if ((unsigned char)*s < 0x20)
      printf("\\u%04x", (unsigned)*s);
    else
      putchar(*s);
  }
}

static void print_json(const run *R, const char *backend, const char *why,
                       const pass *runs, int n_runs) {
  printf("{\"version\": \"%u.%u.%u\", \"backend\": \"%s\", "
         "\"layers\": %u, \"block_size\": %u, "
         "\"pool_blocks\": %u, \"n_prompt\": %u, \"steps\": %u, "
         "\"prompt_blocks\": %" PRIu64 ", \"life_blocks\": %" PRIu64 ", ",
         PVL_VERSION_MAJOR, PVL_VERSION_MINOR, PVL_VERSION_PATCH, backend, R->L,
         R->bs, R->num_blocks, R->n_prompt, R->steps, R->prompt_blocks,
         R->life_blocks);
  /* Why AUTO chose the CPU, "" when it did not or was not asked. */
  printf("\"auto_reason\": \"");
  json_str(why);
  printf("\", \"runs\": [");
  for (int i = 0; i < n_runs; i++) {
    const pass *P = &runs[i];
    printf("%s\n  {\"policy\": \"%s\", \"keep_ratio\": %.6g, "
           "\"requests\": %u, \"stopped_by\": \"%s\", \"compressed\": %u, "
           "\"not_compressed\": %u, \"prompt_tokens\": %" PRIu64
           ", \"decode_tokens\": %" PRIu64 ", \"kept_tokens\": %" PRIu64
           ", \"blocks_before\": %" PRIu64 ", \"blocks_after\": %" PRIu64
           ", \"blocks_freed\": %" PRIu64 ", \"blocks_taken\": %" PRIu64
           ", \"net_saved\": %" PRIu64 ", \"reserved\": %" PRIu64
           ", \"peak_used\": %u, \"final_used\": %u, \"final_free\": %u, "
           "\"final_tokens\": %" PRIu64 ", \"prefill_s\": %.6g, "
           "\"compress_s\": %.6g, \"decode_s\": %.6g, "
           "\"tokens_per_s\": %.6g}",
           i ? "," : "", P->policy, (double)P->keep_ratio, P->requests,
           P->stopped_by, P->compressed, P->not_compressed, P->prompt_tokens,
           P->decode_tokens, P->kept_tokens, P->blocks_before, P->blocks_after,
           P->blocks_freed, P->blocks_taken, P->blocks_before - P->blocks_after,
           P->reserved, P->peak_used, P->final_used, P->final_free,
           P->final_tokens, P->t_prefill, P->t_compress, P->t_decode,
           P->t_decode > 0 ? (double)P->decode_tokens / P->t_decode : 0.0);
  }
  printf("\n]}\n");
}

static void print_table(const run *R, const options *o, const char *backend,
                        const char *why, const pass *runs, int n_runs) {
  pvl_stats s;
  pvl_cache_get_stats(R->cache, &s);
  printf("libpagedvl %u.%u.%u  batched_decode\n", PVL_VERSION_MAJOR,
         PVL_VERSION_MINOR, PVL_VERSION_PATCH);
  if (o->backend == PVL_BACKEND_AUTO)
    printf("  %-16s %s (auto%s%s)\n", "backend", backend, why[0] ? ": " : "",
           why);
  else
    printf("  %-16s %s (--backend %s)\n", "backend", backend, backend);
  printf("  %-16s %s, %u layers, %u q / %u kv heads, head_dim %u, "
         "block %u\n",
         "model", dtype_name(R->dt), R->L, R->hq, R->hkv, R->d, R->bs);
  printf("  %-16s %u blocks (%.1f MiB)\n", "pool", R->num_blocks,
         (double)s.pool_bytes / 1048576.0);
  printf("  %-16s %u tokens (%lld visual + %lld text) = %" PRIu64
         " blocks; %" PRIu64 " with its %u decode steps\n",
         "request", R->n_prompt, o->visual, o->text, R->prompt_blocks,
         R->life_blocks, R->steps);
  printf("\n  %-34s", "");
  for (int i = 0; i < n_runs; i++) {
    char head[32];
    if (strcmp(runs[i].policy, "none"))
      snprintf(head, sizeof(head), "%s %.2f", runs[i].policy,
               (double)runs[i].keep_ratio);
    else
      snprintf(head, sizeof(head), "none");
    printf(" %14s", head);
  }
  printf("\n");
  char b[64];
#define ROW(label, fmt_expr)                                                   \
  do {                                                                         \
    printf("  %-34s", label);                                                  \
    for (int i = 0; i < n_runs; i++) {                                         \
      const pass *P = &runs[i];                                                \
      const int comp = strcmp(P->policy, "none") != 0;                         \
      (void)comp;                                                              \
      printf(" %14s", (fmt_expr));                                             \
    }                                                                          \
    printf("\n");                                                              \
  } while (0)
  ROW("requests admitted", cell_u(b, sizeof(b), 1, P->requests));
  ROW("prompts compressed", cell_u(b, sizeof(b), comp, P->compressed));
  ROW("keep ratio realised",
      (comp && P->compressed
           ? (snprintf(b, sizeof(b), "%.3f", P->keep_ratio_sum / P->compressed),
              b)
           : "-"));
  ROW("net blocks saved per request",
      (comp && P->compressed
           ? (snprintf(b, sizeof(b), "%.1f",
                       (double)(P->blocks_before - P->blocks_after) /
                           P->compressed),
              b)
           : "0"));
  ROW("blocks in use, peak", cell_u(b, sizeof(b), 1, P->peak_used));
  ROW("blocks in use, end", cell_u(b, sizeof(b), 1, P->final_used));
  ROW("prompt tokens", cell_u(b, sizeof(b), 1, P->prompt_tokens));
  ROW("decode tokens", cell_u(b, sizeof(b), 1, P->decode_tokens));
  ROW("prefill writes (s)", (snprintf(b, sizeof(b), "%.3f", P->t_prefill), b));
  ROW("observe + compress (s)",
      (comp ? (snprintf(b, sizeof(b), "%.3f", P->t_compress), b) : "-"));
  ROW("decode (s)", (snprintf(b, sizeof(b), "%.3f", P->t_decode), b));
  ROW("decode tokens per second",
      (snprintf(b, sizeof(b), "%.0f",
                P->t_decode > 0 ? (double)P->decode_tokens / P->t_decode : 0.0),
       b));
  ROW("plan bytes per step (mean)",
      (snprintf(b, sizeof(b), "%.0f",
                R->steps > 1 ? (double)P->plan_sum / (R->steps - 1) : 0.0),
       b));
  ROW("output checksum", (snprintf(b, sizeof(b), "%.6e", P->checksum), b));
#undef ROW
  printf("\n");
  for (int i = 0; i < n_runs; i++)
    printf("  %s: admission stopped: %s\n", runs[i].policy, runs[i].stopped_by);
  const pass *none = &runs[0];
  for (int i = 1; i < n_runs; i++) {
    const pass *P = &runs[i];
    printf("  %s: %u requests where no compression admits %u (%.1fx); "
           "blocks %" PRIu64 " -> %" PRIu64 " over %u compressed prompts "
           "(%" PRIu64 " went back to the pool, %" PRIu64
           " fresh ones gathered the kept tokens)\n",
           P->policy, P->requests, none->requests,
           none->requests ? (double)P->requests / none->requests : 0.0,
           P->blocks_before, P->blocks_after, P->compressed, P->blocks_freed,
           P->blocks_taken);
    if (P->not_compressed)
      printf("  %s: %u prompts stayed uncompressed: compaction found no "
             "free blocks to gather into\n",
             P->policy, P->not_compressed);
    if (P->fallback)
      printf("  %s: %u requests had no post-vision window and observed the "
             "last prompt tokens instead\n",
             P->policy, P->fallback);
    if (P->compressed == 0) continue;
    /* Per-layer budgets of the first request: sparsity-aware policies give
     * dense layers more tokens. */
    printf("  %s: per-layer budget of the first request (of %u prompt "
           "tokens):\n",
           P->policy, R->n_prompt);
    uint32_t max_b = 1;
    for (uint32_t l = 0; l < R->L; l++)
      if (R->layer_budget[l] > max_b) max_b = R->layer_budget[l];
    for (uint32_t l = 0; l < R->L; l++) {
      char bar[41];
      uint32_t w = (uint32_t)((uint64_t)R->layer_budget[l] * 40 / max_b);
      memset(bar, '#', w);
      bar[w] = '\0';
      printf("    layer %3u  density %.3f  keep %6u  %s\n", l,
             (double)R->layer_density[l], R->layer_budget[l], bar);
    }
  }
}

int main(int argc, char **argv) {
  int rc = EXIT_FAILURE;
  options opt;
  int parsed = parse_args(argc, argv, &opt);
  if (parsed != 0) return parsed > 0 ? EXIT_SUCCESS : EXIT_FAILURE;

  pvl_cache *cache = NULL;
  run R;
  memset(&R, 0, sizeof(R));
  pass runs[2];
  int n_runs = 0;
  pvl_policy policy;
  char why[512];

  if (pvl_version() / 10000 != PVL_VERSION / 10000) { /* SONAME major */
    fprintf(stderr, "batched_decode: built against libpagedvl %d, loaded %u\n",
            PVL_VERSION, pvl_version());
    return EXIT_FAILURE;
  }

  /* 1. The cache, on the backend AUTO picks for this shape and dtype. */
  pvl_status st = make_cache(&opt, &cache, why, sizeof(why));
  if (st != PVL_SUCCESS) {
    report(NULL, "pvl_cache_create", st);
    goto cleanup;
  }
  pvl_config cfg;
  CHECK(pvl_cache_config(cache, &cfg)); /* backend resolved, pool sized */
  R.cache = cache;
  R.be = cfg.backend;
  if (!buffers_supported(R.be)) {
    fputs(k_no_cuda, stderr);
    goto cleanup;
  }
  const char *backend = R.be == PVL_BACKEND_CUDA ? "cuda" : "cpu";
  R.dt = cfg.dtype;
  R.L = cfg.num_layers;
  R.hq = cfg.num_q_heads;
  R.hkv = cfg.num_kv_heads;
  R.d = cfg.head_dim;
  R.bs = cfg.block_size;
  R.num_blocks = cfg.num_blocks;
  R.seed = (uint64_t)opt.seed;
  R.esz = pvl_dtype_size(R.dt);
  const uint64_t n_prompt64 = (uint64_t)(opt.visual + opt.text);
  if (n_prompt64 == 0 || n_prompt64 + (uint64_t)opt.steps > UINT32_MAX) {
    fprintf(stderr, "batched_decode: --visual + --text must be >= 1 and, "
                    "with --steps, fit in 32 bits\n");
    goto cleanup;
  }
  R.n_prompt = (uint32_t)n_prompt64;
  R.steps = (uint32_t)opt.steps;
  if (strcmp(opt.policy, "none") != 0) {
    pvl_policy_kind kind;
    CHECK(pvl_policy_parse(opt.policy, &kind));
    CHECK(pvl_policy_init(&policy, kind));
    if (opt.keep > 0.0) policy.keep_ratio = (float)opt.keep;
  }

  /* 2. What fits, before any data is made: one request alone must fit the
   *    pool with its decode steps. */
  pvl_admit admit;
  CHECK(pvl_can_add(cache, R.n_prompt, &admit));
  CHECK(pvl_blocks_for_prompt(cache, R.n_prompt, &R.prompt_blocks));
  CHECK(pvl_blocks_for_prompt(cache, R.n_prompt + R.steps, &R.life_blocks));
  if (admit == PVL_ADMIT_NEVER || R.life_blocks > R.num_blocks) {
    fprintf(stderr,
            "batched_decode: one request of %u tokens needs %" PRIu64
            " blocks (%" PRIu64 " with its %u decode steps); the pool has "
            "%u: raise --blocks or lower --visual/--text/--steps\n",
            R.n_prompt, R.prompt_blocks, R.life_blocks, R.steps, R.num_blocks);
    goto cleanup;
  }

  /* 3. Data. Random elements in backend memory, with a host copy (the
   *    observation queries are built from the keys); every K, V and Q of
   *    the runs is a window into them at a varying offset. The pool holds
   *    one request's prompt (queries are the widest rows). */
  R.row_kv = (size_t)R.hkv * R.d;
  R.row_q = (size_t)R.hq * R.d;
  R.wrap = 64 * R.row_q; /* offsets cycle through this */
  const size_t n_prefill = (size_t)R.n_prompt * R.row_q + R.wrap;
  R.prefill_buf = buf_alloc(R.be, n_prefill * R.esz);
  R.prefill_host = malloc(n_prefill * R.esz);
  /* The widest window any policy observes is the whole prompt (H2O). */
  R.qwin = buf_alloc(R.be, (size_t)R.n_prompt * R.row_q * R.esz);
  R.qwin_host =
      malloc((size_t)R.n_prompt * R.row_q * R.esz + R.d * sizeof(float));
  R.max_req = cfg.max_seqs;
  if (opt.requests > 0 && (uint64_t)opt.requests < R.max_req)
    R.max_req = (uint32_t)opt.requests;
  R.ids = malloc((size_t)R.max_req * sizeof(*R.ids));
  R.layer_budget = calloc(R.L, sizeof(*R.layer_budget));
  R.layer_density = calloc(R.L, sizeof(*R.layer_density));
  if (!R.prefill_buf || !R.prefill_host || !R.qwin || !R.qwin_host || !R.ids ||
      !R.layer_budget || !R.layer_density) {
    fprintf(stderr, "batched_decode: cannot allocate %zu bytes of data\n",
            2 * n_prefill * R.esz);
    goto cleanup;
  }
  uint64_t rng = R.seed;
  for (size_t i = 0; i < n_prefill; i++)
    store_elem(R.dt, R.prefill_host, i, rng_float(&rng));
  if (buf_upload(R.be, R.prefill_buf, R.prefill_host, n_prefill * R.esz) != 0)
    goto cleanup;
  /* A LLaVA prompt: a short system prefix, the image, then the question. */
  const uint32_t prefix = opt.text < 5 ? (uint32_t)opt.text : 5;
  R.image = (pvl_span){prefix, prefix + (uint32_t)opt.visual};
  R.n_spans = opt.visual > 0 ? 1 : 0;

  /* 4. The runs: no compression, then the policy, on the same pool. */
  if (run_pass(&R, NULL, &runs[n_runs++]) != 0) goto cleanup;
  if (strcmp(opt.policy, "none") != 0 &&
      run_pass(&R, &policy, &runs[n_runs++]) != 0)
    goto cleanup;

  /* 5. Report. */
  if (opt.json)
    print_json(&R, backend, why, runs, n_runs);
  else
    print_table(&R, &opt, backend, why, runs, n_runs);
  rc = EXIT_SUCCESS;

cleanup:
  pvl_cache_destroy(cache);
  free(R.layer_budget);
  free(R.layer_density);
  free(R.qwin_host);
  buf_free(R.be, R.qwin);
  buf_free(R.be, R.prefill_buf);
  free(R.prefill_host);
  free(R.ids);
  return rc;
}
