/* Segmented top-k selection of the compression policies on the GPU: CUB
 * segmented radix sorts pick the n_top highest scores of each segment and
 * put them back in index order. Owns pvlk_select_top and its workspace size;
 * the CPU twin is the top-score part of pvl__select (policy.c). */
#include <cub/cub.cuh>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) & ~(kAlign - 1); }

/* Workspace, in order: sort keys and their alternate buffer, candidate
 * indices and theirs (CUB's DoubleBuffer form: it ping-pongs between the two
 * and needs only O(1) temporary storage of its own), the end offsets of the
 * kept prefixes, then CUB's temporary storage. */
struct Layout {
  size_t keys0, keys1, vals0, vals1, end_off, temp, temp_bytes, total_bytes;
};

/* Bits that distinguish candidate indices of a segment (all below total). */
int index_bits(uint32_t total) {
  int bits = 1;
  while (bits < 31 && ((uint64_t)1 << bits) < total) ++bits;
  return bits;
}

/* CUB answers the size query on the host, without touching the offsets; it
 * does read the device's PTX version, so it fails without a device. In the
 * DoubleBuffer form it asks for alignment slack only (255 bytes in CCCL 3);
 * kTempFallback stands in, generously, when it cannot be asked. */
constexpr size_t kTempFallback = 4096;

cudaError_t cub_temp_bytes(uint32_t total, uint32_t n_seg, size_t *bytes) {
  cub::DoubleBuffer<float> keys(nullptr, nullptr);
  cub::DoubleBuffer<int> vals(nullptr, nullptr);
  const int *offs = nullptr;
  size_t b1 = 0, b2 = 0;
  cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, b1, keys, vals, (int)total, (int)n_seg, offs, offs, 0, 32);
  if (e != cudaSuccess) return e;
  e = cub::DeviceSegmentedRadixSort::SortKeys(nullptr, b2, vals, (int)total,
                                              (int)n_seg, offs, offs, 0,
                                              index_bits(total));
  if (e != cudaSuccess) return e;
  *bytes = b1 > b2 ? b1 : b2;
  return cudaSuccess;
}

void layout_with(uint32_t total, uint32_t n_seg, size_t temp, Layout *l) {
  const size_t items = align_up((size_t)total * 4);
  l->keys0 = 0;
  l->keys1 = l->keys0 + items;
  l->vals0 = l->keys1 + items;
  l->vals1 = l->vals0 + items;
  l->end_off = l->vals1 + items;
  l->temp = l->end_off + align_up((size_t)n_seg * sizeof(int32_t));
  l->temp_bytes = temp;
  l->total_bytes = l->temp + align_up(temp);
}

cudaError_t layout_for(uint32_t total, uint32_t n_seg, Layout *l) {
  size_t temp = 0;
  const cudaError_t e = cub_temp_bytes(total, n_seg, &temp);
  if (e != cudaSuccess) return e;
  layout_with(total, n_seg, temp, l);
  return cudaSuccess;
}

/* Segment s's candidates in reverse: slot i holds candidate len - 1 - i.
 * The radix sort is stable, so of two equal scores the later candidate comes
 * first, which is the CPU's tie rule. -0.0 becomes +0.0: the CPU compares
 * them equal, and CUB before CCCL 3 did not. Also records where each kept
 * prefix ends (n_top clamped to the segment, so a bad count cannot write
 * past it). */
__global__ void prepare_kernel(const float *scores, const int32_t *seg_off,
                               const int32_t *n_top, float *keys, int32_t *vals,
                               int32_t *end_off) {
  const int s = blockIdx.x;
  const int32_t b = seg_off[s];
  const int32_t len = max(seg_off[s + 1] - b, 0);
  if (threadIdx.x == 0) end_off[s] = b + min(max(n_top[s], 0), len);
  for (int32_t i = threadIdx.x; i < len; i += blockDim.x) {
    const int32_t cand = len - 1 - i;
    const float v = scores[b + cand];
    keys[b + i] = v == 0.0f ? 0.0f : v;
    vals[b + i] = cand;
  }
}

/* Kept prefix of segment s (now in ascending index order) -> keep. */
__global__ void scatter_kernel(const int32_t *sorted, const int32_t *seg_off,
                               const int32_t *end_off, const int32_t *keep_off,
                               int32_t *keep) {
  const int s = blockIdx.x;
  const int32_t b = seg_off[s], n = end_off[s] - b, o = keep_off[s];
  for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
    keep[o + i] = sorted[b + i];
}

} // namespace

size_t pvlk_select_workspace_bytes(uint32_t total, uint32_t n_seg) {
  if (total == 0 || n_seg == 0 || total > (uint32_t)INT32_MAX ||
      n_seg > (uint32_t)INT32_MAX)
    return 0;
  Layout l;
  if (layout_for(total, n_seg, &l) != cudaSuccess) {
    (void)cudaGetLastError();
    layout_with(total, n_seg, kTempFallback, &l);
  }
  return l.total_bytes;
}

pvl_status pvlk_select_top(const float *scores, const int32_t *seg_off,
                           const int32_t *n_top, const int32_t *keep_off,
                           uint32_t n_seg, uint32_t total, int32_t *keep,
                           void *workspace, size_t workspace_bytes,
                           void *stream) {
  if (n_seg == 0 || total == 0) return PVL_SUCCESS; /* nothing to keep */
  if (total > (uint32_t)INT32_MAX || n_seg > (uint32_t)INT32_MAX)
    return PVL_ERR_INVALID_ARGUMENT;
  if (scores == nullptr || seg_off == nullptr || n_top == nullptr ||
      keep_off == nullptr || keep == nullptr || workspace == nullptr ||
      ((uintptr_t)workspace & 15) != 0)
    return PVL_ERR_INVALID_ARGUMENT;
  Layout l;
  pvl_status st = pvlk::cuda_status(layout_for(total, n_seg, &l));
  if (st != PVL_SUCCESS) return st;
  if (workspace_bytes < l.total_bytes) return PVL_ERR_INVALID_ARGUMENT;

  char *ws = static_cast<char *>(workspace);
  float *keys0 = reinterpret_cast<float *>(ws + l.keys0);
  float *keys1 = reinterpret_cast<float *>(ws + l.keys1);
  int32_t *vals0 = reinterpret_cast<int32_t *>(ws + l.vals0);
  int32_t *vals1 = reinterpret_cast<int32_t *>(ws + l.vals1);
  int32_t *end_off = reinterpret_cast<int32_t *>(ws + l.end_off);
  void *temp = ws + l.temp;
  size_t temp_bytes = l.temp_bytes;
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  prepare_kernel<<<n_seg, kThreads, 0, s>>>(scores, seg_off, n_top, keys0,
                                            vals0, end_off);
  st = pvlk::launch_status();
  if (st != PVL_SUCCESS) return st;

  /* Scores descending; the selectors tell (on the host, at enqueue time)
   * which buffer of each pair holds the result. */
  cub::DoubleBuffer<float> keys(keys0, keys1);
  cub::DoubleBuffer<int> vals(vals0, vals1);
  st = pvlk::cuda_status(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      temp, temp_bytes, keys, vals, (int)total, (int)n_seg, seg_off,
      seg_off + 1, 0, 32, s));
  if (st != PVL_SUCCESS) return st;

  /* The kept prefix [seg_off[s], end_off[s]) back into index order; the
   * rest of each segment is neither read nor written. */
  cub::DoubleBuffer<int> idx(vals.Current(), vals.Alternate());
  temp_bytes = l.temp_bytes;
  st = pvlk::cuda_status(cub::DeviceSegmentedRadixSort::SortKeys(
      temp, temp_bytes, idx, (int)total, (int)n_seg, seg_off, end_off, 0,
      index_bits(total), s));
  if (st != PVL_SUCCESS) return st;

  scatter_kernel<<<n_seg, kThreads, 0, s>>>(idx.Current(), seg_off, end_off,
                                            keep_off, keep);
  return pvlk::launch_status();
}
