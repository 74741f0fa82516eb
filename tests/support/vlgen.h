/* vlgen: a synthetic generator of VLM-like keys, values and queries for the
 * compression tests (fidelity of VL-Cache and the baselines).
 *
 * Shapes follow the library: K and V of a layer are token-major
 * [m][num_kv_heads][head_dim] f32, as pvl_kv_write takes them; queries are
 * [rows][num_q_heads][head_dim] f32, query head h reading KV head
 * h / (num_q_heads / num_kv_heads). Everything assumes the default
 * attention scale 1/sqrt(head_dim).
 *
 * Construction (d = head_dim, z = a fresh N(0, I_d) vector each time, every
 * random draw a pure function of (seed, what, layer, position, head), so a
 * query row is the same whichever chunk of rows asks for it):
 *
 * - Salient tokens: n_salient_visual positions spread over the visual span
 *   [v0, v1) (never its first or last few tokens, so neither StreamingLLM's
 *   sinks nor its recent window covers them), plus n_salient_text text
 *   positions (one in the text before the image when there is room, the
 *   others early in the text after it). Each salient token i has a weight
 *   w_i in [0.7, 1.3].
 * - Per (layer l, KV head g): a unit "salience" direction u_{l,g} and a
 *   value mean mu_{l,g} ~ N(0, I_d).
 * - Keys: k_j = z for ordinary tokens; k_j = z + w_j sqrt(d) u_{l,g} for
 *   salient ones. So scale * (c u) . k_j is about c * w_j for a salient key
 *   and c * N(0, 1) / sqrt(d), i.e. small, for the others.
 * - Values: v_j = mu_{l,g} + z; a salient token adds value_boost * sqrt(d)
 *   times its own random unit direction, so dropping it moves the output.
 * - Sharpness per layer: s_0 = s_1 = 0 (the first two layers are dense,
 *   attention near-uniform); for l >= 2, s_l = max_sharpness * (l - 1) /
 *   (L - 2), growing to max_sharpness at the last layer (later layers
 *   increasingly sparse). Each query head h of layer l has its own factor
 *   f_{l,h} in [0.6, 1.4].
 * - Queries of prompt rows inside the visual span and of text rows before
 *   it: q = query_noise * z (no salience component: near-uniform attention
 *   over what the row sees, visual rows attending near-uniformly to the
 *   visual keys that dominate their prefix).
 * - Queries of post-vision rows (positions >= v1) and decode queries:
 *   q = query_noise * z + s_l f_{l,h} u_{l,g}, so the logit of a salient key
 *   stands s_l f w above the rest: peaked on the salient visual and text
 *   tokens in the late layers, near-uniform in layers 0 and 1.
 * - Decode tokens (K/V appended after the prompt): ordinary text tokens.
 *
 * With max_sharpness ~ 10 and p = 0.01 (ln p = -4.6), VL-Cache measures a
 * density near 1 in layers 0-1 and falling with depth, and its post-vision
 * scores single out the salient tokens. */
#ifndef PVL_VLGEN_H
#define PVL_VLGEN_H

#include <stdint.h>

typedef struct vlgen_config {
  uint32_t layers, q_heads, kv_heads, head_dim;
  uint32_t m;                /* prompt length */
  uint32_t v0, v1;           /* visual span [v0, v1), v0 < v1 <= m */
  uint32_t n_salient_visual; /* default (0) 8 */
  uint32_t n_salient_text;   /* default (0) 2 */
  float max_sharpness;       /* s of the last layer; default (0) 10 */
  float query_noise;         /* default (0) 0.3 */
  float value_boost;         /* default (0) 1.5 */
  uint64_t seed;
} vlgen_config;

typedef struct vlgen {
  vlgen_config cfg;    /* defaults filled in */
  float **k;           /* [layers] -> [m][kv_heads][head_dim] */
  float **v;           /* [layers] -> [m][kv_heads][head_dim] */
  float *u;            /* [layers][kv_heads][head_dim] unit directions */
  float *sharp;        /* [layers] s_l */
  uint32_t n_salient;  /* n_salient_visual + n_salient_text */
  uint32_t *salient;   /* [n_salient] ascending positions */
  uint8_t *is_salient; /* [m] */
} vlgen;

/* Builds the generator (K and V of every layer). Returns 0, or -1 on a bad
 * config or allocation failure (then *g holds nothing to free). */
int vlgen_init(vlgen *g, const vlgen_config *cfg);
void vlgen_free(vlgen *g);

/* Query rows of prompt positions [first, first + n) of `layer`:
 * out [n][q_heads][head_dim]. */
void vlgen_prompt_queries(const vlgen *g, uint32_t layer, uint32_t first,
                          uint32_t n, float *out);

/* Query of decode step `step` (position m + step) of `layer`:
 * out [q_heads][head_dim]. */
void vlgen_decode_query(const vlgen *g, uint32_t layer, uint32_t step,
                        float *out);

/* K and V of the token appended at decode step `step`: [kv_heads][head_dim]
 * each. */
void vlgen_decode_kv(const vlgen *g, uint32_t layer, uint32_t step, float *k,
                     float *v);

#endif /* PVL_VLGEN_H */
