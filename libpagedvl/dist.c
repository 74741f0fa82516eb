/* A model's cache split over several ranks: the rank's range (layers or KV
 * heads), the agreement of every collective call (each rank's status and a
 * fingerprint of its arguments, so one failing rank makes all fail and
 * none changes anything), and the statistics pvl_compress and
 * pvl_decode_cap combine across ranks so every rank computes the budgets
 * and selections one cache holding the whole model would. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

/* Bytes of the failure message each rank contributes to an agreement. */
#define MSG_BYTES 240

static const char *const g_call_names[PVL_CALL_COUNT_] = {
    [PVL_CALL_CREATE] = "pvl_cache_create",
    [PVL_CALL_SEQ_ADD] = "pvl_seq_add",
    [PVL_CALL_SEQ_FORK] = "pvl_seq_fork",
    [PVL_CALL_SEQ_APPEND] = "pvl_seq_append",
    [PVL_CALL_SEQ_RETAIN] = "pvl_seq_retain",
    [PVL_CALL_CAN_ADD] = "pvl_can_add",
    [PVL_CALL_COMPRESS] = "pvl_compress",
    [PVL_CALL_DECODE_CAP] = "pvl_decode_cap",
};

const char *pvl__dist_tag_name(uint32_t tag) {
  const uint32_t call = tag >> 8;
  return call > 0 && call < PVL_CALL_COUNT_ ? g_call_names[call] : "?";
}

uint64_t pvl__fp(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

static uint64_t fp_u64(uint64_t h, uint64_t v) { return pvl__fp(h, &v, 8); }

/* ---- agreement ---- */

/* What each rank sends at an agreement point. */
typedef struct agree_hdr {
  int32_t status;
  uint32_t call;
  uint64_t fp;
} agree_hdr;

/* Exchange buffers of a communicator's agreements, made with the cache's
 * dist state (never allocated during an exchange, where a failure could
 * not be reported to the other ranks). */
typedef struct agree_bufs {
  agree_hdr *hdr; /* [nranks] */
  char *msg;      /* [nranks][MSG_BYTES] */
} agree_bufs;

/* Every rank's status and fingerprint. The message of a failing rank is
 * then gathered too (every rank sees the failure, so every rank makes
 * that second exchange), and every rank returns the status of the lowest
 * failing rank, with its reason. `err` is the cache's message buffer, or
 * NULL during creation (then the thread's pvl_create_last_error). */
static pvl_status agree_raw(pvl_comm *m, const agree_bufs *b, uint32_t tag,
                            pvl_status st, uint64_t fp, const pvl_cache *c,
                            const char *fn) {
  const uint32_t n = (uint32_t)m->size;
  agree_hdr mine = {(int32_t)st, tag >> 8, fp};
  char cm[PVL_ERRMSG_LEN];
  pvl_status cs =
      m->ops->allgather(m, &mine, b->hdr, sizeof(mine), tag, cm, sizeof(cm));
  if (cs != PVL_SUCCESS) return pvl__fail(c, cs, fn, "%s", cm);
  uint32_t bad = n;
  for (uint32_t r = 0; r < n && bad == n; r++)
    if (b->hdr[r].status != PVL_SUCCESS) bad = r;
  if (bad < n) {
    char own[MSG_BYTES];
    memset(own, 0, sizeof(own));
    if (st != PVL_SUCCESS) {
      const char *e = c ? pvl_cache_last_error(c) : pvl_create_last_error();
      snprintf(own, sizeof(own), "%s", e);
    }
    cs = m->ops->allgather(m, own, b->msg, MSG_BYTES, tag | 0x80u, cm,
                           sizeof(cm));
    if (cs != PVL_SUCCESS) return pvl__fail(c, cs, fn, "%s", cm);
    char *theirs = b->msg + (size_t)bad * MSG_BYTES;
    theirs[MSG_BYTES - 1] = '\0';
    return pvl__fail(c, (pvl_status)b->hdr[bad].status, fn,
                     "rank %u of %u failed, so every rank did: %s", bad, n,
                     theirs);
  }
  for (uint32_t r = 1; r < n; r++) {
    if (b->hdr[r].call != b->hdr[0].call)
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "collective order mismatch: rank 0 called %s while "
                       "rank %u called %s",
                       pvl__dist_tag_name(b->hdr[0].call << 8), r,
                       pvl__dist_tag_name(b->hdr[r].call << 8));
    if (b->hdr[r].fp != b->hdr[0].fp)
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "ranks disagree: rank %u's arguments or state "
                       "(fingerprint %016llx) differ from rank 0's "
                       "(%016llx); collective calls need the same "
                       "arguments and sequences on every rank",
                       r, (unsigned long long)b->hdr[r].fp,
                       (unsigned long long)b->hdr[0].fp);
  }
  return PVL_SUCCESS;
}

/* The dist state of a cache, with the agreement buffers behind it. */
typedef struct dist_block {
  pvl_dist d;
  agree_bufs b;
  size_t bytes;
} dist_block;

static dist_block *blk(pvl_dist *d) { return (dist_block *)d; }

static uint32_t cur_tag(const pvl_dist *d) {
  return d->call << 8 | (d->step & 0x7fu);
}

pvl_status pvl__dist_agree(pvl_cache *c, pvl_status st, uint64_t fp,
                           const char *fn) {
  pvl_dist *d = c ? c->dist : NULL;
  if (!d || !d->call || d->settled) return st;
  pvl_status r = agree_raw(d->comm, &blk(d)->b, cur_tag(d), st, fp, c, fn);
  d->step++;
  if (r != PVL_SUCCESS) d->settled = true;
  return r;
}

/* Room for exchanges of `bytes` per rank, before the agreement. */
static pvl_status reserve(pvl_cache *c, pvl_status st, size_t bytes,
                          const char *fn) {
  pvl_comm *m = c->dist->comm;
  if (st != PVL_SUCCESS || !m->ops->reserve) return st;
  char cm[PVL_ERRMSG_LEN];
  pvl_status r = m->ops->reserve(m, bytes, cm, sizeof(cm));
  return r == PVL_SUCCESS ? r : pvl__fail(c, r, fn, "%s", cm);
}

/* A data exchange after a successful agreement: all ranks make it. */
static pvl_status exchange(pvl_cache *c, const void *in, void *out,
                           size_t bytes, const char *fn) {
  pvl_dist *d = c->dist;
  char cm[PVL_ERRMSG_LEN];
  pvl_status st = d->comm->ops->allgather(d->comm, in, out, bytes, cur_tag(d),
                                          cm, sizeof(cm));
  d->step++;
  if (st != PVL_SUCCESS) {
    d->settled = true;
    return pvl__fail(c, st, fn, "%s", cm);
  }
  return PVL_SUCCESS;
}

bool pvl__dist_begin(pvl_cache *c, uint32_t call) {
  pvl_dist *d = c ? c->dist : NULL;
  if (!d) return false;
  /* Calls that touch only this rank's own layers are local when split by
   * layers: retain and the decode cap act on one layer. */
  if (d->split == PVL_SPLIT_LAYERS &&
      (call == PVL_CALL_SEQ_RETAIN || call == PVL_CALL_DECODE_CAP)) {
    d->call = 0;
    return false;
  }
  d->call = call;
  d->step = 0;
  d->settled = false;
  d->seq++;
  return true;
}

pvl_status pvl__dist_end(pvl_cache *c, pvl_status st) {
  pvl_dist *d = c ? c->dist : NULL;
  if (!d || !d->call) return st;
  /* The body failed here before its exchanges: the other ranks wait at the
   * next agreement point, so join it with the failure. */
  if (st != PVL_SUCCESS && !d->settled) {
    pvl_status r = pvl__dist_agree(c, st, 0, g_call_names[d->call]);
    st = r;
  }
  d->call = 0;
  return st;
}

pvl_status pvl__dist_max_i32(pvl_cache *c, int32_t *v, const char *fn) {
  pvl_dist *d = c->dist;
  /* The header buffer holds n * 16 bytes: room for n int32 values. */
  int32_t *all = (int32_t *)blk(d)->b.hdr;
  pvl_status st = exchange(c, v, all, sizeof(*v), fn);
  if (st != PVL_SUCCESS) return st;
  for (uint32_t r = 0; r < d->nranks; r++)
    if (all[r] > *v) *v = all[r];
  return PVL_SUCCESS;
}

/* ---- creation ---- */

/* What a rank tells the others at creation: its range and everything
 * that must be the same on every rank. */
typedef struct create_info {
  uint32_t begin, count;
  uint32_t split, backend, dtype, head_dim, block_size, max_seqs;
  uint32_t layers;     /* model layers (LAYERS) or the cache's (HEADS) */
  uint32_t kv_heads;   /* model KV heads (HEADS) or the cache's (LAYERS) */
  uint32_t group;      /* query heads per KV head */
  uint32_t num_blocks; /* HEADS: the pools must match; LAYERS: 0 */
} create_info;

/* Resolves this rank's range into cfg (num_layers/layer_begin or
 * num_kv_heads/num_q_heads/kv_head_begin). Local checks only. */
static pvl_status resolve(pvl_config *cfg, const pvl_comm *m) {
#define BAD(...)                                                               \
  pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, "pvl_cache_create", __VA_ARGS__)
  const uint32_t n = (uint32_t)m->size, r = (uint32_t)m->rank;
  switch (cfg->split) {
  case PVL_SPLIT_NONE:
    if (n > 1)
      return BAD("split = PVL_SPLIT_NONE with a communicator of %u ranks: "
                 "choose PVL_SPLIT_LAYERS or PVL_SPLIT_HEADS",
                 n);
    return PVL_SUCCESS;
  case PVL_SPLIT_LAYERS: {
    const uint32_t L = cfg->model_num_layers;
    if (L == 0) return BAD("split by layers needs model_num_layers >= 1");
    if (cfg->num_layers == 0) {
      pvl_split_range(L, n, r, &cfg->layer_begin, &cfg->num_layers);
      if (cfg->num_layers == 0)
        return BAD("%u layers over %u ranks leave rank %u without a layer", L,
                   n, r);
    } else if (cfg->layer_begin > L || cfg->num_layers > L - cfg->layer_begin) {
      return BAD("layers [%u, %u + %u) are outside the model's %u layers",
                 cfg->layer_begin, cfg->layer_begin, cfg->num_layers, L);
    }
    return PVL_SUCCESS;
  }
  case PVL_SPLIT_HEADS: {
    const uint32_t H = cfg->model_num_kv_heads;
    if (H == 0) return BAD("split by heads needs model_num_kv_heads >= 1");
    if (cfg->num_kv_heads == 0) {
      if (cfg->num_q_heads == 0 || cfg->num_q_heads % H != 0)
        return BAD("num_kv_heads = 0 (even split) needs num_q_heads = the "
                   "model's query heads, a multiple of model_num_kv_heads = "
                   "%u; got %u",
                   H, cfg->num_q_heads);
      const uint32_t group = cfg->num_q_heads / H;
      pvl_split_range(H, n, r, &cfg->kv_head_begin, &cfg->num_kv_heads);
      if (cfg->num_kv_heads == 0)
        return BAD("%u KV heads over %u ranks leave rank %u without a head", H,
                   n, r);
      cfg->num_q_heads = group * cfg->num_kv_heads;
    } else if (cfg->kv_head_begin > H ||
               cfg->num_kv_heads > H - cfg->kv_head_begin) {
      return BAD("KV heads [%u, %u + %u) are outside the model's %u",
                 cfg->kv_head_begin, cfg->kv_head_begin, cfg->num_kv_heads, H);
    }
    return PVL_SUCCESS;
  }
  }
  return BAD("unknown split %d", (int)cfg->split);
#undef BAD
}

static create_info info_of(const pvl_cache *c) {
  const pvl_config *k = &c->cfg;
  create_info ci;
  memset(&ci, 0, sizeof(ci));
  const bool by_layers = k->split == PVL_SPLIT_LAYERS;
  const bool by_heads = k->split == PVL_SPLIT_HEADS;
  ci.begin = by_layers ? k->layer_begin : by_heads ? k->kv_head_begin : 0;
  ci.count = by_layers ? k->num_layers : k->num_kv_heads;
  ci.split = (uint32_t)k->split;
  ci.backend = (uint32_t)k->backend;
  ci.dtype = (uint32_t)k->dtype;
  ci.head_dim = k->head_dim;
  ci.block_size = k->block_size;
  ci.max_seqs = k->max_seqs;
  ci.layers = by_layers ? k->model_num_layers : k->num_layers;
  ci.kv_heads = by_heads ? k->model_num_kv_heads : k->num_kv_heads;
  ci.group = k->num_q_heads / k->num_kv_heads;
  ci.num_blocks = by_layers ? 0 : k->num_blocks;
  return ci;
}

/* The first field in which rank r differs from rank 0, or NULL. */
static const char *info_diff(const create_info *a, const create_info *b) {
#define F(f)                                                                   \
  if (a->f != b->f) return #f
  F(split);
  F(backend);
  F(dtype);
  F(head_dim);
  F(block_size);
  F(max_seqs);
  F(layers);
  F(kv_heads);
  F(group);
  F(num_blocks);
  return NULL;
#undef F
}

static dist_block *dist_new(uint32_t n) {
  const size_t bytes = sizeof(dist_block) + 2 * n * sizeof(uint32_t) +
                       n * sizeof(agree_hdr) + (size_t)n * MSG_BYTES +
                       n * sizeof(create_info) + 16;
  dist_block *b = pvl__alloc(pvl__default_allocator(), bytes);
  if (!b) return NULL;
  memset(b, 0, bytes);
  b->bytes = bytes;
  char *p = (char *)(b + 1);
  b->b.hdr = (agree_hdr *)p;
  p += n * sizeof(agree_hdr);
  b->d.begin = (uint32_t *)p;
  b->d.count = b->d.begin + n;
  p += 2 * n * sizeof(uint32_t);
  b->b.msg = p;
  b->d.nranks = n;
  return b;
}

/* Scratch for the creation exchange, after the message buffer. */
static create_info *dist_infos(dist_block *b) {
  char *p = b->b.msg + (size_t)b->d.nranks * MSG_BYTES;
  return (create_info *)(((uintptr_t)p + 7) & ~(uintptr_t)7);
}

void pvl__dist_free(pvl_cache *c) {
  if (!c->dist) return;
  dist_block *b = blk(c->dist);
  pvl__free(pvl__default_allocator(), b, b->bytes);
  c->dist = NULL;
}

/* Checks that the ranks' ranges tile [0, total) (in any rank order).
 * Every rank checks the same gathered data, so all agree on the verdict. */
static pvl_status check_tiling(const pvl_dist *d, uint32_t total,
                               const char *what) {
  uint32_t at = 0;
  for (uint32_t k = 0; k < d->nranks; k++) {
    uint32_t who = d->nranks;
    for (uint32_t r = 0; r < d->nranks; r++)
      if (d->begin[r] == at && d->count[r] > 0) who = r;
    if (who == d->nranks)
      return pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, "pvl_cache_create",
                       "the ranks' %s ranges do not tile [0, %u): no rank "
                       "starts at %u (ranges overlap or leave a gap)",
                       what, total, at);
    at += d->count[who];
  }
  if (at != total)
    return pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, "pvl_cache_create",
                     "the ranks' %s ranges cover [0, %u), the model has %u",
                     what, at, total);
  return PVL_SUCCESS;
}

pvl_status pvl__dist_cache_create(const pvl_config *cfg, pvl_cache **out,
                                  pvl_status (*make)(const pvl_config *,
                                                     pvl_cache **)) {
  static const char fn[] = "pvl_cache_create";
  pvl_comm *m = cfg->comm;
  const uint32_t n = (uint32_t)m->size;
  pvl_config rc = *cfg;
  pvl_cache *c = NULL;
  /* The agreement buffers come first: without them this rank could not
   * tell the others that it failed. */
  dist_block *b = dist_new(n);
  if (!b) return PVL_FAIL(NULL, PVL_ERR_NO_MEMORY, "agreement buffers");
  pvl_status st = resolve(&rc, m);
  if (st == PVL_SUCCESS) st = make(&rc, &c);
  if (st == PVL_SUCCESS && m->device >= 0 &&
      c->cfg.backend == PVL_BACKEND_CUDA && c->cfg.device != m->device)
    st = pvl__fail(NULL, PVL_ERR_INVALID_ARGUMENT, fn,
                   "cache device %d differs from the communicator's device "
                   "%d",
                   c->cfg.device, m->device);
  const uint32_t tag = PVL_CALL_CREATE << 8;
  st = agree_raw(m, &b->b, tag, st, 0, NULL, fn);
  create_info mine, *all = dist_infos(b);
  if (st == PVL_SUCCESS) {
    mine = info_of(c);
    char cm[PVL_ERRMSG_LEN];
    st = m->ops->allgather(m, &mine, all, sizeof(mine), tag | 1u, cm,
                           sizeof(cm));
    if (st != PVL_SUCCESS) pvl__fail(NULL, st, fn, "%s", cm);
  }
  pvl_dist *d = &b->d;
  if (st == PVL_SUCCESS) {
    for (uint32_t r = 0; r < n; r++) {
      d->begin[r] = all[r].begin;
      d->count[r] = all[r].count;
      if (all[r].count > d->max_count) d->max_count = all[r].count;
    }
    for (uint32_t r = 1; r < n && st == PVL_SUCCESS; r++) {
      const char *f = info_diff(&all[0], &all[r]);
      if (f)
        st = pvl__fail(NULL, PVL_ERR_BAD_STATE, fn,
                       "ranks disagree: rank %u's %s differs from rank 0's "
                       "(the ranks must share everything but their range%s)",
                       r, f,
                       cfg->split == PVL_SPLIT_HEADS
                           ? "; split by heads, the pools too"
                           : "");
    }
  }
  if (st == PVL_SUCCESS && rc.split == PVL_SPLIT_LAYERS)
    st = check_tiling(d, rc.model_num_layers, "layer");
  if (st == PVL_SUCCESS && rc.split == PVL_SPLIT_HEADS)
    st = check_tiling(d, rc.model_num_kv_heads, "KV head");
  if (st != PVL_SUCCESS) {
    pvl_cache_destroy(c);
    pvl__free(pvl__default_allocator(), b, b->bytes);
    return st;
  }
  d->comm = m;
  d->split = rc.split;
  d->rank = (uint32_t)m->rank;
  d->group = c->cfg.num_q_heads / c->cfg.num_kv_heads;
  d->model_layers =
      rc.split == PVL_SPLIT_LAYERS ? rc.model_num_layers : c->cfg.num_layers;
  d->model_q_heads = rc.split == PVL_SPLIT_HEADS
                         ? rc.model_num_kv_heads * d->group
                         : c->cfg.num_q_heads;
  c->dist = d;
  *out = c;
  return PVL_SUCCESS;
}

/* ---- compression statistics ---- */

static uint64_t fp_policy(uint64_t h, const pvl_policy *p) {
  h = fp_u64(h, (uint64_t)p->kind);
  const float f[] = {p->keep_ratio, p->threshold, p->min_layer_ratio,
                     p->recent_ratio, p->pyramid_beta};
  const uint32_t u[] = {p->window_cap,  p->fallback_window, p->renormalize,
                        p->sink_tokens, p->snap_window,     p->pool_kernel,
                        p->decode_cap,  p->decode_cap_slack};
  h = pvl__fp(h, f, sizeof(f));
  return pvl__fp(h, u, sizeof(u));
}

static bool scored(const pvl_policy *p) {
  return p->kind != PVL_POLICY_FULL && p->kind != PVL_POLICY_STREAMING;
}

void pvl__dist_stats_free(pvl_cache *c, pvl_dist_stats *ds) {
  if (ds->mem) pvl__free(c->alloc, ds->mem, ds->bytes);
  memset(ds, 0, sizeof(*ds));
}

/* Split by layers: each rank's d_l, gathered into the model's layer
 * order. */
static pvl_status stats_layers(pvl_cache *c, const pvl_seq *s,
                               const pvl_policy *p, pvl_dist_stats *ds,
                               uint64_t fp, const char *fn) {
  pvl_dist *d = c->dist;
  const uint32_t L = c->cfg.num_layers, mc = d->max_count;
  ds->bytes =
      ((size_t)d->model_layers + (size_t)mc * (d->nranks + 1)) * sizeof(float);
  ds->mem = pvl__alloc(c->alloc, ds->bytes);
  pvl_status st = PVL_SUCCESS;
  if (!ds->mem)
    st = pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "density exchange (%zu bytes)",
                   ds->bytes);
  st = reserve(c, st, (size_t)mc * sizeof(float), fn);
  st = pvl__dist_agree(c, st, fp, fn);
  if (st != PVL_SUCCESS) return st;
  float *all = ds->mem, *in = all + d->model_layers, *got = in + mc;
  /* d_l of this rank's layers, as compress.c computes it (each layer holds
   * every head when split by layers). */
  memset(in, 0, (size_t)mc * sizeof(float));
  for (uint32_t l = 0; l < L && p->kind == PVL_POLICY_VLCACHE; l++)
    in[l] = (float)(1.0 - pvl__gamma(s->obs[l]->below, s->obs[l]->total,
                                     c->cfg.num_q_heads, NULL));
  for (uint32_t l = 0; l < L && p->kind != PVL_POLICY_VLCACHE; l++)
    in[l] = 1.0f;
  st = exchange(c, in, got, (size_t)mc * sizeof(float), fn);
  if (st != PVL_SUCCESS) return st;
  for (uint32_t r = 0; r < d->nranks; r++)
    memcpy(all + d->begin[r], got + (size_t)r * mc,
           d->count[r] * sizeof(float));
  ds->density_all = all;
  return PVL_SUCCESS;
}

/* Split by heads: the raw per-key sums added over ranks (in rank order,
 * so bit-identical on every rank) and the per-head threshold counts
 * placed in model head order, layer by layer. */
static pvl_status stats_heads(pvl_cache *c, const pvl_seq *s,
                              pvl_dist_stats *ds, uint64_t fp, const char *fn) {
  pvl_dist *d = c->dist;
  const uint32_t L = c->cfg.num_layers, n = d->nranks;
  const uint32_t hq = c->cfg.num_q_heads, HQ = d->model_q_heads;
  const size_t mq = (size_t)d->max_count * d->group; /* padded q heads */
  uint32_t max_keys = 0;
  size_t keys_all = 0;
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t k = s->obs[l]->n_keys;
    if (k > max_keys) max_keys = k;
    keys_all += k;
  }
  /* Layout: obs ptrs [L] | obs structs [L] | raw [keys_all] doubles |
   * counts [L][2][HQ] | send counts [L][2][mq] | received counts
   * [n][L][2][mq] | received raw [n][max_keys] doubles. */
  const size_t b_ptr = ((L * sizeof(pvl_obs *)) + 7) & ~(size_t)7;
  const size_t b_obs = L * sizeof(pvl_obs);
  const size_t b_raw = keys_all * sizeof(double);
  const size_t b_cnt = (size_t)L * 2 * HQ * sizeof(uint64_t);
  const size_t b_snd = (size_t)L * 2 * mq * sizeof(uint64_t);
  const size_t b_rcv = n * b_snd;
  const size_t b_rr = (size_t)n * max_keys * sizeof(double);
  ds->bytes = b_ptr + b_obs + b_raw + b_cnt + b_snd + b_rcv + b_rr;
  ds->mem = pvl__alloc(c->alloc, ds->bytes);
  pvl_status st = PVL_SUCCESS;
  if (!ds->mem)
    st = pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "observation exchange (%zu bytes)",
                   ds->bytes);
  /* The observed rows and which rows saw each key are the same on every
   * rank (same sequence, same window): they join the fingerprint. */
  for (uint32_t l = 0; l < L; l++) {
    const pvl_obs *o = s->obs[l];
    fp = fp_u64(fp, ((uint64_t)o->n_keys << 32) | o->n_rows);
    fp = pvl__fp(fp, o->seen, (size_t)o->n_keys * sizeof(uint32_t));
  }
  st = reserve(c, st,
               b_snd > max_keys * sizeof(double) ? b_snd
                                                 : max_keys * sizeof(double),
               fn);
  st = pvl__dist_agree(c, st, fp, fn);
  if (st != PVL_SUCCESS) return st;
  char *mem = ds->mem;
  pvl_obs **ptr = (pvl_obs **)mem;
  pvl_obs *obs = (pvl_obs *)(mem + b_ptr);
  double *raw = (double *)(mem + b_ptr + b_obs);
  uint64_t *cnt = (uint64_t *)(mem + b_ptr + b_obs + b_raw);
  uint64_t *snd = cnt + (size_t)L * 2 * HQ;
  uint64_t *rcv = snd + (size_t)L * 2 * mq;
  double *rr = (double *)(rcv + (size_t)n * L * 2 * mq);

  memset(snd, 0, b_snd);
  for (uint32_t l = 0; l < L; l++) {
    memcpy(snd + (size_t)l * 2 * mq, s->obs[l]->below, hq * sizeof(uint64_t));
    memcpy(snd + (size_t)l * 2 * mq + mq, s->obs[l]->total,
           hq * sizeof(uint64_t));
  }
  st = exchange(c, snd, rcv, b_snd, fn);
  if (st != PVL_SUCCESS) return st;
  size_t at = 0;
  for (uint32_t l = 0; l < L; l++) {
    const pvl_obs *o = s->obs[l];
    pvl_obs *g = &obs[l];
    memset(g, 0, sizeof(*g));
    g->epoch = o->epoch;
    g->n_keys = o->n_keys;
    g->n_rows = o->n_rows;
    g->seen = o->seen; /* identical on every rank (fingerprinted) */
    g->raw = raw + at;
    g->below = cnt + (size_t)l * 2 * HQ;
    g->total = g->below + HQ;
    at += o->n_keys;
    for (uint32_t r = 0; r < n; r++) {
      const uint64_t *src = rcv + ((size_t)r * L + l) * 2 * mq;
      const size_t h0 = (size_t)d->begin[r] * d->group;
      const size_t nh = (size_t)d->count[r] * d->group;
      memcpy(g->below + h0, src, nh * sizeof(uint64_t));
      memcpy(g->total + h0, src + mq, nh * sizeof(uint64_t));
    }
    st = exchange(c, o->raw, rr, (size_t)o->n_keys * sizeof(double), fn);
    if (st != PVL_SUCCESS) return st;
    for (uint32_t j = 0; j < o->n_keys; j++) {
      double sum = 0.0;
      for (uint32_t r = 0; r < n; r++) sum += rr[(size_t)r * o->n_keys + j];
      g->raw[j] = sum;
    }
    ptr[l] = g;
  }
  ds->obs = ptr;
  return PVL_SUCCESS;
}

pvl_status pvl__dist_compress_stats(pvl_cache *c, const pvl_seq *s,
                                    const pvl_policy *p, pvl_dist_stats *ds,
                                    const char *fn) {
  memset(ds, 0, sizeof(*ds));
  pvl_dist *d = c->dist;
  if (!d || !d->call) return PVL_SUCCESS;
  uint64_t fp = fp_u64(PVL_FP_INIT, s->id);
  fp = fp_u64(fp, ((uint64_t)s->n_prompt << 32) | s->n_decoded);
  fp = fp_policy(fp, p);
  if (d->split == PVL_SPLIT_LAYERS) return stats_layers(c, s, p, ds, fp, fn);
  if (!scored(p)) return pvl__dist_agree(c, PVL_SUCCESS, fp, fn);
  return stats_heads(c, s, ds, fp, fn);
}

pvl_status pvl__dist_budgets(const pvl_cache *c, const pvl_dist_stats *ds,
                             const pvl_policy *p, uint32_t m,
                             const float *density, uint32_t *budget) {
  const uint32_t L = c->cfg.num_layers;
  if (!ds->density_all) return pvl_policy_budgets(p, L, m, density, budget);
  const pvl_dist *d = c->dist;
  const uint32_t LG = d->model_layers;
  uint32_t *all = pvl__alloc(c->alloc, LG * sizeof(uint32_t));
  if (!all)
    return pvl__fail(NULL, PVL_ERR_NO_MEMORY, "pvl_policy_budgets",
                     "budgets of %u layers", LG);
  pvl_status st = pvl_policy_budgets(p, LG, m, ds->density_all, all);
  if (st == PVL_SUCCESS)
    memcpy(budget, all + d->begin[d->rank], L * sizeof(uint32_t));
  pvl__free(c->alloc, all, LG * sizeof(uint32_t));
  return st;
}

/* ---- decode cap, split by heads ---- */

void pvl__dist_obs_free(pvl_cache *c, pvl_obs *o) {
  if (!o) return;
  const uint32_t n = c->dist->nranks;
  pvl__free(c->alloc, o,
            sizeof(*o) + (size_t)(n + 1) * o->n_keys * sizeof(double));
}

pvl_status pvl__dist_layer_obs(pvl_cache *c, const pvl_obs *o, pvl_obs **out,
                               const char *fn) {
  pvl_dist *d = c->dist;
  const uint32_t n = d->nranks, k = o->n_keys;
  const size_t bytes = sizeof(pvl_obs) + (size_t)(n + 1) * k * sizeof(double);
  pvl_obs *g = pvl__alloc(c->alloc, bytes);
  pvl_status st = PVL_SUCCESS;
  if (!g)
    st = pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "score exchange (%zu bytes)",
                   bytes);
  uint64_t fp = fp_u64(PVL_FP_INIT, ((uint64_t)k << 32) | o->n_rows);
  fp = pvl__fp(fp, o->seen, (size_t)k * sizeof(uint32_t));
  st = reserve(c, st, (size_t)k * sizeof(double), fn);
  st = pvl__dist_agree(c, st, fp, fn);
  if (st != PVL_SUCCESS) {
    if (g) pvl__free(c->alloc, g, bytes);
    return st;
  }
  *g = *o;
  g->raw = (double *)(g + 1);
  double *rr = g->raw + k;
  st = exchange(c, o->raw, rr, (size_t)k * sizeof(double), fn);
  if (st != PVL_SUCCESS) {
    pvl__free(c->alloc, g, bytes);
    return st;
  }
  for (uint32_t j = 0; j < k; j++) {
    double sum = 0.0;
    for (uint32_t r = 0; r < n; r++) sum += rr[(size_t)r * k + j];
    g->raw[j] = sum;
  }
  *out = g;
  return PVL_SUCCESS;
}
