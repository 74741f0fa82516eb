/* Batch plans: the per-layer page tables of a decode batch as the kernels
 * read them (layout in kernels/pvl_kernels.h). Tables stay resident on the
 * device; a build sends only what changed since the last one, as (index,
 * value) pairs, and skips every sequence whose version it already holds, so
 * a decode step costs O(batch + changes) host work and O(changes) bytes,
 * not O(blocks held). */
#include <math.h>
#include <string.h>

#include "internal.h"

enum {
  ROW_KEEP = 0,     /* same table: send appended ids and a changed base */
  ROW_REWRITE = 1,  /* other table or epoch, fits the row: rewrite it */
  ROW_RELOCATE = 2, /* outgrew the row: new region at the array's end */
};

static inline uint32_t row_slack(uint32_t nb) { return 2 + nb / 8; }

static void plan_free(pvl_plan *p) {
  pvl_cache *c = p->cache;
  const pvl_allocator *a = c->alloc;
  const size_t L = c->cfg.num_layers, S = p->max_seqs;
  if (p->be_state || p->host_buf) c->be->plan_fini(p);
  pvl__free(a, p->rows, L * S * sizeof(pvl_plan_row));
  pvl__free(a, p->row_seq, S * sizeof(pvl_seq_id));
  pvl__free(a, p->row_version, S * sizeof(uint64_t));
  pvl__free(a, p->n_appended, S * sizeof(int32_t));
  pvl__free(a, p->seqs, S * sizeof(pvl_seq *));
  pvl__free(a, p->action, L * S);
  pvl__free(a, p->skip, S);
  pvl__free(a, p->pairs, p->pairs_cap * 2 * sizeof(int32_t));
  pvl__free(a, p, sizeof(*p));
}

pvl_status pvl_plan_create(pvl_cache *c, uint32_t max_seqs,
                           uint64_t block_capacity, pvl_plan **out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  if (max_seqs == 0 || max_seqs > c->cfg.max_seqs)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "max_seqs = %u, must be in [1, %u]", max_seqs,
                    c->cfg.max_seqs);
  const uint32_t L = c->cfg.num_layers;
  uint64_t cap = block_capacity;
  if (cap == 0)
    cap = (uint64_t)c->pool.num_blocks * 5 / 4 + 4 * (uint64_t)L * max_seqs;
  /* Pair indices are int32, so the whole buffer must be addressable. */
  if (cap > INT32_MAX ||
      pvl_plan_buf_elems((int32_t)L, (int32_t)max_seqs, (int64_t)cap) >
          INT32_MAX)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "block_capacity = %llu with %u layers x %u rows exceeds "
                    "2^31 entries",
                    (unsigned long long)cap, L, max_seqs);

  const pvl_allocator *a = c->alloc;
  pvl_plan *p = pvl__alloc(a, sizeof(*p));
  if (!p) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan struct");
  memset(p, 0, sizeof(*p));
  p->cache = c;
  p->max_seqs = max_seqs;
  p->block_cap = cap;
  p->view.num_layers = (int32_t)L;
  p->view.max_seqs = (int32_t)max_seqs;
  p->view.block_cap = (int64_t)cap;
  const size_t S = max_seqs;
  p->pairs_cap = 1024;
  p->rows = pvl__alloc(a, (size_t)L * S * sizeof(pvl_plan_row));
  p->row_seq = pvl__alloc(a, S * sizeof(pvl_seq_id));
  p->row_version = pvl__alloc(a, S * sizeof(uint64_t));
  p->n_appended = pvl__alloc(a, S * sizeof(int32_t));
  p->seqs = pvl__alloc(a, S * sizeof(pvl_seq *));
  p->action = pvl__alloc(a, (size_t)L * S);
  p->skip = pvl__alloc(a, S);
  p->pairs = pvl__alloc(a, p->pairs_cap * 2 * sizeof(int32_t));
  if (!p->rows || !p->row_seq || !p->row_version || !p->n_appended ||
      !p->seqs || !p->action || !p->skip || !p->pairs) {
    plan_free(p);
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan metadata for %u sequences",
                    max_seqs);
  }
  memset(p->rows, 0, (size_t)L * S * sizeof(pvl_plan_row));
  memset(p->row_seq, 0, S * sizeof(pvl_seq_id));
  memset(p->row_version, 0, S * sizeof(uint64_t));
  memset(p->n_appended, 0, S * sizeof(int32_t));
  pvl_status st = c->be->plan_init(p);
  if (st != PVL_SUCCESS) {
    plan_free(p);
    return PVL_PREFIX(c, st);
  }
  p->info.max_seqs = max_seqs;
  p->info.block_capacity = cap;
  p->next = c->plans;
  c->plans = p;
  *out = p;
  return PVL_SUCCESS;
}

pvl_status pvl_plan_destroy(pvl_plan *p) {
  if (!p) return PVL_SUCCESS;
  pvl_cache *c = p->cache;
  for (pvl_plan **q = &c->plans; *q; q = &(*q)->next) {
    if (*q == p) {
      *q = p->next;
      break;
    }
  }
  plan_free(p);
  return PVL_SUCCESS;
}

void pvl__plan_destroy_all(pvl_cache *c) {
  while (c->plans) {
    pvl_plan *p = c->plans;
    c->plans = p->next;
    plan_free(p);
  }
}

pvl_status pvl_plan_get_info(const pvl_plan *p, pvl_plan_info *out) {
  if (!p || !out)
    return PVL_FAIL(p ? p->cache : NULL, PVL_ERR_INVALID_ARGUMENT,
                    "plan or out is NULL");
  *out = p->info;
  return PVL_SUCCESS;
}

static inline int32_t row_base(const pvl_seq *s, uint32_t l) {
  /* Wraps to the right negative value when retain dropped decoded tokens. */
  return (int32_t)(s->tables[l].n_tokens - s->n_decoded);
}

/* Phase A of a build: decide the action of every row of the sequences the
 * plan does not already hold, count the pairs to send and the id array's
 * growth, without changing anything. *repack is set when the array would
 * overflow; the build then lays every row out again. */
static void plan_classify(pvl_plan *p, uint32_t n, uint64_t *entries,
                          bool *repack) {
  const uint32_t L = p->cache->cfg.num_layers;
  uint64_t used = p->used, count = 0;
  for (uint32_t b = 0; b < n; b++) {
    const pvl_seq *s = p->seqs[b];
    p->skip[b] = !p->stale && p->row_seq[b] == s->id &&
                 p->row_version[b] == s->version;
    if (p->skip[b]) continue;
    const bool same = !p->stale && p->row_seq[b] == s->id;
    const pvl_plan_row *r = p->rows + (size_t)b * L;
    uint8_t *act = p->action + (size_t)b * L;
    for (uint32_t l = 0; l < L; l++) {
      const pvl_table *t = &s->tables[l];
      const uint32_t nb = t->n_blocks;
      if (same && r[l].epoch == t->epoch && nb <= r[l].cap) {
        act[l] = ROW_KEEP;
        count += (nb - r[l].synced) + (row_base(s, l) != r[l].base);
      } else if (!p->stale && nb <= r[l].cap) {
        act[l] = ROW_REWRITE;
        count += nb + 2;
      } else {
        act[l] = ROW_RELOCATE;
        used += nb + row_slack(nb);
        count += nb + 2;
      }
    }
  }
  *repack = used > p->block_cap;
  if (*repack) {
    count = 0;
    for (uint32_t b = 0; b < n; b++)
      for (uint32_t l = 0; l < L; l++)
        count += p->seqs[b]->tables[l].n_blocks + 2;
  }
  *entries += count;
}

static inline void put(pvl_plan *p, uint64_t *k, int64_t index,
                       int32_t value) {
  p->pairs[2 * *k] = (int32_t)index;
  p->pairs[2 * *k + 1] = value;
  ++*k;
}

/* Sends row (b, l) from block `from` on; `whole` also sends its offset and
 * base. */
static void row_write(pvl_plan *p, uint64_t *k, uint32_t b, uint32_t l,
                      uint32_t from, bool whole) {
  const pvl_seq *s = p->seqs[b];
  const pvl_table *t = &s->tables[l];
  pvl_plan_row *r = &p->rows[(size_t)b * p->cache->cfg.num_layers + l];
  const int64_t ids = pvl_plan_block_ids_index(&p->view, (int32_t)l);
  for (uint32_t j = from; j < t->n_blocks; j++)
    put(p, k, ids + r->offset + j, t->blocks[j]);
  if (whole)
    put(p, k, pvl_plan_row_offset_index(&p->view, (int32_t)l, (int32_t)b),
        r->offset);
  const int32_t base = row_base(s, l);
  if (whole || base != r->base)
    put(p, k, pvl_plan_base_len_index(&p->view, (int32_t)l, (int32_t)b),
        base);
  r->epoch = t->epoch;
  r->synced = t->n_blocks;
  r->base = base;
}

/* Total ids of the batch laid out with (slack = 1) or without slack. */
static uint64_t layout_size(const pvl_plan *p, uint32_t n, bool slack) {
  const uint32_t L = p->cache->cfg.num_layers;
  uint64_t total = 0;
  for (uint32_t b = 0; b < n; b++)
    for (uint32_t l = 0; l < L; l++) {
      uint32_t nb = p->seqs[b]->tables[l].n_blocks;
      total += nb + (slack ? row_slack(nb) : 0);
    }
  return total;
}

/* Phase B: apply the actions of phase A (or repack everything). */
static void plan_apply(pvl_plan *p, uint32_t n, bool repack, uint64_t *k) {
  const uint32_t L = p->cache->cfg.num_layers;
  if (repack) {
    /* Lay every row of the batch out again from the start, with slack if
     * it fits; rows past the batch lose their regions. */
    const bool slack = layout_size(p, n, true) <= p->block_cap;
    uint64_t used = 0;
    for (uint32_t b = 0; b < n; b++)
      for (uint32_t l = 0; l < L; l++) {
        pvl_plan_row *r = &p->rows[(size_t)b * L + l];
        uint32_t nb = p->seqs[b]->tables[l].n_blocks;
        r->offset = (int32_t)used;
        r->cap = nb + (slack ? row_slack(nb) : 0);
        used += r->cap;
        row_write(p, k, b, l, 0, true);
      }
    memset(p->rows + (size_t)n * L, 0,
           (size_t)(p->max_seqs - n) * L * sizeof(pvl_plan_row));
    memset(p->row_seq + n, 0, (size_t)(p->max_seqs - n) * sizeof(pvl_seq_id));
    p->used = used;
    p->info.full_rebuilds++;
    return;
  }
  for (uint32_t b = 0; b < n; b++) {
    if (p->skip[b]) continue;
    const uint8_t *act = p->action + (size_t)b * L;
    for (uint32_t l = 0; l < L; l++) {
      pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      switch (act[l]) {
      case ROW_KEEP:
        row_write(p, k, b, l, r->synced, false);
        break;
      case ROW_REWRITE:
        /* The offset is unchanged, but resending it is simpler than a
         * special case (phase A counted it). */
        row_write(p, k, b, l, 0, true);
        break;
      default: {
        uint32_t nb = p->seqs[b]->tables[l].n_blocks;
        r->offset = (int32_t)p->used;
        r->cap = nb + row_slack(nb);
        p->used += r->cap;
        row_write(p, k, b, l, 0, true);
        break;
      }
      }
    }
  }
}

pvl_status pvl_plan_build(pvl_plan *p, const pvl_seq_id *seqs, uint32_t n,
                          void *stream) {
  if (!p) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "plan is NULL");
  pvl_cache *c = p->cache;
  if (n > p->max_seqs)
    return PVL_FAIL(c, PVL_ERR_CAPACITY, "batch of %u > plan max_seqs = %u",
                    n, p->max_seqs);
  /* Resolve into a scratch copy first: p->seqs is only replaced once the
   * build can no longer fail. */
  pvl_seq **prev = p->seqs;
  pvl_seq **cur = pvl__scratch(c, (size_t)n * sizeof(pvl_seq *) + 8);
  if (!cur) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "batch of %u", n);
  pvl_status st = pvl__seq_resolve_batch(c, seqs, n, cur, __func__);
  if (st != PVL_SUCCESS) return st;
  for (uint32_t b = 0; b < n; b++)
    if (cur[b]->n_decoded > INT32_MAX)
      return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                      "seqs[%u] has more than INT32_MAX decoded tokens", b);

  /* Phase A reads p->seqs: point it at the new batch, restore on failure. */
  p->seqs = cur;
  uint64_t entries = 0;
  bool repack = false;
  plan_classify(p, n, &entries, &repack);
  if (repack && layout_size(p, n, false) > p->block_cap) {
    p->seqs = prev;
    return PVL_FAIL(c, PVL_ERR_CAPACITY,
                    "the batch holds more than the plan's %llu block "
                    "entries",
                    (unsigned long long)p->block_cap);
  }
  for (uint32_t b = 0; b < n; b++)
    entries += p->stale || p->n_appended[b] != (int32_t)cur[b]->n_decoded;
  if (entries > p->pairs_cap) {
    size_t want = p->pairs_cap;
    while (want < entries) want *= 2;
    int32_t *fresh = pvl__alloc(c->alloc, want * 2 * sizeof(int32_t));
    if (!fresh) {
      p->seqs = prev;
      return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "%llu plan updates",
                      (unsigned long long)entries);
    }
    pvl__free(c->alloc, p->pairs, p->pairs_cap * 2 * sizeof(int32_t));
    p->pairs = fresh;
    p->pairs_cap = want;
  }
  memcpy(prev, cur, (size_t)n * sizeof(pvl_seq *));
  p->seqs = prev;

  uint64_t k = 0;
  plan_apply(p, n, repack, &k);
  for (uint32_t b = 0; b < n; b++) {
    const pvl_seq *s = p->seqs[b];
    p->row_seq[b] = s->id;
    p->row_version[b] = s->version;
    if (p->stale || p->n_appended[b] != (int32_t)s->n_decoded) {
      p->n_appended[b] = (int32_t)s->n_decoded;
      put(p, &k, pvl_plan_n_appended_index(&p->view, (int32_t)b),
          p->n_appended[b]);
    }
  }
  p->n_seqs = n;
  p->view.n_seqs = (int32_t)n;
  p->stale = false;
  p->built_clock = c->mut_clock;
  st = c->be->plan_upload(p, p->pairs, (uint32_t)k, stream);
  if (st != PVL_SUCCESS) {
    p->stale = true; /* the device may hold part of it: rewrite next time */
    return PVL_PREFIX(c, st);
  }
  p->info.n_seqs = n;
  p->info.last_update_entries = k;
  p->info.last_update_bytes = k * 2 * sizeof(int32_t);
  return PVL_SUCCESS;
}

/* The plan must describe the tables as they are now: a stale plan would
 * read blocks that were freed or moved. O(1) when nothing changed since the
 * build, else O(batch). */
static pvl_status plan_check_fresh(const pvl_plan *p, uint32_t layer,
                                   const char *fn) {
  const pvl_cache *c = p->cache;
  if (layer >= c->cfg.num_layers)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "layer %u out of range (num_layers = %u)", layer,
                     c->cfg.num_layers);
  if (p->stale)
    return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                     "the last pvl_plan_build failed: build again");
  if (p->built_clock == c->mut_clock) return PVL_SUCCESS;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    const pvl_seq *s = pvl__seq_get(c, p->row_seq[b]);
    if (!s || s->version != p->row_version[b] ||
        (int32_t)s->n_decoded != p->n_appended[b])
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "row %u of the plan is stale (sequence freed, "
                       "appended or compacted since the build): call "
                       "pvl_plan_build first",
                       b);
  }
  return PVL_SUCCESS;
}

pvl_status pvl_plan_kv_write(pvl_plan *p, uint32_t layer, const void *k,
                             const void *v, void *stream) {
  if (!p) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "plan is NULL");
  pvl_cache *c = p->cache;
  if (p->n_seqs > 0 && (!k || !v))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "k or v is NULL");
  pvl_status st = plan_check_fresh(p, layer, __func__);
  if (st != PVL_SUCCESS) return st;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    const pvl_table *t = &p->seqs[b]->tables[layer];
    if (t->n_tokens == 0)
      return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                      "row %u has no slot in layer %u: append first", b,
                      layer);
    if (c->pool.num_shared &&
        c->pool.refcount[t->blocks[t->n_blocks - 1]] > 1)
      return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                      "row %u's last block in layer %u is shared with a "
                      "fork: append (which copies it) before writing",
                      b, layer);
  }
  if (p->n_seqs == 0) return PVL_SUCCESS;
  st = c->be->plan_kv_write(p, layer, k, v, stream);
  return st == PVL_SUCCESS ? st : PVL_PREFIX(c, st);
}

pvl_status pvl_attention_decode(pvl_plan *p, uint32_t layer, const void *q,
                                void *out, float scale, void *stream) {
  if (!p) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "plan is NULL");
  pvl_cache *c = p->cache;
  if (p->n_seqs > 0 && (!q || !out))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "q or out is NULL");
  if (scale != 0.0f && !(scale > 0.0f && isfinite(scale)))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "scale = %g must be 0 (default) or finite and > 0",
                    (double)scale);
  pvl_status st = plan_check_fresh(p, layer, __func__);
  if (st != PVL_SUCCESS) return st;
  if (p->n_seqs == 0) return PVL_SUCCESS;
  if (scale == 0.0f) scale = 1.0f / sqrtf((float)c->cfg.head_dim);
  st = c->be->attention(p, layer, q, out, scale, stream);
  return st == PVL_SUCCESS ? st : PVL_PREFIX(c, st);
}
