/* The host CUDA emulator behind cuda_emu.h: CTAs of cooperative fibers,
 * warp collectives, cp.async groups, ldmatrix / mma.sync fragments, and a
 * shadow of shared memory that reports races and reads of unwritten words.
 *
 * Scheduling. A launch runs its CTAs one after the other. The threads of a
 * CTA are fibers (ucontext) that run until they reach a sync point
 * (__syncthreads, a warp collective, thread exit) and then yield; the next
 * fiber is drawn at random (seeded) among the runnable ones, so the order
 * of threads between sync points changes with the seed and an ordering bug
 * shows as a race report or a wrong value.
 *
 * Ordering rule of the race detector. Two accesses to the same 4-byte word
 * of shared memory by different threads, at least one a write, are ordered
 * iff a __syncthreads separates them (the CTA barrier epoch differs), or
 * both threads are in the same warp and a full-mask __syncwarp separates
 * them (the warp's epoch differs). Shuffles and votes do not order memory
 * (the CUDA memory model gives them no such guarantee). Atomics never race
 * with each other, but race with unordered plain accesses. A cp.async
 * destination is "in flight" from the issue to the issuing thread's
 * wait_group that retires its group: any access to it in between (by
 * anyone, the issuer included) is reported, and its bytes hold 0xff (NaN in
 * every float format) until then. A read of a word no thread of the CTA has
 * written yet is reported too (shared memory starts undefined). */
#include "cuda_emu.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <deque>
#include <map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PVL_EMU_ASAN 1
/* __asan_report_{load,store}_n(void *, long) are GCC built-ins here. */
#else
#define PVL_EMU_ASAN 0
#endif

/* The executable's writable data segment (.data and .bss), from the linker:
 * __shared__ variables are function-local statics, so they live there. */
extern "C" char __data_start[], _end[];

namespace pvl_emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynSmem = 227 * 1024; /* sm_90 opt-in maximum */
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxPrinted = 12;

enum State { kRunnable, kBarrier, kWarp, kDone };
enum WarpKind { kLdsm = 100, kMma = 101 };
constexpr int16_t kNobody = -1, kAtomic = -2;

struct Req {
  int kind;
  unsigned mask;
  uint64_t value;
  int arg, width;
  uint64_t out;
  /* ldmatrix: addr in, r out; mma: a, b, c in, d out. */
  uint32_t addr;
  uint32_t a[4], b0, b1;
  float c[4];
  bool bf16;
  uint32_t r[4];
  float d[4];
};

struct Copy {
  uint32_t dst;
  const void *src;
  int bytes, src_bytes;
};

struct Fiber {
  ucontext_t ctx;
  char *stack = nullptr;
  int state = kDone;
  uint3 tid{0, 0, 0};
  Req req{};
  std::vector<Copy> open;                  /* not yet committed */
  std::deque<std::vector<Copy>> committed; /* oldest first */
  void *fake_stack = nullptr;
};

/* Shadow of one 4-byte word of the data segment, valid for the running CTA
 * (reset when the CTA ends). */
struct Word {
  uint32_t w_ce, w_we; /* epochs of the last write; w_ce 0: never written */
  int16_t w_tid;       /* its thread, kNobody or kAtomic */
  int16_t pend;        /* 1 + thread of an in-flight cp.async, else 0 */
  uint32_t r_ce;       /* CTA epoch of the reads summarized below */
  uint32_t r_we;       /* warp epoch of the newest reads of warp r_warps */
  uint32_t r_warps;    /* warps that read in r_ce */
  uint32_t r_lanes;    /* lanes of that warp that read at r_we */
  bool touched;
};

struct Emu {
  /* configuration */
  int sms = 132;
  uint64_t seed = 0x5eed;
  int mutant = 0;
  bool quiet = false;
  /* results */
  long errors = 0, printed = 0, launches = 0, ctas = 0;
  cudaError_t last = cudaSuccess;
  std::map<const void *, int> max_dyn;
  /* the running launch */
  const char *name = "";
  dim3 grid, block;
  size_t smem = 0;
  uint3 bidx{0, 0, 0};
  Body body = nullptr;
  void *body_ctx = nullptr;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  int cur = -1;
  ucontext_t sched;
  void *sched_fake = nullptr;
  const void *main_bottom = nullptr;
  size_t main_size = 0;
  std::vector<int> runnable;
  int n_done = 0, n_bar = 0;
  bool abort_cta = false;
  uint32_t ce = 1;
  uint32_t we[kMaxThreads / 32];
  uint64_t rng = 0;
  /* shadow */
  std::vector<Word> shadow;
  std::vector<uint32_t> touched;
};

Emu E;
alignas(128) unsigned char g_dyn[kMaxDynSmem];

uint64_t next_rand() {
  uint64_t z = (E.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__attribute__((format(printf, 1, 2))) void report(const char *fmt, ...) {
  ++E.errors;
  if (E.quiet || E.printed >= kMaxPrinted) return;
  ++E.printed;
  fprintf(stderr, "EMU ERROR [%s block (%u,%u,%u)", E.name, E.bidx.x, E.bidx.y,
          E.bidx.z);
  if (E.cur >= 0) fprintf(stderr, " thread %d", E.cur);
  fprintf(stderr, "]: ");
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

/* ---- fibers ---- */

void switch_to_sched(Fiber &f, bool dying) {
#if PVL_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, E.main_bottom,
                                 E.main_size);
#else
  (void)dying;
#endif
  swapcontext(&f.ctx, &E.sched);
#if PVL_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

/* Blocks the running fiber (its state already set) until it is runnable. */
void yield() { switch_to_sched(E.fibers[E.cur], false); }

void make_runnable(int t) {
  E.fibers[t].state = kRunnable;
  E.runnable.push_back(t);
}

void apply_copies(int t, std::vector<Copy> &g);

void fiber_main() {
#if PVL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &E.main_bottom, &E.main_size);
#endif
  E.body(E.body_ctx);
  const int t = E.cur;
  Fiber &f = E.fibers[t];
  /* The hardware completes copies nobody waited for; nobody can read them
   * without a wait either, so applying them now is equivalent. */
  while (!f.committed.empty()) {
    apply_copies(t, f.committed.front());
    f.committed.pop_front();
  }
  apply_copies(t, f.open);
  f.state = kDone;
  ++E.n_done;
  /* A collective naming this lane can never complete now. */
  const int w0 = t / 32 * 32;
  for (int i = w0; i < w0 + 32 && i < E.nthreads; ++i) {
    const Fiber &o = E.fibers[i];
    if (o.state == kWarp && (o.req.mask >> (t % 32) & 1)) {
      report("lane %d exited while lane %d waits in a warp collective (kind "
             "%d, mask %08x) that names it",
             t % 32, i % 32, o.req.kind, o.req.mask);
      E.abort_cta = true;
    }
  }
  if (E.n_bar > 0) {
    report("thread exited while %d threads wait at __syncthreads", E.n_bar);
    E.abort_cta = true;
  }
  switch_to_sched(f, true);
  abort(); /* never resumed */
}

/* ---- shadow ---- */

bool in_segment(uintptr_t a) {
  return a >= (uintptr_t)__data_start && a < (uintptr_t)_end;
}

Word &word_at(uint32_t w) {
  Word &x = E.shadow[w];
  if (!x.touched) {
    x = Word{};
    x.w_tid = kNobody;
    x.touched = true;
    E.touched.push_back(w);
  }
  return x;
}

bool write_ordered(const Word &x, int t) {
  if (x.w_ce != E.ce) return true;
  if (x.w_tid == kAtomic) return false;
  if (x.w_tid == t) return true;
  return x.w_tid / 32 == t / 32 && x.w_we != E.we[t / 32];
}

bool reads_ordered(const Word &x, int t) {
  if (x.r_ce != E.ce || x.r_warps == 0) return true;
  const uint32_t mine = 1u << (t / 32);
  if (x.r_warps & ~mine) return false;
  return x.r_we != E.we[t / 32] || (x.r_lanes & ~(1u << (t % 32))) == 0;
}

enum Access { kRead, kWrite, kAtomicRmw, kAsyncIssue };

void check_word(uint32_t w, int t, int kind) {
  Word &x = word_at(w);
  const uintptr_t addr = (uintptr_t)__data_start + 4 * (uintptr_t)w;
  if (x.pend) {
    report("access (%s) to shared word %#lx while a cp.async of thread %d "
           "into it is in flight (no wait_group retired it)",
           kind == kRead ? "read" : "write", (unsigned long)addr, x.pend - 1);
    return;
  }
  if (kind == kRead) {
    if (x.w_ce == 0) {
      report("read of shared word %#lx that no thread of this CTA wrote",
             (unsigned long)addr);
    } else if (!write_ordered(x, t)) {
      report("race: thread %d reads shared word %#lx written by %s%d with no "
             "barrier between",
             t, (unsigned long)addr, x.w_tid == kAtomic ? "an atomic " : "",
             x.w_tid == kAtomic ? 0 : x.w_tid);
    }
    const uint32_t bit = 1u << (t / 32);
    if (x.r_ce != E.ce) {
      x.r_ce = E.ce;
      x.r_warps = 0;
      x.r_lanes = 0;
      x.r_we = E.we[t / 32];
    }
    if ((x.r_warps | bit) == bit && x.r_we != E.we[t / 32]) {
      x.r_we = E.we[t / 32];
      x.r_lanes = 0;
    }
    x.r_warps |= bit;
    x.r_lanes |= 1u << (t % 32);
    return;
  }
  const bool both_atomic =
      kind == kAtomicRmw && x.w_tid == kAtomic && x.w_ce == E.ce;
  if (x.w_ce != 0 && !both_atomic && !write_ordered(x, t))
    report("race: thread %d writes shared word %#lx written by %s%d with no "
           "barrier between",
           t, (unsigned long)addr, x.w_tid == kAtomic ? "an atomic " : "",
           x.w_tid == kAtomic ? 0 : x.w_tid);
  if (!reads_ordered(x, t))
    report("race: thread %d writes shared word %#lx that other threads read "
           "with no barrier between (warps %08x)",
           t, (unsigned long)addr, x.r_warps);
  x.w_tid = kind == kAtomicRmw ? kAtomic : (int16_t)t;
  x.w_ce = E.ce;
  x.w_we = E.we[t / 32];
  x.r_ce = 0;
  if (kind == kAsyncIssue) x.pend = (int16_t)(t + 1);
}

void check_range(uintptr_t a, size_t n, int t, int kind) {
  if (a >= (uintptr_t)g_dyn && a < (uintptr_t)g_dyn + kMaxDynSmem &&
      a + n > (uintptr_t)g_dyn + E.smem) {
    report("dynamic shared memory access at byte %lu (+%zu) beyond the %zu "
           "bytes of the launch",
           (unsigned long)(a - (uintptr_t)g_dyn), n, E.smem);
    return;
  }
  const uintptr_t base = (uintptr_t)__data_start;
  for (uintptr_t w = (a - base) / 4; w <= (a + n - 1 - base) / 4; ++w)
    check_word((uint32_t)w, t, kind);
}

__attribute__((no_sanitize_address)) void on_access(uintptr_t a, size_t n,
                                                    bool write) {
  if (E.cur >= 0 && in_segment(a)) {
    check_range(a, n, E.cur, write ? kWrite : kRead);
    return;
  }
#if PVL_EMU_ASAN
  /* Global (device) memory: what ASan would have checked had the kernel
   * code been compiled with it. */
  if (__asan_region_is_poisoned((void *)a, n)) {
    if (write)
      __asan_report_store_n((void *)a, (long)n);
    else
      __asan_report_load_n((void *)a, (long)n);
  }
#endif
}

/* Reset the words the CTA touched, and poison them for the next one. */
void end_cta_shadow() {
  for (uint32_t w : E.touched) {
    E.shadow[w].touched = false;
    memset(__data_start + 4 * (size_t)w, 0xff, 4);
  }
  E.touched.clear();
}

/* ---- cp.async ---- */

void apply_copies(int t, std::vector<Copy> &g) {
  for (const Copy &c : g) {
    char *dst = __data_start + c.dst;
    for (int i = 0; i < c.bytes; i += 4) {
      Word &x = word_at((uint32_t)((c.dst + i) / 4));
      x.pend = 0;
      x.w_tid = (int16_t)t;
      x.w_ce = E.ce;
      x.w_we = E.we[t / 32];
      x.r_ce = 0;
    }
    if (c.src_bytes > 0) memcpy(dst, c.src, (size_t)c.src_bytes);
    memset(dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
  }
  g.clear();
}

/* ---- warp collectives ---- */

void complete_warp(int w0, unsigned mask, int kind) {
  Fiber *f = &E.fibers[w0];
  auto in = [&](int l) { return (mask >> l & 1) != 0; };
  switch (kind) {
  case kShfl:
  case kShflXor:
    for (int l = 0; l < 32; ++l) {
      if (!in(l)) continue;
      Req &r = f[l].req;
      const int width = r.width;
      int src;
      if (kind == kShfl) {
        src = (l & ~(width - 1)) + (r.arg & (width - 1));
      } else {
        src = l ^ r.arg;
        if (src / width != l / width) src = l;
      }
      if (!in(src)) {
        report("lane %d shuffles from lane %d, outside the mask %08x", l, src,
               mask);
        r.out = 0;
      } else {
        r.out = f[src].req.value;
      }
    }
    break;
  case kSyncWarp:
    if (mask == 0xffffffffu) ++E.we[w0 / 32];
    break;
  case kAny:
  case kAll:
  case kBallot: {
    uint32_t ballot = 0;
    for (int l = 0; l < 32; ++l)
      if (in(l) && f[l].req.value) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
      if (!in(l)) continue;
      f[l].req.out = kind == kBallot ? ballot
                     : kind == kAny  ? (ballot != 0)
                                     : (ballot == mask);
    }
    break;
  }
  case kLdsm: {
    /* PTX ldmatrix .m8n8.x4.b16: lanes 8m..8m+7 address the rows of matrix
     * m; lane l receives elements 2 (l % 4), +1 of row l / 4 of each. */
    uint16_t rows[4][8][8];
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < 8; ++r) {
        const int l = 8 * m + r;
        const uint32_t a = f[l].req.addr;
        if (((uintptr_t)__data_start + a) % 16 != 0)
          report("ldmatrix row address %#x not 16-aligned", a);
        check_range((uintptr_t)__data_start + a, 16, w0 + l, kRead);
        memcpy(rows[m][r], __data_start + a, 16);
      }
    for (int l = 0; l < 32; ++l)
      for (int m = 0; m < 4; ++m)
        f[l].req.r[m] = (uint32_t)rows[m][l / 4][2 * (l % 4)] |
                        (uint32_t)rows[m][l / 4][2 * (l % 4) + 1] << 16;
    break;
  }
  case kMma: {
    /* PTX mma.m16n8k16 .row.col, f16/bf16 inputs, f32 accumulators; g =
     * lane / 4, t = lane % 4. A: a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g,
     * 2t + 8..), a3 (g + 8, 2t + 8..); B (k, n): b0 (2t.., g), b1 (2t + 8..,
     * g); C/D: c0 c1 (g, 2t..), c2 c3 (g + 8, 2t..). */
    float A[16][16], B[16][8], C[16][8];
    auto cvt = [&](uint32_t w, int half) {
      const uint16_t h = (uint16_t)(w >> (16 * half));
      return f[0].req.bf16 ? __uint_as_float((uint32_t)h << 16) : f16_to_f32(h);
    };
    for (int l = 0; l < 32; ++l) {
      const Req &r = f[l].req;
      if (r.bf16 != f[0].req.bf16) report("mma with mixed input types");
      const int g = l / 4, t = l % 4;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = cvt(r.a[0], h);
        A[g + 8][2 * t + h] = cvt(r.a[1], h);
        A[g][2 * t + 8 + h] = cvt(r.a[2], h);
        A[g + 8][2 * t + 8 + h] = cvt(r.a[3], h);
        B[2 * t + h][g] = cvt(r.b0, h);
        B[2 * t + 8 + h][g] = cvt(r.b1, h);
        C[g][2 * t + h] = r.c[h];
        C[g + 8][2 * t + h] = r.c[2 + h];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int i = g + 8 * (e / 2), j = 2 * t + e % 2;
        /* Products of 16-bit floats are exact in fp32; the hardware's
         * summation order is unspecified, so sum exactly-ish in double. */
        double s = C[i][j];
        for (int k = 0; k < 16; ++k) s += (double)A[i][k] * B[k][j];
        f[l].req.d[e] = (float)s;
      }
    }
    break;
  }
  }
  for (int l = 0; l < 32; ++l)
    if (in(l)) make_runnable(w0 + l);
}

/* The running lane arrived at a collective: complete it once every lane
 * its mask names is there, then yield either way. */
void arrive_warp() {
  const int t = E.cur, w0 = t / 32 * 32, lane = t % 32;
  Fiber &me = E.fibers[t];
  me.state = kWarp;
  const unsigned mask = me.req.mask;
  if (!(mask >> lane & 1)) {
    report("lane %d calls a collective (kind %d) with mask %08x that does "
           "not name it",
           lane, me.req.kind, mask);
    E.abort_cta = true;
    yield();
    return;
  }
  bool all = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    if (w0 + l >= E.nthreads) {
      report("collective mask %08x names lane %d beyond the block", mask, l);
      E.abort_cta = true;
      break;
    }
    const Fiber &o = E.fibers[w0 + l];
    if (o.state == kDone) {
      report("collective (kind %d, mask %08x) names lane %d, which exited",
             me.req.kind, mask, l);
      E.abort_cta = true;
      break;
    }
    if (o.state != kWarp) {
      all = false;
      continue;
    }
    if (o.req.kind != me.req.kind || o.req.mask != mask) {
      report("lanes %d and %d are at different collectives (kind %d mask "
             "%08x vs kind %d mask %08x)",
             lane, l, me.req.kind, mask, o.req.kind, o.req.mask);
      E.abort_cta = true;
      break;
    }
  }
  if (all && !E.abort_cta) complete_warp(w0, mask, me.req.kind);
  yield();
}

/* Out of line: getcontext returns twice, which must not clobber the
 * caller's loop. */
__attribute__((noinline)) void init_fiber(int t) {
  Fiber &f = E.fibers[t];
  if (!f.stack) {
    f.stack = (char *)mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (f.stack == MAP_FAILED) {
      fprintf(stderr, "emu: no memory for fiber stacks\n");
      abort();
    }
  }
  f.tid = uint3{t % E.block.x, t / E.block.x % E.block.y,
                t / (E.block.x * E.block.y)};
  f.open.clear();
  f.committed.clear();
  f.fake_stack = nullptr;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main, 0);
  make_runnable(t);
}

void run_cta() {
  E.n_done = 0;
  E.n_bar = 0;
  E.abort_cta = false;
  E.ce = 1;
  for (uint32_t &w : E.we) w = 1;
  E.runnable.clear();
  for (int t = 0; t < E.nthreads; ++t) init_fiber(t);
  while (!E.abort_cta) {
    if (E.runnable.empty()) {
      if (E.n_done == E.nthreads) break;
      E.cur = -1;
      report("deadlock: %d threads wait at __syncthreads, %d in warp "
             "collectives, %d exited",
             E.n_bar, E.nthreads - E.n_bar - E.n_done, E.n_done);
      E.abort_cta = true;
      break;
    }
    const size_t i = next_rand() % E.runnable.size();
    const int t = E.runnable[i];
    E.runnable[i] = E.runnable.back();
    E.runnable.pop_back();
    E.cur = t;
#if PVL_EMU_ASAN
    __sanitizer_start_switch_fiber(&E.sched_fake, E.fibers[t].stack,
                                   kStackBytes);
#endif
    swapcontext(&E.sched, &E.fibers[t].ctx);
#if PVL_EMU_ASAN
    __sanitizer_finish_switch_fiber(E.sched_fake, nullptr, nullptr);
#endif
  }
  E.cur = -1;
#if PVL_EMU_ASAN
  /* Abandoned fibers leave the poison of their live frames behind. */
  if (E.abort_cta)
    for (int t = 0; t < E.nthreads; ++t)
      __asan_unpoison_memory_region(E.fibers[t].stack, kStackBytes);
#endif
  end_cta_shadow();
}

} // namespace

/* ---- public side ---- */

void set_sm_count(int sms) { E.sms = sms; }
void set_seed(uint64_t seed) { E.seed = seed; }
void set_mutant(int n) { E.mutant = n; }
void set_quiet(bool quiet) { E.quiet = quiet; }
int mutant() { return E.mutant; }
long take_errors() {
  const long e = E.errors;
  E.errors = 0;
  E.printed = 0;
  return e;
}
void counters(long *launches, long *ctas) {
  *launches = E.launches;
  *ctas = E.ctas;
}
int device_sms() { return E.sms; }

cudaError_t last_error(bool reset) {
  const cudaError_t e = E.last;
  if (reset) E.last = cudaSuccess;
  return e;
}

cudaError_t set_func_attr(const void *fn, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      (size_t)value > kMaxDynSmem) {
    E.last = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  E.max_dyn[fn] = value;
  return cudaSuccess;
}

uint3 thread_idx() { return E.fibers[E.cur].tid; }
uint3 block_idx() { return E.bidx; }
uint3 block_dim() { return uint3{E.block.x, E.block.y, E.block.z}; }
uint3 grid_dim() { return uint3{E.grid.x, E.grid.y, E.grid.z}; }
unsigned char *dynamic_smem() { return g_dyn; }

uint32_t smem_offset(const void *p) {
  if (!in_segment((uintptr_t)p)) {
    report("__cvta_generic_to_shared of %p, which is not shared memory", p);
    return 0;
  }
  return (uint32_t)((const char *)p - __data_start);
}

void syncthreads() {
  Fiber &f = E.fibers[E.cur];
  if (E.n_done > 0) {
    report("__syncthreads after %d threads of the CTA exited", E.n_done);
    E.abort_cta = true;
  }
  f.state = kBarrier;
  if (++E.n_bar == E.nthreads - E.n_done) {
    ++E.ce;
    E.n_bar = 0;
    for (int t = 0; t < E.nthreads; ++t)
      if (E.fibers[t].state == kBarrier) make_runnable(t);
  }
  yield();
}

uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width) {
  Req &r = E.fibers[E.cur].req;
  r.kind = kind;
  r.mask = mask;
  r.value = value;
  r.arg = arg;
  r.width = width;
  r.out = 0;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    report("shuffle width %d is not a power of two <= 32", width);
  arrive_warp();
  return r.out;
}

void ldmatrix_x4(uint32_t addr, uint32_t (&out)[4]) {
  Req &r = E.fibers[E.cur].req;
  r.kind = kLdsm;
  r.mask = 0xffffffffu;
  r.addr = addr;
  arrive_warp();
  for (int i = 0; i < 4; ++i) out[i] = r.r[i];
}

void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
             bool bf16) {
  Req &r = E.fibers[E.cur].req;
  r.kind = kMma;
  r.mask = 0xffffffffu;
  for (int i = 0; i < 4; ++i) {
    r.a[i] = a[i];
    r.c[i] = c[i];
  }
  r.b0 = b0;
  r.b1 = b1;
  r.bf16 = bf16;
  arrive_warp();
  for (int i = 0; i < 4; ++i) c[i] = r.d[i];
}

void cp_async(uint32_t dst, const void *src, int bytes, int src_bytes) {
  const int t = E.cur;
  const uintptr_t a = (uintptr_t)__data_start + dst;
  if (a % (uintptr_t)bytes != 0 || (uintptr_t)src % (uintptr_t)bytes != 0)
    report("cp.async of %d bytes with a misaligned address (smem %#x, "
           "global %p)",
           bytes, dst, src);
  check_range(a, (size_t)bytes, t, kAsyncIssue);
  /* Poisoned until a wait_group retires the copy. */
  memset((void *)a, 0xff, (size_t)bytes);
  E.fibers[t].open.push_back(Copy{dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Fiber &f = E.fibers[E.cur];
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int n) {
  const int t = E.cur;
  Fiber &f = E.fibers[t];
  while (f.committed.size() > (size_t)n) {
    apply_copies(t, f.committed.front());
    f.committed.pop_front();
  }
}

float atomic_add_f32(float *p, float v) {
  if (in_segment((uintptr_t)p)) check_range((uintptr_t)p, 4, E.cur, kAtomicRmw);
  const float old = *p;
  *p = old + v;
  return old;
}

unsigned long long atomic_add_u64(unsigned long long *p, unsigned long long v) {
  if (in_segment((uintptr_t)p)) check_range((uintptr_t)p, 8, E.cur, kAtomicRmw);
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

void run_grid(const char *name, const void *fn, dim3 grid, dim3 block,
              size_t smem, Body body, void *ctx) {
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  auto it = E.max_dyn.find(fn);
  const size_t allowed =
      it != E.max_dyn.end() && (size_t)it->second > kDefaultDynSmem
          ? (size_t)it->second
          : kDefaultDynSmem;
  if (nthreads == 0 || nthreads > kMaxThreads || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      smem > allowed) {
    /* As on the device: the launch fails, the error is left for
     * cudaGetLastError. */
    E.last = cudaErrorInvalidConfiguration;
    return;
  }
  if (E.shadow.empty()) {
    E.shadow.resize((size_t)(_end - __data_start) / 4 + 1);
    memset(g_dyn, 0xff, sizeof(g_dyn));
  }
  ++E.launches;
  E.name = name;
  E.grid = grid;
  E.block = block;
  E.smem = smem;
  E.body = body;
  E.body_ctx = ctx;
  E.nthreads = (int)nthreads;
  if (E.fibers.size() < nthreads) E.fibers.resize(nthreads);
  E.rng = E.seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)E.launches);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        E.bidx = uint3{x, y, z};
        ++E.ctas;
        run_cta();
      }
}

/* ---- fp16 / bf16 conversions, round to nearest even ---- */

uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) /* inf, NaN (quiet, payload kept nonzero) */
    return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow */
  if (ax < 0x38800000u) {                                   /* subnormal */
    if (ax < 0x33000000u) return sign; /* below half the smallest */
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e; /* 14..24 */
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {
      const float v = ldexpf((float)m, -24);
      memcpy(&x, &v, 4);
      x |= sign;
    }
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

} // namespace pvl_emu

/* ---- the instrumentation hooks ----
 * The kernel translation units are compiled with -fsanitize=kernel-address
 * and outline checks: every load and store calls one of these. The
 * signatures are those GCC declares as built-ins under ASan. */
extern "C" {
#define PVL_EMU_HOOK(n)                                                        \
  __attribute__((no_sanitize_address)) void __asan_load##n##_noabort(          \
      void *a) {                                                               \
    pvl_emu::on_access((uintptr_t)a, n, false);                                \
  }                                                                            \
  __attribute__((no_sanitize_address)) void __asan_store##n##_noabort(         \
      void *a) {                                                               \
    pvl_emu::on_access((uintptr_t)a, n, true);                                 \
  }
PVL_EMU_HOOK(1)
PVL_EMU_HOOK(2)
PVL_EMU_HOOK(4)
PVL_EMU_HOOK(8)
PVL_EMU_HOOK(16)
__attribute__((no_sanitize_address)) void __asan_loadN_noabort(void *a,
                                                               long n) {
  pvl_emu::on_access((uintptr_t)a, (size_t)n, false);
}
__attribute__((no_sanitize_address)) void __asan_storeN_noabort(void *a,
                                                                long n) {
  pvl_emu::on_access((uintptr_t)a, (size_t)n, true);
}
#if !PVL_EMU_ASAN
void __asan_handle_no_return(void) {}
#endif
}
