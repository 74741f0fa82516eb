/* libFuzzer harness of the whole public API (CPU backend).
 *
 * The input is a program: its first bytes choose a small cache (layers 1-4,
 * KV heads 1-2, q/kv ratio 1-2, head_dim 1-16, block_size 1-8, 4-64 blocks,
 * f32/f16/bf16, max_seqs 1-8), the rest decode into API calls: add with good
 * and bad spans, append batches with duplicates and stale ids, fork, retain
 * with good and bad keep lists, kv_write/kv_read, plan create/build/kv_write/
 * attention, observe (with non-finite and overflowing rows), compress with
 * every policy and random policy fields, decode_cap, queries, free, destroy.
 * Any call may run with an allocation failure injected through the
 * pvl_allocator seam (the k-th allocation of that call fails).
 *
 * The harness keeps a shadow of what the library must hold: per live
 * sequence and layer, the logical position of every slot and the K/V bytes
 * written into it. After EVERY call it checks:
 * - pvl__cache_check (the library's own invariants);
 * - the public statistics against a count derived from the sequences' block
 *   ids (used = distinct ids, shared = ids in two tables, used + free = pool);
 * - a failing call changed nothing: a snapshot of stats, every live
 *   sequence's info, block ids, positions, observation and the K/V bytes of
 *   every layer (pvl_kv_read), taken before the call, equals one after it;
 * - data survives fork, retain, compress, decode_cap and append: positions
 *   and K/V bytes read back equal the shadow (compress and decode_cap may
 *   only drop slots, never move a token to another position);
 * - decode attention equals a double-precision reference computed from the
 *   shadow K/V, within a tolerance of the dtype.
 * A violation prints what differed and aborts, which libFuzzer (and the
 * replay driver) report as a crash.
 *
 * Deterministic: every value comes from the input (K/V/Q data from a
 * splitmix64 seeded by input bytes), the allocator zero-fills, and no state
 * survives from one input to the next; everything is freed at the end and
 * the counting allocator must hold nothing. */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pagedvl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Bounds a single input's work, so every execution stays fast. */
#define FZ_MAX_OPS 160
#define FZ_MAX_SEQS 8

/* ---- failing ---- */

typedef struct fz fz;
static fz *g_cur; /* the running input, for the failure message only */
static void fz_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- input reader: past the end every byte reads as 0 ---- */

typedef struct fz_in {
  const uint8_t *p;
  size_t n, at;
} fz_in;

static uint32_t in_u8(fz_in *in) {
  return in->at < in->n ? in->p[in->at++] : 0;
}
static uint32_t in_u16(fz_in *in) {
  uint32_t lo = in_u8(in);
  return lo | in_u8(in) << 8;
}
static uint32_t in_u32(fz_in *in) {
  uint32_t lo = in_u16(in);
  return lo | in_u16(in) << 16;
}
/* Uniform-ish in [0, n); 0 when n is 0. */
static uint32_t in_below(fz_in *in, uint32_t n) {
  return n ? (n <= 256 ? in_u8(in) % n : in_u16(in) % n) : 0;
}
static bool in_left(const fz_in *in) { return in->at < in->n; }

/* ---- counting allocator with failure injection ---- */

/* Every allocation carries a header with its size and alignment, so a free
 * with the wrong size (the seam is sized) or a foreign pointer is caught. */
typedef struct fz_alloc {
  pvl_allocator a;
  long attempts; /* since the last arm */
  long fail_at;  /* -1: never */
  long injected;
  long live;
  size_t live_bytes;
} fz_alloc;

#define FZ_HDR_MAGIC 0x70766c66757a7aULL

static void *fz_alloc_fn(void *ctx, size_t size, size_t align) {
  fz_alloc *fa = ctx;
  if (fa->fail_at >= 0 && fa->attempts++ == fa->fail_at) {
    fa->injected++;
    return NULL;
  }
  if (align < 32) align = 32;
  if (size > ((size_t)1 << 30)) return NULL; /* the harness's caches are tiny */
  size_t total = (align + size + align - 1) / align * align;
  char *base = aligned_alloc(align, total);
  if (!base) return NULL;
  /* Zero-filled: unwritten slots and scratch read the same in every run. */
  memset(base, 0, total);
  char *p = base + align;
  uint64_t *h = (uint64_t *)(void *)(p - 24);
  h[0] = FZ_HDR_MAGIC;
  h[1] = size;
  h[2] = align;
  fa->live++;
  fa->live_bytes += size;
  return p;
}

static void fz_free_fn(void *ctx, void *ptr, size_t size, size_t align) {
  fz_alloc *fa = ctx;
  if (!ptr) return;
  if (align < 32) align = 32;
  uint64_t *h = (uint64_t *)(void *)((char *)ptr - 24);
  if (h[0] != FZ_HDR_MAGIC || h[1] != size || h[2] != align)
    fz_fail("allocator: free(%p, size %zu, align %zu) does not match the "
            "allocation (size %llu, align %llu, magic ok %d)",
            ptr, size, align, (unsigned long long)h[1],
            (unsigned long long)h[2], h[0] == FZ_HDR_MAGIC);
  h[0] = 0;
  fa->live--;
  fa->live_bytes -= size;
  free((char *)ptr - align);
}

static void fz_arm(fz_alloc *fa, long k) {
  fa->attempts = 0;
  fa->fail_at = k;
}
static void fz_disarm(fz_alloc *fa) { fa->fail_at = -1; }

/* ---- dtypes, written independently of the library's dtype.c ---- */

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint16_t enc_f16(float f) {
  uint32_t x = f32_bits(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  uint32_t e = (x >> 23) & 0xffu, m = x & 0x7fffffu;
  if (e == 0xff) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0));
  int32_t ee = (int32_t)e - 127 + 15;
  if (ee >= 31) return (uint16_t)(sign | 0x7c00u);
  if (ee <= 0) {
    if (ee < -10) return sign;
    m |= 0x800000u;
    uint32_t shift = (uint32_t)(14 - ee);
    uint32_t h = m >> shift, rem = m & ((1u << shift) - 1),
             half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)ee << 10) | (m >> 13), rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

static float dec_f16(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
           m = h & 0x3ffu;
  if (e == 0) {
    float v = ldexpf((float)m, -24);
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e - 15 + 127) << 23) | (m << 13));
}

static uint16_t enc_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
static float dec_bf16(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static void enc(pvl_dtype dt, const float *src, void *dst, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (dt == PVL_DTYPE_F32) {
      memcpy((char *)dst + 4 * i, &src[i], 4);
    } else {
      uint16_t h = dt == PVL_DTYPE_F16 ? enc_f16(src[i]) : enc_bf16(src[i]);
      memcpy((char *)dst + 2 * i, &h, 2);
    }
  }
}
static float dec1(pvl_dtype dt, const void *src, size_t i) {
  if (dt == PVL_DTYPE_F32) {
    float f;
    memcpy(&f, (const char *)src + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, (const char *)src + 2 * i, 2);
  return dt == PVL_DTYPE_F16 ? dec_f16(h) : dec_bf16(h);
}

/* ---- the shadow ---- */

typedef struct sseq {
  bool live;
  pvl_seq_id id;
  uint32_t n_prompt, n_decoded;
  /* 0: not compressed, 1: compressed, 2: unknown (a fork's flag is the
   * library's business) */
  int compressed;
  uint32_t n_spans;
  pvl_span spans[4];
  uint32_t *n;    /* [L] slots */
  uint32_t *pos;  /* [L][maxt] logical positions */
  uint8_t *known; /* [L][maxt] slot written */
  uint8_t *kv;    /* [L][maxt][tokb]: K then V of the slot */
} sseq;

struct fz {
  fz_in in;
  uint32_t L, QH, KH, D, BS, NB, MS;
  pvl_dtype dt;
  size_t es, half, tokb; /* element, K (or V) of a token, K+V of a token */
  uint32_t maxt;         /* most slots one layer can hold */
  pvl_cache *c;
  fz_alloc al;
  sseq s[FZ_MAX_SEQS];
  uint32_t live;
  pvl_seq_id stale[8];
  uint32_t n_stale;
  pvl_plan *plan;
  bool plan_built; /* built at least once since created */
  /* Since the last build: 0 no batch member changed, 1 a member was
   * retained, compressed or capped (the library may or may not count that
   * as a change), 2 a member was appended or freed: the plan is stale. */
  int plan_change;
  pvl_seq_id batch[FZ_MAX_SEQS];
  uint32_t nbatch;
  uint64_t rng;
  uint64_t rng_unused; /* out-parameter nobody reads */
  long step;
  const char *op;
  bool inject;    /* an allocation failure is armed for the current call */
  long injected0; /* F->al.injected before the call */
  char err[PVL_ERRMSG_LEN]; /* the last call's message, before snapshots */
  /* scratch */
  uint8_t *buf, *buf2; /* [maxt * tokb] each: snapshots and verify */
  uint8_t *kb, *vb;    /* the same size: data of the call under test */
  uint32_t *u32a, *u32b;
  int32_t *ids;
  float *fa, *fb;
  /* snapshots */
  uint8_t *snap[2];
  size_t snap_len[2], snap_cap[2];
};

static void fz_fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fz *F = g_cur;
  if (F)
    fprintf(stderr,
            "fuzz_api: step %ld op %s (L %u QH %u KH %u D %u BS %u NB %u MS "
            "%u dtype %d%s): ",
            F->step, F->op, F->L, F->QH, F->KH, F->D, F->BS, F->NB, F->MS,
            (int)F->dt, F->inject ? ", allocation failure injected" : "");
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  if (F && F->c) fprintf(stderr, "\n  last call's error: %s", F->err);
  fprintf(stderr, "\n");
  abort();
}

#define FZ_ASSERT(cond, ...)                                                   \
  do {                                                                         \
    if (!(cond)) fz_fail(__VA_ARGS__);                                         \
  } while (0)
#define FZ_STATUS(st, want, what)                                              \
  FZ_ASSERT((st) == (want), "%s: %s, expected %s", (what),                     \
            pvl_status_string(st), pvl_status_string(want))

static uint64_t rng_next(fz *F) {
  uint64_t z = (F->rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static uint32_t *s_n(sseq *s, uint32_t l) { return &s->n[l]; }
static uint32_t *s_pos(fz *F, sseq *s, uint32_t l) {
  return s->pos + (size_t)l * F->maxt;
}
static uint8_t *s_known(fz *F, sseq *s, uint32_t l) {
  return s->known + (size_t)l * F->maxt;
}
static uint8_t *s_kv(fz *F, sseq *s, uint32_t l, uint32_t slot) {
  return s->kv + ((size_t)l * F->maxt + slot) * F->tokb;
}

/* Data for K, V or Q: values j/16 for j in [-128, 127] (exact in every
 * dtype) in mode 0; mode 1 plants specials (NaN, +-Inf, and the largest
 * finite value of the dtype, which overflows q.k) at a few places; mode 2
 * is mode 0 scaled near the dtype's maximum everywhere. */
static void gen(fz *F, uint32_t mode, void *dst, size_t n) {
  float *v = F->fa;
  const float big = F->dt == PVL_DTYPE_F16 ? 65504.0f : 3e38f;
  for (size_t i = 0; i < n; i++) {
    int32_t j = (int32_t)(rng_next(F) & 0xff) - 128;
    v[i] = (float)j / 16.0f;
    if (mode == 2) v[i] = big * (float)j / 128.0f;
  }
  if (mode == 1) {
    uint32_t k = 1 + (uint32_t)(rng_next(F) % 3);
    for (uint32_t t = 0; t < k && n; t++) {
      size_t i = (size_t)(rng_next(F) % n);
      switch (rng_next(F) % 4) {
      case 0: v[i] = NAN; break;
      case 1: v[i] = INFINITY; break;
      case 2: v[i] = -INFINITY; break;
      default: v[i] = big; break;
      }
    }
  }
  enc(F->dt, v, dst, n);
}

static uint32_t data_mode(fz *F) {
  uint32_t b = in_u8(&F->in);
  return b < 224 ? 0 : b < 248 ? 1 : 2;
}

static sseq *pick_live(fz *F) {
  if (!F->live) return NULL;
  uint32_t k = in_below(&F->in, F->live);
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++)
    if (F->s[i].live && k-- == 0) return &F->s[i];
  return NULL;
}
static sseq *find_seq(fz *F, pvl_seq_id id) {
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++)
    if (F->s[i].live && F->s[i].id == id) return &F->s[i];
  return NULL;
}
static pvl_seq_id pick_stale(fz *F) {
  if (!F->n_stale) return (pvl_seq_id)0xdead00000001ULL; /* never issued */
  return F->stale[in_below(&F->in, F->n_stale < 8 ? F->n_stale : 8)];
}

/* ---- snapshot: everything observable, serialized ---- */

static void snap_put(fz *F, int w, const void *p, size_t n) {
  if (F->snap_len[w] + n > F->snap_cap[w]) {
    size_t cap = (F->snap_len[w] + n) * 2 + 4096;
    uint8_t *nb = realloc(F->snap[w], cap);
    if (!nb) fz_fail("out of host memory for a snapshot");
    F->snap[w] = nb;
    F->snap_cap[w] = cap;
  }
  memcpy(F->snap[w] + F->snap_len[w], p, n);
  F->snap_len[w] += n;
}

static void snap_take(fz *F, int w) {
  pvl_cache *c = F->c;
  F->snap_len[w] = 0;
  pvl_stats st;
  memset(&st, 0, sizeof(st));
  pvl_status r = pvl_cache_get_stats(c, &st);
  snap_put(F, w, &r, sizeof(r));
  snap_put(F, w, &st, sizeof(st));
  uint64_t lt[4] = {0};
  r = pvl_cache_layer_tokens(c, lt, F->L);
  snap_put(F, w, &r, sizeof(r));
  snap_put(F, w, lt, sizeof(lt));
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
    sseq *s = &F->s[i];
    if (!s->live) continue;
    pvl_seq_info info;
    memset(&info, 0, sizeof(info));
    r = pvl_seq_get_info(c, s->id, &info);
    snap_put(F, w, &r, sizeof(r));
    snap_put(F, w, &info, sizeof(info));
    for (uint32_t l = 0; l < F->L; l++) {
      uint32_t n = 0;
      r = pvl_seq_blocks(c, s->id, l, F->ids, F->NB, &n);
      snap_put(F, w, &r, sizeof(r));
      snap_put(F, w, &n, sizeof(n));
      if (r == PVL_SUCCESS) snap_put(F, w, F->ids, n * sizeof(int32_t));
      r = pvl_seq_positions(c, s->id, l, F->u32a, F->maxt, &n);
      snap_put(F, w, &r, sizeof(r));
      snap_put(F, w, &n, sizeof(n));
      if (r == PVL_SUCCESS) {
        snap_put(F, w, F->u32a, n * sizeof(uint32_t));
        if (n) {
          r = pvl_kv_read(c, s->id, l, 0, n, F->buf, F->buf2, NULL);
          snap_put(F, w, &r, sizeof(r));
          snap_put(F, w, F->buf, n * F->half);
          snap_put(F, w, F->buf2, n * F->half);
        }
      }
      /* The observation counts: a failing call must not drop or half-add
       * one. */
      float gl = 0;
      uint32_t nk = 0, nr = 0;
      r = pvl_seq_observation(c, s->id, l, NULL, &gl, NULL, NULL, 0, &nk, &nr);
      snap_put(F, w, &r, sizeof(r));
      snap_put(F, w, &nk, sizeof(nk));
      snap_put(F, w, &nr, sizeof(nr));
      snap_put(F, w, &gl, sizeof(gl));
    }
  }
  if (F->plan) {
    pvl_plan_info pi;
    memset(&pi, 0, sizeof(pi));
    r = pvl_plan_get_info(F->plan, &pi);
    snap_put(F, w, &r, sizeof(r));
    snap_put(F, w, &pi.n_seqs, sizeof(pi.n_seqs));
  }
}

/* FZ_TRACE=1 in the environment prints every checked call (debugging a
 * crash input with the replay driver). */
static int trace_on(void) {
  static int on = -1;
  if (on < 0) on = getenv("FZ_TRACE") != NULL;
  return on;
}

static void snap_expect_same(fz *F, pvl_status st) {
  snap_take(F, 1);
  if (F->snap_len[0] == F->snap_len[1] &&
      memcmp(F->snap[0], F->snap[1], F->snap_len[0]) == 0)
    return;
  size_t at = 0;
  while (at < F->snap_len[0] && at < F->snap_len[1] &&
         F->snap[0][at] == F->snap[1][at])
    at++;
  fz_fail("the call failed (%s) but changed the state: snapshots differ at "
          "byte %zu of %zu/%zu",
          pvl_status_string(st), at, F->snap_len[0], F->snap_len[1]);
}

/* Runs before a call that may change the state: snapshot, and maybe arm an
 * allocation failure (the op byte's bit 4 asked for one; its index comes
 * next). */
static void pre(fz *F, bool want_inject) {
  snap_take(F, 0);
  F->inject = want_inject;
  F->injected0 = F->al.injected;
  if (want_inject) fz_arm(&F->al, (long)in_below(&F->in, 12));
}
/* After the call: disarm; a failing call must have changed nothing. Returns
 * whether the call succeeded. */
static bool post(fz *F, pvl_status st) {
  fz_disarm(&F->al);
  if (trace_on())
    fprintf(stderr, "step %ld %s: %s%s\n", F->step, F->op,
            pvl_status_string(st),
            F->al.injected > F->injected0 ? " (allocation failed)" : "");
  snprintf(F->err, sizeof(F->err), "%s",
           st == PVL_SUCCESS ? "" : pvl_cache_last_error(F->c));
  if (st != PVL_SUCCESS) snap_expect_same(F, st);
  return st == PVL_SUCCESS;
}
/* A prediction of success holds unless an allocation failure was injected
 * (then NO_MEMORY is also acceptable). */
static void expect_st(fz *F, pvl_status st, pvl_status want, const char *what) {
  if (F->inject && st == PVL_ERR_NO_MEMORY) return;
  FZ_STATUS(st, want, what);
}
static void expect_ok(fz *F, pvl_status st, const char *what) {
  expect_st(F, st, PVL_SUCCESS, what);
}

/* ---- verification of everything against the shadow ---- */

static void verify(fz *F) {
  pvl_cache *c = F->c;
  char msg[512] = "";
  pvl_status st = pvl__cache_check(c, msg, sizeof(msg));
  FZ_ASSERT(st == PVL_SUCCESS, "pvl__cache_check: %s", msg);
  pvl_stats stats;
  FZ_STATUS(pvl_cache_get_stats(c, &stats), PVL_SUCCESS, "stats");
  FZ_ASSERT(stats.num_blocks == F->NB &&
                stats.used_blocks + stats.free_blocks == F->NB,
            "stats: %u used + %u free != %u blocks", stats.used_blocks,
            stats.free_blocks, F->NB);
  FZ_ASSERT(stats.num_seqs == F->live, "stats: %u sequences, shadow %u",
            stats.num_seqs, F->live);
  /* Block references counted from the tables: uses[b] = tables holding b. */
  uint8_t uses[64];
  memset(uses, 0, sizeof(uses));
  uint64_t tokens = 0, lt_sh[4] = {0}, lt[4] = {0};
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
    sseq *s = &F->s[i];
    if (!s->live) continue;
    pvl_seq_info info;
    FZ_STATUS(pvl_seq_get_info(c, s->id, &info), PVL_SUCCESS, "seq_get_info");
    uint32_t mn = UINT32_MAX, mx = 0;
    uint64_t tt = 0, tb = 0;
    for (uint32_t l = 0; l < F->L; l++) {
      uint32_t n = *s_n(s, l), nb = (n + F->BS - 1) / F->BS;
      mn = n < mn ? n : mn;
      mx = n > mx ? n : mx;
      tt += n;
      tb += nb;
      lt_sh[l] += n;
      uint32_t gn = 0, gb = 0;
      FZ_STATUS(pvl_seq_layer_size(c, s->id, l, &gn, &gb), PVL_SUCCESS,
                "seq_layer_size");
      FZ_ASSERT(gn == n && gb == nb,
                "seq %u layer %u: %u tokens %u blocks, shadow %u tokens %u "
                "blocks",
                i, l, gn, gb, n, nb);
      uint32_t got = 0;
      FZ_STATUS(pvl_seq_blocks(c, s->id, l, F->ids, F->NB, &got), PVL_SUCCESS,
                "seq_blocks");
      FZ_ASSERT(got == nb, "seq_blocks: %u ids, %u blocks", got, nb);
      for (uint32_t j = 0; j < got; j++) {
        FZ_ASSERT(F->ids[j] >= 0 && (uint32_t)F->ids[j] < F->NB,
                  "block id %d out of the pool", F->ids[j]);
        uses[F->ids[j]]++;
      }
      FZ_STATUS(pvl_seq_positions(c, s->id, l, F->u32a, F->maxt, &got),
                PVL_SUCCESS, "seq_positions");
      FZ_ASSERT(got == n, "seq_positions: %u, shadow %u", got, n);
      const uint32_t *pos = s_pos(F, s, l);
      for (uint32_t j = 0; j < n; j++)
        FZ_ASSERT(F->u32a[j] == pos[j],
                  "seq %u layer %u slot %u: position %u, shadow %u", i, l, j,
                  F->u32a[j], pos[j]);
      if (n == 0) continue;
      FZ_STATUS(pvl_kv_read(c, s->id, l, 0, n, F->buf, F->buf2, NULL),
                PVL_SUCCESS, "kv_read");
      const uint8_t *known = s_known(F, s, l);
      for (uint32_t j = 0; j < n; j++) {
        if (!known[j]) continue;
        const uint8_t *sh = s_kv(F, s, l, j);
        FZ_ASSERT(memcmp(F->buf + j * F->half, sh, F->half) == 0 &&
                      memcmp(F->buf2 + j * F->half, sh + F->half, F->half) == 0,
                  "seq %u layer %u slot %u (position %u): K/V bytes differ "
                  "from what was written",
                  i, l, j, pos[j]);
      }
    }
    tokens += tt;
    FZ_ASSERT(info.n_prompt == s->n_prompt && info.n_decoded == s->n_decoded &&
                  info.position == s->n_prompt + s->n_decoded &&
                  info.min_tokens == mn && info.max_tokens == mx &&
                  info.total_tokens == tt && info.total_blocks == tb &&
                  info.n_visual_spans == s->n_spans,
              "seq %u info: prompt %u decoded %u position %u min %u max %u "
              "tokens %llu blocks %llu spans %u; shadow %u %u - %u %u %llu "
              "%llu %u",
              i, info.n_prompt, info.n_decoded, info.position, info.min_tokens,
              info.max_tokens, (unsigned long long)info.total_tokens,
              (unsigned long long)info.total_blocks, info.n_visual_spans,
              s->n_prompt, s->n_decoded, mn, mx, (unsigned long long)tt,
              (unsigned long long)tb, s->n_spans);
  }
  uint32_t used = 0, shared = 0;
  for (uint32_t b = 0; b < F->NB; b++) {
    used += uses[b] > 0;
    shared += uses[b] > 1;
    FZ_ASSERT(pvl__block_refcount(c, (int32_t)b) == uses[b],
              "block %u: refcount %u, %u tables hold it", b,
              pvl__block_refcount(c, (int32_t)b), uses[b]);
  }
  FZ_ASSERT(stats.used_blocks == used && stats.shared_blocks == shared,
            "stats: %u used %u shared; the tables hold %u distinct blocks, "
            "%u of them in several tables",
            stats.used_blocks, stats.shared_blocks, used, shared);
  FZ_ASSERT(stats.tokens == tokens, "stats: %llu tokens, shadow %llu",
            (unsigned long long)stats.tokens, (unsigned long long)tokens);
  FZ_STATUS(pvl_cache_layer_tokens(c, lt, F->L), PVL_SUCCESS, "layer_tokens");
  for (uint32_t l = 0; l < F->L; l++)
    FZ_ASSERT(lt[l] == lt_sh[l], "layer %u: %llu tokens, shadow %llu", l,
              (unsigned long long)lt[l], (unsigned long long)lt_sh[l]);
}

/* ---- shadow updates ---- */

/* Records that sequence id changed (level as plan_change) for the plan. */
static void plan_touch(fz *F, pvl_seq_id id, int level) {
  for (uint32_t b = 0; b < F->nbatch; b++)
    if (F->batch[b] == id && F->plan_change < level) F->plan_change = level;
}

static sseq *shadow_new(fz *F) {
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++)
    if (!F->s[i].live) {
      sseq *s = &F->s[i];
      s->live = true;
      s->compressed = 0;
      F->live++;
      return s;
    }
  fz_fail("shadow has no free sequence slot");
  return NULL;
}

static void shadow_drop(fz *F, sseq *s) {
  s->live = false;
  F->live--;
  F->stale[F->n_stale++ % 8] = s->id;
}

/* Per slot of one layer: is its block shared (held by several tables)?
 * From the library's block ids, which verify() has matched to the
 * refcounts. */
static bool range_shared(fz *F, sseq *s, uint32_t l, uint32_t first,
                         uint32_t n) {
  if (n == 0) return false;
  uint32_t got = 0;
  FZ_STATUS(pvl_seq_blocks(F->c, s->id, l, F->ids, F->NB, &got), PVL_SUCCESS,
            "seq_blocks");
  for (uint32_t b = first / F->BS; b <= (first + n - 1) / F->BS && b < got; b++)
    if (pvl__block_refcount(F->c, F->ids[b]) > 1) return true;
  return false;
}

/* Writes n random tokens into [first, first + n) of one layer and records
 * them in the shadow on success. */
static pvl_status write_range(fz *F, sseq *s, uint32_t l, uint32_t first,
                              uint32_t n, uint32_t mode, bool inj) {
  size_t cnt = (size_t)n * F->KH * F->D;
  gen(F, mode, F->kb, cnt);
  gen(F, mode, F->vb, cnt);
  uint32_t have = *s_n(s, l);
  bool in_range = (uint64_t)first + n <= have && n > 0;
  bool shared = in_range && range_shared(F, s, l, first, n);
  pre(F, inj);
  pvl_status st = pvl_kv_write(F->c, s->id, l, first, n, F->kb, F->vb, NULL);
  bool ok = post(F, st);
  if (!in_range)
    FZ_ASSERT(!ok || n == 0,
              "kv_write [%u, +%u) of %u slots "
              "succeeded",
              first, n, have);
  else if (shared)
    FZ_ASSERT(!ok, "kv_write into a shared block succeeded");
  else
    expect_ok(F, st, "kv_write");
  if (ok)
    for (uint32_t j = 0; j < n; j++) {
      uint8_t *d = s_kv(F, s, l, first + j);
      memcpy(d, F->kb + j * F->half, F->half);
      memcpy(d + F->half, F->vb + j * F->half, F->half);
      s_known(F, s, l)[first + j] = 1;
    }
  return st;
}

/* ---- operations ---- */

static void op_add(fz *F, bool inj) {
  fz_in *in = &F->in;
  uint32_t n = 1 + in_below(in, F->BS * 6);
  if (in_below(in, 16) == 0) n = 0; /* invalid */
  pvl_span sp[4];
  uint32_t ns = in_below(in, 4), at = 0, k = 0;
  for (uint32_t i = 0; i < ns && n && at < n; i++) {
    uint32_t b = at + in_below(in, n - at);
    uint32_t e = b + 1 + in_below(in, n - b);
    sp[k++] = (pvl_span){b, e};
    at = e;
  }
  ns = k;
  bool bad = n == 0;
  const pvl_span *spp = ns ? sp : NULL;
  switch (in_below(in, 12)) {
  case 0:
    if (ns) {
      sp[0].end = sp[0].begin;
      bad = true;
    } /* empty */
    break;
  case 1:
    if (ns) {
      sp[ns - 1].end = n + 1;
      bad = true;
    } /* past the prompt */
    break;
  case 2:
    if (ns > 1) {
      sp[1] = sp[0];
      bad = true;
    } /* overlapping */
    break;
  case 3:
    if (ns) {
      spp = NULL;
      bad = true;
    } /* NULL with n_visual > 0 */
    break;
  default: break;
  }
  pvl_stats stats;
  FZ_STATUS(pvl_cache_get_stats(F->c, &stats), PVL_SUCCESS, "stats");
  uint64_t need = (uint64_t)F->L * ((n + F->BS - 1) / F->BS);
  pvl_admit adm;
  if (n) {
    uint64_t q = 0;
    FZ_STATUS(pvl_blocks_for_prompt(F->c, n, &q), PVL_SUCCESS,
              "blocks_for_prompt");
    FZ_ASSERT(q == need, "blocks_for_prompt %llu, expected %llu",
              (unsigned long long)q, (unsigned long long)need);
    FZ_STATUS(pvl_can_add(F->c, n, &adm), PVL_SUCCESS, "can_add");
    pvl_admit w = need > F->NB ? PVL_ADMIT_NEVER
                  : need > stats.free_blocks || F->live == F->MS
                      ? PVL_ADMIT_LATER
                      : PVL_ADMIT_OK;
    FZ_ASSERT(adm == w, "can_add(%u) = %d, expected %d", n, (int)adm, (int)w);
  }
  pvl_seq_id id = 0;
  pre(F, inj);
  pvl_status st = pvl_seq_add(F->c, n, spp, ns, &id);
  bool ok = post(F, st);
  if (bad)
    FZ_ASSERT(!ok, "seq_add with invalid spans or prompt succeeded");
  else if (need > stats.free_blocks)
    expect_st(F, st, PVL_ERR_OUT_OF_BLOCKS, "seq_add beyond the free blocks");
  else if (F->live == F->MS)
    expect_st(F, st, PVL_ERR_CAPACITY, "seq_add at max_seqs");
  else
    expect_ok(F, st, "seq_add");
  if (!ok) return;
  FZ_ASSERT(id != 0 && !find_seq(F, id), "seq_add returned id %llx",
            (unsigned long long)id);
  for (uint32_t i = 0; i < F->n_stale && i < 8; i++)
    FZ_ASSERT(F->stale[i] != id, "seq_add reused a freed id");
  if (trace_on())
    fprintf(stderr, "add %u -> %llx\n", n, (unsigned long long)id);
  sseq *s = shadow_new(F);
  s->id = id;
  s->n_prompt = n;
  s->n_decoded = 0;
  s->n_spans = ns;
  memcpy(s->spans, sp, ns * sizeof(pvl_span));
  for (uint32_t l = 0; l < F->L; l++) {
    s->n[l] = n;
    for (uint32_t j = 0; j < n; j++) s_pos(F, s, l)[j] = j;
    memset(s_known(F, s, l), 0, F->maxt);
  }
  verify(F);
  /* Prefill: write every prompt token of every layer (mostly). */
  if (in_below(in, 8) != 0) {
    uint32_t mode = data_mode(F);
    for (uint32_t l = 0; l < F->L; l++) {
      write_range(F, s, l, 0, n, mode, false);
      verify(F);
    }
  }
}

static void op_append(fz *F, bool inj) {
  fz_in *in = &F->in;
  pvl_seq_id ids[FZ_MAX_SEQS + 2];
  sseq *seqs[FZ_MAX_SEQS + 2];
  uint32_t n = 0, mask = in_u8(in);
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++)
    if (F->s[i].live && (mask >> i & 1)) {
      seqs[n] = &F->s[i];
      ids[n++] = F->s[i].id;
    }
  /* a rotation, so the batch order varies */
  uint32_t rot = in_below(in, n ? n : 1);
  for (uint32_t r = 0; r < rot; r++) {
    pvl_seq_id t = ids[0];
    sseq *u = seqs[0];
    memmove(ids, ids + 1, (n - 1) * sizeof(ids[0]));
    memmove(seqs, seqs + 1, (n - 1) * sizeof(seqs[0]));
    ids[n - 1] = t;
    seqs[n - 1] = u;
  }
  bool bad = false;
  uint32_t v = in_below(in, 10);
  if (v == 0 && n) {
    ids[n] = ids[in_below(in, n)];
    seqs[n] = NULL;
    n++;
    bad = true;
  } else if (v == 1) {
    ids[n] = pick_stale(F);
    seqs[n] = NULL;
    n++;
    bad = true;
  }
  /* Blocks the append needs: a new one where the last is full, a copy where
   * the partial last block is shared. */
  uint64_t need = 0;
  bool copy[FZ_MAX_SEQS + 2][4];
  for (uint32_t i = 0; i < n && !bad; i++)
    for (uint32_t l = 0; l < F->L; l++) {
      uint32_t t = *s_n(seqs[i], l);
      copy[i][l] = t % F->BS != 0 && range_shared(F, seqs[i], l, t - 1, 1);
      need += t % F->BS == 0 || copy[i][l];
    }
  if (!bad && n) {
    uint64_t q = 0;
    FZ_STATUS(pvl_blocks_for_append(F->c, ids, n, &q), PVL_SUCCESS,
              "blocks_for_append");
    FZ_ASSERT(q == need, "blocks_for_append %llu, expected %llu",
              (unsigned long long)q, (unsigned long long)need);
  } else if (bad) {
    uint64_t q = 0;
    FZ_ASSERT(pvl_blocks_for_append(F->c, ids, n, &q) != PVL_SUCCESS,
              "blocks_for_append accepted a bad batch");
  }
  pvl_stats stats;
  FZ_STATUS(pvl_cache_get_stats(F->c, &stats), PVL_SUCCESS, "stats");
  pre(F, inj);
  pvl_status st = pvl_seq_append(F->c, ids, n, NULL);
  bool ok = post(F, st);
  if (bad)
    FZ_ASSERT(!ok, "append of a batch with a duplicate or stale id "
                   "succeeded");
  else if (need > stats.free_blocks)
    expect_st(F, st, PVL_ERR_OUT_OF_BLOCKS, "append beyond the free blocks");
  else if (n)
    expect_ok(F, st, "append");
  if (!ok) return;
  for (uint32_t i = 0; i < n; i++) {
    sseq *s = seqs[i];
    for (uint32_t l = 0; l < F->L; l++) {
      uint32_t t = s->n[l]++;
      s_pos(F, s, l)[t] = s->n_prompt + s->n_decoded;
      s_known(F, s, l)[t] = 0;
    }
    s->n_decoded++;
    plan_touch(F, s->id, 2);
  }
  verify(F);
  /* The stack writes the new token (mostly through pvl_kv_write here; the
   * plan path is op_plan_write). */
  if (in_below(in, 4) != 0) {
    uint32_t mode = data_mode(F);
    for (uint32_t i = 0; i < n; i++)
      for (uint32_t l = 0; l < F->L; l++) {
        write_range(F, seqs[i], l, seqs[i]->n[l] - 1, 1, mode, false);
        verify(F);
      }
  }
}

static void op_fork(fz *F, bool inj) {
  bool stale = in_below(&F->in, 12) == 0;
  sseq *p = stale ? NULL : pick_live(F);
  pvl_seq_id pid = p ? p->id : pick_stale(F);
  pvl_seq_id id = 0;
  pre(F, inj);
  pvl_status st = pvl_seq_fork(F->c, pid, &id);
  bool ok = post(F, st);
  if (!p)
    FZ_ASSERT(!ok, "fork of a stale id succeeded");
  else if (F->live == F->MS)
    expect_st(F, st, PVL_ERR_CAPACITY, "fork at max_seqs");
  else
    expect_ok(F, st, "fork");
  if (!ok) return;
  sseq *s = shadow_new(F);
  s->id = id;
  s->n_prompt = p->n_prompt;
  s->n_decoded = p->n_decoded;
  s->n_spans = p->n_spans;
  memcpy(s->spans, p->spans, sizeof(s->spans));
  s->compressed = p->compressed ? 2 : 0;
  memcpy(s->n, p->n, F->L * sizeof(uint32_t));
  memcpy(s->pos, p->pos, (size_t)F->L * F->maxt * sizeof(uint32_t));
  memcpy(s->known, p->known, (size_t)F->L * F->maxt);
  memcpy(s->kv, p->kv, (size_t)F->L * F->maxt * F->tokb);
  pvl_span sp[5];
  uint32_t nsp = 0;
  FZ_STATUS(pvl_seq_visual_spans(F->c, id, sp, 5, &nsp), PVL_SUCCESS,
            "visual_spans");
  FZ_ASSERT(nsp == p->n_spans &&
                memcmp(sp, p->spans, nsp * sizeof(pvl_span)) == 0,
            "fork's visual spans differ from the parent's");
  verify(F);
}

/* Applies keep[0..k) of old slots to a shadow layer. */
static void shadow_keep(fz *F, sseq *s, uint32_t l, const uint32_t *keep,
                        uint32_t k) {
  uint32_t *pos = s_pos(F, s, l);
  uint8_t *known = s_known(F, s, l);
  for (uint32_t i = 0; i < k; i++) {
    FZ_ASSERT(keep[i] >= i, "shadow_keep: not ascending");
    pos[i] = pos[keep[i]];
    known[i] = known[keep[i]];
    if (keep[i] != i) memcpy(s_kv(F, s, l, i), s_kv(F, s, l, keep[i]), F->tokb);
  }
  s->n[l] = k;
}

static void op_retain(fz *F, bool inj) {
  fz_in *in = &F->in;
  bool stale = in_below(in, 16) == 0;
  sseq *s = stale ? NULL : pick_live(F);
  pvl_seq_id id = s ? s->id : pick_stale(F);
  uint32_t l = in_below(in, F->L + 1); /* F->L: an invalid layer */
  uint32_t n = s && l < F->L ? s->n[l] : 4;
  uint32_t *keep = F->u32b, k = 0;
  bool bad = !s || l >= F->L;
  switch (in_below(in, 8)) {
  case 0: k = 0; break;
  case 1:
    k = n;
    for (uint32_t i = 0; i < k; i++) keep[i] = i;
    break;
  case 2:
    k = in_below(in, n + 1);
    for (uint32_t i = 0; i < k; i++) keep[i] = n - k + i;
    break;
  default: /* a subset from the input's bits */
    for (uint32_t i = 0; i < n; i++)
      if (in_u8(in) & 1) keep[k++] = i;
    break;
  }
  const uint32_t *kp = keep;
  switch (in_below(in, 16)) {
  case 0:
    if (k) {
      keep[k - 1] = n;
      bad = true;
    } /* out of range */
    break;
  case 1:
    if (k > 1) {
      keep[1] = keep[0];
      bad = true;
    } /* duplicate */
    break;
  case 2:
    if (k > 1) { /* descending pair */
      uint32_t t = keep[0];
      keep[0] = keep[1];
      keep[1] = t;
      bad = true;
    }
    break;
  case 3: /* NULL: refused with n_keep > 0, valid (empty the layer) at 0 */
    if (k) bad = true;
    kp = NULL;
    break;
  case 4: /* more slots than the layer holds */
    k = n + 1;
    for (uint32_t i = 0; i < k; i++) keep[i] = i;
    bad = true;
    break;
  default: break;
  }
  if (k > n + 1) k = n + 1;
  /* Blocks the gather needs: slots [0, p) stay in place, whole blocks
   * before p / bs are kept; the rest move into fresh blocks. */
  uint32_t p = 0;
  while (!bad && p < k && keep[p] == p) p++;
  const uint32_t n_final = (k + F->BS - 1) / F->BS;
  const uint32_t n_stay = p < k ? p / F->BS : n_final;
  pvl_stats stats;
  FZ_STATUS(pvl_cache_get_stats(F->c, &stats), PVL_SUCCESS, "stats");
  if (trace_on()) {
    fprintf(stderr, "retain seq %llx layer %u of %u slots, keep",
            (unsigned long long)id, l, n);
    for (uint32_t i = 0; i < k && kp; i++) fprintf(stderr, " %u", keep[i]);
    fprintf(stderr, "\n");
  }
  pre(F, inj);
  pvl_status st = pvl_seq_retain(F->c, id, l, kp, k, NULL);
  bool ok = post(F, st);
  if (bad)
    FZ_ASSERT(!ok, "retain with a bad keep list, layer or id succeeded");
  else if (n_final - n_stay > stats.free_blocks)
    expect_st(F, st, PVL_ERR_OUT_OF_BLOCKS, "retain beyond the free blocks");
  else
    expect_ok(F, st, "retain");
  if (!ok) return;
  shadow_keep(F, s, l, keep, k);
  plan_touch(F, s->id, 1);
  verify(F);
}

static void op_free(fz *F, bool inj) {
  bool stale = in_below(&F->in, 10) == 0;
  sseq *s = stale ? NULL : pick_live(F);
  pvl_seq_id id = s ? s->id : pick_stale(F);
  pre(F, inj);
  pvl_status st = pvl_seq_free(F->c, id);
  bool ok = post(F, st);
  if (!s)
    expect_st(F, st, PVL_ERR_UNKNOWN_SEQUENCE, "free of a stale id");
  else
    expect_ok(F, st, "free");
  if (ok) {
    plan_touch(F, s->id, 2);
    shadow_drop(F, s);
  }
  verify(F);
}

static void op_write(fz *F, bool inj) {
  fz_in *in = &F->in;
  sseq *s = pick_live(F);
  if (!s) return;
  uint32_t l = in_below(in, F->L);
  uint32_t have = s->n[l];
  uint32_t first = in_below(in, have + 2);
  uint32_t n = 1 + in_below(in, have + 1);
  if (n > F->maxt) n = F->maxt;
  write_range(F, s, l, first, n, data_mode(F), inj);
  verify(F);
}

static void op_read(fz *F) {
  fz_in *in = &F->in;
  sseq *s = pick_live(F);
  if (!s) return;
  uint32_t l = in_below(in, F->L + 1);
  uint32_t have = l < F->L ? s->n[l] : 0;
  uint32_t first = in_below(in, have + 2);
  uint32_t n = 1 + in_below(in, have + 1);
  if (n > F->maxt) n = F->maxt;
  bool valid = l < F->L && (uint64_t)first + n <= have;
  pre(F, false);
  pvl_status st = pvl_kv_read(F->c, s->id, l, first, n, F->kb, F->vb, NULL);
  bool ok = post(F, st);
  FZ_ASSERT(ok == valid, "kv_read layer %u [%u, +%u) of %u slots: %s", l, first,
            n, have, pvl_status_string(st));
  if (!ok) return;
  for (uint32_t j = 0; j < n; j++) {
    if (!s_known(F, s, l)[first + j]) continue;
    const uint8_t *sh = s_kv(F, s, l, first + j);
    FZ_ASSERT(memcmp(F->kb + j * F->half, sh, F->half) == 0 &&
                  memcmp(F->vb + j * F->half, sh + F->half, F->half) == 0,
              "kv_read of slot %u differs from what was written", first + j);
  }
}

static void op_plan_create(fz *F, bool inj) {
  fz_in *in = &F->in;
  uint32_t max_seqs = in_below(in, F->MS + 2); /* 0 and MS + 1 are invalid */
  uint64_t cap = in_below(in, 4) == 0 ? 0 : in_below(in, 3 * F->NB + 8);
  pvl_plan_destroy(F->plan);
  F->plan = NULL;
  F->plan_built = false;
  F->plan_change = 0;
  F->nbatch = 0;
  pvl_plan *p = NULL;
  pre(F, inj);
  pvl_status st = pvl_plan_create(F->c, max_seqs, cap, &p);
  bool ok = post(F, st);
  if (max_seqs == 0 || max_seqs > F->MS)
    FZ_ASSERT(!ok, "plan_create(max_seqs %u) succeeded", max_seqs);
  else if (!ok)
    FZ_ASSERT(st == PVL_ERR_NO_MEMORY || st == PVL_ERR_INVALID_ARGUMENT,
              "plan_create: %s", pvl_status_string(st));
  if (ok) {
    pvl_plan_info pi;
    FZ_STATUS(pvl_plan_get_info(p, &pi), PVL_SUCCESS, "plan_get_info");
    FZ_ASSERT(pi.max_seqs == max_seqs && pi.n_seqs == 0, "plan info");
    F->plan = p;
  }
  verify(F);
}

static void op_plan_build(fz *F, bool inj) {
  fz_in *in = &F->in;
  if (!F->plan) return;
  pvl_seq_id ids[FZ_MAX_SEQS + 2];
  uint32_t n = 0, mask = in_u8(in);
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++)
    if (F->s[i].live && (mask >> i & 1)) ids[n++] = F->s[i].id;
  uint32_t rot = in_below(in, n ? n : 1);
  for (uint32_t r = 0; r < rot; r++) {
    pvl_seq_id t = ids[0];
    memmove(ids, ids + 1, (n - 1) * sizeof(ids[0]));
    ids[n - 1] = t;
  }
  bool bad = false;
  uint32_t v = in_below(in, 10);
  if (v == 0 && n) {
    ids[n++] = ids[0];
    bad = true;
  } else if (v == 1) {
    ids[n++] = pick_stale(F);
    bad = true;
  }
  pvl_plan_info pi;
  FZ_STATUS(pvl_plan_get_info(F->plan, &pi), PVL_SUCCESS, "plan_get_info");
  if (trace_on()) {
    fprintf(stderr, "plan_build");
    for (uint32_t i = 0; i < n; i++)
      fprintf(stderr, " %llx", (unsigned long long)ids[i]);
    fprintf(stderr, "\n");
  }
  pre(F, inj);
  pvl_status st = pvl_plan_build(F->plan, ids, n, NULL);
  bool ok = post(F, st);
  if (bad)
    FZ_ASSERT(!ok, "plan_build of a bad batch succeeded");
  else if (n > pi.max_seqs)
    FZ_ASSERT(!ok, "plan_build beyond max_seqs");
  else if (!ok)
    FZ_ASSERT(st == PVL_ERR_NO_MEMORY || st == PVL_ERR_CAPACITY,
              "plan_build: %s", pvl_status_string(st));
  if (ok) {
    memcpy(F->batch, ids, n * sizeof(pvl_seq_id));
    F->nbatch = n;
    F->plan_built = true;
    F->plan_change = 0;
  }
  verify(F);
}

/* Is every batch row's layer l such that its last slot is the sequence's
 * newest token (position - 1)? Item 3 of issue 7 is the case where it is
 * not. */
static bool plan_last_is_newest(fz *F, uint32_t l) {
  for (uint32_t b = 0; b < F->nbatch; b++) {
    sseq *s = find_seq(F, F->batch[b]);
    if (!s) continue;
    uint32_t n = s->n[l];
    if (n && s_pos(F, s, l)[n - 1] != s->n_prompt + s->n_decoded - 1)
      return false;
  }
  return true;
}

static void op_plan_write(fz *F, bool inj) {
  fz_in *in = &F->in;
  if (!F->plan) return;
  uint32_t l = in_below(in, F->L + 1);
  bool newest = l >= F->L || plan_last_is_newest(F, l);
  uint32_t mode = data_mode(F);
  size_t cnt = (size_t)F->nbatch * F->KH * F->D;
  gen(F, mode, F->kb, cnt ? cnt : 1);
  gen(F, mode, F->vb, cnt ? cnt : 1);
  /* What the contract lets succeed: a built plan, every row live and
   * unchanged since the build (else the plan is stale), its layer ending
   * with its newest position, in a block not shared with a fork. */
  bool may = l < F->L && F->plan_built && F->plan_change < 2 && newest;
  for (uint32_t b = 0; b < F->nbatch && may; b++) {
    sseq *s = find_seq(F, F->batch[b]);
    if (!s || s->n[l] == 0 || range_shared(F, s, l, s->n[l] - 1, 1))
      may = false;
  }
  if (trace_on()) {
    fprintf(stderr, "plan_kv_write layer %u, V", l);
    for (uint32_t b = 0; b < F->nbatch; b++)
      fprintf(stderr, " %g",
              (double)dec1(F->dt, F->vb, (size_t)b * F->KH * F->D));
    fprintf(stderr, "\n");
  }
  pre(F, inj);
  pvl_status st = pvl_plan_kv_write(F->plan, l, F->kb, F->vb, NULL);
  bool ok = post(F, st);
  if (!may)
    FZ_ASSERT(!ok,
              "plan_kv_write succeeded on a plan never built or stale, "
              "or a row that is gone, empty, shared or without its newest "
              "slot (layer %u)",
              l);
  else if (F->plan_change == 0)
    expect_ok(F, st, "plan_kv_write on a fresh plan");
  if (ok && !newest)
    fz_fail("plan_kv_write succeeded while a row's last slot of layer %u is "
            "not its newest token (it was dropped by retain/decode_cap): it "
            "overwrote an older token",
            l);
  if (ok)
    for (uint32_t b = 0; b < F->nbatch; b++) {
      sseq *s = find_seq(F, F->batch[b]);
      uint32_t j = s->n[l] - 1;
      memcpy(s_kv(F, s, l, j), F->kb + b * F->half, F->half);
      memcpy(s_kv(F, s, l, j) + F->half, F->vb + b * F->half, F->half);
      s_known(F, s, l)[j] = 1;
    }
  verify(F);
}

/* Double-precision attention of one query head over the shadow's slots;
 * false if a slot is unknown or a value is non-finite or huge (the
 * contract leaves an overflowing row to the dtype). */
static bool ref_row(fz *F, sseq *s, uint32_t l, const void *q, uint32_t qh,
                    double scale, double *out, double *vmax, double *lmax) {
  const uint32_t n = s->n[l], kvh = qh / (F->QH / F->KH);
  double qv[16];
  for (uint32_t e = 0; e < F->D; e++) {
    qv[e] = dec1(F->dt, q, (size_t)qh * F->D + e);
    if (!(fabs(qv[e]) <= 1e3)) return false;
  }
  double *lg =
      (double *)F->fb; /* [maxt] doubles fit: fb holds 2 * maxt floats */
  double mx = -INFINITY;
  *vmax = 0;
  *lmax = 0;
  for (uint32_t j = 0; j < n; j++) {
    if (!s_known(F, s, l)[j]) return false;
    const uint8_t *kv = s_kv(F, s, l, j);
    double dot = 0;
    for (uint32_t e = 0; e < F->D; e++) {
      double k = dec1(F->dt, kv, (size_t)kvh * F->D + e);
      double v = dec1(F->dt, kv + F->half, (size_t)kvh * F->D + e);
      if (!(fabs(k) <= 1e3) || !(fabs(v) <= 1e3)) return false;
      dot += qv[e] * k;
      *vmax = fabs(v) > *vmax ? fabs(v) : *vmax;
    }
    lg[j] = dot * scale;
    mx = lg[j] > mx ? lg[j] : mx;
    *lmax = fabs(lg[j]) > *lmax ? fabs(lg[j]) : *lmax;
  }
  for (uint32_t e = 0; e < F->D; e++) out[e] = 0;
  if (n == 0) return true;
  double sum = 0;
  for (uint32_t j = 0; j < n; j++) sum += exp(lg[j] - mx);
  for (uint32_t j = 0; j < n; j++) {
    double w = exp(lg[j] - mx) / sum;
    const uint8_t *kv = s_kv(F, s, l, j) + F->half;
    for (uint32_t e = 0; e < F->D; e++)
      out[e] += w * dec1(F->dt, kv, (size_t)kvh * F->D + e);
  }
  return true;
}

/* FZ_TRACE: every live sequence's blocks and the plan's rows, to see where
 * a wrong attention row read from. */
static void dump_state(fz *F, uint32_t layer) {
  if (!trace_on()) return;
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
    sseq *s = &F->s[i];
    if (!s->live) continue;
    uint32_t nb = 0;
    pvl_seq_blocks(F->c, s->id, layer, F->ids, F->NB, &nb);
    fprintf(stderr, "seq %llx layer %u: %u slots, blocks",
            (unsigned long long)s->id, layer, s->n[layer]);
    for (uint32_t j = 0; j < nb; j++) fprintf(stderr, " %d", F->ids[j]);
    fprintf(stderr, "\n");
  }
  const pvl_plan_view *v = &F->plan->view;
  for (int32_t b = 0; b < v->n_seqs; b++) {
    const int32_t *buf = v->buf;
    int32_t len = buf[pvl_plan_base_len_index(v, (int32_t)layer, b)] +
                  buf[pvl_plan_n_appended_index(v, b)];
    const int32_t *ids = buf + pvl_plan_block_ids_index(v, (int32_t)layer) +
                         buf[pvl_plan_row_offset_index(v, (int32_t)layer, b)];
    fprintf(stderr, "plan row %d: %d slots, blocks", b, len);
    for (int32_t j = 0; j < len && j < 64; j += (int32_t)F->BS)
      fprintf(stderr, " %d", ids[j / (int32_t)F->BS]);
    fprintf(stderr, "\n");
  }
}

static void op_attention(fz *F, bool inj) {
  fz_in *in = &F->in;
  if (!F->plan) return;
  uint32_t l = in_below(in, F->L + 1);
  static const float scales[8] = {0.0f, 0.0f, 0.0f,  0.125f,
                                  0.5f, 1.0f, -1.0f, NAN};
  float scale = scales[in_below(in, 8)];
  uint32_t mode = data_mode(F);
  size_t cnt = (size_t)F->nbatch * F->QH * F->D;
  gen(F, mode, F->kb, cnt ? cnt : 1);
  /* Poisoned output, so a row left unwritten shows. */
  memset(F->vb, 0xff, cnt * F->es + 1);
  bool gone = false;
  for (uint32_t b = 0; b < F->nbatch; b++) gone |= !find_seq(F, F->batch[b]);
  if (trace_on())
    fprintf(stderr, "attention layer %u, batch of %u\n", l, F->nbatch);
  pre(F, inj);
  pvl_status st = pvl_attention_decode(F->plan, l, F->kb, F->vb, scale, NULL);
  bool ok = post(F, st);
  if (!F->plan_built)
    FZ_ASSERT(!ok, "attention on a plan never built succeeded");
  if (l >= F->L || !(scale >= 0.0f))
    FZ_ASSERT(!ok,
              "attention with layer %u, "
              "scale %g succeeded",
              l, (double)scale);
  if (gone || F->plan_change == 2)
    FZ_ASSERT(!ok, "attention on a stale plan (a member appended or freed "
                   "since the build) succeeded");
  if (F->plan_built && F->plan_change == 0 && l < F->L && scale >= 0.0f)
    expect_ok(F, st, "attention on a fresh plan");
  verify(F);
  if (!ok) return;
  const double sc = scale == 0.0f ? 1.0 / sqrt((double)F->D) : scale;
  const double eps = F->dt == PVL_DTYPE_F32   ? 2e-6
                     : F->dt == PVL_DTYPE_F16 ? 1.5e-3
                                              : 1.2e-2;
  for (uint32_t b = 0; b < F->nbatch; b++) {
    sseq *s = find_seq(F, F->batch[b]);
    for (uint32_t h = 0; h < F->QH; h++) {
      double ref[16], vmax, lmax;
      const void *q = F->kb + (size_t)b * F->QH * F->D * F->es;
      if (!ref_row(F, s, l, q, h, sc, ref, &vmax, &lmax)) continue;
      /* fp32 logits carry an absolute error of about |logit| * 2^-23 per
       * rounding, which moves the weights by as much; the output is then
       * rounded to the dtype. */
      const double tol =
          (vmax + 1e-30) * (eps + 4 * 1.2e-7 * (lmax + 1) * F->D);
      for (uint32_t e = 0; e < F->D; e++) {
        double got = dec1(F->dt, F->vb, ((size_t)b * F->QH + h) * F->D + e);
        if (!(fabs(got - ref[e]) <= tol)) dump_state(F, l);
        FZ_ASSERT(fabs(got - ref[e]) <= tol,
                  "attention layer %u row %u head %u elem %u: %.9g, reference "
                  "%.9g (tolerance %.3g, %u slots)",
                  l, b, h, e, got, ref[e], tol, s->n[l]);
      }
    }
  }
}

/* A policy from the input: one of every kind with its defaults, then maybe
 * fields replaced by values from a table that includes invalid ones. */
static void make_policy(fz *F, pvl_policy *p) {
  fz_in *in = &F->in;
  pvl_policy_kind kind = (pvl_policy_kind)in_below(in, 7); /* 6: invalid */
  if (pvl_policy_init(p, kind) != PVL_SUCCESS) {
    FZ_ASSERT(kind > PVL_POLICY_VLCACHE, "policy_init(%d) failed", (int)kind);
    pvl_policy_init(p, PVL_POLICY_VLCACHE);
    p->kind = kind;
  }
  static const float ratios[12] = {0.1f, 0.5f,  0.25f, 1.0f, 0.01f,    0.9f,
                                   0.0f, -0.5f, 1.5f,  NAN,  INFINITY, 1e-7f};
  uint32_t fields = in_u8(in);
  if (fields & 1) p->keep_ratio = ratios[in_below(in, 12)];
  if (fields & 2) p->threshold = ratios[in_below(in, 12)];
  if (fields & 4) p->min_layer_ratio = ratios[in_below(in, 12)];
  if (fields & 8) p->recent_ratio = ratios[in_below(in, 12)];
  if (fields & 16) {
    p->window_cap = in_below(in, 8);
    p->fallback_window = in_below(in, 12);
  }
  if (fields & 32) p->renormalize = in_below(in, 3);
  if (fields & 64) {
    p->sink_tokens = in_below(in, 8);
    p->snap_window = in_below(in, 12);
    p->pool_kernel = in_below(in, 8);
    p->pyramid_beta = ratios[in_below(in, 12)] * 40.0f;
  }
  if (fields & 128) {
    p->decode_cap = in_below(in, 24);
    p->decode_cap_slack = in_below(in, 6);
  }
}

/* Observes rows of one layer; n_rows and first_pos from the caller. */
static void observe(fz *F, sseq *s, pvl_seq_id id, uint32_t l, uint32_t first,
                    uint32_t nr, float thr, bool inj) {
  uint32_t mode = data_mode(F);
  size_t cnt = (size_t)nr * F->QH * F->D;
  if (cnt * F->es > (size_t)F->maxt * F->tokb) return; /* scratch bound */
  gen(F, mode, F->kb, cnt ? cnt : 1);
  pre(F, inj);
  pvl_status st =
      pvl_observe(F->c, id, l, nr ? F->kb : NULL, first, nr, thr, 0.0f, NULL);
  bool ok = post(F, st);
  if (!s || l >= F->L)
    FZ_ASSERT(!ok, "observe of a bad sequence or layer "
                   "succeeded");
  verify(F);
}

static void op_observe(fz *F, bool inj) {
  fz_in *in = &F->in;
  bool stale = in_below(in, 16) == 0;
  sseq *s = stale ? NULL : pick_live(F);
  pvl_seq_id id = s ? s->id : pick_stale(F);
  uint32_t l = in_below(in, F->L + 1);
  uint32_t pos = s ? s->n_prompt + s->n_decoded : 8;
  uint32_t first = in_below(in, pos + 2);
  uint32_t nr = in_below(in, 8);
  static const float thr[6] = {0.01f, 0.1f, 0.5f, 0.0f, 1.0f, NAN};
  observe(F, s, id, l, first, nr, thr[in_below(in, 6)], inj);
}

/* Does the observation of a layer in [l0, l1) hold a non-finite sum over
 * its first `keys` keys, or (gamma) a non-finite sparsity? Issue 7 item 1:
 * the selection must then not succeed on scores that do not exist. */
static bool obs_nonfinite(fz *F, sseq *s, uint32_t l0, uint32_t l1,
                          uint32_t keys, bool gamma) {
  for (uint32_t l = l0; l < l1; l++) {
    float gl = 0;
    uint32_t nk = 0, nr = 0;
    pvl_status st = pvl_seq_observation(F->c, s->id, l, NULL, &gl, F->fa, NULL,
                                        F->maxt, &nk, &nr);
    if (st != PVL_SUCCESS) continue;
    if (gamma && !isfinite(gl)) return true;
    for (uint32_t j = 0; j < nk && j < keys; j++)
      if (!isfinite(F->fa[j])) return true;
  }
  return false;
}

/* After a compress or decode_cap that succeeded: the layer's slots are a
 * subsequence of the shadow's (by position), data unchanged; returns how
 * many decoded (position >= n_prompt) slots were kept. */
static uint32_t follow_drop(fz *F, sseq *s, uint32_t l, uint32_t *dec_before) {
  uint32_t got = 0;
  FZ_STATUS(pvl_seq_positions(F->c, s->id, l, F->u32a, F->maxt, &got),
            PVL_SUCCESS, "seq_positions");
  const uint32_t *pos = s_pos(F, s, l);
  uint32_t *keep = F->u32b, j = 0, dec = 0, decb = 0;
  for (uint32_t i = 0; i < s->n[l]; i++) decb += pos[i] >= s->n_prompt;
  for (uint32_t i = 0; i < got; i++) {
    while (j < s->n[l] && pos[j] != F->u32a[i]) j++;
    FZ_ASSERT(j < s->n[l],
              "layer %u slot %u: position %u was not held before, or the "
              "kept slots are out of order",
              l, i, F->u32a[i]);
    keep[i] = j++;
    dec += F->u32a[i] >= s->n_prompt;
  }
  shadow_keep(F, s, l, keep, got);
  if (dec_before) *dec_before = decb;
  return dec;
}

static void op_compress(fz *F, bool inj) {
  fz_in *in = &F->in;
  bool stale = in_below(in, 16) == 0;
  sseq *s = stale ? NULL : pick_live(F);
  pvl_seq_id id = s ? s->id : pick_stale(F);
  pvl_policy pol;
  make_policy(F, &pol);
  /* Usually observe first what the policy asks for, every layer. */
  if (s && in_below(in, 4) != 0) {
    uint32_t first = 0, nr = 0, fb = 0;
    pvl_status st = pvl_policy_rows(&pol, F->c, s->id, &first, &nr, &fb);
    if (st == PVL_SUCCESS) {
      if (nr == 0) nr = 1 + in_below(in, 4); /* full/streaming: harmless */
      if (nr > 16) nr = 16;
      float thr =
          pol.threshold > 0.0f && pol.threshold < 1.0f ? pol.threshold : 0.01f;
      for (uint32_t l = 0; l < F->L; l++)
        observe(F, s, id, l, first, nr, thr, false);
    }
  }
  bool nonfinite = s && obs_nonfinite(F, s, 0, F->L, s->n_prompt,
                                      pol.kind == PVL_POLICY_VLCACHE);
  uint32_t budget[4], kept[4];
  float density[4];
  pvl_compress_report rep;
  memset(&rep, 0, sizeof(rep));
  rep.budget = budget;
  rep.kept = kept;
  rep.density = density;
  pre(F, inj);
  pvl_status st = pvl_compress(F->c, id, &pol, &rep, NULL);
  bool ok = post(F, st);
  if (!s) FZ_ASSERT(!ok, "compress of a stale id succeeded");
  if (!ok) {
    verify(F);
    return;
  }
  FZ_ASSERT(s->compressed != 1, "compress succeeded twice on a sequence");
  for (uint32_t l = 0; l < F->L; l++) {
    bool intact = s->n[l] >= s->n_prompt;
    for (uint32_t j = 0; j < s->n_prompt && intact; j++)
      intact = s_pos(F, s, l)[j] == j;
    FZ_ASSERT(intact,
              "compress succeeded although layer %u lost prompt "
              "tokens to a retain or decode_cap",
              l);
  }
  if (nonfinite && pol.kind >= PVL_POLICY_H2O)
    fz_fail("compress (%s) succeeded on an observation with non-finite "
            "sums: its selection comes from scores that do not exist",
            pvl_policy_name(pol.kind));
  uint64_t total = 0;
  for (uint32_t l = 0; l < F->L; l++) {
    uint32_t decb = 0, dec = follow_drop(F, s, l, &decb);
    FZ_ASSERT(dec == decb, "compress dropped decoded tokens of layer %u", l);
    FZ_ASSERT(s->n[l] - dec == kept[l] && kept[l] <= s->n_prompt &&
                  kept[l] ==
                      (budget[l] < s->n_prompt ? budget[l] : s->n_prompt),
              "compress layer %u: %u prompt tokens kept, report kept %u "
              "budget %u, prompt %u",
              l, s->n[l] - dec, kept[l], budget[l], s->n_prompt);
    total += kept[l];
  }
  FZ_ASSERT(rep.kept_total == total && rep.n_prompt == s->n_prompt,
            "compress report: kept_total %llu, sum %llu",
            (unsigned long long)rep.kept_total, (unsigned long long)total);
  s->compressed = 1;
  plan_touch(F, s->id, 1);
  verify(F);
}

static void op_decode_cap(fz *F, bool inj) {
  fz_in *in = &F->in;
  sseq *s = pick_live(F);
  if (!s) return;
  uint32_t l = in_below(in, F->L + 1);
  pvl_policy pol;
  make_policy(F, &pol);
  pol.decode_cap = in_below(in, 2 * F->BS + 4);
  pol.decode_cap_slack = in_below(in, 4);
  if (l < F->L && in_below(in, 4) != 0) {
    /* the recent decode queries */
    uint32_t pos = s->n_prompt + s->n_decoded, nr = 1 + in_below(in, 4);
    if (nr > pos) nr = pos;
    observe(F, s, s->id, l, pos - nr, nr, 0.01f, false);
  }
  bool nonfinite = l < F->L && obs_nonfinite(F, s, l, l + 1, UINT32_MAX, false);
  uint32_t did = 7;
  uint32_t before = l < F->L ? s->n[l] : 0;
  pre(F, inj);
  pvl_status st = pvl_decode_cap(F->c, s->id, l, &pol, &did, NULL);
  bool ok = post(F, st);
  if (l >= F->L) FZ_ASSERT(!ok, "decode_cap of layer %u succeeded", l);
  if (!ok) {
    verify(F);
    return;
  }
  FZ_ASSERT(pol.decode_cap > 0 && pol.kind != PVL_POLICY_FULL,
            "decode_cap with cap %u, policy %d succeeded", pol.decode_cap,
            (int)pol.kind);
  FZ_ASSERT(did == (before > pol.decode_cap),
            "decode_cap: did %u with %u "
            "tokens, cap %u",
            did, before, pol.decode_cap);
  if (did) {
    if (nonfinite && pol.kind >= PVL_POLICY_H2O)
      fz_fail("decode_cap (%s) succeeded on an observation with non-finite "
              "sums",
              pvl_policy_name(pol.kind));
    follow_drop(F, s, l, NULL);
    plan_touch(F, s->id, 1);
    FZ_ASSERT(s->n[l] <= pol.decode_cap, "decode_cap left %u tokens, cap %u",
              s->n[l], pol.decode_cap);
  }
  verify(F);
}

static void op_query(fz *F) {
  fz_in *in = &F->in;
  sseq *s = pick_live(F);
  pvl_stats st;
  FZ_STATUS(pvl_cache_get_stats(F->c, &st), PVL_SUCCESS, "stats");
  pvl_config cfg;
  FZ_STATUS(pvl_cache_config(F->c, &cfg), PVL_SUCCESS, "cache_config");
  FZ_ASSERT(cfg.num_blocks == F->NB && cfg.backend == PVL_BACKEND_CPU,
            "cache_config");
  if (!s) return;
  uint32_t l = in_below(in, F->L + 1);
  uint32_t n = 0;
  pvl_status r;
  switch (in_below(in, 8)) {
  case 0: /* ids with a capacity that may be too small, or none */
    r = pvl_seq_blocks(F->c, s->id, l, NULL, 0, &n);
    if (l >= F->L)
      FZ_ASSERT(r != PVL_SUCCESS, "seq_blocks of layer %u", l);
    else if (s->n[l] == 0)
      FZ_STATUS(r, PVL_SUCCESS, "seq_blocks, no blocks");
    else
      FZ_STATUS(r, PVL_ERR_CAPACITY, "seq_blocks, cap 0");
    break;
  case 1: /* cap 0, and no array at all (a valid call on an empty layer) */
    r = pvl_seq_positions(F->c, s->id, l, in_u8(in) & 1 ? NULL : F->u32a, 0,
                          &n);
    if (l < F->L && s->n[l]) FZ_STATUS(r, PVL_ERR_CAPACITY, "positions cap 0");
    if (l >= F->L) FZ_ASSERT(r != PVL_SUCCESS, "positions of layer %u", l);
    break;
  case 2: {
    pvl_span sp[5];
    r = pvl_seq_visual_spans(F->c, s->id, sp, 5, &n);
    FZ_STATUS(r, PVL_SUCCESS, "visual_spans");
    FZ_ASSERT(n == s->n_spans && !memcmp(sp, s->spans, n * sizeof(pvl_span)),
              "visual spans differ from those given at admission");
    break;
  }
  case 3: {
    pvl_policy pol;
    make_policy(F, &pol);
    uint32_t first = 0, nr = 0, fb = 0;
    r = pvl_policy_rows(&pol, F->c, s->id, &first, &nr, &fb);
    if (r == PVL_SUCCESS)
      FZ_ASSERT((uint64_t)first + nr <= s->n_prompt,
                "policy_rows [%u, +%u) beyond the prompt of %u", first, nr,
                s->n_prompt);
    break;
  }
  case 5: { /* NULL arguments: refused, and nothing changes */
    pvl_seq_id out = 0;
    uint32_t keep0 = 0, did = 0;
    pvl_policy pol;
    pvl_policy_init(&pol, PVL_POLICY_STREAMING);
    pol.decode_cap = 1;
    pre(F, false);
    pvl_status rs[12] = {
        pvl_seq_add(F->c, 1, NULL, 0, NULL),
        pvl_seq_fork(F->c, s->id, NULL),
        pvl_seq_append(F->c, NULL, 1, NULL),
        pvl_seq_retain(F->c, s->id, 0, NULL, 1, NULL),
        pvl_seq_get_info(F->c, s->id, NULL),
        pvl_kv_write(F->c, s->id, 0, 0, 1, NULL, NULL, NULL),
        pvl_kv_read(F->c, s->id, 0, 0, 1, NULL, NULL, NULL),
        pvl_observe(F->c, s->id, 0, NULL, 0, 1, 0.01f, 0.0f, NULL),
        pvl_compress(F->c, s->id, NULL, NULL, NULL),
        pvl_decode_cap(F->c, s->id, 0, &pol, NULL, NULL),
        pvl_plan_build(NULL, &out, 1, NULL),
        pvl_seq_retain(F->c, out, 0, &keep0, 1, NULL)};
    post(F, PVL_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 12; i++)
      FZ_ASSERT(rs[i] != PVL_SUCCESS,
                "call %d of the NULL-argument set "
                "succeeded",
                i);
    (void)did;
    break;
  }
  case 7: { /* zero-length calls with NULL data: a status either way, but
             * no undefined behaviour (memcpy(NULL, p, 0) and the like) */
    uint32_t sl = l < F->L ? l : 0;
    pre(F, false);
    pvl_status rs[6] = {
        pvl_kv_write(F->c, s->id, sl, 0, 0, NULL, NULL, NULL),
        pvl_kv_read(F->c, s->id, sl, 0, 0, NULL, NULL, NULL),
        pvl_seq_append(F->c, NULL, 0, NULL),
        pvl_seq_visual_spans(F->c, s->id, NULL, 0, &n),
        pvl_blocks_for_append(F->c, NULL, 0, &F->rng_unused),
        pvl_observe(F->c, s->id, sl, NULL, 0, 0, 0.01f, 0.0f, NULL)};
    post(F, PVL_ERR_INVALID_ARGUMENT); /* compares: nothing may change */
    (void)rs;
    break;
  }
  case 6: { /* the pure policy functions on input-made arrays */
    pvl_policy pol;
    make_policy(F, &pol);
    uint32_t m = in_below(in, 40), budget = in_below(in, 48);
    float raw[40], sc[40];
    uint32_t seen[40], keep[40], nk = 0;
    bool finite = true;
    for (uint32_t j = 0; j < m; j++) {
      uint32_t b = in_u8(in);
      raw[j] = b < 250 ? (float)b / 25.0f : b == 250 ? NAN : INFINITY;
      finite &= b < 250;
      seen[j] = 1 + in_below(in, 4);
    }
    r = pvl_policy_scores(&pol, m, raw, seen, 1 + in_below(in, 4), sc);
    if (!finite)
      FZ_ASSERT(r != PVL_SUCCESS, "policy_scores of non-finite "
                                  "raw sums succeeded");
    bool nan = false;
    for (uint32_t j = 0; r == PVL_SUCCESS && j < m; j++) nan |= isnan(sc[j]);
    FZ_ASSERT(!nan, "policy_scores produced NaN from finite sums");
    if (r == PVL_SUCCESS) {
      r = pvl_policy_select(&pol, m, budget, sc, keep, &nk);
      if (r == PVL_SUCCESS) {
        FZ_ASSERT(nk == (budget < m ? budget : m),
                  "policy_select kept %u of %u with budget %u", nk, m, budget);
        for (uint32_t j = 0; j < nk; j++)
          FZ_ASSERT(keep[j] < m && (j == 0 || keep[j] > keep[j - 1]),
                    "policy_select: keep list not ascending in range");
      }
    }
    uint32_t bud[4];
    float dens[4];
    for (uint32_t i = 0; i < 4; i++) dens[i] = (float)in_below(in, 5) / 4.0f;
    if (m) {
      r = pvl_policy_budgets(&pol, F->L, m, dens, bud);
      for (uint32_t i = 0; r == PVL_SUCCESS && i < F->L; i++)
        FZ_ASSERT(bud[i] >= 1, "policy_budgets gave layer %u no token", i);
    }
    pvl_policy_kind kd;
    const char *nm = pvl_policy_name(pol.kind);
    if (nm) {
      FZ_STATUS(pvl_policy_parse(nm, &kd), PVL_SUCCESS, "policy_parse");
      FZ_ASSERT(kd == pol.kind, "policy_parse(%s)", nm);
    }
    FZ_ASSERT(pvl_policy_parse("no-such-policy", &kd) != PVL_SUCCESS,
              "policy_parse of an unknown name");
    FZ_ASSERT(pvl_status_string((pvl_status)in_u8(in)) != NULL,
              "status_string");
    break;
  }
  default: {
    float gamma[32], gl = 0;
    uint32_t nk = 0, nr = 0;
    r = pvl_seq_observation(F->c, s->id, l, gamma, &gl, F->fa, F->u32a, F->maxt,
                            &nk, &nr);
    if (r == PVL_SUCCESS)
      FZ_ASSERT(l < F->L && nk == s->n[l] && nr > 0,
                "observation of layer %u: %u keys (layer holds %u), %u rows", l,
                nk, l < F->L ? s->n[l] : 0, nr);
    break;
  }
  }
}

/* ---- one input ---- */

static void setup_shadow(fz *F) {
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
    sseq *s = &F->s[i];
    s->n = calloc(F->L, sizeof(uint32_t));
    s->pos = malloc((size_t)F->L * F->maxt * sizeof(uint32_t));
    s->known = calloc((size_t)F->L * F->maxt, 1);
    s->kv = malloc((size_t)F->L * F->maxt * F->tokb);
    if (!s->n || !s->pos || !s->known || !s->kv) fz_fail("host memory");
  }
  size_t bb = (size_t)F->maxt * F->tokb + 64;
  /* Observe and attention stage Q rows here too: 16 rows of 4 x 16. */
  if (bb < 16 * 64 * 4 + 64) bb = 16 * 64 * 4 + 64;
  F->buf = malloc(bb);
  F->buf2 = malloc(bb);
  F->kb = malloc(bb);
  F->vb = malloc(bb);
  F->u32a = malloc((F->maxt + 8) * sizeof(uint32_t));
  F->u32b = malloc((F->maxt + 8) * sizeof(uint32_t));
  F->ids = malloc((F->NB + 8) * sizeof(int32_t));
  size_t nf = bb / 2 + 2 * F->maxt + 64;
  F->fa = malloc(nf * sizeof(float));
  F->fb = malloc(nf * sizeof(float));
  if (!F->buf || !F->buf2 || !F->kb || !F->vb || !F->u32a || !F->u32b ||
      !F->ids || !F->fa || !F->fb)
    fz_fail("host memory");
}

static void teardown_shadow(fz *F) {
  for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
    free(F->s[i].n);
    free(F->s[i].pos);
    free(F->s[i].known);
    free(F->s[i].kv);
  }
  free(F->buf);
  free(F->buf2);
  free(F->kb);
  free(F->vb);
  free(F->u32a);
  free(F->u32b);
  free(F->ids);
  free(F->fa);
  free(F->fb);
  free(F->snap[0]);
  free(F->snap[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz f;
  fz *F = &f;
  memset(F, 0, sizeof(*F));
  g_cur = F;
  F->in = (fz_in){data, size, 0};
  fz_in *in = &F->in;
  F->op = "create";
  F->L = 1 + in_below(in, 4);
  F->KH = 1 + in_below(in, 2);
  F->QH = F->KH * (1 + in_below(in, 2));
  F->D = 1 + in_below(in, 16);
  F->BS = 1 + in_below(in, 8);
  F->NB = 4 + in_below(in, 61);
  F->dt = (pvl_dtype)in_below(in, 3);
  F->MS = 1 + in_below(in, FZ_MAX_SEQS);
  F->rng = in_u32(in);
  F->es = pvl_dtype_size(F->dt);
  F->half = F->KH * F->D * F->es;
  F->tokb = 2 * F->half;
  F->maxt = F->NB * F->BS;
  F->al.a = (pvl_allocator){fz_alloc_fn, fz_free_fn, &F->al};
  F->al.fail_at = -1;

  pvl_config cfg;
  FZ_STATUS(pvl_config_init(&cfg), PVL_SUCCESS, "config_init");
  cfg.backend = PVL_BACKEND_CPU;
  cfg.dtype = F->dt;
  cfg.num_layers = F->L;
  cfg.num_q_heads = F->QH;
  cfg.num_kv_heads = F->KH;
  cfg.head_dim = F->D;
  cfg.block_size = F->BS;
  cfg.num_blocks = F->NB;
  cfg.max_seqs = F->MS;
  cfg.allocator = &F->al.a;
  /* Creation under an allocation failure: NO_MEMORY, nothing leaked, *out
   * untouched; then a normal creation. */
  uint32_t cfail = in_u8(in);
  const uint32_t flags = in_u8(in);
  const bool free_all = (flags & 1) == 0;
  /* A bad configuration first, sometimes: refused, nothing allocated. */
  if (flags & 2) {
    pvl_config bad = cfg;
    switch (in_below(in, 8)) {
    case 0: bad.num_layers = 0; break;
    case 1: bad.num_kv_heads = 0; break;
    case 2: bad.head_dim = 0; break;
    case 3: bad.block_size = 0; break;
    case 4: bad.num_blocks = 0; break; /* CPU needs a pool size */
    case 5: bad.dtype = (pvl_dtype)7; break;
    case 6: bad.size = 3; break;
    default: bad.backend = (pvl_backend)9; break;
    }
    pvl_cache *c = (pvl_cache *)&f;
    pvl_status st = pvl_cache_create(&bad, &c);
    FZ_ASSERT(st != PVL_SUCCESS && c == (pvl_cache *)&f,
              "cache_create with a bad configuration: %s",
              pvl_status_string(st));
    FZ_ASSERT(F->al.live == 0, "refused cache_create left allocations");
  }
  if (cfail & 1) {
    pvl_cache *c = (pvl_cache *)&f;
    fz_arm(&F->al, (long)(cfail >> 1) % 24);
    pvl_status st = pvl_cache_create(&cfg, &c);
    fz_disarm(&F->al);
    if (st == PVL_SUCCESS) {
      FZ_ASSERT(c != (pvl_cache *)&f, "create: *out not written");
      pvl_cache_destroy(c);
    } else {
      FZ_STATUS(st, PVL_ERR_NO_MEMORY, "cache_create with a failing allocator");
      FZ_ASSERT(c == (pvl_cache *)&f, "failing create wrote *out");
    }
    FZ_ASSERT(F->al.live == 0, "cache_create left %ld allocations", F->al.live);
  }
  FZ_STATUS(pvl_cache_create(&cfg, &F->c), PVL_SUCCESS, "cache_create");
  setup_shadow(F);
  FZ_STATUS(pvl_plan_create(F->c, F->MS, 0, &F->plan), PVL_SUCCESS,
            "plan_create");
  verify(F);

  static const char *names[16] = {
      "add",        "append",     "fork",      "retain",
      "free",       "write",      "read",      "plan_create",
      "plan_build", "plan_write", "attention", "observe",
      "compress",   "decode_cap", "query",     "append"};
  for (F->step = 0; F->step < FZ_MAX_OPS && in_left(in); F->step++) {
    uint32_t b = in_u8(in);
    bool inj = (b & 16) != 0;
    F->op = names[b & 15];
    F->inject = false;
    switch (b & 15) {
    case 0: op_add(F, inj); break;
    case 1: op_append(F, inj); break;
    case 2: op_fork(F, inj); break;
    case 3: op_retain(F, inj); break;
    case 4: op_free(F, inj); break;
    case 5: op_write(F, inj); break;
    case 6: op_read(F); break;
    case 7: op_plan_create(F, inj); break;
    case 8: op_plan_build(F, inj); break;
    case 9: op_plan_write(F, inj); break;
    case 10: op_attention(F, inj); break;
    case 11: op_observe(F, inj); break;
    case 12: op_compress(F, inj); break;
    case 13: op_decode_cap(F, inj); break;
    case 14: op_query(F); break;
    default: op_append(F, inj); break;
    }
    F->inject = false;
  }

  /* Teardown: either free every sequence (then every block is free) or
   * destroy the cache with sequences and plans still live. */
  F->op = "teardown";
  if (free_all) {
    for (uint32_t i = 0; i < FZ_MAX_SEQS; i++) {
      if (!F->s[i].live) continue;
      FZ_STATUS(pvl_seq_free(F->c, F->s[i].id), PVL_SUCCESS, "free");
      shadow_drop(F, &F->s[i]);
      verify(F);
    }
    pvl_stats st;
    FZ_STATUS(pvl_cache_get_stats(F->c, &st), PVL_SUCCESS, "stats");
    FZ_ASSERT(st.free_blocks == F->NB && st.tokens == 0,
              "all sequences freed: %u of %u blocks free, %llu tokens",
              st.free_blocks, F->NB, (unsigned long long)st.tokens);
    pvl_plan_destroy(F->plan);
  }
  FZ_STATUS(pvl_cache_destroy(F->c), PVL_SUCCESS, "cache_destroy");
  F->c = NULL;
  FZ_ASSERT(F->al.live == 0, "%ld allocations (%zu bytes) outlive the cache",
            F->al.live, F->al.live_bytes);
  teardown_shadow(F);
  g_cur = NULL;
  return 0;
}
