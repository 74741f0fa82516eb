/* Batch plans: the per-layer page tables of a decode batch as the kernels
 * read them (layout in kernels/pvl_kernels.h). Tables stay resident on the
 * device; a build sends only what changed since the last one, as (index,
 * value) pairs, so a decode step costs O(changes) bytes, not O(blocks). */
#include <math.h>
#include <string.h>

#include "internal.h"

enum {
  ROW_KEEP = 0,     /* same table: send appended ids and a changed base */
  ROW_REWRITE = 1,  /* other table or epoch, fits the row: rewrite it */
  ROW_RELOCATE = 2, /* outgrew the row: new region at the layer's end */
};

static inline uint32_t row_slack(uint32_t nb) { return 2 + nb / 8; }

static void plan_free(pvl_plan *p) {
  pvl_cache *c = p->cache;
  const pvl_allocator *a = c->alloc;
  const size_t L = c->cfg.num_layers, S = p->max_seqs;
  if (p->be_state || p->host_buf) c->be->plan_fini(p);
  pvl__free(a, p->rows, L * S * sizeof(pvl_plan_row));
  pvl__free(a, p->n_appended, S * sizeof(int32_t));
  pvl__free(a, p->seqs, S * sizeof(pvl_seq *));
  pvl__free(a, p->layer_used, L * sizeof(uint64_t));
  pvl__free(a, p->action, L * S);
  pvl__free(a, p->repack, L);
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
    cap = (uint64_t)c->pool.num_blocks * 3 / 2 + 16 * (uint64_t)max_seqs;
  /* Pair indices are int32, so the whole buffer must be addressable. */
  if (cap > INT32_MAX ||
      pvl_plan_buf_elems((int32_t)L, (int32_t)max_seqs, (int64_t)cap) >
          INT32_MAX)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "block_capacity = %llu x %u layers exceeds 2^31 entries",
                    (unsigned long long)cap, L);

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
  p->n_appended = pvl__alloc(a, S * sizeof(int32_t));
  p->seqs = pvl__alloc(a, S * sizeof(pvl_seq *));
  p->layer_used = pvl__alloc(a, L * sizeof(uint64_t));
  p->action = pvl__alloc(a, (size_t)L * S);
  p->repack = pvl__alloc(a, L);
  p->pairs = pvl__alloc(a, p->pairs_cap * 2 * sizeof(int32_t));
  if (!p->rows || !p->n_appended || !p->seqs || !p->layer_used ||
      !p->action || !p->repack || !p->pairs) {
    plan_free(p);
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan metadata for %u sequences",
                    max_seqs);
  }
  memset(p->rows, 0, (size_t)L * S * sizeof(pvl_plan_row));
  memset(p->n_appended, 0, S * sizeof(int32_t));
  memset(p->layer_used, 0, L * sizeof(uint64_t));
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

/* Phase A of a build for one layer: decide each row's action and count the
 * pairs to send, without changing anything. Returns false if the layer does
 * not fit even repacked without slack. */
static bool plan_layer_classify(pvl_plan *p, uint32_t l, uint32_t n,
                                uint64_t *entries) {
  const size_t S = p->max_seqs;
  pvl_plan_row *rows = p->rows + l * S;
  uint8_t *act = p->action + l * S;
  uint64_t used = p->layer_used[l], count = 0, tight = 0;
  for (uint32_t b = 0; b < n; b++) {
    const pvl_seq *s = p->seqs[b];
    const pvl_table *t = &s->tables[l];
    const pvl_plan_row *r = &rows[b];
    const uint32_t nb = t->n_blocks;
    const int32_t base = (int32_t)(t->n_tokens - s->n_decoded);
    tight += nb;
    if (!p->stale && r->seq == s->id && r->epoch == t->epoch &&
        nb <= r->cap) {
      act[b] = ROW_KEEP;
      count += (nb - r->synced) + (base != r->base);
    } else if (!p->stale && nb <= r->cap) {
      act[b] = ROW_REWRITE;
      count += nb + 2;
    } else {
      act[b] = ROW_RELOCATE;
      used += nb + row_slack(nb);
      count += nb + 2;
    }
  }
  p->repack[l] = used > p->block_cap;
  if (p->repack[l]) {
    if (tight > p->block_cap) return false;
    count = 0;
    for (uint32_t b = 0; b < n; b++) count += p->seqs[b]->tables[l].n_blocks + 2;
  }
  *entries += count;
  return true;
}

static inline void put(pvl_plan *p, uint64_t *k, int64_t index,
                       int32_t value) {
  p->pairs[2 * *k] = (int32_t)index;
  p->pairs[2 * *k + 1] = value;
  ++*k;
}

static void row_write(pvl_plan *p, uint64_t *k, uint32_t l, uint32_t b,
                      uint32_t from, bool whole) {
  const pvl_seq *s = p->seqs[b];
  const pvl_table *t = &s->tables[l];
  pvl_plan_row *r = &p->rows[(size_t)l * p->max_seqs + b];
  const int64_t ids = pvl_plan_block_ids_index(&p->view, (int32_t)l);
  for (uint32_t j = from; j < t->n_blocks; j++)
    put(p, k, ids + r->offset + j, t->blocks[j]);
  if (whole)
    put(p, k, pvl_plan_row_offset_index(&p->view, (int32_t)l, (int32_t)b),
        r->offset);
  const int32_t base = (int32_t)(t->n_tokens - s->n_decoded);
  if (whole || base != r->base)
    put(p, k, pvl_plan_base_len_index(&p->view, (int32_t)l, (int32_t)b),
        base);
  r->seq = s->id;
  r->epoch = t->epoch;
  r->synced = t->n_blocks;
  r->base = base;
}

/* Phase B for one layer: apply the actions of phase A. */
static void plan_layer_apply(pvl_plan *p, uint32_t l, uint32_t n,
                             uint64_t *k) {
  const size_t S = p->max_seqs;
  pvl_plan_row *rows = p->rows + l * S;
  const uint8_t *act = p->action + l * S;
  if (p->repack[l]) {
    /* Lay every row of the batch out again from the start, with slack if
     * it fits; rows past the batch lose their regions. */
    uint64_t total = 0;
    for (uint32_t b = 0; b < n; b++) {
      uint32_t nb = p->seqs[b]->tables[l].n_blocks;
      total += nb + row_slack(nb);
    }
    const bool slack = total <= p->block_cap;
    uint64_t used = 0;
    for (uint32_t b = 0; b < n; b++) {
      uint32_t nb = p->seqs[b]->tables[l].n_blocks;
      rows[b].offset = (int32_t)used;
      rows[b].cap = nb + (slack ? row_slack(nb) : 0);
      used += rows[b].cap;
      row_write(p, k, l, b, 0, true);
    }
    for (size_t b = n; b < S; b++) memset(&rows[b], 0, sizeof(rows[b]));
    p->layer_used[l] = used;
    p->info.full_rebuilds++;
    return;
  }
  for (uint32_t b = 0; b < n; b++) {
    pvl_plan_row *r = &rows[b];
    switch (act[b]) {
    case ROW_KEEP:
      row_write(p, k, l, b, r->synced, false);
      break;
    case ROW_REWRITE:
      /* The offset is unchanged, but cheaper to resend than to special-case
       * (phase A counted it). */
      row_write(p, k, l, b, 0, true);
      break;
    default: {
      uint32_t nb = p->seqs[b]->tables[l].n_blocks;
      r->offset = (int32_t)p->layer_used[l];
      r->cap = nb + row_slack(nb);
      p->layer_used[l] += r->cap;
      row_write(p, k, l, b, 0, true);
      break;
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
    if (cur[b]->n_decoded > INT32_MAX ||
        (uint64_t)cur[b]->tables[0].n_tokens > INT32_MAX)
      return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                      "seqs[%u] is longer than INT32_MAX tokens", b);

  const uint32_t L = c->cfg.num_layers;
  /* Phase A reads p->seqs, so point it at the new batch and restore it on
   * failure. */
  p->seqs = cur;
  uint64_t entries = 0;
  for (uint32_t l = 0; l < L; l++) {
    if (!plan_layer_classify(p, l, n, &entries)) {
      p->seqs = prev;
      return PVL_FAIL(c, PVL_ERR_CAPACITY,
                      "layer %u of the batch needs more than the plan's %llu "
                      "block entries",
                      l, (unsigned long long)p->block_cap);
    }
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
  for (uint32_t l = 0; l < L; l++) plan_layer_apply(p, l, n, &k);
  for (uint32_t b = 0; b < n; b++) {
    if (p->stale || p->n_appended[b] != (int32_t)p->seqs[b]->n_decoded) {
      p->n_appended[b] = (int32_t)p->seqs[b]->n_decoded;
      put(p, &k, pvl_plan_n_appended_index(&p->view, (int32_t)b),
          p->n_appended[b]);
    }
  }
  p->n_seqs = n;
  p->view.n_seqs = (int32_t)n;
  p->stale = false;
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
 * read blocks that were freed or moved. O(batch) per call. */
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
  const pvl_plan_row *rows = p->rows + (size_t)layer * p->max_seqs;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    const pvl_seq *s = pvl__seq_get(c, rows[b].seq);
    const pvl_table *t = s ? &s->tables[layer] : NULL;
    if (!t || t->epoch != rows[b].epoch || t->n_blocks != rows[b].synced ||
        (int64_t)t->n_tokens != (int64_t)rows[b].base + p->n_appended[b])
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
  const pvl_plan_row *rows = p->rows + (size_t)layer * p->max_seqs;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    const pvl_table *t = &pvl__seq_get(c, rows[b].seq)->tables[layer];
    if (t->n_tokens == 0)
      return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                      "row %u has no slot in layer %u: append first", b,
                      layer);
    if (c->pool.refcount[t->blocks[t->n_blocks - 1]] > 1)
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
