/* Launchers of decode attention: argument checks, the split-K heuristic and
 * the workspace it needs, and the dispatch onto the templates of
 * attention_decode.cuh (dtype x head_dim x GQA group, block_size at run
 * time). */
#include <math.h>

#include "attention_decode.cuh"

namespace {

using namespace pvlk::decode;

int group_chunks(int group) { return (group + kMaxGroup - 1) / kMaxGroup; }

/* Splits per row. The grid (and so the workspace) depends only on the batch
 * shape, never on lengths, which live on the device and may change between
 * replays of a captured graph; each row then uses as many of the splits as
 * its length fills (split_layout). Once the batch alone gives kSlotsPerSm
 * CTAs per SM, splitting only adds the combine pass. */
int splits_for(int64_t n_seqs, int kv_heads, int chunks, int sms) {
  const int64_t ctas = n_seqs * kv_heads * chunks;
  const int64_t slots = (int64_t)sms * kSlotsPerSm;
  if (ctas <= 0 || ctas >= slots) return 1;
  const int64_t s = (slots + ctas - 1) / ctas;
  return (int)(s < kMaxSplits ? s : kMaxSplits);
}

size_t workspace_for(int64_t n_seqs, int q_heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  return (size_t)n_seqs * (size_t)q_heads * (size_t)splits *
         ((size_t)head_dim * sizeof(float) + sizeof(float2));
}

int pow2_at_least(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

template <typename T, int HD, int GMAX>
pvl_status launch(const Params &p, unsigned grid, cudaStream_t stream) {
  constexpr int smem = Shape<HD, GMAX>::kSmem;
  auto kernel = decode_kernel<T, HD, GMAX>;
  if (smem > 48 * 1024) {
    static std::atomic<uint64_t> smem_set{0}; /* one per instantiation */
    const cudaError_t e = pvlk::set_max_smem_once(kernel, smem, smem_set);
    if (e != cudaSuccess) return pvlk::cuda_status(e);
  }
  PVLK_LAUNCH((kernel), grid, kThreads, smem, stream, p);
  pvl_status st = pvlk::launch_status();
  if (st != PVL_SUCCESS || p.splits == 1) return st;
  const int64_t warps = (int64_t)p.n_seqs * p.num_q_heads;
  PVLK_LAUNCH((combine_kernel<T, HD>),
              (unsigned)((warps + kWarps - 1) / kWarps), kThreads, 0, stream,
              p);
  return pvlk::launch_status();
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15) == 0; }

} // namespace

size_t pvlk_attention_workspace_bytes(const pvl_kv_geom *g, int32_t max_seqs,
                                      int32_t num_q_heads) {
  if (g == nullptr || max_seqs <= 0 || num_q_heads <= 0 ||
      g->num_kv_heads <= 0 || g->head_dim <= 0 ||
      num_q_heads % g->num_kv_heads != 0)
    return 0;
  /* Without a readable device, size for a GPU larger than any current one:
   * more slots only ever mean more splits. */
  int sms = pvlk::sm_count();
  if (sms <= 0) sms = 256;
  const int chunks = group_chunks(num_q_heads / g->num_kv_heads);
  /* Rows beyond the slot count never split; below it the need is not
   * monotonic in the row count, so take the largest. */
  const int64_t last = (int64_t)sms * kSlotsPerSm < max_seqs
                           ? (int64_t)sms * kSlotsPerSm
                           : max_seqs;
  size_t best = 0;
  for (int64_t n = 1; n <= last; ++n) {
    const size_t need =
        workspace_for(n, num_q_heads, g->head_dim,
                      splits_for(n, g->num_kv_heads, chunks, sms));
    if (need > best) best = need;
  }
  return best;
}

pvl_status pvlk_attention_decode(const void *storage, const pvl_kv_geom *g,
                                 const pvl_plan_view *plan, int32_t layer,
                                 int32_t num_q_heads, const void *q, void *out,
                                 float scale, void *workspace,
                                 size_t workspace_bytes, void *stream) {
  pvlk::PoolBytes pb;
  const pvl_status gst = pvlk::check_kernel_shape(g, &pb);
  if (gst != PVL_SUCCESS) return gst;
  if (plan == nullptr || plan->buf == nullptr || plan->num_layers < 1 ||
      plan->max_seqs < 0 || plan->n_seqs < 0 || plan->n_seqs > plan->max_seqs ||
      layer < 0 || layer >= plan->num_layers)
    return PVL_ERR_INVALID_ARGUMENT;
  if (num_q_heads < 1 || num_q_heads % g->num_kv_heads != 0 || !isfinite(scale))
    return PVL_ERR_INVALID_ARGUMENT;
  if (plan->n_seqs == 0) return PVL_SUCCESS;
  if (storage == nullptr || q == nullptr || out == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  /* Every row starts on a multiple of head_dim * 2 bytes (a multiple of
   * 16), so aligned bases make every 16-byte access aligned. */
  if (!aligned16(storage) || !aligned16(q) || !aligned16(out))
    return PVL_ERR_INVALID_ARGUMENT;

  const int sms = pvlk::sm_count();
  if (sms <= 0) return PVL_ERR_CUDA;
  const int group = num_q_heads / g->num_kv_heads;
  const int chunks = group_chunks(group);
  const int splits = splits_for(plan->n_seqs, g->num_kv_heads, chunks, sms);
  const size_t need =
      workspace_for(plan->n_seqs, num_q_heads, g->head_dim, splits);
  if (need > 0 &&
      (workspace == nullptr || workspace_bytes < need || !aligned16(workspace)))
    return PVL_ERR_INVALID_ARGUMENT;
  const int64_t ctas =
      (int64_t)plan->n_seqs * g->num_kv_heads * chunks * splits;
  if (ctas > INT_MAX || (int64_t)plan->n_seqs * num_q_heads > INT_MAX)
    return PVL_ERR_INVALID_ARGUMENT;

  Params p;
  p.storage = static_cast<const char *>(storage);
  p.block_bytes = pb.block;
  p.v_off = pb.v_off;
  p.row_offset = plan->buf + pvl_plan_row_offset_index(plan, layer, 0);
  p.base_len = plan->buf + pvl_plan_base_len_index(plan, layer, 0);
  p.n_appended = plan->buf + pvl_plan_n_appended_index(plan, 0);
  p.block_ids = plan->buf + pvl_plan_block_ids_index(plan, layer);
  p.q = q;
  p.out = out;
  p.ws_acc = need > 0 ? static_cast<float *>(workspace) : nullptr;
  p.ws_ml = need > 0 ? reinterpret_cast<float2 *>(
                           p.ws_acc + (size_t)plan->n_seqs * num_q_heads *
                                          splits * g->head_dim)
                     : nullptr;
  p.qscale = scale * 1.4426950408889634f; /* log2(e) */
  p.n_seqs = plan->n_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = g->num_kv_heads;
  p.group = group;
  p.chunks = chunks;
  p.splits = splits;
  p.block_size = g->block_size;
  p.log_block = g->block_size == 16 ? 4 : 5;
  p.min_chunk_blocks = kMinSplitTokens / g->block_size;

  const int gmax = pow2_at_least(group < kMaxGroup ? group : kMaxGroup);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  pvl_status st = PVL_ERR_UNSUPPORTED;
  PVLK_DISPATCH_DTYPE(
      g->dtype, T,
      PVLK_DISPATCH_HEAD_DIM(
          g->head_dim, HD,
          PVLK_DISPATCH_GROUP(gmax, GMAX,
                              st = launch<T, HD, GMAX>(p, (unsigned)ctas, s))));
  return st;
}
