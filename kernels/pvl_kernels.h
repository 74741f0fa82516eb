/* The contract between the host library and the CUDA kernels: the pool's
 * block layout, the batch plan's device layout, and the extern "C" launchers.
 * Plain C (no CUDA types) so libpagedvl/ can include it without nvcc. */
#ifndef PVL_KERNELS_H
#define PVL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "pagedvl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Geometry of the pool. One block, row-major:
 *   [2 (K, V)][num_kv_heads][block_size][head_dim]
 * so K of (block b, head h, slot s) starts at element
 *   b * block_elems + (h * block_size + s) * head_dim
 * and V at that plus num_kv_heads * block_size * head_dim.
 * Block ids are int32; offsets are computed in int64. A "slot" index in the
 * pool is block * block_size + offset (int64). */
typedef struct pvl_kv_geom {
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t block_size;
  int32_t dtype;       /* pvl_dtype */
  int64_t block_elems; /* 2 * num_kv_heads * block_size * head_dim */
} pvl_kv_geom;

/* Device layout of a batch plan: ONE int32 buffer with, in order,
 *   row_offset [num_layers][max_seqs]  start of row (l, b) in block_ids
 *   base_len   [num_layers][max_seqs]  tokens of row b minus n_appended[b]
 *   n_appended [max_seqs]              per-sequence decode counter
 *   block_ids  [block_cap]             rows of block ids (rows have slack),
 *                                      one array shared by all layers
 * Row b of layer l holds len = base_len[l][b] + n_appended[b] tokens in
 * blocks block_ids[row_offset[l][b] .. + ceil(len / block_size)).
 * Only rows b < n_seqs are meaningful. One id array for all layers (rather
 * than one per layer) sizes the plan by the blocks the batch holds, not by
 * num_layers times the worst layer. A decode step changes one n_appended
 * entry per sequence plus the few ids of layers that crossed a block
 * boundary; the host sends those as (index, value) pairs that
 * pvlk_plan_scatter applies. */
typedef struct pvl_plan_view {
  const int32_t *buf; /* the plan buffer (device memory on CUDA) */
  int32_t num_layers;
  int32_t max_seqs;
  int32_t n_seqs;
  int64_t block_cap;
} pvl_plan_view;

static inline int64_t pvl_plan_row_offset_index(const pvl_plan_view *v,
                                                int32_t layer, int32_t b) {
  return (int64_t)layer * v->max_seqs + b;
}
static inline int64_t pvl_plan_base_len_index(const pvl_plan_view *v,
                                              int32_t layer, int32_t b) {
  return (int64_t)v->num_layers * v->max_seqs + (int64_t)layer * v->max_seqs +
         b;
}
static inline int64_t pvl_plan_n_appended_index(const pvl_plan_view *v,
                                                int32_t b) {
  return 2 * (int64_t)v->num_layers * v->max_seqs + b;
}
/* Start of the id array; the same for every layer (the argument is kept
 * so kernels read `block_ids + index(layer) + row_offset` either way). */
static inline int64_t pvl_plan_block_ids_index(const pvl_plan_view *v,
                                               int32_t layer) {
  (void)layer;
  return 2 * (int64_t)v->num_layers * v->max_seqs + v->max_seqs;
}
static inline int64_t pvl_plan_buf_elems(int32_t num_layers, int32_t max_seqs,
                                         int64_t block_cap) {
  return 2 * (int64_t)num_layers * max_seqs + max_seqs + block_cap;
}

/* ---- launchers (kernels/ *.cu); each returns a pvl_status and queues its
 * work on `stream` (a cudaStream_t). They never allocate and never
 * synchronize; device pointers are the caller's. ---- */

/* Scatter n (index, value) int32 pairs into the plan buffer. */
pvl_status pvlk_plan_scatter(int32_t *plan_buf, const int32_t *pairs,
                             uint32_t n, void *stream);

/* Write n tokens k/v [n][num_kv_heads][head_dim] into the slots of a table
 * range: token t goes to block block_ids[(first + t) / block_size], offset
 * (first + t) % block_size; block_ids is a device array. */
pvl_status pvlk_kv_write_range(void *storage, const pvl_kv_geom *g,
                               const int32_t *block_ids, uint32_t first,
                               uint32_t n, const void *k, const void *v,
                               void *stream);

/* Read the same range back into k/v [n][num_kv_heads][head_dim]. */
pvl_status pvlk_kv_read_range(const void *storage, const pvl_kv_geom *g,
                              const int32_t *block_ids, uint32_t first,
                              uint32_t n, void *k, void *v, void *stream);

/* Decode write: the newest token of each plan row b < n_seqs of `layer`
 * (slot len - 1) from k/v [n_seqs][num_kv_heads][head_dim]. */
pvl_status pvlk_plan_kv_write(void *storage, const pvl_kv_geom *g,
                              const pvl_plan_view *plan, int32_t layer,
                              const void *k, const void *v, void *stream);

/* Copy whole blocks: for i < n, block dst[i] <- block src[i] (copy-on-write).
 * src and dst are device arrays of n ids; no dst equals any src. */
pvl_status pvlk_copy_blocks(void *storage, const pvl_kv_geom *g,
                            const int32_t *src, const int32_t *dst, uint32_t n,
                            void *stream);

/* Compaction gather: token i < n moves from pool slot src_slots[i] (int64,
 * block * block_size + offset) to block dst_blocks[i / block_size], offset
 * i % block_size. dst blocks are fresh (disjoint from every source), so the
 * copy is race-free. */
pvl_status pvlk_gather_slots(void *storage, const pvl_kv_geom *g,
                             const int64_t *src_slots,
                             const int32_t *dst_blocks, uint32_t n,
                             void *stream);

/* Workspace bytes pvlk_attention_decode needs for up to max_seqs rows. */
size_t pvlk_attention_workspace_bytes(const pvl_kv_geom *g, int32_t max_seqs,
                                      int32_t num_q_heads);

/* Decode attention for every plan row b < n_seqs of `layer`:
 * out[b][h] = softmax(scale * q[b][h] . K^T) V, GQA group = h / (Hq / Hkv).
 * q, out: [n_seqs][num_q_heads][head_dim] in g->dtype. Rows with no tokens
 * produce zeros. Supports dtype f16/bf16, head_dim 64/128/256, block_size
 * 16/32 (else UNSUPPORTED). */
pvl_status pvlk_attention_decode(const void *storage, const pvl_kv_geom *g,
                                 const pvl_plan_view *plan, int32_t layer,
                                 int32_t num_q_heads, const void *q, void *out,
                                 float scale, void *workspace,
                                 size_t workspace_bytes, void *stream);

/* ---- compression kernels ---- */

/* Workspace bytes pvlk_observe needs (row statistics of pass 1). */
size_t pvlk_observe_workspace_bytes(uint32_t n_rows, int32_t num_q_heads);

/* Observation of n_rows query rows of one (sequence, layer) table
 * (docs/design.md section 5): q is [n_rows][num_q_heads][head_dim] in g->dtype,
 * row i at logical position first_pos + i; key j lives in block
 * block_ids[j / block_size], slot j % block_size, at logical position
 * key_pos[j] (device array, ascending) or j when key_pos is NULL; a row sees
 * the keys whose position <= its own. Pass 1: per (row, query head) the max
 * logit and the sum of exp(logit - max) over the keys it sees. Pass 2:
 * raw[j] = sum over rows and heads of exp(logit - max) / sum,
 * seen[j] = rows that see key j, and per query head h: total[h] = entries
 * seen, below[h] = entries with logit < max + log_p. Logit = scale * q.k,
 * accumulated in fp32. Outputs (device arrays: raw and seen [n_keys],
 * below and total [num_q_heads]) are OVERWRITTEN, not accumulated. No
 * rows x keys matrix is materialized. */
pvl_status pvlk_observe(const void *storage, const pvl_kv_geom *g,
                        const int32_t *block_ids, const uint32_t *key_pos,
                        uint32_t n_keys, int32_t num_q_heads, const void *q,
                        uint32_t first_pos, uint32_t n_rows, float scale,
                        float log_p, float *raw, uint32_t *seen,
                        unsigned long long *below, unsigned long long *total,
                        void *workspace, size_t workspace_bytes,
                        void *stream);

/* Adds one pvlk_observe result (raw, seen [n_keys], below, total
 * [num_q_heads], device arrays) into running sums on the device: acc_raw in
 * double, the counts as integers. Lets an observation of several calls stay
 * on the device until the host needs it. */
pvl_status pvlk_observe_accumulate(const float *raw, const uint32_t *seen,
                                   const unsigned long long *below,
                                   const unsigned long long *total,
                                   uint32_t n_keys, int32_t num_q_heads,
                                   double *acc_raw, uint32_t *acc_seen,
                                   unsigned long long *acc_below,
                                   unsigned long long *acc_total, void *stream);

/* Workspace bytes pvlk_select_top needs for `total` candidates in n_seg
 * segments (CUB's temporary storage plus key/value copies). */
size_t pvlk_select_workspace_bytes(uint32_t total, uint32_t n_seg);

/* Segmented top-k with CUB: segment s holds the candidates
 * scores[seg_off[s] .. seg_off[s + 1]) (candidate i of the segment is
 * index i); keep the n_top[s] highest scores (ties: the later index wins),
 * written in ascending index order to keep[keep_off[s] ..
 * keep_off[s] + n_top[s]). seg_off [n_seg + 1], n_top and keep_off [n_seg]
 * are device arrays; n_top[s] <= segment length. Scores must not be NaN. */
pvl_status pvlk_select_top(const float *scores, const int32_t *seg_off,
                           const int32_t *n_top, const int32_t *keep_off,
                           uint32_t n_seg, uint32_t total, int32_t *keep,
                           void *workspace, size_t workspace_bytes,
                           void *stream);

/* The cudaError_t (as an int) behind this thread's most recent
 * PVL_ERR_CUDA from a launcher, 0 if none; reading clears it. Launchers
 * clear the runtime's own error slot (so a failed launch does not leak into
 * the next call), so this is where the caller finds which error it was. */
int pvlk_last_cuda_error(void);

#ifdef __cplusplus
}
#endif

#endif /* PVL_KERNELS_H */
