/* Batch plans: the per-layer page tables of a decode batch as the kernels
 * read them (layout in kernels/pvl_kernels.h). Tables stay resident on the
 * device; a build sends only what changed since the last one, as (index,
 * value) pairs, and skips every sequence whose version it already holds, so
 * a decode step costs O(batch + changes) host work and O(changes) bytes,
 * not O(blocks held).
 *
 * The shared id array is managed like a heap: every row owns a region
 * (its ids plus slack), the rest is free regions, kept merged and in
 * segregated lists by size class (TLSF-style, O(1) per operation). A row
 * that outgrows its region first takes the free space right after it (no
 * id moves), else moves to the best-fitting free region, and the region
 * it leaves is free for the next one. So no build rewrites the plan whole
 * unless the free space is too fragmented for one row; that last resort
 * (repack) is counted in pvl_plan_info.full_rebuilds. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum {
  ROW_KEEP = 0,      /* same table, fits: send appended ids, changed base */
  ROW_REWRITE = 1,   /* other table or epoch, fits the row: rewrite it */
  ROW_GROW_SAME = 2, /* outgrew its region, same table: needs room */
  ROW_GROW = 3,      /* outgrew its region, other table: needs room */
  ROW_MOVED = 4,     /* has a region change in p->moves (phase A2) */
  ROW_NEAR = 8,      /* flag on KEEP / REWRITE: nearly full, may move early */
};

/* Early moves. A row that will soon outgrow its region may move in a
 * build that has little else to send, so the moves of rows that fill up
 * around the same step spread over the steps before it instead of landing
 * in one. Only rows of at least EARLY_MIN_BLOCKS blocks (a small row's
 * move is cheap), within early_margin blocks of full, and only while the
 * build sends at most EARLY_PAIRS pairs (about 40 us of host work). */
#define EARLY_MIN_BLOCKS 64
#define EARLY_PAIRS 16384
static inline uint32_t early_margin(uint32_t nb) { return 1 + nb / 128; }

#define REG_NONE (-1)
#define REG_UNUSED (-1) /* `free` of a spare descriptor */

/* Ids a region of row `row` (b * num_layers + l) holds beyond its nb
 * blocks: 2 + nb / 8 on average, spread over [nb / 16, 3 nb / 16] by a hash
 * of the row and nb. Rows of sequences that were admitted together grow in
 * lockstep: with equal slack they would all outgrow their regions in the
 * same step and move at once (a burst of whole-row rewrites, the p99 of a
 * decode step). The spread turns that burst into a trickle at the same
 * mean. Rows under 16 blocks keep 2 + nb / 8, as before. */
static inline uint32_t row_slack(uint32_t row, uint32_t nb) {
  if (nb < 16) return 2 + nb / 8;
  uint64_t h = ((uint64_t)row << 32 | nb) * 0x9e3779b97f4a7c15ull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  return 2 + nb / 16 + (uint32_t)(h % (nb / 8 + 1));
}

/* ---- the id array's allocator ---- */

/* Size class of a free region of len ids. Lengths below 2 * SL_N share
 * first level 0 in classes of two. */
static inline void reg_class(uint32_t len, uint32_t *fl, uint32_t *sl) {
  if (len < 2 * PVL_PLAN_SL_N) {
    *fl = 0;
    *sl = len / 2;
    return;
  }
  const uint32_t f = 31u - (uint32_t)__builtin_clz(len);
  *fl = f - PVL_PLAN_SL_LOG;
  *sl = (len >> (f - PVL_PLAN_SL_LOG)) & (PVL_PLAN_SL_N - 1);
}

static void reg_list_add(pvl_plan *p, int32_t d) {
  pvl_plan_region *r = &p->regs[d];
  uint32_t fl, sl;
  reg_class((uint32_t)r->len, &fl, &sl);
  r->free = 1;
  r->fprev = REG_NONE;
  r->fnext = p->heads[fl][sl];
  if (r->fnext != REG_NONE) p->regs[r->fnext].fprev = d;
  p->heads[fl][sl] = d;
  p->fl_bits |= 1u << fl;
  p->sl_bits[fl] |= (uint8_t)(1u << sl);
}

static void reg_list_remove(pvl_plan *p, int32_t d) {
  pvl_plan_region *r = &p->regs[d];
  uint32_t fl, sl;
  reg_class((uint32_t)r->len, &fl, &sl);
  if (r->fprev != REG_NONE)
    p->regs[r->fprev].fnext = r->fnext;
  else
    p->heads[fl][sl] = r->fnext;
  if (r->fnext != REG_NONE) p->regs[r->fnext].fprev = r->fprev;
  if (p->heads[fl][sl] == REG_NONE) {
    p->sl_bits[fl] &= (uint8_t) ~(1u << sl);
    if (!p->sl_bits[fl]) p->fl_bits &= ~(1u << fl);
  }
  r->free = 0;
}

/* A descriptor; the caller reserved it (reg_reserve). */
static int32_t reg_new(pvl_plan *p) {
  int32_t d;
  if (p->regs_spare != REG_NONE) {
    d = p->regs_spare;
    p->regs_spare = p->regs[d].fnext;
  } else {
    d = (int32_t)p->regs_hw++;
  }
  p->regs_used++;
  return d;
}

static void reg_release(pvl_plan *p, int32_t d) {
  p->regs[d].free = REG_UNUSED;
  p->regs[d].fnext = p->regs_spare;
  p->regs_spare = d;
  p->regs_used--;
}

/* Room for `extra` more descriptors; false (nothing changed) if the host
 * allocation fails. */
static bool reg_reserve(pvl_plan *p, uint64_t extra) {
  const uint64_t need = (uint64_t)p->regs_used + extra;
  if (need <= p->regs_cap) return true;
  if (need > INT32_MAX) return false;
  uint64_t cap = (uint64_t)p->regs_cap * 2;
  if (cap < need) cap = need;
  if (cap > INT32_MAX) cap = INT32_MAX;
  if (!pvl__grow(p->cache->alloc, (void **)&p->regs, sizeof(pvl_plan_region),
                 p->regs_cap, (size_t)cap))
    return false;
  p->regs_cap = (uint32_t)cap;
  return true;
}

/* One free region covering the whole array; every descriptor spare. */
static void reg_reset(pvl_plan *p) {
  p->regs_used = 0;
  p->regs_hw = 0;
  p->regs_spare = REG_NONE;
  p->fl_bits = 0;
  memset(p->sl_bits, 0, sizeof(p->sl_bits));
  for (uint32_t f = 0; f < PVL_PLAN_FL_N; f++)
    for (uint32_t i = 0; i < PVL_PLAN_SL_N; i++) p->heads[f][i] = REG_NONE;
  const int32_t d = reg_new(p);
  p->regs[d] = (pvl_plan_region){.off = 0,
                                 .len = (int32_t)p->block_cap,
                                 .prev = REG_NONE,
                                 .next = REG_NONE};
  reg_list_add(p, d);
}

/* Cuts the free region d to its first len ids, which become live; the rest
 * stays free. Needs one reserved descriptor. */
static void reg_take(pvl_plan *p, int32_t d, uint32_t len) {
  reg_list_remove(p, d);
  pvl_plan_region *r = &p->regs[d];
  if ((uint32_t)r->len > len) {
    const int32_t t = reg_new(p);
    r = &p->regs[d];
    pvl_plan_region *q = &p->regs[t];
    *q = (pvl_plan_region){.off = r->off + (int32_t)len,
                           .len = r->len - (int32_t)len,
                           .prev = d,
                           .next = r->next};
    if (r->next != REG_NONE) p->regs[r->next].prev = t;
    r->next = t;
    r->len = (int32_t)len;
    reg_list_add(p, t);
  }
}

/* A live region of len >= 1 ids, or REG_NONE. Good fit: first a region of
 * len's own class that is long enough (a few are looked at), else the
 * first region of the smallest class whose every region is long enough.
 * Needs one reserved descriptor. */
static int32_t reg_alloc(pvl_plan *p, uint32_t len) {
  uint32_t fl, sl;
  reg_class(len, &fl, &sl);
  int32_t d = p->heads[fl][sl];
  for (int tries = 0; d != REG_NONE && tries < 8; tries++) {
    if ((uint32_t)p->regs[d].len >= len) break;
    d = p->regs[d].fnext;
  }
  if (d == REG_NONE || (uint32_t)p->regs[d].len < len) {
    /* Round up to the next class boundary: every region from there on
     * fits. */
    const uint64_t up = len < 2 * PVL_PLAN_SL_N
                            ? (uint64_t)len + 1
                            : (uint64_t)len +
                                  (1ull << (31u - (uint32_t)__builtin_clz(len) -
                                            PVL_PLAN_SL_LOG)) -
                                  1;
    if (up >= (1ull << 31)) return REG_NONE;
    reg_class((uint32_t)up, &fl, &sl);
    if (fl >= PVL_PLAN_FL_N) return REG_NONE;
    uint32_t sl_map = p->sl_bits[fl] & (~0u << sl);
    if (!sl_map) {
      const uint32_t fl_map = fl + 1 < 32 ? p->fl_bits & (~0u << (fl + 1)) : 0;
      if (!fl_map) return REG_NONE;
      fl = (uint32_t)__builtin_ctz(fl_map);
      sl_map = p->sl_bits[fl];
    }
    d = p->heads[fl][(uint32_t)__builtin_ctz(sl_map)];
  }
  reg_take(p, d, len);
  return d;
}

/* Returns live region d to the free space, merged with free neighbours. */
static void reg_free(pvl_plan *p, int32_t d) {
  pvl_plan_region *r = &p->regs[d];
  const int32_t prev = r->prev, next = r->next;
  if (next != REG_NONE && p->regs[next].free == 1) {
    reg_list_remove(p, next);
    r->len += p->regs[next].len;
    r->next = p->regs[next].next;
    if (r->next != REG_NONE) p->regs[r->next].prev = d;
    reg_release(p, next);
  }
  if (prev != REG_NONE && p->regs[prev].free == 1) {
    reg_list_remove(p, prev);
    pvl_plan_region *q = &p->regs[prev];
    q->len += r->len;
    q->next = r->next;
    if (q->next != REG_NONE) p->regs[q->next].prev = prev;
    reg_release(p, d);
    d = prev;
  }
  reg_list_add(p, d);
}

/* Grows live region d in place to between min_len and want ids with the
 * free region after it; false (nothing changed) if that is too short. */
static bool reg_extend(pvl_plan *p, int32_t d, uint32_t min_len,
                       uint32_t want) {
  pvl_plan_region *r = &p->regs[d];
  const int32_t n = r->next;
  if (n == REG_NONE || p->regs[n].free != 1) return false;
  const uint64_t avail = (uint64_t)r->len + (uint64_t)p->regs[n].len;
  if (avail < min_len) return false;
  const uint32_t len = avail < want ? (uint32_t)avail : want;
  const int32_t take = (int32_t)len - r->len;
  reg_list_remove(p, n);
  pvl_plan_region *q = &p->regs[n];
  if (q->len == take) {
    r->next = q->next;
    if (r->next != REG_NONE) p->regs[r->next].prev = d;
    reg_release(p, n);
  } else {
    q->off += take;
    q->len -= take;
    reg_list_add(p, n);
  }
  r->len = (int32_t)len;
  return true;
}

/* Undoes reg_extend: live region d back to len ids. Needs one reserved
 * descriptor. */
static void reg_shrink(pvl_plan *p, int32_t d, uint32_t len) {
  pvl_plan_region *r = &p->regs[d];
  if ((uint32_t)r->len == len) return;
  const int32_t t = reg_new(p);
  r = &p->regs[d];
  p->regs[t] = (pvl_plan_region){.off = r->off + (int32_t)len,
                                 .len = r->len - (int32_t)len,
                                 .prev = d,
                                 .next = r->next};
  if (r->next != REG_NONE) p->regs[r->next].prev = t;
  r->next = t;
  r->len = (int32_t)len;
  reg_free(p, t);
}

/* ---- plans ---- */

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
  pvl__free(a, p->regs, p->regs_cap * sizeof(pvl_plan_region));
  pvl__free(a, p->moves, p->moves_cap * sizeof(pvl_plan_move));
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
  p->regs_cap = 16; /* grows with the batch (reg_reserve) */
  p->rows = pvl__alloc(a, (size_t)L * S * sizeof(pvl_plan_row));
  p->row_seq = pvl__alloc(a, S * sizeof(pvl_seq_id));
  p->row_version = pvl__alloc(a, S * sizeof(uint64_t));
  p->n_appended = pvl__alloc(a, S * sizeof(int32_t));
  p->seqs = pvl__alloc(a, S * sizeof(pvl_seq *));
  p->action = pvl__alloc(a, (size_t)L * S);
  p->skip = pvl__alloc(a, S);
  p->pairs = pvl__alloc(a, p->pairs_cap * 2 * sizeof(int32_t));
  p->regs = pvl__alloc(a, p->regs_cap * sizeof(pvl_plan_region));
  if (!p->rows || !p->row_seq || !p->row_version || !p->n_appended ||
      !p->seqs || !p->action || !p->skip || !p->pairs || !p->regs) {
    plan_free(p);
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan metadata for %u sequences",
                    max_seqs);
  }
  memset(p->rows, 0, (size_t)L * S * sizeof(pvl_plan_row));
  memset(p->row_seq, 0, S * sizeof(pvl_seq_id));
  memset(p->row_version, 0, S * sizeof(uint64_t));
  memset(p->n_appended, 0, S * sizeof(int32_t));
  if (cap > 0) reg_reset(p);
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

/* What phase A of a build found. */
typedef struct build_counts {
  uint64_t entries;  /* pairs, with every row that needs room relocated */
  uint64_t counters; /* n_appended pairs */
  uint32_t n_moves;  /* rows that need room */
  uint32_t n_near;   /* rows that may move early */
  uint32_t n_done;   /* moves recorded by phase A2 */
} build_counts;

/* Pairs a row that stays in its region sends. */
static inline uint64_t stay_pairs(const pvl_plan_row *r, const pvl_seq *s,
                                  uint32_t l, bool same_table) {
  const uint32_t nb = s->tables[l].n_blocks;
  return same_table ? (nb - r->synced) + (row_base(s, l) != r->base) : nb + 2;
}

/* Phase A of a build: decide the action of every row of the sequences the
 * plan does not already hold and count the pairs to send, without
 * changing anything. */
static void plan_classify(pvl_plan *p, uint32_t n, build_counts *bc) {
  const uint32_t L = p->cache->cfg.num_layers;
  uint64_t count = 0;
  uint32_t moves = 0, near = 0;
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
      const bool same_table = same && r[l].epoch == t->epoch;
      if (nb <= r[l].cap) {
        act[l] = same_table ? ROW_KEEP : ROW_REWRITE;
        count += stay_pairs(&r[l], s, l, same_table);
        if (nb >= EARLY_MIN_BLOCKS && r[l].cap - nb < early_margin(nb)) {
          act[l] |= ROW_NEAR;
          near++;
        }
      } else {
        act[l] = same_table ? ROW_GROW_SAME : ROW_GROW;
        count += nb + 2; /* until phase A2 finds room in place */
        moves++;
      }
    }
  }
  bc->entries = count;
  bc->n_moves = moves;
  bc->n_near = near;
}

/* Undoes the first k moves of phase A2 (the free space is as before). */
static void moves_undo(pvl_plan *p, uint32_t k) {
  while (k-- > 0) {
    if (p->moves[k].grown)
      reg_shrink(p, p->moves[k].reg, p->moves[k].len);
    else
      reg_free(p, p->moves[k].reg);
  }
}

/* Phase A2: room for every row that outgrew its region, in place or
 * elsewhere, then early moves of nearly full rows within the budget, all
 * recorded in p->moves (rows keep their old regions until the commit, so
 * this can be undone). False if the free space has no room for a row that
 * outgrew its region; everything is then undone. Keeps bc->entries exact:
 * rows grown in place send only their new ids. */
static bool plan_find_room(pvl_plan *p, uint32_t n, build_counts *bc) {
  const uint32_t L = p->cache->cfg.num_layers;
  uint32_t k = 0;
  for (uint32_t b = 0; b < n && k < bc->n_moves; b++) {
    if (p->skip[b]) continue;
    const pvl_seq *s = p->seqs[b];
    uint8_t *act = p->action + (size_t)b * L;
    for (uint32_t l = 0; l < L; l++) {
      if (act[l] != ROW_GROW && act[l] != ROW_GROW_SAME) continue;
      const pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      const uint32_t nb = s->tables[l].n_blocks;
      const uint32_t want = nb + row_slack(b, nb);
      pvl_plan_move *m = &p->moves[k++];
      m->row = b * L + l;
      m->same = act[l] == ROW_GROW_SAME;
      act[l] = ROW_MOVED;
      if (r->reg && reg_extend(p, r->reg - 1, nb, want)) {
        m->reg = r->reg - 1;
        m->len = r->cap;
        m->grown = 1;
        bc->entries -= (nb + 2) - stay_pairs(r, s, l, m->same);
        continue;
      }
      /* Without slack rather than not at all: the row moves again sooner,
       * but no repack. */
      int32_t d = reg_alloc(p, want);
      if (d == REG_NONE) d = reg_alloc(p, nb);
      if (d == REG_NONE) {
        moves_undo(p, k - 1);
        return false;
      }
      m->reg = d;
      m->grown = 0;
    }
  }
  /* Early moves never fail the build: a row without room stays. */
  uint32_t near = bc->n_near;
  for (uint32_t b = 0; b < n && near > 0; b++) {
    if (p->skip[b]) continue;
    const pvl_seq *s = p->seqs[b];
    uint8_t *act = p->action + (size_t)b * L;
    for (uint32_t l = 0; l < L && near > 0; l++) {
      if (!(act[l] & ROW_NEAR)) continue;
      near--;
      const bool same_table = (act[l] & ~ROW_NEAR) == ROW_KEEP;
      act[l] &= (uint8_t)~ROW_NEAR;
      const pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      const uint32_t nb = s->tables[l].n_blocks;
      const uint32_t want = nb + row_slack(b, nb);
      pvl_plan_move *m = &p->moves[k];
      m->row = b * L + l;
      m->same = same_table;
      if (reg_extend(p, r->reg - 1, nb + early_margin(nb), want)) {
        /* Free: the ids stay where they are. */
        m->reg = r->reg - 1;
        m->len = r->cap;
        m->grown = 1;
        act[l] = ROW_MOVED;
        k++;
        continue;
      }
      const uint64_t extra = (nb + 2) - stay_pairs(r, s, l, same_table);
      if (bc->entries + bc->counters + extra > EARLY_PAIRS) continue;
      const int32_t d = reg_alloc(p, want);
      if (d == REG_NONE) continue;
      m->reg = d;
      m->grown = 0;
      act[l] = ROW_MOVED;
      bc->entries += extra;
      k++;
    }
  }
  bc->n_done = k;
  return true;
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
  /* The ids: a plain loop over local pointers (a moved row sends a few
   * hundred of them). */
  const int64_t at = pvl_plan_block_ids_index(&p->view, (int32_t)l) + r->offset;
  int32_t *out = p->pairs + 2 * *k;
  const int32_t *blocks = t->blocks;
  for (uint32_t j = from; j < t->n_blocks; j++) {
    out[2 * (j - from)] = (int32_t)(at + j);
    out[2 * (j - from) + 1] = blocks[j];
  }
  *k += t->n_blocks - from;
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
      total += nb + (slack ? row_slack(b, nb) : 0);
    }
  return total;
}

/* The last resort: lays every row of the batch out again from the start,
 * with slack if it fits; rows past the batch lose their regions. Needs
 * n * num_layers + 1 reserved descriptors. */
static void plan_repack(pvl_plan *p, uint32_t n, uint64_t *k) {
  const uint32_t L = p->cache->cfg.num_layers;
  const bool slack = layout_size(p, n, true) <= p->block_cap;
  reg_reset(p);
  for (uint32_t b = 0; b < n; b++)
    for (uint32_t l = 0; l < L; l++) {
      pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      const uint32_t nb = p->seqs[b]->tables[l].n_blocks;
      const uint32_t len = nb + (slack ? row_slack(b, nb) : 0);
      r->reg = 0;
      r->offset = 0;
      r->cap = 0;
      if (len) {
        /* The free space is one region: this takes its start. */
        const int32_t d = reg_alloc(p, len);
        r->reg = d + 1;
        r->offset = p->regs[d].off;
        r->cap = len;
      }
      row_write(p, k, b, l, 0, true);
    }
  memset(p->rows + (size_t)n * L, 0,
         (size_t)(p->max_seqs - n) * L * sizeof(pvl_plan_row));
  memset(p->row_seq + n, 0, (size_t)(p->max_seqs - n) * sizeof(pvl_seq_id));
  p->info.full_rebuilds++;
}

/* Phase B: apply the moves of phase A2, then the actions of phase A. */
static void plan_apply(pvl_plan *p, uint32_t n, const build_counts *bc,
                       uint64_t *k) {
  const uint32_t L = p->cache->cfg.num_layers;
  for (uint32_t i = 0; i < bc->n_done; i++) {
    const pvl_plan_move *m = &p->moves[i];
    pvl_plan_row *r = &p->rows[m->row];
    if (!m->grown) {
      /* No region is taken after phase A2, so the old one is free only
       * now, for the next builds. */
      if (r->reg) reg_free(p, r->reg - 1);
      r->reg = m->reg + 1;
      r->offset = p->regs[m->reg].off;
    }
    r->cap = (uint32_t)p->regs[m->reg].len;
    if (m->grown && m->same)
      row_write(p, k, m->row / L, m->row % L, r->synced, false);
    else
      row_write(p, k, m->row / L, m->row % L, 0, true);
  }
  for (uint32_t b = 0; b < n; b++) {
    if (p->skip[b]) continue;
    const uint8_t *act = p->action + (size_t)b * L;
    for (uint32_t l = 0; l < L; l++) {
      pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      switch (act[l] & ~ROW_NEAR) {
      case ROW_KEEP:
        row_write(p, k, b, l, r->synced, false);
        break;
      case ROW_REWRITE:
        /* The offset is unchanged, but resending it is simpler than a
         * special case (phase A counted it). */
        row_write(p, k, b, l, 0, true);
        break;
      default: /* ROW_MOVED: written above */ break;
      }
    }
  }
}

/* Room for `want` staged pairs; false (nothing changed) on NO_MEMORY. */
static bool pairs_reserve(pvl_plan *p, uint64_t want) {
  if (want <= p->pairs_cap) return true;
  size_t cap = p->pairs_cap;
  while (cap < want) cap *= 2;
  int32_t *fresh = pvl__alloc(p->cache->alloc, cap * 2 * sizeof(int32_t));
  if (!fresh) return false;
  pvl__free(p->cache->alloc, p->pairs, p->pairs_cap * 2 * sizeof(int32_t));
  p->pairs = fresh;
  p->pairs_cap = cap;
  return true;
}

pvl_status pvl_plan_build(pvl_plan *p, const pvl_seq_id *seqs, uint32_t n,
                          void *stream) {
  if (!p) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "plan is NULL");
  pvl_cache *c = p->cache;
  const uint32_t L = c->cfg.num_layers;
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

  /* Phase A reads p->seqs: point it at the new batch, restore on failure
   * (every failure below happens before anything changed). */
  p->seqs = cur;
  build_counts bc;
  plan_classify(p, n, &bc);
  bc.counters = 0;
  for (uint32_t b = 0; b < n; b++)
    bc.counters += p->stale || p->n_appended[b] != (int32_t)cur[b]->n_decoded;
  /* Each move may split a free region (one descriptor), and undoing an
   * extension splits one more. */
  const uint32_t max_moves = bc.n_moves + bc.n_near;
  if (!reg_reserve(p, 2 * (uint64_t)max_moves + 2)) {
    p->seqs = prev;
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan regions for %u moves",
                    max_moves);
  }
  if (max_moves > p->moves_cap) {
    uint32_t cap = p->moves_cap * 2 > max_moves ? p->moves_cap * 2 : max_moves;
    if (cap > p->max_seqs * L) cap = p->max_seqs * L;
    pvl_plan_move *fresh = pvl__alloc(c->alloc, cap * sizeof(pvl_plan_move));
    if (!fresh) {
      p->seqs = prev;
      return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "plan moves for %u rows",
                      max_moves);
    }
    pvl__free(c->alloc, p->moves, p->moves_cap * sizeof(pvl_plan_move));
    p->moves = fresh;
    p->moves_cap = cap;
  }
  /* Early moves stop at EARLY_PAIRS pairs in all. */
  uint64_t staged = bc.entries + bc.counters;
  if (bc.n_near && staged < EARLY_PAIRS) staged = EARLY_PAIRS;
  if (!pairs_reserve(p, staged)) {
    p->seqs = prev;
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "%llu plan updates",
                    (unsigned long long)staged);
  }
  bool repack = false;
  if (!plan_find_room(p, n, &bc)) {
    /* Too fragmented for some row (undone): lay the batch out again. */
    const uint64_t tight = layout_size(p, n, false);
    if (tight > p->block_cap) {
      p->seqs = prev;
      return PVL_FAIL(c, PVL_ERR_CAPACITY,
                      "the batch holds more than the plan's %llu block "
                      "entries",
                      (unsigned long long)p->block_cap);
    }
    /* Every row whole: its ids, offset and base. */
    const uint64_t all = tight + 2 * (uint64_t)n * L + bc.counters;
    if (!reg_reserve(p, (uint64_t)n * L + 1 > p->regs_used
                            ? (uint64_t)n * L + 1 - p->regs_used
                            : 0) ||
        !pairs_reserve(p, all)) {
      p->seqs = prev;
      return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "repacking the plan (%llu pairs)",
                      (unsigned long long)all);
    }
    repack = true;
  }
  memcpy(prev, cur, (size_t)n * sizeof(pvl_seq *));
  p->seqs = prev;

  uint64_t k = 0;
  if (repack)
    plan_repack(p, n, &k);
  else
    plan_apply(p, n, &bc, &k);
  uint32_t old_tail_rows = 0;
  for (uint32_t b = 0; b < n; b++) {
    const pvl_seq *s = p->seqs[b];
    p->row_seq[b] = s->id;
    p->row_version[b] = s->version;
    old_tail_rows += s->n_old_tail != 0;
    if (p->stale || p->n_appended[b] != (int32_t)s->n_decoded) {
      p->n_appended[b] = (int32_t)s->n_decoded;
      put(p, &k, pvl_plan_n_appended_index(&p->view, (int32_t)b),
          p->n_appended[b]);
    }
  }
  p->n_seqs = n;
  p->view.n_seqs = (int32_t)n;
  p->old_tail_rows = old_tail_rows;
  p->stale = false;
  p->built = true;
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
  if (!p->built)
    return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                     "the plan was never built: call pvl_plan_build first");
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
  /* The kernels write slot len - 1 of each row. It must be the slot of the
   * sequence's newest position: after a retain dropped that slot it holds
   * an older token, which must not be overwritten. The build counted the
   * rows with such layers (a fresh plan still holds), so in the common case
   * (no such row, no fork) nothing here is per row. */
  if (p->old_tail_rows || c->pool.num_shared) {
    for (uint32_t b = 0; b < p->n_seqs; b++) {
      const pvl_seq *s = p->seqs[b];
      const pvl_table *t = &s->tables[layer];
      if (t->n_tokens == 0)
        return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                        "row %u (sequence 0x%llx) has no slot in layer %u: "
                        "append first",
                        b, (unsigned long long)s->id, layer);
      if (s->n_old_tail && pvl__tail_old(s, t))
        return PVL_FAIL(
            c, PVL_ERR_BAD_STATE,
            "row %u (sequence 0x%llx): the last slot of layer %u holds "
            "position %u, not the newest position %u (a retain or "
            "compression dropped it): writing would overwrite an older "
            "token; pvl_seq_append a slot for the new token first",
            b, (unsigned long long)s->id, layer, t->pos[t->n_tokens - 1],
            s->n_prompt + s->n_decoded - 1);
      if (c->pool.num_shared &&
          c->pool.refcount[t->blocks[t->n_blocks - 1]] > 1)
        return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                        "row %u's last block in layer %u is shared with a "
                        "fork: append (which copies it) before writing",
                        b, layer);
    }
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

/* ---- invariant check (tests) ---- */

pvl_status pvl__plan_check(const pvl_plan *p, char *msg, size_t msg_len) {
#define BAD(...)                                                               \
  do {                                                                         \
    if (msg && msg_len) snprintf(msg, msg_len, "plan: " __VA_ARGS__);          \
    st = PVL_ERR_INTERNAL;                                                     \
    goto done;                                                                 \
  } while (0)
  pvl_status st = PVL_SUCCESS;
  const uint32_t L = p->cache->cfg.num_layers;
  /* owner[d]: 0 = not yet seen, 1 = region seen on the chain, 2 = owned
   * by a row. libc, so a test's failing allocator does not see it. */
  uint8_t *owner = calloc((size_t)p->regs_hw + 1, 1);
  if (!owner) {
    if (msg && msg_len) snprintf(msg, msg_len, "no memory for the check");
    return PVL_ERR_NO_MEMORY;
  }
  if (p->regs_used > p->regs_hw || p->regs_hw > p->regs_cap)
    BAD("%u descriptors used, %u handed out, capacity %u", p->regs_used,
        p->regs_hw, p->regs_cap);
  int32_t first = REG_NONE;
  for (uint32_t d = 0; d < p->regs_hw; d++)
    if (p->regs[d].free != REG_UNUSED && p->regs[d].prev == REG_NONE) {
      if (first != REG_NONE)
        BAD("regions %d and %u both start the array", first, d);
      first = (int32_t)d;
    }
  uint64_t off = 0;
  uint32_t n_regs = 0, n_free = 0;
  for (int32_t d = first, prev = REG_NONE; d != REG_NONE;
       prev = d, d = p->regs[d].next) {
    const pvl_plan_region *r = &p->regs[d];
    if ((uint32_t)d >= p->regs_hw || owner[d])
      BAD("region chain revisits or leaves the descriptors at %d", d);
    owner[d] = 1;
    if (r->prev != prev)
      BAD("region %d: prev %d, expected %d", d, r->prev, prev);
    if (r->len <= 0 || (uint64_t)r->off != off)
      BAD("region %d = [%d, +%d) does not follow at %llu", d, r->off, r->len,
          (unsigned long long)off);
    if (r->free != 0 && r->free != 1) BAD("region %d: free = %d", d, r->free);
    if (r->free && prev != REG_NONE && p->regs[prev].free)
      BAD("free regions %d and %d are adjacent", prev, d);
    off += (uint64_t)r->len;
    n_regs++;
    n_free += (uint32_t)r->free;
  }
  if (off != p->block_cap)
    BAD("regions cover %llu of %llu ids", (unsigned long long)off,
        (unsigned long long)p->block_cap);
  if (n_regs != p->regs_used)
    BAD("%u regions on the chain, %u descriptors in use", n_regs, p->regs_used);
  uint32_t listed = 0;
  for (uint32_t f = 0; f < PVL_PLAN_FL_N; f++)
    for (uint32_t i = 0; i < PVL_PLAN_SL_N; i++) {
      const int32_t h = p->heads[f][i];
      if ((h != REG_NONE) != !!(p->sl_bits[f] & (1u << i)) ||
          (p->sl_bits[f] != 0) != !!(p->fl_bits & (1u << f)))
        BAD("class (%u, %u): bitmaps disagree with the list", f, i);
      for (int32_t d = h, prev = REG_NONE; d != REG_NONE;
           prev = d, d = p->regs[d].fnext) {
        if ((uint32_t)d >= p->regs_hw || owner[d] != 1 || !p->regs[d].free)
          BAD("class (%u, %u) lists region %d, not a free region", f, i, d);
        uint32_t cf, cs;
        reg_class((uint32_t)p->regs[d].len, &cf, &cs);
        if (cf != f || cs != i || p->regs[d].fprev != prev)
          BAD("region %d of %d ids is in class (%u, %u)", d, p->regs[d].len, f,
              i);
        if (++listed > n_free) BAD("a free list loops");
      }
    }
  if (listed != n_free) BAD("%u free regions, %u listed", n_free, listed);
  for (uint32_t b = 0; b < p->max_seqs; b++)
    for (uint32_t l = 0; l < L; l++) {
      const pvl_plan_row *r = &p->rows[(size_t)b * L + l];
      if (!r->reg) {
        if (r->cap) BAD("row (%u, %u) has cap %u and no region", b, l, r->cap);
        continue;
      }
      const int32_t d = r->reg - 1;
      if ((uint32_t)d >= p->regs_hw || owner[d] != 1 || p->regs[d].free)
        BAD("row (%u, %u): region %d is not a live region, or shared", b, l, d);
      owner[d] = 2;
      if (p->regs[d].off != r->offset || (uint32_t)p->regs[d].len != r->cap)
        BAD("row (%u, %u) at [%d, +%u), its region [%d, +%d)", b, l, r->offset,
            r->cap, p->regs[d].off, p->regs[d].len);
      if (b < p->n_seqs && r->synced > r->cap)
        BAD("row (%u, %u): %u ids in a region of %u", b, l, r->synced, r->cap);
    }
  for (uint32_t d = 0; d < p->regs_hw; d++)
    if (owner[d] == 1 && !p->regs[d].free)
      BAD("live region %u = [%d, +%d) belongs to no row", d, p->regs[d].off,
          p->regs[d].len);
done:
  free(owner);
  return st;
#undef BAD
}
