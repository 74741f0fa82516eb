/* The CUDA kernels' own source, run by the host emulator (cuda_emu.h),
 * against the CPU twins of the library: decode attention (split-K with its
 * combine pass, and one split per row), observe (pass 1 with and without
 * key splits, pass 2), kv write/read, the decode write, the plan scatter,
 * the compaction gather and the block copy. The CPU side goes through the
 * public API on a CPU cache; the emulated kernels then get the same pool
 * bytes and plan buffers.
 *
 *   test_emu              the reduced grid (CI)
 *   PVL_EMU_FULL=1        the GPU test grid in full (tests/gpu/test_gpu.c)
 *   test_emu --mutants    every deliberately broken kernel variant must
 *                         make the suite fail (each runs in a child)
 *   test_emu --mutant N   one variant; stops at the first failure
 *
 * Prints "N passed, N failed" and exits non-zero on any failure. */
#include "emu_names.h"

#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "emu_ref.h"
#include "emu_selftest.h"

/* kernels/attention_decode.cu, emulator builds only. */
extern "C" pvl_status pvl_emu_attention_row_splits(const void *workspace,
                                                   const pvl_kv_geom *g,
                                                   int32_t n_seqs,
                                                   int32_t num_q_heads,
                                                   int32_t *splits);

namespace {

/* Variants the kernels carry under PVLK_MUTANT(n) (kernels/). */
const char *const kMutants[] = {
    nullptr,
    "decode: tail mask off by one (one slot past the row's end is scored)",
    "decode: cp.async.wait_group one too few (waits for kStages groups)",
    "decode: no __syncthreads before the merge of the warps' states",
    "decode: no __syncwarp before the ring is reused for the merge",
    "observe pass 1: no __syncthreads before a stage is refilled",
    "copy kernels: the grid-stride loop drops the last vector",
    "decode combine: the split weights skip the last split",
    "decode plan: a cut row's last range drops its last block",
    "decode plan: whole rows' items overwrite the split rows' items",
    "decode plan: the chunk is the longest row (a skewed batch is not cut)",
};
constexpr int kNumMutants = (int)(sizeof(kMutants) / sizeof(kMutants[0])) - 1;

long g_pass = 0, g_fail = 0;
bool g_stop = false; /* mutant run: the first failure ends the process */
std::string g_case;

uint64_t rng_state = 1;
uint64_t rng_next() {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
float rng_unit() { /* [-1, 1) */
  return (float)((rng_next() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
uint32_t rng_below(uint32_t n) { return (uint32_t)(rng_next() % n); }

__attribute__((format(printf, 2, 3))) void fail_msg(const char *check,
                                                    const char *fmt, ...) {
  fprintf(stderr, "FAIL %s: %s: ", g_case.c_str(), check);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  if (g_stop) {
    printf("caught by: %s\n", check);
    fflush(stdout);
    _exit(1);
  }
}

#define EXPECT(check, cond, ...)                                               \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fail_msg(check, __VA_ARGS__);                                            \
      return false;                                                            \
    }                                                                          \
  } while (0)

/* A pvl call on the CPU cache that must succeed. */
#define CPU_OK(c, call)                                                        \
  do {                                                                         \
    const pvl_status st_ = (call);                                             \
    EXPECT("setup", st_ == PVL_SUCCESS, "%s: %s", #call,                       \
           pvl_cache_last_error(c));                                           \
  } while (0)

/* Emulator reports (races, in-flight reads, collective misuse) since the
 * last check make the case fail. */
bool emu_clean(const char *what) {
  const long e = pvl_emu::take_errors();
  EXPECT("emulator (race / cp.async / collective / uninitialized read)", e == 0,
         "%ld emulator errors after %s", e, what);
  return true;
}

void run(const std::string &name, const std::function<bool()> &body) {
  g_case = name;
  (void)pvl_emu::take_errors();
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const bool ok = body() && emu_clean("the case");
  clock_gettime(CLOCK_MONOTONIC, &t1);
  ok ? ++g_pass : ++g_fail;
  if (ok && getenv("PVL_EMU_VERBOSE"))
    fprintf(stderr, "ok %.2fs %s\n",
            (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec),
            name.c_str());
}

std::vector<unsigned char> rand_elems(pvl_dtype dt, size_t n, float scale) {
  const size_t es = pvl_dtype_size(dt);
  std::vector<unsigned char> v(n * es + 16);
  for (size_t i = 0; i < n; ++i) {
    const float f = rng_unit() * scale;
    if (dt == PVL_DTYPE_F16) {
      const uint16_t h = emu_ref_f32_to_f16(f);
      memcpy(&v[i * 2], &h, 2);
    } else if (dt == PVL_DTYPE_BF16) {
      const uint16_t h = emu_ref_f32_to_bf16(f);
      memcpy(&v[i * 2], &h, 2);
    } else {
      memcpy(&v[i * 4], &f, 4);
    }
  }
  return v;
}

/* 16-byte aligned scratch, filled with 0xff (NaN, id -1) so that anything
 * a kernel fails to write shows. */
struct Buf {
  std::vector<uint4> v;
  explicit Buf(size_t bytes) : v(bytes / 16 + 1) {
    memset(v.data(), 0xff, v.size() * 16);
  }
  void *p() { return v.data(); }
};

pvl_cache *make_cache(pvl_dtype dt, uint32_t layers, uint32_t hq, uint32_t hkv,
                      uint32_t d, uint32_t bs, uint32_t blocks) {
  pvl_config cfg;
  pvl_config_init(&cfg);
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = dt;
  cfg.num_layers = layers;
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = d;
  cfg.block_size = bs;
  cfg.num_blocks = blocks;
  pvl_cache *c = nullptr;
  if (pvl_cache_create(&cfg, &c) != PVL_SUCCESS) {
    fprintf(stderr, "cache: %s\n", pvl_create_last_error());
    return nullptr;
  }
  return c;
}

struct CacheGuard {
  pvl_cache *c;
  ~CacheGuard() { pvl_cache_destroy(c); }
};
struct PlanGuard {
  pvl_plan *p = nullptr;
  ~PlanGuard() { pvl_plan_destroy(p); }
};

float tol_eps(pvl_dtype dt) { return dt == PVL_DTYPE_BF16 ? 1e-2f : 1e-3f; }

/* ---- attention, with the data movement that feeds it ---- */

struct AttnCase {
  pvl_dtype dt;
  uint32_t d, bs, hkv, gqa, batch, max_len;
  float qscale;
  int64_t empty_row;
  int sms;
  /* Skew: when non-zero the last row has long_len tokens (the others stay
   * up to max_len), and with empty_others every other row has none. */
  uint32_t long_len = 0;
  bool empty_others = false;
  /* The plan the case expects (with long_len): the long row cut into
   * exactly long_splits splits (> 0) or at least -long_splits (< 0), every
   * other row whole; 0 checks nothing. */
  int long_splits = 0;
};

bool attention_case(const AttnCase &a) {
  pvl_emu::set_sm_count(a.sms);
  const uint32_t hq = a.hkv * a.gqa;
  std::vector<uint32_t> len(a.batch);
  uint64_t need = 16;
  for (uint32_t b = 0; b < a.batch; ++b) {
    len[b] = 1 + rng_below(a.max_len);
    if (a.long_len && b == a.batch - 1) len[b] = a.long_len;
    need += len[b] / a.bs + 2;
  }
  pvl_cache *c = make_cache(a.dt, 1, hq, a.hkv, a.d, a.bs, (uint32_t)need);
  EXPECT("setup", c, "cache");
  CacheGuard cg{c};
  std::vector<pvl_seq_id> ids(a.batch);
  for (uint32_t b = 0; b < a.batch; ++b)
    CPU_OK(c, pvl_seq_add(c, len[b], nullptr, 0, &ids[b]));
  size_t pool_bytes;
  unsigned char *pool = (unsigned char *)emu_ref_storage(c, &pool_bytes);
  const pvl_kv_geom geom = emu_ref_geom(c);
  memset(pool, 0, pool_bytes);
  /* The emulated pool: a copy the emulated writes must keep identical. */
  Buf emu_pool(pool_bytes);
  memcpy(emu_pool.p(), pool, pool_bytes);
  const size_t es = pvl_dtype_size(a.dt);
  const size_t row = (size_t)a.hkv * a.d;

  for (uint32_t b = 0; b < a.batch; ++b) {
    auto k = rand_elems(a.dt, len[b] * row, 1.0f);
    auto v = rand_elems(a.dt, len[b] * row, 1.0f);
    CPU_OK(c,
           pvl_kv_write(c, ids[b], 0, 0, len[b], k.data(), v.data(), nullptr));
    const int32_t *blocks;
    const uint32_t *pos;
    uint32_t n;
    emu_ref_table(c, ids[b], 0, &blocks, &pos, &n);
    EXPECT("kv_write_range",
           pvl_emu_kv_write_range(emu_pool.p(), &geom, blocks, 0, len[b],
                                  k.data(), v.data(), nullptr) == PVL_SUCCESS,
           "launch failed");
  }
  EXPECT("kv_write_range", memcmp(emu_pool.p(), pool, pool_bytes) == 0,
         "the emulated pool differs from the CPU twin's");
  {
    /* A sub-range read of the first row. */
    const uint32_t first = rng_below(len[0]), n = 1 + rng_below(len[0] - first);
    std::vector<unsigned char> kc(n * row * es), vc(n * row * es);
    Buf ke(n * row * es), ve(n * row * es);
    CPU_OK(c,
           pvl_kv_read(c, ids[0], 0, first, n, kc.data(), vc.data(), nullptr));
    const int32_t *blocks;
    const uint32_t *pos;
    uint32_t nt;
    emu_ref_table(c, ids[0], 0, &blocks, &pos, &nt);
    EXPECT("kv_read_range",
           pvl_emu_kv_read_range(emu_pool.p(), &geom, blocks, first, n, ke.p(),
                                 ve.p(), nullptr) == PVL_SUCCESS,
           "launch failed");
    EXPECT("kv_read_range",
           memcmp(kc.data(), ke.p(), kc.size()) == 0 &&
               memcmp(vc.data(), ve.p(), vc.size()) == 0,
           "tokens [%u, %u) differ", first, first + n);
  }

  /* One decode step: the plan's n_appended path and the decode write. */
  CPU_OK(c, pvl_seq_append(c, ids.data(), a.batch, nullptr));
  PlanGuard pg;
  CPU_OK(c, pvl_plan_create(c, a.batch, 0, &pg.p));
  CPU_OK(c, pvl_plan_build(pg.p, ids.data(), a.batch, nullptr));
  {
    auto k = rand_elems(a.dt, a.batch * row, 1.0f);
    auto v = rand_elems(a.dt, a.batch * row, 1.0f);
    CPU_OK(c, pvl_plan_kv_write(pg.p, 0, k.data(), v.data(), nullptr));
    const pvl_plan_view view = emu_ref_plan_view(pg.p);
    EXPECT("plan_kv_write",
           pvl_emu_plan_kv_write(emu_pool.p(), &geom, &view, 0, k.data(),
                                 v.data(), nullptr) == PVL_SUCCESS,
           "launch failed");
    EXPECT("plan_kv_write", memcmp(emu_pool.p(), pool, pool_bytes) == 0,
           "the emulated pool differs from the CPU twin's");
  }
  if (a.empty_row >= 0) {
    CPU_OK(c, pvl_seq_retain(c, ids[a.empty_row], 0, nullptr, 0, nullptr));
    CPU_OK(c, pvl_plan_build(pg.p, ids.data(), a.batch, nullptr));
  }
  if (a.empty_others) {
    for (uint32_t b = 0; b + 1 < a.batch; ++b)
      CPU_OK(c, pvl_seq_retain(c, ids[b], 0, nullptr, 0, nullptr));
    CPU_OK(c, pvl_plan_build(pg.p, ids.data(), a.batch, nullptr));
  }

  /* The plan reaches the emulated kernel through the plan scatter: every
   * element as an (index, value) pair, shuffled, with padding. */
  pvl_plan_view view = emu_ref_plan_view(pg.p);
  const int64_t elems =
      pvl_plan_buf_elems(view.num_layers, view.max_seqs, view.block_cap);
  std::vector<int32_t> pairs;
  for (int64_t i = 0; i < elems; ++i) {
    pairs.push_back((int32_t)i);
    pairs.push_back(view.buf[i]);
    if (rng_below(8) == 0) {
      pairs.push_back(-1);
      pairs.push_back(12345);
    }
  }
  for (size_t i = pairs.size() / 2; i > 1; --i) {
    const size_t j = rng_below((uint32_t)i);
    std::swap(pairs[2 * (i - 1)], pairs[2 * j]);
    std::swap(pairs[2 * (i - 1) + 1], pairs[2 * j + 1]);
  }
  Buf plan_buf((size_t)elems * 4);
  EXPECT("plan_scatter",
         pvl_emu_plan_scatter((int32_t *)plan_buf.p(), pairs.data(),
                              (uint32_t)(pairs.size() / 2),
                              nullptr) == PVL_SUCCESS,
         "launch failed");
  EXPECT("plan_scatter", memcmp(plan_buf.p(), view.buf, (size_t)elems * 4) == 0,
         "scattered plan differs");
  view.buf = (const int32_t *)plan_buf.p();

  const float scale = 1.0f / sqrtf((float)a.d);
  const size_t nq = (size_t)a.batch * hq * a.d;
  auto q = rand_elems(a.dt, nq, a.qscale);
  std::vector<unsigned char> ref(nq * es);
  CPU_OK(c,
         pvl_attention_decode(pg.p, 0, q.data(), ref.data(), scale, nullptr));
  const size_t ws_bytes =
      pvl_emu_attention_workspace_bytes(&geom, view.max_seqs, (int32_t)hq);
  Buf ws(ws_bytes), out(nq * es);
  const pvl_status st = pvl_emu_attention_decode(
      emu_pool.p(), &geom, &view, 0, (int32_t)hq, q.data(), out.p(), scale,
      ws_bytes ? ws.p() : nullptr, ws_bytes, nullptr);
  EXPECT("attention", st == PVL_SUCCESS, "status %d", (int)st);
  if (!emu_clean("attention")) return false;
  const float eps = tol_eps(a.dt);
  for (size_t i = 0; i < nq; ++i) {
    const float r = emu_ref_load(a.dt, ref.data(), i);
    const float g = emu_ref_load(a.dt, out.p(), i);
    EXPECT("attention values",
           !isnan(g) && fabsf(g - r) <= 1e-3f + fabsf(r) * eps,
           "element %zu (row %zu head %zu): emulated %g cpu %g", i,
           i / ((size_t)hq * a.d), i / a.d % hq, (double)g, (double)r);
  }
  if (a.long_splits != 0) {
    /* Right values do not show that the work was balanced: read the plan
     * the launch made. */
    std::vector<int32_t> splits(a.batch);
    EXPECT("attention plan",
           pvl_emu_attention_row_splits(ws.p(), &geom, (int32_t)a.batch,
                                        (int32_t)hq,
                                        splits.data()) == PVL_SUCCESS,
           "no plan");
    const int32_t got = splits[a.batch - 1];
    EXPECT("attention plan",
           a.long_splits > 0 ? got == a.long_splits : got >= -a.long_splits,
           "long row cut into %d splits, expected %s%d", (int)got,
           a.long_splits > 0 ? "" : ">= ", abs(a.long_splits));
    for (uint32_t b = 0; b + 1 < a.batch; ++b)
      EXPECT("attention plan", splits[b] == 1, "short row %u cut into %d",
             b, (int)splits[b]);
  }
  return true;
}

/* ---- observe ---- */

bool observe_case(pvl_dtype dt, uint32_t d, uint32_t bs, uint32_t gqa,
                  uint32_t m, uint32_t rows, uint32_t retain_every, int sms) {
  pvl_emu::set_sm_count(sms);
  const uint32_t hkv = 2, hq = hkv * gqa;
  pvl_cache *c = make_cache(dt, 1, hq, hkv, d, bs, 2 * (m / bs + 2) + 8);
  EXPECT("setup", c, "cache");
  CacheGuard cg{c};
  pvl_seq_id id;
  CPU_OK(c, pvl_seq_add(c, m, nullptr, 0, &id));
  {
    auto k = rand_elems(dt, (size_t)m * hkv * d, 1.0f);
    auto v = rand_elems(dt, (size_t)m * hkv * d, 1.0f);
    CPU_OK(c, pvl_kv_write(c, id, 0, 0, m, k.data(), v.data(), nullptr));
  }
  if (retain_every > 0) {
    std::vector<uint32_t> keep;
    for (uint32_t i = 0; i < m; ++i)
      if (i % retain_every == 0 || i == m - 1) keep.push_back(i);
    CPU_OK(c, pvl_seq_retain(c, id, 0, keep.data(), (uint32_t)keep.size(),
                             nullptr));
  }
  const uint32_t first = m - rows;
  const float scale = 0.125f, threshold = 0.1f;
  auto q = rand_elems(dt, (size_t)rows * hq * d, 3.0f);
  CPU_OK(c, pvl_observe(c, id, 0, q.data(), first, rows, threshold, scale,
                        nullptr));
  const int32_t *blocks;
  const uint32_t *pos;
  uint32_t n_keys;
  emu_ref_table(c, id, 0, &blocks, &pos, &n_keys);
  EXPECT("setup", retain_every == 0 || pos != nullptr,
         "a retained table should carry positions");
  size_t pool_bytes;
  void *pool = emu_ref_storage(c, &pool_bytes);
  const pvl_kv_geom geom = emu_ref_geom(c);
  const size_t ws_bytes = pvl_emu_observe_workspace_bytes(rows, (int32_t)hq);
  Buf ws(ws_bytes), raw(n_keys * 4), seen(n_keys * 4), below(hq * 8),
      total(hq * 8);
  const pvl_status st = pvl_emu_observe(
      pool, &geom, blocks, pos, n_keys, (int32_t)hq, q.data(), first, rows,
      scale, logf(threshold), (float *)raw.p(), (uint32_t *)seen.p(),
      (unsigned long long *)below.p(), (unsigned long long *)total.p(), ws.p(),
      ws_bytes, nullptr);
  EXPECT("observe", st == PVL_SUCCESS, "status %d", (int)st);
  if (!emu_clean("observe")) return false;
  const double *r_raw;
  const uint32_t *r_seen;
  const uint64_t *r_below, *r_total;
  emu_ref_obs(c, id, 0, &r_raw, &r_seen, &r_below, &r_total);
  EXPECT("setup", r_raw, "no CPU observation");
  const float *g_raw = (const float *)raw.p();
  const uint32_t *g_seen = (const uint32_t *)seen.p();
  for (uint32_t j = 0; j < n_keys; ++j) {
    EXPECT("observe seen", g_seen[j] == r_seen[j], "seen[%u]: %u vs %u", j,
           g_seen[j], r_seen[j]);
    const double r = r_raw[j];
    EXPECT("observe raw", fabs(g_raw[j] - r) <= 1e-4 + 1e-3 * fabs(r),
           "raw[%u]: emulated %g cpu %g", j, (double)g_raw[j], r);
  }
  const unsigned long long *g_below = (const unsigned long long *)below.p();
  const unsigned long long *g_total = (const unsigned long long *)total.p();
  for (uint32_t h = 0; h < hq; ++h) {
    EXPECT("observe total", g_total[h] == r_total[h], "total[%u]: %llu vs %llu",
           h, g_total[h], (unsigned long long)r_total[h]);
    /* Only logits within rounding of the threshold may count differently. */
    const double diff = fabs((double)g_below[h] - (double)r_below[h]);
    EXPECT("observe below", diff <= 2 + 1e-3 * (double)r_total[h],
           "below[%u]: %llu vs %llu", h, g_below[h],
           (unsigned long long)r_below[h]);
  }
  return true;
}

/* ---- compaction gather, block copy, vector widths ---- */

bool copy_case(pvl_dtype dt, uint32_t d, uint32_t bs, uint32_t hkv,
               uint32_t n) {
  const uint32_t nb = (n + bs - 1) / bs, blocks = 3 * nb + 8;
  pvl_cache *c = make_cache(dt, 1, hkv, hkv, d, bs, blocks);
  EXPECT("setup", c, "cache");
  CacheGuard cg{c};
  size_t pool_bytes;
  unsigned char *pool = (unsigned char *)emu_ref_storage(c, &pool_bytes);
  const pvl_kv_geom geom = emu_ref_geom(c);
  for (size_t i = 0; i < pool_bytes; ++i) pool[i] = (unsigned char)rng_next();
  pvl_seq_id id;
  CPU_OK(c, pvl_seq_add(c, n, nullptr, 0, &id));
  const int32_t *tb;
  const uint32_t *pos;
  uint32_t nt;
  emu_ref_table(c, id, 0, &tb, &pos, &nt);
  std::vector<int32_t> used(tb, tb + nb), fresh;
  for (int32_t b = 0; b < (int32_t)blocks; ++b)
    if (std::find(used.begin(), used.end(), b) == used.end())
      fresh.push_back(b);
  Buf emu_pool(pool_bytes);
  memcpy(emu_pool.p(), pool, pool_bytes);

  /* kv write through k/v bases offset by one element, so the copy kernels
   * take narrower vectors than the row alone allows. */
  const size_t es = pvl_dtype_size(dt), cnt = (size_t)n * hkv * d;
  auto k = rand_elems(dt, cnt + 1, 1.0f), v = rand_elems(dt, cnt + 1, 1.0f);
  CPU_OK(c,
         pvl_kv_write(c, id, 0, 0, n, k.data() + es, v.data() + es, nullptr));
  EXPECT("kv_write_range",
         pvl_emu_kv_write_range(emu_pool.p(), &geom, tb, 0, n, k.data() + es,
                                v.data() + es, nullptr) == PVL_SUCCESS,
         "launch failed");
  EXPECT("kv_write_range", memcmp(emu_pool.p(), pool, pool_bytes) == 0,
         "pools differ (d %u dtype %d)", d, (int)dt);

  /* Gather: n random source slots of the sequence into fresh blocks. */
  std::vector<int64_t> src(n);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t t = rng_below(n);
    src[i] = (int64_t)used[t / bs] * bs + t % bs;
  }
  std::vector<int32_t> dst(fresh.begin(), fresh.begin() + nb);
  CPU_OK(c, emu_ref_gather(c, src.data(), dst.data(), n));
  EXPECT("gather",
         pvl_emu_gather_slots(emu_pool.p(), &geom, src.data(), dst.data(), n,
                              nullptr) == PVL_SUCCESS,
         "launch failed");
  EXPECT("gather", memcmp(emu_pool.p(), pool, pool_bytes) == 0, "pools differ");

  /* Copy-on-write: the sequence's blocks into the remaining fresh ones. */
  std::vector<int32_t> cdst(fresh.begin() + nb, fresh.begin() + 2 * nb);
  CPU_OK(c, emu_ref_copy_blocks(c, used.data(), cdst.data(), nb));
  EXPECT("copy_blocks",
         pvl_emu_copy_blocks(emu_pool.p(), &geom, used.data(), cdst.data(), nb,
                             nullptr) == PVL_SUCCESS,
         "launch failed");
  EXPECT("copy_blocks", memcmp(emu_pool.p(), pool, pool_bytes) == 0,
         "pools differ");
  return true;
}

/* ---- the emulator's own checks ----
 * Each defect must be reported and each correct variant must pass: the
 * suite's silence on the real kernels is only worth what these show. */

void selftest() {
  namespace st = pvl_emu_selftest;
  /* The defects are expected: keep their reports off stderr. */
  pvl_emu::set_quiet(true);
  run("emulator: write-write race between warps, and its barrier", [] {
    EXPECT("self-test", st::waw(false) > 0, "race not reported");
    EXPECT("self-test", st::waw(true) == 0, "false report with a barrier");
    return true;
  });
  run("emulator: lanes of a warp ordered by __syncwarp only", [] {
    EXPECT("self-test", st::warp_sync(false) > 0, "race not reported");
    EXPECT("self-test", st::warp_sync(true) == 0, "false report");
    return true;
  });
  run("emulator: read of unwritten shared memory", [] {
    EXPECT("self-test", st::uninit() > 0, "not reported");
    return true;
  });
  run("emulator: collective naming an exited lane", [] {
    EXPECT("self-test", st::exited_lane() > 0, "not reported");
    return true;
  });
  run("emulator: lanes at different collectives", [] {
    EXPECT("self-test", st::divergent() > 0, "not reported");
    return true;
  });
  run("emulator: cp.async destination read before its wait_group", [] {
    bool values = false;
    EXPECT("self-test", st::cp_async(false, &values) > 0, "not reported");
    EXPECT("self-test", !values, "the destination was not poisoned");
    EXPECT("self-test", st::cp_async(true, &values) == 0 && values,
           "wrong after the wait");
    return true;
  });
  run("emulator: shuffle and ballot values", [] {
    EXPECT("self-test", st::values(), "wrong values or a report");
    return true;
  });
  pvl_emu::set_quiet(false);
}

/* ---- the grid ---- */

/* Cheap cases first: a mutant run stops at its first failure. */
void suite(bool full) {
  const pvl_dtype dts[] = {PVL_DTYPE_F16, PVL_DTYPE_BF16};
  const uint32_t ds[] = {64, 128, 256}, bss[] = {16, 32};
  const uint32_t gqas[] = {1, 2, 4, 8};
  char name[200];
  auto attn = [&](const AttnCase &a) {
    snprintf(name, sizeof(name),
             "attention dt=%d d=%u bs=%u hkv=%u gqa=%u batch=%u max_len=%u "
             "qscale=%g empty_row=%lld sms=%d long_len=%u empty_others=%d",
             (int)a.dt, a.d, a.bs, a.hkv, a.gqa, a.batch, a.max_len,
             (double)a.qscale, (long long)a.empty_row, a.sms, a.long_len,
             (int)a.empty_others);
    run(name, [&] { return attention_case(a); });
  };
  auto obs = [&](pvl_dtype dt, uint32_t d, uint32_t bs, uint32_t gqa,
                 uint32_t m, uint32_t rows, uint32_t every, int sms) {
    snprintf(name, sizeof(name),
             "observe dt=%d d=%u bs=%u gqa=%u m=%u rows=%u retain_every=%u "
             "sms=%d",
             (int)dt, d, bs, gqa, m, rows, every, sms);
    run(name,
        [&] { return observe_case(dt, d, bs, gqa, m, rows, every, sms); });
  };

  /* Copy kernels at every vector width: 16 (f16 x 128), 8 (f32 x 2 and the
   * base offset), 4 (f32 x 3), 2 (f16 x 5). */
  rng_state = 0x2222;
  const struct {
    pvl_dtype dt;
    uint32_t d, bs, hkv, n;
  } cps[] = {{PVL_DTYPE_F16, 128, 16, 2, 100},
             {PVL_DTYPE_F32, 2, 8, 3, 77},
             {PVL_DTYPE_F32, 3, 4, 2, 50},
             {PVL_DTYPE_F16, 5, 16, 1, 40},
             {PVL_DTYPE_BF16, 64, 32, 4, 300}};
  for (const auto &x : cps) {
    snprintf(name, sizeof(name), "copies dt=%d d=%u bs=%u hkv=%u n=%u",
             (int)x.dt, x.d, x.bs, x.hkv, x.n);
    run(name, [&] { return copy_case(x.dt, x.d, x.bs, x.hkv, x.n); });
  }
  /* observe pass 1 without key splits over several key tiles of a retained
   * table (early: a barrier mutant of pass 1 shows only here). */
  obs(PVL_DTYPE_F16, 64, 16, 1, 900, 120, 3, 1);

  /* attention_grid of the GPU tests: every dtype x head_dim x block size x
   * GQA ratio (reduced: one ratio per shape, rotating), 132 SMs, so every
   * case splits and runs the combine pass. */
  rng_state = 0x1234;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 3; ++b)
      for (int c = 0; c < 2; ++c)
        for (int e = 0; e < 4; ++e) {
          if (!full && e != (a + b + 2 * c) % 4) continue;
          attn({dts[a], ds[b], bss[c], 2, gqas[e], 1 + rng_below(8),
                full ? 300u : 200u, 2.0f, -1, 132});
        }
  /* GQA ratios that are not powers of two (the padded heads are masked),
   * and a ratio above 8 (several CTAs per KV head). */
  attn({PVL_DTYPE_F16, 128, 16, 2, 3, 3, 150, 2.0f, -1, 132});
  attn({PVL_DTYPE_BF16, 64, 32, 1, 12, 2, 150, 2.0f, -1, 132});

  /* Long rows: many tiles per warp, several splits per row. */
  rng_state = 0x5678;
  attn(
      {PVL_DTYPE_BF16, 128, 16, 2, 4, 1, full ? 32768u : 3000u, 2.0f, -1, 132});
  attn({PVL_DTYPE_F16, 64, 16, 2, 8, 1, full ? 8192u : 2000u, 2.0f, -1, 132});

  /* One split per row (no combine pass: the main kernel normalises, stores
   * and zeroes empty rows): batch * kv_heads >= 2 * SMs. At 132 SMs and 8
   * KV heads that is 33 rows; with a zero-token row. */
  rng_state = 0x9abd;
  attn({PVL_DTYPE_F16, 128, 16, 8, 4, 36, full ? 600u : 60u, 2.0f, 5, 132});
  attn({PVL_DTYPE_BF16, 64, 32, 2, 2, 5, 300, 16.0f, 0, 4});
  /* A split batch with an empty row: the row is one item and the decode
   * kernel writes its zeros. */
  attn({PVL_DTYPE_BF16, 128, 16, 2, 4, 3, full ? 5000u : 1500u, 2.0f, 1, 132});

  /* Skew (issue 9): the split plan follows the real lengths. 15 short rows
   * and one long row: at 132 SMs the long row takes kMaxSplits splits, the
   * short ones stay whole (split items first, whole rows after them); at 4
   * SMs the chunk comes from the total work (a few splits). */
  rng_state = 0x9abf;
  attn({PVL_DTYPE_F16, 128, 16, 2, 4, 16, 100, 2.0f, 3, 132,
        full ? 20000u : 5000u, false, 32});
  attn({PVL_DTYPE_BF16, 64, 32, 2, 2, 16, 150, 2.0f, -1, 4,
        full ? 9000u : 3000u, false, -2});
  /* One long row alone at 4 SMs; every row empty but the last (one item
   * per empty row, zeroed by the decode kernel next to a cut row). */
  attn({PVL_DTYPE_F16, 64, 16, 2, 8, 1, 100, 2.0f, -1, 4, 2500u, false, 8});
  attn({PVL_DTYPE_BF16, 128, 32, 2, 4, 6, 100, 16.0f, -1, 132, 1800u, true,
        15});
  /* No split capacity at all (1 SM, 8 KV heads: fewer CTA slots than CTAs
   * per item): every row whole, no combine pass. */
  attn({PVL_DTYPE_F16, 128, 16, 8, 2, 6, 300, 2.0f, 2, 1, 800u, false, 1});

  /* Peaky softmax (queries x16): the running-max rescale between tiles and
   * between splits matters. */
  rng_state = 0x9abe;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 3; ++b) {
      if (!full && (a + b) % 2) continue;
      attn({dts[a], ds[b], 16, 2, 4, 2, full ? 9000u : 1200u, 16.0f, -1, 132});
      attn({dts[a], ds[b], 32, 2, 8, 5, full ? 700u : 300u, 16.0f, -1, 132});
    }

  /* Observe: pass 1 with key splits (132 SMs) and without (1 SM: the row
   * tiles alone fill it), head_dim 64/128/256, block size 16/32, retained
   * tables whose key positions are not slot indices. */
  rng_state = 0x1111;
  for (int a = 0; a < 2; ++a)
    for (uint32_t gqa = 1; gqa <= 8; gqa *= 2) {
      if (!full && gqa != (a ? 2u : 8u)) continue;
      obs(dts[a], 128, 16, gqa, full ? 700u : 300u, 60, 0, 132);
    }
  rng_state = 0x1112;
  obs(PVL_DTYPE_F16, 64, 32, 4, 900, 80, 0, 132);
  obs(PVL_DTYPE_BF16, 256, 16, 2, 500, 40, 0, 132);
  obs(PVL_DTYPE_F16, 256, 32, 8, 333, 33, 0, 1);
  obs(PVL_DTYPE_F16, 128, 16, 4, 40, 40, 0, 132); /* one key tile */
  obs(PVL_DTYPE_BF16, 128, 32, 2, full ? 3000u : 700u, full ? 2048u : 300u, 0,
      1); /* many row tiles, no key split */
  obs(PVL_DTYPE_F16, 128, 16, 4, 1200, 100, 3, 132);
  obs(PVL_DTYPE_BF16, 64, 32, 2, 800, 64, 5, 132);
}

int run_suite(bool full) {
  const time_t t0 = time(nullptr);
  selftest();
  suite(full);
  long launches, ctas;
  pvl_emu::counters(&launches, &ctas);
  printf("%ld passed, %ld failed (%ld launches, %ld CTAs emulated, %lds)\n",
         g_pass, g_fail, launches, ctas, (long)(time(nullptr) - t0));
  return g_fail == 0 ? 0 : 1;
}

/* Every variant in a child process: it must fail (exit status 1 from a
 * failed check; a crash or a hang counts as caught too, but is reported).
 * A variant that passes fails this run. */
int run_mutants(const char *self) {
  int survivors = 0;
  for (int n = 1; n <= kNumMutants; ++n) {
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
      char arg[16];
      snprintf(arg, sizeof(arg), "%d", n);
      alarm(600);
      execl(self, self, "--mutant", arg, (char *)nullptr);
      _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    const bool caught = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    printf("mutant %d (%s): %s", n, kMutants[n],
           caught ? "caught" : "SURVIVED");
    if (WIFSIGNALED(status)) printf(" (signal %d)", WTERMSIG(status));
    printf("\n");
    if (!caught) ++survivors;
  }
  printf("%d of %d mutants caught\n", kNumMutants - survivors, kNumMutants);
  return survivors == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char **argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (const char *s = getenv("PVL_EMU_SEED"))
    pvl_emu::set_seed(strtoull(s, nullptr, 0));
  const bool full =
      getenv("PVL_EMU_FULL") && strcmp(getenv("PVL_EMU_FULL"), "0");
  if (argc >= 2 && strcmp(argv[1], "--mutants") == 0)
    return run_mutants("/proc/self/exe");
  if (argc >= 3 && strcmp(argv[1], "--mutant") == 0) {
    const int n = atoi(argv[2]);
    if (n < 1 || n > kNumMutants) return 2;
    pvl_emu::set_mutant(n);
    g_stop = true;
    printf("mutant %d: %s\n", n, kMutants[n]);
    const int rc = run_suite(full);
    printf("mutant %d survived the suite\n", n);
    return rc;
  }
  return run_suite(full);
}
