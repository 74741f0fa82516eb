/* The CPU backend: the pool in host memory and the reference (oracle)
 * implementations of every kernel. Written to be obviously correct, not
 * fast: the GPU kernels are tested against these. */
#include <math.h>
#include <string.h>

#include "internal.h"

/* q . k with eight independent partial sums: the compiler vectorizes it
 * without -ffast-math, and it rounds no worse than a sequential sum. */
static inline float dot_f32(const float *a, const float *b, int32_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int u = 0; u < 8; u++) acc[u] += a[e + u] * b[e + u];
  float s = 0.0f;
  for (; e < n; e++) s += a[e] * b[e];
  for (int u = 0; u < 8; u++) s += acc[u];
  return s;
}

/* Byte offset of (block, K/V, head, slot) in the pool. */
static inline size_t slot_offset(const pvl_cache *c, int64_t block, int kv,
                                 int32_t head, int32_t slot) {
  const pvl_kv_geom *g = &c->geom;
  int64_t e = block * g->block_elems +
              ((int64_t)(kv * g->num_kv_heads + head) * g->block_size + slot) *
                  g->head_dim;
  return (size_t)e * c->elem_size;
}

static pvl_status cpu_init(pvl_cache *c) {
  if (c->cfg.num_blocks == 0)
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "num_blocks = 0: the CPU backend needs an explicit pool "
                    "size");
  size_t bytes;
  if (!pvl__mul_ok(c->block_bytes, c->cfg.num_blocks, &bytes))
    return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                    "%u blocks of %zu bytes overflow size_t",
                    c->cfg.num_blocks, c->block_bytes);
  c->storage = pvl__alloc_aligned(c->alloc, bytes, 64);
  if (!c->storage)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "pool storage of %zu bytes", bytes);
  return PVL_SUCCESS;
}

static int cpu_available(int32_t device) {
  (void)device;
  return 1;
}

static void cpu_fini(pvl_cache *c) {
  pvl__free_aligned(c->alloc, c->storage,
                    c->block_bytes * c->cfg.num_blocks, 64);
  c->storage = NULL;
}

static pvl_status cpu_copy_blocks(pvl_cache *c, const int32_t *src,
                                  const int32_t *dst, uint32_t n,
                                  void *stream) {
  (void)stream;
  char *base = c->storage;
  for (uint32_t i = 0; i < n; i++)
    memcpy(base + (size_t)dst[i] * c->block_bytes,
           base + (size_t)src[i] * c->block_bytes, c->block_bytes);
  return PVL_SUCCESS;
}

/* Copies one token's K and V rows (all heads) between two pool slots. */
static void copy_token(pvl_cache *c, int64_t sb, int32_t so, int64_t db,
                       int32_t dof) {
  char *base = c->storage;
  const size_t row = (size_t)c->geom.head_dim * c->elem_size;
  for (int kv = 0; kv < 2; kv++)
    for (int32_t h = 0; h < c->geom.num_kv_heads; h++)
      memcpy(base + slot_offset(c, db, kv, h, dof),
             base + slot_offset(c, sb, kv, h, so), row);
}

static pvl_status cpu_gather(pvl_cache *c, const int64_t *src_slots,
                             const int32_t *dst_blocks, uint32_t n,
                             void *stream) {
  (void)stream;
  const int32_t bs = c->geom.block_size;
  for (uint32_t i = 0; i < n; i++)
    copy_token(c, src_slots[i] / bs, (int32_t)(src_slots[i] % bs),
               dst_blocks[i / (uint32_t)bs], (int32_t)(i % (uint32_t)bs));
  return PVL_SUCCESS;
}

/* Token-major rows [n][num_kv_heads][head_dim] <-> pool slots. */
static void token_io(const pvl_cache *c, int64_t block, int32_t off,
                     char *rows_k, char *rows_v, uint32_t t, bool to_pool) {
  char *base = c->storage;
  const size_t row = (size_t)c->geom.head_dim * c->elem_size;
  for (int32_t h = 0; h < c->geom.num_kv_heads; h++) {
    size_t r = ((size_t)t * c->geom.num_kv_heads + h) * row;
    char *pk = base + slot_offset(c, block, 0, h, off);
    char *pv = base + slot_offset(c, block, 1, h, off);
    if (to_pool) {
      memcpy(pk, rows_k + r, row);
      memcpy(pv, rows_v + r, row);
    } else {
      memcpy(rows_k + r, pk, row);
      memcpy(rows_v + r, pv, row);
    }
  }
}

static pvl_status cpu_write_range(pvl_cache *c, const int32_t *blocks,
                                  uint32_t first, uint32_t n, const void *k,
                                  const void *v, void *stream) {
  (void)stream;
  const uint32_t bs = (uint32_t)c->geom.block_size;
  for (uint32_t t = 0; t < n; t++) {
    uint32_t p = first + t;
    token_io(c, blocks[p / bs], (int32_t)(p % bs), (char *)k, (char *)v, t,
             true);
  }
  return PVL_SUCCESS;
}

static pvl_status cpu_read_range(const pvl_cache *c, const int32_t *blocks,
                                 uint32_t first, uint32_t n, void *k, void *v,
                                 void *stream) {
  (void)stream;
  const uint32_t bs = (uint32_t)c->geom.block_size;
  for (uint32_t t = 0; t < n; t++) {
    uint32_t p = first + t;
    token_io(c, blocks[p / bs], (int32_t)(p % bs), k, v, t, false);
  }
  return PVL_SUCCESS;
}

/* ---- plans: on the CPU the plan buffer is host memory ---- */

static size_t plan_buf_bytes(const pvl_plan *p) {
  return (size_t)pvl_plan_buf_elems(p->view.num_layers, p->view.max_seqs,
                                    p->view.block_cap) *
         sizeof(int32_t);
}

static pvl_status cpu_plan_init(pvl_plan *p) {
  size_t bytes = plan_buf_bytes(p);
  p->host_buf = pvl__alloc_aligned(p->cache->alloc, bytes, 64);
  if (!p->host_buf)
    return PVL_FAIL(p->cache, PVL_ERR_NO_MEMORY, "plan buffer of %zu bytes",
                    bytes);
  memset(p->host_buf, 0, bytes);
  p->view.buf = p->host_buf;
  return PVL_SUCCESS;
}

static void cpu_plan_fini(pvl_plan *p) {
  pvl__free_aligned(p->cache->alloc, p->host_buf, plan_buf_bytes(p), 64);
  p->host_buf = NULL;
  p->view.buf = NULL;
}

static pvl_status cpu_plan_upload(pvl_plan *p, const int32_t *pairs,
                                  uint32_t n, void *stream) {
  (void)stream;
  for (uint32_t i = 0; i < n; i++) p->host_buf[pairs[2 * i]] = pairs[2 * i + 1];
  return PVL_SUCCESS;
}

/* Row b of `layer` as the kernels see it: length and block ids. */
static void plan_row(const pvl_plan *p, uint32_t layer, uint32_t b,
                     int32_t *len, const int32_t **ids) {
  const pvl_plan_view *v = &p->view;
  const int32_t *buf = v->buf;
  *len = buf[pvl_plan_base_len_index(v, (int32_t)layer, (int32_t)b)] +
         buf[pvl_plan_n_appended_index(v, (int32_t)b)];
  *ids = buf + pvl_plan_block_ids_index(v, (int32_t)layer) +
         buf[pvl_plan_row_offset_index(v, (int32_t)layer, (int32_t)b)];
}

static pvl_status cpu_plan_kv_write(pvl_plan *p, uint32_t layer,
                                    const void *k, const void *v,
                                    void *stream) {
  (void)stream;
  pvl_cache *c = p->cache;
  const int32_t bs = c->geom.block_size;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    int32_t last = len - 1;
    token_io(c, ids[last / bs], last % bs, (char *)k, (char *)v, b, true);
  }
  return PVL_SUCCESS;
}

/* Reference decode attention. For each (sequence, KV head), every query
 * head of the GQA group: scores s_j = scale * (q . k_j) over the row's slots,
 * then out = sum_j softmax(s)_j v_j. Plain two-pass softmax; the exp sums and
 * the weighted sums are accumulated in double, so the oracle's own rounding
 * is negligible next to the kernels' fp32. K and V rows are converted once
 * per group, not once per query head. */
static pvl_status cpu_attention(pvl_plan *p, uint32_t layer, const void *q,
                                void *out, float scale, void *stream) {
  (void)stream;
  pvl_cache *c = p->cache;
  const pvl_kv_geom *g = &c->geom;
  const int32_t d = g->head_dim, bs = g->block_size, hkv = g->num_kv_heads;
  const int32_t hq = (int32_t)c->cfg.num_q_heads, grp = hq / hkv;
  const pvl_dtype dt = c->cfg.dtype;
  const char *base = c->storage;

  int32_t max_len = 0;
  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    if (len > max_len) max_len = len;
  }
  /* acc [grp][d] and sum [grp] doubles, then scores [grp][max_len],
   * q [grp][d], k [d], v [d] floats. */
  const size_t nd = (size_t)grp * d;
  size_t bytes = (nd + (size_t)grp) * sizeof(double) +
                 ((size_t)grp * max_len + nd + 2 * (size_t)d) * sizeof(float);
  double *acc = pvl__scratch(c, bytes);
  if (!acc)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "attention scratch (%zu bytes)",
                    bytes);
  double *sum = acc + nd;
  float *scores = (float *)(sum + grp);
  float *qf = scores + (size_t)grp * max_len, *kf = qf + nd, *vf = kf + d;

  for (uint32_t b = 0; b < p->n_seqs; b++) {
    int32_t len;
    const int32_t *ids;
    plan_row(p, layer, b, &len, &ids);
    for (int32_t kvh = 0; kvh < hkv; kvh++) {
      const size_t q0 = ((size_t)b * hq + (size_t)kvh * grp) * d;
      pvl__load_f32(dt, (const char *)q + q0 * c->elem_size, qf, nd);
      for (int32_t j = 0; j < len; j++) {
        pvl__load_f32(dt, base + slot_offset(c, ids[j / bs], 0, kvh, j % bs),
                      kf, (size_t)d);
        for (int32_t i = 0; i < grp; i++)
          scores[(size_t)i * max_len + j] =
              dot_f32(qf + (size_t)i * d, kf, d) * scale;
      }
      for (int32_t i = 0; i < grp; i++) {
        float mx = -INFINITY;
        for (int32_t j = 0; j < len; j++)
          if (scores[(size_t)i * max_len + j] > mx)
            mx = scores[(size_t)i * max_len + j];
        sum[i] = 0.0;
        for (int32_t j = 0; j < len; j++) {
          float *s = &scores[(size_t)i * max_len + j];
          double w = exp((double)*s - (double)mx);
          *s = (float)w;
          sum[i] += w;
        }
      }
      for (size_t e = 0; e < nd; e++) acc[e] = 0.0;
      for (int32_t j = 0; j < len; j++) {
        pvl__load_f32(dt, base + slot_offset(c, ids[j / bs], 1, kvh, j % bs),
                      vf, (size_t)d);
        for (int32_t i = 0; i < grp; i++) {
          double w = scores[(size_t)i * max_len + j];
          for (int32_t e = 0; e < d; e++) acc[(size_t)i * d + e] += w * vf[e];
        }
      }
      for (int32_t i = 0; i < grp; i++)
        for (int32_t e = 0; e < d; e++)
          qf[(size_t)i * d + e] =
              len > 0 ? (float)(acc[(size_t)i * d + e] / sum[i]) : 0.0f;
      pvl__store_f32(dt, qf, (char *)out + q0 * c->elem_size, nd);
    }
  }
  return PVL_SUCCESS;
}

/* Reference observation (docs/design.md section 5, Eq. 1-2 and the scores).
 * For each KV head, a tile of query rows of every head of the group runs
 * two passes over the keys the rows see: pass 1 keeps each row's running
 * max and sum of exponentials (online, sums in double), pass 2 recomputes
 * the logits, adds the probabilities to the per-key sums and counts the
 * entries at or above max + ln p. Keys go through in tiles of OBS_KT,
 * transposed, so a query's logits for a whole key tile are one vectorizable
 * loop. Memory is O(tiles + keys), never rows x keys. Keys' positions
 * ascend with their slots, so the keys a row sees are a prefix. */
#define OBS_TILE 16
#define OBS_KT 32

/* s[jj] = q . k_jj for the OBS_KT keys of a transposed tile kt[e][jj]. */
static inline void tile_logits(const float *q, const float *kt, int32_t d,
                               float *s) {
  for (int jj = 0; jj < OBS_KT; jj++) s[jj] = 0.0f;
  for (int32_t e = 0; e < d; e++) {
    const float qe = q[e];
    const float *row = kt + (size_t)e * OBS_KT;
    for (int jj = 0; jj < OBS_KT; jj++) s[jj] += qe * row[jj];
  }
}

static pvl_status cpu_observe(pvl_cache *c, const pvl_table *t, const void *q,
                              uint32_t first_pos, uint32_t n_rows,
                              float scale, float log_p, pvl_obs *obs,
                              void *stream) {
  (void)stream;
  const pvl_kv_geom *g = &c->geom;
  const int32_t d = g->head_dim, bs = g->block_size, hkv = g->num_kv_heads;
  const int32_t hq = (int32_t)c->cfg.num_q_heads, grp = hq / hkv;
  const pvl_dtype dt = c->cfg.dtype;
  const char *base = c->storage;
  const uint32_t n_keys = t->n_tokens;

  /* scratch: max, sum [OBS_TILE][grp] doubles; q tile [OBS_TILE][grp][d],
   * key tile [d][OBS_KT], a key row [d] and logits [OBS_KT] floats; visible
   * counts [OBS_TILE]. */
  const size_t nq = (size_t)OBS_TILE * grp;
  size_t bytes = 2 * nq * sizeof(double) +
                 (nq * d + (size_t)d * OBS_KT + (size_t)d + OBS_KT) *
                     sizeof(float) +
                 OBS_TILE * sizeof(uint32_t);
  double *mx = pvl__scratch(c, bytes);
  if (!mx)
    return PVL_FAIL(c, PVL_ERR_NO_MEMORY, "observe scratch (%zu bytes)",
                    bytes);
  double *sum = mx + nq;
  float *qf = (float *)(sum + nq), *kt = qf + nq * d;
  float *krow = kt + (size_t)d * OBS_KT, *lg = krow + d;
  uint32_t *vis = (uint32_t *)(lg + OBS_KT);

  /* A non-finite query turns every sum of its row into NaN: refuse it
   * before anything is accumulated, so the call changes nothing. (The CUDA
   * backend does not read q on the host; there the NaN sums make
   * pvl_compress refuse the observation instead.) */
  for (uint32_t r = 0; r < n_rows; r++) {
    for (int32_t h = 0; h < hq; h++) {
      const size_t src = ((size_t)r * hq + (size_t)h) * d;
      pvl__load_f32(dt, (const char *)q + src * c->elem_size, krow, (size_t)d);
      for (int32_t e = 0; e < d; e++)
        if (!isfinite(krow[e]))
          return PVL_FAIL(c, PVL_ERR_INVALID_ARGUMENT,
                          "q row %u (position %u), query head %d, element "
                          "%d is %g: queries must be finite",
                          r, first_pos + r, h, e, (double)krow[e]);
    }
  }

  for (uint32_t r0 = 0; r0 < n_rows; r0 += OBS_TILE) {
    const uint32_t nr = n_rows - r0 < OBS_TILE ? n_rows - r0 : OBS_TILE;
    uint32_t max_vis = 0;
    for (uint32_t r = 0; r < nr; r++) {
      const uint32_t P = first_pos + r0 + r;
      uint32_t v = 0;
      while (v < n_keys && (t->pos ? t->pos[v] : v) <= P) v++;
      vis[r] = v;
      if (v > max_vis) max_vis = v;
      for (uint32_t j = 0; j < v; j++) obs->seen[j]++;
    }
    for (int32_t kvh = 0; kvh < hkv; kvh++) {
      for (uint32_t r = 0; r < nr; r++) {
        const size_t src = (((size_t)(r0 + r) * hq) + (size_t)kvh * grp) * d;
        pvl__load_f32(dt, (const char *)q + src * c->elem_size,
                      qf + (size_t)r * grp * d, (size_t)grp * d);
      }
      for (size_t i = 0; i < nq; i++) {
        mx[i] = -INFINITY;
        sum[i] = 0.0;
      }
      for (int pass = 0; pass < 2; pass++) {
        for (uint32_t j0 = 0; j0 < max_vis; j0 += OBS_KT) {
          const uint32_t nk =
              max_vis - j0 < OBS_KT ? max_vis - j0 : OBS_KT;
          /* Transposed key tile; keys past the tile's end are zeros. */
          for (uint32_t jj = 0; jj < OBS_KT; jj++) {
            const uint32_t j = j0 + jj;
            if (jj < nk)
              pvl__load_f32(dt,
                            base + slot_offset(c, t->blocks[j / (uint32_t)bs],
                                               0, kvh,
                                               (int32_t)(j % (uint32_t)bs)),
                            krow, (size_t)d);
            for (int32_t e = 0; e < d; e++)
              kt[(size_t)e * OBS_KT + jj] = jj < nk ? krow[e] : 0.0f;
          }
          for (uint32_t r = 0; r < nr; r++) {
            if (vis[r] <= j0) continue;
            const uint32_t nj = vis[r] - j0 < nk ? vis[r] - j0 : nk;
            for (int32_t i = 0; i < grp; i++) {
              const size_t ri = (size_t)r * grp + i;
              const uint32_t h = (uint32_t)(kvh * grp + i);
              tile_logits(qf + ri * d, kt, d, lg);
              for (uint32_t jj = 0; jj < nj; jj++) {
                const float s = lg[jj] * scale;
                /* expf of a non-positive float argument; the sums are
                 * kept in double. */
                if (pass == 0) {
                  if (s > mx[ri]) {
                    sum[ri] = sum[ri] * expf((float)(mx[ri] - s)) + 1.0;
                    mx[ri] = s;
                  } else {
                    sum[ri] += expf(s - (float)mx[ri]);
                  }
                } else {
                  obs->raw[j0 + jj] += expf(s - (float)mx[ri]) / sum[ri];
                  obs->total[h]++;
                  obs->below[h] += (double)s < mx[ri] + (double)log_p;
                }
              }
            }
          }
        }
      }
    }
  }
  return PVL_SUCCESS;
}

/* Reference segmented top-k: the twin of kernels/select.cu. */
static pvl_status cpu_select_top(pvl_cache *c, const float *scores,
                                 const int32_t *seg_off, const int32_t *n_top,
                                 const int32_t *keep_off, uint32_t n_seg,
                                 uint32_t total, int32_t *keep,
                                 uint32_t total_keep, void *stream) {
  (void)stream;
  (void)total;
  (void)total_keep;
  for (uint32_t i = 0; i < n_seg; i++) {
    /* int32 and uint32 share a representation for these indices. */
    pvl_status st = pvl__top(c->alloc, scores + seg_off[i],
                             (uint32_t)(seg_off[i + 1] - seg_off[i]),
                             (uint32_t)n_top[i],
                             (uint32_t *)(keep + keep_off[i]));
    if (st != PVL_SUCCESS)
      return PVL_FAIL(c, st, "selection scratch for segment %u", i);
  }
  return PVL_SUCCESS;
}

const pvl_backend_ops pvl__cpu_backend = {
    .name = "cpu",
    .init = cpu_init,
    .available = cpu_available,
    .fini = cpu_fini,
    .copy_blocks = cpu_copy_blocks,
    .gather = cpu_gather,
    .write_range = cpu_write_range,
    .read_range = cpu_read_range,
    .plan_init = cpu_plan_init,
    .plan_fini = cpu_plan_fini,
    .plan_upload = cpu_plan_upload,
    .plan_kv_write = cpu_plan_kv_write,
    .attention = cpu_attention,
    .observe = cpu_observe,
    .select_top = cpu_select_top,
};
