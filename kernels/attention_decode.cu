/* Launchers of decode attention: argument checks, the split-K capacity and
 * the workspace it needs (the split plan itself is made on the device), and
 * the dispatch onto the templates of attention_decode.cuh (dtype x head_dim
 * x GQA group, block_size at run time). */
#include <math.h>

#include "attention_decode.cuh"

namespace {

using namespace pvlk::decode;

int group_chunks(int group) { return (group + kMaxGroup - 1) / kMaxGroup; }

/* The capacities of one launch. The grid and the workspace depend only on
 * the batch shape and the SM count, never on lengths, which live on the
 * device and may change between replays of a captured graph; plan_kernel
 * then fills them from the real lengths. */
struct Capacity {
  int64_t work_slots; /* CTA slots the chunk size aims at */
  int64_t ws_cap;     /* split items (partial states per query head) */
  int64_t items_cap;  /* work items: whole rows plus split items */
};

Capacity capacity_for(int64_t n_seqs, int kv_heads, int chunks, int sms) {
  Capacity c;
  c.work_slots = (int64_t)kTailFactor * kSlotsPerSm * sms;
  /* plan_kernel's bound on split items (see there), and kMaxSplits per
   * row; below one item per slot nothing splits. */
  const int64_t per = (int64_t)kv_heads * chunks;
  c.ws_cap = 2 * (c.work_slots / per);
  if (c.ws_cap > n_seqs * kMaxSplits) c.ws_cap = n_seqs * kMaxSplits;
  /* A whole row is one item, a split row's items are in ws_cap. */
  c.items_cap = n_seqs + c.ws_cap;
  return c;
}

/* The workspace: partial states, then the plan (work list, per-row split
 * counts, item count), each part 16-byte aligned. */
struct Layout {
  size_t ml, work, row_split, n_items, total;
};

size_t align16(size_t x) { return (x + 15) / 16 * 16; }

Layout layout_for(int64_t n_seqs, int q_heads, int head_dim,
                  const Capacity &c) {
  Layout l;
  const size_t slots = (size_t)c.ws_cap * (size_t)q_heads;
  l.ml = align16(slots * (size_t)head_dim * sizeof(float));
  l.work = l.ml + align16(slots * sizeof(float2));
  l.row_split = l.work + align16((size_t)c.items_cap * 4 * sizeof(int32_t));
  l.n_items = l.row_split + align16((size_t)n_seqs * 2 * sizeof(int32_t));
  l.total = l.n_items + 16;
  return l;
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
  PVLK_LAUNCH((plan_kernel), 1, kPlanThreads, 0, stream, p);
  pvl_status st = pvlk::launch_status();
  if (st != PVL_SUCCESS) return st;
  PVLK_LAUNCH((kernel), grid, kThreads, smem, stream, p);
  st = pvlk::launch_status();
  /* Without split capacity no row is cut, and the combine pass has
   * nothing to merge. */
  if (st != PVL_SUCCESS || p.ws_cap == 0) return st;
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
  /* The layout grows with the row count and the SM count, so max_seqs
   * rows on this (or a larger) device bound every launch. */
  return layout_for(max_seqs, num_q_heads, g->head_dim,
                    capacity_for(max_seqs, g->num_kv_heads, chunks, sms))
      .total;
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
  const Capacity cap =
      capacity_for(plan->n_seqs, g->num_kv_heads, chunks, sms);
  const Layout lay = layout_for(plan->n_seqs, num_q_heads, g->head_dim, cap);
  /* The plan lives in the workspace, so it is always needed. */
  if (workspace == nullptr || workspace_bytes < lay.total ||
      !aligned16(workspace))
    return PVL_ERR_INVALID_ARGUMENT;
  const int64_t ctas = cap.items_cap * g->num_kv_heads * chunks;
  if (ctas > INT_MAX || (int64_t)plan->n_seqs * num_q_heads > INT_MAX ||
      cap.ws_cap * num_q_heads > INT_MAX || cap.work_slots > INT_MAX)
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
  char *ws = static_cast<char *>(workspace);
  p.ws_acc = reinterpret_cast<float *>(ws);
  p.ws_ml = reinterpret_cast<float2 *>(ws + lay.ml);
  p.work = reinterpret_cast<int32_t *>(ws + lay.work);
  p.row_split = reinterpret_cast<int32_t *>(ws + lay.row_split);
  p.n_items = reinterpret_cast<int32_t *>(ws + lay.n_items);
  p.qscale = scale * 1.4426950408889634f; /* log2(e) */
  p.n_seqs = plan->n_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = g->num_kv_heads;
  p.group = group;
  p.chunks = chunks;
  p.ws_cap = (int)cap.ws_cap;
  p.work_slots = (int)cap.work_slots;
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

#ifdef PVL_EMU
/* Emulator tests only: the split count of rows b < n_seqs as planned by the
 * last launch on this workspace (same SM count), so a test can see that a
 * long row was cut, which the values alone cannot show. */
extern "C" pvl_status pvl_emu_attention_row_splits(const void *workspace,
                                                   const pvl_kv_geom *g,
                                                   int32_t n_seqs,
                                                   int32_t num_q_heads,
                                                   int32_t *splits) {
  const int chunks = group_chunks(num_q_heads / g->num_kv_heads);
  const Capacity cap =
      capacity_for(n_seqs, g->num_kv_heads, chunks, pvlk::sm_count());
  const Layout lay = layout_for(n_seqs, num_q_heads, g->head_dim, cap);
  const int32_t *rs = reinterpret_cast<const int32_t *>(
      static_cast<const char *>(workspace) + lay.row_split);
  for (int32_t b = 0; b < n_seqs; ++b) splits[b] = rs[2 * b];
  return PVL_SUCCESS;
}
#endif
