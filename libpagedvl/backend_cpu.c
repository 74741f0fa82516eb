/* The CPU backend: the pool in host memory and the reference (oracle)
 * implementations of every kernel, written to be obviously correct: the GPU
 * kernels are tested against these. The observation is also blocked,
 * vectorized and threaded (below), because H2O's covers every prompt row
 * and the examples run it on the CPU. */
#define _POSIX_C_SOURCE 200809L /* sysconf */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OBS_X86 1 /* the observation has AVX2 and AVX-512 copies */
#else
#define OBS_X86 0
#endif

/* Instruction sets the observation has a copy for, in increasing order. */
typedef enum cpu_isa {
  CPU_ISA_GENERIC = 0,
  CPU_ISA_AVX2 = 1,
  CPU_ISA_AVX512 = 2
} cpu_isa;

/* The CPU backend's state (pvl_cache.be_state). */
typedef struct cpu_state {
  uint32_t threads; /* observe threads at most: PVL_CPU_THREADS */
  cpu_isa isa;      /* observe copy: the best the CPU runs, PVL_CPU_ISA */
} cpu_state;

/* q . k with eight independent partial sums: the compiler vectorizes it
 * without -ffast-math, and it rounds no worse than a sequential sum. */
static inline float dot_f32(const float *a, const float *b, int32_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int u = 0; u < 8; u++) acc[u] += a[e + u] * b[e + u];
  float s = 0.0f;
  for (; e < n; e++) s += a[e] * b[e];
  for (int u = 0; u < 8; u++) s += acc[u];
  return s;
}

/* Byte offset of (block, K/V, head, slot) in the pool. */
static inline size_t slot_offset(const pvl_cache *c, int64_t block, int kv,
                                 int32_t head, int32_t slot) {
  const pvl_kv_geom *g = &c->geom;
  int64_t e = block * g->block_elems +
              ((int64_t)(kv * g->num_kv_heads + head) * g->block_size + slot) *
                  g->head_dim;
  return (size_t)e * c->elem_size;
}

/* Threads a cache's observe may use, read once per cache: PVL_CPU_THREADS
 * if it is a whole number >= 1 (at most OBS_MAX_THREADS), else min(2,
 * online CPUs). Two by default because the work is memory-light and most
 * callers run other caches or ranks on the other cores; results are the
 * same for any count. */
#define OBS_MAX_THREADS 64
static uint32_t cpu_threads(void) {
  const char *s = getenv("PVL_CPU_THREADS");
  if (s && *s) {
    uint32_t n = 0;
    const char *e = s;
    for (; *e >= '0' && *e <= '9'; e++)
      n = n > OBS_MAX_THREADS ? n : n * 10 + (uint32_t)(*e - '0');
    if (!*e && n >= 1) return n > OBS_MAX_THREADS ? OBS_MAX_THREADS : n;
  }
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  return online >= 2 ? 2 : 1;
}

/* The widest copy of the observation this CPU (and its OS) runs, lowered
 * by PVL_CPU_ISA = generic or avx2: the copies give bit-identical results,
 * and the knob lets tests and benchmarks check that and compare speeds. */
static cpu_isa cpu_isa_setting(void) {
  cpu_isa best = CPU_ISA_GENERIC;
#if OBS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = CPU_ISA_AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    best = CPU_ISA_AVX512;
#endif
  const char *s = getenv("PVL_CPU_ISA");
  cpu_isa want = best;
  if (s && !strcmp(s, "generic")) want = CPU_ISA_GENERIC;
  if (s && !strcmp(s, "avx2")) want = CPU_ISA_AVX2;
  return want < best ? want : best;
}

static pvl_status cpu_init(pvl_cache *c) {
  if (c->cfg.num_blocks == 0)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "num_blocks = 0: the CPU backend needs an explicit pool "
                    "size");
  size_t bytes;
  if (!pvl__mul_ok(c->block_bytes, c->cfg.num_blocks, &bytes))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "%u blocks of %zu bytes overflow size_t", c->cfg.num_blocks,
                    c->block_bytes);
  cpu_state *cs = pvl__alloc(c->alloc, sizeof(*cs));
  if (!cs) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "CPU backend state");
  cs->threads = cpu_threads();
  cs->isa = cpu_isa_setting();
  c->storage = pvl__alloc_aligned(c->alloc, bytes, 64);
  if (!c->storage) {
    pvl__free(c->alloc, cs, sizeof(*cs));
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "pool storage of %zu bytes", bytes);
  }
  c->be_state = cs;
  return PVL_SUCCESS;
}

static int cpu_available(int32_t device) {
  (void)device;
  return 1;
}

static void cpu_fini(pvl_cache *c) {
  pvl__free_aligned(c->alloc, c->storage,
                    c->block_bytes * c->cfg.num_blocks, 64);
  c->storage = NULL;
  pvl__free(c->alloc, c->be_state, sizeof(cpu_state));
  c->be_state = NULL;
}

static pvl_status cpu_copy_blocks(pvl_cache *c, const int32_t *src,
                                  const int32_t *dst, uint32_t n,
                                  void *stream) {
  (void)stream;
  char *base = c->storage;
  for (uint32_t i = 0; i < n; i++)
    memcpy(base + (size_t)dst[i] * c->block_bytes,
           base + (size_t)src[i] * c->block_bytes, c->block_bytes);
  return PVL_SUCCESS;
}

/* Copies one token's K and V rows (all heads) between two pool slots. */
static void copy_token(pvl_cache *c, int64_t sb, int32_t so, int64_t db,
                       int32_t dof) {
  char *base = c->storage;
  const size_t row = (size_t)c->geom.head_dim * c->elem_size;
  for (int kv = 0; kv < 2; kv++)
    for (int32_t h = 0; h < c->geom.num_kv_heads; h++)
      memcpy(base + slot_offset(c, db, kv, h, dof),
             base + slot_offset(c, sb, kv, h, so), row);
}

static pvl_status cpu_gather(pvl_cache *c, const int64_t *src_slots,
                             const int32_t *dst_blocks, uint32_t n,
                             void *stream) {
  (void)stream;
  const int32_t bs = c->geom.block_size;
  for (uint32_t i = 0; i < n; i++)
    copy_token(c, src_slots[i] / bs, (int32_t)(src_slots[i] % bs),
               dst_blocks[i / (uint32_t)bs], (int32_t)(i % (uint32_t)bs));
  return PVL_SUCCESS;
}

/* Token-major rows [n][num_kv_heads][head_dim] <-> pool slots. */
static void token_io(const pvl_cache *c, int64_t block, int32_t off,
                     char *rows_k, char *rows_v, uint32_t t, bool to_pool) {
  char *base = c->storage;
  const size_t row = (size_t)c->geom.head_dim * c->elem_size;
  for (int32_t h = 0; h < c->geom.num_kv_heads; h++) {
    size_t r = ((size_t)t * c->geom.num_kv_heads + h) * row;
    char *pk = base + slot_offset(c, block, 0, h, off);
    char *pv = base + slot_offset(c, block, 1, h, off);
    if (to_pool) {
      memcpy(pk, rows_k + r, row);
      memcpy(pv, rows_v + r, row);
    } else {
      memcpy(rows_k + r, pk, row);
      memcpy(rows_v + r, pv, row);
    }
  }
}

static pvl_status cpu_write_range(pvl_cache *c, const int32_t *blocks,
                                  uint32_t first, uint32_t n, const void *k,
                                  const void *v, void *stream) {
  (void)stream;
  const uint32_t bs = (uint32_t)c->geom.block_size;
  for (uint32_t t = 0; t < n; t++) {
    uint32_t p = first + t;
    token_io(c, blocks[p / bs], (int32_t)(p % bs), (char *)k, (char *)v, t,
             true);
  }
  return PVL_SUCCESS;
}

static pvl_status cpu_read_range(const pvl_cache *c, const int32_t *blocks,
                                 uint32_t first, uint32_t n, void *k, void *v,
                                 void *stream) {
  (void)stream;
  const uint32_t bs = (uint32_t)c->geom.block_size;
  for (uint32_t t = 0; t < n; t++) {
    uint32_t p = first + t;
    token_io(c, blocks[p / bs], (int32_t)(p % bs), k, v, t, false);
  }
  return PVL_SUCCESS;
}

/* ---- plans: on the CPU the plan buffer is host memory ---- */

static size_t plan_buf_bytes(const pvl_plan *p) {
  return (size_t)pvl_plan_buf_elems(p->view.num_layers, p->view.max_seqs,
                                    p->view.block_cap) *
         sizeof(int32_t);
}

static pvl_status cpu_plan_init(pvl_plan *p) {
  size_t bytes = plan_buf_bytes(p);
  p->host_buf = pvl__alloc_aligned(p->cache->alloc, bytes, 64);
  if (!p->host_buf)
    return PVL_FAIL(p->cache, PVL_ERR_NO_MEMORY, "plan buffer of %zu bytes",
                    bytes);
  memset(p->host_buf, 0, bytes);
  p->view.buf = p->host_buf;
  return PVL_SUCCESS;
}

static void cpu_plan_fini(pvl_plan *p) {
  pvl__free_aligned(p->cache->alloc, p->host_buf, plan_buf_bytes(p), 64);
  p->host_buf = NULL;
  p->view.buf = NULL;
}

static pvl_status cpu_plan_upload(pvl_plan *p, const int32_t *pairs,
                                  uint32_t n, void *stream) {
  (void)stream;
  for (uint32_t i = 0; i < n; i++) p->host_buf[pairs[2 * i]] = pairs[2 * i + 1];
  return PVL_SUCCESS;
}

/* Row b of `layer` as the kernels see it: length and block ids. */
static void plan_row(const pvl_plan *p, uint32_t layer, uint32_t b,
                     int32_t *len, const int32_t **ids) {
  const pvl_plan_view *v = &p->view;
  const int32_t *buf = v->buf;
  *len = buf[pvl_plan_base_len_index(v, (int32_t)layer, (int32_t)b)] +
         buf[pvl_plan_n_appended_index(v, (int32_t)b)];
  *ids = buf + pvl_plan_block_ids_index(v, (int32_t)layer) +
         buf[pvl_plan_row_offset_index(v, (int32_t)layer, (int32_t)b)];
}

static pvl_status cpu_plan_kv_write(pvl_plan *p, uint32_t layer,
                                    const void *k, const void *v,
                                    void *stream) {
  (void)stream;
  pvl_cache *c = p->cache;
  const int32_t bs = c->geom.block_size;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    int32_t last = len - 1;
    token_io(c, ids[last / bs], last % bs, (char *)k, (char *)v, b, true);
  }
  return PVL_SUCCESS;
}

/* Reference decode attention. For each (sequence, KV head), every query
 * head of the GQA group: scores s_j = scale * (q . k_j) over the row's slots,
 * then out = sum_j softmax(s)_j v_j. Plain two-pass softmax; the exp sums and
 * the weighted sums are accumulated in double, so the oracle's own rounding
 * is negligible next to the kernels' fp32. K and V rows are converted once
 * per group, not once per query head. */
static pvl_status cpu_attention(pvl_plan *p, uint32_t layer, const void *q,
                                void *out, float scale, void *stream) {
  (void)stream;
  pvl_cache *c = p->cache;
  const pvl_kv_geom *g = &c->geom;
  const int32_t d = g->head_dim, bs = g->block_size, hkv = g->num_kv_heads;
  const int32_t hq = (int32_t)c->cfg.num_q_heads, grp = hq / hkv;
  const pvl_dtype dt = c->cfg.dtype;
  const char *base = c->storage;

  int32_t max_len = 0;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    if (len > max_len) max_len = len;
  }
  /* acc [grp][d] and sum [grp] doubles, then scores [grp][max_len],
   * q [grp][d], k [d], v [d] floats. */
  const size_t nd = (size_t)grp * d;
  size_t bytes = (nd + (size_t)grp) * sizeof(double) +
                 ((size_t)grp * max_len + nd + 2 * (size_t)d) * sizeof(float);
  double *acc = pvl__scratch(c, bytes);
  if (!acc)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "attention scratch (%zu bytes)",
                    bytes);
  double *sum = acc + nd;
  float *scores = (float *)(sum + grp);
  float *qf = scores + (size_t)grp * max_len, *kf = qf + nd, *vf = kf + d;

  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    for (int32_t kvh = 0; kvh < hkv; kvh++) {
      const size_t q0 = ((size_t)b * hq + (size_t)kvh * grp) * d;
      pvl__load_f32(dt, (const char *)q + q0 * c->elem_size, qf, nd);
      for (int32_t j = 0; j < len; j++) {
        pvl__load_f32(dt, base + slot_offset(c, ids[j / bs], 0, kvh, j % bs),
                      kf, (size_t)d);
        for (int32_t i = 0; i < grp; i++)
          scores[(size_t)i * max_len + j] =
              dot_f32(qf + (size_t)i * d, kf, d) * scale;
      }
      for (int32_t i = 0; i < grp; i++) {
        float mx = -INFINITY;
        for (int32_t j = 0; j < len; j++)
          if (scores[(size_t)i * max_len + j] > mx)
            mx = scores[(size_t)i * max_len + j];
        sum[i] = 0.0;
        for (int32_t j = 0; j < len; j++) {
          float *s = &scores[(size_t)i * max_len + j];
          double w = exp((double)*s - (double)mx);
          *s = (float)w;
          sum[i] += w;
        }
      }
      for (size_t e = 0; e < nd; e++) acc[e] = 0.0;
      for (int32_t j = 0; j < len; j++) {
        pvl__load_f32(dt, base + slot_offset(c, ids[j / bs], 1, kvh, j % bs),
                      vf, (size_t)d);
        for (int32_t i = 0; i < grp; i++) {
          double w = scores[(size_t)i * max_len + j];
          for (int32_t e = 0; e < d; e++) acc[(size_t)i * d + e] += w * vf[e];
        }
      }
      for (int32_t i = 0; i < grp; i++)
        for (int32_t e = 0; e < d; e++)
          qf[(size_t)i * d + e] =
              len > 0 ? (float)(acc[(size_t)i * d + e] / sum[i]) : 0.0f;
      pvl__store_f32(dt, qf, (char *)out + q0 * c->elem_size, nd);
    }
  }
  return PVL_SUCCESS;
}

/* ---- observation ----
 *
 * Reference observation (docs/design.md section 5, Eq. 1-2 and the scores).
 * H2O observes every prompt row (m x m causal pairs per query head), so this
 * reference has to be fast as well as exact: it is blocked for the caches,
 * written in explicit vectors (below) with fixed lanes for every
 * floating-point reduction, compiled for the widest ISA the CPU has, and
 * may use a few threads, all without changing a bit of the result (the
 * tests check it). Per observed row i and query head h, over the
 * keys j the row sees (position <= P_i: a prefix of the slots, since
 * positions ascend with them):
 *   s_j = (q . k_j, summed in float in element order) * scale;
 *   M = max_j s_j; below += #{j : (double)s_j < M + ln p}; total += #{j};
 *   e_j = exp(s_j - M) in float; Z = sum_j e_j in double;
 *   raw[j] += e_j * (1 / Z) in double.
 * These are the header's two passes (row max and sum of exponentials, then
 * probabilities, per-key sums and threshold counts); the logits of a batch
 * of at most OBS_RB rows are kept between them, so each dot product is
 * computed once. Memory per thread: O((OBS_RB x group + head_dim) x keys),
 * never rows x keys. */

#define OBS_KT 16 /* keys per tile of the transposed K */
#define OBS_QB 4  /* query vectors per micro-kernel call */
#define OBS_RB 16 /* rows per logits batch, at most */
/* Rows per unit of work. A unit's rows add into a private per-key buffer,
 * and the units' buffers add into raw in unit order whatever the number of
 * threads, so the result is bit-identical for any thread count. It does
 * depend on this constant (as on how the caller chunks its rows). */
#define OBS_UR 128
/* A thread is started only for at least this many multiply-adds of its own
 * (about a millisecond): a start costs tens of microseconds. */
#define OBS_WORK_PER_THREAD ((uint64_t)1 << 24)
/* Floats of a batch's logits at most: the batch has fewer rows when rows
 * are long, so that it stays in the core's cache between the passes. */
#define OBS_LG_FLOATS ((size_t)1 << 16)

/* The hot loops use GCC/Clang vector extensions: lane-wise IEEE operations
 * that the compiler maps to whatever SIMD the target has (pieces of SSE2 on
 * plain x86-64), at any optimization level and without -ffast-math. Being
 * lane-wise, each lane's result is the scalar expression's, whatever the
 * hardware vector width; every reduction runs in OBS_W lanes combined in
 * lane order, so the results do not depend on the target either. */
#define OBS_W 8 /* lanes of the row passes */
/* Inlined into each ISA's copy of obs_unit (below), so that copy compiles
 * them for its ISA. */
#define OBS_INLINE static inline __attribute__((always_inline))
/* No contraction of a * b + c into FMA, which would round differently in
 * the FMA copies: GCC does not contract in ISO C mode (the library's
 * -std=c11), Clang does unless told here. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
/* GCC and Clang note that passing wide vectors by value would change the
 * ABI without AVX; these helpers are static and inlined, so no ABI is
 * involved. */
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wunknown-warning-option"
#pragma clang diagnostic ignored "-Wpsabi"
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float obs_vk __attribute__((vector_size(OBS_KT * sizeof(float))));
typedef int32_t obs_vki __attribute__((vector_size(OBS_KT * sizeof(int32_t))));
typedef uint32_t obs_vku
    __attribute__((vector_size(OBS_KT * sizeof(uint32_t))));
typedef float obs_vf __attribute__((vector_size(OBS_W * sizeof(float))));
typedef int32_t obs_vi __attribute__((vector_size(OBS_W * sizeof(int32_t))));
typedef uint32_t obs_vu __attribute__((vector_size(OBS_W * sizeof(uint32_t))));
/* Doubles go by half rows of OBS_W / 2 lanes (32 bytes, which AVX2 has:
 * GCC would split wider vectors through memory), or whole rows of OBS_W on
 * AVX-512. */
typedef float obs_vh __attribute__((vector_size(OBS_W / 2 * sizeof(float))));
typedef double obs_vd __attribute__((vector_size(OBS_W / 2 * sizeof(double))));
typedef double obs_vd8 __attribute__((vector_size(OBS_W * sizeof(double))));
typedef uint16_t obs_vs __attribute__((vector_size(OBS_W * sizeof(uint16_t))));

/* Lanes of a where m is set (all ones), else of b. */
OBS_INLINE obs_vf obs_sel(obs_vi m, obs_vf a, obs_vf b) {
  return (obs_vf)((m & (obs_vi)a) | (~m & (obs_vi)b));
}

/* expf for the arguments met here (x = s - M <= 0, or NaN): Cody-Waite
 * reduction and the Cephes polynomial (relative error about 1e-7), without
 * calls or branches (glibc's expf is a call per element). Results under
 * FLT_MIN (x < ln FLT_MIN, -Inf included) are 0; NaN stays NaN (every
 * comparison with it is false). 2^n comes from the integer n in [-126, 0]
 * held in t's low mantissa bits (for NaN the bits mean nothing, and y is
 * NaN anyway), in unsigned arithmetic: no float-to-int conversion, no
 * signed overflow. Defined for 8 lanes and for 16 (AVX-512), lane by lane
 * the same. */
#define OBS_DEFINE_EXP(NAME, VF, VI, VU)                                       \
  OBS_INLINE VF NAME(VF x) {                                                   \
    const VF zero = {0};                                                       \
    const VF lo = zero + -87.33654475f; /* ln(FLT_MIN) */                      \
    const float shift = 12582912.0f;    /* 1.5 * 2^23: + rounds to int */      \
    const VI under = x < lo;                                                   \
    const VF xc = (VF)((under & (VI)lo) | (~under & (VI)x));                   \
    const VF t = xc * 1.44269504089f + shift;                                  \
    const VF n = t - shift;                                                    \
    VF r = xc - n * 0.693359375f;                                              \
    r = r - n * -2.12194440e-4f;                                               \
    VF p = zero + 1.9875691500e-4f;                                            \
    p = p * r + 1.3981999507e-3f;                                              \
    p = p * r + 8.3334519073e-3f;                                              \
    p = p * r + 4.1665795894e-2f;                                              \
    p = p * r + 1.6666665459e-1f;                                              \
    p = p * r + 5.0000001201e-1f;                                              \
    const VF y = p * (r * r) + r + 1.0f;                                       \
    const VU bits = ((VU)t - 0x4B400000u + 127u) << 23;                        \
    return (VF)(~under & (VI)(y * (VF)bits));                                  \
  }
OBS_DEFINE_EXP(obs_exp, obs_vf, obs_vi, obs_vu)
OBS_DEFINE_EXP(obs_exp16, obs_vk, obs_vki, obs_vku)

/* Tail masks: OBS_KT - r entries from index r hold r leading all-ones
 * lanes. Loaded rather than computed: GCC 12 turns a comparison of a
 * constant lane-index vector into one scalar comparison per lane. */
static const int32_t obs_mask_tab[2 * OBS_KT] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};

/* out[x][jj] = (q_x . k_jj) * scale for OBS_QB query vectors (q, stride d)
 * and the OBS_KT keys of a transposed tile kt[e][jj]: each logit summed in
 * element order, as a plain loop would, in accumulators that stay in
 * registers while the tile streams through. V is the vector type (lanes
 * dividing OBS_KT) and NQ the queries at a time: as many accumulators as
 * the ISA has registers for (AVX-512: 4 of 16 lanes; AVX2: 8 of 8; SSE2 and
 * NEON: 8 of 4). The same operations lane by lane for any V. */
#define OBS_TILE_BODY(V, NQ)                                                   \
  do {                                                                         \
    enum { NV = OBS_KT / (int)(sizeof(V) / sizeof(float)) };                   \
    for (int x0 = 0; x0 < OBS_QB; x0 += (NQ)) {                                \
      V a[NQ][NV];                                                             \
      for (int x = 0; x < (NQ); x++)                                           \
        for (int h = 0; h < NV; h++) a[x][h] = (V){0};                         \
      for (int32_t e = 0; e < d; e++) {                                        \
        V k[NV];                                                               \
        for (int h = 0; h < NV; h++)                                           \
          memcpy(&k[h], kt + (size_t)e * OBS_KT + h * (OBS_KT / NV),           \
                 sizeof(V));                                                   \
        for (int x = 0; x < (NQ); x++) {                                       \
          const float qe = q[(size_t)(x0 + x) * d + e];                        \
          for (int h = 0; h < NV; h++) a[x][h] += qe * k[h];                   \
        }                                                                      \
      }                                                                        \
      for (int x = 0; x < (NQ); x++)                                           \
        for (int h = 0; h < NV; h++) {                                         \
          const V o = a[x][h] * scale;                                         \
          memcpy(out + (size_t)(x0 + x) * ld + h * (OBS_KT / NV), &o,          \
                 sizeof(V));                                                   \
        }                                                                      \
    }                                                                          \
  } while (0)

/* isa: 2 AVX-512, 1 AVX2, 0 anything else (a constant once inlined). */
OBS_INLINE void obs_tile(const float *q, const float *kt, int32_t d,
                         float scale, float *out, size_t ld, const int isa) {
  if (isa == 2)
    OBS_TILE_BODY(obs_vk, 4);
  else if (isa == 1)
    OBS_TILE_BODY(obs_vf, 4);
  else
    OBS_TILE_BODY(obs_vh, 2);
}

/* The smallest float >= t: for a float v, v < t exactly when v < it (no
 * float lies strictly between t and it), so the threshold test of Eq. 1,
 * (double)s < M + ln p, runs on floats. */
static inline float obs_float_ceil(double t) {
  float f = (float)t;
  return (double)f < t ? nextafterf(f, INFINITY) : f;
}

/* One row's statistics from its n > 0 logits s[0..n) (s holds whole
 * OBS_KT-float vectors up to n): adds the entries below M + ln p to *below,
 * replaces s by e = exp(s - M) (0 past n) and returns Z. Element j adds to
 * lane j % OBS_W of Z and the lanes add up in order at the end, whether the
 * exponentials come 8 or 16 at a time and the lanes of Z are one vector
 * (AVX-512) or two halves: the same sums. */
OBS_INLINE double obs_row(float *s, uint32_t n, float log_p, uint64_t *below,
                          const int isa) {
  const obs_vf ninf = (obs_vf){0} - INFINITY;
  const uint32_t nf = n / OBS_W * OBS_W; /* whole vectors; the tail masks */
  obs_vf mv = ninf, v;
  for (uint32_t j = 0; j < nf; j += OBS_W) {
    memcpy(&v, s + j, sizeof(v));
    mv = obs_sel(v > mv, v, mv);
  }
  if (nf < n) {
    obs_vi ok;
    memcpy(&ok, obs_mask_tab + OBS_KT - (n - nf), sizeof(ok));
    memcpy(&v, s + nf, sizeof(v));
    v = obs_sel(ok, v, ninf);
    mv = obs_sel(v > mv, v, mv);
  }
  float m = -INFINITY;
  for (int u = 0; u < OBS_W; u++) m = mv[u] > m ? mv[u] : m;

  const float thr = obs_float_ceil((double)m + (double)log_p);
  int64_t cs = 0;
  double zl[OBS_W];
  if (isa == 2) {
    obs_vki cnt = {0};
    obs_vd8 z = {0};
    for (uint32_t j = 0; j < n; j += OBS_KT) {
      const uint32_t left = n - j < OBS_KT ? n - j : OBS_KT;
      obs_vki ok;
      obs_vk v16;
      memcpy(&ok, obs_mask_tab + OBS_KT - left, sizeof(ok));
      memcpy(&v16, s + j, sizeof(v16));
      const obs_vk e = (obs_vk)((obs_vki)obs_exp16(v16 - m) & ok);
      cnt -= (v16 < thr) & ok;
      memcpy(s + j, &e, sizeof(e));
      for (int h = 0; h < OBS_KT / OBS_W; h++) {
        obs_vf eh;
        memcpy(&eh, s + j + h * OBS_W, sizeof(eh));
        z += __builtin_convertvector(eh, obs_vd8);
      }
    }
    for (int u = 0; u < OBS_KT; u++) cs += cnt[u];
    memcpy(zl, &z, sizeof(zl));
  } else {
    obs_vi cnt = {0};
    obs_vd z[2] = {{0}, {0}};
    for (uint32_t j = 0; j < n; j += OBS_W) {
      const uint32_t left = n - j < OBS_W ? n - j : OBS_W;
      obs_vi ok;
      memcpy(&ok, obs_mask_tab + OBS_KT - left, sizeof(ok));
      memcpy(&v, s + j, sizeof(v));
      const obs_vf e = (obs_vf)((obs_vi)obs_exp(v - m) & ok);
      cnt -= (v < thr) & ok;
      memcpy(s + j, &e, sizeof(e));
      for (int h = 0; h < 2; h++) {
        obs_vh eh;
        memcpy(&eh, s + j + h * (OBS_W / 2), sizeof(eh));
        z[h] += __builtin_convertvector(eh, obs_vd);
      }
    }
    for (int u = 0; u < OBS_W; u++) cs += cnt[u];
    for (int h = 0; h < 2; h++)
      memcpy(zl + h * (OBS_W / 2), &z[h], sizeof(z[h]));
  }
  double zs = 0.0;
  for (int u = 0; u < OBS_W; u++) zs += zl[u];
  *below += (uint64_t)cs;
  return zs;
}

/* part[j] += e[j] * inv for j < n (whole vectors; lanes past n add
 * nothing, even when inv is not finite). */
OBS_INLINE void obs_add(double *part, const float *e, uint32_t n, double inv,
                        const int isa) {
  const uint32_t w = isa == 2 ? OBS_W : OBS_W / 2;
  const uint32_t nf = n / w * w;
  uint32_t j = 0;
  if (isa == 2) {
    for (; j < nf; j += OBS_W) {
      obs_vf v;
      obs_vd8 acc;
      memcpy(&v, e + j, sizeof(v));
      memcpy(&acc, part + j, sizeof(acc));
      acc += __builtin_convertvector(v, obs_vd8) * inv;
      memcpy(part + j, &acc, sizeof(acc));
    }
  } else {
    for (; j < nf; j += OBS_W / 2) {
      obs_vh v;
      obs_vd acc;
      memcpy(&v, e + j, sizeof(v));
      memcpy(&acc, part + j, sizeof(acc));
      acc += __builtin_convertvector(v, obs_vd) * inv;
      memcpy(part + j, &acc, sizeof(acc));
    }
  }
  for (; j < n; j++) part[j] += (double)e[j] * inv;
}

/* n elements of the cache dtype at src as floats, the same values as
 * pvl__load_f32 (dtype.c), but vectorized: a unit converts every key it
 * reads, and f16 is the default dtype. */
OBS_INLINE void obs_load(pvl_dtype dt, const void *src, float *dst, size_t n) {
  if (dt == PVL_DTYPE_F32) {
    memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t *h16 = src;
  size_t i = 0;
  for (; i + OBS_W <= n; i += OBS_W) {
    obs_vs hv;
    memcpy(&hv, h16 + i, sizeof(hv));
    const obs_vu h = __builtin_convertvector(hv, obs_vu);
    obs_vu out;
    if (dt == PVL_DTYPE_BF16) {
      out = h << 16;
    } else {
      /* As pvl__f16_to_f32: Inf/NaN, zero or subnormal (man * 2^-24, a
       * normal float), normal. */
      const obs_vu sign = (h & 0x8000u) << 16;
      const obs_vu ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
      const obs_vu normal = sign | ((ex + 112u) << 23) | (man << 13);
      const obs_vu special = sign | 0x7f800000u | (man << 13);
      const obs_vf sub =
          __builtin_convertvector((obs_vi)man, obs_vf) * (1.0f / 16777216.0f);
      const obs_vu subn = (obs_vu)sub | sign;
      const obs_vu is_sp = (obs_vu)(ex == 0x1fu), is_sub = (obs_vu)(ex == 0u);
      out = (is_sp & special) | (is_sub & subn) | (~(is_sp | is_sub) & normal);
    }
    memcpy(dst + i, &out, sizeof(out));
  }
  for (; i < n; i++)
    dst[i] = dt == PVL_DTYPE_BF16 ? pvl__bf16_to_f32(h16[i])
                                  : pvl__f16_to_f32(h16[i]);
}

/* One thread's buffers, carved from the cache's scratch. */
typedef struct obs_ws {
  float *kt;       /* [ld / OBS_KT][d][OBS_KT] the unit's keys, transposed */
  float *qf;       /* [nqp][d] a batch's query vectors */
  float *lg;       /* [nqp][ld] their logits, then exponentials */
  uint64_t *below; /* [hq] */
  uint64_t *total; /* [hq] */
} obs_ws;

/* One call's work. Threads claim units in order and sum each into a slot of
 * a ring; the finished units are added into raw strictly in unit order,
 * under the lock, by whichever thread completes the next one. A unit waits
 * for its slot until the unit S before it has been added, so a thread that
 * is descheduled holds up the others by at most S units, never a barrier
 * per round (on a loaded machine, rounds kept every thread waiting for the
 * slowest). */
typedef struct obs_job {
  const pvl_cache *c;
  const pvl_table *t;
  const char *q;       /* [n_rows][hq][d] in the cache dtype */
  const uint32_t *vis; /* [n_rows] keys row r sees (nondecreasing) */
  uint32_t n_rows, n_units, n_threads, rb;
  float scale, log_p;
  size_t ld; /* logits row stride: the most keys, rounded up to OBS_KT */
  obs_ws *ws;
  double *raw;
  uint32_t (*unit)(const struct obs_job *, obs_ws *, uint32_t, double *);
  /* The ring: slot u % ring_n holds unit u's sums (ring_stride bytes). */
  char *ring;
  size_t ring_stride;
  uint32_t ring_n;
  uint32_t *slot_nv;  /* [ring_n] keys the slot's unit covered */
  uint8_t *done;      /* [ring_n] the slot's unit is finished */
  uint32_t next;      /* next unit to claim */
  uint32_t added;     /* units added into raw */
  int go;             /* workers: 0 wait, 1 run, -1 leave */
  pthread_mutex_t mu; /* guards next, added, done, slot_nv, go and raw */
  pthread_cond_t cv;
} obs_job;

/* Unit u: rows [chunk * OBS_UR, + OBS_UR) of KV head kvh, u = chunk * hkv +
 * kvh (chunk-major: units that follow each other see about as many keys).
 * Sums into part[0 .. returned count). */
OBS_INLINE uint32_t obs_unit_body(const obs_job *jb, obs_ws *ws, uint32_t u,
                                  double *part, const int isa) {
  const pvl_cache *c = jb->c;
  const pvl_kv_geom *g = &c->geom;
  const int32_t d = g->head_dim, hkv = g->num_kv_heads;
  const uint32_t bs = (uint32_t)g->block_size;
  const int32_t hq = (int32_t)c->cfg.num_q_heads, grp = hq / hkv;
  const int32_t kvh = (int32_t)(u % (uint32_t)hkv);
  const uint32_t r0 = (u / (uint32_t)hkv) * OBS_UR;
  const uint32_t r1 = jb->n_rows - r0 < OBS_UR ? jb->n_rows : r0 + OBS_UR;
  const uint32_t nv = jb->vis[r1 - 1];
  if (nv == 0) return 0;

  /* The unit's keys, converted once and transposed by tiles; the slots past
   * the last key are zeros (their logits are never read). */
  const char *base = c->storage;
  const uint32_t ntile = (nv + OBS_KT - 1) / OBS_KT;
  float *krow = ws->qf; /* unused until the first batch */
  for (uint32_t j = 0; j < ntile * OBS_KT; j++) {
    if (j < nv)
      obs_load(c->cfg.dtype,
               base + slot_offset(c, jb->t->blocks[j / bs], 0, kvh,
                                  (int32_t)(j % bs)),
               krow, (size_t)d);
    float *dst = ws->kt + (size_t)(j / OBS_KT) * d * OBS_KT + j % OBS_KT;
    for (int32_t e = 0; e < d; e++)
      dst[(size_t)e * OBS_KT] = j < nv ? krow[e] : 0.0f;
  }
  for (uint32_t j = 0; j < ntile * OBS_KT; j++) part[j] = 0.0;

  for (uint32_t b0 = r0; b0 < r1; b0 += jb->rb) {
    const uint32_t nr = r1 - b0 < jb->rb ? r1 - b0 : jb->rb;
    const uint32_t nq = nr * (uint32_t)grp;
    const uint32_t nqp = (nq + OBS_QB - 1) / OBS_QB * OBS_QB;
    for (uint32_t r = 0; r < nr; r++) {
      const size_t src = ((size_t)(b0 + r) * hq + (size_t)kvh * grp) * d;
      obs_load(c->cfg.dtype, jb->q + src * c->elem_size,
               ws->qf + (size_t)r * grp * d, (size_t)grp * d);
    }
    for (size_t i = (size_t)nq * d; i < (size_t)nqp * d; i++) ws->qf[i] = 0;
    /* Logits up to the batch's last row's keys; each row reads its own. */
    const uint32_t nt = (jb->vis[b0 + nr - 1] + OBS_KT - 1) / OBS_KT;
    for (uint32_t tl = 0; tl < nt; tl++) {
      const float *kt = ws->kt + (size_t)tl * d * OBS_KT;
      for (uint32_t x = 0; x < nqp; x += OBS_QB)
        obs_tile(ws->qf + (size_t)x * d, kt, d, jb->scale,
                 ws->lg + (size_t)x * jb->ld + (size_t)tl * OBS_KT, jb->ld,
                 isa);
    }
    for (uint32_t r = 0; r < nr; r++) {
      const uint32_t n = jb->vis[b0 + r];
      if (n == 0) continue;
      for (int32_t i = 0; i < grp; i++) {
        const int32_t h = kvh * grp + i;
        float *s = ws->lg + ((size_t)r * grp + (size_t)i) * jb->ld;
        const double inv = 1.0 / obs_row(s, n, jb->log_p, &ws->below[h], isa);
        ws->total[h] += n;
        obs_add(part, s, n, inv, isa);
      }
    }
  }
  return nv;
}

/* obs_unit_body compiled for each ISA the machine may have: the vector
 * code maps to SSE2 on plain x86-64, which has too few registers for the
 * accumulators; the wider ISAs run the same lane-wise operations in fewer
 * instructions, with bit-identical results (no FMA contraction, above). */
static uint32_t obs_unit_generic(const obs_job *jb, obs_ws *ws, uint32_t u,
                                 double *part) {
  return obs_unit_body(jb, ws, u, part, 0);
}
#if OBS_X86
__attribute__((target("avx2"))) static uint32_t
obs_unit_avx2(const obs_job *jb, obs_ws *ws, uint32_t u, double *part) {
  return obs_unit_body(jb, ws, u, part, 1);
}
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw"))) static uint32_t
obs_unit_avx512(const obs_job *jb, obs_ws *ws, uint32_t u, double *part) {
  return obs_unit_body(jb, ws, u, part, 2);
}
#endif

static void obs_lock(obs_job *jb) {
  if (jb->n_threads > 1) pthread_mutex_lock(&jb->mu);
}
static void obs_unlock(obs_job *jb) {
  if (jb->n_threads > 1) pthread_mutex_unlock(&jb->mu);
}

/* Thread tid of the call: claims units until none is left (see obs_job). */
static void obs_run(obs_job *jb, uint32_t tid) {
  const uint32_t S = jb->ring_n;
  for (;;) {
    obs_lock(jb);
    if (jb->next == jb->n_units) {
      obs_unlock(jb);
      return;
    }
    const uint32_t u = jb->next++;
    while (u >= S && jb->added <= u - S) pthread_cond_wait(&jb->cv, &jb->mu);
    obs_unlock(jb);
    double *part = (double *)(jb->ring + (size_t)(u % S) * jb->ring_stride);
    const uint32_t nv = jb->unit(jb, &jb->ws[tid], u, part);
    obs_lock(jb);
    jb->slot_nv[u % S] = nv;
    jb->done[u % S] = 1;
    while (jb->added < jb->n_units && jb->done[jb->added % S]) {
      const uint32_t sl = jb->added % S;
      const double *p =
          (const double *)(jb->ring + (size_t)sl * jb->ring_stride);
      for (uint32_t j = 0; j < jb->slot_nv[sl]; j++) jb->raw[j] += p[j];
      jb->done[sl] = 0;
      jb->added++;
    }
    if (jb->n_threads > 1) pthread_cond_broadcast(&jb->cv);
    obs_unlock(jb);
  }
}

typedef struct obs_worker {
  obs_job *jb;
  uint32_t tid;
} obs_worker;

/* Workers wait until the number of threads is settled (some may fail to
 * start): go < 0 tells them to leave without running. */
static void *obs_worker_main(void *arg) {
  obs_worker *w = arg;
  pthread_mutex_lock(&w->jb->mu);
  while (w->jb->go == 0) pthread_cond_wait(&w->jb->cv, &w->jb->mu);
  const int go = w->jb->go;
  pthread_mutex_unlock(&w->jb->mu);
  if (go > 0) obs_run(w->jb, w->tid);
  return NULL;
}

/* Runs the job on up to `want` threads, the caller's included, started for
 * this call and joined before it returns (no state outlives the call). A
 * thread that cannot start only means fewer threads: the result does not
 * depend on their number. */
static void obs_parallel(obs_job *jb, uint32_t want) {
  pthread_t th[OBS_MAX_THREADS];
  obs_worker wk[OBS_MAX_THREADS];
  jb->n_threads = 1;
  if (want > 1 && pthread_mutex_init(&jb->mu, NULL) == 0) {
    if (pthread_cond_init(&jb->cv, NULL) == 0) {
      uint32_t started = 0;
      jb->go = 0;
      for (uint32_t i = 1; i < want; i++) {
        wk[i] = (obs_worker){jb, i};
        if (pthread_create(&th[i], NULL, obs_worker_main, &wk[i]) != 0) break;
        started++;
      }
      pthread_mutex_lock(&jb->mu);
      jb->n_threads = started + 1;
      jb->go = 1;
      pthread_cond_broadcast(&jb->cv);
      pthread_mutex_unlock(&jb->mu);
      obs_run(jb, 0);
      for (uint32_t i = 1; i <= started; i++) pthread_join(th[i], NULL);
      pthread_cond_destroy(&jb->cv);
      pthread_mutex_destroy(&jb->mu);
      return;
    }
    pthread_mutex_destroy(&jb->mu);
  }
  obs_run(jb, 0);
}

/* Whether the n elements of dtype dt at src are all finite, from their
 * bits (an all-ones exponent is Inf or NaN): no conversion, so checking the
 * queries costs little next to observing them. */
static bool obs_finite(pvl_dtype dt, const void *src, size_t n) {
  uint32_t bad = 0;
  if (dt == PVL_DTYPE_F32) {
    const uint32_t *u = src;
    for (size_t i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t *u = src;
    const uint16_t ex = dt == PVL_DTYPE_F16 ? 0x7c00u : 0x7f80u;
    for (size_t i = 0; i < n; i++) bad |= (u[i] & ex) == ex;
  }
  return !bad;
}

/* Bytes rounded up to 64, so the carved buffers stay cache-line aligned. */
static inline size_t obs_al(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static pvl_status cpu_observe(pvl_cache *c, const pvl_table *t, const void *q,
                              uint32_t first_pos, uint32_t n_rows, float scale,
                              float log_p, pvl_obs *obs, void *stream) {
  (void)stream;
  const pvl_kv_geom *g = &c->geom;
  const int32_t d = g->head_dim, hkv = g->num_kv_heads;
  const int32_t hq = (int32_t)c->cfg.num_q_heads, grp = hq / hkv;
  const pvl_dtype dt = c->cfg.dtype;
  const uint32_t n_keys = t->n_tokens;
  const cpu_state *cs = c->be_state;

  /* Keys each row sees: a prefix length, nondecreasing over the rows (rows
   * and key positions ascend). First only the largest and the work. */
  uint32_t nv_max = 0;
  uint64_t work = 0;
  for (uint32_t r = 0; r < n_rows; r++) {
    while (nv_max < n_keys &&
           (t->pos ? t->pos[nv_max] : nv_max) <= first_pos + r)
      nv_max++;
    work += nv_max;
  }
  work *= (uint64_t)hq * (uint64_t)d;
  const uint32_t n_units = (n_rows + OBS_UR - 1) / OBS_UR * (uint32_t)hkv;
  uint64_t want = work / OBS_WORK_PER_THREAD;
  if (want > cs->threads) want = cs->threads;
  if (want > n_units) want = n_units;
  if (want < 1) want = 1;

  /* Scratch: vis, the ring's flags and its 2 slots per thread (a thread
   * can start its next unit while its last waits to be added), then per
   * thread kt, qf, lg, below, total (sz_ws counts a thread's two slots). */
  const size_t ld = ((size_t)nv_max + OBS_KT - 1) / OBS_KT * OBS_KT;
  size_t rb = ld ? OBS_LG_FLOATS / ((size_t)grp * ld) : OBS_RB;
  rb = rb < 1 ? 1 : rb > OBS_RB ? OBS_RB : rb;
  const size_t nqp = (rb * (size_t)grp + OBS_QB - 1) / OBS_QB * OBS_QB;
  const size_t sz_kt = obs_al((ld ? ld : 1) * (size_t)d * sizeof(float));
  const size_t sz_qf = obs_al(nqp * (size_t)d * sizeof(float));
  const size_t sz_lg = obs_al(nqp * (ld ? ld : 1) * sizeof(float));
  const size_t sz_part = obs_al((ld ? ld : 1) * sizeof(double));
  const size_t sz_cnt = obs_al((size_t)hq * sizeof(uint64_t));
  const size_t sz_ws = sz_kt + sz_qf + sz_lg + 2 * sz_part + 2 * sz_cnt;
  const size_t sz_vis = obs_al((size_t)n_rows * sizeof(uint32_t));
  const uint32_t ring_n = 2 * (uint32_t)want;
  const size_t sz_ring = obs_al(ring_n * (sizeof(uint32_t) + 1));
  size_t bytes;
  if (!pvl__mul_ok(sz_ws, (size_t)want, &bytes) ||
      bytes > SIZE_MAX - sz_vis - sz_ring - 64)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY,
                    "observe scratch for %u keys overflows size_t", nv_max);
  bytes += sz_vis + sz_ring + 64;
  void *mem = pvl__scratch(c, bytes);
  if (!mem)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "observe scratch (%zu bytes)", bytes);
  char *p = (char *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
  uint32_t *vis = (uint32_t *)p;
  p += sz_vis;
  uint32_t *slot_nv = (uint32_t *)p;
  uint8_t *done = (uint8_t *)(slot_nv + ring_n);
  memset(done, 0, ring_n);
  p += sz_ring;
  char *ring = p;
  p += (size_t)ring_n * sz_part;
  obs_ws ws[OBS_MAX_THREADS];
  for (uint64_t w = 0; w < want; w++) {
    ws[w].kt = (float *)p;
    ws[w].qf = (float *)(p += sz_kt);
    ws[w].lg = (float *)(p += sz_qf);
    ws[w].below = (uint64_t *)(p += sz_lg);
    ws[w].total = (uint64_t *)(p += sz_cnt);
    p += sz_cnt;
    memset(ws[w].below, 0, (size_t)hq * sizeof(uint64_t));
    memset(ws[w].total, 0, (size_t)hq * sizeof(uint64_t));
  }

  /* A non-finite query turns every sum of its row into NaN: refuse it
   * before anything is accumulated, so the call changes nothing. (The CUDA
   * backend does not read q on the host; there the NaN sums make
   * pvl_compress refuse the observation instead.) */
  float *qrow = ws[0].qf; /* d floats at least */
  const size_t n_q = (size_t)n_rows * (size_t)hq * (size_t)d;
  const bool q_finite = obs_finite(dt, q, n_q);
  for (uint32_t r = 0; !q_finite && r < n_rows; r++) {
    for (int32_t h = 0; h < hq; h++) {
      const size_t src = ((size_t)r * hq + (size_t)h) * d;
      obs_load(dt, (const char *)q + src * c->elem_size, qrow, (size_t)d);
      for (int32_t e = 0; e < d; e++)
        if (!isfinite(qrow[e]))
          return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                          "q row %u (position %u), query head %d, element "
                          "%d is %g: queries must be finite",
                          r, first_pos + r, h, e, (double)qrow[e]);
    }
  }

  uint32_t v = 0;
  for (uint32_t r = 0; r < n_rows; r++) {
    while (v < n_keys && (t->pos ? t->pos[v] : v) <= first_pos + r) v++;
    vis[r] = v;
  }
  /* seen[j] += rows whose prefix covers j: the rows after the first one
   * that covers it (vis is nondecreasing). */
  for (uint32_t j = 0, r = 0; j < nv_max; j++) {
    while (vis[r] <= j) r++;
    obs->seen[j] += n_rows - r;
  }

  obs_job jb = {.c = c,
                .t = t,
                .q = q,
                .vis = vis,
                .n_rows = n_rows,
                .n_units = n_units,
                .rb = (uint32_t)rb,
                .scale = scale,
                .log_p = log_p,
                .ld = ld,
                .ws = ws,
                .raw = obs->raw,
                .unit = obs_unit_generic,
                .ring = ring,
                .ring_stride = sz_part,
                .ring_n = ring_n,
                .slot_nv = slot_nv,
                .done = done};
#if OBS_X86
  if (cs->isa == CPU_ISA_AVX2) jb.unit = obs_unit_avx2;
  if (cs->isa == CPU_ISA_AVX512) jb.unit = obs_unit_avx512;
#endif
  if (n_rows > 0) obs_parallel(&jb, (uint32_t)want);
  for (uint64_t w = 0; w < want; w++)
    for (int32_t h = 0; h < hq; h++) {
      obs->below[h] += ws[w].below[h];
      obs->total[h] += ws[w].total[h];
    }
  return PVL_SUCCESS;
}

/* Reference segmented top-k: the twin of kernels/select.cu. */
static pvl_status cpu_select_top(pvl_cache *c, const float *scores,
                                 const int32_t *seg_off, const int32_t *n_top,
                                 const int32_t *keep_off, uint32_t n_seg,
                                 uint32_t total, int32_t *keep,
                                 uint32_t total_keep, void *stream) {
  (void)stream;
  (void)total;
  (void)total_keep;
  for (uint32_t i = 0; i < n_seg; i++) {
    /* int32 and uint32 share a representation for these indices. */
    pvl_status st = pvl__top(c->alloc, scores + seg_off[i],
                             (uint32_t)(seg_off[i + 1] - seg_off[i]),
                             (uint32_t)n_top[i],
                             (uint32_t *)(keep + keep_off[i]));
    if (st != PVL_SUCCESS)
      return PVL_FAIL(c, st, "selection scratch for segment %u", i);
  }
  return PVL_SUCCESS;
}

const pvl_backend_ops pvl__cpu_backend = {
    .name = "cpu",
    .init = cpu_init,
    .available = cpu_available,
    .fini = cpu_fini,
    .copy_blocks = cpu_copy_blocks,
    .gather = cpu_gather,
    .write_range = cpu_write_range,
    .read_range = cpu_read_range,
    .plan_init = cpu_plan_init,
    .plan_fini = cpu_plan_fini,
    .plan_upload = cpu_plan_upload,
    .plan_kv_write = cpu_plan_kv_write,
    .attention = cpu_attention,
    .observe = cpu_observe,
    .select_top = cpu_select_top,
};
