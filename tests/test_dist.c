/* A model's cache split over ranks, with the in-process communicator on the
 * CPU backend (one thread per rank): budgets and selections agree on every
 * rank and equal those of one cache over the whole model, for 1, 2, 3, 4
 * and 8 ranks, split by layers and by heads, in f32, f16 and bf16;
 * attention outputs match; admission and append decisions agree near pool
 * exhaustion; a failure on one rank makes every rank fail with nothing
 * changed; collectives called out of order or with different arguments
 * fail clearly on every rank. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pagedvl.h"
#include "testutil.h"

/* ---- running one function per rank, each on its own thread ---- */

#define MAX_RANKS 8
#define ERR_LEN 768

typedef struct rank_ctx {
  uint32_t rank, nranks;
  pvl_comm *comm;
  void *arg;
  char err[ERR_LEN]; /* first failure of this rank, "" if none */
} rank_ctx;

typedef void (*rank_fn)(rank_ctx *rc);

typedef struct thread_arg {
  rank_ctx *rc;
  rank_fn fn;
} thread_arg;

static void *thread_main(void *p) {
  thread_arg *ta = p;
  ta->fn(ta->rc);
  return NULL;
}

/* Criterion's assertions must run on the test's own thread: the ranks
 * record their first failure, the test asserts after joining. */
static void rfail(rank_ctx *rc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void rfail(rank_ctx *rc, const char *fmt, ...) {
  if (rc->err[0]) return;
  int n = snprintf(rc->err, ERR_LEN, "rank %u/%u: ", rc->rank, rc->nranks);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(rc->err + n, ERR_LEN - (size_t)n, fmt, ap);
  va_end(ap);
}

#define RCHECK(rc, cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) {                                                             \
      rfail((rc), __VA_ARGS__);                                                \
      return;                                                                  \
    }                                                                          \
  } while (0)

#define ROK(rc, cache, call)                                                   \
  do {                                                                         \
    pvl_status r_st_ = (call);                                                 \
    RCHECK(rc, r_st_ == PVL_SUCCESS, "line %d: %s -> %s (%s | %s)", __LINE__,  \
           #call, pvl_status_string(r_st_),                                    \
           (cache) ? pvl_cache_last_error(cache) : "",                         \
           pvl_create_last_error());                                           \
  } while (0)

/* Runs fn on n ranks of a fresh in-process communicator and asserts that
 * no rank failed. ctx receives the ranks' contexts (arg set on each). A
 * rank that stops early leaves the others waiting in their next
 * collective: ctest's TIMEOUT on test_dist ends such a failure (not
 * Criterion's per-test .timeout, whose bookkeeping Criterion 2.4.1 leaks
 * when timed tests run in parallel, which fails the ASan build). */
/* Set by a test: the ranks run through pvl_run_ranks from the test's own
 * thread (one thread driving every rank) instead of threads made here. */
static bool g_one_thread;

typedef struct drive {
  rank_ctx *ctx;
  rank_fn fn;
} drive;

static pvl_status drive_rank(void *arg, uint32_t r) {
  drive *dv = arg;
  dv->fn(&dv->ctx[r]);
  return dv->ctx[r].err[0] ? PVL_ERR_INTERNAL : PVL_SUCCESS;
}

static void run_ranks(uint32_t n, rank_fn fn, void *const *args,
                      rank_ctx *ctx) {
  pvl_comm *comms[MAX_RANKS];
  cr_assert_eq(pvl_comm_create_local(n, comms), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  pthread_t th[MAX_RANKS];
  thread_arg ta[MAX_RANKS];
  for (uint32_t r = 0; r < n; r++) {
    memset(&ctx[r], 0, sizeof(ctx[r]));
    ctx[r].rank = r;
    ctx[r].nranks = n;
    ctx[r].comm = comms[r];
    ctx[r].arg = args ? args[r] : NULL;
    ta[r].rc = &ctx[r];
    ta[r].fn = fn;
    if (!g_one_thread)
      cr_assert_eq(pthread_create(&th[r], NULL, thread_main, &ta[r]), 0);
  }
  if (g_one_thread) {
    drive dv = {ctx, fn};
    pvl_status sts[MAX_RANKS];
    pvl_status st = pvl_run_ranks(n, drive_rank, &dv, sts);
    for (uint32_t r = 0; r < n; r++)
      cr_assert_eq(sts[r], ctx[r].err[0] ? PVL_ERR_INTERNAL : PVL_SUCCESS);
    for (uint32_t r = 0; r < n && st == PVL_SUCCESS; r++)
      cr_assert_eq(ctx[r].err[0], '\0');
  } else {
    for (uint32_t r = 0; r < n; r++) pthread_join(th[r], NULL);
  }
  for (uint32_t r = 0; r < n; r++) pvl_comm_destroy(comms[r]);
  for (uint32_t r = 0; r < n; r++)
    cr_assert_eq(ctx[r].err[0], '\0', "%s", ctx[r].err);
}

/* ---- one model, its data, and a single cache over all of it ---- */

#define LG 8  /* model layers */
#define HQ 16 /* model query heads */
#define HKV 8 /* model KV heads */
#define GRP (HQ / HKV)
#define HD 16   /* head_dim */
#define BS 8    /* block_size */
#define MP 75   /* prompt tokens */
#define VIS_B 4 /* visual span [VIS_B, VIS_E) */
#define VIS_E 56
#define NB 1024 /* blocks per pool */

typedef struct model {
  pvl_dtype dt;
  size_t es;
  pvl_policy pol;
  uint32_t rows_first, rows_n;
  void *k[LG], *v[LG]; /* [MP + 1][HKV][HD]: prompt and one decode token */
  void *qo[LG];        /* [rows_n][HQ][HD] observation queries */
  void *qd[LG];        /* [HQ][HD] decode query */
  /* The single cache's results. */
  uint32_t budget[LG];
  uint32_t npos[LG];
  uint32_t pos[LG][MP + 2];
  void *out[LG]; /* [HQ][HD] */
} model;

static void model_init(model *M, pvl_dtype dt, uint64_t seed) {
  memset(M, 0, sizeof(*M));
  M->dt = dt;
  M->es = pvl_dtype_size(dt);
  cr_assert_eq(pvl_policy_init(&M->pol, PVL_POLICY_VLCACHE), PVL_SUCCESS);
  M->pol.keep_ratio = 0.3f;
  /* The post-vision window: every prompt token after the visual span. */
  M->rows_first = VIS_E;
  M->rows_n = MP - VIS_E;
  tu_rng r;
  tu_rng_init(&r, seed);
  for (uint32_t l = 0; l < LG; l++) {
    const size_t nkv = (size_t)(MP + 1) * HKV * HD;
    M->k[l] = malloc(nkv * M->es);
    M->v[l] = malloc(nkv * M->es);
    M->qo[l] = malloc((size_t)M->rows_n * HQ * HD * M->es);
    M->qd[l] = malloc((size_t)HQ * HD * M->es);
    M->out[l] = malloc((size_t)HQ * HD * M->es);
    tu_fill(&r, dt, -1.0f, 1.0f, NULL, M->k[l], nkv);
    tu_fill(&r, dt, -1.0f, 1.0f, NULL, M->v[l], nkv);
    /* Sharper queries in later layers: the layers' sparsities differ, so
     * VL-Cache's budgets differ per layer. */
    const float s = 0.5f + 1.5f * (float)l;
    tu_fill(&r, dt, -s, s, NULL, M->qo[l], (size_t)M->rows_n * HQ * HD);
    tu_fill(&r, dt, -s, s, NULL, M->qd[l], (size_t)HQ * HD);
  }
}

static void model_fini(model *M) {
  for (uint32_t l = 0; l < LG; l++) {
    free(M->k[l]);
    free(M->v[l]);
    free(M->qo[l]);
    free(M->qd[l]);
    free(M->out[l]);
  }
}

/* Copies KV heads [h0, h0 + nh) of n rows of [HKV][HD] (or query heads of
 * [HQ][HD] with heads = HQ) into a packed buffer. */
static void *slice_heads(const model *M, const void *src, uint32_t n,
                         uint32_t heads, uint32_t h0, uint32_t nh) {
  const size_t row = (size_t)heads * HD * M->es, part = (size_t)nh * HD * M->es;
  char *dst = malloc((size_t)n * part + 1);
  for (uint32_t i = 0; i < n; i++)
    memcpy(dst + i * part,
           (const char *)src + i * row + (size_t)h0 * HD * M->es, part);
  return dst;
}

/* The whole per-rank flow on a cache holding layers [l0, l0 + nl) and KV
 * heads [h0, h0 + nh): admission, prefill, observation, compression, one
 * decode step. Budgets, kept positions and outputs land in the
 * global-indexed arrays (outputs: only this cache's heads). */
typedef struct flow_out {
  uint32_t budget[LG];
  uint32_t npos[LG];
  uint32_t pos[LG][MP + 2];
  uint64_t seq;
  void *out[LG]; /* [HQ][HD], this cache's heads filled */
} flow_out;

static pvl_status flow(pvl_cache *c, const model *M, uint32_t l0, uint32_t nl,
                       uint32_t h0, uint32_t nh, flow_out *fo, char *why,
                       size_t why_len) {
#define STEP(call)                                                             \
  do {                                                                         \
    pvl_status f_st_ = (call);                                                 \
    if (f_st_ != PVL_SUCCESS) {                                                \
      snprintf(why, why_len, "%s -> %s (%s)", #call, pvl_status_string(f_st_), \
               pvl_cache_last_error(c));                                       \
      goto done;                                                               \
    }                                                                          \
  } while (0)
  const uint32_t nq = nh * GRP;
  pvl_status st = PVL_SUCCESS;
  pvl_plan *plan = NULL;
  void *qs = NULL, *ks = NULL, *vs = NULL;
  uint32_t budget[LG];
  pvl_span vis = {VIS_B, VIS_E};
  pvl_seq_id seq = 0;
  STEP(st = pvl_seq_add(c, MP, &vis, 1, &seq));
  fo->seq = seq;
  uint32_t first = 0, n = 0, fb = 0;
  STEP(st = pvl_policy_rows(&M->pol, c, seq, &first, &n, &fb));
  if (first != M->rows_first || n != M->rows_n || fb) {
    snprintf(why, why_len, "policy rows [%u, +%u) fallback %u", first, n, fb);
    st = PVL_ERR_INTERNAL;
    goto done;
  }
  for (uint32_t l = 0; l < nl; l++) {
    const uint32_t g = l0 + l;
    ks = slice_heads(M, M->k[g], MP, HKV, h0, nh);
    vs = slice_heads(M, M->v[g], MP, HKV, h0, nh);
    qs = slice_heads(M, M->qo[g], n, HQ, h0 * GRP, nq);
    STEP(st = pvl_kv_write(c, seq, l, 0, MP, ks, vs, NULL));
    STEP(st = pvl_observe(c, seq, l, qs, first, n, M->pol.threshold, 0.0f,
                          NULL));
    free(ks), free(vs), free(qs);
    ks = vs = qs = NULL;
  }
  pvl_compress_report rep;
  memset(&rep, 0, sizeof(rep));
  rep.budget = budget;
  STEP(st = pvl_compress(c, seq, &M->pol, &rep, NULL));
  for (uint32_t l = 0; l < nl; l++) {
    fo->budget[l0 + l] = budget[l];
    STEP(st = pvl_seq_positions(c, seq, l, fo->pos[l0 + l], MP + 2,
                                &fo->npos[l0 + l]));
  }
  /* One decode step: append, write the new token, attend. */
  STEP(st = pvl_seq_append(c, &seq, 1, NULL));
  STEP(st = pvl_plan_create(c, 1, 0, &plan));
  STEP(st = pvl_plan_build(plan, &seq, 1, NULL));
  for (uint32_t l = 0; l < nl; l++) {
    const uint32_t g = l0 + l;
    const size_t tok = (size_t)MP * HKV * HD * M->es;
    ks = slice_heads(M, (const char *)M->k[g] + tok, 1, HKV, h0, nh);
    vs = slice_heads(M, (const char *)M->v[g] + tok, 1, HKV, h0, nh);
    qs = slice_heads(M, M->qd[g], 1, HQ, h0 * GRP, nq);
    void *o = malloc((size_t)nq * HD * M->es);
    STEP(st = pvl_plan_kv_write(plan, l, ks, vs, NULL));
    st = pvl_attention_decode(plan, l, qs, o, 0.0f, NULL);
    if (st == PVL_SUCCESS)
      memcpy((char *)fo->out[g] + (size_t)h0 * GRP * HD * M->es, o,
             (size_t)nq * HD * M->es);
    free(o);
    STEP(st);
    free(ks), free(vs), free(qs);
    ks = vs = qs = NULL;
  }
done:
  free(ks), free(vs), free(qs);
  pvl_plan_destroy(plan);
  return st;
#undef STEP
}

static pvl_config base_config(pvl_dtype dt) {
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = dt;
  cfg.num_layers = LG;
  cfg.num_q_heads = HQ;
  cfg.num_kv_heads = HKV;
  cfg.head_dim = HD;
  cfg.block_size = BS;
  cfg.num_blocks = NB;
  cfg.max_seqs = 16;
  return cfg;
}

/* The single cache over the whole model: the reference. */
static void reference(model *M) {
  pvl_config cfg = base_config(M->dt);
  pvl_cache *c = tu_cache_new(&cfg);
  flow_out fo;
  memset(&fo, 0, sizeof(fo));
  for (uint32_t l = 0; l < LG; l++) fo.out[l] = M->out[l];
  char why[512] = "";
  cr_assert_eq(flow(c, M, 0, LG, 0, HKV, &fo, why, sizeof(why)), PVL_SUCCESS,
               "reference: %s", why);
  memcpy(M->budget, fo.budget, sizeof(M->budget));
  memcpy(M->npos, fo.npos, sizeof(M->npos));
  memcpy(M->pos, fo.pos, sizeof(M->pos));
  /* The policy must really compress, with budgets that differ by layer,
   * or the comparisons below would prove little. */
  uint32_t lo = M->budget[0], hi = M->budget[0];
  for (uint32_t l = 0; l < LG; l++) {
    lo = M->budget[l] < lo ? M->budget[l] : lo;
    hi = M->budget[l] > hi ? M->budget[l] : hi;
  }
  cr_assert(hi < MP && lo < hi, "reference budgets %u..%u of %u", lo, hi, MP);
  pvl_cache_destroy(c);
}

/* ---- equivalence with one cache over the whole model ---- */

typedef struct equiv_arg {
  const model *M;
  pvl_split split;
  bool explicit_ranges; /* give the ranges instead of the even split */
  flow_out fo;
  uint32_t l0, nl, h0, nh; /* the range the cache reports */
} equiv_arg;

static void equiv_rank(rank_ctx *rc) {
  equiv_arg *a = rc->arg;
  const model *M = a->M;
  pvl_config cfg = base_config(M->dt);
  cfg.comm = rc->comm;
  cfg.split = a->split;
  if (a->split == PVL_SPLIT_LAYERS) {
    cfg.model_num_layers = LG;
    cfg.num_layers = 0; /* even split */
    if (a->explicit_ranges) {
      /* Reverse order of ranks: rank 0 holds the last layers. */
      uint32_t b = 0, n = 0;
      pvl_split_range(LG, rc->nranks, rc->nranks - 1 - rc->rank, &b, &n);
      cfg.layer_begin = b;
      cfg.num_layers = n;
    }
  } else {
    cfg.model_num_kv_heads = HKV;
    cfg.num_kv_heads = 0; /* even split; num_q_heads = the model's */
    if (a->explicit_ranges) {
      uint32_t b = 0, n = 0;
      pvl_split_range(HKV, rc->nranks, rc->nranks - 1 - rc->rank, &b, &n);
      cfg.kv_head_begin = b;
      cfg.num_kv_heads = n;
      cfg.num_q_heads = n * GRP;
    }
  }
  pvl_cache *c = NULL;
  ROK(rc, c, pvl_cache_create(&cfg, &c));
  pvl_config got;
  ROK(rc, c, pvl_cache_config(c, &got));
  if (a->split == PVL_SPLIT_LAYERS) {
    a->l0 = got.layer_begin, a->nl = got.num_layers;
    a->h0 = 0, a->nh = HKV;
  } else {
    a->l0 = 0, a->nl = LG;
    a->h0 = got.kv_head_begin, a->nh = got.num_kv_heads;
    RCHECK(rc, got.num_q_heads == got.num_kv_heads * GRP,
           "num_q_heads %u for %u KV heads", got.num_q_heads, got.num_kv_heads);
  }
  char why[512] = "";
  pvl_status st =
      flow(c, M, a->l0, a->nl, a->h0, a->nh, &a->fo, why, sizeof(why));
  if (st == PVL_SUCCESS) {
    char msg[512] = "";
    st = pvl__cache_check(c, msg, sizeof(msg));
    if (st != PVL_SUCCESS) snprintf(why, sizeof(why), "check: %s", msg);
  }
  pvl_cache_destroy(c);
  RCHECK(rc, st == PVL_SUCCESS, "%s", why);
}

static void check_equiv(pvl_dtype dt, pvl_split split, uint32_t nranks,
                        bool explicit_ranges) {
  model M;
  model_init(&M, dt, 1000 + (uint64_t)dt * 7 + nranks);
  reference(&M);
  equiv_arg args[MAX_RANKS];
  void *ap[MAX_RANKS] = {0};
  for (uint32_t r = 0; r < nranks; r++) {
    memset(&args[r], 0, sizeof(args[r]));
    args[r].M = &M;
    args[r].split = split;
    args[r].explicit_ranges = explicit_ranges;
    for (uint32_t l = 0; l < LG; l++) {
      args[r].fo.out[l] = calloc((size_t)HQ * HD, M.es);
    }
    ap[r] = &args[r];
  }
  rank_ctx ctx[MAX_RANKS];
  run_ranks(nranks, equiv_rank, ap, ctx);

  const char *sname = split == PVL_SPLIT_LAYERS ? "layers" : "heads";
  /* The ranges tile the model. */
  uint32_t covered = 0;
  for (uint32_t r = 0; r < nranks; r++)
    covered += split == PVL_SPLIT_LAYERS ? args[r].nl : args[r].nh;
  cr_assert_eq(covered, split == PVL_SPLIT_LAYERS ? LG : HKV);
  for (uint32_t r = 0; r < nranks; r++) {
    const equiv_arg *a = &args[r];
    for (uint32_t l = a->l0; l < a->l0 + a->nl; l++) {
      cr_assert_eq(a->fo.budget[l], M.budget[l],
                   "%s, %u ranks, dtype %d: rank %u layer %u budget %u, one "
                   "cache %u",
                   sname, nranks, (int)dt, r, l, a->fo.budget[l], M.budget[l]);
      cr_assert_eq(a->fo.npos[l], M.npos[l], "rank %u layer %u: %u kept, %u", r,
                   l, a->fo.npos[l], M.npos[l]);
      cr_assert_arr_eq(a->fo.pos[l], M.pos[l], M.npos[l] * sizeof(uint32_t),
                       "%s, %u ranks: rank %u layer %u keeps other tokens",
                       sname, nranks, r, l);
      /* Outputs: this rank's heads of the layer, bit for bit (each head's
       * attention reads only its own KV head). */
      const size_t off = (size_t)a->h0 * GRP * HD * M.es;
      const size_t len = (size_t)a->nh * GRP * HD * M.es;
      cr_assert_arr_eq((char *)a->fo.out[l] + off, (char *)M.out[l] + off, len,
                       "%s, %u ranks: rank %u layer %u outputs differ", sname,
                       nranks, r, l);
    }
    /* Split by heads every rank holds the same tables: the same ids and
     * the same kept tokens as every other rank, bit for bit. */
    cr_assert_eq(a->fo.seq, args[0].fo.seq, "rank %u's sequence id differs", r);
    for (uint32_t l = a->l0; split == PVL_SPLIT_HEADS && l < LG; l++)
      cr_assert_arr_eq(a->fo.pos[l], args[0].fo.pos[l],
                       a->fo.npos[l] * sizeof(uint32_t));
  }
  for (uint32_t r = 0; r < nranks; r++)
    for (uint32_t l = 0; l < LG; l++) free(args[r].fo.out[l]);
  model_fini(&M);
}

static const uint32_t k_ranks[] = {1, 2, 3, 4, 8};
static const pvl_dtype k_dtypes[] = {PVL_DTYPE_F32, PVL_DTYPE_F16,
                                     PVL_DTYPE_BF16};

Test(dist, layers_equal_one_cache) {
  for (size_t d = 0; d < 3; d++)
    for (size_t i = 0; i < 5; i++)
      check_equiv(k_dtypes[d], PVL_SPLIT_LAYERS, k_ranks[i], false);
}

Test(dist, heads_equal_one_cache) {
  for (size_t d = 0; d < 3; d++)
    for (size_t i = 0; i < 5; i++)
      check_equiv(k_dtypes[d], PVL_SPLIT_HEADS, k_ranks[i], false);
}

Test(dist, ranges_in_any_rank_order) {
  check_equiv(PVL_DTYPE_F32, PVL_SPLIT_LAYERS, 3, true);
  check_equiv(PVL_DTYPE_BF16, PVL_SPLIT_HEADS, 3, true);
}

/* ---- decode cap and retain, split by heads (collective) ---- */

/* Admission and prefill of this cache's heads, an observation of every
 * layer, then pvl_decode_cap on every layer (VL-Cache scores summed over
 * the ranks) and a hand-made pvl_seq_retain of layer 0; kept positions
 * land in pos/npos. */
static pvl_status cap_flow(pvl_cache *c, const model *M, uint32_t h0,
                           uint32_t nh, uint32_t (*pos)[MP + 2], uint32_t *npos,
                           char *why, size_t why_len) {
  pvl_span vis = {VIS_B, VIS_E};
  pvl_seq_id seq = 0;
  pvl_status st = pvl_seq_add(c, MP, &vis, 1, &seq);
  pvl_policy pol = M->pol;
  pol.decode_cap = 40;
  pol.decode_cap_slack = 8;
  for (uint32_t l = 0; l < LG && st == PVL_SUCCESS; l++) {
    void *ks = slice_heads(M, M->k[l], MP, HKV, h0, nh);
    void *vs = slice_heads(M, M->v[l], MP, HKV, h0, nh);
    void *qs = slice_heads(M, M->qo[l], M->rows_n, HQ, h0 * GRP, nh * GRP);
    st = pvl_kv_write(c, seq, l, 0, MP, ks, vs, NULL);
    if (st == PVL_SUCCESS)
      st = pvl_observe(c, seq, l, qs, M->rows_first, M->rows_n, pol.threshold,
                       0.0f, NULL);
    free(ks), free(vs), free(qs);
  }
  for (uint32_t l = 0; l < LG && st == PVL_SUCCESS; l++) {
    uint32_t did = 0;
    st = pvl_decode_cap(c, seq, l, &pol, &did, NULL);
    if (st == PVL_SUCCESS && !did) st = PVL_ERR_INTERNAL;
  }
  /* Keep every other slot of layer 0, by hand. */
  uint32_t keep[MP], nk = 0, n0 = 0, nb = 0;
  if (st == PVL_SUCCESS) st = pvl_seq_layer_size(c, seq, 0, &n0, &nb);
  for (uint32_t i = 0; i < n0; i += 2) keep[nk++] = i;
  if (st == PVL_SUCCESS) st = pvl_seq_retain(c, seq, 0, keep, nk, NULL);
  for (uint32_t l = 0; l < LG && st == PVL_SUCCESS; l++)
    st = pvl_seq_positions(c, seq, l, pos[l], MP + 2, &npos[l]);
  if (st != PVL_SUCCESS)
    snprintf(why, why_len, "%s (%s)", pvl_status_string(st),
             pvl_cache_last_error(c));
  return st;
}

typedef struct cap_arg {
  const model *M;
  uint32_t npos[LG];
  uint32_t pos[LG][MP + 2];
} cap_arg;

static void cap_rank(rank_ctx *rc) {
  cap_arg *a = rc->arg;
  pvl_config cfg = base_config(a->M->dt);
  cfg.comm = rc->comm;
  cfg.split = PVL_SPLIT_HEADS;
  cfg.model_num_kv_heads = HKV;
  cfg.num_kv_heads = 0;
  pvl_cache *c = NULL;
  ROK(rc, c, pvl_cache_create(&cfg, &c));
  pvl_config got;
  ROK(rc, c, pvl_cache_config(c, &got));
  char why[512] = "";
  pvl_status st = cap_flow(c, a->M, got.kv_head_begin, got.num_kv_heads, a->pos,
                           a->npos, why, sizeof(why));
  if (st == PVL_SUCCESS) {
    /* Ranks that pass different keep lists are refused, all of them. */
    pvl_seq_id seq = 0;
    uint32_t keep[1] = {rc->rank == 0 ? 0u : 1u};
    ROK(rc, c, pvl_seq_add(c, 4, NULL, 0, &seq));
    st = pvl_seq_retain(c, seq, 1, keep, 1, NULL);
    RCHECK(rc, st == PVL_ERR_BAD_STATE || rc->nranks == 1,
           "disagreeing retain: %s", pvl_status_string(st));
    RCHECK(rc, tu_layer_tokens(c, seq, 1) == 4 || rc->nranks == 1,
           "a refused retain changed the layer");
    st = PVL_SUCCESS;
  }
  pvl_cache_destroy(c);
  RCHECK(rc, st == PVL_SUCCESS, "%s", why);
}

static const pvl_dtype k_dtypes_cap[] = {PVL_DTYPE_F32, PVL_DTYPE_F16,
                                         PVL_DTYPE_BF16};

Test(dist, head_split_decode_cap_and_retain_equal_one_cache) {
  for (size_t d = 0; d < 3; d++) {
    model M;
    model_init(&M, k_dtypes_cap[d], 500 + d);
    pvl_config cfg = base_config(M.dt);
    pvl_cache *c = tu_cache_new(&cfg);
    uint32_t npos[LG], pos[LG][MP + 2];
    char why[512] = "";
    cr_assert_eq(cap_flow(c, &M, 0, HKV, pos, npos, why, sizeof(why)),
                 PVL_SUCCESS, "reference: %s", why);
    pvl_cache_destroy(c);
    const uint32_t ranks[] = {2, 4, 8};
    for (size_t i = 0; i < 3; i++) {
      cap_arg args[MAX_RANKS];
      void *ap[MAX_RANKS] = {0};
      for (uint32_t r = 0; r < ranks[i]; r++) {
        memset(&args[r], 0, sizeof(args[r]));
        args[r].M = &M;
        ap[r] = &args[r];
      }
      rank_ctx ctx[MAX_RANKS];
      run_ranks(ranks[i], cap_rank, ap, ctx);
      for (uint32_t r = 0; r < ranks[i]; r++)
        for (uint32_t l = 0; l < LG; l++) {
          cr_assert_eq(args[r].npos[l], npos[l], "%u ranks, rank %u layer %u",
                       ranks[i], r, l);
          cr_assert_arr_eq(args[r].pos[l], pos[l], npos[l] * sizeof(uint32_t),
                           "%u ranks: rank %u layer %u keeps other tokens",
                           ranks[i], r, l);
        }
    }
    model_fini(&M);
  }
}

/* ---- admission and append near exhaustion ---- */

/* Records one decision per step: the status (or admit answer) each rank
 * saw, and each rank's pool before and after a refused call. */
#define STEPS 64
typedef struct admit_arg {
  pvl_split split;
  uint32_t nb; /* pool blocks of this rank */
  int32_t admit[STEPS];
  int32_t add_st[STEPS];
  int32_t app_st[STEPS];
  uint32_t n_admit, n_app;
} admit_arg;

static void admit_rank(rank_ctx *rc) {
  admit_arg *a = rc->arg;
  pvl_config cfg = base_config(PVL_DTYPE_F32);
  cfg.comm = rc->comm;
  cfg.split = a->split;
  cfg.num_blocks = a->nb;
  cfg.head_dim = 4;
  if (a->split == PVL_SPLIT_LAYERS) {
    /* 5 layers over the ranks: the ranks hold different layer counts. */
    cfg.model_num_layers = 5;
    cfg.num_layers = 0;
  } else {
    cfg.model_num_kv_heads = HKV;
    cfg.num_kv_heads = 0;
  }
  pvl_cache *c = NULL;
  ROK(rc, c, pvl_cache_create(&cfg, &c));
  pvl_seq_id seqs[STEPS];
  uint32_t n_seqs = 0;
  /* Admit 13-token prompts (2 blocks per layer) while OK. */
  for (uint32_t i = 0; i < STEPS; i++) {
    pvl_admit ad = PVL_ADMIT_NEVER;
    ROK(rc, c, pvl_can_add(c, 13, &ad));
    a->admit[i] = (int32_t)ad;
    pvl_stats before = {0}, after = {0};
    ROK(rc, c, pvl_cache_get_stats(c, &before));
    pvl_seq_id s = 0;
    pvl_status st = pvl_seq_add(c, 13, NULL, 0, &s);
    a->add_st[i] = (int32_t)st;
    a->n_admit = i + 1;
    ROK(rc, c, pvl_cache_get_stats(c, &after));
    RCHECK(rc, (st == PVL_SUCCESS) == (ad == PVL_ADMIT_OK),
           "admission %u: pvl_can_add said %d but pvl_seq_add returned %s", i,
           (int)ad, pvl_status_string(st));
    if (st != PVL_SUCCESS) {
      RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
             "a refused pvl_seq_add changed the pool");
      break;
    }
    seqs[n_seqs++] = s;
  }
  /* Free one, then decode every live sequence until the pool refuses. */
  ROK(rc, c, pvl_seq_free(c, seqs[--n_seqs]));
  for (uint32_t i = 0; i < STEPS; i++) {
    pvl_stats before = {0}, after = {0};
    ROK(rc, c, pvl_cache_get_stats(c, &before));
    pvl_status st = pvl_seq_append(c, seqs, n_seqs, NULL);
    a->app_st[i] = (int32_t)st;
    a->n_app = i + 1;
    ROK(rc, c, pvl_cache_get_stats(c, &after));
    if (st != PVL_SUCCESS) {
      RCHECK(rc, st == PVL_ERR_OUT_OF_BLOCKS, "append %u: %s (%s)", i,
             pvl_status_string(st), pvl_cache_last_error(c));
      RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
             "a refused pvl_seq_append changed the pool");
      break;
    }
  }
  char msg[512] = "";
  pvl_status st = pvl__cache_check(c, msg, sizeof(msg));
  pvl_cache_destroy(c);
  RCHECK(rc, st == PVL_SUCCESS, "check: %s", msg);
}

static void check_admission(pvl_split split, uint32_t nranks,
                            const uint32_t *nb) {
  admit_arg args[MAX_RANKS];
  void *ap[MAX_RANKS] = {0};
  for (uint32_t r = 0; r < nranks; r++) {
    memset(&args[r], 0, sizeof(args[r]));
    args[r].split = split;
    args[r].nb = nb[r];
    ap[r] = &args[r];
  }
  rank_ctx ctx[MAX_RANKS];
  run_ranks(nranks, admit_rank, ap, ctx);
  for (uint32_t r = 1; r < nranks; r++) {
    cr_assert_eq(args[r].n_admit, args[0].n_admit);
    cr_assert_eq(args[r].n_app, args[0].n_app);
    cr_assert_arr_eq(args[r].admit, args[0].admit,
                     args[0].n_admit * sizeof(int32_t));
    cr_assert_arr_eq(args[r].add_st, args[0].add_st,
                     args[0].n_admit * sizeof(int32_t));
    cr_assert_arr_eq(args[r].app_st, args[0].app_st,
                     args[0].n_app * sizeof(int32_t));
  }
  /* Both phases ended in a refusal, which every rank saw. */
  cr_assert_eq(args[0].add_st[args[0].n_admit - 1], PVL_ERR_OUT_OF_BLOCKS);
  cr_assert_eq(args[0].app_st[args[0].n_app - 1], PVL_ERR_OUT_OF_BLOCKS);
}

Test(dist, layer_split_admission_and_append_agree) {
  /* Same pools, different layer counts (2 and 3 of 5): the rank with more
   * layers runs out first, and decides for all. */
  const uint32_t nb2[] = {40, 40};
  check_admission(PVL_SPLIT_LAYERS, 2, nb2);
  /* Pools of different sizes too. */
  const uint32_t nb3[] = {50, 23, 31};
  check_admission(PVL_SPLIT_LAYERS, 3, nb3);
}

Test(dist, head_split_admission_and_append_agree) {
  const uint32_t nb[] = {45, 45, 45, 45};
  check_admission(PVL_SPLIT_HEADS, 4, nb);
}

/* ---- a failure on one rank fails every rank, and changes nothing ---- */

/* An allocator that fails once armed (on the rank it is given to). */
typedef struct fail_alloc {
  pvl_allocator a;
  volatile int armed;
} fail_alloc;

static void *fa_alloc(void *ctx, size_t size, size_t align) {
  fail_alloc *f = ctx;
  if (f->armed) return NULL;
  return pvl__default_allocator()->alloc(NULL, size, align);
}
static void fa_free(void *ctx, void *p, size_t size, size_t align) {
  (void)ctx;
  pvl__default_allocator()->free(NULL, p, size, align);
}

typedef struct inject_arg {
  pvl_split split;
  uint32_t bad_rank;
  pvl_status add_st, comp_st, app_st, fork_st, can_st;
  char comp_msg[PVL_ERRMSG_LEN];
} inject_arg;

/* Everything observable of a sequence's tables and the pool. */
typedef struct snap {
  pvl_stats stats;
  uint32_t ntok[LG];
  int32_t blocks[LG][64];
} snap;

static void take(pvl_cache *c, pvl_seq_id s, uint32_t L, snap *sn) {
  memset(sn, 0, sizeof(*sn));
  pvl_cache_get_stats(c, &sn->stats);
  for (uint32_t l = 0; l < L; l++) {
    uint32_t nb = 0;
    pvl_seq_layer_size(c, s, l, &sn->ntok[l], &nb);
    pvl_seq_blocks(c, s, l, sn->blocks[l], 64, &nb);
  }
}

static void inject_rank(rank_ctx *rc) {
  inject_arg *a = rc->arg;
  fail_alloc fa = {{fa_alloc, fa_free, NULL}, 0};
  fa.a.ctx = &fa;
  pvl_config cfg = base_config(PVL_DTYPE_F32);
  cfg.comm = rc->comm;
  cfg.split = a->split;
  cfg.allocator = &fa.a;
  if (a->split == PVL_SPLIT_LAYERS) {
    cfg.model_num_layers = LG;
    cfg.num_layers = 0;
  } else {
    cfg.model_num_kv_heads = HKV;
    cfg.num_kv_heads = 0;
  }
  pvl_cache *c = NULL;
  ROK(rc, c, pvl_cache_create(&cfg, &c));
  pvl_config got;
  ROK(rc, c, pvl_cache_config(c, &got));
  const bool bad = rc->rank == a->bad_rank;
  pvl_span vis = {VIS_B, VIS_E};
  pvl_seq_id s = 0, other = 0;
  snap before, after;

  /* pvl_seq_add: rank bad_rank cannot allocate the sequence. */
  take(c, 0, 0, &before);
  fa.armed = bad;
  a->add_st = pvl_seq_add(c, MP, &vis, 1, &other);
  fa.armed = 0;
  take(c, 0, 0, &after);
  RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
         "a failed pvl_seq_add changed the pool");
  ROK(rc, c, pvl_seq_add(c, MP, &vis, 1, &s));

  /* Prefill and observe this rank's share (data need not be the model's:
   * only agreement and atomicity are checked here). */
  const uint32_t nl = got.num_layers, nkv = got.num_kv_heads;
  const size_t kvn = (size_t)MP * nkv * HD;
  float *kv = calloc(kvn, sizeof(float));
  float *q = calloc((size_t)MP * got.num_q_heads * HD, sizeof(float));
  for (size_t i = 0; i < kvn; i++) kv[i] = (float)((i * 7919) % 13) * 0.1f;
  for (size_t i = 0; i < (size_t)MP * got.num_q_heads * HD; i++)
    q[i] = (float)((i * 104729) % 17) * 0.05f;
  for (uint32_t l = 0; l < nl; l++) {
    ROK(rc, c, pvl_kv_write(c, s, l, 0, MP, kv, kv, NULL));
    ROK(rc, c, pvl_observe(c, s, l, q, VIS_E, MP - VIS_E, 0.01f, 0.0f, NULL));
  }
  free(kv);
  free(q);
  pvl_policy pol;
  pvl_policy_init(&pol, PVL_POLICY_VLCACHE);
  pol.keep_ratio = 0.3f;

  /* pvl_compress: rank bad_rank cannot allocate its scratch. */
  take(c, s, nl, &before);
  fa.armed = bad;
  a->comp_st = pvl_compress(c, s, &pol, NULL, NULL);
  fa.armed = 0;
  snprintf(a->comp_msg, sizeof(a->comp_msg), "%s", pvl_cache_last_error(c));
  take(c, s, nl, &after);
  RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
         "a failed pvl_compress changed the tables");
  /* The observations survived: the same call now succeeds everywhere. */
  ROK(rc, c, pvl_compress(c, s, &pol, NULL, NULL));

  /* pvl_seq_fork and pvl_seq_append: bad_rank fails to allocate. */
  take(c, s, nl, &before);
  fa.armed = bad;
  pvl_seq_id child = 0;
  a->fork_st = pvl_seq_fork(c, s, &child);
  fa.armed = 0;
  take(c, s, nl, &after);
  RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
         "a failed pvl_seq_fork changed the pool");
  /* Appends until a table must grow, with the allocator armed: the
   * growth fails on bad_rank, so on every rank. */
  fa.armed = bad;
  pvl_status st = PVL_SUCCESS;
  for (uint32_t i = 0; i < 400 && st == PVL_SUCCESS; i++) {
    take(c, s, nl, &before);
    st = pvl_seq_append(c, &s, 1, NULL);
  }
  fa.armed = 0;
  a->app_st = st;
  take(c, s, nl, &after);
  RCHECK(rc, memcmp(&before, &after, sizeof(before)) == 0,
         "a failed pvl_seq_append changed the tables");

  char msg[512] = "";
  st = pvl__cache_check(c, msg, sizeof(msg));
  pvl_cache_destroy(c);
  RCHECK(rc, st == PVL_SUCCESS, "check: %s", msg);
}

static void check_inject(pvl_split split, uint32_t nranks, uint32_t bad) {
  inject_arg args[MAX_RANKS];
  void *ap[MAX_RANKS] = {0};
  for (uint32_t r = 0; r < nranks; r++) {
    memset(&args[r], 0, sizeof(args[r]));
    args[r].split = split;
    args[r].bad_rank = bad;
    ap[r] = &args[r];
  }
  rank_ctx ctx[MAX_RANKS];
  run_ranks(nranks, inject_rank, ap, ctx);
  for (uint32_t r = 0; r < nranks; r++) {
    cr_assert_eq(args[r].add_st, PVL_ERR_NO_MEMORY, "rank %u add: %s", r,
                 pvl_status_string(args[r].add_st));
    cr_assert_eq(args[r].comp_st, PVL_ERR_NO_MEMORY, "rank %u compress: %s", r,
                 pvl_status_string(args[r].comp_st));
    cr_assert_eq(args[r].fork_st, PVL_ERR_NO_MEMORY, "rank %u fork: %s", r,
                 pvl_status_string(args[r].fork_st));
    cr_assert_eq(args[r].app_st, PVL_ERR_NO_MEMORY, "rank %u append: %s", r,
                 pvl_status_string(args[r].app_st));
    char want[64];
    snprintf(want, sizeof(want), "rank %u of %u failed", bad, nranks);
    cr_assert(strstr(args[r].comp_msg, want),
              "rank %u's message does not name the failing rank: %s", r,
              args[r].comp_msg);
  }
}

Test(dist, failure_on_one_rank_fails_all_layers) {
  check_inject(PVL_SPLIT_LAYERS, 2, 1);
  check_inject(PVL_SPLIT_LAYERS, 4, 2);
}

Test(dist, failure_on_one_rank_fails_all_heads) {
  check_inject(PVL_SPLIT_HEADS, 2, 1);
  check_inject(PVL_SPLIT_HEADS, 3, 0);
}

/* ---- creation must agree ---- */

typedef struct create_arg {
  int mode; /* 0: rank 1 has another head_dim; 1: rank 1 a bad config;
               2: ranges overlap; 3: split NONE over 2 ranks */
  pvl_status st;
  char msg[PVL_ERRMSG_LEN];
} create_arg;

static void create_rank(rank_ctx *rc) {
  create_arg *a = rc->arg;
  pvl_config cfg = base_config(PVL_DTYPE_F32);
  cfg.comm = rc->comm;
  cfg.split = PVL_SPLIT_LAYERS;
  cfg.model_num_layers = LG;
  cfg.num_layers = 0;
  if (a->mode == 0 && rc->rank == 1) cfg.head_dim = 32;
  if (a->mode == 1 && rc->rank == 1) cfg.block_size = 0;
  if (a->mode == 2) {
    cfg.layer_begin = rc->rank == 0 ? 0 : 3;
    cfg.num_layers = rc->rank == 0 ? 4 : 5;
  }
  if (a->mode == 3) cfg.split = PVL_SPLIT_NONE;
  pvl_cache *c = NULL;
  a->st = pvl_cache_create(&cfg, &c);
  snprintf(a->msg, sizeof(a->msg), "%s", pvl_create_last_error());
  RCHECK(rc, a->st != PVL_SUCCESS && c == NULL, "creation succeeded");
}

Test(dist, creation_fails_on_every_rank) {
  const pvl_status want[] = {PVL_ERR_BAD_STATE, PVL_ERR_INVALID_ARGUMENT,
                             PVL_ERR_INVALID_ARGUMENT,
                             PVL_ERR_INVALID_ARGUMENT};
  const char *say[] = {"head_dim", "block_size", "tile", "PVL_SPLIT_NONE"};
  for (int mode = 0; mode < 4; mode++) {
    create_arg args[2];
    void *ap[2] = {&args[0], &args[1]};
    memset(args, 0, sizeof(args));
    args[0].mode = args[1].mode = mode;
    rank_ctx ctx[2];
    run_ranks(2, create_rank, ap, ctx);
    for (int r = 0; r < 2; r++) {
      cr_assert_eq(args[r].st, want[mode], "mode %d rank %d: %s (%s)", mode, r,
                   pvl_status_string(args[r].st), args[r].msg);
      cr_assert(strstr(args[r].msg, say[mode]),
                "mode %d rank %d: message does not say %s: %s", mode, r,
                say[mode], args[r].msg);
    }
  }
}

/* ---- collectives out of order, or with different arguments ---- */

typedef struct order_arg {
  pvl_status st1, st2, st3;
  char msg1[PVL_ERRMSG_LEN], msg2[PVL_ERRMSG_LEN];
  pvl_stats before, after;
} order_arg;

static void order_rank(rank_ctx *rc) {
  order_arg *a = rc->arg;
  pvl_config cfg = base_config(PVL_DTYPE_F32);
  cfg.comm = rc->comm;
  cfg.split = PVL_SPLIT_HEADS;
  cfg.model_num_kv_heads = HKV;
  cfg.num_kv_heads = 0;
  pvl_cache *c = NULL;
  ROK(rc, c, pvl_cache_create(&cfg, &c));
  pvl_seq_id s = 0;
  pvl_admit ad;
  ROK(rc, c, pvl_cache_get_stats(c, &a->before));
  /* Rank 0 admits while rank 1 asks whether it could. */
  if (rc->rank == 0)
    a->st1 = pvl_seq_add(c, 10, NULL, 0, &s);
  else
    a->st1 = pvl_can_add(c, 10, &ad);
  snprintf(a->msg1, sizeof(a->msg1), "%s", pvl_cache_last_error(c));
  /* Same call, different arguments. */
  a->st2 = pvl_seq_add(c, rc->rank == 0 ? 10 : 11, NULL, 0, &s);
  snprintf(a->msg2, sizeof(a->msg2), "%s", pvl_cache_last_error(c));
  ROK(rc, c, pvl_cache_get_stats(c, &a->after));
  /* The ranks can go on once they agree again. */
  a->st3 = pvl_seq_add(c, 10, NULL, 0, &s);
  pvl_cache_destroy(c);
}

Test(dist, out_of_order_and_disagreeing_calls_fail_clearly) {
  order_arg args[2];
  void *ap[2] = {&args[0], &args[1]};
  memset(args, 0, sizeof(args));
  rank_ctx ctx[2];
  run_ranks(2, order_rank, ap, ctx);
  for (int r = 0; r < 2; r++) {
    cr_assert_eq(args[r].st1, PVL_ERR_BAD_STATE, "rank %d: %s", r,
                 pvl_status_string(args[r].st1));
    cr_assert(strstr(args[r].msg1, "collective order mismatch") &&
                  strstr(args[r].msg1, "pvl_seq_add") &&
                  strstr(args[r].msg1, "pvl_can_add"),
              "rank %d: %s", r, args[r].msg1);
    cr_assert_eq(args[r].st2, PVL_ERR_BAD_STATE, "rank %d: %s", r,
                 pvl_status_string(args[r].st2));
    cr_assert(strstr(args[r].msg2, "ranks disagree"), "rank %d: %s", r,
              args[r].msg2);
    cr_assert_arr_eq(&args[r].before, &args[r].after, sizeof(pvl_stats),
                     "rank %d: the refused calls changed the pool", r);
    cr_assert_eq(args[r].st3, PVL_SUCCESS, "rank %d: %s", r,
                 pvl_status_string(args[r].st3));
  }
}

/* ---- the communicator itself ---- */

Test(dist, comm_basics) {
  pvl_comm *cs[3];
  cr_assert_eq(pvl_comm_create_local(0, cs), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_comm_create_local(2000, cs), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_comm_create_local(3, NULL), PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_comm_create_local(3, cs), PVL_SUCCESS);
  for (int32_t r = 0; r < 3; r++) {
    int32_t rank = -1, size = -1;
    cr_assert_eq(pvl_comm_rank(cs[r], &rank), PVL_SUCCESS);
    cr_assert_eq(pvl_comm_size(cs[r], &size), PVL_SUCCESS);
    cr_assert_eq(rank, r);
    cr_assert_eq(size, 3);
  }
  cr_assert_eq(pvl_comm_rank(NULL, NULL), PVL_ERR_INVALID_ARGUMENT);
  for (int r = 0; r < 3; r++)
    cr_assert_eq(pvl_comm_destroy(cs[r]), PVL_SUCCESS);
  cr_assert_eq(pvl_comm_destroy(NULL), PVL_SUCCESS);

  /* The even split tiles, with the larger shares last. */
  uint32_t at = 0;
  for (uint32_t r = 0; r < 3; r++) {
    uint32_t b = 0, n = 0;
    cr_assert_eq(pvl_split_range(8, 3, r, &b, &n), PVL_SUCCESS);
    cr_assert_eq(b, at);
    cr_assert_eq(n, r == 0 ? 2u : 3u);
    at += n;
  }
  cr_assert_eq(at, 8);
  uint32_t b, n;
  cr_assert_eq(pvl_split_range(8, 3, 3, &b, &n), PVL_ERR_INVALID_ARGUMENT);

  /* A split without a communicator is refused. */
  pvl_config cfg = base_config(PVL_DTYPE_F32);
  cfg.split = PVL_SPLIT_HEADS;
  pvl_cache *c = NULL;
  cr_assert_eq(pvl_cache_create(&cfg, &c), PVL_ERR_INVALID_ARGUMENT);

  /* NCCL: a unique id where the library has NCCL (or NCCL's own error on
   * a machine where it cannot make one), else UNSUPPORTED for every NCCL
   * entry point. */
  unsigned char id[PVL_COMM_ID_BYTES];
  pvl_status st = pvl_comm_unique_id(id);
  cr_assert(st == PVL_SUCCESS || st == PVL_ERR_NCCL ||
                st == PVL_ERR_UNSUPPORTED,
            "%s", pvl_status_string(st));
  if (st == PVL_ERR_UNSUPPORTED) {
    cr_assert_eq(pvl_comm_adopt_nccl(NULL, 0, cs), PVL_ERR_UNSUPPORTED);
    cr_assert_eq(pvl_comm_create_nccl(id, 0, 1, 0, cs), PVL_ERR_UNSUPPORTED);
  } else {
    cr_assert_eq(pvl_comm_adopt_nccl(NULL, 0, cs), PVL_ERR_INVALID_ARGUMENT);
  }
}

/* One rank of a communicator of size 1: the same as no communicator. */
Test(dist, one_rank_is_one_cache) {
  check_equiv(PVL_DTYPE_F16, PVL_SPLIT_LAYERS, 1, false);
}

/* ---- one thread driving every rank ---- */

Test(dist, one_thread_drives_every_rank) {
  g_one_thread = true;
  check_equiv(PVL_DTYPE_BF16, PVL_SPLIT_HEADS, 4, false);
  check_equiv(PVL_DTYPE_F16, PVL_SPLIT_LAYERS, 3, false);
  const uint32_t nb[] = {40, 40};
  check_admission(PVL_SPLIT_LAYERS, 2, nb);
  g_one_thread = false;
}

static pvl_status fail_on_2(void *arg, uint32_t r) {
  (void)arg;
  return r == 2   ? PVL_ERR_OUT_OF_BLOCKS
         : r == 3 ? PVL_ERR_CAPACITY
                  : PVL_SUCCESS;
}

Test(dist, run_ranks_statuses) {
  pvl_status sts[4];
  cr_assert_eq(pvl_run_ranks(4, fail_on_2, NULL, sts), PVL_ERR_OUT_OF_BLOCKS);
  cr_assert_eq(sts[0], PVL_SUCCESS);
  cr_assert_eq(sts[1], PVL_SUCCESS);
  cr_assert_eq(sts[2], PVL_ERR_OUT_OF_BLOCKS);
  cr_assert_eq(sts[3], PVL_ERR_CAPACITY);
  cr_assert_eq(pvl_run_ranks(2, fail_on_2, NULL, NULL), PVL_SUCCESS);
  cr_assert_eq(pvl_run_ranks(0, fail_on_2, NULL, sts),
               PVL_ERR_INVALID_ARGUMENT);
  cr_assert_eq(pvl_run_ranks(2, NULL, NULL, sts), PVL_ERR_INVALID_ARGUMENT);
}
