/* Sequences: admission (and its span checks), append across block
 * boundaries and its all-or-nothing batches, fork with copy-on-write,
 * free, retain (compaction), the scheduler queries, stale ids and the
 * max_seqs capacity. Data is checked through token tags (testutil.h). */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

#define SEED(r, name)                                                          \
  tu_rng r;                                                                    \
  tu_rng_init(&r, tu_seed(name))

/* Writes tags base + i to slots [0, n) of a layer. */
static void tag_layer(pvl_cache *c, pvl_seq_id s, uint32_t layer, uint32_t n,
                      float base) {
  float *t = malloc((n + 1) * sizeof(float));
  for (uint32_t i = 0; i < n; i++) t[i] = base + (float)i;
  TU_OK(c, tu_write_tags(c, s, layer, 0, n, t));
  free(t);
}

/* Asserts slots [0, n) of a layer hold the tags `want`. */
static void expect_tags(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                        const float *want, uint32_t n, const char *what) {
  float *got = malloc((n + 1) * sizeof(float));
  TU_OK(c, tu_read_tags(c, s, layer, 0, n, got));
  for (uint32_t i = 0; i < n; i++)
    cr_assert_eq(got[i], want[i], "%s: layer %u slot %u holds tag %g, want %g",
                 what, layer, i, (double)got[i], (double)want[i]);
  free(got);
}

static void expect_tag_range(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                             uint32_t n, float base, const char *what) {
  float *want = malloc((n + 1) * sizeof(float));
  for (uint32_t i = 0; i < n; i++) want[i] = base + (float)i;
  expect_tags(c, s, layer, want, n, what);
  free(want);
}

static void expect_positions(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                             const uint32_t *want, uint32_t n,
                             const char *what) {
  uint32_t *pos = malloc((n + 1) * sizeof(uint32_t));
  uint32_t got = 0;
  TU_OK(c, pvl_seq_positions(c, s, layer, pos, n, &got));
  cr_assert_eq(got, n, "%s: %u positions, want %u", what, got, n);
  for (uint32_t i = 0; i < n; i++)
    cr_assert_eq(pos[i], want[i],
                 "%s: layer %u slot %u at position %u, want %u", what, layer, i,
                 pos[i], want[i]);
  free(pos);
}

/* ---- admission ---- */

Test(seq, add_reserves_ceil_blocks_in_every_layer) {
  const uint32_t sizes[] = {1, 3, 4, 5, 8, 9, 13, 64};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    const uint32_t n = sizes[i], L = 3, bs = 4;
    pvl_cache *c = tu_cache(L, 2, 1, 4, bs, 64, PVL_DTYPE_F32);
    pvl_seq_id s = tu_add(c, n);
    const uint32_t nb = tu_ceil_div(n, bs);
    pvl_stats st = tu_stats(c);
    cr_assert_eq(st.used_blocks, L * nb, "n = %u", n);
    cr_assert_eq(st.free_blocks, 64 - L * nb);
    cr_assert_eq(st.tokens, (uint64_t)L * n);
    cr_assert_eq(st.num_seqs, 1);
    uint64_t lt[3];
    TU_OK(c, pvl_cache_layer_tokens(c, lt, 3));
    uint32_t *pos = malloc(n * sizeof(uint32_t));
    for (uint32_t j = 0; j < n; j++) pos[j] = j;
    for (uint32_t l = 0; l < L; l++) {
      cr_assert_eq(lt[l], n);
      cr_assert_eq(tu_layer_tokens(c, s, l), n);
      cr_assert_eq(tu_layer_blocks(c, s, l), nb);
      expect_positions(c, s, l, pos, n, "fresh prompt");
    }
    free(pos);
    pvl_seq_info info;
    TU_OK(c, pvl_seq_get_info(c, s, &info));
    cr_assert_eq(info.n_prompt, n);
    cr_assert_eq(info.n_decoded, 0);
    cr_assert_eq(info.position, n);
    cr_assert_eq(info.n_visual_spans, 0);
    cr_assert_eq(info.min_tokens, n);
    cr_assert_eq(info.max_tokens, n);
    cr_assert_eq(info.total_tokens, (uint64_t)L * n);
    cr_assert_eq(info.total_blocks, (uint64_t)L * nb);
    uint64_t need = 0;
    TU_OK(c, pvl_blocks_for_prompt(c, n, &need));
    cr_assert_eq(need, (uint64_t)L * nb);
    TU_CHECK(c);
    pvl_cache_destroy(c);
  }
}

Test(seq, visual_spans_are_validated_and_kept) {
  pvl_cache *c = tu_cache(2, 1, 1, 2, 4, 64, PVL_DTYPE_F32);
  const pvl_span ok[] = {{0, 2}, {5, 9}, {9, 10}};
  pvl_seq_id s = 0;
  TU_OK(c, pvl_seq_add(c, 10, ok, 3, &s));
  pvl_span got[3];
  uint32_t n = 0;
  TU_OK(c, pvl_seq_visual_spans(c, s, got, 3, &n));
  cr_assert_eq(n, 3);
  for (int i = 0; i < 3; i++) {
    cr_assert_eq(got[i].begin, ok[i].begin);
    cr_assert_eq(got[i].end, ok[i].end);
  }
  /* A short buffer is refused, as pvl_seq_blocks refuses one, and left
   * untouched. */
  pvl_span one = {99, 99};
  n = 7;
  cr_assert_eq(pvl_seq_visual_spans(c, s, &one, 1, &n), PVL_ERR_CAPACITY);
  cr_assert_eq(n, 7);
  cr_assert_eq(one.begin, 99);
  cr_assert_eq(one.end, 99);
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.n_visual_spans, 3);
  /* NULL with no spans is fine. */
  pvl_seq_id s2 = 0;
  TU_OK(c, pvl_seq_add(c, 3, NULL, 0, &s2));

  struct {
    pvl_span v[2];
    uint32_t n;
    const char *what;
  } bad[] = {
      {{{3, 3}}, 1, "empty span"},
      {{{4, 2}}, 1, "reversed span"},
      {{{5, 11}}, 1, "end past the prompt"},
      {{{10, 11}}, 1, "begin at the prompt's end"},
      {{{0, 4}, {3, 6}}, 2, "overlapping"},
      {{{5, 6}, {1, 2}}, 2, "unsorted"},
      {{{0, 0xffffffffu}}, 1, "huge end"},
  };
  pvl_seq_id ids[2] = {s, s2};
  tu_snap *before = tu_snap_take(c, ids, 2, false);
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    pvl_seq_id x = 12345;
    pvl_status st = pvl_seq_add(c, 10, bad[i].v, bad[i].n, &x);
    cr_assert_eq(st, PVL_ERR_INVALID_ARGUMENT, "%s: %s", bad[i].what,
                 pvl_status_string(st));
    cr_assert_eq(x, 12345, "%s: out written on failure", bad[i].what);
    TU_UNCHANGED(c, before, ids, 2, false);
  }
  pvl_seq_id x = 0;
  cr_assert_eq(pvl_seq_add(c, 10, NULL, 1, &x), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_add(c, 0, NULL, 0, &x), PVL_ERR_INVALID_ARGUMENT);
  TU_UNCHANGED(c, before, ids, 2, false);
  tu_snap_free(before);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- append ---- */

Test(seq, append_takes_a_block_only_at_the_boundary) {
  const uint32_t L = 3, bs = 4, P = 3;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, P);
  int32_t first[3][32];
  for (uint32_t l = 0; l < L; l++) tu_blocks(c, s, l, first[l], 32);
  for (uint32_t i = 1; i <= 30; i++) {
    uint64_t need = 99;
    TU_OK(c, pvl_blocks_for_append(c, &s, 1, &need));
    const uint32_t n_before = P + i - 1;
    cr_assert_eq(need, n_before % bs == 0 ? L : 0, "step %u", i);
    const uint32_t free_before = tu_free_blocks(c);
    TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
    const uint32_t n = P + i;
    cr_assert_eq(free_before - tu_free_blocks(c), need,
                 "step %u: blocks_for_append said %llu", i,
                 (unsigned long long)need);
    cr_assert_eq(tu_free_blocks(c), 64 - L * tu_ceil_div(n, bs));
    for (uint32_t l = 0; l < L; l++) {
      cr_assert_eq(tu_layer_tokens(c, s, l), n);
      int32_t ids[32];
      uint32_t nb = tu_blocks(c, s, l, ids, 32);
      cr_assert_eq(nb, tu_ceil_div(n, bs));
      /* Earlier blocks never move. */
      for (uint32_t j = 0; j < tu_ceil_div(n - 1, bs); j++)
        cr_assert_eq(ids[j], first[l][j], "step %u layer %u block %u", i, l, j);
      memcpy(first[l], ids, nb * sizeof(int32_t));
    }
    pvl_seq_info info;
    TU_OK(c, pvl_seq_get_info(c, s, &info));
    cr_assert_eq(info.n_decoded, i);
    cr_assert_eq(info.position, n);
    cr_assert_eq(info.n_prompt, P);
    TU_CHECK(c);
  }
  uint32_t pos[40];
  for (uint32_t j = 0; j < 33; j++) pos[j] = j;
  for (uint32_t l = 0; l < L; l++)
    expect_positions(c, s, l, pos, 33, "appended");
  pvl_cache_destroy(c);
}

Test(seq, append_batch_is_all_or_nothing) {
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 20, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 4); /* full block: append needs 3 */
  pvl_seq_id b = tu_add(c, 8); /* full: needs 3 */
  pvl_seq_id d = tu_add(c, 5); /* partial: in place */
  for (uint32_t l = 0; l < L; l++) {
    tag_layer(c, a, l, 4, 100 + 10 * l);
    tag_layer(c, b, l, 8, 200 + 10 * l);
    tag_layer(c, d, l, 5, 300 + 10 * l);
  }
  cr_assert_eq(tu_free_blocks(c), 5);
  pvl_seq_id batch[3] = {d, a, b};
  uint64_t need = 0;
  TU_OK(c, pvl_blocks_for_append(c, batch, 3, &need));
  cr_assert_eq(need, 6);

  tu_snap *before = tu_snap_take(c, batch, 3, true);
  cr_assert_eq(pvl_seq_append(c, batch, 3, NULL), PVL_ERR_OUT_OF_BLOCKS);
  cr_assert(strstr(pvl_cache_last_error(c), "pvl_seq_append"), "message: %s",
            pvl_cache_last_error(c));
  TU_UNCHANGED(c, before, batch, 3, true);
  tu_snap_free(before);
  TU_CHECK(c);

  /* The first two fit. */
  TU_OK(c, pvl_seq_append(c, batch, 2, NULL));
  cr_assert_eq(tu_free_blocks(c), 2);
  cr_assert_eq(tu_layer_tokens(c, d, 0), 6);
  cr_assert_eq(tu_layer_tokens(c, a, 0), 5);
  cr_assert_eq(tu_layer_tokens(c, b, 0), 8);
  before = tu_snap_take(c, batch, 3, true);
  cr_assert_eq(pvl_seq_append(c, &b, 1, NULL), PVL_ERR_OUT_OF_BLOCKS);
  TU_UNCHANGED(c, before, batch, 3, true);
  tu_snap_free(before);
  /* Data written before the appends is intact. */
  for (uint32_t l = 0; l < L; l++) {
    expect_tag_range(c, a, l, 4, 100 + 10 * l, "a");
    expect_tag_range(c, b, l, 8, 200 + 10 * l, "b");
    expect_tag_range(c, d, l, 5, 300 + 10 * l, "d");
  }
  TU_OK(c, pvl_seq_free(c, a));
  TU_OK(c, pvl_seq_append(c, &b, 1, NULL));
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, append_rejects_duplicates_and_unknown_ids_without_change) {
  pvl_cache *c = tu_cache(2, 1, 1, 2, 4, 32, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 4), b = tu_add(c, 3), gone = tu_add(c, 2);
  TU_OK(c, pvl_seq_free(c, gone));
  pvl_seq_id ids[2] = {a, b};
  tu_snap *before = tu_snap_take(c, ids, 2, false);
  pvl_seq_id dup[3] = {a, b, a};
  cr_assert_eq(pvl_seq_append(c, dup, 3, NULL), PVL_ERR_INVALID_ARGUMENT);
  TU_UNCHANGED(c, before, ids, 2, false);
  pvl_seq_id unk[3] = {a, b, gone};
  cr_assert_eq(pvl_seq_append(c, unk, 3, NULL), PVL_ERR_UNKNOWN_SEQUENCE);
  TU_UNCHANGED(c, before, ids, 2, false);
  tu_snap_free(before);
  /* n = 0 is a no-op. */
  TU_OK(c, pvl_seq_append(c, NULL, 0, NULL));
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- fork ---- */

Test(seq, fork_shares_every_block) {
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 32, PVL_DTYPE_F32);
  const pvl_span sp[] = {{1, 4}};
  pvl_seq_id p = 0, ch = 0;
  TU_OK(c, pvl_seq_add(c, 10, sp, 1, &p));
  TU_OK(c, pvl_seq_append(c, &p, 1, NULL));
  const uint32_t free_before = tu_free_blocks(c);
  TU_OK(c, pvl_seq_fork(c, p, &ch));
  cr_assert_neq(ch, p);
  cr_assert_eq(tu_free_blocks(c), free_before, "fork copied blocks");
  for (uint32_t l = 0; l < L; l++) {
    int32_t pi[8], ci[8];
    uint32_t np = tu_blocks(c, p, l, pi, 8), nc = tu_blocks(c, ch, l, ci, 8);
    cr_assert_eq(np, nc);
    for (uint32_t j = 0; j < np; j++) {
      cr_assert_eq(pi[j], ci[j]);
      cr_assert_eq(pvl__block_refcount(c, pi[j]), 2);
    }
  }
  pvl_seq_info pi, ci;
  TU_OK(c, pvl_seq_get_info(c, p, &pi));
  TU_OK(c, pvl_seq_get_info(c, ch, &ci));
  cr_assert_eq(ci.n_prompt, pi.n_prompt);
  cr_assert_eq(ci.position, pi.position);
  cr_assert_eq(ci.total_tokens, pi.total_tokens);
  cr_assert_eq(ci.n_visual_spans, 1);
  pvl_span got;
  uint32_t n = 0;
  TU_OK(c, pvl_seq_visual_spans(c, ch, &got, 1, &n));
  cr_assert_eq(n, 1);
  cr_assert_eq(got.begin, 1);
  cr_assert_eq(got.end, 4);
  pvl_stats st = tu_stats(c);
  cr_assert_eq(st.shared_blocks, st.used_blocks);
  cr_assert_eq(st.num_seqs, 2);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, fork_copy_on_write_keeps_writes_apart) {
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 32, PVL_DTYPE_F32);
  pvl_seq_id p = tu_add(c, 6); /* blocks: [full][2 of 4] */
  for (uint32_t l = 0; l < L; l++) tag_layer(c, p, l, 6, 100 + 100 * l);
  pvl_seq_id ch = 0;
  TU_OK(c, pvl_seq_fork(c, p, &ch));

  /* Shared blocks are read-only, on both sides. */
  float t = 5;
  cr_assert_eq(tu_write_tags(c, p, 0, 5, 1, &t), PVL_ERR_BAD_STATE);
  cr_assert_eq(tu_write_tags(c, ch, 0, 0, 1, &t), PVL_ERR_BAD_STATE);
  expect_tag_range(c, p, 0, 6, 100, "parent after refused write");

  int32_t pb[2][4], cb[2][4];
  for (uint32_t l = 0; l < L; l++) tu_blocks(c, p, l, pb[l], 4);
  uint64_t need = 0;
  TU_OK(c, pvl_blocks_for_append(c, &ch, 1, &need));
  cr_assert_eq(need, L, "one copy-on-write copy per layer");
  uint32_t free_before = tu_free_blocks(c);
  TU_OK(c, pvl_seq_append(c, &ch, 1, NULL));
  cr_assert_eq(free_before - tu_free_blocks(c), L);
  for (uint32_t l = 0; l < L; l++) {
    tu_blocks(c, ch, l, cb[l], 4);
    int32_t now[4];
    tu_blocks(c, p, l, now, 4);
    cr_assert_eq(now[0], pb[l][0]);
    cr_assert_eq(now[1], pb[l][1], "the parent keeps its block");
    cr_assert_eq(cb[l][0], pb[l][0], "the full block stays shared");
    cr_assert_neq(cb[l][1], pb[l][1], "the child copied the partial block");
    cr_assert_eq(pvl__block_refcount(c, pb[l][0]), 2);
    cr_assert_eq(pvl__block_refcount(c, pb[l][1]), 1);
    cr_assert_eq(pvl__block_refcount(c, cb[l][1]), 1);
    /* The copy holds the prompt's tokens. */
    expect_tag_range(c, ch, l, 6, 100 + 100 * l, "child after copy-on-write");
  }
  TU_CHECK(c);

  /* The child writes its new token; the parent cannot see it. */
  t = 900;
  TU_OK(c, tu_write_tags(c, ch, 0, 6, 1, &t));
  TU_OK(c, pvl_blocks_for_append(c, &p, 1, &need));
  cr_assert_eq(need, 0, "the parent's block is exclusive again");
  TU_OK(c, pvl_seq_append(c, &p, 1, NULL));
  t = 800;
  TU_OK(c, tu_write_tags(c, p, 0, 6, 1, &t));
  /* And a rewrite of the parent's exclusive slots stays on its side. */
  float t2[2] = {501, 502};
  TU_OK(c, tu_write_tags(c, p, 0, 4, 2, t2));
  float got[7];
  TU_OK(c, tu_read_tags(c, ch, 0, 0, 7, got));
  for (int i = 0; i < 6; i++) cr_assert_eq(got[i], 100 + i);
  cr_assert_eq(got[6], 900);
  TU_OK(c, tu_read_tags(c, p, 0, 0, 7, got));
  for (int i = 0; i < 4; i++) cr_assert_eq(got[i], 100 + i);
  cr_assert_eq(got[4], 501);
  cr_assert_eq(got[5], 502);
  cr_assert_eq(got[6], 800);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, fork_with_full_last_block_needs_no_copy) {
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 32, PVL_DTYPE_F32);
  pvl_seq_id p = tu_add(c, 8);
  pvl_seq_id ch = 0;
  TU_OK(c, pvl_seq_fork(c, p, &ch));
  pvl_seq_id both[2] = {p, ch};
  uint64_t need = 0;
  TU_OK(c, pvl_blocks_for_append(c, both, 2, &need));
  cr_assert_eq(need, 2 * L);
  uint32_t free_before = tu_free_blocks(c);
  TU_OK(c, pvl_seq_append(c, both, 2, NULL));
  cr_assert_eq(free_before - tu_free_blocks(c), 2 * L);
  for (uint32_t l = 0; l < L; l++) {
    int32_t a[4], b[4];
    tu_blocks(c, p, l, a, 4);
    tu_blocks(c, ch, l, b, 4);
    cr_assert_eq(a[0], b[0]);
    cr_assert_eq(a[1], b[1]);
    cr_assert_neq(a[2], b[2]);
    cr_assert_eq(pvl__block_refcount(c, a[1]), 2);
  }
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, parent_and_fork_in_one_batch_both_copy) {
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 32, PVL_DTYPE_F32);
  pvl_seq_id p = tu_add(c, 6);
  for (uint32_t l = 0; l < L; l++) tag_layer(c, p, l, 6, 10 + 100 * l);
  pvl_seq_id ch = 0;
  TU_OK(c, pvl_seq_fork(c, p, &ch));
  int32_t old[2][2];
  for (uint32_t l = 0; l < L; l++) tu_blocks(c, p, l, old[l], 2);
  pvl_seq_id both[2] = {ch, p};
  uint64_t need = 0;
  TU_OK(c, pvl_blocks_for_append(c, both, 2, &need));
  cr_assert_eq(need, 2 * L);
  const uint32_t free_before = tu_free_blocks(c);
  TU_OK(c, pvl_seq_append(c, both, 2, NULL));
  TU_CHECK(c);
  for (uint32_t l = 0; l < L; l++) {
    int32_t a[2], b[2];
    tu_blocks(c, p, l, a, 2);
    tu_blocks(c, ch, l, b, 2);
    cr_assert_neq(a[1], b[1]);
    cr_assert_eq(pvl__block_refcount(c, a[1]), 1);
    cr_assert_eq(pvl__block_refcount(c, b[1]), 1);
    /* Nothing references the old shared block any more: at most one of the
     * new blocks can be it (reused from the free list). */
    cr_assert(a[1] == old[l][1] || b[1] == old[l][1] ||
                  pvl__block_refcount(c, old[l][1]) == 0,
              "old block %d still referenced", old[l][1]);
    expect_tag_range(c, p, l, 6, 10 + 100 * l, "parent");
    expect_tag_range(c, ch, l, 6, 10 + 100 * l, "child");
  }
  /* Gross L * 2 copies, the old shared blocks returned: net L. */
  cr_assert_eq(free_before - tu_free_blocks(c), L);
  float t = 1;
  TU_OK(c, tu_write_tags(c, p, 1, 6, 1, &t));
  t = 2;
  TU_OK(c, tu_write_tags(c, ch, 1, 6, 1, &t));
  float got;
  TU_OK(c, tu_read_tags(c, p, 1, 6, 1, &got));
  cr_assert_eq(got, 1);
  TU_OK(c, tu_read_tags(c, ch, 1, 6, 1, &got));
  cr_assert_eq(got, 2);
  pvl_cache_destroy(c);
}

Test(seq, fork_of_a_fork_counts_three) {
  pvl_cache *c = tu_cache(1, 1, 1, 2, 4, 16, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 5), b = 0, d = 0;
  tag_layer(c, a, 0, 5, 40);
  TU_OK(c, pvl_seq_fork(c, a, &b));
  TU_OK(c, pvl_seq_fork(c, b, &d));
  int32_t ids[2];
  tu_blocks(c, a, 0, ids, 2);
  cr_assert_eq(pvl__block_refcount(c, ids[0]), 3);
  cr_assert_eq(pvl__block_refcount(c, ids[1]), 3);
  TU_OK(c, pvl_seq_append(c, &b, 1, NULL));
  cr_assert_eq(pvl__block_refcount(c, ids[1]), 2);
  TU_OK(c, pvl_seq_free(c, a));
  cr_assert_eq(pvl__block_refcount(c, ids[0]), 2);
  cr_assert_eq(pvl__block_refcount(c, ids[1]), 1);
  expect_tag_range(c, d, 0, 5, 40, "grandchild");
  expect_tag_range(c, b, 0, 5, 40, "child");
  TU_OK(c, pvl_seq_free(c, d));
  TU_OK(c, pvl_seq_free(c, b));
  cr_assert_eq(tu_free_blocks(c), 16);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- free ---- */

Test(seq, free_returns_blocks_and_tokens) {
  const uint32_t L = 2;
  pvl_cache *c = tu_cache(L, 1, 1, 2, 3, 40, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 7), b = tu_add(c, 2);
  TU_OK(c, pvl_seq_append(c, &a, 1, NULL));
  uint64_t lt[2];
  TU_OK(c, pvl_cache_layer_tokens(c, lt, L));
  cr_assert_eq(lt[0], 10);
  TU_OK(c, pvl_seq_free(c, a));
  TU_OK(c, pvl_cache_layer_tokens(c, lt, L));
  cr_assert_eq(lt[0], 2);
  cr_assert_eq(lt[1], 2);
  pvl_stats st = tu_stats(c);
  cr_assert_eq(st.free_blocks, 40 - L);
  cr_assert_eq(st.num_seqs, 1);
  cr_assert_eq(pvl_seq_free(c, a), PVL_ERR_UNKNOWN_SEQUENCE, "double free");
  TU_OK(c, pvl_seq_free(c, b));
  cr_assert_eq(tu_free_blocks(c), 40);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- retain ---- */

/* Retains `keep` in layer 0 of a fresh sequence of n tagged tokens and
 * checks data, order, positions, block counts and freed blocks. */
static void retain_case(uint32_t bs, uint32_t n, const uint32_t *keep,
                        uint32_t k, const char *ctx) {
  const uint32_t L = 2;
  pvl_cache *c = tu_cache(L, 1, 1, 3, bs, 512, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, n);
  tag_layer(c, s, 0, n, 1000);
  tag_layer(c, s, 1, n, 5000);
  const uint32_t free_before = tu_free_blocks(c);
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, k, NULL));
  TU_CHECK(c);
  cr_assert_eq(tu_layer_tokens(c, s, 0), k, "%s", ctx);
  cr_assert_eq(tu_layer_blocks(c, s, 0), tu_ceil_div(k, bs), "%s", ctx);
  cr_assert_eq(tu_free_blocks(c) - free_before,
               tu_ceil_div(n, bs) - tu_ceil_div(k, bs), "%s: blocks freed",
               ctx);
  float *want = malloc((k + 1) * sizeof(float));
  for (uint32_t i = 0; i < k; i++) want[i] = 1000 + (float)keep[i];
  expect_tags(c, s, 0, want, k, ctx);
  expect_positions(c, s, 0, keep, k, ctx);
  /* The other layer is untouched. */
  cr_assert_eq(tu_layer_tokens(c, s, 1), n);
  expect_tag_range(c, s, 1, n, 5000, ctx);
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.min_tokens, k);
  cr_assert_eq(info.max_tokens, n);
  cr_assert_eq(info.total_tokens, (uint64_t)n + k);
  cr_assert_eq(info.position, n, "retain does not move the next position");
  free(want);
  pvl_cache_destroy(c);
}

Test(seq, retain_compacts_in_order) {
  SEED(r, "seq.retain_compacts_in_order");
  const uint32_t bss[] = {1, 2, 4, 7, 16};
  for (int it = 0; it < 200; it++) {
    uint32_t bs = bss[tu_below(&r, 5)];
    uint32_t n = tu_range(&r, 1, 100);
    uint32_t k = tu_range(&r, 0, n);
    uint32_t keep[100];
    uint32_t shape = tu_below(&r, 4);
    if (shape == 0) { /* random */
      tu_subset(&r, n, k, keep);
    } else if (shape == 1) { /* identity prefix, then random */
      uint32_t p = tu_below(&r, k + 1);
      for (uint32_t i = 0; i < p; i++) keep[i] = i;
      if (k > p) {
        uint32_t rest[100];
        tu_subset(&r, n - p, k - p, rest);
        for (uint32_t i = 0; i < k - p; i++) keep[p + i] = p + rest[i];
      }
    } else if (shape == 2) { /* the most recent k */
      for (uint32_t i = 0; i < k; i++) keep[i] = n - k + i;
    } else { /* every other */
      k = (n + 1) / 2;
      for (uint32_t i = 0; i < k; i++) keep[i] = 2 * i;
    }
    char ctx[128];
    snprintf(ctx, sizeof(ctx), "seed %llu it %d: bs %u n %u k %u shape %u",
             (unsigned long long)r.seed, it, bs, n, k, shape);
    retain_case(bs, n, keep, k, ctx);
  }
}

Test(seq, retain_twice_composes_positions) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(1, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 30);
  tag_layer(c, s, 0, 30, 0);
  const uint32_t k1[] = {1, 2, 5, 8, 9, 13, 20, 21, 22, 29};
  TU_OK(c, pvl_seq_retain(c, s, 0, k1, 10, NULL));
  const uint32_t k2[] = {0, 3, 4, 9}; /* slots of the compacted layer */
  TU_OK(c, pvl_seq_retain(c, s, 0, k2, 4, NULL));
  const uint32_t pos[] = {1, 8, 9, 29};
  const float tags[] = {1, 8, 9, 29};
  expect_positions(c, s, 0, pos, 4, "twice");
  expect_tags(c, s, 0, tags, 4, "twice");
  cr_assert_eq(tu_free_blocks(c), 63);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, append_after_retain_continues_the_position) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(2, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 10);
  tag_layer(c, s, 0, 10, 0);
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL)); /* position 10 */
  float t = 10;
  TU_OK(c, tu_write_tags(c, s, 0, 10, 1, &t));
  const uint32_t keep[] = {0, 4, 7, 10};
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 4, NULL));
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL)); /* position 11, slot 4 */
  t = 11;
  TU_OK(c, tu_write_tags(c, s, 0, 4, 1, &t));
  const uint32_t pos[] = {0, 4, 7, 10, 11};
  const float tags[] = {0, 4, 7, 10, 11};
  expect_positions(c, s, 0, pos, 5, "layer 0");
  expect_tags(c, s, 0, tags, 5, "layer 0");
  cr_assert_eq(tu_layer_tokens(c, s, 1), 12);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* Keeping a prefix moves nothing, but the layer's slots are then no longer
 * "slot i = position i" once a decode token is appended. */
Test(seq, append_after_prefix_retain_continues_the_position) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(1, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 10);
  const uint32_t keep[] = {0, 1, 2, 3, 4};
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 5, NULL));
  const uint32_t pos5[] = {0, 1, 2, 3, 4};
  expect_positions(c, s, 0, pos5, 5, "after the prefix retain");
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.position, 11);
  const uint32_t pos6[] = {0, 1, 2, 3, 4, 10};
  expect_positions(c, s, 0, pos6, 6,
                   "the appended token (slot 5) is the decode token at "
                   "position 10");
  pvl_cache_destroy(c);
}

Test(seq, retain_zero_empties_the_layer) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(2, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 9);
  tag_layer(c, s, 1, 9, 70);
  TU_OK(c, pvl_seq_retain(c, s, 0, NULL, 0, NULL));
  cr_assert_eq(tu_layer_tokens(c, s, 0), 0);
  cr_assert_eq(tu_layer_blocks(c, s, 0), 0);
  cr_assert_eq(tu_free_blocks(c), 64 - 3);
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  cr_assert_eq(info.min_tokens, 0);
  cr_assert_eq(info.max_tokens, 9);
  uint32_t n = 7;
  TU_OK(c, pvl_seq_positions(c, s, 0, NULL, 0, &n));
  cr_assert_eq(n, 0);
  TU_OK(c, pvl_kv_read(c, s, 0, 0, 0, NULL, NULL, NULL));
  expect_tag_range(c, s, 1, 9, 70, "other layer");
  TU_CHECK(c);
  /* The next decode token lands in slot 0 of a fresh block. */
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  cr_assert_eq(tu_layer_tokens(c, s, 0), 1);
  cr_assert_eq(tu_layer_blocks(c, s, 0), 1);
  TU_CHECK(c);
  const uint32_t pos[] = {9};
  expect_positions(c, s, 0, pos, 1, "decode token after an emptied layer");
  pvl_cache_destroy(c);
}

Test(seq, retain_everything_is_an_identity) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(1, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 11);
  tag_layer(c, s, 0, 11, 3);
  int32_t before[3], after[3];
  tu_blocks(c, s, 0, before, 3);
  uint32_t keep[11];
  for (uint32_t i = 0; i < 11; i++) keep[i] = i;
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 11, NULL));
  tu_blocks(c, s, 0, after, 3);
  cr_assert_arr_eq(before, after, sizeof(before), "blocks moved");
  cr_assert_eq(tu_free_blocks(c), 61);
  expect_tag_range(c, s, 0, 11, 3, "identity");
  expect_positions(c, s, 0, keep, 11, "identity");
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, retain_on_a_block_shared_with_a_fork) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(2, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id p = tu_add(c, 10); /* 3 blocks per layer */
  tag_layer(c, p, 0, 10, 100);
  tag_layer(c, p, 1, 10, 200);
  pvl_seq_id ch = 0;
  TU_OK(c, pvl_seq_fork(c, p, &ch));
  int32_t shared[3];
  tu_blocks(c, p, 0, shared, 3);
  const uint32_t free_before = tu_free_blocks(c);
  /* Slots 0..4 stay (block 0 whole), 7 and 9 move behind slot 4. */
  const uint32_t keep[] = {0, 1, 2, 3, 4, 7, 9};
  TU_OK(c, pvl_seq_retain(c, p, 0, keep, 7, NULL));
  TU_CHECK(c);
  int32_t now[2];
  cr_assert_eq(tu_blocks(c, p, 0, now, 2), 2);
  cr_assert_eq(now[0], shared[0], "the unchanged first block stays shared");
  cr_assert_neq(now[1], shared[1], "a shared block is never written");
  cr_assert_neq(now[1], shared[2]);
  cr_assert_eq(pvl__block_refcount(c, shared[0]), 2);
  cr_assert_eq(pvl__block_refcount(c, shared[1]), 1);
  cr_assert_eq(pvl__block_refcount(c, shared[2]), 1);
  cr_assert_eq(pvl__block_refcount(c, now[1]), 1);
  cr_assert_eq(free_before - tu_free_blocks(c), 1, "one fresh block");
  const float want[] = {100, 101, 102, 103, 104, 107, 109};
  expect_tags(c, p, 0, want, 7, "parent");
  expect_tag_range(c, ch, 0, 10, 100, "the fork's data");
  expect_tag_range(c, ch, 1, 10, 200, "the fork's other layer");
  expect_tag_range(c, p, 1, 10, 200, "the parent's other layer");

  /* The fork compacts its own copy differently; the parent is unaffected. */
  const uint32_t keep2[] = {2, 3, 8};
  TU_OK(c, pvl_seq_retain(c, ch, 0, keep2, 3, NULL));
  const float want2[] = {102, 103, 108};
  expect_tags(c, ch, 0, want2, 3, "fork");
  expect_tags(c, p, 0, want, 7, "parent after the fork's retain");
  TU_CHECK(c);
  TU_OK(c, pvl_seq_free(c, p));
  TU_OK(c, pvl_seq_free(c, ch));
  cr_assert_eq(tu_free_blocks(c), 64);
  pvl_cache_destroy(c);
}

Test(seq, prefix_retain_of_a_shared_block_then_append_copies) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(1, 1, 1, 2, bs, 64, PVL_DTYPE_F32);
  pvl_seq_id p = tu_add(c, 8);
  tag_layer(c, p, 0, 8, 10);
  pvl_seq_id ch = 0;
  TU_OK(c, pvl_seq_fork(c, p, &ch));
  const uint32_t keep[] = {0, 1, 2, 3, 4, 5};
  TU_OK(c, pvl_seq_retain(c, p, 0, keep, 6, NULL));
  TU_CHECK(c);
  uint64_t need = 0;
  TU_OK(c, pvl_blocks_for_append(c, &p, 1, &need));
  cr_assert_eq(need, 1, "the partial last block is shared: copy-on-write");
  TU_OK(c, pvl_seq_append(c, &p, 1, NULL));
  float t = 99;
  TU_OK(c, tu_write_tags(c, p, 0, 6, 1, &t));
  expect_tag_range(c, ch, 0, 8, 10, "fork after the parent's write");
  const float want[] = {10, 11, 12, 13, 14, 15, 99};
  expect_tags(c, p, 0, want, 7, "parent");
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, retain_needs_fresh_blocks_or_fails_unchanged) {
  const uint32_t bs = 4;
  pvl_cache *c = tu_cache(1, 1, 1, 2, bs, 4, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 16); /* the whole pool */
  tag_layer(c, s, 0, 16, 0);
  cr_assert_eq(tu_free_blocks(c), 0);
  const uint32_t moved[] = {1, 5, 9};
  tu_snap *before = tu_snap_take(c, &s, 1, true);
  cr_assert_eq(pvl_seq_retain(c, s, 0, moved, 3, NULL), PVL_ERR_OUT_OF_BLOCKS);
  cr_assert(strstr(pvl_cache_last_error(c), "pvl_seq_retain"));
  TU_UNCHANGED(c, before, &s, 1, true);
  tu_snap_free(before);
  /* A prefix moves nothing and needs no free block. */
  const uint32_t prefix[] = {0, 1, 2, 3, 4, 5};
  TU_OK(c, pvl_seq_retain(c, s, 0, prefix, 6, NULL));
  cr_assert_eq(tu_free_blocks(c), 2);
  /* Now one fresh block is enough for three moved tokens. */
  const uint32_t m2[] = {1, 3, 5};
  TU_OK(c, pvl_seq_retain(c, s, 0, m2, 3, NULL));
  cr_assert_eq(tu_free_blocks(c), 3);
  const float want[] = {1, 3, 5};
  expect_tags(c, s, 0, want, 3, "after");
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, retain_rejects_bad_keep_lists) {
  pvl_cache *c = tu_cache(2, 1, 1, 2, 4, 32, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 6);
  tag_layer(c, s, 0, 6, 1);
  tu_snap *before = tu_snap_take(c, &s, 1, true);
  const uint32_t unsorted[] = {2, 1};
  const uint32_t dup[] = {1, 1};
  const uint32_t oob[] = {0, 6};
  const uint32_t seven[] = {0, 1, 2, 3, 4, 5, 6};
  cr_assert_eq(pvl_seq_retain(c, s, 0, unsorted, 2, NULL),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_retain(c, s, 0, dup, 2, NULL), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_retain(c, s, 0, oob, 2, NULL), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_retain(c, s, 0, seven, 7, NULL),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_retain(c, s, 0, NULL, 2, NULL),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_seq_retain(c, s, 2, oob, 1, NULL), PVL_ERR_INVALID_ARGUMENT);
  TU_UNCHANGED(c, before, &s, 1, true);
  tu_snap_free(before);
  pvl_cache_destroy(c);
}

/* ---- scheduler queries ---- */

Test(seq, can_add_ok_later_never) {
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 20, PVL_DTYPE_F32);
  pvl_admit a;
  TU_OK(c, pvl_can_add(c, 40, &a)); /* 20 blocks: the whole pool */
  cr_assert_eq(a, PVL_ADMIT_OK);
  TU_OK(c, pvl_can_add(c, 41, &a)); /* 22 */
  cr_assert_eq(a, PVL_ADMIT_NEVER);
  pvl_seq_id s = tu_add(c, 16); /* 8 blocks, 12 free */
  TU_OK(c, pvl_can_add(c, 24, &a));
  cr_assert_eq(a, PVL_ADMIT_OK);
  TU_OK(c, pvl_can_add(c, 25, &a));
  cr_assert_eq(a, PVL_ADMIT_LATER);
  TU_OK(c, pvl_can_add(c, 40, &a));
  cr_assert_eq(a, PVL_ADMIT_LATER);
  TU_OK(c, pvl_can_add(c, 41, &a));
  cr_assert_eq(a, PVL_ADMIT_NEVER);
  TU_OK(c, pvl_can_add(c, UINT32_MAX, &a));
  cr_assert_eq(a, PVL_ADMIT_NEVER);
  /* The answers hold. */
  pvl_seq_id x = 0;
  cr_assert_eq(pvl_seq_add(c, 25, NULL, 0, &x), PVL_ERR_OUT_OF_BLOCKS);
  TU_OK(c, pvl_seq_add(c, 24, NULL, 0, &x));
  TU_OK(c, pvl_can_add(c, 1, &a));
  cr_assert_eq(a, PVL_ADMIT_LATER);
  TU_OK(c, pvl_seq_free(c, s));
  TU_OK(c, pvl_can_add(c, 16, &a));
  cr_assert_eq(a, PVL_ADMIT_OK);
  cr_assert_eq(pvl_can_add(c, 0, &a), PVL_ERR_INVALID_ARGUMENT);
  pvl_cache_destroy(c);
}

Test(seq, can_add_is_not_ok_when_max_seqs_are_live) {
  pvl_config cfg = tu_config(1, 1, 1, 2, 4, 64, PVL_DTYPE_F32);
  cfg.max_seqs = 2;
  pvl_cache *c = tu_cache_new(&cfg);
  tu_add(c, 1);
  tu_add(c, 1);
  pvl_admit a = PVL_ADMIT_OK;
  TU_OK(c, pvl_can_add(c, 1, &a));
  cr_assert_neq(a, PVL_ADMIT_OK, "pvl_seq_add would fail with CAPACITY");
  pvl_seq_id x;
  cr_assert_eq(pvl_seq_add(c, 1, NULL, 0, &x), PVL_ERR_CAPACITY);
  pvl_cache_destroy(c);
}

Test(seq, blocks_for_prompt_is_layers_times_ceil) {
  for (uint32_t bs = 1; bs <= 9; bs += 4) {
    pvl_cache *c = tu_cache(3, 1, 1, 2, bs, 8, PVL_DTYPE_F32);
    for (uint32_t n = 1; n <= 50; n++) {
      uint64_t need = 0;
      TU_OK(c, pvl_blocks_for_prompt(c, n, &need));
      cr_assert_eq(need, 3ull * tu_ceil_div(n, bs), "bs %u n %u", bs, n);
    }
    uint64_t need = 0;
    TU_OK(c, pvl_blocks_for_prompt(c, UINT32_MAX, &need));
    cr_assert_eq(need, 3ull * (((uint64_t)UINT32_MAX + bs - 1) / bs),
                 "no 32-bit overflow");
    pvl_cache_destroy(c);
  }
}

Test(seq, blocks_for_append_matches_what_append_takes) {
  SEED(r, "seq.blocks_for_append_matches_what_append_takes");
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = tu_cache(L, 1, 1, 2, bs, 400, PVL_DTYPE_F32);
  pvl_seq_id s[6];
  for (int i = 0; i < 6; i++) s[i] = tu_add(c, tu_range(&r, 1, 12));
  /* Independent sequences with exclusive blocks, and one forked pair
   * appended on one side only, so gross equals net. */
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, s[0], &f));
  for (int step = 0; step < 40; step++) {
    pvl_seq_id batch[6];
    uint32_t n = 0;
    for (int i = 1; i < 6; i++)
      if (tu_below(&r, 2)) batch[n++] = s[i];
    if (step % 5 == 0) batch[n++] = f;
    uint64_t need = 0;
    TU_OK(c, pvl_blocks_for_append(c, batch, n, &need));
    uint64_t expect = 0;
    for (uint32_t i = 0; i < n; i++) {
      for (uint32_t l = 0; l < L; l++) {
        uint32_t nt = tu_layer_tokens(c, batch[i], l);
        int32_t ids[64];
        uint32_t nb = tu_blocks(c, batch[i], l, ids, 64);
        if (nt % bs == 0 || pvl__block_refcount(c, ids[nb - 1]) > 1) expect++;
      }
    }
    cr_assert_eq(need, expect, "seed %llu step %d", (unsigned long long)r.seed,
                 step);
    uint32_t before = tu_free_blocks(c);
    TU_OK(c, pvl_seq_append(c, batch, n, NULL));
    cr_assert_eq((uint64_t)(before - tu_free_blocks(c)), need,
                 "seed %llu step %d", (unsigned long long)r.seed, step);
    TU_CHECK(c);
  }
  pvl_cache_destroy(c);
}

/* ---- ids ---- */

Test(seq, stale_ids_are_detected_not_aliased) {
  pvl_config cfg = tu_config(2, 1, 1, 2, 4, 64, PVL_DTYPE_F32);
  cfg.max_seqs = 2; /* slots are reused quickly */
  pvl_cache *c = tu_cache_new(&cfg);
  pvl_seq_id gone = tu_add(c, 5);
  TU_OK(c, pvl_seq_free(c, gone));
  pvl_seq_id live[2];
  live[0] = tu_add(c, 6);
  live[1] = tu_add(c, 7);
  cr_assert_neq(live[0], gone);
  cr_assert_neq(live[1], gone);
  tu_snap *before = tu_snap_take(c, live, 2, false);
  const pvl_seq_id bad[] = {gone, 0, 0xdeadbeefcafeull, ~0ull,
                            live[0] ^ (1ull << 32)};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    pvl_seq_id x = bad[i], out = 0;
    uint32_t u = 0, keep = 0;
    pvl_seq_info info;
    float kv[16];
    int32_t ids[4];
    pvl_span sp;
    uint64_t need;
#define UNK(call)                                                              \
  cr_assert_eq((call), PVL_ERR_UNKNOWN_SEQUENCE, "%s with id %llx", #call,     \
               (unsigned long long)x)
    UNK(pvl_seq_free(c, x));
    UNK(pvl_seq_fork(c, x, &out));
    UNK(pvl_seq_append(c, &x, 1, NULL));
    UNK(pvl_seq_retain(c, x, 0, &keep, 1, NULL));
    UNK(pvl_kv_write(c, x, 0, 0, 1, kv, kv, NULL));
    UNK(pvl_kv_read(c, x, 0, 0, 1, kv, kv, NULL));
    UNK(pvl_seq_get_info(c, x, &info));
    UNK(pvl_seq_layer_size(c, x, 0, &u, &u));
    UNK(pvl_seq_blocks(c, x, 0, ids, 4, &u));
    UNK(pvl_seq_positions(c, x, 0, &u, 1, &u));
    UNK(pvl_seq_visual_spans(c, x, &sp, 1, &u));
    UNK(pvl_blocks_for_append(c, &x, 1, &need));
#undef UNK
    TU_UNCHANGED(c, before, live, 2, false);
  }
  tu_snap_free(before);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(seq, max_seqs_caps_live_sequences) {
  pvl_config cfg = tu_config(1, 1, 1, 2, 4, 64, PVL_DTYPE_F32);
  cfg.max_seqs = 3;
  pvl_cache *c = tu_cache_new(&cfg);
  pvl_seq_id s[3];
  for (int i = 0; i < 3; i++) s[i] = tu_add(c, 2);
  const uint32_t free_before = tu_free_blocks(c);
  tu_snap *before = tu_snap_take(c, s, 3, false);
  pvl_seq_id x = 0;
  cr_assert_eq(pvl_seq_add(c, 2, NULL, 0, &x), PVL_ERR_CAPACITY);
  cr_assert_eq(pvl_seq_fork(c, s[0], &x), PVL_ERR_CAPACITY);
  cr_assert_eq(tu_free_blocks(c), free_before);
  TU_UNCHANGED(c, before, s, 3, false);
  tu_snap_free(before);
  /* Many add/free cycles through the same slots: ids never repeat. */
  pvl_seq_id seen[300];
  uint32_t n_seen = 0;
  for (int i = 0; i < 300; i++) {
    int victim = i % 3;
    TU_OK(c, pvl_seq_free(c, s[victim]));
    s[victim] = tu_add(c, 1 + (uint32_t)(i % 5));
    for (uint32_t j = 0; j < n_seen; j++)
      cr_assert_neq(seen[j], s[victim], "id %llx issued twice",
                    (unsigned long long)s[victim]);
    seen[n_seen++] = s[victim];
    cr_assert_eq(tu_stats(c).num_seqs, 3);
  }
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- data ---- */

Test(seq, kv_write_read_round_trip_every_dtype) {
  SEED(r, "seq.kv_write_read_round_trip_every_dtype");
  const pvl_dtype dts[] = {PVL_DTYPE_F32, PVL_DTYPE_F16, PVL_DTYPE_BF16};
  for (int di = 0; di < 3; di++) {
    const pvl_dtype dt = dts[di];
    const uint32_t hkv = 3, d = 5, bs = 4, n = 23;
    const size_t row = hkv * d, es = pvl_dtype_size(dt);
    pvl_cache *c = tu_cache(2, 3, hkv, d, bs, 64, dt);
    pvl_seq_id spacer = tu_add(c, 3);
    pvl_seq_id s = tu_add(c, n);
    (void)spacer;
    char *k = malloc(n * row * es), *v = malloc(n * row * es);
    tu_fill(&r, dt, -2, 2, NULL, k, n * row);
    tu_fill(&r, dt, -2, 2, NULL, v, n * row);
    /* Written in uneven chunks that straddle blocks... */
    uint32_t at = 0;
    const uint32_t chunks[] = {1, 6, 3, 9, 4};
    for (int i = 0; i < 5; i++) {
      TU_OK(c, pvl_kv_write(c, s, 1, at, chunks[i], k + at * row * es,
                            v + at * row * es, NULL));
      at += chunks[i];
    }
    cr_assert_eq(at, n);
    /* ...and read back in other chunks. */
    char *k2 = malloc(n * row * es), *v2 = malloc(n * row * es);
    memset(k2, 0, n * row * es);
    memset(v2, 0, n * row * es);
    at = 0;
    const uint32_t reads[] = {5, 5, 2, 11};
    for (int i = 0; i < 4; i++) {
      TU_OK(c, pvl_kv_read(c, s, 1, at, reads[i], k2 + at * row * es,
                           v2 + at * row * es, NULL));
      at += reads[i];
    }
    cr_assert_arr_eq(k, k2, n * row * es, "dtype %d K", (int)dt);
    cr_assert_arr_eq(v, v2, n * row * es, "dtype %d V", (int)dt);
    /* The pool layout is [K|V][head][slot][dim]: check one element. */
    int32_t ids[8];
    tu_blocks(c, s, 1, ids, 8);
    const uint32_t t = 13, h = 2, e = 4;
    const char *blk =
        (const char *)c->storage + (size_t)ids[t / bs] * c->block_bytes;
    const size_t koff = ((size_t)(0 * hkv + h) * bs + t % bs) * d + e;
    const size_t voff = ((size_t)(1 * hkv + h) * bs + t % bs) * d + e;
    cr_assert_arr_eq(blk + koff * es, k + ((size_t)t * row + h * d + e) * es,
                     es);
    cr_assert_arr_eq(blk + voff * es, v + ((size_t)t * row + h * d + e) * es,
                     es);
    free(k);
    free(v);
    free(k2);
    free(v2);
    pvl_cache_destroy(c);
  }
}
