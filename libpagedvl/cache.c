/* The cache handle: configuration checks, creation and destruction, status
 * strings and last-error messages, statistics. Sequences live in seq.c,
 * plans in plan.c, the pool storage in the backends. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* Messages of failing calls that have no cache to keep them (creation, the
 * pure policy functions): one buffer per thread, so those calls stay
 * thread-safe. */
static _Thread_local char g_create_err[PVL_ERRMSG_LEN];

const char *pvl_status_string(pvl_status status) {
  switch (status) {
  case PVL_SUCCESS: return "PVL_SUCCESS: no error";
  case PVL_ERR_INVALID_ARGUMENT: return "PVL_ERR_INVALID_ARGUMENT: invalid argument";
  case PVL_ERR_NO_MEMORY: return "PVL_ERR_NO_MEMORY: host allocation failed";
  case PVL_ERR_OUT_OF_BLOCKS: return "PVL_ERR_OUT_OF_BLOCKS: too few free blocks in the pool";
  case PVL_ERR_UNKNOWN_SEQUENCE: return "PVL_ERR_UNKNOWN_SEQUENCE: no live sequence has this id";
  case PVL_ERR_UNSUPPORTED: return "PVL_ERR_UNSUPPORTED: not supported by this build or backend";
  case PVL_ERR_CAPACITY: return "PVL_ERR_CAPACITY: a fixed-capacity buffer is too small";
  case PVL_ERR_BAD_STATE: return "PVL_ERR_BAD_STATE: call out of order for this object";
  case PVL_ERR_NO_DEVICE: return "PVL_ERR_NO_DEVICE: no usable GPU or driver";
  case PVL_ERR_CUDA: return "PVL_ERR_CUDA: CUDA runtime error";
  case PVL_ERR_NCCL: return "PVL_ERR_NCCL: NCCL error";
  case PVL_ERR_INTERNAL: return "PVL_ERR_INTERNAL: internal error (a libpagedvl bug)";
  }
  return "PVL_ERR_?: unknown status value";
}

uint32_t pvl_version(void) { return PVL_VERSION; }

size_t pvl_dtype_size(pvl_dtype dtype) {
  switch (dtype) {
  case PVL_DTYPE_F32: return 4;
  case PVL_DTYPE_F16: return 2;
  case PVL_DTYPE_BF16: return 2;
  }
  return 0;
}

pvl_status pvl__fail(const pvl_cache *c, pvl_status st, const char *fn,
                     const char *fmt, ...) {
  /* The message buffer is not part of the cache's logical state, so a const
   * query may still explain its failure. */
  char *buf = c ? ((pvl_cache *)c)->err : g_create_err;
  int n = snprintf(buf, PVL_ERRMSG_LEN, "%s: ", fn);
  if (n < 0 || n >= PVL_ERRMSG_LEN) n = 0;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + n, PVL_ERRMSG_LEN - (size_t)n, fmt, ap);
  va_end(ap);
  return st;
}

/* dst = prefix ": " old-dst, truncated to the buffer. */
static void prepend(char *dst, const char *prefix) {
  char tmp[PVL_ERRMSG_LEN];
  size_t np = strlen(prefix), nd = strlen(dst);
  if (np + 2 >= PVL_ERRMSG_LEN) np = PVL_ERRMSG_LEN - 3;
  if (np + 2 + nd >= PVL_ERRMSG_LEN) nd = PVL_ERRMSG_LEN - 3 - np;
  memcpy(tmp, prefix, np);
  memcpy(tmp + np, ": ", 2);
  memcpy(tmp + np + 2, dst, nd);
  tmp[np + 2 + nd] = '\0';
  memcpy(dst, tmp, np + 3 + nd);
}

pvl_status pvl__prefix(const pvl_cache *c, pvl_status st, const char *fn) {
  prepend(c ? ((pvl_cache *)c)->err : g_create_err, fn);
  return st;
}

const char *pvl_cache_last_error(const pvl_cache *cache) {
  if (!cache) return "pvl_cache_last_error: cache is NULL";
  return cache->err;
}

const char *pvl_create_last_error(void) { return g_create_err; }

pvl_status pvl_config_init(pvl_config *cfg) {
  if (!cfg) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "cfg is NULL");
  memset(cfg, 0, sizeof(*cfg));
  cfg->size = sizeof(*cfg);
  cfg->backend = PVL_BACKEND_AUTO;
  cfg->device = 0;
  cfg->dtype = PVL_DTYPE_F16;
  cfg->memory_fraction = 0.9f;
  cfg->max_seqs = 4096;
  return PVL_SUCCESS;
}

void *pvl__scratch(pvl_cache *c, size_t bytes) {
  if (bytes <= c->scratch_bytes) return c->scratch;
  size_t want = c->scratch_bytes ? c->scratch_bytes : 4096;
  while (want < bytes) want *= 2;
  void *p = pvl__alloc(c->alloc, want);
  if (!p) return NULL;
  pvl__free(c->alloc, c->scratch, c->scratch_bytes);
  c->scratch = p;
  c->scratch_bytes = want;
  return p;
}

static pvl_status check_config(const pvl_config *cfg) {
#define BAD(...) \
  pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, "pvl_cache_create", __VA_ARGS__)
  if (cfg->size != sizeof(pvl_config))
    return BAD("cfg->size = %zu, expected %zu: initialize with "
               "pvl_config_init",
               cfg->size, sizeof(pvl_config));
  if (cfg->backend != PVL_BACKEND_CPU && cfg->backend != PVL_BACKEND_CUDA &&
      cfg->backend != PVL_BACKEND_AUTO)
    return BAD("unknown backend %d", (int)cfg->backend);
  if (pvl_dtype_size(cfg->dtype) == 0)
    return BAD("unknown dtype %d", (int)cfg->dtype);
  if (cfg->num_layers == 0 || cfg->num_layers > 4096)
    return BAD("num_layers = %u, must be in [1, 4096]", cfg->num_layers);
  if (cfg->num_kv_heads == 0 || cfg->num_kv_heads > 1024)
    return BAD("num_kv_heads = %u, must be in [1, 1024]", cfg->num_kv_heads);
  if (cfg->num_q_heads > 16384)
    return BAD("num_q_heads = %u, must be at most 16384", cfg->num_q_heads);
  if (cfg->num_q_heads == 0 || cfg->num_q_heads % cfg->num_kv_heads != 0)
    return BAD("num_q_heads = %u must be a positive multiple of "
               "num_kv_heads = %u",
               cfg->num_q_heads, cfg->num_kv_heads);
  if (cfg->head_dim == 0 || cfg->head_dim > 1024)
    return BAD("head_dim = %u, must be in [1, 1024]", cfg->head_dim);
  if (cfg->block_size == 0 || cfg->block_size > 1024)
    return BAD("block_size = %u, must be in [1, 1024]", cfg->block_size);
  if (cfg->num_blocks > (uint32_t)INT32_MAX)
    return BAD("num_blocks = %u exceeds INT32_MAX (block ids are int32)",
               cfg->num_blocks);
  /* A layer of one sequence may hold every block of the pool, and the plans
   * and kernels keep a layer's length in an int32: the pool's slots must
   * fit one. */
  if ((uint64_t)cfg->num_blocks * cfg->block_size > (uint64_t)INT32_MAX)
    return BAD("num_blocks = %u x block_size = %u = %llu slots exceed "
               "INT32_MAX (layer lengths are int32)",
               cfg->num_blocks, cfg->block_size,
               (unsigned long long)cfg->num_blocks * cfg->block_size);
  if (cfg->max_seqs == 0 || cfg->max_seqs > (1u << 24))
    return BAD("max_seqs = %u, must be in [1, 2^24]", cfg->max_seqs);
  if (cfg->num_blocks == 0 &&
      !(isfinite(cfg->memory_fraction) && cfg->memory_fraction > 0.0f &&
        cfg->memory_fraction <= 1.0f))
    return BAD("num_blocks = 0 needs memory_fraction in (0, 1], got %g",
               (double)cfg->memory_fraction);
  if (cfg->allocator && (!cfg->allocator->alloc || !cfg->allocator->free))
    return BAD("allocator has a NULL alloc or free function");
  if (!cfg->comm && cfg->split != PVL_SPLIT_NONE)
    return BAD("split = %d needs a communicator (cfg->comm)", (int)cfg->split);
  return PVL_SUCCESS;
#undef BAD
}

bool pvl__cuda_arch_supported(int major, int minor, char *why, size_t why_len) {
  if (major >= 8) return true;
  if (why && why_len)
    snprintf(why, why_len,
             "compute capability %d.%d; the CUDA kernels need 8.0 or newer "
             "(cp.async, bf16)",
             major, minor);
  return false;
}

static pvl_status pick_backend(const pvl_config *cfg,
                               const pvl_backend_ops **out) {
  const pvl_backend_ops *cuda = pvl__cuda_backend();
  switch (cfg->backend) {
  case PVL_BACKEND_CPU:
    *out = &pvl__cpu_backend;
    return PVL_SUCCESS;
  case PVL_BACKEND_CUDA:
    if (!cuda)
      return pvl__fail(NULL, PVL_ERR_UNSUPPORTED, "pvl_cache_create",
                       "this libpagedvl was built without CUDA");
    *out = cuda;
    return PVL_SUCCESS;
  case PVL_BACKEND_AUTO:
    *out = cuda ? cuda : &pvl__cpu_backend;
    return PVL_SUCCESS;
  }
  return pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, "pvl_cache_create",
                   "unknown backend");
}

pvl_status pvl_backend_available(pvl_backend backend, int32_t device,
                                 int *out) {
  if (!out)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "out is NULL");
  const pvl_backend_ops *cuda = pvl__cuda_backend();
  switch (backend) {
  case PVL_BACKEND_CPU:
  case PVL_BACKEND_AUTO:
    *out = 1;
    return PVL_SUCCESS;
  case PVL_BACKEND_CUDA:
    *out = cuda ? cuda->available(device) : 0;
    return PVL_SUCCESS;
  }
  return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "unknown backend %d",
                  (int)backend);
}

static void cache_free_meta(pvl_cache *c) {
  const pvl_allocator *a = c->alloc;
  uint32_t ms = c->cfg.max_seqs;
  pvl__pool_fini(&c->pool, a);
  pvl__free(a, c->slots, ms * sizeof(pvl_seq *));
  pvl__free(a, c->slot_gen, ms * sizeof(uint64_t));
  pvl__free(a, c->free_slots, ms * sizeof(uint32_t));
  pvl__free(a, c->layer_tokens, c->cfg.num_layers * sizeof(uint64_t));
  pvl__free(a, c->scratch, c->scratch_bytes);
  pvl__free(a, c, sizeof(*c));
}

static pvl_status create_on(const pvl_config *cfg, const pvl_backend_ops *be,
                            pvl_cache **out) {
  const pvl_allocator *a =
      cfg->allocator ? cfg->allocator : pvl__default_allocator();
  pvl_cache *c = pvl__alloc(a, sizeof(*c));
  if (!c)
    return pvl__fail(NULL, PVL_ERR_NO_MEMORY, "pvl_cache_create",
                     "cache struct");
  memset(c, 0, sizeof(*c));
  c->cfg = *cfg;
  c->alloc = a;
  c->be = be;
  c->elem_size = pvl_dtype_size(cfg->dtype);
  c->geom.num_kv_heads = (int32_t)cfg->num_kv_heads;
  c->geom.head_dim = (int32_t)cfg->head_dim;
  c->geom.block_size = (int32_t)cfg->block_size;
  c->geom.dtype = (int32_t)cfg->dtype;
  c->geom.block_elems =
      2 * (int64_t)cfg->num_kv_heads * cfg->block_size * cfg->head_dim;
  c->block_bytes = (size_t)c->geom.block_elems * c->elem_size;

  uint32_t ms = cfg->max_seqs;
  c->slots = pvl__alloc(a, ms * sizeof(pvl_seq *));
  c->slot_gen = pvl__alloc(a, ms * sizeof(uint64_t));
  c->free_slots = pvl__alloc(a, ms * sizeof(uint32_t));
  c->layer_tokens = pvl__alloc(a, cfg->num_layers * sizeof(uint64_t));
  if (!c->slots || !c->slot_gen || !c->free_slots || !c->layer_tokens) {
    cache_free_meta(c);
    return pvl__fail(NULL, PVL_ERR_NO_MEMORY, "pvl_cache_create",
                     "sequence slots");
  }
  for (uint32_t i = 0; i < ms; i++) {
    c->slots[i] = NULL;
    c->slot_gen[i] = 0;
    c->free_slots[i] = ms - 1 - i;
  }
  c->num_free_slots = ms;
  memset(c->layer_tokens, 0, cfg->num_layers * sizeof(uint64_t));

  /* The backend derives num_blocks (if 0) and allocates the storage. */
  pvl_status st = be->init(c);
  if (st != PVL_SUCCESS) {
    /* be->init recorded its message in c->err; move it where
     * pvl_create_last_error finds it. */
    memcpy(g_create_err, c->err, PVL_ERRMSG_LEN);
    prepend(g_create_err, "pvl_cache_create");
    cache_free_meta(c);
    return st;
  }
  st = pvl__pool_init(&c->pool, a, c->cfg.num_blocks);
  if (st != PVL_SUCCESS) {
    const uint32_t nb = c->cfg.num_blocks;
    be->fini(c);
    cache_free_meta(c);
    return pvl__fail(NULL, st, "pvl_cache_create",
                     "pool metadata for %u blocks", nb);
  }
  c->err[0] = '\0';
  *out = c;
  return PVL_SUCCESS;
}

/* The cache of one rank (dist.c adds the agreement of a split cache). */
static pvl_status create_local(const pvl_config *cfg, pvl_cache **out) {
  pvl_status st = check_config(cfg);
  if (st != PVL_SUCCESS) return st;
  const pvl_backend_ops *be = NULL;
  st = pick_backend(cfg, &be);
  if (st != PVL_SUCCESS) return st;
  st = create_on(cfg, be, out);
  /* AUTO falls back to the CPU when no device or driver is usable, or the
   * kernels do not take this shape or dtype; pvl_cache_config says which
   * backend was chosen. */
  if ((st == PVL_ERR_NO_DEVICE || st == PVL_ERR_UNSUPPORTED) &&
      cfg->backend == PVL_BACKEND_AUTO && be != &pvl__cpu_backend)
    st = create_on(cfg, &pvl__cpu_backend, out);
  if (st == PVL_SUCCESS) {
    pvl_cache *c = *out;
    c->cfg.backend =
        c->be == &pvl__cpu_backend ? PVL_BACKEND_CPU : PVL_BACKEND_CUDA;
  }
  return st;
}

pvl_status pvl_cache_create(const pvl_config *cfg, pvl_cache **out) {
  if (!cfg || !out)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "cfg or out is NULL");
  /* The communicator field exists only in a config of this size. */
  if (cfg->size == sizeof(pvl_config) && cfg->comm)
    return pvl__dist_cache_create(cfg, out, create_local);
  return create_local(cfg, out);
}

pvl_status pvl_cache_destroy(pvl_cache *c) {
  if (!c) return PVL_SUCCESS;
  pvl__plan_destroy_all(c);
  pvl__seq_free_all(c);
  pvl__dist_free(c);
  c->be->fini(c);
  cache_free_meta(c);
  return PVL_SUCCESS;
}

pvl_status pvl_cache_config(const pvl_cache *c, pvl_config *out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  *out = c->cfg;
  return PVL_SUCCESS;
}

pvl_status pvl_cache_get_stats(const pvl_cache *c, pvl_stats *out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  pvl_stats s;
  memset(&s, 0, sizeof(s));
  s.num_blocks = c->pool.num_blocks;
  s.free_blocks = c->pool.num_free;
  s.used_blocks = c->pool.num_blocks - c->pool.num_free;
  s.shared_blocks = c->pool.num_shared;
  s.num_seqs = c->num_seqs;
  for (uint32_t l = 0; l < c->cfg.num_layers; l++) s.tokens += c->layer_tokens[l];
  s.block_bytes = c->block_bytes;
  s.pool_bytes = (uint64_t)c->block_bytes * c->pool.num_blocks;
  *out = s;
  return PVL_SUCCESS;
}

pvl_status pvl_cache_layer_tokens(const pvl_cache *c, uint64_t *out,
                                  uint32_t n_layers) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  if (n_layers != c->cfg.num_layers)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "n_layers = %u, the cache has %u layers", n_layers,
                    c->cfg.num_layers);
  memcpy(out, c->layer_tokens, n_layers * sizeof(uint64_t));
  return PVL_SUCCESS;
}
