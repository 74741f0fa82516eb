/* Parts of the header's contract that are easy to get subtly wrong: calls
 * on an emptied layer with NULL buffers of capacity 0 (memcpy(NULL, p, 0)
 * is undefined behaviour; the sanitizer build aborts on it), where each
 * failure's message is recorded (the cache's or the thread's last error),
 * which query rows pvl_observe accepts, and the limits of the config
 * fields. */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

enum { L = 2, HQ = 4, HKV = 2, D = 8, BS = 4, NB = 32 };

/* ---- an emptied layer, queried with NULL buffers of capacity 0 ---- */

Test(contract, emptied_layer_with_null_buffers) {
  pvl_cache *c = tu_cache(L, HQ, HKV, D, BS, NB, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 6);
  TU_OK(c, pvl_seq_retain(c, s, 1, NULL, 0, NULL));
  uint32_t n = 77;
  TU_OK(c, pvl_seq_blocks(c, s, 1, NULL, 0, &n));
  cr_assert_eq(n, 0);
  n = 77;
  TU_OK(c, pvl_seq_positions(c, s, 1, NULL, 0, &n));
  cr_assert_eq(n, 0);
  TU_OK(c, pvl_kv_read(c, s, 1, 0, 0, NULL, NULL, NULL));
  TU_OK(c, pvl_kv_write(c, s, 1, 0, 0, NULL, NULL, NULL));
  TU_OK(c, pvl_seq_retain(c, s, 1, NULL, 0, NULL)); /* empty again */
  n = 77;
  TU_OK(c, pvl_seq_visual_spans(c, s, NULL, 0, &n));
  cr_assert_eq(n, 0);
  /* A fork copies the empty table; both grow again on append. */
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, s, &f));
  TU_OK(c, pvl_seq_blocks(c, f, 1, NULL, 0, &n));
  cr_assert_eq(n, 0);
  TU_IS(PVL_ERR_BAD_STATE, pvl_observe(c, s, 1, NULL, 0, 0, 0.5f, 0.0f, NULL));
  TU_OK(c, pvl_blocks_for_append(c, NULL, 0, &(uint64_t){0}));
  TU_OK(c, pvl_seq_append(c, NULL, 0, NULL));
  pvl_seq_id both[2] = {s, f};
  TU_OK(c, pvl_seq_append(c, both, 2, NULL));
  TU_IS(PVL_ERR_CAPACITY, pvl_seq_blocks(c, s, 1, NULL, 0, &n));
  cr_assert_eq(tu_layer_tokens(c, s, 1), 1);
  /* An empty batch plan and an empty build. */
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 2, 0, &p));
  TU_OK(c, pvl_plan_build(p, NULL, 0, NULL));
  TU_OK(c, pvl_attention_decode(p, 0, NULL, NULL, 0.0f, NULL));
  TU_OK(c, pvl_plan_kv_write(p, 0, NULL, NULL, NULL));
  TU_CHECK(c);
  pvl_cache_destroy(c);
}

/* ---- where failures are recorded ---- */

/* Puts a known message into the thread's last error. */
static void mark_thread_error(void) {
  cr_assert_eq(pvl_config_init(NULL), PVL_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(pvl_create_last_error(), "pvl_config_init"));
}

#define THREAD_ERR(fn, call)                                                   \
  do {                                                                         \
    mark_thread_error();                                                       \
    pvl_status st_ = (call);                                                   \
    cr_expect_neq(st_, PVL_SUCCESS, "%s succeeded", #call);                    \
    const char *m_ = pvl_create_last_error();                                  \
    cr_expect(strstr(m_, fn) != NULL,                                          \
              "%s: pvl_create_last_error() = \"%s\" does not name %s", #call,  \
              m_, fn);                                                         \
  } while (0)

/* Every call whose cache or plan argument is NULL, and every call that
 * takes neither, records in the thread's pvl_create_last_error. */
Test(contract, null_handles_record_in_the_thread_error) {
  float buf[64] = {0};
  uint32_t u32 = 0, keep[4];
  uint64_t u64 = 0;
  pvl_seq_id id = 1;
  pvl_seq_info info;
  pvl_stats stats;
  pvl_config cfg;
  pvl_admit adm;
  pvl_plan *plan = NULL;
  pvl_plan_info pi;
  int yes = 0;
  pvl_policy pol;
  cr_assert_eq(pvl_policy_init(&pol, PVL_POLICY_VLCACHE), PVL_SUCCESS);
  pvl_policy_kind kind;
  THREAD_ERR("pvl_cache_config", pvl_cache_config(NULL, &cfg));
  THREAD_ERR("pvl_cache_get_stats", pvl_cache_get_stats(NULL, &stats));
  THREAD_ERR("pvl_cache_layer_tokens", pvl_cache_layer_tokens(NULL, &u64, 1));
  THREAD_ERR("pvl_seq_add", pvl_seq_add(NULL, 5, NULL, 0, &id));
  THREAD_ERR("pvl_seq_free", pvl_seq_free(NULL, 1));
  THREAD_ERR("pvl_seq_fork", pvl_seq_fork(NULL, 1, &id));
  THREAD_ERR("pvl_seq_append", pvl_seq_append(NULL, &id, 1, NULL));
  THREAD_ERR("pvl_seq_retain", pvl_seq_retain(NULL, 1, 0, NULL, 0, NULL));
  THREAD_ERR("pvl_seq_get_info", pvl_seq_get_info(NULL, 1, &info));
  THREAD_ERR("pvl_seq_layer_size", pvl_seq_layer_size(NULL, 1, 0, &u32, &u32));
  THREAD_ERR("pvl_seq_blocks", pvl_seq_blocks(NULL, 1, 0, NULL, 0, &u32));
  THREAD_ERR("pvl_seq_positions", pvl_seq_positions(NULL, 1, 0, NULL, 0, &u32));
  THREAD_ERR("pvl_seq_visual_spans",
             pvl_seq_visual_spans(NULL, 1, NULL, 0, &u32));
  THREAD_ERR("pvl_can_add", pvl_can_add(NULL, 1, &adm));
  THREAD_ERR("pvl_blocks_for_prompt", pvl_blocks_for_prompt(NULL, 1, &u64));
  THREAD_ERR("pvl_blocks_for_append",
             pvl_blocks_for_append(NULL, &id, 1, &u64));
  THREAD_ERR("pvl_kv_write", pvl_kv_write(NULL, 1, 0, 0, 1, buf, buf, NULL));
  THREAD_ERR("pvl_kv_read", pvl_kv_read(NULL, 1, 0, 0, 1, buf, buf, NULL));
  THREAD_ERR("pvl_plan_create", pvl_plan_create(NULL, 1, 0, &plan));
  THREAD_ERR("pvl_plan_build", pvl_plan_build(NULL, &id, 1, NULL));
  THREAD_ERR("pvl_plan_get_info", pvl_plan_get_info(NULL, &pi));
  THREAD_ERR("pvl_plan_kv_write", pvl_plan_kv_write(NULL, 0, buf, buf, NULL));
  THREAD_ERR("pvl_attention_decode",
             pvl_attention_decode(NULL, 0, buf, buf, 0.0f, NULL));
  THREAD_ERR("pvl_policy_rows",
             pvl_policy_rows(&pol, NULL, 1, &u32, &u32, &u32));
  THREAD_ERR("pvl_observe",
             pvl_observe(NULL, 1, 0, buf, 0, 1, 0.5f, 0.0f, NULL));
  THREAD_ERR(
      "pvl_seq_observation",
      pvl_seq_observation(NULL, 1, 0, NULL, NULL, NULL, NULL, 0, &u32, &u32));
  THREAD_ERR("pvl_compress", pvl_compress(NULL, 1, &pol, NULL, NULL));
  THREAD_ERR("pvl_decode_cap", pvl_decode_cap(NULL, 1, 0, &pol, &u32, NULL));
  /* The functions that take neither a cache nor a plan. */
  int32_t rank = 0;
  uint32_t begin = 0;
  THREAD_ERR("pvl_comm_rank", pvl_comm_rank(NULL, &rank));
  THREAD_ERR("pvl_comm_size", pvl_comm_size(NULL, &rank));
  THREAD_ERR("pvl_comm_create_local", pvl_comm_create_local(0, NULL));
  THREAD_ERR("pvl_split_range", pvl_split_range(10, 0, 0, &begin, &u32));
  THREAD_ERR("pvl_cache_create", pvl_cache_create(NULL, NULL));
  THREAD_ERR("pvl_backend_available",
             pvl_backend_available((pvl_backend)7, 0, &yes));
  THREAD_ERR("pvl_policy_init", pvl_policy_init(NULL, PVL_POLICY_H2O));
  THREAD_ERR("pvl_policy_parse", pvl_policy_parse("nope", &kind));
  THREAD_ERR("pvl_policy_budgets", pvl_policy_budgets(&pol, 0, 4, NULL, keep));
  THREAD_ERR(
      "pvl_policy_scores",
      pvl_policy_scores(&pol, 2, (const float[]){1.0f, NAN}, NULL, 1, buf));
  THREAD_ERR(
      "pvl_policy_select",
      pvl_policy_select(&pol, 2, 1, (const float[]){NAN, 1.0f}, keep, &u32));
}

/* A call given a cache (or a plan) records in that cache, and leaves the
 * thread's message alone: pvl_policy_rows included, although it is one of
 * the pvl_policy_* functions. */
Test(contract, calls_with_a_handle_record_in_the_cache) {
  pvl_cache *c = tu_cache(L, HQ, HKV, D, BS, NB, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 6);
  pvl_policy bad;
  cr_assert_eq(pvl_policy_init(&bad, PVL_POLICY_VLCACHE), PVL_SUCCESS);
  bad.keep_ratio = 2.0f;
  uint32_t first, n, fb, did;
#define CACHE_ERR(fn, call)                                                    \
  do {                                                                         \
    mark_thread_error();                                                       \
    c->err[0] = '\0';                                                          \
    pvl_status st_ = (call);                                                   \
    cr_expect_neq(st_, PVL_SUCCESS, "%s succeeded", #call);                    \
    cr_expect(strstr(pvl_cache_last_error(c), fn) != NULL,                     \
              "%s: cache message \"%s\" does not name %s", #call,              \
              pvl_cache_last_error(c), fn);                                    \
    cr_expect(strstr(pvl_create_last_error(), "pvl_config_init") != NULL,      \
              "%s: changed the thread's message to \"%s\"", #call,             \
              pvl_create_last_error());                                        \
  } while (0)
  CACHE_ERR("pvl_policy_rows", pvl_policy_rows(&bad, c, s, &first, &n, &fb));
  CACHE_ERR("pvl_policy_rows", pvl_policy_rows(&bad, c, s, NULL, &n, &fb));
  CACHE_ERR("pvl_policy_rows",
            pvl_policy_rows(&bad, c, s + 99, &first, &n, &fb));
  CACHE_ERR("pvl_compress", pvl_compress(c, s, &bad, NULL, NULL));
  CACHE_ERR("pvl_decode_cap", pvl_decode_cap(c, s, 0, &bad, &did, NULL));
  CACHE_ERR("pvl_seq_blocks", pvl_seq_blocks(c, s, L, NULL, 0, &n));
  pvl_plan *p = NULL;
  TU_OK(c, pvl_plan_create(c, 1, 0, &p));
  float q[HQ * D] = {0};
  CACHE_ERR("pvl_plan_build", pvl_plan_build(p, NULL, 1, NULL));
  CACHE_ERR("pvl_plan_get_info", pvl_plan_get_info(p, NULL));
  CACHE_ERR("pvl_attention_decode",
            pvl_attention_decode(p, L, q, q, 0.0f, NULL));
#undef CACHE_ERR
  pvl_cache_destroy(c);
}

/* ---- pvl_observe: rows are queries of tokens the sequence has ---- */

Test(contract, observe_rows_must_be_tokens_of_the_sequence) {
  pvl_cache *c = tu_cache(L, HQ, HKV, D, BS, NB, PVL_DTYPE_F32);
  pvl_seq_id s = tu_add(c, 12);
  float k[12 * HKV * D], v[12 * HKV * D], q[4 * HQ * D];
  tu_rng r;
  tu_rng_init(&r, 9);
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, k, NULL, 12 * HKV * D);
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, v, NULL, 12 * HKV * D);
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, q, NULL, 4 * HQ * D);
  TU_OK(c, pvl_kv_write(c, s, 0, 0, 12, k, v, NULL));
  const struct {
    uint32_t first, n;
  } bad[] = {{1000, 1}, {1000, 0},       {12, 1},        {11, 2},
             {13, 0},   {UINT32_MAX, 2}, {5, UINT32_MAX}};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    tu_snap *before = tu_snap_take(c, &s, 1, true);
    TU_IS(PVL_ERR_INVALID_ARGUMENT,
          pvl_observe(c, s, 0, q, bad[i].first, bad[i].n, 0.5f, 0.0f, NULL));
    cr_assert(strstr(pvl_cache_last_error(c), "next position 12"),
              "rows [%u, +%u): \"%s\"", bad[i].first, bad[i].n,
              pvl_cache_last_error(c));
    TU_UNCHANGED(c, before, &s, 1, true);
    tu_snap_free(before);
    TU_IS(PVL_ERR_BAD_STATE,
          pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL, 0, NULL, NULL));
  }
  /* The last prompt row, and an empty range at the next position. */
  TU_OK(c, pvl_observe(c, s, 0, q, 11, 1, 0.5f, 0.0f, NULL));
  TU_OK(c, pvl_observe(c, s, 0, q, 12, 0, 0.5f, 0.0f, NULL));
  /* A decode token's query exists once it is appended. */
  TU_IS(PVL_ERR_INVALID_ARGUMENT,
        pvl_observe(c, s, 0, q, 12, 1, 0.5f, 0.0f, NULL));
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  TU_OK(c, pvl_kv_write(c, s, 0, 12, 1, k, v, NULL));
  TU_OK(c, pvl_observe(c, s, 0, q, 10, 3, 0.5f, 0.0f, NULL));
  uint32_t rows = 0;
  TU_OK(c,
        pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL, 0, NULL, &rows));
  cr_assert_eq(rows, 3);
  pvl_cache_destroy(c);
}

/* ---- config limits ---- */

/* Creates with an allocator that refuses requests over 1 MiB: a config
 * that passes validation but needs a large pool fails with NO_MEMORY,
 * which shows the limit itself was not hit. */
static pvl_status create_limited(pvl_config cfg) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  ta.max_size = (size_t)1 << 20;
  cfg.allocator = &ta.a;
  pvl_cache *c = NULL;
  pvl_status st = pvl_cache_create(&cfg, &c);
  if (st == PVL_SUCCESS) pvl_cache_destroy(c);
  TU_NO_LEAKS(&ta);
  return st;
}

Test(contract, config_limits) {
  const pvl_config good = tu_config(1, 1, 1, 1, 1, 1, PVL_DTYPE_F32);
  const pvl_status INV = PVL_ERR_INVALID_ARGUMENT;
#define LIMIT(field, value, want)                                              \
  do {                                                                         \
    pvl_config cfg_ = good;                                                    \
    cfg_.field = value;                                                        \
    const pvl_status st_ = create_limited(cfg_);                               \
    cr_expect_eq(st_, want, "%s = %s: %s, expected %s (%s)", #field, #value,   \
                 pvl_status_string(st_), pvl_status_string(want),              \
                 pvl_create_last_error());                                     \
  } while (0)
  LIMIT(num_layers, 4096, PVL_SUCCESS);
  LIMIT(num_layers, 4097, INV);
  LIMIT(num_kv_heads, 1025, INV);
  LIMIT(num_q_heads, 16384, PVL_SUCCESS);
  LIMIT(num_q_heads, 16385, INV);
  LIMIT(head_dim, 1024, PVL_SUCCESS);
  LIMIT(head_dim, 1025, INV);
  LIMIT(block_size, 1024, PVL_SUCCESS);
  LIMIT(block_size, 1025, INV);
  LIMIT(max_seqs, 1u << 24, PVL_ERR_NO_MEMORY); /* valid, 320 MiB of slots */
  LIMIT(max_seqs, (1u << 24) + 1, INV);
  LIMIT(num_blocks, 0x7fffffffu, PVL_ERR_NO_MEMORY); /* valid with bs 1 */
  LIMIT(num_blocks, 0x80000000u, INV);
  /* num_blocks only read through memory_fraction when it is 0. */
  LIMIT(memory_fraction, NAN, PVL_SUCCESS);
  LIMIT(memory_fraction, 0.0f, PVL_SUCCESS);
#undef LIMIT
  pvl_config heads = good;
  heads.num_kv_heads = 1024;
  heads.num_q_heads = 1024;
  cr_expect_eq(create_limited(heads), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  /* The slots of the pool must fit the int32 layer lengths:
   * num_blocks * block_size <= INT32_MAX. */
  pvl_config cfg = good;
  cfg.block_size = 2;
  cfg.num_blocks = 0x3fffffff; /* 2^31 - 2 slots */
  cr_expect_eq(create_limited(cfg), PVL_ERR_NO_MEMORY, "%s",
               pvl_create_last_error());
  cfg.num_blocks = 0x40000000; /* 2^31 slots */
  cr_expect_eq(create_limited(cfg), INV);
  cr_expect(strstr(pvl_create_last_error(), "INT32_MAX"), "%s",
            pvl_create_last_error());
  cfg.block_size = 1024;
  cfg.num_blocks = (0x7fffffffu / 1024) + 1;
  cr_expect_eq(create_limited(cfg), INV);
  cfg.num_blocks = 0x7fffffffu / 1024;
  cr_expect_eq(create_limited(cfg), PVL_ERR_NO_MEMORY, "%s",
               pvl_create_last_error());
  /* memory_fraction when num_blocks = 0 (CPU: then refused anyway). */
  cfg = good;
  cfg.num_blocks = 0;
  const float bad_fr[] = {0.0f, -0.5f, 1.5f, NAN, INFINITY};
  for (size_t i = 0; i < sizeof(bad_fr) / sizeof(bad_fr[0]); i++) {
    cfg.memory_fraction = bad_fr[i];
    cr_expect_eq(create_limited(cfg), INV, "memory_fraction %g",
                 (double)bad_fr[i]);
    cr_expect(strstr(pvl_create_last_error(), "memory_fraction"), "%s",
              pvl_create_last_error());
  }
}
