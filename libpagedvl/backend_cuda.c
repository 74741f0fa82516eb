/* The CUDA backend: the pool in device memory (cudaMalloc), plan buffers of
 * fixed capacity on the device, and the glue that hands the host's small
 * index lists to the kernels of kernels/. Host C against the CUDA runtime's
 * C API (statically linked): with no driver, cache creation says NO_DEVICE
 * and AUTO falls back to the CPU backend. */
#include <cuda_runtime_api.h>
#include <math.h>
#include <string.h>

#include "internal.h"

/* The running sums of one observation, on the device (pvl_obs.dev):
 *   raw double [n_keys] | seen uint32 [n_keys] | below, total uint64 [hq]
 * each part 256-byte aligned. pvl_observe adds into them on the stream and
 * returns; the host copy is fetched when a call reads it. Released buffers
 * go on the cache's free list, not to cudaFree (which waits for the whole
 * device), and are reused by later observations of the same size class. */
typedef struct obs_dev {
  void *mem;
  size_t bytes;         /* size class: a power of two */
  uint32_t n_keys;      /* layout of the current owner */
  cudaEvent_t done;     /* recorded after the last accumulation into mem */
  struct obs_dev *next; /* free list */
} obs_dev;

typedef struct cuda_state {
  int device;
  void *scratch;       /* device scratch for index lists (grown) */
  size_t scratch_bytes;
  void *obs_ws;        /* device buffers of pvl_observe (grown) */
  size_t obs_ws_bytes;
  void *pinned; /* pinned host staging of observation fetches */
  size_t pinned_bytes;
  obs_dev *obs_free; /* released observation buffers */
} cuda_state;

typedef struct cuda_plan {
  int32_t *buf;        /* plan buffer (device) */
  int32_t *pairs;      /* device staging of (index, value) pairs */
  size_t pairs_cap;    /* in pairs */
  void *workspace;     /* attention split-K workspace */
  size_t workspace_bytes;
} cuda_plan;

/* Translates a CUDA error into a status with a message, and clears the
 * error so the next call is not blamed for it. */
static pvl_status cuda_fail(const pvl_cache *c, cudaError_t e, const char *fn,
                            const char *what) {
  (void)cudaGetLastError();
  pvl_status st = (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
                      ? PVL_ERR_NO_DEVICE
                      : PVL_ERR_CUDA;
  return pvl__fail(c, st, fn, "%s: %s (%s)", what, cudaGetErrorName(e),
                   cudaGetErrorString(e));
}

/* A launcher's failure, named: for PVL_ERR_CUDA the CUDA error the launcher
 * met (it clears the runtime's error slot, so only its own record has it);
 * other statuses come from the launcher's argument checks. */
static pvl_status launch_fail(const pvl_cache *c, pvl_status st, const char *fn,
                              const char *what) {
  const int e = st == PVL_ERR_CUDA ? pvlk_last_cuda_error() : 0;
  if (e != 0)
    return pvl__fail(c, st, fn, "%s: %s (%s)", what,
                     cudaGetErrorName((cudaError_t)e),
                     cudaGetErrorString((cudaError_t)e));
  return pvl__fail(c, st, fn, "%s: %s", what, pvl_status_string(st));
}

#define CUDA_TRY(c, call, what)                                             \
  do {                                                                      \
    cudaError_t e_ = (call);                                                \
    if (e_ != cudaSuccess) return cuda_fail((c), e_, __func__, (what));     \
  } while (0)

static cuda_state *state(const pvl_cache *c) { return c->be_state; }

/* Grows a device buffer (contents not kept). cudaFree synchronizes the
 * device, which is acceptable on this rare path. */
static pvl_status dev_reserve(const pvl_cache *c, void **p, size_t *cap,
                              size_t bytes, const char *fn) {
  if (bytes <= *cap) return PVL_SUCCESS;
  size_t want = *cap ? *cap : 4096;
  while (want < bytes) want *= 2;
  void *q = NULL;
  cudaError_t e = cudaMalloc(&q, want);
  if (e != cudaSuccess) return cuda_fail(c, e, fn, "device scratch");
  if (*p) cudaFree(*p);
  *p = q;
  *cap = want;
  return PVL_SUCCESS;
}

/* Copies a host array into the cache's device scratch at byte offset off. */
static pvl_status to_scratch(pvl_cache *c, size_t off, const void *src,
                             size_t bytes, void *stream, const char *fn) {
  cuda_state *s = state(c);
  pvl_status st = dev_reserve(c, &s->scratch, &s->scratch_bytes, off + bytes,
                              fn);
  if (st != PVL_SUCCESS) return st;
  cudaError_t e = cudaMemcpyAsync((char *)s->scratch + off, src, bytes,
                                  cudaMemcpyHostToDevice,
                                  (cudaStream_t)stream);
  if (e != cudaSuccess) return cuda_fail(c, e, fn, "copy to device");
  return PVL_SUCCESS;
}

static size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

/* The kernels load 16-byte vectors from the caller's tensors. */
static pvl_status check_aligned(const pvl_cache *c, const char *fn,
                                const void *a, const void *b) {
  if (((uintptr_t)a | (uintptr_t)b) & 15u)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "device pointers %p, %p must be 16-byte aligned", a, b);
  return PVL_SUCCESS;
}

static pvl_status cuda_init(pvl_cache *c) {
  if (c->cfg.dtype == PVL_DTYPE_F32)
    return PVL_FAIL(c, PVL_ERR_UNSUPPORTED,
                    "the CUDA backend stores f16 or bf16, not f32");
  if (c->cfg.head_dim != 64 && c->cfg.head_dim != 128 &&
      c->cfg.head_dim != 256)
    return PVL_FAIL(c, PVL_ERR_UNSUPPORTED,
                    "head_dim = %u: the CUDA kernels take 64, 128 or 256",
                    c->cfg.head_dim);
  if (c->cfg.block_size != 16 && c->cfg.block_size != 32)
    return PVL_FAIL(c, PVL_ERR_UNSUPPORTED,
                    "block_size = %u: the CUDA kernels take 16 or 32",
                    c->cfg.block_size);
  uint32_t ratio = c->cfg.num_q_heads / c->cfg.num_kv_heads;
  if (ratio > 8)
    return PVL_FAIL(c, PVL_ERR_UNSUPPORTED,
                    "GQA ratio %u: the CUDA kernels take at most 8", ratio);
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return cuda_fail(c, e, __func__, "cudaGetDeviceCount");
  if (n == 0) return PVL_FAIL(c, PVL_ERR_NO_DEVICE, "no CUDA device");
  if (c->cfg.device < 0 || c->cfg.device >= n)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "device %d out of range (%d devices)", c->cfg.device, n);
  CUDA_TRY(c, cudaSetDevice(c->cfg.device), "cudaSetDevice");
  /* Checked here, so an older GPU gets the reason at creation (and AUTO
   * its CPU fallback), not a failed launch later. */
  int major = 0, minor = 0;
  CUDA_TRY(c,
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                  c->cfg.device),
           "compute capability");
  CUDA_TRY(c,
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                  c->cfg.device),
           "compute capability");
  char why[160];
  if (!pvl__cuda_arch_supported(major, minor, why, sizeof(why)))
    return PVL_FAIL(c, PVL_ERR_UNSUPPORTED, "device %d: %s", c->cfg.device,
                    why);
  if (c->cfg.num_blocks == 0) {
    size_t free_b = 0, total_b = 0;
    CUDA_TRY(c, cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
    double nb = floor((double)free_b * c->cfg.memory_fraction /
                      (double)c->block_bytes);
    if (nb < 1.0)
      return PVL_FAIL(c, PVL_ERR_OUT_OF_BLOCKS,
                      "%.0f%% of %zu free bytes holds no block of %zu bytes",
                      100.0 * c->cfg.memory_fraction, free_b, c->block_bytes);
    /* The limit pvl_cache_create checks for an explicit num_blocks:
     * every slot of the pool indexable by an int32 layer length. */
    const double cap = (double)(INT32_MAX / c->cfg.block_size);
    c->cfg.num_blocks = nb > cap ? (uint32_t)cap : (uint32_t)nb;
  }
  size_t bytes;
  if (!pvl__mul_ok(c->block_bytes, c->cfg.num_blocks, &bytes))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "%u blocks of %zu bytes overflow size_t",
                    c->cfg.num_blocks, c->block_bytes);
  cuda_state *s = pvl__alloc(c->alloc, sizeof(*s));
  if (!s) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "CUDA backend state");
  memset(s, 0, sizeof(*s));
  s->device = c->cfg.device;
  cudaError_t em = cudaMalloc(&c->storage, bytes);
  if (em != cudaSuccess) {
    pvl__free(c->alloc, s, sizeof(*s));
    c->storage = NULL;
    return cuda_fail(c, em, __func__, "pool storage (cudaMalloc)");
  }
  c->be_state = s;
  return PVL_SUCCESS;
}

static int cuda_available(int32_t device) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  if (device < 0 || device >= n) return 0;
  /* The same test as creation, so AUTO's promise holds: available means
   * a cache can be made there (shapes aside). */
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                             device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                             device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return pvl__cuda_arch_supported(major, minor, NULL, 0);
}

static void cuda_fini(pvl_cache *c) {
  cuda_state *s = state(c);
  if (c->storage) cudaFree(c->storage);
  c->storage = NULL;
  if (!s) return;
  if (s->scratch) cudaFree(s->scratch);
  if (s->obs_ws) cudaFree(s->obs_ws);
  if (s->pinned) cudaFreeHost(s->pinned);
  /* Every observation was released before (sequences go first). */
  for (obs_dev *d = s->obs_free, *next; d; d = next) {
    next = d->next;
    cudaFree(d->mem);
    cudaEventDestroy(d->done);
    pvl__free(c->alloc, d, sizeof(*d));
  }
  pvl__free(c->alloc, s, sizeof(*s));
  c->be_state = NULL;
}

/* Uploads two host arrays into the device scratch (the second at a
 * 256-byte aligned offset) and returns their device addresses. */
static pvl_status upload_pair(pvl_cache *c, const void *a, size_t a_bytes,
                              const void *b, size_t b_bytes, void **da,
                              void **db, void *stream, const char *fn) {
  pvl_status st = to_scratch(c, 0, a, a_bytes, stream, fn);
  if (st == PVL_SUCCESS)
    st = to_scratch(c, align_up(a_bytes), b, b_bytes, stream, fn);
  if (st != PVL_SUCCESS) return st;
  *da = state(c)->scratch;
  *db = (char *)state(c)->scratch + align_up(a_bytes);
  return PVL_SUCCESS;
}

static pvl_status cuda_copy_blocks(pvl_cache *c, const int32_t *src,
                                   const int32_t *dst, uint32_t n,
                                   void *stream) {
  if (n == 0) return PVL_SUCCESS;
  const size_t b = (size_t)n * sizeof(int32_t);
  void *d_src, *d_dst;
  pvl_status st =
      upload_pair(c, src, b, dst, b, &d_src, &d_dst, stream, __func__);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_copy_blocks(c->storage, &c->geom, d_src, d_dst, n, stream);
  return st == PVL_SUCCESS ? st
                           : launch_fail(c, st, __func__, "pvlk_copy_blocks");
}

static pvl_status cuda_gather(pvl_cache *c, const int64_t *src_slots,
                              const int32_t *dst_blocks, uint32_t n,
                              void *stream) {
  if (n == 0) return PVL_SUCCESS;
  const size_t bs = (size_t)c->geom.block_size;
  void *d_src, *d_dst;
  pvl_status st = upload_pair(c, src_slots, (size_t)n * sizeof(int64_t),
                              dst_blocks, ((n + bs - 1) / bs) * sizeof(int32_t),
                              &d_src, &d_dst, stream, __func__);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_gather_slots(c->storage, &c->geom, d_src, d_dst, n, stream);
  return st == PVL_SUCCESS ? st
                           : launch_fail(c, st, __func__, "pvlk_gather_slots");
}

/* Common part of the range copies: checks the tensors' alignment and
 * uploads the block ids the range [first, first + n) spans. */
static pvl_status upload_range(pvl_cache *c, const int32_t *blocks,
                               uint32_t first, uint32_t n, const void *k,
                               const void *v, void *stream, const char *fn) {
  const uint32_t bs = (uint32_t)c->geom.block_size;
  const size_t nb = ((size_t)first + n + bs - 1) / bs;
  pvl_status st = check_aligned(c, fn, k, v);
  if (st != PVL_SUCCESS) return st;
  return to_scratch(c, 0, blocks, nb * sizeof(int32_t), stream, fn);
}

static pvl_status cuda_write_range(pvl_cache *c, const int32_t *blocks,
                                   uint32_t first, uint32_t n, const void *k,
                                   const void *v, void *stream) {
  pvl_status st = upload_range(c, blocks, first, n, k, v, stream, __func__);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_kv_write_range(c->storage, &c->geom, state(c)->scratch, first, n,
                           k, v, stream);
  return st == PVL_SUCCESS
             ? st
             : launch_fail(c, st, __func__, "pvlk_kv_write_range");
}

static pvl_status cuda_read_range(const pvl_cache *cc, const int32_t *blocks,
                                  uint32_t first, uint32_t n, void *k, void *v,
                                  void *stream) {
  /* The scratch is not logical state: a read may reuse it. */
  pvl_cache *c = (pvl_cache *)cc;
  pvl_status st = upload_range(c, blocks, first, n, k, v, stream, __func__);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_kv_read_range(c->storage, &c->geom, state(c)->scratch, first, n,
                          k, v, stream);
  return st == PVL_SUCCESS ? st
                           : launch_fail(c, st, __func__, "pvlk_kv_read_range");
}

/* ---- plans ---- */

static pvl_status cuda_plan_init(pvl_plan *p) {
  pvl_cache *c = p->cache;
  cuda_plan *cp = pvl__alloc(c->alloc, sizeof(*cp));
  if (!cp) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "CUDA plan state");
  memset(cp, 0, sizeof(*cp));
  const size_t bytes = (size_t)pvl_plan_buf_elems(p->view.num_layers,
                                                  p->view.max_seqs,
                                                  p->view.block_cap) *
                       sizeof(int32_t);
  cp->workspace_bytes = pvlk_attention_workspace_bytes(
      &c->geom, p->view.max_seqs, (int32_t)c->cfg.num_q_heads);
  cp->pairs_cap = p->pairs_cap;
  cudaError_t e = cudaMalloc((void **)&cp->buf, bytes);
  if (e == cudaSuccess) e = cudaMemset(cp->buf, 0, bytes);
  if (e == cudaSuccess)
    e = cudaMalloc((void **)&cp->pairs, cp->pairs_cap * 2 * sizeof(int32_t));
  if (e == cudaSuccess && cp->workspace_bytes)
    e = cudaMalloc(&cp->workspace, cp->workspace_bytes);
  if (e != cudaSuccess) {
    if (cp->buf) cudaFree(cp->buf);
    if (cp->pairs) cudaFree(cp->pairs);
    if (cp->workspace) cudaFree(cp->workspace);
    pvl__free(c->alloc, cp, sizeof(*cp));
    return cuda_fail(c, e, __func__, "plan buffers");
  }
  p->be_state = cp;
  p->view.buf = cp->buf;
  return PVL_SUCCESS;
}

static void cuda_plan_fini(pvl_plan *p) {
  cuda_plan *cp = p->be_state;
  if (!cp) return;
  cudaFree(cp->buf);
  cudaFree(cp->pairs);
  if (cp->workspace) cudaFree(cp->workspace);
  pvl__free(p->cache->alloc, cp, sizeof(*cp));
  p->be_state = NULL;
  p->view.buf = NULL;
}

static pvl_status cuda_plan_upload(pvl_plan *p, const int32_t *pairs,
                                   uint32_t n, void *stream) {
  pvl_cache *c = p->cache;
  cuda_plan *cp = p->be_state;
  if (n == 0) return PVL_SUCCESS;
  if (n > cp->pairs_cap) {
    void *q = cp->pairs;
    size_t cap_bytes = cp->pairs_cap * 2 * sizeof(int32_t);
    pvl_status st = dev_reserve(c, &q, &cap_bytes,
                                (size_t)n * 2 * sizeof(int32_t), __func__);
    if (st != PVL_SUCCESS) return st;
    cp->pairs = q;
    cp->pairs_cap = cap_bytes / (2 * sizeof(int32_t));
  }
  CUDA_TRY(c,
           cudaMemcpyAsync(cp->pairs, pairs, (size_t)n * 2 * sizeof(int32_t),
                           cudaMemcpyHostToDevice, (cudaStream_t)stream),
           "plan update copy");
  pvl_status st = pvlk_plan_scatter(cp->buf, cp->pairs, n, stream);
  return st == PVL_SUCCESS ? st
                           : launch_fail(c, st, __func__, "pvlk_plan_scatter");
}

static pvl_status cuda_plan_kv_write(pvl_plan *p, uint32_t layer,
                                     const void *k, const void *v,
                                     void *stream) {
  pvl_cache *c = p->cache;
  pvl_status st = check_aligned(c, __func__, k, v);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_plan_kv_write(c->storage, &c->geom, &p->view,
                                     (int32_t)layer, k, v, stream);
  return st == PVL_SUCCESS ? st
                           : launch_fail(c, st, __func__, "pvlk_plan_kv_write");
}

static pvl_status cuda_attention(pvl_plan *p, uint32_t layer, const void *q,
                                 void *out, float scale, void *stream) {
  pvl_cache *c = p->cache;
  cuda_plan *cp = p->be_state;
  pvl_status st = check_aligned(c, __func__, q, out);
  if (st != PVL_SUCCESS) return st;
  st = pvlk_attention_decode(
      c->storage, &c->geom, &p->view, (int32_t)layer,
      (int32_t)c->cfg.num_q_heads, q, out, scale, cp->workspace,
      cp->workspace_bytes, stream);
  return st == PVL_SUCCESS
             ? st
             : launch_fail(c, st, __func__, "pvlk_attention_decode");
}

/* ---- observe: kernel and running sums on the device ----
 *
 * pvl_observe queues its work and returns: no copy back, no wait, so a
 * serving stack can queue a whole prefill (every layer) without a round
 * trip per layer. The sums stay in the observation's device buffer until
 * a call reads them (obs_fetch: pvl_compress, pvl_decode_cap,
 * pvl_seq_observation), which fetches every layer it needs in one wait. */

/* Byte offsets of the parts of an observation buffer (see obs_dev). */
typedef struct obs_layout {
  size_t seen, below, total, bytes;
} obs_layout;

static obs_layout obs_layout_for(uint32_t n_keys, uint32_t hq) {
  obs_layout l;
  l.seen = align_up((size_t)n_keys * sizeof(double));
  l.below = l.seen + align_up((size_t)n_keys * sizeof(uint32_t));
  l.total = l.below + align_up((size_t)hq * sizeof(uint64_t));
  l.bytes = l.total + align_up((size_t)hq * sizeof(uint64_t));
  return l;
}

/* A zeroed buffer for the sums of n_keys keys, queued on `stream`: reused
 * from the free list when one of the size class is there (after the work
 * its last owner queued, wherever that was), else allocated. */
static pvl_status obs_dev_get(pvl_cache *c, uint32_t n_keys, void *stream,
                              obs_dev **out) {
  cuda_state *s = state(c);
  const size_t need = obs_layout_for(n_keys, c->cfg.num_q_heads).bytes;
  size_t cls = 4096;
  while (cls < need) cls *= 2;
  cudaStream_t cs = (cudaStream_t)stream;
  obs_dev *d = NULL;
  for (obs_dev **pp = &s->obs_free; *pp; pp = &(*pp)->next)
    if ((*pp)->bytes == cls) {
      d = *pp;
      *pp = d->next;
      break;
    }
  if (d) {
    cudaError_t e = cudaStreamWaitEvent(cs, d->done, 0);
    if (e != cudaSuccess) {
      d->next = s->obs_free;
      s->obs_free = d;
      return cuda_fail(c, e, __func__, "observation buffer reuse");
    }
  } else {
    d = pvl__alloc(c->alloc, sizeof(*d));
    if (!d) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "observation buffer");
    memset(d, 0, sizeof(*d));
    d->bytes = cls;
    cudaError_t e = cudaMalloc(&d->mem, cls);
    if (e == cudaSuccess)
      e = cudaEventCreateWithFlags(&d->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
      if (d->mem) cudaFree(d->mem);
      pvl__free(c->alloc, d, sizeof(*d));
      return cuda_fail(c, e, __func__, "observation buffer");
    }
  }
  d->n_keys = n_keys;
  d->next = NULL;
  cudaError_t e = cudaMemsetAsync(d->mem, 0, need, cs);
  if (e != cudaSuccess) {
    d->next = s->obs_free;
    s->obs_free = d;
    return cuda_fail(c, e, __func__, "observation buffer");
  }
  *out = d;
  return PVL_SUCCESS;
}

/* No CUDA call: the buffer waits on the free list, and its next owner
 * waits for the `done` event before touching it. */
static void cuda_obs_release(pvl_cache *c, pvl_obs *o) {
  obs_dev *d = o->dev;
  if (!d) return;
  cuda_state *s = state(c);
  d->next = s->obs_free;
  s->obs_free = d;
  o->dev = NULL;
  o->stale = false;
}

static pvl_status cuda_observe(pvl_cache *c, const pvl_table *t,
                               const void *q, uint32_t first_pos,
                               uint32_t n_rows, float scale, float log_p,
                               pvl_obs *obs, void *stream) {
  cuda_state *s = state(c);
  const uint32_t n_keys = t->n_tokens, hq = c->cfg.num_q_heads;
  pvl_status st0 = check_aligned(c, __func__, q, q);
  if (st0 != PVL_SUCCESS) return st0;
  /* The sums of an observation live on the device from its first call on:
   * its host arrays are then only ever a fetched copy. */
  if (obs->dev == NULL && obs->n_rows > 0)
    return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                    "observation of %u rows has no device sums", obs->n_rows);
  /* Device layout: ids | pos | raw | seen | below | total | kernel ws. The
   * per-call results are scratch: the stream orders the next call's reuse
   * after this call's accumulation. */
  const size_t b_ids = align_up((size_t)t->n_blocks * sizeof(int32_t));
  const size_t b_pos = t->pos ? align_up((size_t)n_keys * sizeof(uint32_t)) : 0;
  const size_t b_raw = align_up((size_t)n_keys * sizeof(float));
  const size_t b_seen = align_up((size_t)n_keys * sizeof(uint32_t));
  const size_t b_cnt = align_up((size_t)hq * sizeof(unsigned long long));
  const size_t b_ws = pvlk_observe_workspace_bytes(n_rows, (int32_t)hq);
  const size_t total = b_ids + b_pos + b_raw + b_seen + 2 * b_cnt + b_ws;
  pvl_status st =
      dev_reserve(c, &s->obs_ws, &s->obs_ws_bytes, total, __func__);
  if (st != PVL_SUCCESS) return st;
  char *d = s->obs_ws;
  int32_t *d_ids = (int32_t *)d;
  uint32_t *d_pos = t->pos ? (uint32_t *)(d + b_ids) : NULL;
  char *d_out = d + b_ids + b_pos; /* raw | seen | below | total */
  float *d_raw = (float *)d_out;
  uint32_t *d_seen = (uint32_t *)(d_out + b_raw);
  unsigned long long *d_below =
      (unsigned long long *)(d_out + b_raw + b_seen);
  unsigned long long *d_total =
      (unsigned long long *)(d_out + b_raw + b_seen + b_cnt);
  void *d_ws = d_out + b_raw + b_seen + 2 * b_cnt;
  cudaStream_t cs = (cudaStream_t)stream;
  CUDA_TRY(c,
           cudaMemcpyAsync(d_ids, t->blocks, (size_t)t->n_blocks * 4,
                           cudaMemcpyHostToDevice, cs),
           "observe block ids");
  if (d_pos)
    CUDA_TRY(c,
             cudaMemcpyAsync(d_pos, t->pos, (size_t)n_keys * 4,
                             cudaMemcpyHostToDevice, cs),
             "observe key positions");
  st = pvlk_observe(c->storage, &c->geom, d_ids, d_pos, n_keys, (int32_t)hq,
                    q, first_pos, n_rows, scale, log_p, d_raw, d_seen, d_below,
                    d_total, d_ws, b_ws, stream);
  if (st != PVL_SUCCESS) return launch_fail(c, st, __func__, "pvlk_observe");
  obs_dev *od = obs->dev;
  const bool fresh = od == NULL;
  if (fresh) {
    st = obs_dev_get(c, n_keys, stream, &od);
    if (st != PVL_SUCCESS) return st;
  }
  char *acc = od->mem;
  const obs_layout l = obs_layout_for(n_keys, hq);
  st = pvlk_observe_accumulate(
      d_raw, d_seen, d_below, d_total, n_keys, (int32_t)hq, (double *)acc,
      (uint32_t *)(acc + l.seen), (unsigned long long *)(acc + l.below),
      (unsigned long long *)(acc + l.total), stream);
  cudaError_t e = cudaSuccess;
  if (st == PVL_SUCCESS) e = cudaEventRecord(od->done, cs);
  if (st != PVL_SUCCESS || e != cudaSuccess) {
    if (fresh) {
      od->next = s->obs_free;
      s->obs_free = od;
    }
    return st != PVL_SUCCESS
               ? launch_fail(c, st, __func__, "pvlk_observe_accumulate")
               : cuda_fail(c, e, __func__, "observe event");
  }
  obs->dev = od;
  obs->stale = true;
  return PVL_SUCCESS;
}

/* Brings the host arrays of every stale observation up to date: one copy
 * per observation into pinned staging, queued after the observation's own
 * work (its `done` event, so the stream it was observed on does not
 * matter), then one wait for all of them. */
static pvl_status cuda_obs_fetch(pvl_cache *c, pvl_obs *const *obs, uint32_t n,
                                 void *stream) {
  cuda_state *s = state(c);
  const uint32_t hq = c->cfg.num_q_heads;
  size_t need = 0;
  for (uint32_t i = 0; i < n; i++)
    if (obs[i] && obs[i]->stale && obs[i]->dev)
      need += obs_layout_for(obs[i]->n_keys, hq).bytes;
  if (need == 0) return PVL_SUCCESS;
  if (need > s->pinned_bytes) {
    size_t want = s->pinned_bytes ? s->pinned_bytes : 65536;
    while (want < need) want *= 2;
    void *p = NULL;
    CUDA_TRY(c, cudaMallocHost(&p, want), "observation staging (pinned)");
    if (s->pinned) cudaFreeHost(s->pinned);
    s->pinned = p;
    s->pinned_bytes = want;
  }
  cudaStream_t cs = (cudaStream_t)stream;
  size_t off = 0;
  for (uint32_t i = 0; i < n; i++) {
    const pvl_obs *o = obs[i];
    if (!o || !o->stale || !o->dev) continue;
    const obs_dev *d = o->dev;
    const size_t b = obs_layout_for(o->n_keys, hq).bytes;
    CUDA_TRY(c, cudaStreamWaitEvent(cs, d->done, 0), "observation fetch");
    CUDA_TRY(c,
             cudaMemcpyAsync((char *)s->pinned + off, d->mem, b,
                             cudaMemcpyDeviceToHost, cs),
             "observation fetch");
    off += b;
  }
  CUDA_TRY(c, cudaStreamSynchronize(cs), "observation fetch synchronize");
  off = 0;
  for (uint32_t i = 0; i < n; i++) {
    pvl_obs *o = obs[i];
    if (!o || !o->stale || !o->dev) continue;
    const obs_layout l = obs_layout_for(o->n_keys, hq);
    const char *h = (const char *)s->pinned + off;
    memcpy(o->raw, h, (size_t)o->n_keys * sizeof(double));
    memcpy(o->seen, h + l.seen, (size_t)o->n_keys * sizeof(uint32_t));
    memcpy(o->below, h + l.below, (size_t)hq * sizeof(uint64_t));
    memcpy(o->total, h + l.total, (size_t)hq * sizeof(uint64_t));
    o->stale = false;
    off += l.bytes;
  }
  return PVL_SUCCESS;
}

/* ---- select: CUB segmented top-k over every layer at once ---- */

static pvl_status cuda_select_top(pvl_cache *c, const float *scores,
                                  const int32_t *seg_off, const int32_t *n_top,
                                  const int32_t *keep_off, uint32_t n_seg,
                                  uint32_t total, int32_t *keep,
                                  uint32_t total_keep, void *stream) {
  cuda_state *s = state(c);
  const size_t b_sc = align_up((size_t)total * sizeof(float));
  const size_t b_seg = align_up(((size_t)n_seg + 1) * sizeof(int32_t));
  const size_t b_n = align_up((size_t)n_seg * sizeof(int32_t));
  const size_t b_keep = align_up(((size_t)total_keep + 1) * sizeof(int32_t));
  const size_t b_ws = pvlk_select_workspace_bytes(total, n_seg);
  const size_t need = b_sc + b_seg + 2 * b_n + b_keep + b_ws;
  pvl_status st = dev_reserve(c, &s->obs_ws, &s->obs_ws_bytes, need, __func__);
  if (st != PVL_SUCCESS) return st;
  char *d = s->obs_ws;
  float *d_sc = (float *)d;
  int32_t *d_seg = (int32_t *)(d + b_sc);
  int32_t *d_top = (int32_t *)(d + b_sc + b_seg);
  int32_t *d_koff = (int32_t *)(d + b_sc + b_seg + b_n);
  int32_t *d_keep = (int32_t *)(d + b_sc + b_seg + 2 * b_n);
  void *d_ws = d + b_sc + b_seg + 2 * b_n + b_keep;
  cudaStream_t cs = (cudaStream_t)stream;
  CUDA_TRY(c, cudaMemcpyAsync(d_sc, scores, (size_t)total * 4,
                              cudaMemcpyHostToDevice, cs), "select scores");
  CUDA_TRY(c, cudaMemcpyAsync(d_seg, seg_off, ((size_t)n_seg + 1) * 4,
                              cudaMemcpyHostToDevice, cs), "select offsets");
  CUDA_TRY(c, cudaMemcpyAsync(d_top, n_top, (size_t)n_seg * 4,
                              cudaMemcpyHostToDevice, cs), "select counts");
  CUDA_TRY(c, cudaMemcpyAsync(d_koff, keep_off, (size_t)n_seg * 4,
                              cudaMemcpyHostToDevice, cs), "select offsets");
  st = pvlk_select_top(d_sc, d_seg, d_top, d_koff, n_seg, total, d_keep, d_ws,
                       b_ws, stream);
  if (st != PVL_SUCCESS) return launch_fail(c, st, __func__, "pvlk_select_top");
  CUDA_TRY(c, cudaMemcpyAsync(keep, d_keep, (size_t)total_keep * 4,
                              cudaMemcpyDeviceToHost, cs), "select result");
  CUDA_TRY(c, cudaStreamSynchronize(cs), "select synchronize");
  return PVL_SUCCESS;
}

/* ---- the cache's device around every entry point ----
 *
 * A cache belongs to its device. One thread may drive caches on several
 * GPUs (a pipeline or tensor-parallel run without a thread per GPU), so
 * every entry point that touches the GPU makes the cache's device current
 * and restores the caller's afterwards; cudaSetDevice only when they
 * differ, so the common one-GPU case costs one cudaGetDevice. */

static pvl_status dev_enter(const pvl_cache *c, int *prev, const char *fn) {
  cudaError_t e = cudaGetDevice(prev);
  if (e != cudaSuccess) return cuda_fail(c, e, fn, "cudaGetDevice");
  if (*prev == c->cfg.device) return PVL_SUCCESS;
  e = cudaSetDevice(c->cfg.device);
  if (e != cudaSuccess) return cuda_fail(c, e, fn, "cudaSetDevice");
  return PVL_SUCCESS;
}

static void dev_leave(const pvl_cache *c, int prev) {
  if (prev != c->cfg.device) cudaSetDevice(prev);
}

/* Calls `call` with the cache's device current. */
#define ON_DEVICE(c, call)                                                     \
  do {                                                                         \
    int prev_ = 0;                                                             \
    pvl_status st_ = dev_enter((c), &prev_, __func__);                         \
    if (st_ != PVL_SUCCESS) return st_;                                        \
    st_ = (call);                                                              \
    dev_leave((c), prev_);                                                     \
    return st_;                                                                \
  } while (0)

/* Creation validates the ordinal and makes the device current itself; the
 * caller's device (if it has one yet) comes back afterwards. */
static pvl_status dev_init(pvl_cache *c) {
  int prev = 0;
  const bool had = cudaGetDevice(&prev) == cudaSuccess;
  if (!had) (void)cudaGetLastError();
  pvl_status st = cuda_init(c);
  if (had && prev != c->cfg.device) cudaSetDevice(prev);
  return st;
}

static void dev_fini(pvl_cache *c) {
  int prev = 0;
  const bool in = dev_enter(c, &prev, __func__) == PVL_SUCCESS;
  cuda_fini(c);
  if (in) dev_leave(c, prev);
}

static pvl_status dev_copy_blocks(pvl_cache *c, const int32_t *src,
                                  const int32_t *dst, uint32_t n,
                                  void *stream) {
  ON_DEVICE(c, cuda_copy_blocks(c, src, dst, n, stream));
}

static pvl_status dev_gather(pvl_cache *c, const int64_t *src_slots,
                             const int32_t *dst_blocks, uint32_t n,
                             void *stream) {
  ON_DEVICE(c, cuda_gather(c, src_slots, dst_blocks, n, stream));
}

static pvl_status dev_write_range(pvl_cache *c, const int32_t *blocks,
                                  uint32_t first, uint32_t n, const void *k,
                                  const void *v, void *stream) {
  ON_DEVICE(c, cuda_write_range(c, blocks, first, n, k, v, stream));
}

static pvl_status dev_read_range(const pvl_cache *c, const int32_t *blocks,
                                 uint32_t first, uint32_t n, void *k, void *v,
                                 void *stream) {
  ON_DEVICE(c, cuda_read_range(c, blocks, first, n, k, v, stream));
}

static pvl_status dev_plan_init(pvl_plan *p) {
  ON_DEVICE(p->cache, cuda_plan_init(p));
}

static void dev_plan_fini(pvl_plan *p) {
  int prev = 0;
  const bool in = dev_enter(p->cache, &prev, __func__) == PVL_SUCCESS;
  cuda_plan_fini(p);
  if (in) dev_leave(p->cache, prev);
}

static pvl_status dev_plan_upload(pvl_plan *p, const int32_t *pairs, uint32_t n,
                                  void *stream) {
  ON_DEVICE(p->cache, cuda_plan_upload(p, pairs, n, stream));
}

static pvl_status dev_plan_kv_write(pvl_plan *p, uint32_t layer, const void *k,
                                    const void *v, void *stream) {
  ON_DEVICE(p->cache, cuda_plan_kv_write(p, layer, k, v, stream));
}

static pvl_status dev_attention(pvl_plan *p, uint32_t layer, const void *q,
                                void *out, float scale, void *stream) {
  ON_DEVICE(p->cache, cuda_attention(p, layer, q, out, scale, stream));
}

static pvl_status dev_observe(pvl_cache *c, const pvl_table *t, const void *q,
                              uint32_t first_pos, uint32_t n_rows, float scale,
                              float log_p, pvl_obs *obs, void *stream) {
  ON_DEVICE(
      c, cuda_observe(c, t, q, first_pos, n_rows, scale, log_p, obs, stream));
}

static pvl_status dev_obs_fetch(pvl_cache *c, pvl_obs *const *obs, uint32_t n,
                                void *stream) {
  ON_DEVICE(c, cuda_obs_fetch(c, obs, n, stream));
}

static pvl_status dev_select_top(pvl_cache *c, const float *scores,
                                 const int32_t *seg_off, const int32_t *n_top,
                                 const int32_t *keep_off, uint32_t n_seg,
                                 uint32_t total, int32_t *keep,
                                 uint32_t total_keep, void *stream) {
  ON_DEVICE(c, cuda_select_top(c, scores, seg_off, n_top, keep_off, n_seg,
                               total, keep, total_keep, stream));
}

static const pvl_backend_ops g_cuda = {
    .name = "cuda",
    .init = dev_init,
    .available = cuda_available,
    .fini = dev_fini,
    .copy_blocks = dev_copy_blocks,
    .gather = dev_gather,
    .write_range = dev_write_range,
    .read_range = dev_read_range,
    .plan_init = dev_plan_init,
    .plan_fini = dev_plan_fini,
    .plan_upload = dev_plan_upload,
    .plan_kv_write = dev_plan_kv_write,
    .attention = dev_attention,
    .observe = dev_observe,
    .obs_fetch = dev_obs_fetch,
    .obs_release = cuda_obs_release,
    .select_top = dev_select_top,
};

const pvl_backend_ops *pvl__cuda_backend(void) { return &g_cuda; }
