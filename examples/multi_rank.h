/* multi_rank.h: the driver shared by examples/multi_gpu_decode.c and
 * bench/bench_multi_gpu.c. One thread per rank runs the serving loop of one
 * model whose cache is split over the ranks (by KV heads or by layers):
 * admit requests, prefill each rank's share of their K/V, observe, compress
 * with the policy (every rank agrees on the budgets), then decode the batch
 * step by step (append, plan, per-layer write + attention), timing each
 * phase. The synthetic K/V/Q are a function of the model's (request,
 * layer, head, position) indices, never of the rank, so every split of the
 * same job computes on the same data and a single cache over the whole
 * model is the reference. A header of static functions, so that the example
 * stays one file a user can copy with this one. */
#ifndef PVL_EXAMPLES_MULTI_RANK_H
#define PVL_EXAMPLES_MULTI_RANK_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE                                                        \
  200809L /* clock_gettime; define it before any include */
#endif

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pagedvl.h"

#ifndef PVL_EXAMPLE_CUDA
#define PVL_EXAMPLE_CUDA 0 /* CMake sets 1 when the library has CUDA */
#endif
#if PVL_EXAMPLE_CUDA
#include <cuda_runtime_api.h>
#endif

/* ------------------------------------------------------------------------ */
/* The job                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct mr_shape {
  uint32_t layers, q_heads, kv_heads, head_dim, block_size;
  pvl_dtype dtype;
  uint32_t visual; /* visual tokens: prompt positions [4, 4 + visual) */
  uint32_t text;   /* text tokens after them (the post-vision window) */
  uint64_t seed;
} mr_shape;

typedef struct mr_job {
  mr_shape shape;
  pvl_split split; /* NONE with nranks = 1: the single-cache reference */
  uint32_t nranks;
  pvl_backend backend; /* CPU or CUDA (resolved by the caller) */
  int use_nccl;        /* CUDA ranks over NCCL, rank r on device r */
  unsigned char nccl_id[PVL_COMM_ID_BYTES];
  pvl_comm **local;    /* in-process communicator, [nranks] (CPU) */
  uint32_t num_blocks; /* per rank; 0 = from free GPU memory (CUDA) */
  uint32_t requests;   /* admit at most this many (0 = as many as fit) */
  uint32_t steps;      /* decode steps */
  int compress;        /* 0: no compression */
  pvl_policy policy;
  int keep_outputs; /* copy the last step's outputs of every local
                             layer to the host (verification) */
} mr_job;

/* What one rank did. Times are seconds of wall clock on that rank's
 * thread; on CUDA each timed phase ends with a device synchronization, so
 * phases do not overlap (this adds a little to every phase). */
typedef struct mr_result {
  pvl_status st;
  char err[640];
  /* The rank's share, as pvl_cache_config resolved it. */
  uint32_t layer_begin, layers, kv_head_begin, kv_heads, q_heads;
  pvl_backend backend;
  uint32_t admitted;
  uint32_t *budget0;   /* [layers] budgets of request 0 (global model's
                             budgets of this rank's layers) */
  uint32_t *kept_n;    /* [admitted][layers] tokens kept per layer after
                             compression */
  uint32_t *kept_pos0; /* request 0's kept positions, layer after layer */
  uint64_t kept_pos0_n;
  uint32_t peak_used, final_used, num_blocks;
  uint64_t tokens_held;   /* after the last step */
  uint64_t decode_tokens; /* requests x steps */
  double t_prefill, t_observe, t_compress, t_decode;
  double t_append, t_plan, t_kv_write, t_attention;
  uint64_t compress_bytes; /* statistics a compress exchanged (estimate) */
  float *out;              /* keep_outputs: [layers][admitted][q_heads][d] */
} mr_result;

/* ------------------------------------------------------------------------ */
/* Small utilities                                                          */
/* ------------------------------------------------------------------------ */

static double mr_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A value in [-1, 1) that depends only on the model indices. */
static float mr_hash(uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
  uint64_t z = seed ^ (a * 0x9e3779b97f4a7c15ull) ^
               (b * 0xc2b2ae3d27d4eb4full) ^ (c * 0x165667b19e3779f9ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (float)((z >> 40) * (1.0 / 8388608.0)) - 1.0f;
}

static uint16_t mr_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u)
    return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0));
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow */
  if (x < 0x38800000u) {                                   /* subnormal */
    float a;
    memcpy(&a, &x, 4);
    return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f));
  }
  const uint32_t r = x + 0xfffu + ((x >> 13) & 1u); /* round to nearest even */
  return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static float mr_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  float f;
  if (e == 0) {
    f = (float)m / 16777216.0f;
    return sign ? -f : f;
  }
  uint32_t x = sign | (e == 31 ? 0x7f800000u | (m << 13)
                               : ((e + 112u) << 23) | (m << 13));
  memcpy(&f, &x, 4);
  return f;
}

static uint16_t mr_f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

static float mr_bf16_to_f32(uint16_t h) {
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static void mr_store(pvl_dtype dt, void *dst, size_t i, float v) {
  if (dt == PVL_DTYPE_F32) {
    ((float *)dst)[i] = v;
  } else {
    ((uint16_t *)dst)[i] =
        dt == PVL_DTYPE_F16 ? mr_f32_to_f16(v) : mr_f32_to_bf16(v);
  }
}

static float mr_load(pvl_dtype dt, const void *src, size_t i) {
  if (dt == PVL_DTYPE_F32) return ((const float *)src)[i];
  const uint16_t h = ((const uint16_t *)src)[i];
  return dt == PVL_DTYPE_F16 ? mr_f16_to_f32(h) : mr_bf16_to_f32(h);
}

/* K and V of (request, layer, KV head, position, dim): model indices. */
enum { MR_K = 1, MR_V = 2, MR_Q = 3, MR_QD = 4 };
static float mr_kv(const mr_shape *s, int what, uint32_t req, uint32_t layer,
                   uint32_t head, uint32_t pos, uint32_t dim) {
  return mr_hash(s->seed + (uint64_t)what, ((uint64_t)req << 32) | layer,
                 ((uint64_t)head << 32) | pos, dim);
}

/* An observation query of query head h at prompt position pos: noise plus,
 * in later layers, a pull toward the keys of a few image tokens, so that
 * late layers are sparse and early ones dense, as VL-Cache measures on real
 * VLMs; the sparsity-aware budgets then differ per layer. */
static float mr_obs_q(const mr_shape *s, uint32_t req, uint32_t layer,
                      uint32_t qh, uint32_t pos, uint32_t dim) {
  const uint32_t group = s->q_heads / s->kv_heads, kvh = qh / group;
  const float pull =
      6.0f * (float)layer / (float)(s->layers > 1 ? s->layers - 1 : 1);
  float v = mr_kv(s, MR_Q, req, layer, qh, pos, dim);
  if (s->visual > 0 && pull > 0.0f) {
    uint32_t anchor = 4 + (uint32_t)((mr_hash(s->seed, req, layer, qh) + 1.0f) *
                                     0.5f * (float)s->visual) %
                              s->visual;
    v += pull * mr_kv(s, MR_K, req, layer, kvh, anchor, dim);
  }
  return v;
}

/* Decode-step inputs of (request, layer, head, step): new K, V and Q. */
static float mr_step(const mr_shape *s, int what, uint32_t req, uint32_t layer,
                     uint32_t head, uint32_t step, uint32_t dim) {
  return mr_hash(s->seed + 100u + (uint64_t)what, ((uint64_t)req << 32) | layer,
                 ((uint64_t)head << 32) | step, dim);
}

/* ------------------------------------------------------------------------ */
/* Buffers where the backend computes (host, or the rank's device)          */
/* ------------------------------------------------------------------------ */

static void *mr_alloc(pvl_backend be, size_t n) {
  if (be == PVL_BACKEND_CPU) return malloc(n ? n : 1);
#if PVL_EXAMPLE_CUDA
  void *p = NULL;
  return cudaMalloc(&p, n ? n : 1) == cudaSuccess ? p : NULL;
#else
  return NULL;
#endif
}

static void mr_free(pvl_backend be, void *p) {
  if (be == PVL_BACKEND_CPU) {
    free(p);
    return;
  }
#if PVL_EXAMPLE_CUDA
  if (p) cudaFree(p);
#endif
}

static int mr_copy(pvl_backend be, void *dst, const void *src, size_t n,
                   int to_device) {
  if (be == PVL_BACKEND_CPU) {
    memcpy(dst, src, n);
    return 0;
  }
#if PVL_EXAMPLE_CUDA
  return cudaMemcpy(dst, src, n,
                    to_device ? cudaMemcpyHostToDevice
                              : cudaMemcpyDeviceToHost) == cudaSuccess
             ? 0
             : -1;
#else
  (void)to_device;
  return -1;
#endif
}

static int mr_sync(pvl_backend be) {
  if (be == PVL_BACKEND_CPU) return 0;
#if PVL_EXAMPLE_CUDA
  return cudaDeviceSynchronize() == cudaSuccess ? 0 : -1;
#else
  return -1;
#endif
}

/* ------------------------------------------------------------------------ */
/* One rank                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct mr_rank {
  const mr_job *job;
  uint32_t rank;
  mr_result *res;
} mr_rank;

#define MR_FAIL(R, cache, st_, ...)                                            \
  do {                                                                         \
    int n_ = snprintf((R)->res->err, sizeof((R)->res->err), __VA_ARGS__);      \
    if (n_ >= 0 && (size_t)n_ < sizeof((R)->res->err))                         \
      snprintf((R)->res->err + n_, sizeof((R)->res->err) - (size_t)n_,         \
               ": %s: %s", pvl_status_string(st_),                             \
               (cache) ? pvl_cache_last_error(cache)                           \
                       : pvl_create_last_error());                             \
    (R)->res->st = (st_);                                                      \
  } while (0)

static void mr_sample(pvl_cache *c, mr_result *r) {
  pvl_stats s;
  if (pvl_cache_get_stats(c, &s) == PVL_SUCCESS) {
    if (s.used_blocks > r->peak_used) r->peak_used = s.used_blocks;
    r->final_used = s.used_blocks;
    r->tokens_held = s.tokens;
    r->num_blocks = s.num_blocks;
  }
}

/* Fills a [n][heads][d] buffer (host staging) with f(row, local head, dim)
 * through a callback-free switch on `kind`. */
typedef struct mr_fill {
  const mr_shape *s;
  int kind; /* MR_K/MR_V: prompt K/V; MR_Q: observation Q; MR_QD: decode */
  uint32_t req, layer, head0, first;
  uint32_t step;
  int what;             /* decode: MR_K, MR_V or MR_Q */
  const uint32_t *reqs; /* decode: request of each row */
} mr_fill;

static void mr_fill_rows(const mr_fill *f, void *host, uint32_t n,
                         uint32_t heads) {
  const mr_shape *s = f->s;
  const uint32_t d = s->head_dim;
  size_t i = 0;
  for (uint32_t r = 0; r < n; r++)
    for (uint32_t h = 0; h < heads; h++)
      for (uint32_t x = 0; x < d; x++, i++) {
        float v;
        if (f->kind == MR_K || f->kind == MR_V)
          v = mr_kv(s, f->kind, f->req, f->layer, f->head0 + h, f->first + r,
                    x);
        else if (f->kind == MR_Q)
          v = mr_obs_q(s, f->req, f->layer, f->head0 + h, f->first + r, x);
        else
          v = mr_step(s, f->what, f->reqs[r], f->layer, f->head0 + h, f->step,
                      x) *
              (f->what == MR_Q ? 2.0f : 1.0f);
        mr_store(s->dtype, host, i, v);
      }
}

static void *mr_rank_main(void *arg) {
  mr_rank *R = arg;
  const mr_job *J = R->job;
  const mr_shape *S = &J->shape;
  mr_result *res = R->res;
  memset(res, 0, sizeof(*res));
  res->st = PVL_SUCCESS;
  pvl_comm *comm = NULL;
  pvl_cache *cache = NULL;
  pvl_plan *plan = NULL;
  pvl_seq_id *seqs = NULL;
  uint32_t *reqs = NULL;
  void *host = NULL, *dev_a = NULL, *dev_b = NULL, *dev_c = NULL;
  void *dev_out = NULL;
  pvl_status st;

#if PVL_EXAMPLE_CUDA
  if (J->backend == PVL_BACKEND_CUDA &&
      cudaSetDevice((int)R->rank) != cudaSuccess) {
    snprintf(res->err, sizeof(res->err), "rank %u: cudaSetDevice(%u) failed",
             R->rank, R->rank);
    res->st = PVL_ERR_NO_DEVICE;
    return NULL;
  }
#endif
  if (J->use_nccl) {
    st = pvl_comm_create_nccl(J->nccl_id, (int32_t)R->rank, (int32_t)J->nranks,
                              (int32_t)R->rank, &comm);
    if (st != PVL_SUCCESS) {
      MR_FAIL(R, NULL, st, "rank %u: pvl_comm_create_nccl", R->rank);
      return NULL;
    }
  } else if (J->local) {
    comm = J->local[R->rank];
  }

  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = J->backend;
  cfg.device = (int32_t)R->rank;
  cfg.dtype = S->dtype;
  cfg.head_dim = S->head_dim;
  cfg.block_size = S->block_size;
  cfg.num_blocks = J->num_blocks;
  cfg.num_layers = S->layers;
  cfg.num_q_heads = S->q_heads;
  cfg.num_kv_heads = S->kv_heads;
  cfg.comm = comm;
  cfg.split = J->split;
  if (J->split == PVL_SPLIT_LAYERS) {
    cfg.model_num_layers = S->layers;
    cfg.num_layers = 0; /* the even split */
  } else if (J->split == PVL_SPLIT_HEADS) {
    cfg.model_num_kv_heads = S->kv_heads;
    cfg.num_kv_heads = 0; /* the even split; num_q_heads = the model's */
  }
  st = pvl_cache_create(&cfg, &cache);
  if (st != PVL_SUCCESS) {
    MR_FAIL(R, NULL, st, "rank %u: pvl_cache_create", R->rank);
    goto done;
  }
  pvl_cache_config(cache, &cfg);
  res->backend = cfg.backend;
  res->layers = cfg.num_layers;
  res->layer_begin = J->split == PVL_SPLIT_LAYERS ? cfg.layer_begin : 0;
  res->kv_heads = cfg.num_kv_heads;
  res->kv_head_begin = J->split == PVL_SPLIT_HEADS ? cfg.kv_head_begin : 0;
  res->q_heads = cfg.num_q_heads;
  const uint32_t L = res->layers, hkv = res->kv_heads, hq = res->q_heads;
  const uint32_t d = S->head_dim, group = S->q_heads / S->kv_heads;
  const uint32_t m = 4 + S->visual + S->text;
  const size_t es = pvl_dtype_size(S->dtype);
  const uint32_t cap = J->requests ? J->requests : cfg.max_seqs;
  const pvl_span vis = {4, 4 + S->visual};

  seqs = calloc(cap, sizeof(*seqs));
  reqs = calloc(cap, sizeof(*reqs));
  res->budget0 = calloc(L ? L : 1, sizeof(uint32_t));
  res->kept_n = calloc((size_t)cap * (L ? L : 1), sizeof(uint32_t));
  const uint32_t rows_max = m > cap ? m : cap;
  const size_t stage = (size_t)rows_max * (hq > hkv ? hq : hkv) * d * es;
  host = malloc(stage);
  dev_a = mr_alloc(J->backend, stage);
  dev_b = mr_alloc(J->backend, stage);
  if (!seqs || !reqs || !res->budget0 || !res->kept_n || !host || !dev_a ||
      !dev_b) {
    snprintf(res->err, sizeof(res->err), "rank %u: out of memory", R->rank);
    res->st = PVL_ERR_NO_MEMORY;
    goto done;
  }

  /* ---- admission, prefill, observe, compress: one request at a time, so
   * the blocks compression frees admit the next one ---- */
  for (uint32_t i = 0; i < cap; i++) {
    pvl_admit adm;
    /* Room for the prompt and its decode steps (before compression). */
    st = pvl_can_add(cache, m + J->steps, &adm);
    if (st != PVL_SUCCESS) {
      MR_FAIL(R, cache, st, "rank %u: pvl_can_add", R->rank);
      goto done;
    }
    if (adm != PVL_ADMIT_OK) break;
    st = pvl_seq_add(cache, m, S->visual ? &vis : NULL, S->visual ? 1 : 0,
                     &seqs[i]);
    if (st != PVL_SUCCESS) {
      MR_FAIL(R, cache, st, "rank %u: pvl_seq_add", R->rank);
      goto done;
    }
    reqs[i] = i;
    res->admitted = i + 1;
    double t0 = mr_now();
    for (uint32_t l = 0; l < L; l++) {
      mr_fill f = {S, MR_K, i,   res->layer_begin + l, res->kv_head_begin, 0,
                   0, 0,    NULL};
      mr_fill_rows(&f, host, m, hkv);
      int bad = mr_copy(J->backend, dev_a, host, (size_t)m * hkv * d * es, 1);
      f.kind = MR_V;
      mr_fill_rows(&f, host, m, hkv);
      bad |= mr_copy(J->backend, dev_b, host, (size_t)m * hkv * d * es, 1);
      if (bad) {
        snprintf(res->err, sizeof(res->err), "rank %u: copy to device failed",
                 R->rank);
        res->st = PVL_ERR_CUDA;
        goto done;
      }
      double tw = mr_now();
      st = pvl_kv_write(cache, seqs[i], l, 0, m, dev_a, dev_b, NULL);
      mr_sync(J->backend);
      res->t_prefill += mr_now() - tw;
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_kv_write", R->rank);
        goto done;
      }
      if (!J->compress) continue;
      uint32_t first = 0, rows = 0, fb = 0;
      st = pvl_policy_rows(&J->policy, cache, seqs[i], &first, &rows, &fb);
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_policy_rows", R->rank);
        goto done;
      }
      if (rows == 0) continue;
      mr_fill q = {
          S, MR_Q, i,   res->layer_begin + l, res->kv_head_begin * group, first,
          0, 0,    NULL};
      mr_fill_rows(&q, host, rows, hq);
      if (mr_copy(J->backend, dev_a, host, (size_t)rows * hq * d * es, 1)) {
        res->st = PVL_ERR_CUDA;
        snprintf(res->err, sizeof(res->err), "rank %u: copy failed", R->rank);
        goto done;
      }
      double to = mr_now();
      st = pvl_observe(cache, seqs[i], l, dev_a, first, rows,
                       J->policy.threshold, 0.0f, NULL);
      mr_sync(J->backend);
      res->t_observe += mr_now() - to;
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_observe", R->rank);
        goto done;
      }
    }
    (void)t0;
    mr_sample(cache, res);
    if (J->compress) {
      pvl_compress_report rep;
      memset(&rep, 0, sizeof(rep));
      rep.budget = i == 0 ? res->budget0 : NULL;
      rep.kept = res->kept_n + (size_t)i * L;
      double tc = mr_now();
      st = pvl_compress(cache, seqs[i], &J->policy, &rep, NULL);
      mr_sync(J->backend);
      res->t_compress += mr_now() - tc;
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_compress", R->rank);
        goto done;
      }
      /* What the split exchanged for it (see the header's cost note). */
      if (J->split == PVL_SPLIT_LAYERS)
        res->compress_bytes += (uint64_t)S->layers * sizeof(float) * J->nranks;
      else if (J->split == PVL_SPLIT_HEADS)
        res->compress_bytes +=
            (uint64_t)L * m * 8 + (uint64_t)L * S->q_heads * 16;
    } else {
      for (uint32_t l = 0; l < L; l++) res->kept_n[(size_t)i * L + l] = m;
    }
    mr_sample(cache, res);
  }
  if (res->admitted == 0) {
    snprintf(res->err, sizeof(res->err),
             "rank %u: not one request of %u tokens (+%u decode steps) fits "
             "the pool of %u blocks",
             R->rank, m, J->steps, res->num_blocks);
    res->st = PVL_ERR_OUT_OF_BLOCKS;
    goto done;
  }
  /* Request 0's kept positions per layer (the selections every rank must
   * agree on). */
  {
    uint64_t total = 0;
    for (uint32_t l = 0; l < L; l++) {
      uint32_t n, nb;
      if (pvl_seq_layer_size(cache, seqs[0], l, &n, &nb) == PVL_SUCCESS)
        total += n;
    }
    res->kept_pos0 = calloc(total ? total : 1, sizeof(uint32_t));
    uint64_t off = 0;
    for (uint32_t l = 0; res->kept_pos0 && l < L; l++) {
      uint32_t n = 0;
      pvl_seq_positions(cache, seqs[0], l, res->kept_pos0 + off,
                        (uint32_t)(total - off), &n);
      off += n;
    }
    res->kept_pos0_n = off;
  }

  /* ---- decode ---- */
  const uint32_t B = res->admitted;
  st = pvl_plan_create(cache, B, 0, &plan);
  if (st != PVL_SUCCESS) {
    MR_FAIL(R, cache, st, "rank %u: pvl_plan_create", R->rank);
    goto done;
  }
  const size_t kv_step = (size_t)B * hkv * d * es,
               q_step = (size_t)B * hq * d * es;
  dev_c = mr_alloc(J->backend, q_step);
  dev_out = mr_alloc(J->backend, q_step);
  void *kbuf = mr_alloc(J->backend, (size_t)L * kv_step);
  void *vbuf = mr_alloc(J->backend, (size_t)L * kv_step);
  void *qbuf = mr_alloc(J->backend, (size_t)L * q_step);
  if (J->keep_outputs) res->out = calloc((size_t)L * B * hq * d, sizeof(float));
  void *hstep = malloc(q_step > kv_step ? q_step : kv_step);
  if (!dev_c || !dev_out || !kbuf || !vbuf || !qbuf || !hstep ||
      (J->keep_outputs && !res->out)) {
    snprintf(res->err, sizeof(res->err), "rank %u: out of memory (decode)",
             R->rank);
    res->st = PVL_ERR_NO_MEMORY;
    mr_free(J->backend, kbuf);
    mr_free(J->backend, vbuf);
    mr_free(J->backend, qbuf);
    free(hstep);
    goto done;
  }
  double td = mr_now();
  for (uint32_t step = 0; step < J->steps && res->st == PVL_SUCCESS; step++) {
    /* Inputs of this step for every layer (not timed: a model makes them). */
    for (uint32_t l = 0; l < L; l++) {
      mr_fill f = {
          S,    MR_QD, 0,   res->layer_begin + l, res->kv_head_begin, 0,
          step, MR_K,  reqs};
      mr_fill_rows(&f, hstep, B, hkv);
      mr_copy(J->backend, (char *)kbuf + l * kv_step, hstep, kv_step, 1);
      f.what = MR_V;
      mr_fill_rows(&f, hstep, B, hkv);
      mr_copy(J->backend, (char *)vbuf + l * kv_step, hstep, kv_step, 1);
      f.what = MR_Q;
      f.head0 = res->kv_head_begin * group;
      mr_fill_rows(&f, hstep, B, hq);
      mr_copy(J->backend, (char *)qbuf + l * q_step, hstep, q_step, 1);
    }
    mr_sync(J->backend);
    double t = mr_now();
    st = pvl_seq_append(cache, seqs, B, NULL);
    mr_sync(J->backend);
    double t1 = mr_now();
    res->t_append += t1 - t;
    if (st != PVL_SUCCESS) {
      MR_FAIL(R, cache, st, "rank %u: pvl_seq_append at step %u", R->rank,
              step);
      break;
    }
    st = pvl_plan_build(plan, seqs, B, NULL);
    mr_sync(J->backend);
    double t2 = mr_now();
    res->t_plan += t2 - t1;
    if (st != PVL_SUCCESS) {
      MR_FAIL(R, cache, st, "rank %u: pvl_plan_build", R->rank);
      break;
    }
    for (uint32_t l = 0; l < L; l++) {
      double a = mr_now();
      st = pvl_plan_kv_write(plan, l, (char *)kbuf + l * kv_step,
                             (char *)vbuf + l * kv_step, NULL);
      mr_sync(J->backend);
      double b = mr_now();
      res->t_kv_write += b - a;
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_plan_kv_write", R->rank);
        break;
      }
      st = pvl_attention_decode(plan, l, (char *)qbuf + l * q_step, dev_out,
                                0.0f, NULL);
      mr_sync(J->backend);
      res->t_attention += mr_now() - b;
      if (st != PVL_SUCCESS) {
        MR_FAIL(R, cache, st, "rank %u: pvl_attention_decode", R->rank);
        break;
      }
      if (J->keep_outputs && step + 1 == J->steps) {
        mr_copy(J->backend, hstep, dev_out, q_step, 0);
        for (size_t e = 0; e < (size_t)B * hq * d; e++)
          res->out[(size_t)l * B * hq * d + e] = mr_load(S->dtype, hstep, e);
      }
    }
    mr_sample(cache, res);
  }
  res->t_decode = mr_now() - td;
  res->decode_tokens = res->st == PVL_SUCCESS ? (uint64_t)B * J->steps : 0;
  mr_free(J->backend, kbuf);
  mr_free(J->backend, vbuf);
  mr_free(J->backend, qbuf);
  free(hstep);

done:
  pvl_plan_destroy(plan);
  if (cache) {
    for (uint32_t i = 0; i < res->admitted; i++) pvl_seq_free(cache, seqs[i]);
    pvl_cache_destroy(cache);
  }
  if (J->use_nccl) pvl_comm_destroy(comm);
  mr_free(J->backend, dev_a);
  mr_free(J->backend, dev_b);
  mr_free(J->backend, dev_c);
  mr_free(J->backend, dev_out);
  free(host);
  free(seqs);
  free(reqs);
  return NULL;
}

static void mr_result_free(mr_result *r) {
  free(r->budget0);
  free(r->kept_n);
  free(r->kept_pos0);
  free(r->out);
  memset(r, 0, sizeof(*r));
}

/* Runs the job on job->nranks threads (one per rank) and waits for them.
 * res[0..nranks). Returns 0 when every rank succeeded. */
static int mr_run(mr_job *job, mr_result *res) {
  const uint32_t n = job->nranks;
  pthread_t *th = calloc(n, sizeof(*th));
  mr_rank *args = calloc(n, sizeof(*args));
  int failed = 0;
  if (!th || !args) {
    free(th);
    free(args);
    return -1;
  }
  job->local = NULL;
  pvl_comm **local = NULL;
  if (!job->use_nccl && n > 1) {
    local = calloc(n, sizeof(*local));
    if (!local || pvl_comm_create_local(n, local) != PVL_SUCCESS) {
      fprintf(stderr, "pvl_comm_create_local: %s\n", pvl_create_last_error());
      free(local);
      free(th);
      free(args);
      return -1;
    }
    job->local = local;
  }
  for (uint32_t r = 0; r < n; r++) {
    args[r].job = job;
    args[r].rank = r;
    args[r].res = &res[r];
    if (pthread_create(&th[r], NULL, mr_rank_main, &args[r]) != 0) {
      /* The ranks already started wait in their first collective for one
       * that never comes: there is no way back from here. */
      fprintf(stderr, "pthread_create failed for rank %u\n", r);
      exit(1);
    }
  }
  for (uint32_t r = 0; r < n; r++) {
    pthread_join(th[r], NULL);
    if (res[r].st != PVL_SUCCESS) failed = 1;
  }
  if (local) {
    for (uint32_t r = 0; r < n; r++) pvl_comm_destroy(local[r]);
    free(local);
    job->local = NULL;
  }
  free(th);
  free(args);
  return failed ? 1 : 0;
}

#endif /* PVL_EXAMPLES_MULTI_RANK_H */
