/* Every public function fed bad input: each must return its documented
 * status, leave a last-error message that names the function, and change
 * nothing (cache, sequences, data and plan). Also the status strings, the
 * version and the config defaults. */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

/* ---- fixture: a small cache with live, stale and shared sequences and a
 * built plan ---- */

typedef struct fixture {
  pvl_cache *c;
  pvl_seq_id a, b, f, stale;
  pvl_seq_id ids[3];
  pvl_plan *plan;
} fixture;

enum { L = 2, HQ = 4, HKV = 2, D = 8, BS = 4, NB = 16 };

static void fixture_init(fixture *F) {
  pvl_config cfg = tu_config(L, HQ, HKV, D, BS, NB, PVL_DTYPE_F32);
  cfg.max_seqs = 4;
  F->c = tu_cache_new(&cfg);
  tu_rng r;
  tu_rng_init(&r, 3);
  F->a = tu_add(F->c, 6);
  F->b = tu_add(F->c, 3);
  for (uint32_t l = 0; l < L; l++) {
    float k[6 * HKV * D], v[6 * HKV * D];
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, k, NULL, 6 * HKV * D);
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, v, NULL, 6 * HKV * D);
    TU_OK(F->c, pvl_kv_write(F->c, F->a, l, 0, 6, k, v, NULL));
    TU_OK(F->c, pvl_kv_write(F->c, F->b, l, 0, 3, k, v, NULL));
  }
  F->stale = tu_add(F->c, 1);
  TU_OK(F->c, pvl_seq_free(F->c, F->stale));
  TU_OK(F->c, pvl_seq_fork(F->c, F->b, &F->f)); /* b and f share */
  F->ids[0] = F->a;
  F->ids[1] = F->b;
  F->ids[2] = F->f;
  TU_OK(F->c, pvl_plan_create(F->c, 2, 0, &F->plan));
  TU_OK(F->c, pvl_plan_build(F->plan, F->ids, 2, NULL));
  TU_CHECK(F->c);
}

static void fixture_fini(fixture *F) { pvl_cache_destroy(F->c); }

typedef struct plan_state {
  pvl_plan_info info;
  int32_t *buf;
  size_t n;
} plan_state;

static plan_state plan_save(const pvl_plan *p) {
  plan_state s;
  cr_assert_eq(pvl_plan_get_info(p, &s.info), PVL_SUCCESS);
  s.n = (size_t)pvl_plan_buf_elems(p->view.num_layers, p->view.max_seqs,
                                   p->view.block_cap);
  s.buf = malloc(s.n * sizeof(int32_t));
  memcpy(s.buf, p->view.buf, s.n * sizeof(int32_t));
  return s;
}

/* Checks the result of a bad call: status, message, nothing changed. */
static void expect_bad(fixture *F, tu_snap *before, plan_state *ps,
                       pvl_status st, pvl_status want, const char *fn,
                       bool has_cache, const char *call, int line) {
  cr_expect_eq(st, want, "line %d: %s returned %s, expected %s", line, call,
               pvl_status_string(st), pvl_status_string(want));
  if (has_cache) {
    const char *msg = pvl_cache_last_error(F->c);
    cr_expect(msg && strlen(msg) > 0, "line %d: %s left no error message", line,
              call);
    cr_expect(msg && strstr(msg, fn),
              "line %d: %s: message \"%s\" does "
              "not name %s",
              line, call, msg, fn);
  }
  TU_UNCHANGED(F->c, before, F->ids, 3, true);
  tu_snap_free(before);
  pvl_plan_info now;
  cr_assert_eq(pvl_plan_get_info(F->plan, &now), PVL_SUCCESS);
  cr_expect_arr_eq(&now, &ps->info, sizeof(now),
                   "line %d: %s changed the "
                   "plan info",
                   line, call);
  cr_expect_arr_eq(F->plan->view.buf, ps->buf, ps->n * sizeof(int32_t),
                   "line %d: %s changed the plan buffer", line, call);
  free(ps->buf);
  TU_CHECK(F->c);
}

/* BAD(status, "function", call): the call runs against fixture F. */
#define BAD_(want, fn, has_cache, call)                                        \
  do {                                                                         \
    tu_snap *b_ = tu_snap_take(F.c, F.ids, 3, true);                           \
    plan_state ps_ = plan_save(F.plan);                                        \
    F.c->err[0] = '\0';                                                        \
    pvl_status s_ = (call);                                                    \
    expect_bad(&F, b_, &ps_, s_, (want), (fn), (has_cache), #call, __LINE__);  \
  } while (0)
#define BAD(want, fn, call) BAD_(want, fn, true, call)
#define BAD_NULL(want, call) BAD_(want, "", false, call)

static const pvl_status INV = PVL_ERR_INVALID_ARGUMENT;
static const pvl_status UNK = PVL_ERR_UNKNOWN_SEQUENCE;

/* ---- status strings, version, defaults ---- */

Test(api, status_strings) {
  static const struct {
    pvl_status st;
    const char *name;
  } all[] = {
      {PVL_SUCCESS, "PVL_SUCCESS"},
      {PVL_ERR_INVALID_ARGUMENT, "PVL_ERR_INVALID_ARGUMENT"},
      {PVL_ERR_NO_MEMORY, "PVL_ERR_NO_MEMORY"},
      {PVL_ERR_OUT_OF_BLOCKS, "PVL_ERR_OUT_OF_BLOCKS"},
      {PVL_ERR_UNKNOWN_SEQUENCE, "PVL_ERR_UNKNOWN_SEQUENCE"},
      {PVL_ERR_UNSUPPORTED, "PVL_ERR_UNSUPPORTED"},
      {PVL_ERR_CAPACITY, "PVL_ERR_CAPACITY"},
      {PVL_ERR_BAD_STATE, "PVL_ERR_BAD_STATE"},
      {PVL_ERR_NO_DEVICE, "PVL_ERR_NO_DEVICE"},
      {PVL_ERR_CUDA, "PVL_ERR_CUDA"},
      {PVL_ERR_NCCL, "PVL_ERR_NCCL"},
      {PVL_ERR_INTERNAL, "PVL_ERR_INTERNAL"},
  };
  const size_t n = sizeof(all) / sizeof(all[0]);
  for (size_t i = 0; i < n; i++) {
    const char *s = pvl_status_string(all[i].st);
    cr_assert_not_null(s);
    size_t k = strlen(all[i].name);
    cr_assert(strncmp(s, all[i].name, k) == 0 && (s[k] == ':' || s[k] == 0),
              "pvl_status_string(%d) = \"%s\" does not start with %s",
              (int)all[i].st, s, all[i].name);
    for (size_t j = 0; j < i; j++)
      cr_assert_str_neq(s, pvl_status_string(all[j].st));
  }
  const int odd[] = {12, 99, -1, 0x7fffffff};
  for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++) {
    const char *s = pvl_status_string((pvl_status)odd[i]);
    cr_assert_not_null(s, "value %d", odd[i]);
    cr_assert_gt(strlen(s), 0);
    for (size_t j = 0; j < n; j++)
      cr_assert_str_neq(s, pvl_status_string(all[j].st),
                        "value %d reads as a real status", odd[i]);
  }
}

Test(api, version) {
  cr_assert_eq(pvl_version(), PVL_VERSION);
  cr_assert_eq(PVL_VERSION, PVL_VERSION_MAJOR * 10000 +
                                PVL_VERSION_MINOR * 100 + PVL_VERSION_PATCH);
}

Test(api, dtype_size) {
  cr_assert_eq(pvl_dtype_size(PVL_DTYPE_F32), 4);
  cr_assert_eq(pvl_dtype_size(PVL_DTYPE_F16), 2);
  cr_assert_eq(pvl_dtype_size(PVL_DTYPE_BF16), 2);
  cr_assert_eq(pvl_dtype_size((pvl_dtype)3), 0);
  cr_assert_eq(pvl_dtype_size((pvl_dtype)-1), 0);
}

Test(api, config_init_defaults) {
  pvl_config cfg;
  memset(&cfg, 0x5a, sizeof(cfg));
  cr_assert_eq(pvl_config_init(&cfg), PVL_SUCCESS);
  cr_assert_eq(cfg.size, sizeof(pvl_config));
  cr_assert_eq(cfg.backend, PVL_BACKEND_AUTO);
  cr_assert_eq(cfg.device, 0);
  cr_assert_eq(cfg.dtype, PVL_DTYPE_F16);
  cr_assert_eq(cfg.num_layers, 0);
  cr_assert_eq(cfg.num_q_heads, 0);
  cr_assert_eq(cfg.num_kv_heads, 0);
  cr_assert_eq(cfg.head_dim, 0);
  cr_assert_eq(cfg.block_size, 0);
  cr_assert_eq(cfg.num_blocks, 0);
  cr_assert_float_eq(cfg.memory_fraction, 0.9f, 1e-7);
  cr_assert_eq(cfg.max_seqs, 4096);
  cr_assert_null(cfg.allocator);
  cr_assert_eq(pvl_config_init(NULL), PVL_ERR_INVALID_ARGUMENT);
}

Test(api, cache_config_round_trip) {
  pvl_config cfg = tu_config(3, 8, 2, 16, 8, 40, PVL_DTYPE_BF16);
  cfg.backend = PVL_BACKEND_AUTO;
  pvl_cache *c = tu_cache_new(&cfg);
  pvl_config got;
  TU_OK(c, pvl_cache_config(c, &got));
  if (pvl__cuda_backend() == NULL)
    cr_assert_eq(got.backend, PVL_BACKEND_CPU, "AUTO resolves to the CPU");
  else
    cr_assert_neq(got.backend, PVL_BACKEND_AUTO);
  cr_assert_eq(got.num_layers, 3);
  cr_assert_eq(got.num_q_heads, 8);
  cr_assert_eq(got.num_kv_heads, 2);
  cr_assert_eq(got.head_dim, 16);
  cr_assert_eq(got.block_size, 8);
  cr_assert_eq(got.num_blocks, 40);
  cr_assert_eq(got.dtype, PVL_DTYPE_BF16);
  cr_assert_eq(got.max_seqs, 64);
  cr_assert_str_empty(pvl_cache_last_error(c), "a fresh cache has no error");
  pvl_cache_destroy(c);
}

Test(api, null_handles) {
  cr_assert_eq(pvl_cache_destroy(NULL), PVL_SUCCESS);
  cr_assert_eq(pvl_plan_destroy(NULL), PVL_SUCCESS);
  const char *m = pvl_cache_last_error(NULL);
  cr_assert(m && strlen(m) > 0);
  pvl_config cfg;
  pvl_stats st;
  uint64_t u64;
  uint32_t u32;
  pvl_admit adm;
  pvl_seq_id id = 0;
  pvl_seq_info info;
  pvl_plan *p = NULL;
  pvl_plan_info pi;
  float buf[64];
  cr_assert_eq(pvl_cache_config(NULL, &cfg), INV);
  cr_assert_eq(pvl_cache_get_stats(NULL, &st), INV);
  cr_assert_eq(pvl_cache_layer_tokens(NULL, &u64, 1), INV);
  cr_assert_eq(pvl_seq_add(NULL, 5, NULL, 0, &id), INV);
  cr_assert_eq(pvl_seq_free(NULL, 1), INV);
  cr_assert_eq(pvl_seq_fork(NULL, 1, &id), INV);
  cr_assert_eq(pvl_seq_append(NULL, &id, 1, NULL), INV);
  cr_assert_eq(pvl_seq_retain(NULL, 1, 0, NULL, 0, NULL), INV);
  cr_assert_eq(pvl_seq_get_info(NULL, 1, &info), INV);
  cr_assert_eq(pvl_seq_layer_size(NULL, 1, 0, &u32, &u32), INV);
  cr_assert_eq(pvl_seq_blocks(NULL, 1, 0, NULL, 0, &u32), INV);
  cr_assert_eq(pvl_seq_positions(NULL, 1, 0, NULL, 0, &u32), INV);
  cr_assert_eq(pvl_seq_visual_spans(NULL, 1, NULL, 0, &u32), INV);
  cr_assert_eq(pvl_can_add(NULL, 1, &adm), INV);
  cr_assert_eq(pvl_blocks_for_prompt(NULL, 1, &u64), INV);
  cr_assert_eq(pvl_blocks_for_append(NULL, &id, 1, &u64), INV);
  cr_assert_eq(pvl_kv_write(NULL, 1, 0, 0, 1, buf, buf, NULL), INV);
  cr_assert_eq(pvl_kv_read(NULL, 1, 0, 0, 1, buf, buf, NULL), INV);
  cr_assert_eq(pvl_plan_create(NULL, 1, 0, &p), INV);
  cr_assert_null(p);
  cr_assert_eq(pvl_plan_build(NULL, &id, 1, NULL), INV);
  cr_assert_eq(pvl_plan_get_info(NULL, &pi), INV);
  cr_assert_eq(pvl_plan_kv_write(NULL, 0, buf, buf, NULL), INV);
  cr_assert_eq(pvl_attention_decode(NULL, 0, buf, buf, 0.0f, NULL), INV);
}

/* ---- pvl_cache_create ---- */

static void bad_create(pvl_config cfg, pvl_status want, const char *what) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  ta.max_size = (size_t)1 << 40; /* a huge request fails, never aborts */
  cfg.allocator = &ta.a;
  pvl_cache *c = (pvl_cache *)(uintptr_t)0x1234;
  pvl_status st = pvl_cache_create(&cfg, &c);
  cr_expect_eq(st, want, "%s: %s, expected %s", what, pvl_status_string(st),
               pvl_status_string(want));
  cr_expect_eq((uintptr_t)c, 0x1234, "%s: out written on failure", what);
  const char *msg = pvl_create_last_error();
  cr_expect(msg && strlen(msg) > 0, "%s: no message", what);
  if (st == PVL_SUCCESS) pvl_cache_destroy(c);
  TU_NO_LEAKS(&ta);
}

Test(api, cache_create_rejects_bad_configs) {
  const pvl_config good = tu_config(2, 4, 2, 8, 4, 16, PVL_DTYPE_F32);
  pvl_config cfg;
  pvl_cache *c = NULL;
  cr_expect_eq(pvl_cache_create(NULL, &c), INV);
  cr_expect_eq(pvl_cache_create(&good, NULL), INV);
  cr_expect_null(c);

#define CASE(field, value, want)                                               \
  do {                                                                         \
    cfg = good;                                                                \
    cfg.field = value;                                                         \
    bad_create(cfg, want, #field " = " #value);                                \
  } while (0)
  CASE(size, 0, INV);
  CASE(size, sizeof(pvl_config) + 8, INV);
  CASE(size, sizeof(pvl_config) - 8, INV);
  CASE(head_dim, 0, INV);
  CASE(head_dim, 1025, INV);
  CASE(num_q_heads, 3, INV); /* not a multiple of 2 KV heads */
  CASE(num_q_heads, 0, INV);
  CASE(num_q_heads, 1, INV);
  CASE(num_kv_heads, 0, INV);
  /* The kernels take head counts as int32. */
  CASE(num_q_heads, 0x80000000u, INV);
  CASE(num_layers, 0, INV);
  CASE(block_size, 0, INV);
  CASE(block_size, 1025, INV);
  CASE(dtype, (pvl_dtype)7, INV);
  CASE(dtype, (pvl_dtype)-1, INV);
  CASE(backend, (pvl_backend)9, INV);
  CASE(max_seqs, 0, INV);
  CASE(num_blocks, 0, INV);           /* derived sizes are CUDA-only */
  CASE(num_blocks, 0x80000000u, INV); /* block ids are int32 */
  CASE(num_blocks, 0xffffffffu, INV);
#undef CASE
  pvl_allocator half = {NULL, NULL, NULL};
  cfg = good;
  cfg.allocator = &half;
  c = NULL;
  cr_expect_eq(pvl_cache_create(&cfg, &c), INV, "allocator without functions");
  cr_expect_null(c);
}

/* pvl_create_last_error() explains a failed pvl_cache_create: like every
 * last-error message it names the function that failed. */
Test(api, cache_create_errors_name_the_function) {
  const pvl_config good = tu_config(2, 4, 2, 8, 4, 16, PVL_DTYPE_F32);
  pvl_config cfgs[4] = {good, good, good, good};
  const char *what[4] = {"size = 0", "head_dim = 0", "num_blocks = 0 (CPU)",
                         "backend = CUDA"};
  cfgs[0].size = 0;
  cfgs[1].head_dim = 0;
  cfgs[2].num_blocks = 0;
  cfgs[3].backend = PVL_BACKEND_CUDA;
  const int n = pvl__cuda_backend() == NULL ? 4 : 3;
  for (int i = 0; i < n; i++) {
    pvl_cache *c = NULL;
    pvl_status st = pvl_cache_create(&cfgs[i], &c);
    cr_expect_neq(st, PVL_SUCCESS, "%s", what[i]);
    const char *msg = pvl_create_last_error();
    cr_expect(msg && strstr(msg, "pvl_cache_create"),
              "%s: message \"%s\" does not name pvl_cache_create", what[i],
              msg);
    if (st == PVL_SUCCESS) pvl_cache_destroy(c);
  }
}

Test(api, cache_create_cuda_without_cuda_is_unsupported) {
  if (pvl__cuda_backend() != NULL)
    cr_skip_test("this libpagedvl was built with CUDA");
  pvl_config cfg = tu_config(2, 4, 2, 64, 16, 16, PVL_DTYPE_F16);
  cfg.backend = PVL_BACKEND_CUDA;
  bad_create(cfg, PVL_ERR_UNSUPPORTED, "backend = CUDA");
}

Test(api, cache_create_with_a_pool_too_large_for_memory) {
  /* 1024 heads x 1024 slots x 1024 dims x 2 x 4 bytes = 8 GiB a block, and
   * INT32_MAX blocks: ~2^64 bytes. Must fail cleanly, never abort. */
  pvl_config cfg =
      tu_config(1, 1024, 1024, 1024, 1024, 0x7fffffffu, PVL_DTYPE_F32);
  tu_alloc ta;
  tu_alloc_init(&ta);
  ta.max_size = (size_t)1 << 40;
  cfg.allocator = &ta.a;
  pvl_cache *c = NULL;
  pvl_status st = pvl_cache_create(&cfg, &c);
  cr_assert(st == PVL_ERR_INVALID_ARGUMENT || st == PVL_ERR_NO_MEMORY, "got %s",
            pvl_status_string(st));
  cr_assert_null(c);
  TU_NO_LEAKS(&ta);
}

/* ---- sequences ---- */

Test(api, seq_add_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_seq_id out = 0x77;
  const pvl_span empty = {2, 2}, past = {1, 9};
  const pvl_span unsorted[2] = {{3, 4}, {0, 1}};
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 5, NULL, 0, NULL));
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 0, NULL, 0, &out));
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 5, NULL, 1, &out));
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 5, &empty, 1, &out));
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 5, &past, 1, &out));
  BAD(INV, "pvl_seq_add", pvl_seq_add(F.c, 5, unsorted, 2, &out));
  /* 10 blocks free: 29 tokens need 8 x 2 = 16 */
  BAD(PVL_ERR_OUT_OF_BLOCKS, "pvl_seq_add",
      pvl_seq_add(F.c, 29, NULL, 0, &out));
  BAD(PVL_ERR_OUT_OF_BLOCKS, "pvl_seq_add",
      pvl_seq_add(F.c, UINT32_MAX, NULL, 0, &out));
  cr_assert_eq(out, 0x77);
  /* max_seqs = 4: a, b, f live; one more fits, then CAPACITY. */
  pvl_seq_id d = 0;
  TU_OK(F.c, pvl_seq_add(F.c, 1, NULL, 0, &d));
  BAD(PVL_ERR_CAPACITY, "pvl_seq_add", pvl_seq_add(F.c, 1, NULL, 0, &out));
  BAD(PVL_ERR_CAPACITY, "pvl_seq_fork", pvl_seq_fork(F.c, F.a, &out));
  cr_assert_eq(out, 0x77);
  fixture_fini(&F);
}

Test(api, seq_free_fork_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_seq_id out = 0x77;
  BAD(UNK, "pvl_seq_free", pvl_seq_free(F.c, F.stale));
  BAD(UNK, "pvl_seq_free", pvl_seq_free(F.c, 0));
  BAD(UNK, "pvl_seq_free", pvl_seq_free(F.c, F.a + (1ull << 32)));
  BAD(UNK, "pvl_seq_free", pvl_seq_free(F.c, (F.a & ~0xffffffffull) | 1000));
  BAD(INV, "pvl_seq_fork", pvl_seq_fork(F.c, F.a, NULL));
  BAD(UNK, "pvl_seq_fork", pvl_seq_fork(F.c, F.stale, &out));
  cr_assert_eq(out, 0x77);
  fixture_fini(&F);
}

Test(api, seq_append_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_seq_id dup[2] = {F.a, F.a};
  pvl_seq_id with_stale[2] = {F.a, F.stale};
  BAD(INV, "pvl_seq_append", pvl_seq_append(F.c, NULL, 1, NULL));
  BAD(INV, "pvl_seq_append", pvl_seq_append(F.c, dup, 2, NULL));
  BAD(UNK, "pvl_seq_append", pvl_seq_append(F.c, with_stale, 2, NULL));
  /* Fill the pool, then an append that needs blocks fails. */
  pvl_seq_id big = 0;
  TU_OK(F.c, pvl_seq_add(F.c, 20, NULL, 0, &big)); /* the last 10 blocks */
  cr_assert_eq(tu_free_blocks(F.c), 0);
  pvl_seq_id ab[2] = {F.a, F.b}; /* a in place, b copy-on-write (x2) */
  BAD(PVL_ERR_OUT_OF_BLOCKS, "pvl_seq_append",
      pvl_seq_append(F.c, ab, 2, NULL));
  fixture_fini(&F);
}

Test(api, seq_retain_bad_input) {
  fixture F;
  fixture_init(&F);
  const uint32_t keep[] = {1, 3, 5}, unsorted[] = {3, 1}, dup[] = {2, 2},
                 oob[] = {0, 6};
  uint32_t seven[7] = {0, 1, 2, 3, 4, 5, 6};
  BAD(UNK, "pvl_seq_retain", pvl_seq_retain(F.c, F.stale, 0, keep, 3, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, L, keep, 3, NULL));
  BAD(INV, "pvl_seq_retain",
      pvl_seq_retain(F.c, F.a, 0xffffffffu, keep, 3, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, 0, NULL, 3, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, 0, unsorted, 2, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, 0, dup, 2, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, 0, oob, 2, NULL));
  BAD(INV, "pvl_seq_retain", pvl_seq_retain(F.c, F.a, 0, seven, 7, NULL));
  pvl_seq_id big = 0;
  TU_OK(F.c, pvl_seq_add(F.c, 20, NULL, 0, &big)); /* the last 10 blocks */
  cr_assert_eq(tu_free_blocks(F.c), 0);
  BAD(PVL_ERR_OUT_OF_BLOCKS, "pvl_seq_retain",
      pvl_seq_retain(F.c, F.a, 1, keep, 3, NULL));
  fixture_fini(&F);
}

Test(api, seq_queries_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_seq_info info;
  uint32_t u = 0;
  int32_t ids[8];
  uint32_t pos[8];
  pvl_span sp[2];
  BAD(INV, "pvl_seq_get_info", pvl_seq_get_info(F.c, F.a, NULL));
  BAD(UNK, "pvl_seq_get_info", pvl_seq_get_info(F.c, F.stale, &info));
  BAD(INV, "pvl_seq_layer_size", pvl_seq_layer_size(F.c, F.a, 0, NULL, &u));
  BAD(INV, "pvl_seq_layer_size", pvl_seq_layer_size(F.c, F.a, 0, &u, NULL));
  BAD(INV, "pvl_seq_layer_size", pvl_seq_layer_size(F.c, F.a, L, &u, &u));
  BAD(UNK, "pvl_seq_layer_size", pvl_seq_layer_size(F.c, F.stale, 0, &u, &u));
  BAD(INV, "pvl_seq_blocks", pvl_seq_blocks(F.c, F.a, 0, ids, 8, NULL));
  BAD(INV, "pvl_seq_blocks", pvl_seq_blocks(F.c, F.a, 0, NULL, 8, &u));
  BAD(INV, "pvl_seq_blocks", pvl_seq_blocks(F.c, F.a, L, ids, 8, &u));
  BAD(UNK, "pvl_seq_blocks", pvl_seq_blocks(F.c, F.stale, 0, ids, 8, &u));
  BAD(PVL_ERR_CAPACITY, "pvl_seq_blocks",
      pvl_seq_blocks(F.c, F.a, 0, ids, 1, &u));
  BAD(INV, "pvl_seq_positions", pvl_seq_positions(F.c, F.a, 0, pos, 8, NULL));
  BAD(INV, "pvl_seq_positions", pvl_seq_positions(F.c, F.a, 0, NULL, 8, &u));
  BAD(INV, "pvl_seq_positions", pvl_seq_positions(F.c, F.a, L, pos, 8, &u));
  BAD(UNK, "pvl_seq_positions", pvl_seq_positions(F.c, F.stale, 0, pos, 8, &u));
  BAD(PVL_ERR_CAPACITY, "pvl_seq_positions",
      pvl_seq_positions(F.c, F.a, 0, pos, 5, &u));
  BAD(INV, "pvl_seq_visual_spans", pvl_seq_visual_spans(F.c, F.a, sp, 2, NULL));
  BAD(INV, "pvl_seq_visual_spans", pvl_seq_visual_spans(F.c, F.a, NULL, 2, &u));
  BAD(UNK, "pvl_seq_visual_spans",
      pvl_seq_visual_spans(F.c, F.stale, sp, 2, &u));
  cr_assert_eq(u, 0, "out written on failure");
  fixture_fini(&F);
}

Test(api, scheduler_queries_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_admit adm = (pvl_admit)77;
  uint64_t n = 77;
  pvl_seq_id dup[2] = {F.a, F.stale};
  BAD(INV, "pvl_can_add", pvl_can_add(F.c, 0, &adm));
  BAD(INV, "pvl_blocks_for_prompt", pvl_blocks_for_prompt(F.c, 5, NULL));
  BAD(INV, "pvl_blocks_for_append", pvl_blocks_for_append(F.c, &F.a, 1, NULL));
  BAD(INV, "pvl_blocks_for_append", pvl_blocks_for_append(F.c, NULL, 1, &n));
  BAD(UNK, "pvl_blocks_for_append", pvl_blocks_for_append(F.c, dup, 2, &n));
  cr_assert_eq(adm, (pvl_admit)77);
  cr_assert_eq(n, 77);
  fixture_fini(&F);
}

/* A NULL out-pointer must be refused, not written through. */
Test(api, can_add_null_out) {
  fixture F;
  fixture_init(&F);
  BAD(INV, "pvl_can_add", pvl_can_add(F.c, 5, NULL));
  fixture_fini(&F);
}

Test(api, stats_bad_input) {
  fixture F;
  fixture_init(&F);
  uint64_t lt[4];
  pvl_config cfg;
  BAD(INV, "pvl_cache_get_stats", pvl_cache_get_stats(F.c, NULL));
  BAD(INV, "pvl_cache_config", pvl_cache_config(F.c, NULL));
  BAD(INV, "pvl_cache_layer_tokens", pvl_cache_layer_tokens(F.c, NULL, L));
  BAD(INV, "pvl_cache_layer_tokens", pvl_cache_layer_tokens(F.c, lt, L - 1));
  BAD(INV, "pvl_cache_layer_tokens", pvl_cache_layer_tokens(F.c, lt, L + 1));
  (void)cfg;
  fixture_fini(&F);
}

/* ---- data ---- */

Test(api, kv_write_read_bad_input) {
  fixture F;
  fixture_init(&F);
  float k[8 * HKV * D], v[8 * HKV * D];
  memset(k, 0, sizeof(k));
  memset(v, 0, sizeof(v));
  BAD(UNK, "pvl_kv_write", pvl_kv_write(F.c, F.stale, 0, 0, 1, k, v, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, L, 0, 1, k, v, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, 0, 0, 1, NULL, v, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, 0, 0, 1, k, NULL, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, 0, 0, 7, k, v, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, 0, 6, 1, k, v, NULL));
  BAD(INV, "pvl_kv_write", pvl_kv_write(F.c, F.a, 0, 7, 0, k, v, NULL));
  /* first + n wraps around 2^32 */
  BAD(INV, "pvl_kv_write",
      pvl_kv_write(F.c, F.a, 0, 5, UINT32_MAX - 2, k, v, NULL));
  BAD(INV, "pvl_kv_write",
      pvl_kv_write(F.c, F.a, 0, UINT32_MAX, 2, k, v, NULL));
  /* b's blocks are shared with its fork f: read-only. */
  BAD(PVL_ERR_BAD_STATE, "pvl_kv_write",
      pvl_kv_write(F.c, F.b, 1, 2, 1, k, v, NULL));
  BAD(PVL_ERR_BAD_STATE, "pvl_kv_write",
      pvl_kv_write(F.c, F.f, 0, 0, 3, k, v, NULL));

  BAD(UNK, "pvl_kv_read", pvl_kv_read(F.c, F.stale, 0, 0, 1, k, v, NULL));
  BAD(INV, "pvl_kv_read", pvl_kv_read(F.c, F.a, L, 0, 1, k, v, NULL));
  BAD(INV, "pvl_kv_read", pvl_kv_read(F.c, F.a, 0, 0, 1, NULL, v, NULL));
  BAD(INV, "pvl_kv_read", pvl_kv_read(F.c, F.a, 0, 0, 7, k, v, NULL));
  BAD(INV, "pvl_kv_read",
      pvl_kv_read(F.c, F.a, 0, 5, UINT32_MAX - 2, k, v, NULL));
  BAD(INV, "pvl_kv_read", pvl_kv_read(F.c, F.a, 0, UINT32_MAX, 2, k, v, NULL));
  fixture_fini(&F);
}

/* ---- plans ---- */

Test(api, plan_create_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_plan *p = (pvl_plan *)(uintptr_t)0x99;
  BAD(INV, "pvl_plan_create", pvl_plan_create(F.c, 2, 0, NULL));
  BAD(INV, "pvl_plan_create", pvl_plan_create(F.c, 0, 0, &p));
  BAD(INV, "pvl_plan_create", pvl_plan_create(F.c, 5, 0, &p)); /* > 4 */
  BAD(INV, "pvl_plan_create", pvl_plan_create(F.c, 2, 1ull << 40, &p));
  BAD(INV, "pvl_plan_create", pvl_plan_create(F.c, 2, UINT64_MAX, &p));
  cr_assert_eq((uintptr_t)p, 0x99);
  fixture_fini(&F);
}

Test(api, plan_build_bad_input) {
  fixture F;
  fixture_init(&F);
  pvl_seq_id three[3] = {F.a, F.b, F.f};
  pvl_seq_id dup[2] = {F.b, F.b};
  pvl_seq_id st[2] = {F.a, F.stale};
  BAD(PVL_ERR_CAPACITY, "pvl_plan_build",
      pvl_plan_build(F.plan, three, 3, NULL));
  BAD(INV, "pvl_plan_build", pvl_plan_build(F.plan, NULL, 1, NULL));
  BAD(INV, "pvl_plan_build", pvl_plan_build(F.plan, dup, 2, NULL));
  BAD(UNK, "pvl_plan_build", pvl_plan_build(F.plan, st, 2, NULL));
  BAD(INV, "pvl_plan_get_info", pvl_plan_get_info(F.plan, NULL));
  fixture_fini(&F);
}

Test(api, plan_kernels_bad_input) {
  fixture F;
  fixture_init(&F);
  float q[2 * HQ * D], out[2 * HQ * D], kv[2 * HKV * D];
  memset(q, 0, sizeof(q));
  memset(kv, 0, sizeof(kv));
  tu_poison(PVL_DTYPE_F32, out, 2 * HQ * D);
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, NULL, out, 0.0f, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, NULL, 0.0f, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, L, q, out, 0.0f, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, NAN, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, -1.0f, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, -FLT_MIN, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, INFINITY, NULL));
  BAD(INV, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, -INFINITY, NULL));
  for (int i = 0; i < 2 * HQ * D; i++) cr_assert(isnan(out[i]), "out written");

  BAD(INV, "pvl_plan_kv_write", pvl_plan_kv_write(F.plan, 0, NULL, kv, NULL));
  BAD(INV, "pvl_plan_kv_write", pvl_plan_kv_write(F.plan, 0, kv, NULL, NULL));
  BAD(INV, "pvl_plan_kv_write", pvl_plan_kv_write(F.plan, L, kv, kv, NULL));
  /* Row 1 (b) ends in a block shared with f. */
  BAD(PVL_ERR_BAD_STATE, "pvl_plan_kv_write",
      pvl_plan_kv_write(F.plan, 0, kv, kv, NULL));

  /* A stale plan: a batch member appended without a rebuild. */
  TU_OK(F.c, pvl_seq_append(F.c, &F.a, 1, NULL));
  BAD(PVL_ERR_BAD_STATE, "pvl_attention_decode",
      pvl_attention_decode(F.plan, 0, q, out, 0.0f, NULL));
  BAD(PVL_ERR_BAD_STATE, "pvl_plan_kv_write",
      pvl_plan_kv_write(F.plan, 1, kv, kv, NULL));
  fixture_fini(&F);
}

/* Valid scales at the edges of "finite and > 0" are accepted. */
Test(api, attention_accepts_every_finite_positive_scale) {
  fixture F;
  fixture_init(&F);
  float q[2 * HQ * D], out[2 * HQ * D];
  memset(q, 0, sizeof(q));
  const float scales[] = {0.0f, -0.0f, FLT_MIN, 1e-45f, 1.0f, 1e30f, FLT_MAX};
  for (size_t i = 0; i < sizeof(scales) / sizeof(scales[0]); i++) {
    pvl_status st = pvl_attention_decode(F.plan, 0, q, out, scales[i], NULL);
    cr_expect_eq(st, PVL_SUCCESS, "scale %g: %s (%s)", (double)scales[i],
                 pvl_status_string(st), pvl_cache_last_error(F.c));
  }
  fixture_fini(&F);
}

Test(api, backend_available) {
  int yes = -1;
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_CPU, 0, &yes), PVL_SUCCESS);
  cr_assert_eq(yes, 1);
  yes = -1;
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_AUTO, 0, &yes), PVL_SUCCESS);
  cr_assert_eq(yes, 1);
  yes = -1;
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_CUDA, 0, &yes), PVL_SUCCESS);
  if (pvl__cuda_backend() == NULL) cr_assert_eq(yes, 0, "built without CUDA");
  cr_assert(yes == 0 || yes == 1);
  /* A device index that cannot exist is never available. */
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_CUDA, -1, &yes), PVL_SUCCESS);
  cr_assert_eq(yes, 0);
  /* Agrees with what creation says. */
  pvl_config cfg = tu_config(1, 4, 4, 64, 16, 8, PVL_DTYPE_F16);
  cfg.backend = PVL_BACKEND_CUDA;
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_CUDA, 0, &yes), PVL_SUCCESS);
  pvl_cache *c = NULL;
  pvl_status st = pvl_cache_create(&cfg, &c);
  cr_assert_eq(st == PVL_SUCCESS, yes == 1, "available %d, create %s", yes,
               pvl_status_string(st));
  pvl_cache_destroy(c);
  cr_assert_eq(pvl_backend_available((pvl_backend)7, 0, &yes),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_backend_available(PVL_BACKEND_CPU, 0, NULL),
               PVL_ERR_INVALID_ARGUMENT);
}
