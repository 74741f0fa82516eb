/* Out-of-memory injection through config.allocator (libuv's loop_init_oom):
 * for every call that allocates, fail the N-th allocation for N = 0, 1, 2,
 * ... until the call succeeds. Every failing run must return
 * PVL_ERR_NO_MEMORY and change nothing observable, and once everything is
 * destroyed the allocator must hold no live allocation (and every free must
 * have passed the size and alignment of its allocation). Each case runs
 * twice: failing only the N-th allocation, and failing every allocation
 * from the N-th on. */
#include <math.h>
#include <stdlib.h>

#include "testutil.h"

typedef struct ctx {
  tu_alloc ta;
  pvl_config cfg;
  pvl_cache *c;
  pvl_seq_id s[8];
  uint32_t ns;
  pvl_plan *plan;
  pvl_seq_id batch[16];
  uint32_t nbatch;
  pvl_seq_id out_id;
  pvl_cache *out_cache;
  pvl_plan *out_plan;
  float *q, *out;
  size_t n_out;
} ctx;

typedef struct oom_case {
  const char *name;
  void (*setup)(ctx *x);
  pvl_status (*call)(ctx *x);
  void (*check_success)(ctx *x);
} oom_case;

static void tags(ctx *x, pvl_seq_id s, uint32_t layer, uint32_t n, float base) {
  float *t = malloc((n + 1) * sizeof(float));
  for (uint32_t i = 0; i < n; i++) t[i] = base + (float)i;
  TU_OK(x->c, tu_write_tags(x->c, s, layer, 0, n, t));
  free(t);
}

static void new_cache(ctx *x, uint32_t L, uint32_t hq, uint32_t hkv, uint32_t d,
                      uint32_t bs, uint32_t nb) {
  x->cfg = tu_config(L, hq, hkv, d, bs, nb, PVL_DTYPE_F32);
  x->cfg.allocator = &x->ta.a;
  x->c = tu_cache_new(&x->cfg);
}

static void teardown(ctx *x) {
  if (x->out_plan) pvl_plan_destroy(x->out_plan);
  if (x->plan) pvl_plan_destroy(x->plan);
  if (x->out_cache) pvl_cache_destroy(x->out_cache);
  pvl_cache_destroy(x->c);
  free(x->q);
  free(x->out);
}

static void run_case(const oom_case *oc, bool after) {
  long n;
  for (n = 0;; n++) {
    cr_assert_lt(n, 10000, "%s: the call never succeeds", oc->name);
    ctx x;
    memset(&x, 0, sizeof(x));
    x.out_id = 0xabcdef;
    tu_alloc_init(&x.ta);
    oc->setup(&x);
    tu_snap *before = x.c ? tu_snap_take(x.c, x.s, x.ns, true) : NULL;
    pvl_plan_info pinfo;
    int32_t *pbuf = NULL;
    size_t pelems = 0;
    if (x.plan) {
      TU_OK(x.c, pvl_plan_get_info(x.plan, &pinfo));
      pelems = (size_t)pvl_plan_buf_elems(x.plan->view.num_layers,
                                          x.plan->view.max_seqs,
                                          x.plan->view.block_cap);
      pbuf = malloc(pelems * sizeof(int32_t));
      memcpy(pbuf, x.plan->view.buf, pelems * sizeof(int32_t));
    }
    if (x.out) tu_poison(PVL_DTYPE_F32, x.out, x.n_out);

    tu_alloc_arm(&x.ta, n, after);
    pvl_status st = oc->call(&x);
    const long failed = x.ta.failures;
    tu_alloc_disarm(&x.ta);

    if (failed == 0) {
      /* Allocation n was never reached: the call ran to completion. */
      cr_assert_eq(st, PVL_SUCCESS, "%s: %s without an injected failure (%s)",
                   oc->name, pvl_status_string(st),
                   x.c ? pvl_cache_last_error(x.c) : pvl_create_last_error());
      oc->check_success(&x);
      if (x.c) TU_CHECK(x.c);
    } else {
      const char *msg =
          x.c ? pvl_cache_last_error(x.c) : pvl_create_last_error();
      cr_assert_eq(st, PVL_ERR_NO_MEMORY,
                   "%s: allocation %ld failed (%s), the call returned %s (%s)",
                   oc->name, n, after ? "and all later" : "only",
                   pvl_status_string(st), msg);
      cr_assert(strlen(msg) > 0, "%s: no error message", oc->name);
      /* Freed memory holds 0x5a bytes (testutil.c): a value made of them
       * in the message was read after its free. */
      cr_assert(!strstr(msg, "1515870810") && !strstr(msg, "5a5a5a5a"),
                "%s (n = %ld): the message shows freed memory (0x5a5a5a5a), "
                "read after free: \"%s\"",
                oc->name, n, msg);
      cr_assert_eq(x.out_id, 0xabcdef, "%s: out written on failure", oc->name);
      cr_assert_null(x.out_cache, "%s: out written on failure", oc->name);
      cr_assert_null(x.out_plan, "%s: out written on failure", oc->name);
      if (x.c) {
        TU_CHECK(x.c);
        TU_UNCHANGED(x.c, before, x.s, x.ns, true);
      }
      if (x.plan) {
        pvl_plan_info now;
        TU_OK(x.c, pvl_plan_get_info(x.plan, &now));
        cr_assert_arr_eq(&now, &pinfo, sizeof(now), "%s: plan info changed",
                         oc->name);
        cr_assert_arr_eq(pbuf, x.plan->view.buf, pelems * sizeof(int32_t),
                         "%s: plan buffer changed", oc->name);
      }
      if (x.out)
        for (size_t i = 0; i < x.n_out; i++)
          cr_assert(isnan(x.out[i]), "%s: output written on failure", oc->name);
    }
    free(pbuf);
    tu_snap_free(before);
    teardown(&x);
    tu_alloc_flush(&x.ta);
    cr_assert_eq(x.ta.errors, 0, "%s (n = %ld): allocator misuse: %s", oc->name,
                 n, x.ta.err);
    cr_assert_eq(x.ta.live, 0,
                 "%s (n = %ld): %ld allocations (%zu bytes) "
                 "leaked",
                 oc->name, n, x.ta.live, x.ta.live_bytes);
    if (failed == 0) break;
  }
  cr_assert_gt(n, 0, "%s: the call made no allocation to fail", oc->name);
  cr_log_info("%s (%s): %ld allocation points", oc->name,
              after ? "fail from N on" : "fail the N-th", n);
}

/* ---- pvl_cache_create ---- */

static void create_setup(ctx *x) {
  x->cfg = tu_config(3, 4, 2, 8, 4, 32, PVL_DTYPE_F16);
  x->cfg.allocator = &x->ta.a;
}
static pvl_status create_call(ctx *x) {
  return pvl_cache_create(&x->cfg, &x->out_cache);
}
static void create_ok(ctx *x) {
  cr_assert_not_null(x->out_cache);
  pvl_stats s = tu_stats(x->out_cache);
  cr_assert_eq(s.num_blocks, 32);
  cr_assert_eq(s.free_blocks, 32);
  pvl_seq_id id = tu_add(x->out_cache, 9);
  (void)id;
  TU_CHECK(x->out_cache);
}

/* ---- pvl_seq_add ---- */

static void add_setup(ctx *x) {
  new_cache(x, 4, 1, 1, 2, 4, 64);
  x->s[0] = tu_add(x->c, 6);
  tags(x, x->s[0], 0, 6, 1);
  x->ns = 1;
}
static pvl_status add_call(ctx *x) {
  const pvl_span sp[2] = {{1, 3}, {5, 12}};
  return pvl_seq_add(x->c, 13, sp, 2, &x->out_id);
}
static void add_ok(ctx *x) {
  cr_assert_eq(tu_layer_tokens(x->c, x->out_id, 3), 13);
  cr_assert_eq(tu_free_blocks(x->c), 64 - 4 * 2 - 4 * 4);
  pvl_span sp[2];
  uint32_t n = 0;
  TU_OK(x->c, pvl_seq_visual_spans(x->c, x->out_id, sp, 2, &n));
  cr_assert_eq(n, 2);
  cr_assert_eq(sp[1].end, 12);
}

/* ---- pvl_seq_fork (a parent with position maps in some layers) ---- */

static void fork_setup(ctx *x) {
  new_cache(x, 3, 1, 1, 2, 4, 64);
  const pvl_span sp = {0, 2};
  TU_OK(x->c, pvl_seq_add(x->c, 10, &sp, 1, &x->s[0]));
  for (uint32_t l = 0; l < 3; l++) tags(x, x->s[0], l, 10, 100 * l);
  const uint32_t keep[] = {1, 4, 5, 9};
  TU_OK(x->c, pvl_seq_retain(x->c, x->s[0], 1, keep, 4, NULL));
  x->ns = 1;
}
static pvl_status fork_call(ctx *x) {
  return pvl_seq_fork(x->c, x->s[0], &x->out_id);
}
static void fork_ok(ctx *x) {
  uint32_t pos[4], n = 0;
  TU_OK(x->c, pvl_seq_positions(x->c, x->out_id, 1, pos, 4, &n));
  cr_assert_eq(n, 4);
  cr_assert_eq(pos[3], 9);
  float t[10];
  TU_OK(x->c, tu_read_tags(x->c, x->out_id, 2, 0, 10, t));
  cr_assert_eq(t[9], 209);
  cr_assert_eq(tu_stats(x->c).shared_blocks, tu_stats(x->c).used_blocks);
}

/* ---- pvl_seq_append: table growth, position-map growth, copy-on-write,
 * all in one batch ---- */

static void append_setup(ctx *x) {
  new_cache(x, 3, 1, 1, 2, 2, 256);
  pvl_cache *c = x->c;
  /* a: layer 1 gets a position map, then fills it to its capacity
   * (n_keep + 16 entries). */
  pvl_seq_id a = tu_add(c, 12);
  for (uint32_t l = 0; l < 3; l++) tags(x, a, l, 12, 100 * l);
  uint32_t keep[11];
  for (uint32_t i = 0; i < 11; i++) keep[i] = i + 1;
  TU_OK(c, pvl_seq_retain(c, a, 1, keep, 11, NULL));
  for (int i = 0; i < 16; i++) TU_OK(c, pvl_seq_append(c, &a, 1, NULL));
  /* b: its block tables are exactly full at a block boundary. */
  pvl_seq_id b = tu_add(c, 10); /* 5 blocks, room for 9 */
  for (uint32_t l = 0; l < 3; l++) tags(x, b, l, 10, 1000 + 100 * l);
  for (int i = 0; i < 8; i++) TU_OK(c, pvl_seq_append(c, &b, 1, NULL));
  /* d and its fork f share a partial last block. */
  pvl_seq_id d = tu_add(c, 5);
  for (uint32_t l = 0; l < 3; l++) tags(x, d, l, 5, 2000 + 100 * l);
  pvl_seq_id f = 0;
  TU_OK(c, pvl_seq_fork(c, d, &f));
  x->s[0] = a;
  x->s[1] = b;
  x->s[2] = d;
  x->s[3] = f;
  x->ns = 4;
  x->batch[0] = f;
  x->batch[1] = a;
  x->batch[2] = b;
  x->nbatch = 3;
  /* The setup really is at the growth points. */
  pvl_seq *sa = pvl__seq_get(c, a), *sb = pvl__seq_get(c, b);
  cr_assert_not_null(sa->tables[1].pos);
  cr_assert_eq(sa->tables[1].n_tokens, sa->tables[1].cap_pos);
  cr_assert_eq(sb->tables[0].n_blocks, sb->tables[0].cap_blocks);
  cr_assert_eq(sb->tables[0].n_tokens % 2, 0);
}
static pvl_status append_call(ctx *x) {
  return pvl_seq_append(x->c, x->batch, x->nbatch, NULL);
}
static void append_ok(ctx *x) {
  pvl_cache *c = x->c;
  cr_assert_eq(tu_layer_tokens(c, x->s[0], 1), 28);
  cr_assert_eq(tu_layer_tokens(c, x->s[1], 0), 19);
  cr_assert_eq(tu_layer_tokens(c, x->s[3], 2), 6);
  uint32_t pos[28], n = 0;
  TU_OK(c, pvl_seq_positions(c, x->s[0], 1, pos, 28, &n));
  for (uint32_t i = 0; i < 11; i++) cr_assert_eq(pos[i], i + 1);
  for (uint32_t i = 11; i < 28; i++) cr_assert_eq(pos[i], 12 + (i - 11));
  float t[10];
  TU_OK(c, tu_read_tags(c, x->s[1], 2, 0, 10, t));
  for (int i = 0; i < 10; i++) cr_assert_eq(t[i], 1200 + i);
  TU_OK(c, tu_read_tags(c, x->s[3], 1, 0, 5, t));
  for (int i = 0; i < 5; i++) cr_assert_eq(t[i], 2100 + i);
  int32_t fb[3], db[3];
  tu_blocks(c, x->s[3], 0, fb, 3);
  tu_blocks(c, x->s[2], 0, db, 3);
  cr_assert_neq(fb[2], db[2], "copy-on-write did not copy");
}

/* The first append of a fresh cache (scratch allocation). */
static void append1_setup(ctx *x) {
  new_cache(x, 2, 1, 1, 2, 4, 16);
  x->s[0] = tu_add(x->c, 4);
  x->ns = 1;
}
static pvl_status append1_call(ctx *x) {
  return pvl_seq_append(x->c, x->s, 1, NULL);
}
static void append1_ok(ctx *x) {
  cr_assert_eq(tu_layer_tokens(x->c, x->s[0], 1), 5);
}

/* ---- pvl_seq_retain ---- */

static void retain_setup(ctx *x) {
  new_cache(x, 2, 1, 1, 2, 4, 64);
  x->s[0] = tu_add(x->c, 40);
  tags(x, x->s[0], 0, 40, 0);
  tags(x, x->s[0], 1, 40, 500);
  TU_OK(x->c, pvl_seq_fork(x->c, x->s[0], &x->s[1]));
  x->ns = 2;
}
static const uint32_t retain_keep[] = {0, 1, 2, 3, 4, 5, 9, 17, 18, 30, 39};
static pvl_status retain_call(ctx *x) {
  return pvl_seq_retain(x->c, x->s[0], 1, retain_keep, 11, NULL);
}
static void retain_ok(ctx *x) {
  float t[40];
  TU_OK(x->c, tu_read_tags(x->c, x->s[0], 1, 0, 11, t));
  for (int i = 0; i < 11; i++) cr_assert_eq(t[i], 500 + retain_keep[i]);
  TU_OK(x->c, tu_read_tags(x->c, x->s[1], 1, 0, 40, t));
  for (int i = 0; i < 40; i++) cr_assert_eq(t[i], 500 + i);
}

/* A second retain of a layer that already has a position map. */
static void retain2_setup(ctx *x) {
  retain_setup(x);
  TU_OK(x->c, retain_call(x));
}
static pvl_status retain2_call(ctx *x) {
  const uint32_t keep[] = {1, 7, 10};
  return pvl_seq_retain(x->c, x->s[0], 1, keep, 3, NULL);
}
static void retain2_ok(ctx *x) {
  uint32_t pos[3], n = 0;
  TU_OK(x->c, pvl_seq_positions(x->c, x->s[0], 1, pos, 3, &n));
  cr_assert_eq(pos[0], 1);
  cr_assert_eq(pos[1], 17);
  cr_assert_eq(pos[2], 39);
}

/* ---- pvl_plan_create ---- */

static void plan_create_setup(ctx *x) {
  new_cache(x, 3, 4, 2, 8, 4, 64);
  x->s[0] = tu_add(x->c, 5);
  x->ns = 1;
}
static pvl_status plan_create_call(ctx *x) {
  return pvl_plan_create(x->c, 4, 0, &x->out_plan);
}
static void plan_create_ok(ctx *x) {
  cr_assert_not_null(x->out_plan);
  TU_OK(x->c, pvl_plan_build(x->out_plan, x->s, 1, NULL));
  tu_check_plan_rows(x->c, x->out_plan, x->s, 1);
}

/* ---- pvl_plan_build with growth of the update staging ---- */

static void plan_build_setup_common(ctx *x, bool prior_build) {
  /* 8 sequences x 4 layers x (40 ids + 2) > the 1024 staged pairs a plan
   * starts with. */
  new_cache(x, 4, 2, 1, 4, 1, 2048);
  tu_rng r;
  tu_rng_init(&r, 7);
  for (uint32_t i = 0; i < 8; i++) {
    x->s[i] = tu_add(x->c, 40);
    for (uint32_t l = 0; l < 4; l++) {
      float k[40 * 4], v[40 * 4];
      tu_fill(&r, PVL_DTYPE_F32, -1, 1, k, NULL, 160);
      tu_fill(&r, PVL_DTYPE_F32, -1, 1, v, NULL, 160);
      TU_OK(x->c, pvl_kv_write(x->c, x->s[i], l, 0, 40, k, v, NULL));
    }
  }
  x->ns = 8;
  TU_OK(x->c, pvl_plan_create(x->c, 8, 0, &x->plan));
  if (prior_build) TU_OK(x->c, pvl_plan_build(x->plan, x->s, 2, NULL));
  for (uint32_t i = 0; i < 8; i++) x->batch[i] = x->s[7 - i];
  x->nbatch = 8;
}
static void plan_build_setup(ctx *x) { plan_build_setup_common(x, true); }
static void plan_build_fresh_setup(ctx *x) {
  plan_build_setup_common(x, false);
}
static pvl_status plan_build_call(ctx *x) {
  return pvl_plan_build(x->plan, x->batch, x->nbatch, NULL);
}
static void plan_build_ok(ctx *x) {
  tu_check_plan_rows(x->c, x->plan, x->batch, x->nbatch);
  pvl_plan_info info;
  TU_OK(x->c, pvl_plan_get_info(x->plan, &info));
  cr_assert_gt(info.last_update_entries, 1024);
  float q[8 * 2 * 4], out[8 * 2 * 4];
  memset(q, 0, sizeof(q));
  TU_OK(x->c, pvl_attention_decode(x->plan, 3, q, out, 0.0f, NULL));
}

/* ---- pvl_attention_decode (scratch growth for a long row) ---- */

static void attention_setup(ctx *x) {
  new_cache(x, 1, 4, 2, 8, 16, 256);
  tu_rng r;
  tu_rng_init(&r, 11);
  x->s[0] = tu_add(x->c, 3000);
  x->s[1] = tu_add(x->c, 7);
  x->ns = 2;
  for (uint32_t i = 0; i < 2; i++) {
    uint32_t n = tu_layer_tokens(x->c, x->s[i], 0);
    float *k = malloc((size_t)n * 16 * sizeof(float));
    float *v = malloc((size_t)n * 16 * sizeof(float));
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, k, NULL, (size_t)n * 16);
    tu_fill(&r, PVL_DTYPE_F32, -1, 1, v, NULL, (size_t)n * 16);
    TU_OK(x->c, pvl_kv_write(x->c, x->s[i], 0, 0, n, k, v, NULL));
    free(k);
    free(v);
  }
  TU_OK(x->c, pvl_plan_create(x->c, 2, 0, &x->plan));
  TU_OK(x->c, pvl_plan_build(x->plan, x->s, 2, NULL));
  x->n_out = 2 * 4 * 8;
  x->q = malloc(x->n_out * sizeof(float));
  x->out = malloc(x->n_out * sizeof(float));
  tu_fill(&r, PVL_DTYPE_F32, -1, 1, x->q, NULL, x->n_out);
}
static pvl_status attention_call(ctx *x) {
  return pvl_attention_decode(x->plan, 0, x->q, x->out, 0.0f, NULL);
}
static void attention_ok(ctx *x) {
  for (uint32_t b = 0; b < 2; b++) {
    uint32_t n = tu_layer_tokens(x->c, x->s[b], 0);
    float *k = malloc((size_t)n * 16 * sizeof(float));
    float *v = malloc((size_t)n * 16 * sizeof(float));
    TU_OK(x->c, pvl_kv_read(x->c, x->s[b], 0, 0, n, k, v, NULL));
    double ref[32];
    tu_ref_attention(x->q + b * 32, k, v, n, 4, 2, 8, 1.0 / sqrt(8.0), ref);
    for (int i = 0; i < 32; i++)
      cr_assert(fabs(x->out[b * 32 + i] - ref[i]) <= 1e-5 + 1e-5 * fabs(ref[i]),
                "row %u elem %d", b, i);
    free(k);
    free(v);
  }
}

static const oom_case cases[] = {
    {"pvl_cache_create", create_setup, create_call, create_ok},
    {"pvl_seq_add", add_setup, add_call, add_ok},
    {"pvl_seq_fork", fork_setup, fork_call, fork_ok},
    {"pvl_seq_append (growth, positions, copy-on-write)", append_setup,
     append_call, append_ok},
    {"pvl_seq_append (first)", append1_setup, append1_call, append1_ok},
    {"pvl_seq_retain", retain_setup, retain_call, retain_ok},
    {"pvl_seq_retain (position map)", retain2_setup, retain2_call, retain2_ok},
    {"pvl_plan_create", plan_create_setup, plan_create_call, plan_create_ok},
    {"pvl_plan_build (staging growth)", plan_build_setup, plan_build_call,
     plan_build_ok},
    {"pvl_plan_build (first build)", plan_build_fresh_setup, plan_build_call,
     plan_build_ok},
    {"pvl_attention_decode", attention_setup, attention_call, attention_ok},
};

#define OOM_TEST(idx, tname)                                                   \
  Test(oom, tname##_nth) { run_case(&cases[idx], false); }                     \
  Test(oom, tname##_from_nth) { run_case(&cases[idx], true); }

OOM_TEST(0, cache_create)
OOM_TEST(1, seq_add)
OOM_TEST(2, seq_fork)
OOM_TEST(3, seq_append_growth_and_cow)
OOM_TEST(4, seq_append_first)
OOM_TEST(5, seq_retain)
OOM_TEST(6, seq_retain_position_map)
OOM_TEST(7, plan_create)
OOM_TEST(8, plan_build_staging_growth)
OOM_TEST(9, plan_build_first)
OOM_TEST(10, attention_decode)

/* The allocator itself can catch what it is meant to catch. */
Test(oom, test_allocator_detects_leaks_and_bad_frees) {
  tu_alloc ta;
  tu_alloc_init(&ta);
  void *p = ta.a.alloc(ta.a.ctx, 100, 16);
  void *q = ta.a.alloc(ta.a.ctx, 64, 64);
  cr_assert_eq((uintptr_t)q % 64, 0);
  cr_assert_eq(ta.live, 2);
  cr_assert_eq(ta.live_bytes, 164);
  ta.a.free(ta.a.ctx, p, 99, 16); /* wrong size */
  cr_assert_eq(ta.errors, 1);
  cr_assert_eq(ta.live, 1);
  tu_alloc_arm(&ta, 1, false);
  void *a = ta.a.alloc(ta.a.ctx, 8, 16);
  void *b = ta.a.alloc(ta.a.ctx, 8, 16);
  void *d = ta.a.alloc(ta.a.ctx, 8, 16);
  cr_assert_not_null(a);
  cr_assert_null(b);
  cr_assert_not_null(d);
  cr_assert_eq(ta.failures, 1);
  ta.a.free(ta.a.ctx, a, 8, 16);
  ta.a.free(ta.a.ctx, d, 8, 16);
  ta.a.free(ta.a.ctx, q, 64, 64);
  cr_assert_eq(ta.live, 0);
  cr_assert_eq(ta.live_bytes, 0);
  tu_alloc_flush(&ta);
}
