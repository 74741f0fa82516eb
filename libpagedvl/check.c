/* Whole-cache invariant checks, for tests and debugging: every block is free
 * or referenced exactly refcount times, the free list is a set, and the
 * per-layer token sums match the tables. O(blocks + tokens). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

uint32_t pvl__block_refcount(const pvl_cache *c, int32_t block) {
  if (block < 0 || (uint32_t)block >= c->pool.num_blocks) return 0;
  return c->pool.refcount[block];
}

pvl_status pvl__cache_check(const pvl_cache *c, char *msg, size_t msg_len) {
#define BAD(...)                                                             \
  do {                                                                       \
    if (msg && msg_len) snprintf(msg, msg_len, __VA_ARGS__);                 \
    st = PVL_ERR_INTERNAL;                                                   \
    goto done;                                                               \
  } while (0)
  pvl_status st = PVL_SUCCESS;
  const uint32_t nb = c->pool.num_blocks, L = c->cfg.num_layers;
  const uint32_t bs = c->cfg.block_size;
  /* libc, paired, so a test's failing allocator does not see the check. */
  uint32_t *refs = calloc((size_t)nb + 1, sizeof(uint32_t));
  uint64_t *tok = calloc(L, sizeof(uint64_t));
  if (!refs || !tok) {
    if (msg && msg_len) snprintf(msg, msg_len, "no memory for the check");
    st = PVL_ERR_NO_MEMORY;
    goto done;
  }
  uint32_t live = 0;
  for (uint32_t i = 0; i < c->cfg.max_seqs; i++) {
    const pvl_seq *s = c->slots[i];
    if (!s) continue;
    live++;
    if ((uint32_t)(s->id & 0xffffffu) != i) BAD("seq in slot %u has id %llx", i, (unsigned long long)s->id);
    uint32_t old_tail = 0;
    for (uint32_t l = 0; l < L; l++)
      old_tail += pvl__tail_old(s, &s->tables[l]);
    if (old_tail != s->n_old_tail)
      BAD("seq %llx: %u layers end before the newest position, counter says "
          "%u",
          (unsigned long long)s->id, old_tail, s->n_old_tail);
    for (uint32_t l = 0; l < L; l++) {
      const pvl_table *t = &s->tables[l];
      if (t->n_blocks != t->n_tokens / bs + (t->n_tokens % bs != 0))
        BAD("seq %llx layer %u: %u tokens in %u blocks",
            (unsigned long long)s->id, l, t->n_tokens, t->n_blocks);
      if (t->n_blocks > t->cap_blocks)
        BAD("seq %llx layer %u: %u blocks > capacity %u",
            (unsigned long long)s->id, l, t->n_blocks, t->cap_blocks);
      if (t->pos && t->n_tokens > t->cap_pos)
        BAD("seq %llx layer %u: %u positions > capacity %u",
            (unsigned long long)s->id, l, t->n_tokens, t->cap_pos);
      for (uint32_t j = 0; j < t->n_blocks; j++) {
        int32_t b = t->blocks[j];
        if (b < 0 || (uint32_t)b >= nb)
          BAD("seq %llx layer %u block[%u] = %d out of range",
              (unsigned long long)s->id, l, j, b);
        refs[b]++;
      }
      tok[l] += t->n_tokens;
    }
  }
  if (live != c->num_seqs) BAD("%u live sequences, counter says %u", live, c->num_seqs);
  if (live + c->num_free_slots != c->cfg.max_seqs)
    BAD("%u live + %u free slots != max_seqs %u", live, c->num_free_slots,
        c->cfg.max_seqs);
  for (uint32_t l = 0; l < L; l++)
    if (tok[l] != c->layer_tokens[l])
      BAD("layer %u holds %llu tokens, counter says %llu", l,
          (unsigned long long)tok[l], (unsigned long long)c->layer_tokens[l]);
  uint32_t used = 0, shared = 0;
  for (uint32_t b = 0; b < nb; b++) {
    if (refs[b] != c->pool.refcount[b])
      BAD("block %u: %u table references, refcount %u", b, refs[b],
          c->pool.refcount[b]);
    used += refs[b] > 0;
    shared += refs[b] > 1;
  }
  if (shared != c->pool.num_shared)
    BAD("%u shared blocks, counter says %u", shared, c->pool.num_shared);
  if (c->pool.num_free > nb) BAD("num_free %u > num_blocks %u", c->pool.num_free, nb);
  /* Reuse refs as a seen-mark for the free list. */
  for (uint32_t i = 0; i < c->pool.num_free; i++) {
    int32_t b = c->pool.free_stack[i];
    if (b < 0 || (uint32_t)b >= nb) BAD("free_stack[%u] = %d out of range", i, b);
    if (c->pool.refcount[b] != 0) BAD("block %d is free with refcount %u", b, c->pool.refcount[b]);
    if (refs[b] == UINT32_MAX) BAD("block %d is on the free list twice", b);
    refs[b] = UINT32_MAX;
  }
  if (used + c->pool.num_free != nb)
    BAD("%u used + %u free != %u blocks (a block leaked)", used,
        c->pool.num_free, nb);
  for (const pvl_plan *p = c->plans; p; p = p->next) {
    st = pvl__plan_check(p, msg, msg_len);
    if (st != PVL_SUCCESS) goto done;
  }
done:
  free(refs);
  free(tok);
  return st;
#undef BAD
}
