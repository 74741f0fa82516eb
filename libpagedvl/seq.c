/* Sequences and their per-layer page tables: admission, append (with
 * copy-on-write), fork, retain (compaction), free, and the queries a
 * scheduler asks. Every mutating call validates and allocates first and
 * commits last, so a failure leaves the cache as it was. */
#include <string.h>

#include "internal.h"

/* id = generation << 24 | slot: max_seqs <= 2^24, and a 40-bit generation
 * per slot never wraps in practice (2^40 reuses of one slot). */
#define SEQ_SLOT_BITS 24
#define SEQ_SLOT(id) ((uint32_t)((id) & ((1u << SEQ_SLOT_BITS) - 1)))

static inline uint32_t ceil_div(uint32_t a, uint32_t b) {
  return a / b + (a % b != 0);
}

pvl_seq *pvl__seq_get(const pvl_cache *c, pvl_seq_id id) {
  uint32_t slot = SEQ_SLOT(id);
  if (slot >= c->cfg.max_seqs) return NULL;
  pvl_seq *s = c->slots[slot];
  return s && s->id == id ? s : NULL;
}

static pvl_status lookup(const pvl_cache *c, pvl_seq_id id, pvl_seq **out,
                         const char *fn) {
  pvl_seq *s = pvl__seq_get(c, id);
  if (!s)
    return pvl__fail(c, PVL_ERR_UNKNOWN_SEQUENCE, fn,
                     "sequence 0x%llx is not live", (unsigned long long)id);
  *out = s;
  return PVL_SUCCESS;
}

static pvl_status lookup_layer(const pvl_cache *c, pvl_seq_id id,
                               uint32_t layer, pvl_table **out,
                               const char *fn) {
  if (layer >= c->cfg.num_layers)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "layer %u out of range (num_layers = %u)", layer,
                     c->cfg.num_layers);
  pvl_seq *s = NULL;
  pvl_status st = lookup(c, id, &s, fn);
  if (st != PVL_SUCCESS) return st;
  *out = &s->tables[layer];
  return PVL_SUCCESS;
}

pvl_status pvl__seq_resolve_batch(pvl_cache *c, const pvl_seq_id *ids,
                                  uint32_t n, pvl_seq **out, const char *fn) {
  if (n > 0 && !ids)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "seqs is NULL, n = %u",
                     n);
  uint64_t mark = ++c->mark_clock;
  for (uint32_t i = 0; i < n; i++) {
    pvl_seq *s = pvl__seq_get(c, ids[i]);
    if (!s)
      return pvl__fail(c, PVL_ERR_UNKNOWN_SEQUENCE, fn,
                       "seqs[%u] = 0x%llx is not live", i,
                       (unsigned long long)ids[i]);
    if (s->mark == mark)
      return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                       "seqs[%u] = 0x%llx appears twice in the batch", i,
                       (unsigned long long)ids[i]);
    s->mark = mark;
    if (out) out[i] = s;
  }
  return PVL_SUCCESS;
}

/* ---- tables ---- */

static void table_release(pvl_cache *c, pvl_table *t, uint32_t layer) {
  for (uint32_t i = 0; i < t->n_blocks; i++)
    pvl__pool_decref(&c->pool, t->blocks[i]);
  c->layer_tokens[layer] -= t->n_tokens;
  pvl__free(c->alloc, t->blocks, (size_t)t->cap_blocks * sizeof(int32_t));
  pvl__free(c->alloc, t->pos, (size_t)t->cap_pos * sizeof(uint32_t));
  memset(t, 0, sizeof(*t));
}

/* Room for one more block id (and position) in t; harmless on its own. */
static bool table_reserve_append(pvl_cache *c, pvl_table *t, uint32_t bs) {
  bool need_block = t->n_tokens % bs == 0;
  if (need_block && t->n_blocks == t->cap_blocks) {
    uint32_t cap = t->cap_blocks + t->cap_blocks / 2 + 4;
    if (!pvl__grow(c->alloc, (void **)&t->blocks, sizeof(int32_t),
                   t->cap_blocks, cap))
      return false;
    t->cap_blocks = cap;
  }
  if (t->pos && t->n_tokens == t->cap_pos) {
    uint32_t cap = t->cap_pos + t->cap_pos / 2 + 16;
    if (!pvl__grow(c->alloc, (void **)&t->pos, sizeof(uint32_t), t->cap_pos,
                   cap))
      return false;
    t->cap_pos = cap;
  }
  return true;
}

static void seq_destroy(pvl_cache *c, pvl_seq *s) {
  pvl__obs_free_all(c, s);
  if (s->tables) {
    for (uint32_t l = 0; l < c->cfg.num_layers; l++)
      table_release(c, &s->tables[l], l);
    pvl__free(c->alloc, s->tables, c->cfg.num_layers * sizeof(pvl_table));
  }
  pvl__free(c->alloc, s->spans, s->n_spans * sizeof(pvl_span));
  pvl__free(c->alloc, s, sizeof(*s));
}

/* A sequence struct with zeroed tables and a copy of the spans, not yet
 * registered and holding no blocks. */
static pvl_seq *seq_new(pvl_cache *c, const pvl_span *spans,
                        uint32_t n_spans) {
  pvl_seq *s = pvl__alloc(c->alloc, sizeof(*s));
  if (!s) return NULL;
  memset(s, 0, sizeof(*s));
  s->tables = pvl__alloc(c->alloc, c->cfg.num_layers * sizeof(pvl_table));
  if (n_spans) s->spans = pvl__alloc(c->alloc, n_spans * sizeof(pvl_span));
  if (!s->tables || (n_spans && !s->spans)) {
    pvl__free(c->alloc, s->tables, c->cfg.num_layers * sizeof(pvl_table));
    pvl__free(c->alloc, s->spans, n_spans * sizeof(pvl_span));
    pvl__free(c->alloc, s, sizeof(*s));
    return NULL;
  }
  memset(s->tables, 0, c->cfg.num_layers * sizeof(pvl_table));
  s->n_spans = n_spans;
  if (n_spans) memcpy(s->spans, spans, n_spans * sizeof(pvl_span));
  return s;
}

static void seq_register(pvl_cache *c, pvl_seq *s) {
  uint32_t slot = c->free_slots[--c->num_free_slots];
  uint64_t gen = ++c->slot_gen[slot]; /* from 1: id 0 is never issued */
  s->id = (gen << SEQ_SLOT_BITS) | slot;
  c->slots[slot] = s;
  c->num_seqs++;
  c->mut_clock++;
}

static void seq_unregister(pvl_cache *c, pvl_seq *s) {
  uint32_t slot = SEQ_SLOT(s->id);
  c->slots[slot] = NULL;
  c->free_slots[c->num_free_slots++] = slot;
  c->num_seqs--;
  c->mut_clock++;
}

void pvl__seq_free_all(pvl_cache *c) {
  for (uint32_t i = 0; i < c->cfg.max_seqs; i++) {
    pvl_seq *s = c->slots[i];
    if (!s) continue;
    seq_unregister(c, s);
    seq_destroy(c, s);
  }
}

/* ---- admission ---- */

static pvl_status check_spans(const pvl_cache *c, uint32_t n_prompt,
                              const pvl_span *v, uint32_t n) {
#define PVL_FAIL_ADD(c, st, ...) \
  pvl__fail((c), (st), "pvl_seq_add", __VA_ARGS__)
  if (n > 0 && !v)
    return PVL_FAIL_ADD(c, PVL_ERR_INVALID_ARGUMENT, "visual is NULL, n = %u", n);
  if (n > n_prompt)
    return PVL_FAIL_ADD(c, PVL_ERR_INVALID_ARGUMENT,
                    "%u visual spans for %u prompt tokens", n, n_prompt);
  for (uint32_t i = 0; i < n; i++) {
    if (v[i].begin >= v[i].end || v[i].end > n_prompt)
      return PVL_FAIL_ADD(c, PVL_ERR_INVALID_ARGUMENT,
                      "visual[%u] = [%u, %u) is empty or outside the prompt "
                      "[0, %u)",
                      i, v[i].begin, v[i].end, n_prompt);
    if (i > 0 && v[i].begin < v[i - 1].end)
      return PVL_FAIL_ADD(c, PVL_ERR_INVALID_ARGUMENT,
                      "visual[%u] = [%u, %u) overlaps or precedes visual[%u]",
                      i, v[i].begin, v[i].end, i - 1);
  }
  return PVL_SUCCESS;
#undef PVL_FAIL_ADD
}

static pvl_status seq_add(pvl_cache *c, uint32_t n_prompt,
                          const pvl_span *visual, uint32_t n_visual,
                          pvl_seq_id *out) {
  static const char fn[] = "pvl_seq_add";
  if (!c || !out)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache or out is NULL");
  if (n_prompt == 0)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "n_prompt = 0");
  pvl_status st = check_spans(c, n_prompt, visual, n_visual);
  if (st != PVL_SUCCESS) return st;

  const uint32_t L = c->cfg.num_layers, bs = c->cfg.block_size;
  const uint32_t nb = ceil_div(n_prompt, bs);
  const uint64_t need = (uint64_t)nb * L;
  if (need > c->pool.num_free)
    return pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "%u prompt tokens need %llu blocks, %u free", n_prompt,
                     (unsigned long long)need, c->pool.num_free);
  if (c->num_free_slots == 0)
    return pvl__fail(c, PVL_ERR_CAPACITY, fn,
                     "max_seqs = %u sequences are live", c->cfg.max_seqs);

  pvl_seq *s = seq_new(c, visual, n_visual);
  if (!s) return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "sequence metadata");
  /* Slack for the first decode blocks, so early appends do not regrow. */
  const uint32_t cap = nb + 4;
  for (uint32_t l = 0; l < L; l++) {
    s->tables[l].blocks = pvl__alloc(c->alloc, cap * sizeof(int32_t));
    if (!s->tables[l].blocks) {
      for (uint32_t j = 0; j <= l; j++)
        pvl__free(c->alloc, s->tables[j].blocks, cap * sizeof(int32_t));
      pvl__free(c->alloc, s->tables, L * sizeof(pvl_table));
      pvl__free(c->alloc, s->spans, n_visual * sizeof(pvl_span));
      pvl__free(c->alloc, s, sizeof(*s));
      return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "page table of layer %u", l);
    }
    s->tables[l].cap_blocks = cap;
  }
  /* Split cache: every rank admits or none. The id this rank would issue
   * joins the fingerprint, so diverging schedulers are caught here. */
  const uint32_t next_slot = c->free_slots[c->num_free_slots - 1];
  uint64_t fp = pvl__fp(PVL_FP_INIT, &n_prompt, sizeof(n_prompt));
  fp = pvl__fp(fp, visual, n_visual * sizeof(pvl_span));
  fp = pvl__fp(fp, &c->slot_gen[next_slot], sizeof(uint64_t));
  fp = pvl__fp(fp, &next_slot, sizeof(next_slot));
  st = pvl__dist_agree(c, PVL_SUCCESS, fp, fn);
  if (st != PVL_SUCCESS) {
    seq_destroy(c, s);
    return st;
  }
  /* Commit: nothing below fails. */
  for (uint32_t l = 0; l < L; l++) {
    pvl_table *t = &s->tables[l];
    for (uint32_t i = 0; i < nb; i++) t->blocks[i] = pvl__pool_alloc(&c->pool);
    t->n_blocks = nb;
    t->n_tokens = n_prompt;
    t->epoch = ++c->epoch_clock;
    c->layer_tokens[l] += n_prompt;
  }
  s->n_prompt = n_prompt;
  seq_register(c, s);
  *out = s->id;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_add(pvl_cache *c, uint32_t n_prompt, const pvl_span *visual,
                       uint32_t n_visual, pvl_seq_id *out) {
  pvl__dist_begin(c, PVL_CALL_SEQ_ADD);
  return pvl__dist_end(c, seq_add(c, n_prompt, visual, n_visual, out));
}

pvl_status pvl_seq_free(pvl_cache *c, pvl_seq_id id) {
  if (!c) return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache is NULL");
  pvl_seq *s = NULL;
  pvl_status st = lookup(c, id, &s, __func__);
  if (st != PVL_SUCCESS) return st;
  seq_unregister(c, s);
  seq_destroy(c, s);
  return PVL_SUCCESS;
}

static pvl_status seq_fork(pvl_cache *c, pvl_seq_id parent, pvl_seq_id *child) {
  static const char fn[] = "pvl_seq_fork";
  if (!c || !child)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache or child is NULL");
  pvl_seq *p = NULL;
  pvl_status st = lookup(c, parent, &p, fn);
  if (st != PVL_SUCCESS) return st;
  if (c->num_free_slots == 0)
    return pvl__fail(c, PVL_ERR_CAPACITY, fn,
                     "max_seqs = %u sequences are live", c->cfg.max_seqs);
  const uint32_t L = c->cfg.num_layers;
  pvl_seq *s = seq_new(c, p->spans, p->n_spans);
  if (!s) return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "sequence metadata");
  for (uint32_t l = 0; l < L; l++) {
    const pvl_table *pt = &p->tables[l];
    pvl_table *t = &s->tables[l];
    t->cap_blocks = pt->n_blocks + 4;
    t->blocks = pvl__alloc(c->alloc, t->cap_blocks * sizeof(int32_t));
    if (pt->pos) {
      t->cap_pos = pt->n_tokens + 16;
      t->pos = pvl__alloc(c->alloc, t->cap_pos * sizeof(uint32_t));
    }
    if (!t->blocks || (pt->pos && !t->pos)) {
      /* Tables hold no blocks yet: free arrays only. */
      for (uint32_t j = 0; j <= l; j++) {
        pvl_table *u = &s->tables[j];
        pvl__free(c->alloc, u->blocks, u->cap_blocks * sizeof(int32_t));
        pvl__free(c->alloc, u->pos, u->cap_pos * sizeof(uint32_t));
      }
      pvl__free(c->alloc, s->tables, L * sizeof(pvl_table));
      pvl__free(c->alloc, s->spans, s->n_spans * sizeof(pvl_span));
      pvl__free(c->alloc, s, sizeof(*s));
      return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "page table of layer %u", l);
    }
  }
  /* Split cache: every rank forks or none (tables hold no blocks yet). */
  const uint32_t next_slot = c->free_slots[c->num_free_slots - 1];
  uint64_t fp = pvl__fp(PVL_FP_INIT, &parent, sizeof(parent));
  fp = pvl__fp(fp, &c->slot_gen[next_slot], sizeof(uint64_t));
  fp = pvl__fp(fp, &next_slot, sizeof(next_slot));
  st = pvl__dist_agree(c, PVL_SUCCESS, fp, fn);
  if (st != PVL_SUCCESS) {
    seq_destroy(c, s);
    return st;
  }
  for (uint32_t l = 0; l < L; l++) {
    const pvl_table *pt = &p->tables[l];
    pvl_table *t = &s->tables[l];
    memcpy(t->blocks, pt->blocks, pt->n_blocks * sizeof(int32_t));
    if (pt->pos) memcpy(t->pos, pt->pos, pt->n_tokens * sizeof(uint32_t));
    for (uint32_t i = 0; i < pt->n_blocks; i++)
      pvl__pool_incref(&c->pool, pt->blocks[i]);
    t->n_blocks = pt->n_blocks;
    t->n_tokens = pt->n_tokens;
    t->epoch = ++c->epoch_clock;
    c->layer_tokens[l] += pt->n_tokens;
  }
  s->n_prompt = p->n_prompt;
  s->n_decoded = p->n_decoded;
  s->n_old_tail = p->n_old_tail; /* same positions, same newest */
  seq_register(c, s);
  *child = s->id;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_fork(pvl_cache *c, pvl_seq_id parent, pvl_seq_id *child) {
  pvl__dist_begin(c, PVL_CALL_SEQ_FORK);
  return pvl__dist_end(c, seq_fork(c, parent, child));
}

/* ---- decode append ---- */

enum { APPEND_IN_PLACE = 0, APPEND_NEW_BLOCK = 1, APPEND_COW = 2 };

static int append_kind(const pvl_cache *c, const pvl_table *t) {
  if (t->n_tokens % c->cfg.block_size == 0) return APPEND_NEW_BLOCK;
  /* Without forks no block is shared: skip the refcount (a cache miss per
   * table on the decode path). */
  if (c->pool.num_shared &&
      c->pool.refcount[t->blocks[t->n_blocks - 1]] > 1)
    return APPEND_COW;
  return APPEND_IN_PLACE;
}

pvl_status pvl_blocks_for_append(const pvl_cache *c, const pvl_seq_id *seqs,
                                 uint32_t n, uint64_t *out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  /* Same validation as the append it predicts (duplicates included). */
  pvl_status st =
      pvl__seq_resolve_batch((pvl_cache *)c, seqs, n, NULL, __func__);
  if (st != PVL_SUCCESS) return st;
  uint64_t need = 0;
  for (uint32_t i = 0; i < n; i++) {
    const pvl_seq *s = pvl__seq_get(c, seqs[i]);
    for (uint32_t l = 0; l < c->cfg.num_layers; l++)
      need += append_kind(c, &s->tables[l]) != APPEND_IN_PLACE;
  }
  *out = need;
  return PVL_SUCCESS;
}

static pvl_status seq_append(pvl_cache *c, const pvl_seq_id *seqs, uint32_t n,
                             void *stream) {
  static const char fn[] = "pvl_seq_append";
  if (!c) return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache is NULL");
  pvl_status st = pvl__seq_resolve_batch(c, seqs, n, NULL, fn);
  if (st != PVL_SUCCESS) return st;
  const uint32_t L = c->cfg.num_layers, bs = c->cfg.block_size;
  const size_t n_tables = (size_t)n * L;

  /* The kind of every (sequence, layer) append is decided once, up front: a
   * sequence and its fork in one batch both see their shared last block as
   * shared, and both copy it, whatever order they commit in. */
  uint8_t *kind = pvl__scratch(c, n_tables * (1 + 2 * sizeof(int32_t)) + 4);
  if (!kind)
    return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "append scratch for %zu tables",
                     n_tables);
  int32_t *cow = (int32_t *)(kind + ((n_tables + 3) & ~(size_t)3));

  /* Pass 1: classify, count, and make room in the tables (capacity growth
   * changes no observable state, so it may stay on failure). */
  uint64_t need = 0, n_cow = 0;
  for (uint32_t i = 0; i < n; i++) {
    pvl_seq *s = pvl__seq_get(c, seqs[i]);
    if (s->n_prompt + s->n_decoded == UINT32_MAX)
      return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                       "sequence 0x%llx has reached position UINT32_MAX",
                       (unsigned long long)s->id);
    for (uint32_t l = 0; l < L; l++) {
      pvl_table *t = &s->tables[l];
      int k = append_kind(c, t);
      kind[(size_t)i * L + l] = (uint8_t)k;
      need += k != APPEND_IN_PLACE;
      n_cow += k == APPEND_COW;
      if (!table_reserve_append(c, t, bs))
        return pvl__fail(c, PVL_ERR_NO_MEMORY, fn,
                         "growing the page table of layer %u", l);
    }
  }
  if (need > c->pool.num_free)
    return pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "the batch of %u sequences needs %llu blocks, %u free", n,
                     (unsigned long long)need, c->pool.num_free);

  /* Pass 2: copy-on-write copies are queued before anything commits, so a
   * failing copy can still be undone. */
  if (n_cow) {
    uint64_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
      pvl_seq *s = pvl__seq_get(c, seqs[i]);
      for (uint32_t l = 0; l < L; l++) {
        if (kind[(size_t)i * L + l] != APPEND_COW) continue;
        pvl_table *t = &s->tables[l];
        cow[k] = t->blocks[t->n_blocks - 1];
        cow[n_cow + k] = pvl__pool_alloc(&c->pool);
        k++;
      }
    }
    st = c->be->copy_blocks(c, cow, cow + n_cow, (uint32_t)n_cow, stream);
    if (st != PVL_SUCCESS) {
      for (uint64_t j = 0; j < n_cow; j++)
        pvl__pool_decref(&c->pool, cow[n_cow + j]);
      return pvl__prefix(c, st, fn);
    }
  }

  /* Split cache: every rank appends or none; the copies are undone on a
   * refusal as on a failing copy. */
  st = pvl__dist_agree(c, PVL_SUCCESS,
                       pvl__fp(PVL_FP_INIT, seqs, n * sizeof(pvl_seq_id)), fn);
  if (st != PVL_SUCCESS) {
    for (uint64_t j = 0; j < n_cow; j++)
      pvl__pool_decref(&c->pool, cow[n_cow + j]);
    return st;
  }

  /* Pass 3: commit, consuming the copies in pass-2 order. */
  uint64_t k = 0;
  c->mut_clock++;
  for (uint32_t i = 0; i < n; i++) {
    pvl_seq *s = pvl__seq_get(c, seqs[i]);
    uint32_t position = s->n_prompt + s->n_decoded;
    bool changed = false;
    for (uint32_t l = 0; l < L; l++) {
      pvl_table *t = &s->tables[l];
      switch (kind[(size_t)i * L + l]) {
      case APPEND_NEW_BLOCK:
        t->blocks[t->n_blocks++] = pvl__pool_alloc(&c->pool);
        changed = true;
        break;
      case APPEND_COW:
        pvl__pool_decref(&c->pool, t->blocks[t->n_blocks - 1]);
        t->blocks[t->n_blocks - 1] = cow[n_cow + k++];
        t->epoch = ++c->epoch_clock;
        changed = true;
        break;
      default:
        break;
      }
      if (t->pos) t->pos[t->n_tokens] = position;
      t->n_tokens++;
      c->layer_tokens[l]++;
    }
    s->n_decoded++;
    s->n_old_tail = 0; /* every layer's last slot is the new position */
    if (changed) s->version = ++c->epoch_clock;
  }
  return PVL_SUCCESS;
}

pvl_status pvl_seq_append(pvl_cache *c, const pvl_seq_id *seqs, uint32_t n,
                          void *stream) {
  pvl__dist_begin(c, PVL_CALL_SEQ_APPEND);
  return pvl__dist_end(c, seq_append(c, seqs, n, stream));
}

/* ---- retain (compaction) ---- */

pvl_status pvl__retain_prepare(pvl_cache *c, pvl_table *t,
                               const uint32_t *keep, uint32_t n_keep,
                               pvl_retain_prep *prep, const char *fn) {
  memset(prep, 0, sizeof(*prep));
  if (n_keep > 0 && !keep)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "keep is NULL, n_keep = %u", n_keep);
  if (n_keep > t->n_tokens)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "n_keep = %u exceeds the layer's %u tokens", n_keep,
                     t->n_tokens);
  for (uint32_t i = 0; i < n_keep; i++) {
    if (keep[i] >= t->n_tokens || (i > 0 && keep[i] <= keep[i - 1]))
      return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                       "keep[%u] = %u: slots must be strictly ascending and "
                       "below %u",
                       i, keep[i], t->n_tokens);
  }
  const uint32_t bs = c->cfg.block_size;
  /* Slots [0, p) stay where they are: whole blocks before p / bs are kept
   * as they are, the rest of the kept tokens are gathered into fresh
   * blocks (never in place, so a GPU gather has no read/write overlap and
   * a block shared with a fork is never written). */
  uint32_t p = 0;
  while (p < n_keep && keep[p] == p) p++;
  const bool moves = p < n_keep;
  const uint32_t n_final = ceil_div(n_keep, bs);
  prep->n_stay = moves ? p / bs : n_final;
  prep->n_new = n_final - prep->n_stay;
  for (uint32_t j = prep->n_stay; j < t->n_blocks; j++)
    prep->n_freed += c->pool.refcount[t->blocks[j]] == 1;
  /* Without a map, slot i is position i, and the next append's position
   * is the slot count: true only while nothing was dropped. */
  if (moves || t->pos || n_keep < t->n_tokens) {
    prep->cap_pos = n_keep + 16;
    prep->new_pos = pvl__alloc(c->alloc, prep->cap_pos * sizeof(uint32_t));
    if (!prep->new_pos)
      return pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "position map of %u",
                       n_keep);
  }
  return PVL_SUCCESS;
}

void pvl__retain_abort(pvl_cache *c, pvl_retain_prep *prep) {
  pvl__free(c->alloc, prep->new_pos, prep->cap_pos * sizeof(uint32_t));
  prep->new_pos = NULL;
}

pvl_status pvl__retain_commit(pvl_cache *c, pvl_seq *s, uint32_t layer,
                              const uint32_t *keep, uint32_t n_keep,
                              pvl_retain_prep *prep, void *stream,
                              const char *fn) {
  pvl_table *t = &s->tables[layer];
  const uint32_t bs = c->cfg.block_size;
  const uint32_t n_stay = prep->n_stay, n_new = prep->n_new;
  if (n_new > c->pool.num_free) {
    pvl__retain_abort(c, prep);
    return pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "compacting %u tokens needs %u free blocks, %u free",
                     n_keep, n_new, c->pool.num_free);
  }
  const uint32_t n_moved = n_new ? n_keep - n_stay * bs : 0;
  int32_t *dst = NULL;
  if (n_moved) {
    size_t bytes = (size_t)n_moved * sizeof(int64_t) +
                   (size_t)n_new * sizeof(int32_t);
    int64_t *src = pvl__scratch(c, bytes);
    if (!src) {
      pvl__retain_abort(c, prep);
      return pvl__fail(c, PVL_ERR_NO_MEMORY, fn,
                       "compaction list of %u tokens", n_moved);
    }
    dst = (int32_t *)(src + n_moved);
    for (uint32_t i = 0; i < n_moved; i++) {
      uint32_t from = keep[n_stay * bs + i];
      src[i] = (int64_t)t->blocks[from / bs] * bs + from % bs;
    }
    for (uint32_t j = 0; j < n_new; j++) dst[j] = pvl__pool_alloc(&c->pool);
    pvl_status st = c->be->gather(c, src, dst, n_moved, stream);
    if (st != PVL_SUCCESS) {
      for (uint32_t j = 0; j < n_new; j++) pvl__pool_decref(&c->pool, dst[j]);
      pvl__retain_abort(c, prep);
      return pvl__prefix(c, st, fn);
    }
  }
  /* Commit: nothing below fails. */
  const bool was_old = pvl__tail_old(s, t);
  if (prep->new_pos)
    for (uint32_t i = 0; i < n_keep; i++)
      prep->new_pos[i] = t->pos ? t->pos[keep[i]] : keep[i];
  for (uint32_t j = n_stay; j < t->n_blocks; j++)
    pvl__pool_decref(&c->pool, t->blocks[j]);
  for (uint32_t j = 0; j < n_new; j++) t->blocks[n_stay + j] = dst[j];
  c->layer_tokens[layer] -= t->n_tokens - n_keep;
  t->n_tokens = n_keep;
  t->n_blocks = n_stay + n_new;
  if (prep->new_pos) {
    pvl__free(c->alloc, t->pos, t->cap_pos * sizeof(uint32_t));
    t->pos = prep->new_pos;
    t->cap_pos = prep->cap_pos;
    prep->new_pos = NULL;
  }
  /* Dropping the newest slot leaves an older token last, which
   * pvl_plan_kv_write must not overwrite. */
  s->n_old_tail += (uint32_t)pvl__tail_old(s, t) - (uint32_t)was_old;
  t->epoch = ++c->epoch_clock;
  s->version = t->epoch;
  c->mut_clock++;
  return PVL_SUCCESS;
}

static pvl_status seq_retain(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                             const uint32_t *keep, uint32_t n_keep,
                             void *stream) {
  static const char fn[] = "pvl_seq_retain";
  if (!c) return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache is NULL");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, fn);
  if (st != PVL_SUCCESS) return st;
  pvl_retain_prep prep;
  st = pvl__retain_prepare(c, t, keep, n_keep, &prep, fn);
  if (st != PVL_SUCCESS) return st;
  if (c->dist) {
    /* Split by heads: every rank keeps the same slots or none does; the
     * pool check of the commit comes first so it is agreed on. */
    if (prep.n_new > c->pool.num_free)
      st = pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "compacting needs %u free blocks, %u free", prep.n_new,
                     c->pool.num_free);
    uint64_t fp = pvl__fp(PVL_FP_INIT, &id, sizeof(id));
    fp = pvl__fp(fp, &layer, sizeof(layer));
    fp = pvl__fp(fp, keep, (size_t)n_keep * sizeof(uint32_t));
    st = pvl__dist_agree(c, st, fp, fn);
    if (st != PVL_SUCCESS) {
      pvl__retain_abort(c, &prep);
      return st;
    }
  }
  return pvl__retain_commit(c, pvl__seq_get(c, id), layer, keep, n_keep, &prep,
                            stream, fn);
}

pvl_status pvl_seq_retain(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                          const uint32_t *keep, uint32_t n_keep, void *stream) {
  pvl__dist_begin(c, PVL_CALL_SEQ_RETAIN);
  return pvl__dist_end(c, seq_retain(c, id, layer, keep, n_keep, stream));
}

/* ---- data ---- */

static pvl_status check_range(const pvl_cache *c, const pvl_table *t,
                              uint32_t first, uint32_t n, const void *k,
                              const void *v, const char *fn) {
  if (n > 0 && (!k || !v))
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "k or v is NULL");
  if (first > t->n_tokens || n > t->n_tokens - first)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "slots [%u, %u + %u) outside the layer's %u tokens",
                     first, first, n, t->n_tokens);
  return PVL_SUCCESS;
}

pvl_status pvl_kv_write(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                        uint32_t first, uint32_t n, const void *k,
                        const void *v, void *stream) {
  if (!c) return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache is NULL");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, __func__);
  if (st == PVL_SUCCESS) st = check_range(c, t, first, n, k, v, __func__);
  if (st != PVL_SUCCESS || n == 0) return st;
  const uint32_t bs = c->cfg.block_size;
  const uint32_t b0 = first / bs, b1 = (first + n - 1) / bs;
  for (uint32_t b = b0; b <= b1; b++)
    if (c->pool.refcount[t->blocks[b]] > 1)
      return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                      "block %d (slot %u of layer %u) is shared with a fork "
                      "and read-only",
                      t->blocks[b], b * bs, layer);
  st = c->be->write_range(c, t->blocks + b0, first % bs, n, k, v, stream);
  return st == PVL_SUCCESS ? st : PVL_PREFIX(c, st);
}

pvl_status pvl_kv_read(const pvl_cache *c, pvl_seq_id id, uint32_t layer,
                       uint32_t first, uint32_t n, void *k, void *v,
                       void *stream) {
  if (!c) return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache is NULL");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, __func__);
  if (st == PVL_SUCCESS) st = check_range(c, t, first, n, k, v, __func__);
  if (st != PVL_SUCCESS || n == 0) return st;
  const uint32_t bs = c->cfg.block_size;
  st = c->be->read_range(c, t->blocks + first / bs, first % bs, n, k, v,
                         stream);
  return st == PVL_SUCCESS ? st : PVL_PREFIX(c, st);
}

/* ---- queries ---- */

pvl_status pvl_seq_get_info(const pvl_cache *c, pvl_seq_id id,
                            pvl_seq_info *out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  pvl_seq *s = NULL;
  pvl_status st = lookup(c, id, &s, __func__);
  if (st != PVL_SUCCESS) return st;
  pvl_seq_info info;
  memset(&info, 0, sizeof(info));
  info.n_prompt = s->n_prompt;
  info.n_decoded = s->n_decoded;
  info.position = s->n_prompt + s->n_decoded;
  info.n_visual_spans = s->n_spans;
  info.min_tokens = UINT32_MAX;
  for (uint32_t l = 0; l < c->cfg.num_layers; l++) {
    const pvl_table *t = &s->tables[l];
    if (t->n_tokens < info.min_tokens) info.min_tokens = t->n_tokens;
    if (t->n_tokens > info.max_tokens) info.max_tokens = t->n_tokens;
    info.total_tokens += t->n_tokens;
    info.total_blocks += t->n_blocks;
  }
  *out = info;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_layer_size(const pvl_cache *c, pvl_seq_id id,
                              uint32_t layer, uint32_t *n_tokens,
                              uint32_t *n_blocks) {
  if (!c || !n_tokens || !n_blocks)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "NULL argument");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, __func__);
  if (st != PVL_SUCCESS) return st;
  *n_tokens = t->n_tokens;
  *n_blocks = t->n_blocks;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_blocks(const pvl_cache *c, pvl_seq_id id, uint32_t layer,
                          int32_t *ids, uint32_t cap, uint32_t *n) {
  if (!c || !n || (cap > 0 && !ids))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "NULL argument");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, __func__);
  if (st != PVL_SUCCESS) return st;
  if (cap < t->n_blocks)
    return PVL_FAIL(c, PVL_ERR_CAPACITY, "cap = %u < %u blocks", cap,
                    t->n_blocks);
  /* An emptied layer (retain with n_keep = 0) has no blocks, and ids may
   * then be NULL: memcpy's pointers must be valid even for 0 bytes. */
  if (t->n_blocks) memcpy(ids, t->blocks, t->n_blocks * sizeof(int32_t));
  *n = t->n_blocks;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_positions(const pvl_cache *c, pvl_seq_id id,
                             uint32_t layer, uint32_t *pos, uint32_t cap,
                             uint32_t *n) {
  if (!c || !n || (cap > 0 && !pos))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "NULL argument");
  pvl_table *t = NULL;
  pvl_status st = lookup_layer(c, id, layer, &t, __func__);
  if (st != PVL_SUCCESS) return st;
  if (cap < t->n_tokens)
    return PVL_FAIL(c, PVL_ERR_CAPACITY, "cap = %u < %u tokens", cap,
                    t->n_tokens);
  for (uint32_t i = 0; i < t->n_tokens; i++) pos[i] = t->pos ? t->pos[i] : i;
  *n = t->n_tokens;
  return PVL_SUCCESS;
}

pvl_status pvl_seq_visual_spans(const pvl_cache *c, pvl_seq_id id,
                                pvl_span *spans, uint32_t cap, uint32_t *n) {
  if (!c || !n || (cap > 0 && !spans))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "NULL argument");
  pvl_seq *s = NULL;
  pvl_status st = lookup(c, id, &s, __func__);
  if (st != PVL_SUCCESS) return st;
  if (cap < s->n_spans)
    return PVL_FAIL(c, PVL_ERR_CAPACITY, "cap = %u < %u spans", cap,
                    s->n_spans);
  if (s->n_spans) memcpy(spans, s->spans, s->n_spans * sizeof(pvl_span));
  *n = s->n_spans;
  return PVL_SUCCESS;
}

pvl_status pvl_blocks_for_prompt(const pvl_cache *c, uint32_t n_prompt,
                                 uint64_t *out) {
  if (!c || !out)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache or out is NULL");
  if (n_prompt == 0)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "n_prompt = 0");
  *out = (uint64_t)ceil_div(n_prompt, c->cfg.block_size) * c->cfg.num_layers;
  return PVL_SUCCESS;
}

static pvl_status can_add(const pvl_cache *c, uint32_t n_prompt,
                          pvl_admit *out) {
  static const char fn[] = "pvl_can_add";
  if (!c || !out)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache or out is NULL");
  if (n_prompt == 0)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "n_prompt = 0");
  const uint64_t need =
      (uint64_t)ceil_div(n_prompt, c->cfg.block_size) * c->cfg.num_layers;
  if (need > c->pool.num_blocks)
    *out = PVL_ADMIT_NEVER;
  else if (need > c->pool.num_free || c->num_free_slots == 0)
    *out = PVL_ADMIT_LATER;
  else
    *out = PVL_ADMIT_OK;
  return PVL_SUCCESS;
}

pvl_status pvl_can_add(const pvl_cache *cc, uint32_t n_prompt, pvl_admit *out) {
  /* A split cache's exchange state is not part of its logical state. */
  pvl_cache *c = (pvl_cache *)cc;
  pvl_admit mine = PVL_ADMIT_OK;
  const bool coll = pvl__dist_begin(c, PVL_CALL_CAN_ADD);
  pvl_status st = can_add(c, n_prompt, coll ? &mine : out);
  if (!coll) return st;
  /* The worst answer of all ranks (split by layers the ranks' pools and
   * layer counts differ), so OK means pvl_seq_add succeeds everywhere. */
  st = pvl__dist_agree(c, st, pvl__fp(PVL_FP_INIT, &n_prompt, 4), __func__);
  int32_t worst = (int32_t)mine;
  if (st == PVL_SUCCESS) st = pvl__dist_max_i32(c, &worst, __func__);
  st = pvl__dist_end(c, st);
  if (st == PVL_SUCCESS) *out = (pvl_admit)worst;
  return st;
}
