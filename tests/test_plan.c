/* Batch plans: the CSR rows in the plan buffer against the page tables,
 * the exact size of incremental updates, batch changes, retain and
 * copy-on-write, capacity failures, stale and never-built plans, writes
 * after a retain dropped the newest slot, and the id array's allocator
 * (growth in place, moves into freed regions, the repack path). */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

enum { HQ = 4, HKV = 2, D = 8 };

static pvl_cache *plan_cache(uint32_t L, uint32_t bs, uint32_t num_blocks) {
  return tu_cache(L, HQ, HKV, D, bs, num_blocks, PVL_DTYPE_F32);
}

/* Random K/V in every slot of every layer of s. */
static void fill_seq(pvl_cache *c, tu_rng *r, pvl_seq_id s) {
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  for (uint32_t l = 0; l < cfg.num_layers; l++) {
    uint32_t n = tu_layer_tokens(c, s, l);
    if (!n) continue;
    float *k = malloc((size_t)n * HKV * D * sizeof(float));
    float *v = malloc((size_t)n * HKV * D * sizeof(float));
    tu_fill(r, PVL_DTYPE_F32, -1, 1, k, NULL, (size_t)n * HKV * D);
    tu_fill(r, PVL_DTYPE_F32, -1, 1, v, NULL, (size_t)n * HKV * D);
    TU_OK(c, pvl_kv_write(c, s, l, 0, n, k, v, NULL));
    free(k);
    free(v);
  }
}

/* Writes the newest token of every row of every layer through the plan. */
static void write_newest(pvl_cache *c, tu_rng *r, pvl_plan *p, uint32_t n) {
  pvl_config cfg;
  TU_OK(c, pvl_cache_config(c, &cfg));
  float k[16 * HKV * D], v[16 * HKV * D];
  cr_assert_leq(n, 16);
  for (uint32_t l = 0; l < cfg.num_layers; l++) {
    tu_fill(r, PVL_DTYPE_F32, -1, 1, k, NULL, (size_t)n * HKV * D);
    tu_fill(r, PVL_DTYPE_F32, -1, 1, v, NULL, (size_t)n * HKV * D);
    TU_OK(c, pvl_plan_kv_write(p, l, k, v, NULL));
  }
}

/* Decode attention of `layer` through the plan against a dense reference
 * of the tokens read back from the tables. */
static void check_attention(pvl_cache *c, tu_rng *r, pvl_plan *p,
                            const pvl_seq_id *seqs, uint32_t n,
                            uint32_t layer) {
  if (n == 0) return;
  float *q = malloc((size_t)n * HQ * D * sizeof(float));
  float *out = malloc((size_t)n * HQ * D * sizeof(float));
  tu_fill(r, PVL_DTYPE_F32, -1, 1, q, NULL, (size_t)n * HQ * D);
  tu_poison(PVL_DTYPE_F32, out, (size_t)n * HQ * D);
  TU_OK(c, pvl_attention_decode(p, layer, q, out, 0.0f, NULL));
  for (uint32_t b = 0; b < n; b++) {
    uint32_t nt = tu_layer_tokens(c, seqs[b], layer);
    float *k = malloc(((size_t)nt + 1) * HKV * D * sizeof(float));
    float *v = malloc(((size_t)nt + 1) * HKV * D * sizeof(float));
    TU_OK(c, pvl_kv_read(c, seqs[b], layer, 0, nt, k, v, NULL));
    double ref[HQ * D];
    tu_ref_attention(q + (size_t)b * HQ * D, k, v, nt, HQ, HKV, D,
                     1.0 / sqrt((double)D), ref);
    for (uint32_t i = 0; i < HQ * D; i++) {
      double o = out[(size_t)b * HQ * D + i];
      cr_assert(fabs(o - ref[i]) <= 1e-5 + 1e-5 * fabs(ref[i]),
                "seed %llu layer %u row %u elem %u: %g vs reference %g",
                (unsigned long long)r->seed, layer, b, i, o, ref[i]);
    }
    free(k);
    free(v);
  }
  free(q);
  free(out);
}

static pvl_plan_info plan_info(const pvl_plan *p) {
  pvl_plan_info info;
  cr_assert_eq(pvl_plan_get_info(p, &info), PVL_SUCCESS);
  return info;
}

static uint64_t sum_blocks_plus_2(const pvl_cache *c, const pvl_seq_id *seqs,
                                  uint32_t n, uint32_t L) {
  uint64_t e = 0;
  for (uint32_t b = 0; b < n; b++)
    for (uint32_t l = 0; l < L; l++) e += tu_layer_blocks(c, seqs[b], l) + 2;
  return e;
}

static uint32_t n_decoded(const pvl_cache *c, pvl_seq_id s) {
  pvl_seq_info info;
  TU_OK(c, pvl_seq_get_info(c, s, &info));
  return info.n_decoded;
}

Test(plan, build_rows_match_fragmented_tables) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.build_rows_match_fragmented_tables"));
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 256);
  pvl_seq_id a = tu_add(c, 5), b = tu_add(c, 9), x = tu_add(c, 1);
  pvl_seq_id spacer = tu_add(c, 7);
  pvl_seq_id three[3] = {a, b, x};
  for (int i = 0; i < 7; i++) TU_OK(c, pvl_seq_append(c, three, 3, NULL));
  TU_OK(c, pvl_seq_free(c, spacer));
  pvl_seq_id d = tu_add(c, 13);
  TU_OK(c, pvl_seq_free(c, b));
  const uint32_t keep[] = {0, 3, 4, 8, 11};
  TU_OK(c, pvl_seq_retain(c, a, 1, keep, 5, NULL));
  TU_OK(c, pvl_seq_retain(c, x, 2, NULL, 0, NULL));
  fill_seq(c, &r, a);
  fill_seq(c, &r, x);
  fill_seq(c, &r, d);
  pvl_seq_id e = 0;
  TU_OK(c, pvl_seq_fork(c, d, &e));
  TU_OK(c, pvl_seq_append(c, &e, 1, NULL)); /* copy-on-write */
  for (uint32_t l = 0; l < L; l++) {        /* e's own newest slot */
    float k[HKV * D], v[HKV * D];
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, k, NULL, HKV * D);
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, v, NULL, HKV * D);
    TU_OK(c, pvl_kv_write(c, e, l, 13, 1, k, v, NULL));
  }
  pvl_seq_id batch[4] = {a, x, d, e};

  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 8, 0, &p));
  TU_OK(c, pvl_plan_build(p, batch, 4, NULL));
  tu_check_plan_rows(c, p, batch, 4);
  /* A first build sends every row whole, and the decode counters that are
   * not zero. */
  uint64_t expect = sum_blocks_plus_2(c, batch, 4, L);
  for (int i = 0; i < 4; i++) expect += n_decoded(c, batch[i]) != 0;
  pvl_plan_info info = plan_info(p);
  cr_assert_eq(info.n_seqs, 4);
  cr_assert_eq(info.max_seqs, 8);
  cr_assert_eq(info.last_update_entries, expect);
  cr_assert_eq(info.last_update_bytes, expect * 2 * sizeof(int32_t));
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, batch, 4, l);
  /* The test is only meaningful if the tables really are scattered. */
  int32_t ids[16];
  uint32_t nb = tu_blocks(c, a, 0, ids, 16);
  cr_assert(tu_fragmented(ids, nb), "sequence a is contiguous");
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

Test(plan, incremental_update_sends_one_counter_per_sequence) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.incremental_update"));
  const uint32_t L = 4, bs = 16;
  pvl_cache *c = plan_cache(L, bs, 512);
  pvl_seq_id s[3] = {tu_add(c, 3), tu_add(c, 20), tu_add(c, 37)};
  for (int i = 0; i < 3; i++) fill_seq(c, &r, s[i]);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 4, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));

  /* One step with no boundary crossed: exactly one entry per sequence. */
  TU_OK(c, pvl_seq_append(c, s, 3, NULL));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  pvl_plan_info info = plan_info(p);
  cr_assert_eq(info.last_update_entries, 3);
  cr_assert_eq(info.last_update_bytes, 3 * 2 * sizeof(int32_t));
  tu_check_plan_rows(c, p, s, 3);
  write_newest(c, &r, p, 3);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, s, 3, l);

  /* Many steps: a sequence that crosses a boundary adds one id per layer. */
  for (int step = 0; step < 40; step++) {
    uint64_t expect = 3;
    for (int i = 0; i < 3; i++)
      if (tu_layer_tokens(c, s[i], 0) % bs == 0) expect += L;
    TU_OK(c, pvl_seq_append(c, s, 3, NULL));
    TU_OK(c, pvl_plan_build(p, s, 3, NULL));
    info = plan_info(p);
    cr_assert_eq(info.last_update_entries, expect, "step %d", step);
    tu_check_plan_rows(c, p, s, 3);
    write_newest(c, &r, p, 3);
    check_attention(c, &r, p, s, 3, (uint32_t)step % L);
  }

  /* A build with nothing changed sends nothing. */
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, 0);

  /* Only part of the batch appended. */
  TU_OK(c, pvl_seq_append(c, &s[1], 1, NULL));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries,
               1 + ((tu_layer_tokens(c, s[1], 0) - 1) % bs == 0 ? L : 0));
  tu_check_plan_rows(c, p, s, 3);

  /* Two appends between builds: the counter moves once. */
  uint64_t expect = 3;
  for (int i = 0; i < 3; i++) {
    uint32_t n0 = tu_layer_tokens(c, s[i], 0);
    expect += (tu_ceil_div(n0 + 2, bs) - tu_ceil_div(n0, bs)) * L;
  }
  TU_OK(c, pvl_seq_append(c, s, 3, NULL));
  TU_OK(c, pvl_seq_append(c, s, 3, NULL));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, expect);
  tu_check_plan_rows(c, p, s, 3);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

Test(plan, boundary_crossing_sends_the_new_ids) {
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s[2] = {tu_add(c, 4), tu_add(c, 6)};
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  TU_OK(c, pvl_seq_append(c, s, 2, NULL));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  /* s[0] crossed in both layers: 2 ids + 2 counters. */
  cr_assert_eq(plan_info(p).last_update_entries, 2 + L);
  tu_check_plan_rows(c, p, s, 2);
  pvl_cache_destroy(c); /* destroys the plan too */
}

Test(plan, batch_changes_resend_exactly_the_changed_rows) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.batch_changes"));
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 256);
  pvl_seq_id a = tu_add(c, 5), b = tu_add(c, 11), x = tu_add(c, 2),
             d = tu_add(c, 17);
  /* Different decode counters, so moving rows changes the counters. */
  for (int i = 0; i < 3; i++) TU_OK(c, pvl_seq_append(c, &a, 1, NULL));
  TU_OK(c, pvl_seq_append(c, &b, 1, NULL));
  pvl_seq_id all[4] = {a, b, x, d};
  for (int i = 0; i < 4; i++) fill_seq(c, &r, all[i]);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 4, 0, &p));

  pvl_seq_id abx[3] = {a, b, x};
  TU_OK(c, pvl_plan_build(p, abx, 3, NULL));
  tu_check_plan_rows(c, p, abx, 3);

  /* A prefix of the same batch: rows unchanged, nothing sent. */
  TU_OK(c, pvl_plan_build(p, abx, 2, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, 0);
  tu_check_plan_rows(c, p, abx, 2);
  check_attention(c, &r, p, abx, 2, 1);
  /* Back to three: row 2 still holds x. */
  TU_OK(c, pvl_plan_build(p, abx, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, 0);

  /* Reordered: every row is rewritten whole; counters change where the
   * row's previous sequence had another decode count. */
  pvl_seq_id xab[3] = {x, a, b};
  uint64_t expect = sum_blocks_plus_2(c, xab, 3, L);
  for (int i = 0; i < 3; i++)
    expect += n_decoded(c, xab[i]) != n_decoded(c, abx[i]);
  TU_OK(c, pvl_plan_build(p, xab, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, expect);
  tu_check_plan_rows(c, p, xab, 3);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, xab, 3, l);

  /* Another sequence in row 2. */
  pvl_seq_id xad[3] = {x, a, d};
  expect =
      sum_blocks_plus_2(c, &d, 1, L) + (n_decoded(c, d) != n_decoded(c, b));
  TU_OK(c, pvl_plan_build(p, xad, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, expect);
  tu_check_plan_rows(c, p, xad, 3);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, xad, 3, l);

  /* A larger batch after a smaller one. */
  pvl_seq_id four[4] = {x, a, d, b};
  TU_OK(c, pvl_plan_build(p, four, 4, NULL));
  tu_check_plan_rows(c, p, four, 4);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, four, 4, l);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

Test(plan, retain_and_copy_on_write_rewrite_only_their_rows) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.retain_and_cow"));
  const uint32_t L = 3, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 256);
  pvl_seq_id s[3] = {tu_add(c, 14), tu_add(c, 9), tu_add(c, 22)};
  for (int i = 0; i < 3; i++) fill_seq(c, &r, s[i]);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 3, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));

  const uint32_t keep[] = {1, 2, 6, 7, 13};
  TU_OK(c, pvl_seq_retain(c, s[0], 1, keep, 5, NULL));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, tu_ceil_div(5, bs) + 2,
               "only the retained (row, layer) is rewritten");
  tu_check_plan_rows(c, p, s, 3);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, s, 3, l);

  TU_OK(c, pvl_seq_retain(c, s[2], 0, NULL, 0, NULL));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, 2);
  tu_check_plan_rows(c, p, s, 3);
  check_attention(c, &r, p, s, 3, 0);

  /* A fork outside the batch, then an append of s[1] (9 tokens: partial
   * last block, now shared): copy-on-write changes s[1]'s tables. */
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, s[1], &f));
  uint64_t expect = 3;           /* counters */
  for (int i = 0; i < 3; i += 2) /* new ids of s[0] and s[2] */
    for (uint32_t l = 0; l < L; l++)
      expect += tu_layer_tokens(c, s[i], l) % bs == 0;
  TU_OK(c, pvl_seq_append(c, s, 3, NULL));
  expect += sum_blocks_plus_2(c, &s[1], 1, L);
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  cr_assert_eq(plan_info(p).last_update_entries, expect);
  tu_check_plan_rows(c, p, s, 3);
  write_newest(c, &r, p, 3);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, s, 3, l);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

Test(plan, stale_plan_is_refused) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.stale_plan_is_refused"));
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s[2] = {tu_add(c, 5), tu_add(c, 3)};
  for (int i = 0; i < 2; i++) fill_seq(c, &r, s[i]);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  float q[2 * HQ * D] = {0}, out[2 * HQ * D], kv[2 * HKV * D] = {0};
  TU_OK(c, pvl_attention_decode(p, 0, q, out, 0.0f, NULL));

  /* Appended without a rebuild. */
  TU_OK(c, pvl_seq_append(c, s, 2, NULL));
  tu_poison(PVL_DTYPE_F32, out, 2 * HQ * D);
  for (uint32_t l = 0; l < L; l++) {
    cr_assert_eq(pvl_attention_decode(p, l, q, out, 0.0f, NULL),
                 PVL_ERR_BAD_STATE);
    cr_assert(strstr(pvl_cache_last_error(c), "pvl_attention_decode"));
    cr_assert_eq(pvl_plan_kv_write(p, l, kv, kv, NULL), PVL_ERR_BAD_STATE);
  }
  for (int i = 0; i < 2 * HQ * D; i++) cr_assert(isnan(out[i]), "out written");
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  write_newest(c, &r, p, 2);
  TU_OK(c, pvl_attention_decode(p, 1, q, out, 0.0f, NULL));

  /* Retained without a rebuild. */
  const uint32_t keep[] = {0, 2};
  TU_OK(c, pvl_seq_retain(c, s[0], 1, keep, 2, NULL));
  cr_assert_eq(pvl_attention_decode(p, 1, q, out, 0.0f, NULL),
               PVL_ERR_BAD_STATE);
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  check_attention(c, &r, p, s, 2, 1);

  /* A batch member forked: its last block is now shared, so writing the
   * newest token through the plan would write into the fork. */
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, s[1], &f));
  tu_snap *before = tu_snap_take(c, &f, 1, true);
  float newkv[2 * HKV * D];
  for (int i = 0; i < 2 * HKV * D; i++) newkv[i] = 42.0f;
  cr_assert_eq(pvl_plan_kv_write(p, 0, newkv, newkv, NULL), PVL_ERR_BAD_STATE);
  TU_UNCHANGED(c, before, &f, 1, true);
  tu_snap_free(before);

  /* A batch member freed. */
  TU_OK(c, pvl_seq_free(c, s[1]));
  cr_assert_eq(pvl_attention_decode(p, 0, q, out, 0.0f, NULL),
               PVL_ERR_BAD_STATE);
  cr_assert_eq(pvl_plan_build(p, s, 2, NULL), PVL_ERR_UNKNOWN_SEQUENCE);
  TU_OK(c, pvl_plan_build(p, s, 1, NULL));
  check_attention(c, &r, p, s, 1, 0);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

/* Retain then append can restore a layer's token and block counts while its
 * blocks moved: the plan must still know it is stale. */
Test(plan, stale_after_retain_and_append_of_the_same_length) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.stale_same_length"));
  const uint32_t L = 1, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s = tu_add(c, 7);
  fill_seq(c, &r, s);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 1, 0, &p));
  TU_OK(c, pvl_plan_build(p, &s, 1, NULL));
  int32_t before[2], after[2];
  tu_blocks(c, s, 0, before, 2);
  const uint32_t keep[] = {1, 2, 3, 4, 5, 6}; /* everything moves */
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 6, NULL));
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  cr_assert_eq(tu_layer_tokens(c, s, 0), 7);
  cr_assert_eq(tu_blocks(c, s, 0, after, 2), 2);
  cr_assert(before[0] != after[0] || before[1] != after[1]);
  float q[HQ * D], out[HQ * D];
  memset(q, 0, sizeof(q));
  cr_assert_eq(pvl_attention_decode(p, 0, q, out, 0.0f, NULL),
               PVL_ERR_BAD_STATE, "the plan still points at freed blocks");
  TU_OK(c, pvl_plan_build(p, &s, 1, NULL));
  tu_check_plan_rows(c, p, &s, 1);
  write_newest(c, &r, p, 1);
  check_attention(c, &r, p, &s, 1, 0);
  pvl_cache_destroy(c);
}

Test(plan, capacity_failure_leaves_the_plan_usable) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.capacity_failure"));
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s[4];
  for (int i = 0; i < 4; i++) {
    s[i] = tu_add(c, 12); /* 3 blocks per layer */
    fill_seq(c, &r, s[i]);
  }
  pvl_plan *p = NULL;
  /* 20 ids for both layers together: 3 sequences x 2 layers x 3 blocks =
   * 18 fit (without slack), 4 sequences (24) do not. */
  TU_OK(c, pvl_plan_create(c, 4, 20, &p));
  cr_assert_eq(plan_info(p).block_capacity, 20);
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  tu_check_plan_rows(c, p, s, 3);
  float q[4 * HQ * D], out1[4 * HQ * D], out2[4 * HQ * D];
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, q, NULL, 4 * HQ * D);
  TU_OK(c, pvl_attention_decode(p, 1, q, out1, 0.0f, NULL));
  pvl_plan_info before = plan_info(p);
  const size_t buf_elems = (size_t)pvl_plan_buf_elems(
      p->view.num_layers, p->view.max_seqs, p->view.block_cap);
  int32_t *buf_before = malloc(buf_elems * sizeof(int32_t));
  memcpy(buf_before, p->view.buf, buf_elems * sizeof(int32_t));

  cr_assert_eq(pvl_plan_build(p, s, 4, NULL), PVL_ERR_CAPACITY);
  cr_assert(strstr(pvl_cache_last_error(c), "pvl_plan_build"));
  pvl_plan_info after = plan_info(p);
  cr_assert_arr_eq(&before, &after, sizeof(before), "plan info changed");
  cr_assert_arr_eq(buf_before, p->view.buf, buf_elems * sizeof(int32_t),
                   "plan buffer changed");
  /* The previous batch still runs, with the same result. */
  TU_OK(c, pvl_attention_decode(p, 1, q, out2, 0.0f, NULL));
  cr_assert_arr_eq(out1, out2, 3 * HQ * D * sizeof(float));
  check_attention(c, &r, p, s, 3, 0);
  /* And other batches that fit still build. */
  pvl_seq_id other[3] = {s[3], s[1], s[2]};
  TU_OK(c, pvl_plan_build(p, other, 3, NULL));
  tu_check_plan_rows(c, p, other, 3);
  check_attention(c, &r, p, other, 3, 0);
  /* One sequence larger than a layer's capacity never fits. */
  pvl_seq_id big = tu_add(c, 44); /* 11 blocks */
  cr_assert_eq(pvl_plan_build(p, &big, 1, NULL), PVL_ERR_CAPACITY);
  TU_OK(c, pvl_plan_build(p, other, 2, NULL));
  tu_check_plan_rows(c, p, other, 2);
  free(buf_before);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

Test(plan, batch_larger_than_max_seqs_is_capacity) {
  pvl_cache *c = plan_cache(1, 4, 64);
  pvl_seq_id s[3] = {tu_add(c, 1), tu_add(c, 2), tu_add(c, 3)};
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  cr_assert_eq(pvl_plan_build(p, s, 3, NULL), PVL_ERR_CAPACITY);
  cr_assert_eq(plan_info(p).n_seqs, 0);
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  tu_check_plan_rows(c, p, s, 2);
  pvl_cache_destroy(c);
}

Test(plan, empty_batch) {
  pvl_cache *c = plan_cache(2, 4, 64);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, NULL, 0, NULL));
  cr_assert_eq(plan_info(p).n_seqs, 0);
  TU_OK(c, pvl_attention_decode(p, 0, NULL, NULL, 0.0f, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 1, NULL, NULL, NULL));
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

/* Reads all slots of one layer (f32) into a fresh buffer of n tokens. */
static float *read_layer(const pvl_cache *c, pvl_seq_id s, uint32_t l,
                         float **v, uint32_t *n) {
  *n = tu_layer_tokens(c, s, l);
  float *k = malloc(((size_t)*n + 1) * HKV * D * sizeof(float));
  *v = malloc(((size_t)*n + 1) * HKV * D * sizeof(float));
  TU_OK(c, pvl_kv_read(c, s, l, 0, *n, k, *v, NULL));
  return k;
}

Test(plan, plan_kv_write_fills_the_newest_slot_only) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.plan_kv_write"));
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s[3] = {tu_add(c, 3), tu_add(c, 4), tu_add(c, 9)};
  for (int i = 0; i < 3; i++) fill_seq(c, &r, s[i]);
  TU_OK(c, pvl_seq_append(c, s, 3, NULL));
  /* Layers differ; the newest slot (9) stays, so it is still the one the
   * plan writes. */
  const uint32_t keep[] = {1, 2, 3, 9};
  TU_OK(c, pvl_seq_retain(c, s[2], 1, keep, 4, NULL));
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 3, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 3, NULL));
  float *k0[3][2], *v0[3][2];
  uint32_t n0[3][2];
  for (int b = 0; b < 3; b++)
    for (uint32_t l = 0; l < L; l++)
      k0[b][l] = read_layer(c, s[b], l, &v0[b][l], &n0[b][l]);
  float k[3 * HKV * D], v[3 * HKV * D];
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, k, NULL, 3 * HKV * D);
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, v, NULL, 3 * HKV * D);
  TU_OK(c, pvl_plan_kv_write(p, 1, k, v, NULL));
  const size_t row = HKV * D;
  for (int b = 0; b < 3; b++) {
    for (uint32_t l = 0; l < L; l++) {
      uint32_t n;
      float *v1, *k1 = read_layer(c, s[b], l, &v1, &n);
      cr_assert_eq(n, n0[b][l]);
      const uint32_t same = l == 1 ? n - 1 : n;
      cr_assert_arr_eq(k1, k0[b][l], same * row * sizeof(float),
                       "row %d layer %u: an older slot changed", b, l);
      cr_assert_arr_eq(v1, v0[b][l], same * row * sizeof(float));
      if (l == 1) {
        cr_assert_arr_eq(k1 + (n - 1) * row, k + b * row, row * sizeof(float),
                         "row %d: newest K", b);
        cr_assert_arr_eq(v1 + (n - 1) * row, v + b * row, row * sizeof(float),
                         "row %d: newest V", b);
      }
      free(k1);
      free(v1);
      free(k0[b][l]);
      free(v0[b][l]);
    }
  }
  check_attention(c, &r, p, s, 3, 1);
  TU_OK(c, pvl_plan_destroy(p));
  pvl_cache_destroy(c);
}

/* The plan's allocator must be consistent (regions tile the array, rows
 * own disjoint regions of their cap): pvl__plan_check. */
static void check_plan_alloc(const pvl_plan *p) {
  char msg[256] = "";
  pvl_status st = pvl__plan_check(p, msg, sizeof(msg));
  cr_assert_eq(st, PVL_SUCCESS, "%s", msg);
}

/* Offset of every row (b, l) of the plan buffer, for b < n. */
static void row_offsets(const pvl_plan *p, uint32_t n, uint32_t L,
                        int32_t *out) {
  for (uint32_t b = 0; b < n; b++)
    for (uint32_t l = 0; l < L; l++)
      out[b * L + l] =
          p->view
              .buf[pvl_plan_row_offset_index(&p->view, (int32_t)l, (int32_t)b)];
}

/* Random batches on a plan with little room: rows grow, move into freed
 * regions and the layout is repacked when nothing fits; after every build
 * the buffer must equal the tables, the allocator must be consistent, and
 * attention must read the tables. */
Test(plan, random_batches_under_pressure_stay_correct, .timeout = 120) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.repack_under_pressure"));
  const uint32_t L = 2, bs = 2, NS = 6;
  pvl_cache *c = plan_cache(L, bs, 1024);
  pvl_seq_id pool[NS];
  for (uint32_t i = 0; i < NS; i++) {
    pool[i] = tu_add(c, tu_range(&r, 1, 9));
    fill_seq(c, &r, pool[i]);
  }
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 4, 240, &p)); /* both layers together */
  uint64_t moving_builds = 0, repacking_builds = 0;
  pvl_seq_id prev_batch[4] = {0};
  uint32_t prev_n = 0;
  int32_t off_before[4 * 2], off_after[4 * 2];
  for (int step = 0; step < 400; step++) {
    /* A random batch of 1..4 distinct sequences. */
    pvl_seq_id order[NS];
    memcpy(order, pool, sizeof(order));
    tu_shuffle_u64(&r, order, NS);
    uint32_t n = tu_range(&r, 1, 4);
    if (step % 7 != 0) { /* mostly the same batch, to grow rows in place */
      memcpy(order, pool, sizeof(order));
    }
    uint32_t op = tu_below(&r, 10);
    if (op < 7) {
      TU_OK(c, pvl_seq_append(c, order, n, NULL));
    } else if (op < 9) {
      pvl_seq_id s = order[tu_below(&r, n)];
      uint32_t l = tu_below(&r, L);
      uint32_t nt = tu_layer_tokens(c, s, l);
      uint32_t k = nt ? tu_range(&r, nt / 2, nt) : 0;
      uint32_t *keep = malloc((k + 1) * sizeof(uint32_t));
      tu_subset(&r, nt, k, keep);
      TU_OK(c, pvl_seq_retain(c, s, l, keep, k, NULL));
      free(keep);
    } else {
      /* Replace a sequence by a fresh one. */
      uint32_t i = tu_below(&r, NS);
      TU_OK(c, pvl_seq_free(c, pool[i]));
      pool[i] = tu_add(c, tu_range(&r, 1, 30));
      fill_seq(c, &r, pool[i]);
      continue;
    }
    row_offsets(p, prev_n, L, off_before);
    pvl_plan_info before = plan_info(p);
    pvl_status st = pvl_plan_build(p, order, n, NULL);
    if (st == PVL_ERR_CAPACITY) {
      /* The batch outgrew the plan: shrink its longest layer. */
      for (uint32_t b = 0; b < n; b++)
        for (uint32_t l = 0; l < L; l++)
          if (tu_layer_tokens(c, order[b], l) > 40) {
            uint32_t keep[20];
            for (uint32_t j = 0; j < 20; j++) keep[j] = 2 * j + 1;
            TU_OK(c, pvl_seq_retain(c, order[b], l, keep, 20, NULL));
          }
      st = pvl_plan_build(p, order, n, NULL);
    }
    cr_assert_eq(st, PVL_SUCCESS, "seed %llu step %d: %s",
                 (unsigned long long)r.seed, step, pvl_cache_last_error(c));
    pvl_plan_info after = plan_info(p);
    const bool repacked = after.full_rebuilds > before.full_rebuilds;
    repacking_builds += repacked;
    /* A row of the same sequence at a new offset moved (or was repacked). */
    row_offsets(p, n, L, off_after);
    bool moved = false;
    for (uint32_t b = 0; b < n && b < prev_n; b++)
      for (uint32_t l = 0; l < L; l++)
        moved |= order[b] == prev_batch[b] &&
                 off_after[b * L + l] != off_before[b * L + l];
    moving_builds += moved && !repacked;
    memcpy(prev_batch, order, n * sizeof(pvl_seq_id));
    prev_n = n;
    tu_check_plan_rows(c, p, order, n);
    check_plan_alloc(p);
    if (op < 7) write_newest(c, &r, p, n);
    check_attention(c, &r, p, order, n, (uint32_t)step % L);
  }
  cr_assert_gt(moving_builds, 0, "no row ever moved to another region");
  cr_log_info("builds that moved rows: %llu, repacking builds: %llu",
              (unsigned long long)moving_builds,
              (unsigned long long)repacking_builds);
  TU_OK(c, pvl_plan_destroy(p));
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* Appends n tokens to every sequence of ids[0..m). */
static void append_n(pvl_cache *c, pvl_seq_id *ids, uint32_t m, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) TU_OK(c, pvl_seq_append(c, ids, m, NULL));
}

/* One layer, one token per block (a row of nb blocks asks for nb + 2 +
 * nb/8 ids), 4 sequences of 4 tokens, a plan of 35 ids:
 *   first build: a [0, 6), b [6, 12), c [12, 18), d [18, 24), free
 *   [24, 35); a first build is not a repack.
 *   d grows to 7 blocks: it takes the free space right after it, in place
 *   (d [18, 27)), so only its 3 new ids and its counter are sent.
 *   b grows to 7 with c right after it: it moves into [27, 34) (7 ids: the
 *   9 it asks for fit nowhere) and sends its whole row; [6, 12) is free.
 * Then the caller's own steps. */
static pvl_plan *allocator_scenario(pvl_cache *c, tu_rng *r, pvl_seq_id *s) {
  for (int i = 0; i < 4; i++) {
    s[i] = tu_add(c, 4);
    fill_seq(c, r, s[i]);
  }
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 4, 35, &p));
  TU_OK(c, pvl_plan_build(p, s, 4, NULL));
  cr_assert_eq(plan_info(p).full_rebuilds, 0);
  check_plan_alloc(p);
  int32_t off[4];
  row_offsets(p, 4, 1, off);
  cr_assert(off[0] == 0 && off[1] == 6 && off[2] == 12 && off[3] == 18);

  append_n(c, &s[3], 1, 3);
  TU_OK(c, pvl_plan_build(p, s, 4, NULL));
  pvl_plan_info info = plan_info(p);
  cr_assert_eq(info.last_update_entries, 3 + 1);
  row_offsets(p, 4, 1, off);
  cr_assert_eq(off[3], 18, "d moved although it could grow in place");
  tu_check_plan_rows(c, p, s, 4);
  check_plan_alloc(p);
  write_newest(c, r, p, 4);
  check_attention(c, r, p, s, 4, 0);

  append_n(c, &s[1], 1, 3);
  TU_OK(c, pvl_plan_build(p, s, 4, NULL));
  info = plan_info(p);
  cr_assert_eq(info.last_update_entries, 7 + 2 + 1); /* ids, offset, base */
  cr_assert_eq(info.full_rebuilds, 0);
  row_offsets(p, 4, 1, off);
  cr_assert_eq(off[1], 27);
  tu_check_plan_rows(c, p, s, 4);
  check_plan_alloc(p);
  write_newest(c, r, p, 4);
  check_attention(c, r, p, s, 4, 0);
  return p;
}

Test(plan, a_freed_region_is_reused) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.a_freed_region_is_reused"));
  pvl_cache *c = plan_cache(1, 1, 128);
  pvl_seq_id s[4];
  pvl_plan *p = allocator_scenario(c, &r, s);
  /* a outgrows [0, 6) into b's old region, in place: 3 ids + counter. */
  append_n(c, &s[0], 1, 3);
  TU_OK(c, pvl_plan_build(p, s, 4, NULL));
  pvl_plan_info info = plan_info(p);
  cr_assert_eq(info.last_update_entries, 3 + 1);
  cr_assert_eq(info.full_rebuilds, 0);
  int32_t off[4];
  row_offsets(p, 4, 1, off);
  cr_assert_eq(off[0], 0);
  tu_check_plan_rows(c, p, s, 4);
  check_plan_alloc(p);
  write_newest(c, &r, p, 4);
  check_attention(c, &r, p, s, 4, 0);
  TU_CHECK(c); /* includes the plan's allocator */
  pvl_cache_destroy(c);
}

Test(plan, repack_only_when_fragmentation_leaves_no_region) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.repack_only_when_fragmented"));
  pvl_cache *c = plan_cache(1, 1, 128);
  pvl_seq_id s[4];
  pvl_plan *p = allocator_scenario(c, &r, s);
  /* Free: [6, 12) and [34, 35), 7 ids in all. c grows to 7 blocks: no
   * region holds 7, so the batch is laid out again (with slack: 6 + 9 +
   * 9 + 9 <= 35), every row sent whole, and the repack counted. */
  append_n(c, &s[2], 1, 3);
  TU_OK(c, pvl_plan_build(p, s, 4, NULL));
  pvl_plan_info info = plan_info(p);
  cr_assert_eq(info.full_rebuilds, 1);
  cr_assert_eq(info.last_update_entries,
               (4 + 2) + (7 + 2) + (7 + 2) + (7 + 2) + 1);
  int32_t off[4];
  row_offsets(p, 4, 1, off);
  cr_assert(off[0] == 0 && off[1] == 6 && off[2] == 15 && off[3] == 24);
  tu_check_plan_rows(c, p, s, 4);
  check_plan_alloc(p);
  write_newest(c, &r, p, 4);
  check_attention(c, &r, p, s, 4, 0);
  /* Growing on to 33 of the 35 ids (tight): every build stays correct,
   * repacking as often as this tiny plan needs. */
  for (int step = 0; step < 2; step++) {
    append_n(c, s, 4, 1);
    TU_OK(c, pvl_plan_build(p, s, 4, NULL));
    tu_check_plan_rows(c, p, s, 4);
    check_plan_alloc(p);
    write_newest(c, &r, p, 4);
    check_attention(c, &r, p, s, 4, 0);
  }
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* The newest slot of a layer dropped by a retain (issue: position 7
 * received the token meant for position 8): the plan must refuse to write
 * the layer, change nothing, and name the row and the positions; other
 * layers are written; an append gives the new token its own slot. */
Test(plan, kv_write_refuses_a_layer_whose_newest_slot_was_dropped) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.kv_write_dropped_newest"));
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s[2] = {tu_add(c, 8), tu_add(c, 5)};
  for (int i = 0; i < 2; i++) fill_seq(c, &r, s[i]);
  TU_OK(c, pvl_seq_append(c, s, 2, NULL)); /* s[0]: slot 8 = position 8 */
  const uint32_t keep[] = {0, 1, 2, 3, 4, 5, 6, 7};
  TU_OK(c, pvl_seq_retain(c, s[0], 1, keep, 8, NULL)); /* drops slot 8 */
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));

  float k[2 * HKV * D], v[2 * HKV * D];
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, k, NULL, 2 * HKV * D);
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, v, NULL, 2 * HKV * D);
  tu_snap *before = tu_snap_take(c, s, 2, true);
  cr_assert_eq(pvl_plan_kv_write(p, 1, k, v, NULL), PVL_ERR_BAD_STATE);
  const char *msg = pvl_cache_last_error(c);
  cr_assert(strstr(msg, "pvl_plan_kv_write") && strstr(msg, "row 0") &&
                strstr(msg, "layer 1") && strstr(msg, "position 7") &&
                strstr(msg, "newest position 8"),
            "message: %s", msg);
  TU_UNCHANGED(c, before, s, 2, true); /* neither row was written */
  tu_snap_free(before);
  /* Layer 0 still ends with position 8: written there. */
  TU_OK(c, pvl_plan_kv_write(p, 0, k, v, NULL));
  uint32_t n;
  float *v0, *k0 = read_layer(c, s[0], 0, &v0, &n);
  cr_assert_eq(n, 9);
  cr_assert_arr_eq(k0 + 8 * HKV * D, k, HKV * D * sizeof(float));
  free(k0);
  free(v0);
  /* Attention reads the retained layer as it is. */
  check_attention(c, &r, p, s, 2, 1);

  /* A fork inherits the dropped slot: refused through a plan too. */
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, s[0], &f));
  pvl_plan *pf = NULL;
  TU_OK(c, pvl_plan_create(c, 1, 0, &pf));
  TU_OK(c, pvl_plan_build(pf, &f, 1, NULL));
  cr_assert_eq(pvl_plan_kv_write(pf, 1, k, v, NULL), PVL_ERR_BAD_STATE);
  TU_OK(c, pvl_seq_free(c, f));

  /* The next step appends: its slot is position 9, and the write lands
   * there, after the kept positions 0..7. */
  float *k1, *v1;
  uint32_t n1;
  k1 = read_layer(c, s[0], 1, &v1, &n1);
  TU_OK(c, pvl_seq_append(c, s, 2, NULL));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 1, k, v, NULL));
  uint32_t pos[16];
  TU_OK(c, pvl_seq_positions(c, s[0], 1, pos, 16, &n));
  cr_assert_eq(n, 9);
  for (uint32_t i = 0; i < 8; i++) cr_assert_eq(pos[i], i);
  cr_assert_eq(pos[8], 9);
  float *v2, *k2 = read_layer(c, s[0], 1, &v2, &n);
  cr_assert_arr_eq(k2, k1, 8 * HKV * D * sizeof(float), "older slots");
  cr_assert_arr_eq(v2, v1, 8 * HKV * D * sizeof(float), "older slots");
  cr_assert_arr_eq(k2 + 8 * HKV * D, k, HKV * D * sizeof(float));
  cr_assert_arr_eq(v2 + 8 * HKV * D, v, HKV * D * sizeof(float));
  free(k1);
  free(v1);
  free(k2);
  free(v2);
  check_attention(c, &r, p, s, 2, 1);

  /* An emptied layer has no slot at all. */
  TU_OK(c, pvl_seq_retain(c, s[1], 0, NULL, 0, NULL));
  TU_OK(c, pvl_plan_build(p, s, 2, NULL));
  cr_assert_eq(pvl_plan_kv_write(p, 0, k, v, NULL), PVL_ERR_BAD_STATE);
  cr_assert(strstr(pvl_cache_last_error(c), "no slot"));
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* pvl_decode_cap drops the newest slot (streaming with sinks covering the
 * whole budget keeps the oldest tokens): refused as above. The serving
 * flow, cap then append then write, lands the new token at the newest
 * position. */
Test(plan, decode_cap_then_append_writes_the_newest_position) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("plan.decode_cap_then_append"));
  const uint32_t L = 2, bs = 4;
  pvl_cache *c = plan_cache(L, bs, 64);
  pvl_seq_id s = tu_add(c, 10);
  fill_seq(c, &r, s);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 1, 0, &p));
  float k[HKV * D], v[HKV * D];
  for (int i = 0; i < 3; i++) { /* positions 10, 11, 12 */
    TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
    TU_OK(c, pvl_plan_build(p, &s, 1, NULL));
    write_newest(c, &r, p, 1);
  }
  pvl_policy pol;
  TU_OK(c, pvl_policy_init(&pol, PVL_POLICY_STREAMING));
  pol.decode_cap = 12;
  pol.decode_cap_slack = 4; /* down to 8 tokens */
  pol.sink_tokens = 8;      /* all of them sinks: positions 0..7 */
  uint32_t did = 0;
  TU_OK(c, pvl_decode_cap(c, s, 1, &pol, &did, NULL));
  cr_assert_eq(did, 1);
  uint32_t pos[16], n;
  TU_OK(c, pvl_seq_positions(c, s, 1, pos, 16, &n));
  cr_assert_eq(n, 8);
  cr_assert_eq(pos[7], 7, "the cap kept the newest position");

  TU_OK(c, pvl_plan_build(p, &s, 1, NULL));
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, k, NULL, HKV * D);
  tu_fill(&r, PVL_DTYPE_F32, 2, 3, v, NULL, HKV * D);
  tu_snap *before = tu_snap_take(c, &s, 1, true);
  cr_assert_eq(pvl_plan_kv_write(p, 1, k, v, NULL), PVL_ERR_BAD_STATE);
  TU_UNCHANGED(c, before, &s, 1, true);
  tu_snap_free(before);

  uint32_t n0;
  float *v0, *k0 = read_layer(c, s, 1, &v0, &n0);
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL)); /* position 13 */
  TU_OK(c, pvl_plan_build(p, &s, 1, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 1, k, v, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 0, k, v, NULL));
  TU_OK(c, pvl_seq_positions(c, s, 1, pos, 16, &n));
  cr_assert_eq(n, 9);
  cr_assert_eq(pos[8], 13);
  uint32_t n1;
  float *v1, *k1 = read_layer(c, s, 1, &v1, &n1);
  cr_assert_arr_eq(k1, k0, 8 * HKV * D * sizeof(float), "older slots");
  cr_assert_arr_eq(v1, v0, 8 * HKV * D * sizeof(float), "older slots");
  cr_assert_arr_eq(k1 + 8 * HKV * D, k, HKV * D * sizeof(float));
  cr_assert_arr_eq(v1 + 8 * HKV * D, v, HKV * D * sizeof(float));
  free(k0);
  free(v0);
  free(k1);
  free(v1);
  for (uint32_t l = 0; l < L; l++) check_attention(c, &r, p, &s, 1, l);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* A plan that was never built has no rows the caller chose: attention and
 * writes refuse (BAD_STATE) and write nothing, also after a first build
 * that failed. An empty batch that was built is fine. */
Test(plan, never_built_plan_is_refused) {
  pvl_cache *c = plan_cache(2, 4, 64);
  pvl_seq_id s = tu_add(c, 5);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 1, 2, &p)); /* 2 ids: s (2 blocks x 2
                                             layers) does not fit */
  float q[HQ * D] = {0}, out[HQ * D], kv[HKV * D] = {0};
  for (int attempt = 0; attempt < 2; attempt++) {
    tu_poison(PVL_DTYPE_F32, out, HQ * D);
    cr_assert_eq(pvl_attention_decode(p, 0, q, out, 0.0f, NULL),
                 PVL_ERR_BAD_STATE);
    cr_assert(strstr(pvl_cache_last_error(c), "never built"), "%s",
              pvl_cache_last_error(c));
    cr_assert_eq(pvl_plan_kv_write(p, 1, kv, kv, NULL), PVL_ERR_BAD_STATE);
    cr_assert(strstr(pvl_cache_last_error(c), "pvl_plan_kv_write"));
    for (int i = 0; i < HQ * D; i++) cr_assert(isnan(out[i]), "out written");
    /* NULL buffers are not the reason. */
    cr_assert_eq(pvl_attention_decode(p, 0, NULL, NULL, 0.0f, NULL),
                 PVL_ERR_BAD_STATE);
    if (attempt == 0)
      cr_assert_eq(pvl_plan_build(p, &s, 1, NULL), PVL_ERR_CAPACITY);
  }
  TU_OK(c, pvl_plan_build(p, NULL, 0, NULL));
  TU_OK(c, pvl_attention_decode(p, 0, NULL, NULL, 0.0f, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 1, NULL, NULL, NULL));
  pvl_cache_destroy(c);
}

Test(plan, default_capacity_holds_a_full_pool) {
  const uint32_t L = 2, bs = 4, NB = 64;
  pvl_cache *c = plan_cache(L, bs, NB);
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 8, 0, &p));
  cr_assert_eq(plan_info(p).block_capacity, NB * 5 / 4 + 4 * L * 8);
  /* Eight sequences that together take every block. */
  pvl_seq_id s[8];
  for (int i = 0; i < 8; i++) s[i] = tu_add(c, 16); /* 4 blocks x 2 layers */
  cr_assert_eq(tu_free_blocks(c), 0);
  TU_OK(c, pvl_plan_build(p, s, 8, NULL));
  tu_check_plan_rows(c, p, s, 8);
  /* Rotate the batch many times: relocations must never run out. */
  for (int step = 0; step < 50; step++) {
    pvl_seq_id t = s[0];
    memmove(s, s + 1, 7 * sizeof(pvl_seq_id));
    s[7] = t;
    TU_OK(c, pvl_plan_build(p, s, 8, NULL));
    tu_check_plan_rows(c, p, s, 8);
  }
  pvl_cache_destroy(c);
}

Test(plan, plans_are_independent_and_freed_with_the_cache) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  pvl_config cfg = tu_config(2, HQ, HKV, D, 4, 64, PVL_DTYPE_F32);
  cfg.allocator = &ta.a;
  pvl_cache *c = tu_cache_new(&cfg);
  pvl_seq_id s[3] = {tu_add(c, 5), tu_add(c, 6), tu_add(c, 7)};
  pvl_plan *p1 = NULL, *p2 = NULL, *p3 = NULL;
  TU_OK(c, pvl_plan_create(c, 3, 0, &p1));
  TU_OK(c, pvl_plan_create(c, 2, 0, &p2));
  TU_OK(c, pvl_plan_create(c, 1, 0, &p3));
  TU_OK(c, pvl_plan_build(p1, s, 3, NULL));
  pvl_seq_id two[2] = {s[2], s[0]};
  TU_OK(c, pvl_plan_build(p2, two, 2, NULL));
  tu_check_plan_rows(c, p1, s, 3);
  tu_check_plan_rows(c, p2, two, 2);
  TU_OK(c, pvl_plan_destroy(p2));
  tu_check_plan_rows(c, p1, s, 3);
  /* p1 and p3 are still alive: the cache frees them. */
  (void)p3;
  pvl_cache_destroy(c);
  TU_NO_LEAKS(&ta);
}
