/* Observation and compression of sequences: pvl_observe accumulates a
 * layer's attention statistics (through the backend), pvl_compress turns
 * them into budgets and selections (policy.c) and compacts every layer
 * (seq.c), pvl_decode_cap does the same for one layer during decode. */
#include <math.h>
#include <string.h>

#include "internal.h"

/* ---- observation storage ---- */

static void obs_free(pvl_cache *c, pvl_obs *o) {
  if (!o) return;
  if (o->dev && c->be->obs_release) c->be->obs_release(c, o);
  const size_t hq = c->cfg.num_q_heads;
  pvl__free(c->alloc, o->raw, (size_t)o->n_keys * sizeof(double));
  pvl__free(c->alloc, o->seen, (size_t)o->n_keys * sizeof(uint32_t));
  pvl__free(c->alloc, o->below, hq * sizeof(uint64_t));
  pvl__free(c->alloc, o->total, hq * sizeof(uint64_t));
  pvl__free(c->alloc, o, sizeof(*o));
}

void pvl__obs_drop(pvl_cache *c, pvl_seq *s, uint32_t layer) {
  if (!s->obs) return;
  obs_free(c, s->obs[layer]);
  s->obs[layer] = NULL;
}

void pvl__obs_free_all(pvl_cache *c, pvl_seq *s) {
  if (!s->obs) return;
  for (uint32_t l = 0; l < c->cfg.num_layers; l++) obs_free(c, s->obs[l]);
  pvl__free(c->alloc, s->obs, c->cfg.num_layers * sizeof(pvl_obs *));
  s->obs = NULL;
}

pvl_status pvl__obs_fetch(pvl_cache *c, pvl_obs *const *obs, uint32_t n,
                          void *stream, const char *fn) {
  if (!c->be->obs_fetch || !obs) return PVL_SUCCESS;
  bool any = false;
  for (uint32_t i = 0; i < n && !any; i++) any = obs[i] && obs[i]->stale;
  if (!any) return PVL_SUCCESS;
  pvl_status st = c->be->obs_fetch(c, obs, n, stream);
  return st == PVL_SUCCESS ? st : pvl__prefix(c, st, fn);
}

static bool obs_valid(const pvl_obs *o, const pvl_table *t) {
  return o && o->epoch == t->epoch && o->n_keys == t->n_tokens;
}

static pvl_obs *obs_new(pvl_cache *c, const pvl_table *t) {
  const size_t hq = c->cfg.num_q_heads, n = t->n_tokens;
  pvl_obs *o = pvl__alloc(c->alloc, sizeof(*o));
  if (!o) return NULL;
  memset(o, 0, sizeof(*o));
  o->n_keys = t->n_tokens;
  o->epoch = t->epoch;
  o->raw = pvl__alloc(c->alloc, n * sizeof(double));
  o->seen = pvl__alloc(c->alloc, n * sizeof(uint32_t));
  o->below = pvl__alloc(c->alloc, hq * sizeof(uint64_t));
  o->total = pvl__alloc(c->alloc, hq * sizeof(uint64_t));
  if (!o->raw || !o->seen || !o->below || !o->total) {
    obs_free(c, o);
    return NULL;
  }
  memset(o->raw, 0, n * sizeof(double));
  memset(o->seen, 0, n * sizeof(uint32_t));
  memset(o->below, 0, hq * sizeof(uint64_t));
  memset(o->total, 0, hq * sizeof(uint64_t));
  return o;
}

static pvl_status seq_layer(const pvl_cache *c, pvl_seq_id id, uint32_t layer,
                            pvl_seq **s, const char *fn) {
  if (layer >= c->cfg.num_layers)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "layer %u out of range (num_layers = %u)", layer,
                     c->cfg.num_layers);
  *s = pvl__seq_get(c, id);
  if (!*s)
    return pvl__fail(c, PVL_ERR_UNKNOWN_SEQUENCE, fn,
                     "sequence 0x%llx is not live", (unsigned long long)id);
  return PVL_SUCCESS;
}

pvl_status pvl_observe(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                       const void *q, uint32_t first_pos, uint32_t n_rows,
                       float threshold, float scale, void *stream) {
  if (!c) return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache is NULL");
  pvl_seq *s = NULL;
  pvl_status st = seq_layer(c, id, layer, &s, __func__);
  if (st != PVL_SUCCESS) return st;
  if (n_rows > 0 && !q)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "q is NULL, n_rows = %u",
                    n_rows);
  /* A row is the query of a token the sequence holds: positions past the
   * next one have no token, and their causal window would silently take in
   * keys appended later. */
  const uint32_t next_pos = s->n_prompt + s->n_decoded;
  if (first_pos > next_pos || n_rows > next_pos - first_pos)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "rows at positions [%u, %u + %u) reach past the "
                    "sequence's next position %u",
                    first_pos, first_pos, n_rows, next_pos);
  if (!(threshold > 0.0f && threshold < 1.0f))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "threshold = %g, must be in (0, 1)", (double)threshold);
  if (scale != 0.0f && !(scale > 0.0f && isfinite(scale)))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "scale = %g must be 0 (default) or finite and > 0",
                    (double)scale);
  pvl_table *t = &s->tables[layer];
  if (t->n_tokens == 0)
    return PVL_FAIL(c, PVL_ERR_BAD_STATE, "layer %u holds no tokens", layer);
  if (n_rows == 0) return PVL_SUCCESS;
  if (scale == 0.0f) scale = 1.0f / sqrtf((float)c->cfg.head_dim);

  if (!s->obs) {
    s->obs = pvl__alloc(c->alloc, c->cfg.num_layers * sizeof(pvl_obs *));
    if (!s->obs) return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "observation table");
    memset(s->obs, 0, c->cfg.num_layers * sizeof(pvl_obs *));
  }
  pvl_obs *o = s->obs[layer];
  bool fresh = false;
  if (!obs_valid(o, t)) {
    o = obs_new(c, t);
    if (!o)
      return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "observation of %u keys",
                      t->n_tokens);
    fresh = true;
  }
  st = c->be->observe(c, t, q, first_pos, n_rows, scale, logf(threshold), o,
                      stream);
  if (st != PVL_SUCCESS) {
    if (fresh) obs_free(c, o);
    return PVL_PREFIX(c, st);
  }
  o->n_rows += n_rows;
  if (fresh) {
    pvl__obs_drop(c, s, layer);
    s->obs[layer] = o;
  }
  return PVL_SUCCESS;
}

double pvl__gamma(const uint64_t *below, const uint64_t *total, uint32_t H,
                  float *per_head) {
  double sum = 0.0;
  for (uint32_t h = 0; h < H; h++) {
    double g = total[h] ? (double)below[h] / (double)total[h] : 0.0;
    if (per_head) per_head[h] = (float)g;
    sum += g;
  }
  return sum / H;
}

/* gamma_l of an observation: mean over heads of below / total. */
static double obs_gamma(const pvl_cache *c, const pvl_obs *o, float *per_head) {
  return pvl__gamma(o->below, o->total, c->cfg.num_q_heads, per_head);
}

pvl_status pvl_seq_observation(const pvl_cache *c, pvl_seq_id id,
                               uint32_t layer, float *gamma,
                               float *gamma_layer, float *raw, uint32_t *seen,
                               uint32_t cap, uint32_t *n_keys,
                               uint32_t *n_rows) {
  if (!c) return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT, "cache is NULL");
  pvl_seq *s = NULL;
  pvl_status st = seq_layer(c, id, layer, &s, __func__);
  if (st != PVL_SUCCESS) return st;
  const pvl_obs *o = s->obs ? s->obs[layer] : NULL;
  if (!obs_valid(o, &s->tables[layer]))
    return PVL_FAIL(c, PVL_ERR_BAD_STATE,
                    "layer %u has no observation (or changed since)", layer);
  if ((raw || seen) && cap < o->n_keys)
    return PVL_FAIL(c, PVL_ERR_CAPACITY, "cap = %u < %u keys", cap,
                    o->n_keys);
  /* A read of the observation: sums still on the device come over first
   * (after the work queued into them, on whatever stream). Logically
   * const: the fetched copy is what the sums already are. */
  st = pvl__obs_fetch((pvl_cache *)c, &s->obs[layer], 1, NULL, __func__);
  if (st != PVL_SUCCESS) return st;
  double g = obs_gamma(c, o, gamma);
  if (gamma_layer) *gamma_layer = (float)g;
  for (uint32_t j = 0; raw && j < o->n_keys; j++) raw[j] = (float)o->raw[j];
  if (seen) memcpy(seen, o->seen, o->n_keys * sizeof(uint32_t));
  if (n_keys) *n_keys = o->n_keys;
  if (n_rows) *n_rows = o->n_rows;
  return PVL_SUCCESS;
}

/* ---- compress ---- */

static bool policy_scored(const pvl_policy *p) {
  return p->kind != PVL_POLICY_FULL && p->kind != PVL_POLICY_STREAMING;
}

/* Fails (BAD_STATE, naming the layer) if the observation holds a
 * non-finite per-key sum. Inf or NaN in a cached key, a logit that
 * overflows float, or (CUDA, where q is not inspected) a non-finite query
 * turn sums into NaN, and a sum keeps it: NaN absorbs every later addition,
 * and probabilities (at most 1 each) cannot overflow a double. So the data
 * records it, and the check reads the data the selection will read (after
 * any combination of observations), not a flag set along the way. */
static pvl_status obs_check_finite(const pvl_cache *c, const pvl_obs *o,
                                   uint32_t layer, const char *fn) {
  for (uint32_t j = 0; j < o->n_keys; j++)
    if (!isfinite(o->raw[j]))
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "the observation of layer %u is not finite (key "
                       "slot %u sums to %g: a query or key held Inf or NaN, "
                       "or a logit overflowed); nothing was changed",
                       layer, j, o->raw[j]);
  return PVL_SUCCESS;
}

/* Scores of the first m keys of an observation, by the policy's transform,
 * into out[0..m); raw_tmp holds m floats. */
static pvl_status obs_scores(const pvl_cache *c, const pvl_policy *p,
                             const pvl_obs *o, uint32_t m, uint32_t layer,
                             float *raw_tmp, float *out, const char *fn) {
  for (uint32_t j = 0; j < m; j++) raw_tmp[j] = (float)o->raw[j];
  pvl_status st = pvl_policy_scores(p, m, raw_tmp, o->seen, o->n_rows, out);
  if (st != PVL_SUCCESS)
    return pvl__fail(c, st, fn, "scores of layer %u: %s", layer,
                     pvl_create_last_error());
  return PVL_SUCCESS;
}

/* Keep lists of every layer: the kept prompt positions, then the decoded
 * tokens (never candidates: they stay); keep + koff[l] has room for
 * min(budget, m) + decoded entries. The top-score part of every layer is
 * one segmented top-k by the backend (CUB's segmented sort on the GPU: one
 * upload of the scores, one download of the kept indices); the recent
 * window, sinks and the unscored policies are placed here. */
static pvl_status select_layers(pvl_cache *c, const pvl_policy *p,
                                const pvl_seq *s, pvl_obs *const *obs,
                                const uint32_t *budget, uint32_t *keep,
                                const uint64_t *koff, void *stream) {
  const uint32_t L = c->cfg.num_layers, m = s->n_prompt;
  if (!policy_scored(p)) {
    /* full and streaming: positions only, nothing to rank. */
    for (uint32_t l = 0; l < L; l++) {
      const uint32_t k = budget[l] < m ? budget[l] : m;
      uint32_t *kl = keep + koff[l];
      pvl_status st = pvl__select(c->alloc, p, m, k, NULL, kl);
      if (st != PVL_SUCCESS)
        return pvl__fail(c, st, "pvl_compress", "selection of layer %u", l);
      for (uint32_t j = m; j < s->tables[l].n_tokens; j++) kl[k + (j - m)] = j;
    }
    return PVL_SUCCESS;
  }
  /* Per layer: recent r, candidates m - r, top part k - r. */
  uint64_t total = 0, total_top = 0;
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t k = budget[l] < m ? budget[l] : m;
    if (k >= m) continue;
    const uint32_t r = pvl__policy_recent(p, m, k);
    total += m - r;
    total_top += k - r;
  }
  /* Messages name the public function: this helper is not one. */
  if (total > INT32_MAX)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, "pvl_compress",
                     "%llu candidates exceed the selection kernel's int32",
                     (unsigned long long)total);
  const size_t bytes = (size_t)total * sizeof(float) +
                       2 * (size_t)m * sizeof(float) +
                       (3 * (size_t)L + 1) * sizeof(int32_t) +
                       (size_t)total_top * sizeof(int32_t) + 16;
  char *mem = pvl__alloc(c->alloc, bytes);
  if (!mem)
    return pvl__fail(c, PVL_ERR_NO_MEMORY, "pvl_compress", "selection staging");
  float *sc = (float *)mem, *raw_tmp = sc + total, *full = raw_tmp + m;
  int32_t *seg_off = (int32_t *)(full + m);
  int32_t *n_top = seg_off + L + 1, *keep_off = n_top + L;
  int32_t *top = keep_off + L;
  uint32_t n_seg = 0;
  int32_t so = 0, ko = 0;
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t k = budget[l] < m ? budget[l] : m;
    if (k >= m) continue;
    const uint32_t r = pvl__policy_recent(p, m, k);
    /* The transform needs all m keys; the first m - r compete. */
    pvl_status st =
        obs_scores(c, p, obs[l], m, l, raw_tmp, full, "pvl_compress");
    if (st != PVL_SUCCESS) {
      pvl__free(c->alloc, mem, bytes);
      return st;
    }
    memcpy(sc + so, full, (size_t)(m - r) * sizeof(float));
    seg_off[n_seg] = so;
    n_top[n_seg] = (int32_t)(k - r);
    keep_off[n_seg] = ko;
    so += (int32_t)(m - r);
    ko += (int32_t)(k - r);
    n_seg++;
  }
  seg_off[n_seg] = so;
  pvl_status st = PVL_SUCCESS;
  if (n_seg > 0)
    st = c->be->select_top(c, sc, seg_off, n_top, keep_off, n_seg,
                           (uint32_t)total, top, (uint32_t)total_top, stream);
  if (st != PVL_SUCCESS) {
    pvl__free(c->alloc, mem, bytes);
    return pvl__prefix(c, st, "pvl_compress");
  }
  uint32_t seg = 0;
  for (uint32_t l = 0; l < L; l++) {
    const pvl_table *t = &s->tables[l];
    const uint32_t k = budget[l] < m ? budget[l] : m;
    uint32_t *kl = keep + koff[l];
    if (k >= m) {
      for (uint32_t i = 0; i < m; i++) kl[i] = i;
    } else {
      const uint32_t r = pvl__policy_recent(p, m, k);
      for (uint32_t i = 0; i < k - r; i++)
        kl[i] = (uint32_t)top[keep_off[seg] + (int32_t)i];
      for (uint32_t i = 0; i < r; i++) kl[k - r + i] = m - r + i;
      seg++;
    }
    for (uint32_t j = m; j < t->n_tokens; j++) kl[k + (j - m)] = j;
  }
  pvl__free(c->alloc, mem, bytes);
  return PVL_SUCCESS;
}

static pvl_status compress(pvl_cache *c, pvl_seq_id id, const pvl_policy *p,
                           pvl_compress_report *report, void *stream) {
  static const char fn[] = "pvl_compress";
  if (!c) return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache is NULL");
  pvl_status st = pvl__policy_check(c, p, fn);
  if (st != PVL_SUCCESS) return st;
  pvl_seq *s = pvl__seq_get(c, id);
  if (!s)
    return pvl__fail(c, PVL_ERR_UNKNOWN_SEQUENCE, fn,
                     "sequence 0x%llx is not live", (unsigned long long)id);
  if (s->compressed)
    return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                     "sequence 0x%llx is already compressed",
                     (unsigned long long)id);
  const uint32_t L = c->cfg.num_layers, m = s->n_prompt;
  const bool scored = policy_scored(p);
  uint64_t n_keep_all = 0;
  for (uint32_t l = 0; l < L; l++) {
    const pvl_table *t = &s->tables[l];
    if (t->pos || t->n_tokens < m)
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "layer %u was retained by hand: its slots are no "
                       "longer the prompt positions",
                       l);
    const pvl_obs *o = s->obs ? s->obs[l] : NULL;
    if (scored && (!obs_valid(o, t) || o->n_rows == 0))
      return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                       "policy %s needs an observation of every layer; layer "
                       "%u has none (or changed since pvl_observe)",
                       pvl_policy_name(p->kind), l);
    n_keep_all += t->n_tokens;
  }
  /* Every layer's sums to the host in one wait, before anything reads
   * them (the checks and the combination of ranks below). */
  if (scored) {
    st = pvl__obs_fetch(c, s->obs, L, stream, fn);
    if (st != PVL_SUCCESS) return st;
  }

  /* Host scratch: preparations, keep-list offsets, densities, budgets and
   * keep lists. One allocation, freed on every path. */
  const size_t sz_f = (size_t)L * sizeof(float);
  const size_t sz_u = (size_t)L * sizeof(uint32_t);
  const size_t sz_k = n_keep_all * sizeof(uint32_t);
  const size_t sz_p = (size_t)L * sizeof(pvl_retain_prep);
  const size_t sz_o = (size_t)L * sizeof(uint64_t);
  const size_t bytes = sz_p + sz_o + sz_f + sz_u + sz_k;
  char *mem = pvl__alloc(c->alloc, bytes);
  if (!mem)
    return pvl__fail(c, PVL_ERR_NO_MEMORY, fn,
                     "compression scratch (%zu bytes)", bytes);
  pvl_retain_prep *prep = (pvl_retain_prep *)mem;
  uint64_t *koff = (uint64_t *)(mem + sz_p);
  float *density = (float *)(mem + sz_p + sz_o);
  uint32_t *budget = (uint32_t *)(mem + sz_p + sz_o + sz_f);
  uint32_t *keep = (uint32_t *)(mem + sz_p + sz_o + sz_f + sz_u);
  /* Zeroed preparations abort as no-ops, so `out` aborts them all. */
  memset(prep, 0, sz_p);

  /* A split cache combines every rank's statistics first (dist.c), so the
   * checks, budgets and selections below read the same data on every rank
   * (split by heads: the sums over all heads; by layers: all densities). */
  pvl_dist_stats ds;
  st = pvl__dist_compress_stats(c, s, p, &ds, fn);
  if (st != PVL_SUCCESS) goto out;
  pvl_obs *const *obs = ds.obs ? ds.obs : s->obs;
  const uint32_t H = ds.obs ? c->dist->model_q_heads : c->cfg.num_q_heads;

  /* The observations a scored policy selects from must be finite: one step,
   * right before the budgets, over the data as the selection reads it. A
   * non-finite one fails the whole call before anything changes; the user
   * may free the sequence, or compress with full or streaming, which read
   * no observation. */
  for (uint32_t l = 0; scored && l < L; l++) {
    st = obs_check_finite(c, obs[l], l, fn);
    if (st != PVL_SUCCESS) goto out;
  }

  for (uint32_t l = 0; l < L; l++) {
    const pvl_obs *o = obs ? obs[l] : NULL;
    density[l] = p->kind == PVL_POLICY_VLCACHE
                     ? (float)(1.0 - pvl__gamma(o->below, o->total, H, NULL))
                     : 1.0f;
  }
  st = pvl__dist_budgets(c, &ds, p, m, density, budget);
  if (st != PVL_SUCCESS) {
    st = pvl__fail(c, st, fn, "budgets: %s", pvl_create_last_error());
    goto out;
  }

  /* Selections and preparations: nothing changes until every layer is
   * ready and the pool is known to suffice. */
  uint64_t off = 0, kept_total = 0;
  for (uint32_t l = 0; l < L; l++) {
    const uint32_t k = budget[l] < m ? budget[l] : m;
    koff[l] = off;
    off += k + (s->tables[l].n_tokens - m);
    kept_total += k;
  }
  st = select_layers(c, p, s, obs, budget, keep, koff, stream);
  if (st != PVL_SUCCESS) goto out;
  uint64_t free_sim = c->pool.num_free;
  for (uint32_t l = 0; l < L; l++) {
    pvl_table *t = &s->tables[l];
    uint32_t n = (uint32_t)((l + 1 < L ? koff[l + 1] : off) - koff[l]);
    st = pvl__retain_prepare(c, t, keep + koff[l], n, &prep[l], fn);
    if (st != PVL_SUCCESS) goto out;
    if (prep[l].n_new > free_sim) {
      st = pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "compacting layer %u needs %u free blocks, %llu free "
                     "at that point",
                     l, prep[l].n_new, (unsigned long long)free_sim);
      goto out;
    }
    free_sim = free_sim - prep[l].n_new + prep[l].n_freed;
  }

  uint32_t blocks_before = 0, blocks_after = 0, blocks_freed = 0;
  uint32_t blocks_taken = 0;
  for (uint32_t l = 0; l < L; l++) {
    blocks_before += s->tables[l].n_blocks;
    blocks_freed += prep[l].n_freed;
    blocks_taken += prep[l].n_new;
  }
  /* A split cache commits on every rank or on none. */
  st = pvl__dist_agree(c, PVL_SUCCESS, 0, fn);
  if (st != PVL_SUCCESS) goto out;
  for (uint32_t l = 0; l < L; l++) {
    uint32_t n = (uint32_t)((l + 1 < L ? koff[l + 1] : off) - koff[l]);
    st = pvl__retain_commit(c, s, l, keep + koff[l], n, &prep[l], stream, fn);
    /* Only a device error fails here (the pool was checked above): layers
     * before l are then compacted, the rest are not. */
    if (st != PVL_SUCCESS) goto out;
  }
  for (uint32_t l = 0; l < L; l++) {
    blocks_after += s->tables[l].n_blocks;
    pvl__obs_drop(c, s, l);
  }
  s->compressed = true;

  if (report) {
    for (uint32_t l = 0; l < L; l++) {
      if (report->budget) report->budget[l] = budget[l];
      if (report->kept) report->kept[l] = budget[l] < m ? budget[l] : m;
      if (report->density) report->density[l] = density[l];
    }
    report->n_prompt = m;
    pvl__policy_rows(p, m, s->spans, s->n_spans, &report->window_first,
                     &report->window_rows, &report->window_fallback);
    report->kept_total = kept_total;
    report->blocks_before = blocks_before;
    report->blocks_after = blocks_after;
    report->blocks_freed = blocks_freed;
    report->blocks_taken = blocks_taken;
    report->keep_ratio = (double)kept_total / ((double)L * m);
  }
  st = PVL_SUCCESS;
out:
  for (uint32_t l = 0; l < L; l++) pvl__retain_abort(c, &prep[l]);
  pvl__dist_stats_free(c, &ds);
  pvl__free(c->alloc, mem, bytes);
  return st;
}

pvl_status pvl_compress(pvl_cache *c, pvl_seq_id id, const pvl_policy *p,
                        pvl_compress_report *report, void *stream) {
  pvl__dist_begin(c, PVL_CALL_COMPRESS);
  return pvl__dist_end(c, compress(c, id, p, report, stream));
}

static pvl_status decode_cap(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                             const pvl_policy *p, uint32_t *did, void *stream) {
  static const char fn[] = "pvl_decode_cap";
  if (!c || !did)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn, "cache or did is NULL");
  pvl_status st = pvl__policy_check(c, p, fn);
  if (st != PVL_SUCCESS) return st;
  if (p->decode_cap == 0 || p->kind == PVL_POLICY_FULL)
    return pvl__fail(c, PVL_ERR_INVALID_ARGUMENT, fn,
                     "decode_cap = %u with policy %s: nothing to cap",
                     p->decode_cap, pvl_policy_name(p->kind));
  pvl_seq *s = NULL;
  st = seq_layer(c, id, layer, &s, fn);
  if (st != PVL_SUCCESS) return st;
  pvl_table *t = &s->tables[layer];
  if (t->n_tokens <= p->decode_cap) {
    *did = 0;
    return PVL_SUCCESS;
  }
  const uint32_t slack =
      p->decode_cap_slack ? p->decode_cap_slack : p->decode_cap / 8;
  const uint32_t k = p->decode_cap - slack, n = t->n_tokens;
  const pvl_obs *o = s->obs ? s->obs[layer] : NULL;
  const bool scored = policy_scored(p);
  if (scored && (!obs_valid(o, t) || o->n_rows == 0))
    return pvl__fail(c, PVL_ERR_BAD_STATE, fn,
                     "layer %u has no observation of recent decode queries "
                     "(or changed since)",
                     layer);
  if (scored) {
    st = pvl__obs_fetch(c, &s->obs[layer], 1, stream, fn);
    if (st != PVL_SUCCESS) return st;
  }
  /* Split by heads: the per-key sums of every rank are added first
   * (dist.c), so every rank checks and keeps the same tokens. */
  pvl_obs *comb = NULL;
  if (scored && c->dist && c->dist->call) {
    st = pvl__dist_layer_obs(c, o, &comb, fn);
    if (st != PVL_SUCCESS) return st;
    o = comb;
  }
  char *mem = NULL;
  size_t bytes = 0;
  if (scored) {
    st = obs_check_finite(c, o, layer, fn);
    if (st != PVL_SUCCESS) goto done;
  }
  bytes = (2 * (size_t)n) * sizeof(float) + (size_t)k * 4;
  mem = pvl__alloc(c->alloc, bytes);
  if (!mem) {
    st = pvl__fail(c, PVL_ERR_NO_MEMORY, fn, "decode cap scratch");
    goto done;
  }
  float *raw_tmp = (float *)mem, *scores = raw_tmp + n;
  uint32_t *keep = (uint32_t *)(scores + n);
  if (scored) {
    st = obs_scores(c, p, o, n, layer, raw_tmp, scores, fn);
    if (st != PVL_SUCCESS) goto done;
  }
  st = pvl__select(c->alloc, p, n, k, scores, keep);
  if (st != PVL_SUCCESS) {
    st = pvl__fail(c, st, fn, "selection scratch");
    goto done;
  }
  pvl_retain_prep prep;
  st = pvl__retain_prepare(c, t, keep, k, &prep, fn);
  if (st == PVL_SUCCESS && c->dist && c->dist->call) {
    /* Every rank recompresses or none; the commit's pool check first. */
    if (prep.n_new > c->pool.num_free)
      st = pvl__fail(c, PVL_ERR_OUT_OF_BLOCKS, fn,
                     "recompressing layer %u needs %u free blocks, %u free",
                     layer, prep.n_new, c->pool.num_free);
    st = pvl__dist_agree(c, st, 0, fn);
    if (st != PVL_SUCCESS) pvl__retain_abort(c, &prep);
  }
  if (st == PVL_SUCCESS)
    st = pvl__retain_commit(c, s, layer, keep, k, &prep, stream, fn);
  if (st == PVL_SUCCESS) {
    pvl__obs_drop(c, s, layer);
    *did = 1;
  }
done:
  if (mem) pvl__free(c->alloc, mem, bytes);
  if (comb) pvl__dist_obs_free(c, comb);
  return st;
}

pvl_status pvl_decode_cap(pvl_cache *c, pvl_seq_id id, uint32_t layer,
                          const pvl_policy *p, uint32_t *did, void *stream) {
  pvl__dist_begin(c, PVL_CALL_DECODE_CAP);
  return pvl__dist_end(c, decode_cap(c, id, layer, p, did, stream));
}
