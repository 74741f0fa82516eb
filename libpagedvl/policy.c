/* Compression policies as data and pure functions: the VL-Cache budget
 * formula (Algorithm 1, with optional water-filling), the baselines' budgets
 * (uniform, PyramidKV), their score transforms and the selection rule. The
 * formulas are written out in pagedvl.h; this file is their only home. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const char *const k_names[] = {"full",   "streaming", "h2o",
                                      "snapkv", "pyramidkv", "vlcache"};

const char *pvl_policy_name(pvl_policy_kind kind) {
  if ((unsigned)kind >= sizeof(k_names) / sizeof(k_names[0])) return NULL;
  return k_names[kind];
}

pvl_status pvl_policy_parse(const char *name, pvl_policy_kind *out) {
  if (!name || !out)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "name or out is NULL");
  for (unsigned i = 0; i < sizeof(k_names) / sizeof(k_names[0]); i++) {
    if (strcmp(name, k_names[i]) == 0) {
      *out = (pvl_policy_kind)i;
      return PVL_SUCCESS;
    }
  }
  return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "unknown policy '%s'",
                  name);
}

pvl_status pvl_policy_init(pvl_policy *p, pvl_policy_kind kind) {
  if (!p) return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "policy is NULL");
  if (!pvl_policy_name(kind))
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "unknown policy kind %d",
                    (int)kind);
  memset(p, 0, sizeof(*p));
  p->size = sizeof(*p);
  p->kind = kind;
  p->keep_ratio = kind == PVL_POLICY_FULL ? 1.0f : 0.1f;
  p->threshold = 0.01f;
  p->min_layer_ratio = 0.01f;
  p->recent_ratio = 0.1f;
  p->window_cap = 0;
  p->fallback_window = 32;
  p->renormalize = 0;
  p->sink_tokens = 4;
  p->snap_window = 32;
  p->pool_kernel = 5;
  p->pyramid_beta = 20.0f;
  p->decode_cap = 0;
  p->decode_cap_slack = 0;
  return PVL_SUCCESS;
}

/* Validates a policy; the message names the caller. */
pvl_status pvl__policy_check(const pvl_cache *c, const pvl_policy *p,
                             const char *fn) {
#define BAD(...) pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, __VA_ARGS__)
  if (!p) return BAD("policy is NULL");
  if (p->size != sizeof(pvl_policy))
    return BAD("policy->size = %zu, expected %zu: use pvl_policy_init",
               p->size, sizeof(pvl_policy));
  if (!pvl_policy_name(p->kind))
    return BAD("unknown policy kind %d", (int)p->kind);
  if (!(p->keep_ratio > 0.0f && p->keep_ratio <= 1.0f))
    return BAD("keep_ratio = %g, must be in (0, 1]", (double)p->keep_ratio);
  if (!(p->threshold > 0.0f && p->threshold < 1.0f))
    return BAD("threshold = %g, must be in (0, 1)", (double)p->threshold);
  if (!(p->min_layer_ratio > 0.0f && p->min_layer_ratio <= 1.0f))
    return BAD("min_layer_ratio = %g, must be in (0, 1]",
               (double)p->min_layer_ratio);
  if (!(p->recent_ratio >= 0.0f && p->recent_ratio <= 1.0f))
    return BAD("recent_ratio = %g, must be in [0, 1]",
               (double)p->recent_ratio);
  if (p->renormalize > 1) return BAD("renormalize = %u, must be 0 or 1", p->renormalize);
  if (p->pool_kernel == 0 || p->pool_kernel % 2 == 0 || p->pool_kernel > 1023)
    return BAD("pool_kernel = %u, must be odd and < 1024", p->pool_kernel);
  if (!(p->pyramid_beta >= 1.0f && isfinite(p->pyramid_beta)))
    return BAD("pyramid_beta = %g, must be >= 1", (double)p->pyramid_beta);
  if (p->decode_cap && p->decode_cap_slack >= p->decode_cap)
    return BAD("decode_cap_slack = %u must be < decode_cap = %u",
               p->decode_cap_slack, p->decode_cap);
  return PVL_SUCCESS;
#undef BAD
}

/* round half up, as the header documents */
static inline uint32_t round_half_up(double x) {
  return (uint32_t)floor(x + 0.5);
}

static uint32_t clamp_u32(uint32_t v, uint32_t lo, uint32_t hi) {
  return v < lo ? lo : v > hi ? hi : v;
}

static void budgets_uniform(uint32_t L, uint32_t m, double alpha,
                            uint32_t *out) {
  uint32_t k = clamp_u32(round_half_up(alpha * m), 1, m);
  for (uint32_t l = 0; l < L; l++) out[l] = k;
}

static void budgets_pyramid(const pvl_policy *p, uint32_t L, uint32_t m,
                            uint32_t *out) {
  const double w = p->snap_window, C = (double)p->keep_ratio * m;
  double lo = C / p->pyramid_beta, hi = 2.0 * C - lo;
  if (hi >= (double)m - w) {
    hi = (double)m - w;
    lo = 2.0 * C - hi;
  }
  if (L < 2 || !((double)m >= hi && hi >= lo && lo >= w)) {
    budgets_uniform(L, m, p->keep_ratio, out);
    return;
  }
  const double step = (hi - lo) / (L - 1);
  for (uint32_t l = 0; l < L; l++)
    out[l] = clamp_u32(round_half_up(hi - l * step), 1, m);
}

/* Algorithm 1 of the paper, as written: no redistribution of what the clip
 * removes. */
static void budgets_vlcache(const pvl_policy *p, uint32_t L, uint32_t m,
                            const float *d, uint32_t *out) {
  double Z = 0.0;
  for (uint32_t l = 0; l < L; l++) Z += d[l];
  for (uint32_t l = 0; l < L; l++) {
    double beta = Z > 0.0 ? d[l] / Z * p->keep_ratio * L : p->keep_ratio;
    if (beta < p->min_layer_ratio) beta = p->min_layer_ratio;
    if (beta > 1.0) beta = 1.0;
    out[l] = clamp_u32(round_half_up(beta * m), 1, m);
  }
}

/* Water-filling: sum_l k_l = T exactly, each k_l in [lo, m], shares as
 * close as the bounds allow to proportional to d_l. */
static void budgets_waterfill(const pvl_policy *p, uint32_t L, uint32_t m,
                              const float *d, uint32_t *out) {
  uint32_t lo = (uint32_t)ceilf(p->min_layer_ratio * (float)m);
  if (lo < 1) lo = 1;
  if (lo > m) lo = m;
  double T = floor((double)p->keep_ratio * L * m + 0.5);
  if (T < (double)L * lo) T = (double)L * lo;
  if (T > (double)L * m) T = (double)L * m;
  double Z = 0.0;
  for (uint32_t l = 0; l < L; l++) Z += d[l];
  /* x_l(lambda) = clip(lambda * w_l, lo, m) is monotone in lambda; w_l = d_l
   * * m plus a uniform floor 1e-12 * m, so that layers of density 0 grow
   * only once every other layer is at m (and T is always reachable).
   * Bisection to double precision, then largest-remainder rounding. */
  double hi_lam = 1.0, lo_lam = 0.0;
  for (int it = 0; it < 200; it++) {
    double sum = 0.0;
    for (uint32_t l = 0; l < L; l++) {
      double w = Z > 0.0 ? ((double)d[l] + 1e-12) * m : (double)m;
      double x = hi_lam * w;
      sum += x < lo ? lo : x > m ? m : x;
    }
    if (sum >= T) break;
    hi_lam *= 2.0;
  }
  for (int it = 0; it < 200; it++) {
    double mid = 0.5 * (lo_lam + hi_lam), sum = 0.0;
    for (uint32_t l = 0; l < L; l++) {
      double w = Z > 0.0 ? ((double)d[l] + 1e-12) * m : (double)m;
      double x = mid * w;
      sum += x < lo ? lo : x > m ? m : x;
    }
    if (sum < T)
      lo_lam = mid;
    else
      hi_lam = mid;
  }
  uint64_t total = 0;
  for (uint32_t l = 0; l < L; l++) {
    double w = Z > 0.0 ? ((double)d[l] + 1e-12) * m : (double)m;
    double x = hi_lam * w;
    x = x < lo ? lo : x > m ? m : x;
    out[l] = (uint32_t)floor(x);
    total += out[l];
  }
  /* Hand out (or take back) the remaining units one at a time, by largest
   * (smallest) fractional part; ties go to the lower layer. Bounded by L
   * passes since |T - total| <= L. */
  while (total != (uint64_t)T) {
    bool add = total < (uint64_t)T;
    int best = -1;
    double best_frac = add ? -1.0 : 2.0;
    for (uint32_t l = 0; l < L; l++) {
      if (add ? out[l] >= m : out[l] <= lo) continue;
      double w = Z > 0.0 ? ((double)d[l] + 1e-12) * m : (double)m;
      double x = hi_lam * w;
      x = x < lo ? lo : x > m ? m : x;
      double frac = x - (double)out[l];
      if (add ? frac > best_frac : frac < best_frac) {
        best_frac = frac;
        best = (int)l;
      }
    }
    if (best < 0) break; /* unreachable: T is within [L*lo, L*m] */
    if (add) {
      out[best]++;
      total++;
    } else {
      out[best]--;
      total--;
    }
  }
}

pvl_status pvl_policy_budgets(const pvl_policy *p, uint32_t L, uint32_t m,
                              const float *density, uint32_t *budgets) {
  pvl_status st = pvl__policy_check(NULL, p, __func__);
  if (st != PVL_SUCCESS) return st;
  if (L == 0 || m == 0 || !budgets)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "num_layers = %u, m = %u, budgets = %p", L, m,
                    (void *)budgets);
  switch (p->kind) {
  case PVL_POLICY_FULL:
    for (uint32_t l = 0; l < L; l++) budgets[l] = m;
    return PVL_SUCCESS;
  case PVL_POLICY_STREAMING:
  case PVL_POLICY_H2O:
  case PVL_POLICY_SNAPKV:
    budgets_uniform(L, m, p->keep_ratio, budgets);
    return PVL_SUCCESS;
  case PVL_POLICY_PYRAMIDKV:
    budgets_pyramid(p, L, m, budgets);
    return PVL_SUCCESS;
  case PVL_POLICY_VLCACHE:
    if (!density)
      return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                      "VL-Cache budgets need the layer densities");
    for (uint32_t l = 0; l < L; l++)
      if (!(density[l] >= 0.0f && density[l] <= 1.0f))
        return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                        "density[%u] = %g, must be in [0, 1]", l,
                        (double)density[l]);
    if (p->renormalize)
      budgets_waterfill(p, L, m, density, budgets);
    else
      budgets_vlcache(p, L, m, density, budgets);
    return PVL_SUCCESS;
  }
  return PVL_FAIL(NULL, PVL_ERR_INTERNAL, "unhandled policy kind");
}

static uint32_t window_of(const pvl_policy *p, uint32_t m) {
  return p->snap_window < m ? p->snap_window : m;
}

pvl_status pvl_policy_scores(const pvl_policy *p, uint32_t m,
                             const float *raw, const uint32_t *seen,
                             uint32_t n_rows, float *out) {
  pvl_status st = pvl__policy_check(NULL, p, __func__);
  if (st != PVL_SUCCESS) return st;
  if (m > 0 && (!raw || !out))
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "raw or out is NULL");
  for (uint32_t j = 0; j < m; j++)
    if (!isfinite(raw[j]))
      return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                      "raw[%u] is not finite", j);
  switch (p->kind) {
  case PVL_POLICY_H2O:
    if (!seen)
      return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                      "h2o scores need the seen counts");
    for (uint32_t j = 0; j < m; j++)
      out[j] = seen[j] ? raw[j] / (float)seen[j] : 0.0f;
    return PVL_SUCCESS;
  case PVL_POLICY_SNAPKV:
  case PVL_POLICY_PYRAMIDKV: {
    const uint32_t w = window_of(p, m), n = m - w;
    const int32_t half = (int32_t)(p->pool_kernel / 2);
    const double inv_rows = n_rows ? 1.0 / n_rows : 0.0;
    for (uint32_t j = 0; j < n; j++) {
      double acc = 0.0;
      for (int32_t t = (int32_t)j - half; t <= (int32_t)j + half; t++)
        if (t >= 0 && (uint32_t)t < n) acc += raw[t];
      out[j] = (float)(acc * inv_rows / p->pool_kernel);
    }
    for (uint32_t j = n; j < m; j++) out[j] = INFINITY;
    return PVL_SUCCESS;
  }
  default:
    for (uint32_t j = 0; j < m; j++) out[j] = raw[j];
    return PVL_SUCCESS;
  }
}

typedef struct {
  float score;
  uint32_t index;
} scored;

/* Higher score first; ties toward the later position. */
static int cmp_scored(const void *a, const void *b) {
  const scored *x = a, *y = b;
  if (x->score != y->score) return x->score > y->score ? -1 : 1;
  return x->index > y->index ? -1 : x->index < y->index;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x > y) - (x < y);
}

/* Number of the most recent candidates always kept for a budget k. The
 * product is rounded to float first, so ceil(0.1f * 10) is 1, as the ratio
 * the user wrote means, not 2 (0.1f is slightly above 0.1). */
uint32_t pvl__policy_recent(const pvl_policy *p, uint32_t m, uint32_t k) {
  uint32_t r = (uint32_t)ceilf(p->recent_ratio * (float)k);
  if ((p->kind == PVL_POLICY_SNAPKV || p->kind == PVL_POLICY_PYRAMIDKV) &&
      r < window_of(p, m))
    r = window_of(p, m);
  return r < k ? r : k;
}

pvl_status pvl__select(const pvl_allocator *a, const pvl_policy *p,
                       uint32_t m, uint32_t k, const float *scores,
                       uint32_t *keep) {
  if (k >= m || p->kind == PVL_POLICY_FULL) {
    for (uint32_t i = 0; i < m; i++) keep[i] = i;
    return PVL_SUCCESS;
  }
  if (p->kind == PVL_POLICY_STREAMING) {
    uint32_t sinks = p->sink_tokens < k ? p->sink_tokens : k;
    for (uint32_t i = 0; i < sinks; i++) keep[i] = i;
    for (uint32_t i = sinks; i < k; i++) keep[i] = m - (k - i);
    return PVL_SUCCESS;
  }
  const uint32_t r = pvl__policy_recent(p, m, k), rest = k - r;
  /* The top part competes over positions [0, m - r). */
  if (rest && pvl__top(a, scores, m - r, rest, keep) != PVL_SUCCESS)
    return PVL_ERR_NO_MEMORY;
  for (uint32_t i = 0; i < r; i++) keep[rest + i] = m - r + i;
  return PVL_SUCCESS;
}

pvl_status pvl__top(const pvl_allocator *a, const float *scores, uint32_t n,
                    uint32_t k, uint32_t *out) {
  if (k == 0) return PVL_SUCCESS;
  scored *v = pvl__alloc(a, (size_t)n * sizeof(scored));
  if (!v) return PVL_ERR_NO_MEMORY;
  for (uint32_t i = 0; i < n; i++) {
    v[i].score = scores[i];
    v[i].index = i;
  }
  /* A full sort is O(n log n) on a few thousand keys per layer: simple and
   * deterministic. The GPU does the same with CUB's segmented sort. */
  qsort(v, n, sizeof(scored), cmp_scored);
  for (uint32_t i = 0; i < k; i++) out[i] = v[i].index;
  pvl__free(a, v, (size_t)n * sizeof(scored));
  qsort(out, k, sizeof(uint32_t), cmp_u32);
  return PVL_SUCCESS;
}

pvl_status pvl_policy_select(const pvl_policy *p, uint32_t m, uint32_t budget,
                             const float *scores, uint32_t *keep,
                             uint32_t *n_keep) {
  pvl_status st = pvl__policy_check(NULL, p, __func__);
  if (st != PVL_SUCCESS) return st;
  if (!keep || !n_keep)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "keep or n_keep is NULL");
  const uint32_t k = budget < m ? budget : m;
  const bool scored_kind =
      p->kind != PVL_POLICY_FULL && p->kind != PVL_POLICY_STREAMING;
  if (p->kind == PVL_POLICY_FULL && budget < m)
    return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                    "policy full keeps every token: budget %u < m = %u",
                    budget, m);
  if (scored_kind && k < m) {
    if (!scores)
      return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT,
                      "policy %s needs scores", pvl_policy_name(p->kind));
    for (uint32_t j = 0; j < m; j++)
      if (isnan(scores[j]))
        return PVL_FAIL(NULL, PVL_ERR_INVALID_ARGUMENT, "scores[%u] is NaN",
                        j);
  }
  st = pvl__select(pvl__default_allocator(), p, m, k, scores, keep);
  if (st != PVL_SUCCESS)
    return PVL_FAIL(NULL, st, "selection scratch for %u candidates", m);
  *n_keep = k;
  return PVL_SUCCESS;
}

void pvl__policy_rows(const pvl_policy *p, uint32_t m, const pvl_span *spans,
                      uint32_t n_spans, uint32_t *first, uint32_t *n,
                      uint32_t *fallback) {
  *fallback = 0;
  switch (p->kind) {
  case PVL_POLICY_FULL:
  case PVL_POLICY_STREAMING:
    *first = m;
    *n = 0;
    return;
  case PVL_POLICY_H2O:
    *first = 0;
    *n = m;
    return;
  case PVL_POLICY_SNAPKV:
  case PVL_POLICY_PYRAMIDKV:
    *n = window_of(p, m);
    *first = m - *n;
    return;
  case PVL_POLICY_VLCACHE: {
    uint32_t v_end = n_spans ? spans[n_spans - 1].end : m;
    uint32_t tau = m - v_end;
    if (tau == 0) {
      *fallback = 1;
      tau = p->fallback_window < m ? p->fallback_window : m;
    } else if (p->window_cap && tau > p->window_cap) {
      tau = p->window_cap;
    }
    *first = m - tau;
    *n = tau;
    return;
  }
  }
}

pvl_status pvl_policy_rows(const pvl_policy *p, const pvl_cache *c,
                           pvl_seq_id id, uint32_t *first, uint32_t *n,
                           uint32_t *fallback) {
  if (!c || !first || !n || !fallback)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "NULL argument");
  pvl_status st = pvl__policy_check(c, p, __func__);
  if (st != PVL_SUCCESS) return st;
  const pvl_seq *s = pvl__seq_get(c, id);
  if (!s)
    return PVL_FAIL(c, PVL_ERR_UNKNOWN_SEQUENCE, "sequence 0x%llx is not live",
                    (unsigned long long)id);
  pvl__policy_rows(p, s->n_prompt, s->spans, s->n_spans, first, n, fallback);
  return PVL_SUCCESS;
}
