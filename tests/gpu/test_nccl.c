/* NCCL communicators on GPUs: one rank end to end (created from a unique
 * id, and adopted from the caller's ncclComm_t), split caches over several
 * GPUs against one cache holding the whole model, and one thread driving
 * caches on two GPUs. Skips visibly without a GPU, without NCCL in the
 * library, or (for the several-GPU tests) with fewer GPUs than needed.
 * PVL_REQUIRE_GPU=1 turns a missing GPU into a failure. */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if PVL_TEST_NCCL
/* nccl.h declares a few functions as f() rather than f(void). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop
#endif

/* ---- skips ---- */

static int gpus(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

static void skip(const char *why) {
  fprintf(stderr, "PVL_GPU_SKIPPED: %s\n", why);
  cr_skip_test("%s", why);
}

/* Needs `n` GPUs and a library built with NCCL. */
static void require(int n) {
  const int have = gpus();
  if (have == 0) {
    const char *req = getenv("PVL_REQUIRE_GPU");
    if (req && strcmp(req, "0") != 0)
      cr_assert_fail("PVL_REQUIRE_GPU is set but no CUDA device is usable");
    skip("no CUDA device: NCCL test skipped");
  }
  unsigned char id[PVL_COMM_ID_BYTES];
  if (pvl_comm_unique_id(id) == PVL_ERR_UNSUPPORTED)
    skip("libpagedvl was built without NCCL: NCCL test skipped");
  if (have < n) {
    char why[128];
    snprintf(why, sizeof(why),
             "%d GPU(s), this test needs %d: several-GPU test skipped", have,
             n);
    skip(why);
  }
}

/* ---- one model on the device ---- */

#define L 4
#define HQ 8
#define HKV 4
#define GRP (HQ / HKV)
#define HD 64
#define BS 16
#define MP 200
#define VB 8
#define VE 160

static uint64_t rng = 12345;
static uint16_t rnd_f16(float scale) {
  rng = rng * 6364136223846793005ull + 1442695040888963407ull;
  float f = ((float)(rng >> 40) / 16777216.0f * 2.0f - 1.0f) * scale;
  return pvl__f32_to_f16(f);
}

typedef struct model {
  uint16_t *k[L], *v[L], *q[L]; /* host: [MP][HKV][HD], rows [MP-VE][HQ][HD] */
  uint32_t budget[L], npos[L], pos[L][MP];
} model;

static void model_init(model *M) {
  for (int l = 0; l < L; l++) {
    const size_t nkv = (size_t)MP * HKV * HD, nq = (size_t)(MP - VE) * HQ * HD;
    M->k[l] = malloc(nkv * 2);
    M->v[l] = malloc(nkv * 2);
    M->q[l] = malloc(nq * 2);
    for (size_t i = 0; i < nkv; i++) M->k[l][i] = rnd_f16(1.0f);
    for (size_t i = 0; i < nkv; i++) M->v[l][i] = rnd_f16(1.0f);
    for (size_t i = 0; i < nq; i++) M->q[l][i] = rnd_f16(0.5f + l);
  }
}

static void model_fini(model *M) {
  for (int l = 0; l < L; l++) free(M->k[l]), free(M->v[l]), free(M->q[l]);
}

/* Heads [h0, h0 + nh) of n rows of `heads` heads, copied to the device. */
static void *dev_slice(const uint16_t *src, uint32_t n, uint32_t heads,
                       uint32_t h0, uint32_t nh) {
  const size_t row = (size_t)nh * HD;
  uint16_t *h = malloc((size_t)n * row * 2 + 2);
  for (uint32_t i = 0; i < n; i++)
    memcpy(h + i * row, src + ((size_t)i * heads + h0) * HD, row * 2);
  void *d = NULL;
  cr_assert_eq(cudaMalloc(&d, (size_t)n * row * 2 + 16), cudaSuccess);
  cr_assert_eq(cudaMemcpy(d, h, (size_t)n * row * 2, cudaMemcpyHostToDevice),
               cudaSuccess);
  free(h);
  return d;
}

static pvl_config gpu_config(int device) {
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CUDA;
  cfg.device = device;
  cfg.dtype = PVL_DTYPE_F16;
  cfg.num_layers = L;
  cfg.num_q_heads = HQ;
  cfg.num_kv_heads = HKV;
  cfg.head_dim = HD;
  cfg.block_size = BS;
  cfg.num_blocks = 512;
  cfg.max_seqs = 8;
  return cfg;
}

/* Admission, prefill and observation of this cache's share, compression;
 * budgets and kept positions into the global-indexed arrays. */
static pvl_status flow(pvl_cache *c, const model *M, uint32_t l0, uint32_t nl,
                       uint32_t h0, uint32_t nh, uint32_t *budget,
                       uint32_t *npos, uint32_t (*pos)[MP]) {
  pvl_span vis = {VB, VE};
  pvl_seq_id s = 0;
  pvl_status st = pvl_seq_add(c, MP, &vis, 1, &s);
  for (uint32_t l = 0; l < nl && st == PVL_SUCCESS; l++) {
    void *k = dev_slice(M->k[l0 + l], MP, HKV, h0, nh);
    void *v = dev_slice(M->v[l0 + l], MP, HKV, h0, nh);
    void *q = dev_slice(M->q[l0 + l], MP - VE, HQ, h0 * GRP, nh * GRP);
    st = pvl_kv_write(c, s, l, 0, MP, k, v, NULL);
    if (st == PVL_SUCCESS)
      st = pvl_observe(c, s, l, q, VE, MP - VE, 0.01f, 0.0f, NULL);
    cudaFree(k), cudaFree(v), cudaFree(q);
  }
  pvl_policy pol;
  pvl_policy_init(&pol, PVL_POLICY_VLCACHE);
  pol.keep_ratio = 0.3f;
  uint32_t b[L];
  pvl_compress_report rep;
  memset(&rep, 0, sizeof(rep));
  rep.budget = b;
  if (st == PVL_SUCCESS) st = pvl_compress(c, s, &pol, &rep, NULL);
  for (uint32_t l = 0; l < nl && st == PVL_SUCCESS; l++) {
    budget[l0 + l] = b[l];
    st = pvl_seq_positions(c, s, l, pos[l0 + l], MP, &npos[l0 + l]);
  }
  return st;
}

static void reference(model *M) {
  pvl_config cfg = gpu_config(0);
  pvl_cache *c = NULL;
  cr_assert_eq(pvl_cache_create(&cfg, &c), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  cr_assert_eq(flow(c, M, 0, L, 0, HKV, M->budget, M->npos, M->pos),
               PVL_SUCCESS, "%s", pvl_cache_last_error(c));
  pvl_cache_destroy(c);
}

static void expect_same(const model *M, const uint32_t *budget,
                        const uint32_t *npos, uint32_t (*pos)[MP], uint32_t l0,
                        uint32_t nl, const char *what) {
  for (uint32_t l = l0; l < l0 + nl; l++) {
    cr_assert_eq(budget[l], M->budget[l], "%s: layer %u budget %u vs %u", what,
                 l, budget[l], M->budget[l]);
    cr_assert_eq(npos[l], M->npos[l], "%s: layer %u", what, l);
    cr_assert(memcmp(pos[l], M->pos[l], npos[l] * 4) == 0,
              "%s: layer %u keeps other tokens", what, l);
  }
}

/* ---- one rank ---- */

Test(nccl, one_rank_end_to_end, .timeout = 120) {
  require(1);
  model M;
  model_init(&M);
  reference(&M);
  unsigned char id[PVL_COMM_ID_BYTES];
  cr_assert_eq(pvl_comm_unique_id(id), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  pvl_comm *comm = NULL;
  cr_assert_eq(pvl_comm_create_nccl(id, 0, 1, 0, &comm), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  int32_t rank = -1, size = -1;
  cr_assert_eq(pvl_comm_rank(comm, &rank), PVL_SUCCESS);
  cr_assert_eq(pvl_comm_size(comm, &size), PVL_SUCCESS);
  cr_assert_eq(rank, 0);
  cr_assert_eq(size, 1);
  for (int split = PVL_SPLIT_LAYERS; split <= PVL_SPLIT_HEADS; split++) {
    pvl_config cfg = gpu_config(0);
    cfg.comm = comm;
    cfg.split = (pvl_split)split;
    cfg.model_num_layers = L;
    cfg.model_num_kv_heads = HKV;
    pvl_cache *c = NULL;
    cr_assert_eq(pvl_cache_create(&cfg, &c), PVL_SUCCESS, "%s",
                 pvl_create_last_error());
    uint32_t budget[L], npos[L], pos[L][MP];
    cr_assert_eq(flow(c, &M, 0, L, 0, HKV, budget, npos, pos), PVL_SUCCESS,
                 "%s", pvl_cache_last_error(c));
    expect_same(&M, budget, npos, pos, 0, L,
                split == PVL_SPLIT_LAYERS ? "layers" : "heads");
    /* Admission answers go through NCCL too. */
    pvl_admit ad = PVL_ADMIT_NEVER;
    cr_assert_eq(pvl_can_add(c, 10, &ad), PVL_SUCCESS, "%s",
                 pvl_cache_last_error(c));
    cr_assert_eq(ad, PVL_ADMIT_OK);
    pvl_cache_destroy(c);
  }
  cr_assert_eq(pvl_comm_destroy(comm), PVL_SUCCESS);
  model_fini(&M);
}

#if PVL_TEST_NCCL
Test(nccl, adopted_communicator_is_not_destroyed) {
  require(1);
  ncclComm_t nc = NULL;
  int dev = 0;
  cr_assert_eq(ncclCommInitAll(&nc, 1, &dev), ncclSuccess);
  pvl_comm *comm = NULL;
  cr_assert_eq(pvl_comm_adopt_nccl(nc, 1, &comm), PVL_ERR_INVALID_ARGUMENT,
               "adopting with the wrong device must fail");
  cr_assert_eq(pvl_comm_adopt_nccl(nc, -1, &comm), PVL_SUCCESS, "%s",
               pvl_create_last_error());
  int32_t size = 0;
  cr_assert_eq(pvl_comm_size(comm, &size), PVL_SUCCESS);
  cr_assert_eq(size, 1);
  cr_assert_eq(pvl_comm_destroy(comm), PVL_SUCCESS);
  /* Still usable: the library left it alone. */
  int count = 0;
  cr_assert_eq(ncclCommCount(nc, &count), ncclSuccess);
  cr_assert_eq(count, 1);
  cr_assert_eq(ncclCommDestroy(nc), ncclSuccess);
}

/* ---- several GPUs, one thread per rank ---- */

typedef struct rank_arg {
  model *M;
  ncclComm_t nc;
  int device;
  pvl_split split;
  pvl_status st;
  char msg[PVL_ERRMSG_LEN];
  uint32_t l0, nl, h0, nh;
  uint32_t budget[L], npos[L], pos[L][MP];
} rank_arg;

static void *rank_main(void *p) {
  rank_arg *a = p;
  cudaSetDevice(a->device);
  pvl_comm *comm = NULL;
  a->st = pvl_comm_adopt_nccl(a->nc, a->device, &comm);
  if (a->st != PVL_SUCCESS) {
    snprintf(a->msg, sizeof(a->msg), "%s", pvl_create_last_error());
    return NULL;
  }
  pvl_config cfg = gpu_config(a->device);
  cfg.comm = comm;
  cfg.split = a->split;
  cfg.model_num_layers = L;
  cfg.model_num_kv_heads = HKV;
  if (a->split == PVL_SPLIT_LAYERS)
    cfg.num_layers = 0;
  else
    cfg.num_kv_heads = 0;
  pvl_cache *c = NULL;
  a->st = pvl_cache_create(&cfg, &c);
  if (a->st != PVL_SUCCESS) {
    snprintf(a->msg, sizeof(a->msg), "%s", pvl_create_last_error());
    pvl_comm_destroy(comm);
    return NULL;
  }
  pvl_config got;
  pvl_cache_config(c, &got);
  a->l0 = a->split == PVL_SPLIT_LAYERS ? got.layer_begin : 0;
  a->nl = got.num_layers;
  a->h0 = a->split == PVL_SPLIT_HEADS ? got.kv_head_begin : 0;
  a->nh = got.num_kv_heads;
  a->st = flow(c, a->M, a->l0, a->nl, a->h0, a->nh, a->budget, a->npos, a->pos);
  snprintf(a->msg, sizeof(a->msg), "%s", pvl_cache_last_error(c));
  pvl_cache_destroy(c);
  pvl_comm_destroy(comm);
  return NULL;
}

/* Ranks for the several-rank tests: one per GPU (up to 4), or, on one GPU,
 * 2 ranks sharing it where NCCL allows that (NCCL >= 2.30 with
 * NCCL_MULTI_RANK_GPU_ENABLE=1); 0 = skip. */
static int several_ranks(int *devs) {
  const int g = gpus();
  if (g >= 2) {
    const int n = g < 4 ? g : 4;
    for (int r = 0; r < n; r++) devs[r] = r;
    return n;
  }
  int v = 0;
  const char *multi = getenv("NCCL_MULTI_RANK_GPU_ENABLE");
  if (g == 1 && ncclGetVersion(&v) == ncclSuccess && v >= 23000 && multi &&
      strcmp(multi, "1") == 0) {
    devs[0] = devs[1] = 0;
    return 2;
  }
  return 0;
}

static void several(pvl_split split) {
  require(1);
  int devs[4] = {0, 0, 0, 0};
  const int n = several_ranks(devs);
  if (n == 0)
    skip("one GPU, and NCCL (< 2.30 or without "
         "NCCL_MULTI_RANK_GPU_ENABLE=1) puts one rank per GPU: several-rank "
         "test skipped");
  model M;
  model_init(&M);
  reference(&M);
  ncclComm_t nc[4];
  cr_assert_eq(ncclCommInitAll(nc, n, devs), ncclSuccess);
  rank_arg a[4];
  pthread_t th[4];
  for (int r = 0; r < n; r++) {
    memset(&a[r], 0, sizeof(a[r]));
    a[r].M = &M;
    a[r].nc = nc[r];
    a[r].device = devs[r];
    a[r].split = split;
    cr_assert_eq(pthread_create(&th[r], NULL, rank_main, &a[r]), 0);
  }
  for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
  for (int r = 0; r < n; r++) ncclCommDestroy(nc[r]);
  for (int r = 0; r < n; r++) {
    cr_assert_eq(a[r].st, PVL_SUCCESS, "rank %d: %s", r, a[r].msg);
    expect_same(&M, a[r].budget, a[r].npos, a[r].pos, a[r].l0, a[r].nl,
                split == PVL_SPLIT_LAYERS ? "layers" : "heads");
  }
  model_fini(&M);
}

Test(nccl, several_ranks_split_by_layers, .timeout = 180) {
  several(PVL_SPLIT_LAYERS);
}

Test(nccl, several_ranks_split_by_heads, .timeout = 180) {
  several(PVL_SPLIT_HEADS);
}
#endif

/* ---- one thread, caches on two GPUs ---- */

Test(nccl, one_thread_two_gpus_keeps_the_callers_device) {
  require(2);
  pvl_cache *c[2] = {NULL, NULL};
  for (int d = 0; d < 2; d++) {
    pvl_config cfg = gpu_config(d);
    cr_assert_eq(pvl_cache_create(&cfg, &c[d]), PVL_SUCCESS, "%s",
                 pvl_create_last_error());
  }
  cr_assert_eq(cudaSetDevice(0), cudaSuccess);
  const size_t n = (size_t)BS * HKV * HD;
  uint16_t *h = malloc(n * 2), *back = malloc(n * 2);
  for (size_t i = 0; i < n; i++) h[i] = rnd_f16(1.0f);
  for (int d = 0; d < 2; d++) {
    /* Device buffers on the cache's device; the caller stays on 0. */
    void *k = NULL;
    cr_assert_eq(cudaSetDevice(d), cudaSuccess);
    cr_assert_eq(cudaMalloc(&k, n * 2), cudaSuccess);
    cr_assert_eq(cudaMemcpy(k, h, n * 2, cudaMemcpyHostToDevice), cudaSuccess);
    cr_assert_eq(cudaSetDevice(0), cudaSuccess);
    pvl_seq_id s = 0;
    cr_assert_eq(pvl_seq_add(c[d], BS, NULL, 0, &s), PVL_SUCCESS);
    for (uint32_t l = 0; l < L; l++)
      cr_assert_eq(pvl_kv_write(c[d], s, l, 0, BS, k, k, NULL), PVL_SUCCESS,
                   "%s", pvl_cache_last_error(c[d]));
    cr_assert_eq(pvl_kv_read(c[d], s, 1, 0, BS, k, k, NULL), PVL_SUCCESS);
    int cur = -1;
    cr_assert_eq(cudaGetDevice(&cur), cudaSuccess);
    cr_assert_eq(cur, 0,
                 "a call on the cache of device %d left device %d "
                 "current",
                 d, cur);
    cr_assert_eq(cudaSetDevice(d), cudaSuccess);
    cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
    cr_assert_eq(cudaMemcpy(back, k, n * 2, cudaMemcpyDeviceToHost),
                 cudaSuccess);
    cr_assert(memcmp(back, h, n * 2) == 0, "device %d: data differ", d);
    cudaFree(k);
    cr_assert_eq(cudaSetDevice(0), cudaSuccess);
  }
  free(h);
  free(back);
  for (int d = 0; d < 2; d++) pvl_cache_destroy(c[d]);
}
