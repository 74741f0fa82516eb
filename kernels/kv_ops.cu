/* Data-movement kernels of the pool: plan scatter, K/V writes and reads of a
 * table range, the per-step decode write, copy-on-write block copies and the
 * compaction gather. Each launcher is one launch; the kernels treat K/V as
 * opaque bytes, so they work for any head_dim and dtype. */
#include "common.cuh"

namespace {

using pvlk::PoolBytes;

constexpr int kThreads = 256;
/* Enough CTAs to fill any current GPU several times; larger jobs loop. */
constexpr uint64_t kMaxCtas = 16384;

unsigned grid_for(uint64_t work) {
  const uint64_t ctas = (work + kThreads - 1) / kThreads;
  return (unsigned)(ctas < kMaxCtas ? ctas : kMaxCtas);
}

/* a / b and a % b; 32-bit division is several times cheaper, and almost
 * every index here fits in 32 bits. */
__device__ __forceinline__ void divmod(uint64_t a, uint64_t b, uint64_t &q,
                                       uint64_t &r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t a32 = (uint32_t)a, b32 = (uint32_t)b;
    q = a32 / b32;
    r = a32 - (uint32_t)q * b32;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

/* Pool geometry as the kernels see it (bytes; block_size as a divisor). */
struct Pool {
  char *base;
  int64_t block;
  int64_t row;
  int64_t v_off;
  uint64_t block_size;
  uint64_t heads;
};

Pool make_pool(void *storage, const PoolBytes &pb, const pvl_kv_geom *g) {
  return Pool{static_cast<char *>(storage),
              pb.block,
              pb.row,
              pb.v_off,
              (uint64_t)g->block_size,
              (uint64_t)g->num_kv_heads};
}

/* Byte offset of the K row of (block, head, offset in block). */
__device__ __forceinline__ int64_t k_row(const Pool &p, int32_t block,
                                         uint64_t head, uint64_t off) {
  return (int64_t)block * p.block +
         (int64_t)(head * p.block_size + off) * p.row;
}

/* ---- row copies ------------------------------------------------------------
 * One unit is (token, kv head): a K row and a V row of head_dim elements.
 * Each thread moves one vector of both rows; an Op maps a unit to its source
 * and destination rows (or skips it). */

struct Rows {
  const char *src_k, *src_v;
  char *dst_k, *dst_v;
};

/* Table range -> pool: token t of k/v [n][heads][hd] to slot first + t. */
struct WriteRangeOp {
  Pool pool;
  const int32_t *block_ids;
  uint64_t first;
  const char *k, *v;
  __device__ bool operator()(uint64_t t, uint64_t h, Rows &r) const {
    uint64_t blk, off;
    divmod(first + t, pool.block_size, blk, off);
    const int32_t b = block_ids[blk];
    if (b < 0) return false;
    const int64_t src = (int64_t)(t * pool.heads + h) * pool.row;
    const int64_t dst = k_row(pool, b, h, off);
    r = Rows{k + src, v + src, pool.base + dst, pool.base + dst + pool.v_off};
    return true;
  }
};

/* Pool -> table range: the inverse of WriteRangeOp. */
struct ReadRangeOp {
  Pool pool;
  const int32_t *block_ids;
  uint64_t first;
  char *k, *v;
  __device__ bool operator()(uint64_t t, uint64_t h, Rows &r) const {
    uint64_t blk, off;
    divmod(first + t, pool.block_size, blk, off);
    const int32_t b = block_ids[blk];
    if (b < 0) return false;
    const int64_t src = k_row(pool, b, h, off);
    const int64_t dst = (int64_t)(t * pool.heads + h) * pool.row;
    r = Rows{pool.base + src, pool.base + src + pool.v_off, k + dst, v + dst};
    return true;
  }
};

/* Decode write: row b of the plan gets token b of k/v at slot len - 1. */
struct PlanWriteOp {
  Pool pool;
  const int32_t *row_offset; /* this layer's */
  const int32_t *base_len;   /* this layer's */
  const int32_t *n_appended;
  const int32_t *block_ids; /* this layer's */
  int64_t block_cap;
  const char *k, *v;
  __device__ bool operator()(uint64_t t, uint64_t h, Rows &r) const {
    const int64_t len = (int64_t)base_len[t] + n_appended[t];
    if (len <= 0) return false;
    uint64_t blk, off;
    divmod((uint64_t)(len - 1), pool.block_size, blk, off);
    /* A malformed row must not send the write outside the id array. */
    const int64_t at = (int64_t)row_offset[t] + (int64_t)blk;
    if (row_offset[t] < 0 || at >= block_cap) return false;
    const int32_t b = block_ids[at];
    if (b < 0) return false;
    const int64_t src = (int64_t)(t * pool.heads + h) * pool.row;
    const int64_t dst = k_row(pool, b, h, off);
    r = Rows{k + src, v + src, pool.base + dst, pool.base + dst + pool.v_off};
    return true;
  }
};

/* Compaction: token t moves from pool slot src_slots[t] to slot t of the
 * fresh dst_blocks run. */
struct GatherOp {
  Pool pool;
  const int64_t *src_slots;
  const int32_t *dst_blocks;
  __device__ bool operator()(uint64_t t, uint64_t h, Rows &r) const {
    const int64_t slot = src_slots[t];
    if (slot < 0) return false;
    uint64_t sblk, soff, dblk, doff;
    divmod((uint64_t)slot, pool.block_size, sblk, soff);
    divmod(t, pool.block_size, dblk, doff);
    const int32_t d = dst_blocks[dblk];
    if (d < 0 || sblk > 0x7fffffffu) return false;
    const int64_t src = k_row(pool, (int32_t)sblk, h, soff);
    const int64_t dst = k_row(pool, d, h, doff);
    r = Rows{pool.base + src, pool.base + src + pool.v_off, pool.base + dst,
             pool.base + dst + pool.v_off};
    return true;
  }
};

/* Grid-stride over n_units * heads * vecs_per_row vectors; consecutive
 * threads take consecutive vectors of a row, so each warp's accesses are
 * contiguous runs of whole rows. */
template <typename VT, typename Op>
__global__ void __launch_bounds__(kThreads)
    copy_rows_kernel(const Op op, uint64_t n_units, uint64_t heads,
                     uint64_t vecs_per_row) {
  const uint64_t per_unit = heads * vecs_per_row;
  const uint64_t total = n_units * per_unit;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
       i + PVLK_MUTANT(6) < total; i += stride) {
    uint64_t t, rem, h, col;
    divmod(i, per_unit, t, rem);
    divmod(rem, vecs_per_row, h, col);
    Rows r;
    if (!op(t, h, r)) continue;
    const VT kx = reinterpret_cast<const VT *>(r.src_k)[col];
    const VT vx = reinterpret_cast<const VT *>(r.src_v)[col];
    reinterpret_cast<VT *>(r.dst_k)[col] = kx;
    reinterpret_cast<VT *>(r.dst_v)[col] = vx;
  }
}

template <typename Op>
pvl_status launch_rows(const Op &op, uint64_t n_units, const PoolBytes &pb,
                       uint64_t heads, uint64_t align_bits,
                       cudaStream_t stream) {
  const int w = pvlk::vec_bytes_for(align_bits | (uint64_t)pb.row);
  const uint64_t vpr = (uint64_t)pb.row / (uint64_t)w;
  /* n_units < 2^32 and heads * vpr <= 2^29 keep the flat index below 2^61;
   * real shapes are many orders of magnitude smaller. */
  if (heads * vpr > ((uint64_t)1 << 29)) return PVL_ERR_INVALID_ARGUMENT;
  const unsigned grid = grid_for(n_units * heads * vpr);
  PVLK_DISPATCH_VEC(w, VT,
                    PVLK_LAUNCH((copy_rows_kernel<VT, Op>), grid, kThreads, 0,
                                stream, op, n_units, heads, vpr));
  return pvlk::launch_status();
}

/* ---- whole blocks ------------------------------------------------------- */

template <typename VT>
__global__ void __launch_bounds__(kThreads)
    copy_blocks_kernel(char *base, int64_t block_bytes, const int32_t *src,
                       const int32_t *dst, uint64_t n,
                       uint64_t vecs_per_block) {
  const uint64_t total = n * vecs_per_block;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    uint64_t j, col;
    divmod(i, vecs_per_block, j, col);
    const int32_t s = src[j], d = dst[j];
    if (s < 0 || d < 0) continue;
    const VT *from =
        reinterpret_cast<const VT *>(base + (int64_t)s * block_bytes);
    VT *to = reinterpret_cast<VT *>(base + (int64_t)d * block_bytes);
    to[col] = from[col];
  }
}

uint64_t addr(const void *p) { return (uint64_t)(uintptr_t)p; }

/* ---- plan ---------------------------------------------------------------- */

__global__ void __launch_bounds__(kThreads)
    plan_scatter_kernel(int32_t *buf, const int32_t *pairs, uint32_t n) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t idx = pairs[2 * (uint64_t)i];
    /* Negative indices are padding the host may leave in a fixed-size
     * upload; they name no element. */
    if (idx >= 0) buf[idx] = pairs[2 * (uint64_t)i + 1];
  }
}

} // namespace

/* ---- launchers ----------------------------------------------------------- */

pvl_status pvlk_plan_scatter(int32_t *plan_buf, const int32_t *pairs,
                             uint32_t n, void *stream) {
  if (n == 0) return PVL_SUCCESS;
  if (plan_buf == nullptr || pairs == nullptr) return PVL_ERR_INVALID_ARGUMENT;
  PVLK_LAUNCH((plan_scatter_kernel), grid_for(n), kThreads, 0,
              static_cast<cudaStream_t>(stream), plan_buf, pairs, n);
  return pvlk::launch_status();
}

pvl_status pvlk_kv_write_range(void *storage, const pvl_kv_geom *g,
                               const int32_t *block_ids, uint32_t first,
                               uint32_t n, const void *k, const void *v,
                               void *stream) {
  if (n == 0) return PVL_SUCCESS;
  PoolBytes pb;
  const pvl_status st = pvlk::check_geom(g, &pb);
  if (st != PVL_SUCCESS) return st;
  if (storage == nullptr || block_ids == nullptr || k == nullptr ||
      v == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  const WriteRangeOp op{make_pool(storage, pb, g), block_ids, first,
                        static_cast<const char *>(k),
                        static_cast<const char *>(v)};
  return launch_rows(op, n, pb, (uint64_t)g->num_kv_heads,
                     addr(storage) | addr(k) | addr(v),
                     static_cast<cudaStream_t>(stream));
}

pvl_status pvlk_kv_read_range(const void *storage, const pvl_kv_geom *g,
                              const int32_t *block_ids, uint32_t first,
                              uint32_t n, void *k, void *v, void *stream) {
  if (n == 0) return PVL_SUCCESS;
  PoolBytes pb;
  const pvl_status st = pvlk::check_geom(g, &pb);
  if (st != PVL_SUCCESS) return st;
  if (storage == nullptr || block_ids == nullptr || k == nullptr ||
      v == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  /* The pool is only read here; Pool carries a mutable base because the
   * other ops write through it. */
  const ReadRangeOp op{make_pool(const_cast<void *>(storage), pb, g), block_ids,
                       first, static_cast<char *>(k), static_cast<char *>(v)};
  return launch_rows(op, n, pb, (uint64_t)g->num_kv_heads,
                     addr(storage) | addr(k) | addr(v),
                     static_cast<cudaStream_t>(stream));
}

pvl_status pvlk_plan_kv_write(void *storage, const pvl_kv_geom *g,
                              const pvl_plan_view *plan, int32_t layer,
                              const void *k, const void *v, void *stream) {
  PoolBytes pb;
  const pvl_status st = pvlk::check_geom(g, &pb);
  if (st != PVL_SUCCESS) return st;
  if (plan == nullptr || plan->buf == nullptr || plan->num_layers < 1 ||
      plan->max_seqs < 0 || plan->n_seqs < 0 || plan->n_seqs > plan->max_seqs ||
      plan->block_cap < 0 || layer < 0 || layer >= plan->num_layers)
    return PVL_ERR_INVALID_ARGUMENT;
  if (plan->n_seqs == 0) return PVL_SUCCESS;
  if (storage == nullptr || k == nullptr || v == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  const int32_t *buf = plan->buf;
  const PlanWriteOp op{make_pool(storage, pb, g),
                       buf + pvl_plan_row_offset_index(plan, layer, 0),
                       buf + pvl_plan_base_len_index(plan, layer, 0),
                       buf + pvl_plan_n_appended_index(plan, 0),
                       buf + pvl_plan_block_ids_index(plan, layer),
                       plan->block_cap,
                       static_cast<const char *>(k),
                       static_cast<const char *>(v)};
  return launch_rows(op, (uint64_t)plan->n_seqs, pb, (uint64_t)g->num_kv_heads,
                     addr(storage) | addr(k) | addr(v),
                     static_cast<cudaStream_t>(stream));
}

pvl_status pvlk_copy_blocks(void *storage, const pvl_kv_geom *g,
                            const int32_t *src, const int32_t *dst, uint32_t n,
                            void *stream) {
  if (n == 0) return PVL_SUCCESS;
  PoolBytes pb;
  const pvl_status st = pvlk::check_geom(g, &pb);
  if (st != PVL_SUCCESS) return st;
  if (storage == nullptr || src == nullptr || dst == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  const int w = pvlk::vec_bytes_for(addr(storage) | (uint64_t)pb.block);
  const uint64_t vpb = (uint64_t)pb.block / (uint64_t)w;
  char *base = static_cast<char *>(storage);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = grid_for((uint64_t)n * vpb);
  PVLK_DISPATCH_VEC(w, VT,
                    PVLK_LAUNCH((copy_blocks_kernel<VT>), grid, kThreads, 0, s,
                                base, pb.block, src, dst, (uint64_t)n, vpb));
  return pvlk::launch_status();
}

pvl_status pvlk_gather_slots(void *storage, const pvl_kv_geom *g,
                             const int64_t *src_slots,
                             const int32_t *dst_blocks, uint32_t n,
                             void *stream) {
  if (n == 0) return PVL_SUCCESS;
  PoolBytes pb;
  const pvl_status st = pvlk::check_geom(g, &pb);
  if (st != PVL_SUCCESS) return st;
  if (storage == nullptr || src_slots == nullptr || dst_blocks == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  const GatherOp op{make_pool(storage, pb, g), src_slots, dst_blocks};
  return launch_rows(op, n, pb, (uint64_t)g->num_kv_heads, addr(storage),
                     static_cast<cudaStream_t>(stream));
}

/* The per-thread record of common.cuh lives in every kernel translation
 * unit (an inline variable); the C accessor needs one home, and this file
 * is always built. */
int pvlk_last_cuda_error(void) {
  const int e = pvlk::last_cuda_error;
  pvlk::last_cuda_error = 0;
  return e;
}
