/* vlgen: synthetic VLM-like attention (see vlgen.h for the construction). */
#include "vlgen.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- counter-based randomness: every draw is a pure function of its key ---- */

static uint64_t vg_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

typedef struct vg_stream {
  uint64_t state;
} vg_stream;

enum {
  VG_KEY = 1,
  VG_VAL = 2,
  VG_DIR = 3,
  VG_MEAN = 4,
  VG_QPROMPT = 5,
  VG_QDEC = 6,
  VG_KDEC = 7,
  VG_VDEC = 8,
  VG_HEADF = 9,
  VG_SAL = 10,
  VG_SALDIR = 11
};

static vg_stream vg_open(uint64_t seed, uint32_t what, uint32_t layer,
                         uint32_t pos, uint32_t head) {
  uint64_t h = vg_mix(seed);
  h = vg_mix(h ^ (((uint64_t)what << 56) ^ ((uint64_t)layer << 32)));
  h = vg_mix(h ^ (((uint64_t)pos << 20) ^ (uint64_t)head));
  vg_stream s = {h};
  return s;
}

static uint64_t vg_next(vg_stream *s) {
  s->state += 0x9e3779b97f4a7c15ULL;
  return vg_mix(s->state);
}

/* Uniform in (0, 1). */
static double vg_unif(vg_stream *s) {
  return ((double)(vg_next(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double vg_normal(vg_stream *s) {
  double u1 = vg_unif(s), u2 = vg_unif(s);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static void vg_gauss(vg_stream *s, float *out, uint32_t n, float sigma) {
  for (uint32_t i = 0; i < n; i++) out[i] = (float)(sigma * vg_normal(s));
}

static void vg_unit(vg_stream *s, float *out, uint32_t n) {
  double norm = 0.0;
  for (uint32_t i = 0; i < n; i++) {
    out[i] = (float)vg_normal(s);
    norm += (double)out[i] * out[i];
  }
  norm = sqrt(norm);
  for (uint32_t i = 0; i < n; i++) out[i] = (float)(out[i] / norm);
}

/* Salience weight w_i in [0.7, 1.3] of the salient token at `pos`. */
static float vg_weight(const vlgen *g, uint32_t pos) {
  vg_stream s = vg_open(g->cfg.seed, VG_SAL, 0, pos, 0);
  return (float)(0.7 + 0.6 * vg_unif(&s));
}

/* Per-(layer, query head) sharpness factor f_{l,h} in [0.6, 1.4]. */
static float vg_head_factor(const vlgen *g, uint32_t layer, uint32_t h) {
  vg_stream s = vg_open(g->cfg.seed, VG_HEADF, layer, 0, h);
  return (float)(0.6 + 0.8 * vg_unif(&s));
}

/* ---- construction ---- */

static void pick_salient(vlgen *g) {
  const vlgen_config *c = &g->cfg;
  uint32_t n = 0;
  /* Visual: evenly spread over the inner part of the span, jittered. */
  const uint32_t span = c->v1 - c->v0;
  const uint32_t margin = span / 8;
  const uint32_t inner = span - 2 * margin;
  vg_stream s = vg_open(c->seed, VG_SAL, 1, 0, 0);
  for (uint32_t i = 0; i < c->n_salient_visual; i++) {
    uint32_t lo = c->v0 + margin + (uint32_t)((uint64_t)inner * i /
                                              c->n_salient_visual);
    uint32_t hi = c->v0 + margin + (uint32_t)((uint64_t)inner * (i + 1) /
                                              c->n_salient_visual);
    uint32_t p = hi > lo ? lo + (uint32_t)(vg_next(&s) % (hi - lo)) : lo;
    if (!g->is_salient[p]) {
      g->is_salient[p] = 1;
      n++;
    }
  }
  /* Text: one before the image if there is room (past the 4 sinks), the
   * others early in the text after it. */
  uint32_t t = 0;
  if (t < c->n_salient_text && c->v0 >= 8) {
    uint32_t p = c->v0 / 2;
    if (!g->is_salient[p]) {
      g->is_salient[p] = 1;
      n++;
    }
    t++;
  }
  const uint32_t tail = c->m - c->v1;
  for (uint32_t i = 0; t < c->n_salient_text && tail > 0; t++, i++) {
    uint32_t p = c->v1 + (uint32_t)((uint64_t)tail * (i + 1) /
                                    (2 * (c->n_salient_text + 1)));
    if (p >= c->m) p = c->m - 1;
    if (!g->is_salient[p]) {
      g->is_salient[p] = 1;
      n++;
    }
  }
  g->n_salient = n;
  uint32_t k = 0;
  for (uint32_t p = 0; p < c->m; p++)
    if (g->is_salient[p]) g->salient[k++] = p;
}

int vlgen_init(vlgen *g, const vlgen_config *cfg) {
  memset(g, 0, sizeof(*g));
  if (!cfg || cfg->layers == 0 || cfg->q_heads == 0 || cfg->kv_heads == 0 ||
      cfg->q_heads % cfg->kv_heads != 0 || cfg->head_dim == 0 ||
      cfg->m == 0 || cfg->v0 >= cfg->v1 || cfg->v1 > cfg->m)
    return -1;
  g->cfg = *cfg;
  vlgen_config *c = &g->cfg;
  if (!c->n_salient_visual) c->n_salient_visual = 8;
  if (!c->n_salient_text) c->n_salient_text = 2;
  if (c->max_sharpness == 0.0f) c->max_sharpness = 10.0f;
  if (c->query_noise == 0.0f) c->query_noise = 0.3f;
  if (c->value_boost == 0.0f) c->value_boost = 1.5f;
  if (c->n_salient_visual > (c->v1 - c->v0) / 2)
    c->n_salient_visual = (c->v1 - c->v0) / 2;

  const uint32_t L = c->layers, hkv = c->kv_heads, d = c->head_dim;
  const size_t per_layer = (size_t)c->m * hkv * d;
  g->k = calloc(L, sizeof(float *));
  g->v = calloc(L, sizeof(float *));
  g->u = malloc((size_t)L * hkv * d * sizeof(float));
  g->sharp = malloc(L * sizeof(float));
  g->salient = malloc(((size_t)c->n_salient_visual + c->n_salient_text + 1) *
                      sizeof(uint32_t));
  g->is_salient = calloc(c->m, 1);
  if (!g->k || !g->v || !g->u || !g->sharp || !g->salient || !g->is_salient)
    goto fail;
  for (uint32_t l = 0; l < L; l++) {
    g->k[l] = malloc(per_layer * sizeof(float));
    g->v[l] = malloc(per_layer * sizeof(float));
    if (!g->k[l] || !g->v[l]) goto fail;
  }
  pick_salient(g);

  const float sqd = sqrtf((float)d);
  float *mu = malloc((size_t)d * sizeof(float));
  float *dir = malloc((size_t)d * sizeof(float));
  if (!mu || !dir) {
    free(mu);
    free(dir);
    goto fail;
  }
  for (uint32_t l = 0; l < L; l++) {
    g->sharp[l] = l < 2 || L < 3 ? 0.0f
                                 : c->max_sharpness * (float)(l - 1) /
                                       (float)(L - 2);
    for (uint32_t h = 0; h < hkv; h++) {
      float *u = g->u + ((size_t)l * hkv + h) * d;
      vg_stream s = vg_open(c->seed, VG_DIR, l, 0, h);
      vg_unit(&s, u, d);
      s = vg_open(c->seed, VG_MEAN, l, 0, h);
      vg_gauss(&s, mu, d, 1.0f);
      for (uint32_t j = 0; j < c->m; j++) {
        float *kj = g->k[l] + ((size_t)j * hkv + h) * d;
        float *vj = g->v[l] + ((size_t)j * hkv + h) * d;
        s = vg_open(c->seed, VG_KEY, l, j, h);
        vg_gauss(&s, kj, d, 1.0f);
        s = vg_open(c->seed, VG_VAL, l, j, h);
        vg_gauss(&s, vj, d, 1.0f);
        for (uint32_t e = 0; e < d; e++) vj[e] += mu[e];
        if (g->is_salient[j]) {
          const float w = vg_weight(g, j);
          for (uint32_t e = 0; e < d; e++) kj[e] += w * sqd * u[e];
          s = vg_open(c->seed, VG_SALDIR, l, j, h);
          vg_unit(&s, dir, d);
          for (uint32_t e = 0; e < d; e++)
            vj[e] += c->value_boost * sqd * dir[e];
        }
      }
    }
  }
  free(mu);
  free(dir);
  return 0;
fail:
  vlgen_free(g);
  return -1;
}

void vlgen_free(vlgen *g) {
  if (!g) return;
  for (uint32_t l = 0; g->k && l < g->cfg.layers; l++) free(g->k[l]);
  for (uint32_t l = 0; g->v && l < g->cfg.layers; l++) free(g->v[l]);
  free(g->k);
  free(g->v);
  free(g->u);
  free(g->sharp);
  free(g->salient);
  free(g->is_salient);
  memset(g, 0, sizeof(*g));
}

/* One query row: noise, plus the salience component when `peaked`. */
static void query_row(const vlgen *g, uint32_t what, uint32_t layer,
                      uint32_t pos, int peaked, float *out) {
  const vlgen_config *c = &g->cfg;
  const uint32_t hq = c->q_heads, d = c->head_dim;
  const uint32_t grp = hq / c->kv_heads;
  for (uint32_t h = 0; h < hq; h++) {
    float *q = out + (size_t)h * d;
    vg_stream s = vg_open(c->seed, what, layer, pos, h);
    vg_gauss(&s, q, d, c->query_noise);
    if (peaked && g->sharp[layer] > 0.0f) {
      const float amp = g->sharp[layer] * vg_head_factor(g, layer, h);
      const float *u = g->u + ((size_t)layer * c->kv_heads + h / grp) * d;
      for (uint32_t e = 0; e < d; e++) q[e] += amp * u[e];
    }
  }
}

void vlgen_prompt_queries(const vlgen *g, uint32_t layer, uint32_t first,
                          uint32_t n, float *out) {
  const size_t row = (size_t)g->cfg.q_heads * g->cfg.head_dim;
  for (uint32_t i = 0; i < n; i++) {
    const uint32_t pos = first + i;
    query_row(g, VG_QPROMPT, layer, pos, pos >= g->cfg.v1, out + i * row);
  }
}

void vlgen_decode_query(const vlgen *g, uint32_t layer, uint32_t step,
                        float *out) {
  query_row(g, VG_QDEC, layer, g->cfg.m + step, 1, out);
}

void vlgen_decode_kv(const vlgen *g, uint32_t layer, uint32_t step, float *k,
                     float *v) {
  const vlgen_config *c = &g->cfg;
  const uint32_t hkv = c->kv_heads, d = c->head_dim;
  float *mu = malloc((size_t)d * sizeof(float));
  for (uint32_t h = 0; h < hkv; h++) {
    vg_stream s = vg_open(c->seed, VG_KDEC, layer, c->m + step, h);
    vg_gauss(&s, k + (size_t)h * d, d, 1.0f);
    s = vg_open(c->seed, VG_VDEC, layer, c->m + step, h);
    vg_gauss(&s, v + (size_t)h * d, d, 1.0f);
    if (mu) {
      s = vg_open(c->seed, VG_MEAN, layer, 0, h);
      vg_gauss(&s, mu, d, 1.0f);
      for (uint32_t e = 0; e < d; e++) v[(size_t)h * d + e] += mu[e];
    }
  }
  free(mu);
}
