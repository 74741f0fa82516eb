/* Helpers shared by the Criterion tests: small CPU caches, a seeded RNG,
 * dtype converters written independently of the library's, a dense double
 * reference for decode attention, state snapshots for "a failing call
 * changes nothing", and a counting/failing allocator for OOM injection. */
#ifndef PVL_TESTUTIL_H
#define PVL_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>

#include "internal.h"
#include "pagedvl.h"
#include "pvl_kernels.h"

/* ---- caches ---- */

/* A CPU config with the given geometry; max_seqs 64, no allocator. */
pvl_config tu_config(uint32_t layers, uint32_t q_heads, uint32_t kv_heads,
                     uint32_t head_dim, uint32_t block_size,
                     uint32_t num_blocks, pvl_dtype dtype);
/* Creates a cache from cfg or fails the test. */
pvl_cache *tu_cache_new(const pvl_config *cfg);
/* Shorthand: tu_config + tu_cache_new. */
pvl_cache *tu_cache(uint32_t layers, uint32_t q_heads, uint32_t kv_heads,
                    uint32_t head_dim, uint32_t block_size, uint32_t num_blocks,
                    pvl_dtype dtype);

/* Fails the test with pvl__cache_check's message if an invariant is broken. */
#define TU_CHECK(cache)                                                        \
  do {                                                                         \
    char tu_msg_[512] = "";                                                    \
    pvl_status tu_st_ = pvl__cache_check((cache), tu_msg_, sizeof(tu_msg_));   \
    cr_assert_eq(tu_st_, PVL_SUCCESS, "%s:%d: pvl__cache_check: %s", __FILE__, \
                 __LINE__, tu_msg_);                                           \
  } while (0)

/* Fails the test unless `call` returns PVL_SUCCESS; prints the cache's last
 * error. */
#define TU_OK(cache, call)                                                     \
  do {                                                                         \
    pvl_status tu_s_ = (call);                                                 \
    cr_assert_eq(tu_s_, PVL_SUCCESS, "%s:%d: %s -> %s (%s | %s)", __FILE__,    \
                 __LINE__, #call, pvl_status_string(tu_s_),                    \
                 pvl_cache_last_error(cache), pvl_create_last_error());        \
  } while (0)

/* Fails the test unless `call` returns `expected`. */
#define TU_IS(expected, call)                                                  \
  do {                                                                         \
    pvl_status tu_s_ = (call);                                                 \
    cr_assert_eq(tu_s_, (expected), "%s:%d: %s -> %s, expected %s", __FILE__,  \
                 __LINE__, #call, pvl_status_string(tu_s_),                    \
                 pvl_status_string(expected));                                 \
  } while (0)

pvl_stats tu_stats(const pvl_cache *c);
uint32_t tu_free_blocks(const pvl_cache *c);
/* Tokens and blocks of one layer (fails the test on error). */
uint32_t tu_layer_tokens(const pvl_cache *c, pvl_seq_id s, uint32_t layer);
uint32_t tu_layer_blocks(const pvl_cache *c, pvl_seq_id s, uint32_t layer);
/* Block ids of one layer into ids (cap entries); returns the count. */
uint32_t tu_blocks(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                   int32_t *ids, uint32_t cap);
pvl_seq_id tu_add(pvl_cache *c, uint32_t n_prompt);

static inline uint32_t tu_ceil_div(uint32_t a, uint32_t b) {
  return (a + b - 1) / b;
}

/* Token "tags" for f32 caches: the token with tag t holds K[h][e] = t and
 * V[h][e] = -(t + h * head_dim + e), so a read-back identifies the token
 * and shows a torn or misplaced row. Tags are integers below 2^22. */
pvl_status tu_write_tags(pvl_cache *c, pvl_seq_id s, uint32_t layer,
                         uint32_t first, uint32_t n, const float *tags);
/* Reads tags back; a token whose K/V rows are not one consistent tag reads
 * as NAN. Returns the status of pvl_kv_read. */
pvl_status tu_read_tags(const pvl_cache *c, pvl_seq_id s, uint32_t layer,
                        uint32_t first, uint32_t n, float *tags);

/* ---- deterministic RNG (splitmix64) ---- */

typedef struct tu_rng {
  uint64_t state;
  uint64_t seed;
} tu_rng;

/* The seed of a test: PVL_TEST_SEED from the environment if set, else a
 * hash of `name`. Logged, so a failure can be replayed. */
uint64_t tu_seed(const char *name);
void tu_rng_init(tu_rng *r, uint64_t seed);
uint64_t tu_next(tu_rng *r);
/* Uniform in [0, n) (n >= 1). */
uint32_t tu_below(tu_rng *r, uint32_t n);
/* Uniform in [lo, hi]. */
uint32_t tu_range(tu_rng *r, uint32_t lo, uint32_t hi);
/* Uniform float in [lo, hi). */
float tu_uniform(tu_rng *r, float lo, float hi);
/* Random strictly ascending subset of [0, n) of size k into out. */
void tu_subset(tu_rng *r, uint32_t n, uint32_t k, uint32_t *out);
void tu_shuffle_u64(tu_rng *r, uint64_t *a, uint32_t n);

/* ---- dtypes (independent of the library's dtype.c) ---- */

/* Value of x rounded to dtype (round to nearest even; f32 is identity). */
float tu_round(pvl_dtype dt, float x);
/* Encodes values (already representable in dt, e.g. from tu_round) into a
 * dtype buffer, and decodes a dtype buffer into floats. */
void tu_encode(pvl_dtype dt, const float *src, void *dst, size_t n);
void tu_decode(pvl_dtype dt, const void *src, float *dst, size_t n);
/* Fills a dtype buffer with NaN. */
void tu_poison(pvl_dtype dt, void *dst, size_t n);
/* n random values in [lo, hi) rounded to dt: writes the exact values into
 * vals (may be NULL) and their encoding into buf (may be NULL). */
void tu_fill(tu_rng *r, pvl_dtype dt, float lo, float hi, float *vals,
             void *buf, size_t n);
/* Tolerance eps of an output in dt, relative to |ref|. */
double tu_eps(pvl_dtype dt);

/* ---- reference attention ---- */

/* out[h][d] = softmax(scale * q[h] . k_j) v_j over j < len for every query
 * head h < hq, in double. q [hq][d]; k, v [len][hkv][d] (token-major, as
 * pvl_kv_write takes them). len = 0 gives zeros. */
void tu_ref_attention(const float *q, const float *k, const float *v,
                      uint32_t len, uint32_t hq, uint32_t hkv, uint32_t d,
                      double scale, double *out);

/* ---- snapshots: "a failing call changes nothing" ---- */

typedef struct tu_snap tu_snap;
/* Everything observable about the cache and the listed sequences: stats,
 * per-layer token sums, every block's refcount, and per sequence its info,
 * spans, block ids, positions and (with_data) K/V contents. Ids that are not
 * live are recorded as such. Uses libc memory only. */
tu_snap *tu_snap_take(const pvl_cache *c, const pvl_seq_id *ids, uint32_t n,
                      bool with_data);
/* true if equal; otherwise writes the first difference into why. */
bool tu_snap_equal(const tu_snap *a, const tu_snap *b, char *why,
                   size_t why_len);
void tu_snap_free(tu_snap *s);

/* Asserts that the state now equals the snapshot `before`. */
#define TU_UNCHANGED(cache, before, ids, n, data)                              \
  do {                                                                         \
    tu_snap *tu_after_ = tu_snap_take((cache), (ids), (n), (data));            \
    char tu_why_[512] = "";                                                    \
    bool tu_eq_ =                                                              \
        tu_snap_equal((before), tu_after_, tu_why_, sizeof(tu_why_));          \
    tu_snap_free(tu_after_);                                                   \
    cr_assert(tu_eq_, "%s:%d: state changed: %s", __FILE__, __LINE__,          \
              tu_why_);                                                        \
  } while (0)

/* ---- counting / failing allocator ---- */

typedef struct tu_alloc {
  pvl_allocator a; /* pass &ta.a as config.allocator */
  long attempts;   /* allocation attempts since the last arm */
  long fail_at;    /* -1: never; else the attempt index that fails */
  bool fail_after; /* fail every attempt >= fail_at, not just one */
  long failures;   /* injected failures */
  long total;      /* successful allocations, ever */
  long live;       /* allocations not yet freed */
  size_t live_bytes;
  size_t max_size; /* larger requests return NULL (0 = no limit) */
  long errors;     /* frees with a wrong size/alignment or pointer */
  char err[256];   /* the first such error */
  /* Freed blocks are filled with 0x5a and, except under ASan (which has
   * its own quarantine), held back for the last 32 frees, so a read of
   * freed memory sees the pattern instead of reused data. */
  void *quarantine[32];
  unsigned n_quarantine;
} tu_alloc;

void tu_alloc_init(tu_alloc *ta);
/* From now, attempt number n (0-based) fails; with `after`, every later one
 * too. */
void tu_alloc_arm(tu_alloc *ta, long n, bool after);
void tu_alloc_disarm(tu_alloc *ta);
/* Releases the quarantine (call before the allocator goes away). */
void tu_alloc_flush(tu_alloc *ta);

/* Asserts the allocator saw no bad free and holds no live allocation. */
#define TU_NO_LEAKS(ta)                                                        \
  do {                                                                         \
    tu_alloc_flush(ta);                                                        \
    cr_assert_eq((ta)->errors, 0, "%s:%d: allocator misuse: %s", __FILE__,     \
                 __LINE__, (ta)->err);                                         \
    cr_assert_eq((ta)->live, 0, "%s:%d: %ld allocations (%zu bytes) leaked",   \
                 __FILE__, __LINE__, (ta)->live, (ta)->live_bytes);            \
  } while (0)

/* ---- plans ---- */

/* Asserts that every row b < n of every layer of the plan's buffer
 * describes seqs[b] as the cache holds it now: length and block ids. */
void tu_check_plan_rows(const pvl_cache *c, const pvl_plan *p,
                        const pvl_seq_id *seqs, uint32_t n);

/* True if the ids are not one run of consecutive ascending ids. */
bool tu_fragmented(const int32_t *ids, uint32_t n);

#endif /* PVL_TESTUTIL_H */
