/* The block pool: allocation order, refcounts, double-free detection,
 * exhaustion through the cache (OUT_OF_BLOCKS) and the statistics. */
#include "testutil.h"

Test(pool, fresh_pool_hands_out_lowest_ids_first) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  pvl_pool p;
  cr_assert_eq(pvl__pool_init(&p, &ta.a, 8), PVL_SUCCESS);
  cr_assert_eq(p.num_blocks, 8);
  cr_assert_eq(p.num_free, 8);
  for (int32_t i = 0; i < 8; i++) {
    cr_assert_eq(p.refcount[i], 0);
    int32_t b = pvl__pool_alloc(&p);
    cr_assert_eq(b, i, "allocation %d returned block %d", i, b);
    cr_assert_eq(p.refcount[b], 1);
    cr_assert_eq(p.num_free, (uint32_t)(7 - i));
  }
  pvl__pool_fini(&p, &ta.a);
  TU_NO_LEAKS(&ta);
}

Test(pool, freed_block_is_reused_first) {
  pvl_pool p;
  const pvl_allocator *a = pvl__default_allocator();
  cr_assert_eq(pvl__pool_init(&p, a, 4), PVL_SUCCESS);
  int32_t b0 = pvl__pool_alloc(&p), b1 = pvl__pool_alloc(&p);
  (void)b0;
  cr_assert(pvl__pool_decref(&p, b1));
  cr_assert_eq(p.refcount[b1], 0);
  cr_assert_eq(p.num_free, 3);
  cr_assert_eq(pvl__pool_alloc(&p), b1,
               "LIFO free list: the block just "
               "freed comes back first");
  pvl__pool_fini(&p, a);
}

Test(pool, refcount_frees_at_zero_only) {
  pvl_pool p;
  const pvl_allocator *a = pvl__default_allocator();
  cr_assert_eq(pvl__pool_init(&p, a, 3), PVL_SUCCESS);
  int32_t b = pvl__pool_alloc(&p);
  pvl__pool_incref(&p, b);
  pvl__pool_incref(&p, b);
  cr_assert_eq(p.refcount[b], 3);
  cr_assert(pvl__pool_decref(&p, b));
  cr_assert(pvl__pool_decref(&p, b));
  cr_assert_eq(p.refcount[b], 1);
  cr_assert_eq(p.num_free, 2, "still referenced: not free");
  cr_assert(pvl__pool_decref(&p, b));
  cr_assert_eq(p.refcount[b], 0);
  cr_assert_eq(p.num_free, 3);
  pvl__pool_fini(&p, a);
}

Test(pool, double_free_and_bad_ids_are_refused) {
  pvl_pool p;
  const pvl_allocator *a = pvl__default_allocator();
  cr_assert_eq(pvl__pool_init(&p, a, 4), PVL_SUCCESS);
  int32_t b = pvl__pool_alloc(&p);
  cr_assert(pvl__pool_decref(&p, b));
  cr_assert_eq(p.num_free, 4);
  cr_assert_not(pvl__pool_decref(&p, b), "double free accepted");
  cr_assert_eq(p.num_free, 4, "double free changed the free list");
  cr_assert_not(pvl__pool_decref(&p, -1));
  cr_assert_not(pvl__pool_decref(&p, 4));
  cr_assert_not(pvl__pool_decref(&p, INT32_MAX));
  cr_assert_eq(p.num_free, 4);
  /* The free list is still a set: four allocations give four ids. */
  bool seen[4] = {false, false, false, false};
  for (int i = 0; i < 4; i++) {
    int32_t x = pvl__pool_alloc(&p);
    cr_assert(x >= 0 && x < 4);
    cr_assert_not(seen[x], "block %d handed out twice", x);
    seen[x] = true;
  }
  cr_assert_eq(p.num_free, 0);
  pvl__pool_fini(&p, a);
}

/* Random alloc/incref/decref against a model of refcounts. */
Test(pool, random_ops_match_model) {
  tu_rng r;
  tu_rng_init(&r, tu_seed("pool.random_ops_match_model"));
  enum { N = 37 };
  pvl_pool p;
  const pvl_allocator *a = pvl__default_allocator();
  cr_assert_eq(pvl__pool_init(&p, a, N), PVL_SUCCESS);
  uint32_t model[N] = {0};
  uint32_t model_free = N;
  for (int step = 0; step < 20000; step++) {
    uint32_t op = tu_below(&r, 3);
    if (op == 0 && model_free > 0) {
      int32_t b = pvl__pool_alloc(&p);
      cr_assert(b >= 0 && b < N, "seed %llu step %d: block %d",
                (unsigned long long)r.seed, step, b);
      cr_assert_eq(model[b], 0, "seed %llu step %d: block %d was in use",
                   (unsigned long long)r.seed, step, b);
      model[b] = 1;
      model_free--;
    } else {
      int32_t b = (int32_t)tu_below(&r, N);
      if (op == 1 && model[b] > 0) {
        pvl__pool_incref(&p, b);
        model[b]++;
      } else {
        bool ok = pvl__pool_decref(&p, b);
        cr_assert_eq(ok, model[b] > 0, "seed %llu step %d: decref(%d)",
                     (unsigned long long)r.seed, step, b);
        if (model[b] > 0 && --model[b] == 0) model_free++;
      }
    }
    cr_assert_eq(p.num_free, model_free, "seed %llu step %d",
                 (unsigned long long)r.seed, step);
    for (int b = 0; b < N; b++)
      cr_assert_eq(p.refcount[b], model[b], "seed %llu step %d block %d",
                   (unsigned long long)r.seed, step, b);
  }
  pvl__pool_fini(&p, a);
}

/* ---- through the cache ---- */

Test(pool, stats_of_a_fresh_cache) {
  const pvl_dtype dts[3] = {PVL_DTYPE_F32, PVL_DTYPE_F16, PVL_DTYPE_BF16};
  const size_t es[3] = {4, 2, 2};
  for (int i = 0; i < 3; i++) {
    pvl_cache *c = tu_cache(3, 4, 2, 8, 5, 21, dts[i]);
    pvl_stats s = tu_stats(c);
    cr_assert_eq(s.num_blocks, 21);
    cr_assert_eq(s.free_blocks, 21);
    cr_assert_eq(s.used_blocks, 0);
    cr_assert_eq(s.shared_blocks, 0);
    cr_assert_eq(s.num_seqs, 0);
    cr_assert_eq(s.tokens, 0);
    cr_assert_eq(s.block_bytes, 2u * 2 * 5 * 8 * es[i]);
    cr_assert_eq(s.pool_bytes, 21u * s.block_bytes);
    TU_CHECK(c);
    pvl_cache_destroy(c);
  }
}

Test(pool, exhaustion_returns_out_of_blocks) {
  /* 2 layers, block_size 4, 10 blocks. */
  pvl_cache *c = tu_cache(2, 1, 1, 4, 4, 10, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 12); /* 3 blocks x 2 layers */
  pvl_stats s = tu_stats(c);
  cr_assert_eq(s.used_blocks, 6);
  cr_assert_eq(s.free_blocks, 4);
  cr_assert_eq(s.tokens, 24);
  cr_assert_eq(s.num_seqs, 1);

  /* 9 tokens need 3 blocks per layer = 6 > 4 free. */
  tu_snap *before = tu_snap_take(c, &a, 1, true);
  pvl_seq_id b = 777;
  cr_assert_eq(pvl_seq_add(c, 9, NULL, 0, &b), PVL_ERR_OUT_OF_BLOCKS);
  cr_assert_eq(b, 777, "out-pointer written on failure");
  cr_assert(strlen(pvl_cache_last_error(c)) > 0);
  TU_UNCHANGED(c, before, &a, 1, true);
  tu_snap_free(before);
  TU_CHECK(c);

  /* Exactly the free blocks: 8 tokens = 2 blocks x 2 layers. */
  pvl_seq_id d = tu_add(c, 8);
  s = tu_stats(c);
  cr_assert_eq(s.free_blocks, 0);
  cr_assert_eq(s.used_blocks, 10);
  cr_assert_eq(pvl_seq_add(c, 1, NULL, 0, &b), PVL_ERR_OUT_OF_BLOCKS);
  /* A full pool refuses an append that needs a block... */
  cr_assert_eq(pvl_seq_append(c, &d, 1, NULL), PVL_ERR_OUT_OF_BLOCKS);
  TU_CHECK(c);

  TU_OK(c, pvl_seq_free(c, a));
  s = tu_stats(c);
  cr_assert_eq(s.free_blocks, 6);
  cr_assert_eq(s.num_seqs, 1);
  cr_assert_eq(s.tokens, 16);
  TU_OK(c, pvl_seq_free(c, d));
  s = tu_stats(c);
  cr_assert_eq(s.free_blocks, 10);
  cr_assert_eq(s.used_blocks, 0);
  cr_assert_eq(s.tokens, 0);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(pool, single_block_pool) {
  pvl_cache *c = tu_cache(1, 1, 1, 2, 3, 1, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 2);
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL)); /* fills the block */
  cr_assert_eq(tu_free_blocks(c), 0);
  cr_assert_eq(pvl_seq_append(c, &s, 1, NULL), PVL_ERR_OUT_OF_BLOCKS);
  cr_assert_eq(tu_layer_tokens(c, s, 0), 3);
  TU_CHECK(c);
  TU_OK(c, pvl_seq_free(c, s));
  cr_assert_eq(tu_free_blocks(c), 1);
  pvl_cache_destroy(c);
}

Test(pool, fork_counts_shared_blocks) {
  pvl_cache *c = tu_cache(2, 1, 1, 2, 4, 16, PVL_DTYPE_F32);
  pvl_seq_id a = tu_add(c, 6); /* 2 blocks per layer */
  pvl_seq_id b = 0;
  TU_OK(c, pvl_seq_fork(c, a, &b));
  pvl_stats s = tu_stats(c);
  cr_assert_eq(s.used_blocks, 4, "a fork takes no block");
  cr_assert_eq(s.shared_blocks, 4);
  cr_assert_eq(s.tokens, 24);
  cr_assert_eq(s.num_seqs, 2);
  int32_t ids[4];
  for (uint32_t l = 0; l < 2; l++) {
    uint32_t n = tu_blocks(c, a, l, ids, 4);
    for (uint32_t j = 0; j < n; j++)
      cr_assert_eq(pvl__block_refcount(c, ids[j]), 2);
  }
  TU_CHECK(c);
  TU_OK(c, pvl_seq_free(c, a));
  s = tu_stats(c);
  cr_assert_eq(s.used_blocks, 4, "the fork still holds them");
  cr_assert_eq(s.shared_blocks, 0);
  for (uint32_t l = 0; l < 2; l++) {
    uint32_t n = tu_blocks(c, b, l, ids, 4);
    for (uint32_t j = 0; j < n; j++)
      cr_assert_eq(pvl__block_refcount(c, ids[j]), 1);
  }
  TU_OK(c, pvl_seq_free(c, b));
  cr_assert_eq(tu_free_blocks(c), 16);
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(pool, blocks_are_not_shared_across_sequences) {
  pvl_cache *c = tu_cache(3, 1, 1, 2, 2, 64, PVL_DTYPE_F32);
  bool seen[64] = {false};
  pvl_seq_id s[4];
  for (int i = 0; i < 4; i++) s[i] = tu_add(c, (uint32_t)(3 + 2 * i));
  for (int i = 0; i < 4; i++)
    for (uint32_t l = 0; l < 3; l++) {
      int32_t ids[16];
      uint32_t n = tu_blocks(c, s[i], l, ids, 16);
      for (uint32_t j = 0; j < n; j++) {
        cr_assert(ids[j] >= 0 && ids[j] < 64);
        cr_assert_not(seen[ids[j]], "block %d in two tables", ids[j]);
        seen[ids[j]] = true;
        cr_assert_eq(pvl__block_refcount(c, ids[j]), 1);
      }
    }
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

Test(pool, cache_memory_goes_through_the_allocator) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  pvl_config cfg = tu_config(2, 2, 1, 8, 4, 32, PVL_DTYPE_F16);
  cfg.allocator = &ta.a;
  pvl_cache *c = tu_cache_new(&cfg);
  /* The pool storage (32 blocks of 128 bytes) is among the live bytes. */
  cr_assert_geq(ta.live_bytes, 32u * 2 * 1 * 4 * 8 * 2);
  pvl_seq_id s = tu_add(c, 9);
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  pvl_cache_destroy(c);
  TU_NO_LEAKS(&ta);
}
