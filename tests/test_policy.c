/* Compression policies, small cases computed by hand: Eq. 1-2 through
 * pvl_observe, Algorithm 1 (with and without water-filling), uniform and
 * PyramidKV budgets, the score transforms, the selection rule, the observed
 * rows, and policy validation. Every expected number below is derived in the
 * comment next to it from the formulas of pagedvl.h ("Compression"), not
 * taken from a run of the library. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pagedvl.h"
#include "testutil.h"

#define NEAR(actual, expected, tol)                                          \
  do {                                                                       \
    double near_a_ = (actual), near_e_ = (expected);                         \
    cr_assert(fabs(near_a_ - near_e_) <= (tol), "%s:%d: %s = %.9g, expected " \
              "%.9g (tol %g)", __FILE__, __LINE__, #actual, near_a_,         \
              near_e_, (double)(tol));                                       \
  } while (0)

/* An f32 CPU cache (testutil's, which asserts the creation). */
static pvl_cache *mk_cache(uint32_t L, uint32_t hq, uint32_t hkv, uint32_t d,
                           uint32_t bs, uint32_t nb) {
  return tu_cache(L, hq, hkv, d, bs, nb, PVL_DTYPE_F32);
}

static pvl_policy pol(pvl_policy_kind kind) {
  pvl_policy p;
  cr_assert_eq(pvl_policy_init(&p, kind), PVL_SUCCESS);
  return p;
}

static void expect_u32(const uint32_t *got, const uint32_t *want, uint32_t n,
                       const char *what) {
  for (uint32_t i = 0; i < n; i++)
    cr_assert_eq(got[i], want[i], "%s[%u] = %u, expected %u", what, i, got[i],
                 want[i]);
}

/* ======================================================================== */
/* Eq. 1 and Eq. 2 through pvl_observe                                      */
/* ======================================================================== */

/* One layer, 2 query heads sharing 1 KV head (GQA), head_dim 2, block_size 2
 * (the 5 tokens span 3 blocks), scale 1 so logits are plain dot products.
 *   k0 = (0,0)  k1 = (1,0)  k2 = (0,1)  k3 = (1,1)  k4 = (0,0)
 * Observed rows: positions 3 and 4 (row 3 sees keys 0..3, row 4 keys 0..4).
 *   row 3, head 0: q = (ln2, ln2): logits 0, ln2, ln2, 2ln2
 *                  exp 1, 2, 2, 4 (sum 9) -> A = 1/9, 2/9, 2/9, 4/9
 *   row 3, head 1: q = (0, 0): A = 1/4 each of keys 0..3
 *   row 4, head 0: q = (ln3, 0): logits 0, ln3, 0, ln3, 0
 *                  exp 1, 3, 1, 3, 1 (sum 9) -> 1/9, 3/9, 1/9, 3/9, 1/9
 *   row 4, head 1: q = (0, ln4): logits 0, 0, ln4, ln4, 0
 *                  exp 1, 1, 4, 4, 1 (sum 11) -> 1/11, 1/11, 4/11, 4/11, 1/11
 * raw_j = sum over rows and heads:
 *   raw0 = 1/9 + 1/4 + 1/9 + 1/11     raw1 = 2/9 + 1/4 + 3/9 + 1/11
 *   raw2 = 2/9 + 1/4 + 1/9 + 4/11     raw3 = 4/9 + 1/4 + 3/9 + 4/11
 *   raw4 = 1/9 + 1/11                 (sum = 4: four softmax rows)
 * seen = 2, 2, 2, 2, 1.
 * Eq. 1 with p = 0.3 (kept iff A >= 0.3 max A):
 *   row 3 h0: 0.3 * 4/9 = 1.2/9: 1/9 is below -> 1 of 4 below
 *   row 3 h1: all equal -> 0 of 4
 *   row 4 h0: 0.3 * 3/9 = 0.9/9: 1/9 is kept -> 0 of 5
 *   row 4 h1: 0.3 * 4/11 = 1.2/11: the three 1/11 are below -> 3 of 5
 * Eq. 2: gamma_0 = 1/9, gamma_1 = 3/9, gamma_layer = (1/9 + 3/9) / 2 = 2/9. */
static const float k_hand_K[5][2] = {{0, 0}, {1, 0}, {0, 1}, {1, 1}, {0, 0}};
static const float k_hand_V[5][2] = {{1, 2}, {3, 4}, {5, 6}, {7, 8}, {9, 10}};

static pvl_cache *hand_cache(pvl_seq_id *s) {
  pvl_cache *c = mk_cache(1, 2, 1, 2, 2, 8);
  TU_OK(c, pvl_seq_add(c, 5, NULL, 0, s));
  TU_OK(c, pvl_kv_write(c, *s, 0, 0, 5, k_hand_K, k_hand_V, NULL));
  return c;
}

static void hand_queries(float q[2][2][2]) {
  const float l2 = logf(2.0f), l3 = logf(3.0f), l4 = logf(4.0f);
  const float v[2][2][2] = {{{l2, l2}, {0, 0}}, {{l3, 0}, {0, l4}}};
  memcpy(q, v, sizeof(v));
}

static void check_hand_observation(pvl_cache *c, pvl_seq_id s) {
  float gamma[2], gl, raw[5];
  uint32_t seen[5], n_keys, n_rows;
  TU_OK(c, pvl_seq_observation(c, s, 0, gamma, &gl, raw, seen, 5, &n_keys,
                            &n_rows));
  cr_assert_eq(n_keys, 5);
  cr_assert_eq(n_rows, 2);
  const double want_raw[5] = {
      1.0 / 9 + 1.0 / 4 + 1.0 / 9 + 1.0 / 11,
      2.0 / 9 + 1.0 / 4 + 3.0 / 9 + 1.0 / 11,
      2.0 / 9 + 1.0 / 4 + 1.0 / 9 + 4.0 / 11,
      4.0 / 9 + 1.0 / 4 + 3.0 / 9 + 4.0 / 11,
      1.0 / 9 + 1.0 / 11};
  for (int j = 0; j < 5; j++) NEAR(raw[j], want_raw[j], 2e-6);
  const uint32_t want_seen[5] = {2, 2, 2, 2, 1};
  expect_u32(seen, want_seen, 5, "seen");
  NEAR(gamma[0], 1.0 / 9, 1e-6);
  NEAR(gamma[1], 3.0 / 9, 1e-6);
  NEAR(gl, 2.0 / 9, 1e-6);
}

Test(observe, eq1_eq2_hand_computed) {
  pvl_seq_id s;
  pvl_cache *c = hand_cache(&s);
  float q[2][2][2];
  hand_queries(q);
  TU_OK(c, pvl_observe(c, s, 0, q, 3, 2, 0.3f, 1.0f, NULL));
  check_hand_observation(c, s);
  pvl_cache_destroy(c);
}

Test(observe, chunks_of_rows_accumulate) {
  /* The same two rows observed one call each give the same observation. */
  pvl_seq_id s;
  pvl_cache *c = hand_cache(&s);
  float q[2][2][2];
  hand_queries(q);
  TU_OK(c, pvl_observe(c, s, 0, q[0], 3, 1, 0.3f, 1.0f, NULL));
  uint32_t n_rows = 0;
  TU_OK(c, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL, 0, NULL,
                            &n_rows));
  cr_assert_eq(n_rows, 1);
  TU_OK(c, pvl_observe(c, s, 0, q[1], 4, 1, 0.3f, 1.0f, NULL));
  check_hand_observation(c, s);
  pvl_cache_destroy(c);
}

Test(observe, default_threshold_and_default_scale) {
  /* p = 0.01: ln p = -4.605. One row at position 3 (keys 0..3).
   *   head 0: q = (6, 0) -> logits 0, 6, 0, 6: 0 < 6 - 4.605 -> 2 of 4 below
   *           A = (1, e^6, 1, e^6) / (2 + 2 e^6)
   *   head 1: q = (4, 0) -> logits 0, 4, 0, 4: 0 >= 4 - 4.605 -> 0 below
   *           A = (1, e^4, 1, e^4) / (2 + 2 e^4)
   * gamma = 2/4, 0; gamma_layer = 1/4. Key 4 is not seen: raw 0, seen 0.
   * Then scale 0 (= 1/sqrt(2)) with q * sqrt(2) must give the same. */
  for (int variant = 0; variant < 2; variant++) {
    pvl_seq_id s;
    pvl_cache *c = hand_cache(&s);
    const float f = variant ? sqrtf(2.0f) : 1.0f;
    const float q[2][2] = {{6.0f * f, 0}, {4.0f * f, 0}};
    TU_OK(c, pvl_observe(c, s, 0, q, 3, 1, 0.01f, variant ? 0.0f : 1.0f, NULL));
    float gamma[2], gl, raw[5];
    uint32_t seen[5];
    TU_OK(c, pvl_seq_observation(c, s, 0, gamma, &gl, raw, seen, 5, NULL, NULL));
    const double e6 = exp(6.0), e4 = exp(4.0);
    const double want[5] = {1 / (2 + 2 * e6) + 1 / (2 + 2 * e4),
                            e6 / (2 + 2 * e6) + e4 / (2 + 2 * e4),
                            1 / (2 + 2 * e6) + 1 / (2 + 2 * e4),
                            e6 / (2 + 2 * e6) + e4 / (2 + 2 * e4), 0.0};
    for (int j = 0; j < 5; j++) NEAR(raw[j], want[j], 2e-6);
    const uint32_t want_seen[5] = {1, 1, 1, 1, 0};
    expect_u32(seen, want_seen, 5, "seen");
    NEAR(gamma[0], 0.5, 1e-7);
    NEAR(gamma[1], 0.0, 1e-7);
    NEAR(gl, 0.25, 1e-7);
    pvl_cache_destroy(c);
  }
}

Test(observe, entry_exactly_at_threshold_counts_as_kept) {
  /* Eq. 1 keeps A_ij >= p * max A. p = 0.5, one row at position 1 (keys 0
   * and 1), q = (-ln 0.5, 0) for both heads: logits 0 and ln 2, so
   * A_0 = 1/3 = 0.5 * A_1 = 0.5 * 2/3 exactly at the threshold: kept,
   * gamma = 0. (On logits: s_0 = 0 = s_max + ln p, exactly, in float.) */
  pvl_seq_id s;
  pvl_cache *c = hand_cache(&s);
  const float x = -logf(0.5f);
  const float q[2][2] = {{x, 0}, {x, 0}};
  TU_OK(c, pvl_observe(c, s, 0, q, 1, 1, 0.5f, 1.0f, NULL));
  float gamma[2], gl;
  TU_OK(c, pvl_seq_observation(c, s, 0, gamma, &gl, NULL, NULL, 0, NULL, NULL));
  cr_assert_eq(gamma[0], 0.0f, "an entry at exactly p * max was counted below");
  cr_assert_eq(gamma[1], 0.0f);
  cr_assert_eq(gl, 0.0f);
  /* Nudged just past the threshold (q slightly larger), it is below. */
  pvl_cache_destroy(c);
  c = hand_cache(&s);
  const float y = x * 1.001f;
  const float q2[2][2] = {{y, 0}, {x, 0}};
  TU_OK(c, pvl_observe(c, s, 0, q2, 1, 1, 0.5f, 1.0f, NULL));
  TU_OK(c, pvl_seq_observation(c, s, 0, gamma, &gl, NULL, NULL, 0, NULL, NULL));
  NEAR(gamma[0], 0.5, 1e-7); /* 1 of 2 entries below */
  NEAR(gamma[1], 0.0, 1e-7);
  NEAR(gl, 0.25, 1e-7);
  pvl_cache_destroy(c);
}

Test(observe, causal_rule_uses_logical_positions_after_retain) {
  /* 1 head, head_dim 2, 6 tokens; retain slots {0, 2, 5}: the layer now
   * holds positions 0, 2, 5. Rows at positions 3, 4, 5 with q = 0 (uniform):
   *   row 3 sees positions <= 3: keys 0, 2 -> 1/2, 1/2, 0
   *   row 4: the same               -> 1/2, 1/2, 0
   *   row 5 sees all three          -> 1/3, 1/3, 1/3
   * raw = 4/3, 4/3, 1/3; seen = 3, 3, 1. */
  pvl_cache *c = mk_cache(1, 1, 1, 2, 2, 8);
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, 6, NULL, 0, &s));
  float kv[6][2];
  for (int i = 0; i < 6; i++) kv[i][0] = kv[i][1] = (float)i;
  TU_OK(c, pvl_kv_write(c, s, 0, 0, 6, kv, kv, NULL));
  const uint32_t keep[3] = {0, 2, 5};
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 3, NULL));
  const float q[3][2] = {{0, 0}, {0, 0}, {0, 0}};
  TU_OK(c, pvl_observe(c, s, 0, q, 3, 3, 0.01f, 1.0f, NULL));
  float raw[3];
  uint32_t seen[3], n_keys, n_rows;
  TU_OK(c, pvl_seq_observation(c, s, 0, NULL, NULL, raw, seen, 3, &n_keys,
                            &n_rows));
  cr_assert_eq(n_keys, 3);
  cr_assert_eq(n_rows, 3);
  NEAR(raw[0], 4.0 / 3, 1e-6);
  NEAR(raw[1], 4.0 / 3, 1e-6);
  NEAR(raw[2], 1.0 / 3, 1e-6);
  const uint32_t want_seen[3] = {3, 3, 1};
  expect_u32(seen, want_seen, 3, "seen");
  pvl_cache_destroy(c);
}

Test(observe, observation_is_dropped_when_the_layer_changes) {
  pvl_seq_id s;
  pvl_cache *c = hand_cache(&s);
  float q[2][2][2];
  hand_queries(q);
  TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL,
                                            0, NULL, NULL));
  TU_OK(c, pvl_observe(c, s, 0, q, 3, 2, 0.3f, 1.0f, NULL));
  TU_OK(c, pvl_seq_append(c, &s, 1, NULL));
  TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL,
                                            0, NULL, NULL));
  /* Observed again (6 keys now), then retained: dropped again. */
  TU_OK(c, pvl_observe(c, s, 0, q, 3, 2, 0.3f, 1.0f, NULL));
  uint32_t n_keys = 0;
  TU_OK(c, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL, 0, &n_keys,
                            NULL));
  cr_assert_eq(n_keys, 6);
  const uint32_t keep[2] = {1, 3};
  TU_OK(c, pvl_seq_retain(c, s, 0, keep, 2, NULL));
  TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL,
                                            0, NULL, NULL));
  pvl_cache_destroy(c);
}

Test(observe, bad_arguments) {
  pvl_seq_id s;
  pvl_cache *c = hand_cache(&s);
  float q[2][2][2];
  hand_queries(q);
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(NULL, s, 0, q, 3, 2, 0.3f, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 1, q, 3, 2, 0.3f, 0, NULL));
  TU_IS(PVL_ERR_UNKNOWN_SEQUENCE,
     pvl_observe(c, s + 12345, 0, q, 3, 2, 0.3f, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, NULL, 3, 2, 0.3f, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, q, 3, 2, 0.0f, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, q, 3, 2, 1.0f, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, q, 3, 2, NAN, 0, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, q, 3, 2, 0.3f, -1, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT,
     pvl_observe(c, s, 0, q, 3, 2, 0.3f, INFINITY, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_observe(c, s, 0, q, 3, 2, 0.3f, NAN, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT,
     pvl_observe(c, s, 0, q, UINT32_MAX, 2, 0.3f, 0, NULL));
  /* None of these left an observation behind. */
  TU_IS(PVL_ERR_BAD_STATE, pvl_seq_observation(c, s, 0, NULL, NULL, NULL, NULL,
                                            0, NULL, NULL));
  TU_OK(c, pvl_observe(c, s, 0, q, 3, 2, 0.3f, 1.0f, NULL));
  float raw[5];
  TU_IS(PVL_ERR_CAPACITY,
     pvl_seq_observation(c, s, 0, NULL, NULL, raw, NULL, 4, NULL, NULL));
  pvl_cache_destroy(c);
}

/* ======================================================================== */
/* Budgets                                                                  */
/* ======================================================================== */

Test(budgets, vlcache_algorithm1_without_clipping) {
  /* d = {1, 0.5, 0.25, 0.25}, alpha 0.5, L 4, m 100: Z = 2,
   * beta_l = d_l / 2 * 0.5 * 4 = d_l -> k = 100, 50, 25, 25 (sum 200 =
   * alpha L m). */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.5f;
  const float d[4] = {1.0f, 0.5f, 0.25f, 0.25f};
  uint32_t k[4];
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want[4] = {100, 50, 25, 25};
  expect_u32(k, want, 4, "k");
}

Test(budgets, vlcache_algorithm1_clips_without_redistribution) {
  /* Same densities, alpha 0.8: beta_l = d_l / 2 * 0.8 * 4 = 1.6 d_l
   *   = 1.6 -> clipped to 1, 0.8, 0.4, 0.4 -> k = 100, 80, 40, 40.
   * The sum is 260, not alpha L m = 320: the paper does not redistribute. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.8f;
  const float d[4] = {1.0f, 0.5f, 0.25f, 0.25f};
  uint32_t k[4];
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want[4] = {100, 80, 40, 40};
  expect_u32(k, want, 4, "k");

  /* Floor clip: d = {1, 0.001}, alpha 0.1, m 1000, L 2: Z = 1.001,
   *   beta_0 = 1 / 1.001 * 0.2 = 0.1998 -> 199.8 -> 200
   *   beta_1 = 0.001 / 1.001 * 0.2 = 0.0002 -> clipped to 0.01 -> 10. */
  p.keep_ratio = 0.1f;
  const float d2[2] = {1.0f, 0.001f};
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 1000, d2, k));
  const uint32_t want2[2] = {200, 10};
  expect_u32(k, want2, 2, "k");

  /* A raised floor: min_layer_ratio 0.25 lifts beta_1 to 0.25 -> 250. */
  p.min_layer_ratio = 0.25f;
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 1000, d2, k));
  const uint32_t want3[2] = {250, 250};
  /* beta_0 = 0.1998 is below the floor too. */
  expect_u32(k, want3, 2, "k");
}

Test(budgets, vlcache_rounds_half_up_and_keeps_at_least_one) {
  /* d = {1, 1}: Z = 2, beta = alpha = 0.25 (exact in binary), m = 10:
   * 2.5 -> 3 (half up; banker's rounding would give 2). */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.25f;
  const float d[2] = {1.0f, 1.0f};
  uint32_t k[2];
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 10, d, k));
  cr_assert_eq(k[0], 3);
  cr_assert_eq(k[1], 3);
  /* d = {1, 0}, alpha 0.1, m 10: beta_0 = 0.2 -> 2; beta_1 = 0 -> floor
   * 0.01 -> 0.1 token -> rounds to 0 -> at least 1. */
  p.keep_ratio = 0.1f;
  const float d2[2] = {1.0f, 0.0f};
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 10, d2, k));
  cr_assert_eq(k[0], 2);
  cr_assert_eq(k[1], 1);
}

Test(budgets, vlcache_zero_total_density) {
  /* Z = 0 gives beta_l = alpha: alpha 0.3, m 100 -> 30 each. With
   * renormalize, uniform weights: T = round(0.3 * 3 * 100) = 90 -> 30 each. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.3f;
  const float d[3] = {0, 0, 0};
  uint32_t k[3];
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 100, d, k));
  const uint32_t want[3] = {30, 30, 30};
  expect_u32(k, want, 3, "k");
  p.renormalize = 1;
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 100, d, k));
  expect_u32(k, want, 3, "k (renormalize)");
}

Test(budgets, vlcache_waterfilling_redistributes_clipped_budget) {
  /* d = {1, 0.5, 0.25, 0.25}, alpha 0.8, m 100: T = 320, lo = ceil(0.01 *
   * 100) = 1. Find lambda with sum clip(lambda * d_l * 100, 1, 100) = 320:
   *   lambda = 2.2 would give 220 to layer 0 and 110 to layer 1 (both clip
   *   at 100); with layers 0 and 1 at 100, layers 2 and 3 share 120:
   *   lambda * 25 = 60 -> lambda = 2.4 (layer 1: 120, still clipped).
   * k = 100, 100, 60, 60 (sum 320 exactly). */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.8f;
  p.renormalize = 1;
  const float d[4] = {1.0f, 0.5f, 0.25f, 0.25f};
  uint32_t k[4];
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want[4] = {100, 100, 60, 60};
  expect_u32(k, want, 4, "k");
}

Test(budgets, vlcache_waterfilling_lower_bound) {
  /* d = {1, 0, 0, 0}, alpha 0.1, m 100: T = 40. Layers 1-3 get
   * lambda * 0 = 0 -> clipped to lo = 1; layer 0 takes the rest: 37.
   * Algorithm 1 without renormalize would give 40 (beta = 0.4) and 1, 1, 1
   * (sum 43). */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.1f;
  const float d[4] = {1.0f, 0, 0, 0};
  uint32_t k[4];
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want_paper[4] = {40, 1, 1, 1};
  expect_u32(k, want_paper, 4, "k (paper)");
  p.renormalize = 1;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want[4] = {37, 1, 1, 1};
  expect_u32(k, want, 4, "k (water-filling)");
  /* min_layer_ratio 0.0625: lo = ceil(6.25) = 7 -> 40 - 21 = 19, 7, 7, 7. */
  p.min_layer_ratio = 0.0625f;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  const uint32_t want2[4] = {19, 7, 7, 7};
  expect_u32(k, want2, 4, "k (lo = 7)");
  /* T is clamped to L * lo: min_layer_ratio 0.5, m 10, alpha 0.1, L 2:
   * T = round(2) = 2 < 2 * 5 -> T = 10 -> 5, 5. */
  p.min_layer_ratio = 0.5f;
  const float d2[2] = {1.0f, 0.0f};
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 10, d2, k));
  cr_assert_eq(k[0], 5);
  cr_assert_eq(k[1], 5);
}

Test(budgets, vlcache_waterfilling_remainder_goes_to_lower_layer_on_ties) {
  /* d = {1, 1, 1}, m 10, alpha = 16/30: T = round(16) = 16; each layer's
   * share is 5.333: floors 5, 5, 5 (15), one unit left, equal fractional
   * parts -> the lowest layer: 6, 5, 5. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 16.0f / 30.0f;
  p.renormalize = 1;
  const float d[3] = {1, 1, 1};
  uint32_t k[3];
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 10, d, k));
  const uint32_t want[3] = {6, 5, 5};
  expect_u32(k, want, 3, "k");
  /* Largest fractional part first: d = {0.5, 0.25, 0.25}, m 10, alpha 0.5
   * (T = 15): shares 7.5, 3.75, 3.75 -> floors 7, 3, 3 (13); the two units
   * go to the .75s (layers 1 and 2), not to layer 0's .5: 7, 4, 4. */
  p.keep_ratio = 0.5f;
  const float d2[3] = {0.5f, 0.25f, 0.25f};
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 10, d2, k));
  const uint32_t want2[3] = {7, 4, 4};
  expect_u32(k, want2, 3, "k");
  /* d = {0.25, 0.5, 0.25}, alpha 14/30 (T = 14): shares 3.5, 7, 3.5 ->
   * floors 3, 7, 3 (13); one unit, tied .5s of layers 0 and 2 -> the lower
   * layer: 4, 7, 3. */
  p.keep_ratio = 14.0f / 30.0f;
  const float d3[3] = {0.25f, 0.5f, 0.25f};
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 10, d3, k));
  const uint32_t want3[3] = {4, 7, 3};
  expect_u32(k, want3, 3, "k");
}

Test(budgets, waterfilling_sum_with_zero_density_layers) {
  /* renormalize promises sum_l k_l = T exactly, each k_l in [lo, m].
   * d = {1, 0, 0, 0}, alpha 0.9, m 100: T = 360, lo = 1. Layer 0 can hold
   * at most 100, so the zero-density layers take the other 260 (feasible:
   * 360 <= L m = 400), spread evenly: 86.67 each -> floors 86, 86, 86
   * (358), the 2 units left go to equal fractional parts, lower layers
   * first: 100, 87, 87, 86. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 0.9f;
  p.renormalize = 1;
  const float d[4] = {1.0f, 0, 0, 0};
  uint32_t k[4];
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, d, k));
  uint32_t sum = 0;
  for (int l = 0; l < 4; l++) {
    cr_assert(k[l] >= 1 && k[l] <= 100, "k[%d] = %u", l, k[l]);
    sum += k[l];
  }
  cr_assert_eq(sum, 360, "water-filled budgets %u %u %u %u sum to %u, "
               "expected T = 360", k[0], k[1], k[2], k[3], sum);
  const uint32_t want[4] = {100, 87, 87, 86};
  expect_u32(k, want, 4, "k");
  /* When the others are not all at m, zero-density layers keep lo:
   * d = {0.5, 0, 0.5}, alpha 0.5, m 100: T = 150, lo = 1 -> 1 for layer 1,
   * and 149 split evenly between layers 0 and 2: 74.5 each -> 74, 74 + one
   * unit to the lower layer: 75, 1, 74. */
  p.keep_ratio = 0.5f;
  const float d2[3] = {0.5f, 0, 0.5f};
  TU_OK(NULL, pvl_policy_budgets(&p, 3, 100, d2, k));
  const uint32_t want2[3] = {75, 1, 74};
  expect_u32(k, want2, 3, "k");
}

Test(budgets, uniform_and_full) {
  /* streaming, h2o, snapkv: k = max(1, round(alpha m)).
   * alpha 0.5, m 5: 2.5 -> 3 (half up). alpha 0.1, m 4: 0.4 -> 0 -> 1.
   * alpha 0.1, m 1000 -> 100. full: m. */
  const pvl_policy_kind kinds[3] = {PVL_POLICY_STREAMING, PVL_POLICY_H2O,
                                    PVL_POLICY_SNAPKV};
  for (int i = 0; i < 3; i++) {
    pvl_policy p = pol(kinds[i]);
    uint32_t k[3];
    p.keep_ratio = 0.5f;
    TU_OK(NULL, pvl_policy_budgets(&p, 3, 5, NULL, k));
    for (int l = 0; l < 3; l++) cr_assert_eq(k[l], 3, "%s", pvl_policy_name(kinds[i]));
    p.keep_ratio = 0.1f;
    TU_OK(NULL, pvl_policy_budgets(&p, 3, 4, NULL, k));
    for (int l = 0; l < 3; l++) cr_assert_eq(k[l], 1);
    TU_OK(NULL, pvl_policy_budgets(&p, 3, 1000, NULL, k));
    for (int l = 0; l < 3; l++) cr_assert_eq(k[l], 100);
  }
  pvl_policy f = pol(PVL_POLICY_FULL);
  uint32_t k[2];
  TU_OK(NULL, pvl_policy_budgets(&f, 2, 77, NULL, k));
  cr_assert(k[0] == 77 && k[1] == 77);
}

Test(budgets, pyramidkv_kvpress_formula) {
  pvl_policy p = pol(PVL_POLICY_PYRAMIDKV);
  uint32_t k[4];
  /* L 4, m 1000, alpha 0.2, w 32, beta 20 (defaults): C = 200,
   * lo = 200 / 20 = 10, hi = 400 - 10 = 390 (< m - w = 968, no clip);
   * lo = 10 < w = 32 -> fallback to uniform: 200 each. */
  p.keep_ratio = 0.2f;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 1000, NULL, k));
  const uint32_t fb[4] = {200, 200, 200, 200};
  expect_u32(k, fb, 4, "k (fallback)");
  /* beta 4: lo = 50, hi = 350; 1000 >= 350 >= 50 >= 32 holds;
   * step = 300 / 3 = 100 -> 350, 250, 150, 50 (sum 800 = L C). */
  p.pyramid_beta = 4.0f;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 1000, NULL, k));
  const uint32_t py[4] = {350, 250, 150, 50};
  expect_u32(k, py, 4, "k (pyramid)");
  /* hi clipped: m 100, alpha 0.7, w 8, beta 2: C = 70, lo = 35, hi = 105
   * >= m - w = 92 -> hi = 92, lo = 140 - 92 = 48; 100 >= 92 >= 48 >= 8;
   * step = 44 / 3 = 14.667 -> 92, 77.33, 62.67, 48 -> 92, 77, 63, 48. */
  p.keep_ratio = 0.7f;
  p.snap_window = 8;
  p.pyramid_beta = 2.0f;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, NULL, k));
  const uint32_t cl[4] = {92, 77, 63, 48};
  expect_u32(k, cl, 4, "k (clipped hi)");
  /* hi < lo after the clip: alpha 0.99, m 100, w 8, beta 2: C = 99,
   * hi = 92, lo = 198 - 92 = 106 > hi -> uniform round(99) = 99. */
  p.keep_ratio = 0.99f;
  TU_OK(NULL, pvl_policy_budgets(&p, 4, 100, NULL, k));
  const uint32_t fb2[4] = {99, 99, 99, 99};
  expect_u32(k, fb2, 4, "k (fallback, hi < lo)");
}

/* ======================================================================== */
/* Scores                                                                   */
/* ======================================================================== */

Test(scores, h2o_divides_by_seen) {
  /* raw {3, 2, 1, 0.5, 0.25} / seen {4, 4, 2, 1, 0} = 0.75, 0.5, 0.5, 0.5,
   * and 0 for a key no row saw. */
  pvl_policy p = pol(PVL_POLICY_H2O);
  const float raw[5] = {3, 2, 1, 0.5f, 0.25f};
  const uint32_t seen[5] = {4, 4, 2, 1, 0};
  float out[5];
  TU_OK(NULL, pvl_policy_scores(&p, 5, raw, seen, 4, out));
  const float want[5] = {0.75f, 0.5f, 0.5f, 0.5f, 0.0f};
  for (int j = 0; j < 5; j++) NEAR(out[j], want[j], 1e-7);
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_scores(&p, 5, raw, NULL, 4, out));
}

Test(scores, snapkv_mean_and_zero_padded_avg_pool) {
  /* m 10, window 3, kernel 5, 3 window rows. Keys 0..6 are before the
   * window (raw 1..7); the window keys 7..9 (raw 100) get +inf and are not
   * pooled into their neighbours. out_j = (sum of raw over [j-2, j+2]
   * clipped to [0, 7)) / 3 rows / 5 (count_include_pad):
   *   j0: 1+2+3 = 6        -> 0.4
   *   j1: 1+2+3+4 = 10     -> 0.6667
   *   j2: 1+..+5 = 15      -> 1
   *   j3: 2+..+6 = 20      -> 1.3333
   *   j4: 3+..+7 = 25      -> 1.6667
   *   j5: 4+5+6+7 = 22     -> 1.4667
   *   j6: 5+6+7 = 18       -> 1.2 */
  const float raw[10] = {1, 2, 3, 4, 5, 6, 7, 100, 100, 100};
  const double want[7] = {6.0 / 15, 10.0 / 15, 15.0 / 15, 20.0 / 15,
                          25.0 / 15, 22.0 / 15, 18.0 / 15};
  const pvl_policy_kind kinds[2] = {PVL_POLICY_SNAPKV, PVL_POLICY_PYRAMIDKV};
  for (int i = 0; i < 2; i++) {
    pvl_policy p = pol(kinds[i]);
    p.snap_window = 3;
    float out[10];
    TU_OK(NULL, pvl_policy_scores(&p, 10, raw, NULL, 3, out));
    for (int j = 0; j < 7; j++) NEAR(out[j], want[j], 1e-6);
    for (int j = 7; j < 10; j++)
      cr_assert(isinf(out[j]) && out[j] > 0, "window key %d: %g", j,
                (double)out[j]);
    /* kernel 1: just the mean over rows. */
    p.pool_kernel = 1;
    TU_OK(NULL, pvl_policy_scores(&p, 10, raw, NULL, 3, out));
    for (int j = 0; j < 7; j++) NEAR(out[j], raw[j] / 3.0, 1e-6);
    /* A window as long as the prompt: every key is +inf. */
    p.snap_window = 32;
    TU_OK(NULL, pvl_policy_scores(&p, 10, raw, NULL, 3, out));
    for (int j = 0; j < 10; j++) cr_assert(isinf(out[j]) && out[j] > 0);
  }
}

Test(scores, vlcache_is_identity_and_rejects_non_finite) {
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  const float raw[4] = {0.5f, 3.25f, 0.0f, 1e-3f};
  float out[4];
  TU_OK(NULL, pvl_policy_scores(&p, 4, raw, NULL, 7, out));
  for (int j = 0; j < 4; j++) cr_assert_eq(out[j], raw[j]);
  const float bad1[3] = {1, NAN, 2}, bad2[3] = {1, INFINITY, 2};
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_scores(&p, 3, bad1, NULL, 1, out));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_scores(&p, 3, bad2, NULL, 1, out));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_scores(&p, 3, NULL, NULL, 1, out));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_scores(&p, 3, raw, NULL, 1, NULL));
}

/* ======================================================================== */
/* Selection                                                                */
/* ======================================================================== */

Test(select, forced_recent_window_is_ceil_of_a_tenth) {
  /* m 20, k 10: r = ceil(0.1 * 10) = 1 (not 2, which 0.1f's excess over
   * 0.1 would give in double). Scores decrease with the position, so the
   * best are the earliest: top 9 of positions [0, 19) = 0..8, plus the
   * recent 19. With r = 2 it would be 0..7, 18, 19. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  float sc[20];
  for (int j = 0; j < 20; j++) sc[j] = 100.0f - (float)j;
  uint32_t keep[20], n = 0;
  TU_OK(NULL, pvl_policy_select(&p, 20, 10, sc, keep, &n));
  cr_assert_eq(n, 10);
  const uint32_t want[10] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 19};
  expect_u32(keep, want, 10, "keep");
  /* The recent count itself: ceil(0.1 k). */
  const uint32_t ks[8] = {1, 5, 9, 10, 11, 20, 25, 100};
  const uint32_t rs[8] = {1, 1, 1, 1, 2, 2, 3, 10};
  for (int i = 0; i < 8; i++)
    cr_assert_eq(pvl__policy_recent(&p, 1000, ks[i]), rs[i],
                 "recent(%u) = %u, expected %u", ks[i],
                 pvl__policy_recent(&p, 1000, ks[i]), rs[i]);
  /* k 11 -> r 2: top 9 of [0, 18) = 0..8, plus 18, 19. */
  TU_OK(NULL, pvl_policy_select(&p, 20, 11, sc, keep, &n));
  cr_assert_eq(n, 11);
  const uint32_t want11[11] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 18, 19};
  expect_u32(keep, want11, 11, "keep");
}

Test(select, ties_break_toward_the_later_position) {
  /* m 20, k 4 -> r = 1 (position 19). Scores 0 except 1 at positions 2, 5,
   * 9, 12: the top 3 among 4 tied candidates are the latest: 5, 9, 12. */
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  float sc[20] = {0};
  sc[2] = sc[5] = sc[9] = sc[12] = 1.0f;
  uint32_t keep[20], n = 0;
  TU_OK(NULL, pvl_policy_select(&p, 20, 4, sc, keep, &n));
  const uint32_t want[4] = {5, 9, 12, 19};
  cr_assert_eq(n, 4);
  expect_u32(keep, want, 4, "keep");
  /* Partial tie: 3 -> 2.0, 7, 11, 14 -> 1.0: 3, then the two latest of the
   * tied 1.0s (11, 14), then 19. */
  memset(sc, 0, sizeof(sc));
  sc[3] = 2.0f;
  sc[7] = sc[11] = sc[14] = 1.0f;
  TU_OK(NULL, pvl_policy_select(&p, 20, 4, sc, keep, &n));
  const uint32_t want2[4] = {3, 11, 14, 19};
  expect_u32(keep, want2, 4, "keep");
  /* All equal, recent_ratio 0: the k latest. */
  for (int j = 0; j < 20; j++) sc[j] = 0.5f;
  p.recent_ratio = 0.0f;
  TU_OK(NULL, pvl_policy_select(&p, 20, 3, sc, keep, &n));
  const uint32_t want3[3] = {17, 18, 19};
  expect_u32(keep, want3, 3, "keep");
}

Test(select, recent_ratio_zero_and_one) {
  pvl_policy p = pol(PVL_POLICY_H2O);
  float sc[12];
  for (int j = 0; j < 12; j++) sc[j] = (float)(12 - j); /* best first */
  uint32_t keep[12], n;
  p.recent_ratio = 0.0f; /* no forced window: top 3 = 0, 1, 2 */
  TU_OK(NULL, pvl_policy_select(&p, 12, 3, sc, keep, &n));
  const uint32_t w0[3] = {0, 1, 2};
  expect_u32(keep, w0, 3, "keep");
  p.recent_ratio = 1.0f; /* all recent: 9, 10, 11 */
  TU_OK(NULL, pvl_policy_select(&p, 12, 3, sc, keep, &n));
  const uint32_t w1[3] = {9, 10, 11};
  expect_u32(keep, w1, 3, "keep");
  /* -inf and +inf scores are valid: +inf first, -inf last. */
  p.recent_ratio = 0.0f;
  for (int j = 0; j < 12; j++) sc[j] = 0.0f;
  sc[4] = INFINITY;
  sc[10] = sc[11] = -INFINITY;
  TU_OK(NULL, pvl_policy_select(&p, 12, 2, sc, keep, &n));
  const uint32_t w2[2] = {4, 9};
  expect_u32(keep, w2, 2, "keep");
}

Test(select, streaming_sinks_and_recent) {
  /* m 20, k 7, 4 sinks: 0..3 and the 3 most recent 17..19. */
  pvl_policy p = pol(PVL_POLICY_STREAMING);
  uint32_t keep[20], n;
  TU_OK(NULL, pvl_policy_select(&p, 20, 7, NULL, keep, &n));
  cr_assert_eq(n, 7);
  const uint32_t want[7] = {0, 1, 2, 3, 17, 18, 19};
  expect_u32(keep, want, 7, "keep");
  /* k 3 < 4 sinks: the first 3 only. */
  TU_OK(NULL, pvl_policy_select(&p, 20, 3, NULL, keep, &n));
  const uint32_t want2[3] = {0, 1, 2};
  cr_assert_eq(n, 3);
  expect_u32(keep, want2, 3, "keep");
  /* No sinks: the k most recent. */
  p.sink_tokens = 0;
  TU_OK(NULL, pvl_policy_select(&p, 20, 3, NULL, keep, &n));
  const uint32_t want3[3] = {17, 18, 19};
  expect_u32(keep, want3, 3, "keep");
}

Test(select, snapkv_window_is_always_kept) {
  /* m 20, window 4, k 6: r = max(ceil(0.6), 4) = 4 -> 16..19 whatever
   * their scores (here the lowest), then the top 2 of [0, 16) = 0, 1.
   * k 3 < window: the 3 most recent. */
  const pvl_policy_kind kinds[2] = {PVL_POLICY_SNAPKV, PVL_POLICY_PYRAMIDKV};
  for (int i = 0; i < 2; i++) {
    pvl_policy p = pol(kinds[i]);
    p.snap_window = 4;
    float sc[20];
    for (int j = 0; j < 20; j++) sc[j] = j < 16 ? 50.0f - (float)j : -1e30f;
    uint32_t keep[20], n;
    TU_OK(NULL, pvl_policy_select(&p, 20, 6, sc, keep, &n));
    cr_assert_eq(n, 6);
    const uint32_t want[6] = {0, 1, 16, 17, 18, 19};
    expect_u32(keep, want, 6, "keep");
    TU_OK(NULL, pvl_policy_select(&p, 20, 3, sc, keep, &n));
    cr_assert_eq(n, 3);
    const uint32_t want2[3] = {17, 18, 19};
    expect_u32(keep, want2, 3, "keep");
  }
}

Test(select, full_and_budget_edges) {
  pvl_policy p = pol(PVL_POLICY_FULL);
  uint32_t keep[8], n;
  TU_OK(NULL, pvl_policy_select(&p, 8, 8, NULL, keep, &n));
  cr_assert_eq(n, 8);
  for (uint32_t i = 0; i < 8; i++) cr_assert_eq(keep[i], i);
  TU_OK(NULL, pvl_policy_select(&p, 8, 100, NULL, keep, &n));
  cr_assert_eq(n, 8, "n_keep = min(budget, m)");
  /* Budget 0: nothing kept; budget >= m: everything, for a scored kind
   * with no scores needed. */
  pvl_policy v = pol(PVL_POLICY_VLCACHE);
  float sc[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  TU_OK(NULL, pvl_policy_select(&v, 8, 0, sc, keep, &n));
  cr_assert_eq(n, 0);
  TU_OK(NULL, pvl_policy_select(&v, 8, 9, NULL, keep, &n));
  cr_assert_eq(n, 8);
  for (uint32_t i = 0; i < 8; i++) cr_assert_eq(keep[i], i);
}

Test(select, full_refuses_a_budget_below_m) {
  /* full keeps everything: its budget is m, and pvl_policy_select refuses a
   * smaller one (INVALID_ARGUMENT) rather than return m entries for a
   * caller who sized keep for min(budget, m). Nothing is written. */
  pvl_policy p = pol(PVL_POLICY_FULL);
  uint32_t keep[12], n = 99;
  for (int i = 0; i < 12; i++) keep[i] = 0xDEADBEEFu;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, 10, 5, NULL, keep, &n));
  cr_assert_eq(n, 99);
  for (int i = 0; i < 12; i++)
    cr_assert_eq(keep[i], 0xDEADBEEFu, "keep[%d] written by a failing call",
                 i);
  TU_OK(NULL, pvl_policy_select(&p, 10, 10, NULL, keep, &n));
  cr_assert_eq(n, 10);
  for (int i = 10; i < 12; i++) cr_assert_eq(keep[i], 0xDEADBEEFu);
}

Test(select, bad_arguments) {
  pvl_policy p = pol(PVL_POLICY_VLCACHE);
  float sc[6] = {1, 2, NAN, 4, 5, 6};
  uint32_t keep[6], n;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, 6, 3, sc, keep, &n));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, 6, 3, NULL, keep, &n));
  sc[2] = 3;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, 6, 3, sc, NULL, &n));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(&p, 6, 3, sc, keep, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_select(NULL, 6, 3, sc, keep, &n));
}

/* ======================================================================== */
/* Observed rows                                                            */
/* ======================================================================== */

Test(rows, per_policy_windows) {
  pvl_cache *c = mk_cache(1, 1, 1, 2, 4, 256);
  pvl_seq_id a, b, e, f, g;
  const pvl_span va[2] = {{2, 10}, {10, 70}};
  TU_OK(c, pvl_seq_add(c, 100, va, 2, &a)); /* last visual token: 69 */
  TU_OK(c, pvl_seq_add(c, 100, NULL, 0, &b)); /* no visual span */
  const pvl_span ve = {10, 100};
  TU_OK(c, pvl_seq_add(c, 100, &ve, 1, &e)); /* visual span ends at m */
  TU_OK(c, pvl_seq_add(c, 20, NULL, 0, &f));  /* m < fallback_window */
  const pvl_span vg = {0, 5};
  TU_OK(c, pvl_seq_add(c, 8, &vg, 1, &g));

  uint32_t first, n, fb;
  pvl_policy v = pol(PVL_POLICY_VLCACHE);
  /* Post-vision window: positions 70..99 (tau = 30). */
  TU_OK(c, pvl_policy_rows(&v, c, a, &first, &n, &fb));
  cr_assert(first == 70 && n == 30 && fb == 0, "%u %u %u", first, n, fb);
  /* window_cap 8: the last 8 of them. */
  v.window_cap = 8;
  TU_OK(c, pvl_policy_rows(&v, c, a, &first, &n, &fb));
  cr_assert(first == 92 && n == 8 && fb == 0, "%u %u %u", first, n, fb);
  v.window_cap = 30; /* exactly tau: all of them */
  TU_OK(c, pvl_policy_rows(&v, c, a, &first, &n, &fb));
  cr_assert(first == 70 && n == 30 && fb == 0, "%u %u %u", first, n, fb);
  v.window_cap = 0;
  /* No visual span: the last fallback_window = 32 prompt tokens. */
  TU_OK(c, pvl_policy_rows(&v, c, b, &first, &n, &fb));
  cr_assert(first == 68 && n == 32 && fb == 1, "%u %u %u", first, n, fb);
  /* Visual span ending at m: no post-vision token -> fallback too. */
  TU_OK(c, pvl_policy_rows(&v, c, e, &first, &n, &fb));
  cr_assert(first == 68 && n == 32 && fb == 1, "%u %u %u", first, n, fb);
  /* m = 20 < 32: min(32, m) = 20 rows from 0. */
  TU_OK(c, pvl_policy_rows(&v, c, f, &first, &n, &fb));
  cr_assert(first == 0 && n == 20 && fb == 1, "%u %u %u", first, n, fb);
  v.fallback_window = 5;
  TU_OK(c, pvl_policy_rows(&v, c, b, &first, &n, &fb));
  cr_assert(first == 95 && n == 5 && fb == 1, "%u %u %u", first, n, fb);
  /* Visual [0, 5) of 8: rows 5..7. */
  TU_OK(c, pvl_policy_rows(&v, c, g, &first, &n, &fb));
  cr_assert(first == 5 && n == 3 && fb == 0, "%u %u %u", first, n, fb);

  pvl_policy h = pol(PVL_POLICY_H2O); /* all prompt rows */
  TU_OK(c, pvl_policy_rows(&h, c, a, &first, &n, &fb));
  cr_assert(first == 0 && n == 100 && fb == 0, "%u %u %u", first, n, fb);
  pvl_policy s = pol(PVL_POLICY_SNAPKV); /* the last 32 */
  TU_OK(c, pvl_policy_rows(&s, c, a, &first, &n, &fb));
  cr_assert(first == 68 && n == 32, "%u %u", first, n);
  TU_OK(c, pvl_policy_rows(&s, c, f, &first, &n, &fb)); /* window > m */
  cr_assert(first == 0 && n == 20, "%u %u", first, n);
  pvl_policy py = pol(PVL_POLICY_PYRAMIDKV);
  py.snap_window = 10;
  TU_OK(c, pvl_policy_rows(&py, c, a, &first, &n, &fb));
  cr_assert(first == 90 && n == 10, "%u %u", first, n);
  const pvl_policy_kind none[2] = {PVL_POLICY_FULL, PVL_POLICY_STREAMING};
  for (int i = 0; i < 2; i++) {
    pvl_policy q = pol(none[i]);
    TU_OK(c, pvl_policy_rows(&q, c, a, &first, &n, &fb));
    cr_assert_eq(n, 0, "%s observes no rows", pvl_policy_name(none[i]));
  }
  TU_IS(PVL_ERR_UNKNOWN_SEQUENCE, pvl_policy_rows(&v, c, a + 999, &first, &n, &fb));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_rows(&v, c, a, NULL, &n, &fb));
  pvl_cache_destroy(c);
}

/* ======================================================================== */
/* Policy data and validation                                               */
/* ======================================================================== */

Test(policy, init_names_and_parse) {
  const char *names[6] = {"full",   "streaming", "h2o",
                          "snapkv", "pyramidkv", "vlcache"};
  for (int k = 0; k < 6; k++) {
    cr_assert_str_eq(pvl_policy_name((pvl_policy_kind)k), names[k]);
    pvl_policy_kind back;
    TU_OK(NULL, pvl_policy_parse(names[k], &back));
    cr_assert_eq((int)back, k);
  }
  cr_assert_null(pvl_policy_name((pvl_policy_kind)6));
  pvl_policy_kind out;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_parse("VLCACHE2", &out));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_parse(NULL, &out));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_init(NULL, PVL_POLICY_H2O));
  pvl_policy p;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_init(&p, (pvl_policy_kind)17));
  /* The paper's VL-Cache defaults. */
  p = pol(PVL_POLICY_VLCACHE);
  cr_assert_eq(p.size, sizeof(pvl_policy));
  cr_assert_eq(p.keep_ratio, 0.1f);
  cr_assert_eq(p.threshold, 0.01f);
  cr_assert_eq(p.min_layer_ratio, 0.01f);
  cr_assert_eq(p.recent_ratio, 0.1f);
  cr_assert_eq(p.renormalize, 0);
  cr_assert_eq(p.snap_window, 32);
  cr_assert_eq(p.pool_kernel, 5);
  cr_assert_eq(p.pyramid_beta, 20.0f);
  cr_assert_eq(p.sink_tokens, 4);
  cr_assert_eq(p.fallback_window, 32);
}

/* Each mutation makes the policy invalid for every pure function. */
static void expect_invalid(const pvl_policy *p, const char *what) {
  const float d[2] = {1, 1};
  const float raw[4] = {1, 2, 3, 4};
  const uint32_t seen[4] = {1, 1, 1, 1};
  uint32_t k[2], keep[4], n;
  float out[4];
  pvl_status st = pvl_policy_budgets(p, 2, 4, d, k);
  cr_assert_eq(st, PVL_ERR_INVALID_ARGUMENT, "budgets accepted %s: %s", what,
               pvl_status_string(st));
  st = pvl_policy_scores(p, 4, raw, seen, 1, out);
  cr_assert_eq(st, PVL_ERR_INVALID_ARGUMENT, "scores accepted %s", what);
  st = pvl_policy_select(p, 4, 2, raw, keep, &n);
  cr_assert_eq(st, PVL_ERR_INVALID_ARGUMENT, "select accepted %s", what);
}

Test(policy, validation) {
  pvl_policy p;
#define MUT(field, value)                                                    \
  do {                                                                       \
    p = pol(PVL_POLICY_VLCACHE);                                             \
    p.field = value;                                                         \
    expect_invalid(&p, #field " = " #value);                                 \
  } while (0)
  MUT(size, sizeof(pvl_policy) - 4);
  MUT(size, 0);
  MUT(kind, (pvl_policy_kind)6);
  MUT(keep_ratio, 0.0f);
  MUT(keep_ratio, -0.1f);
  MUT(keep_ratio, 1.01f);
  MUT(keep_ratio, NAN);
  MUT(keep_ratio, INFINITY);
  MUT(threshold, 0.0f);
  MUT(threshold, 1.0f);
  MUT(threshold, NAN);
  MUT(min_layer_ratio, 0.0f);
  MUT(min_layer_ratio, 1.5f);
  MUT(min_layer_ratio, NAN);
  MUT(recent_ratio, -0.01f);
  MUT(recent_ratio, 1.01f);
  MUT(recent_ratio, NAN);
  MUT(renormalize, 2);
  MUT(pool_kernel, 0);
  MUT(pool_kernel, 4);
  MUT(pool_kernel, 1025);
  MUT(pyramid_beta, 0.5f);
  MUT(pyramid_beta, INFINITY);
  MUT(pyramid_beta, NAN);
  p = pol(PVL_POLICY_VLCACHE);
  p.decode_cap = 16;
  p.decode_cap_slack = 16;
  expect_invalid(&p, "decode_cap_slack = decode_cap");
  expect_invalid(NULL, "NULL");
#undef MUT
  /* Boundaries that are valid. */
  p = pol(PVL_POLICY_VLCACHE);
  p.keep_ratio = 1.0f;
  p.min_layer_ratio = 1.0f;
  p.recent_ratio = 0.0f;
  p.decode_cap = 16;
  p.decode_cap_slack = 15;
  const float d[2] = {1, 0};
  uint32_t k[2];
  TU_OK(NULL, pvl_policy_budgets(&p, 2, 4, d, k));
  cr_assert(k[0] == 4 && k[1] == 4);
  /* Budgets: VL-Cache needs densities in [0, 1]; L and m >= 1. */
  p = pol(PVL_POLICY_VLCACHE);
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 4, NULL, k));
  const float bad[2][2] = {{1.5f, 0}, {NAN, 0}};
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 4, bad[0], k));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 4, bad[1], k));
  const float neg[2] = {-0.01f, 0.5f};
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 4, neg, k));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 0, 4, d, k));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 0, d, k));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_budgets(&p, 2, 4, d, NULL));
}

Test(policy, invalid_policy_is_refused_by_cache_calls) {
  pvl_cache *c = mk_cache(1, 1, 1, 2, 4, 16);
  pvl_seq_id s;
  TU_OK(c, pvl_seq_add(c, 8, NULL, 0, &s));
  pvl_policy p = pol(PVL_POLICY_STREAMING);
  p.keep_ratio = NAN;
  uint32_t first, n, fb, did;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_policy_rows(&p, c, s, &first, &n, &fb));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_compress(c, s, &p, NULL, NULL));
  p.keep_ratio = 0.5f;
  p.size = 8;
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_compress(c, s, &p, NULL, NULL));
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_compress(c, s, NULL, NULL, NULL));
  p = pol(PVL_POLICY_STREAMING);
  TU_IS(PVL_ERR_INVALID_ARGUMENT, pvl_decode_cap(c, s, 0, &p, &did, NULL));
  /* Nothing changed: still 8 tokens, and a valid compress still works. */
  uint32_t nt, nb;
  TU_OK(c, pvl_seq_layer_size(c, s, 0, &nt, &nb));
  cr_assert(nt == 8 && nb == 2);
  p.keep_ratio = 0.5f;
  TU_OK(c, pvl_compress(c, s, &p, NULL, NULL));
  TU_OK(c, pvl_seq_layer_size(c, s, 0, &nt, &nb));
  cr_assert(nt == 4 && nb == 1, "streaming 0.5 of 8: %u tokens %u blocks", nt,
            nb);
  pvl_cache_destroy(c);
}
