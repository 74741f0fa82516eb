/* Decode attention over the paged pool (templates; launchers in
 * attention_decode.cu). A one-CTA planning kernel cuts the rows into work
 * items (a row, or a range of whole blocks of a long row) from the rows'
 * real lengths; one CTA per (work item, KV head, group chunk) reads each K/V
 * tile once for all query heads of its GQA group; a third kernel merges the
 * items (splits) of rows that were cut. */
#ifndef PVL_KERNELS_ATTENTION_DECODE_CUH
#define PVL_KERNELS_ATTENTION_DECODE_CUH

#include <limits.h>

#include "common.cuh"

namespace pvlk {
namespace decode {

/* ---- tuning ----------------------------------------------------------------
 * A CTA is 4 warps. Each warp streams its own tiles of K/V (4 KB: K and V of
 * 4096 / (4 * head_dim) tokens) through a 3-stage cp.async ring in shared
 * memory and keeps its own online-softmax state, so the main loop needs no
 * CTA barrier; the warps merge once at the end. */
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = 3;
constexpr int kTileBytes = 4096;
/* Query heads one CTA holds; larger GQA groups take several CTAs per KV head
 * (each re-reads K/V). */
constexpr int kMaxGroup = 8;
/* Split-K, planned on the device from the real lengths (plan_kernel): a
 * row longer than the chunk is cut into equal ranges of whole blocks, the
 * chunk being the batch's total work over kTailFactor * kSlotsPerSm CTAs
 * per SM, so that no item is longer than about half of what a CTA slot
 * does in a balanced schedule: one long row among short ones then no longer
 * runs alone on a few CTAs after the rest has finished. Never more than
 * kMaxSplits splits of a row (one per lane in the combine kernel), never
 * fewer than kMinSplitTokens tokens per split. */
constexpr int kMaxSplits = 32;
constexpr int kSlotsPerSm = 2;
constexpr int kTailFactor = 2;
constexpr int kMinSplitTokens = 128;
/* The planning kernel: one CTA of kPlanThreads over all rows. */
constexpr int kPlanThreads = 256;

struct Params {
  const char *storage;
  int64_t block_bytes;
  int64_t v_off; /* K row -> V row of the same (head, slot) */
  /* The plan arrays of this layer (n_appended is shared by all layers). */
  const int32_t *row_offset, *base_len, *n_appended, *block_ids;
  const void *q;
  void *out;
  /* Partial states of split rows: row b's (query head h, split s) is slot
   * row_split[b].y * num_q_heads + h * row_split[b].x + s, ws_cap *
   * num_q_heads slots in all. */
  float *ws_acc; /* [slots][head_dim], unnormalized */
  float2 *ws_ml; /* [slots] (max, sum), log2 units */
  /* Written by plan_kernel in the workspace: the work list, items with
   * split rows' items first, [items_cap][4] = (row, first block, blocks,
   * split index); per row [n_seqs][2] = (splits, first split slot); the
   * number of items. */
  int32_t *work, *row_split, *n_items;
  float qscale; /* scale * log2(e): scores live in the exp2 domain */
  int n_seqs, num_q_heads, num_kv_heads, group, chunks;
  /* Capacities the grid and the workspace were sized for (never from
   * lengths: a captured graph replays across steps): split items in all,
   * and CTA slots the chunk size aims at (kTailFactor * kSlotsPerSm * SMs). */
  int ws_cap, work_slots;
  int block_size, log_block, min_chunk_blocks;
};

__host__ __device__ constexpr int ilog2(int x) {
  return x <= 1 ? 0 : 1 + ilog2(x / 2);
}
__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }

/* Thread layout of one warp over a tile, for HD and GMAX query heads.
 * A lane holds 8 dims (one 16-byte vector) of a K/V row: kTpr lanes cover a
 * row, so a warp covers kRpw rows per vector step and lane (r, c) handles the
 * tile's rows i * kRpw + r, i < kNt, at columns 8c..8c+7. Its kM partial dot
 * products (head g, row i at index g * kNt + i) are reduced across the kTpr
 * lanes of the row by a transposing butterfly: after it, lane c holds kMp
 * complete scores, indices (c / kDup) * kMp + j, and the kLph lanes with the
 * same c / kDup / kLph together hold one head's kNt scores. */
template <int HD, int GMAX> struct Shape {
  static constexpr int kTpr = HD / 8;
  static constexpr int kRpw = 32 / kTpr;
  /* Tokens per tile: K and V rows of HD 2-byte elements. */
  static constexpr int kTile = kTileBytes / (4 * HD);
  static constexpr int kNt = kTile / kRpw;
  static constexpr int kM = kNt * GMAX;
  static constexpr int kSteps = cmin(ilog2(kTpr), ilog2(kM)); /* transposing */
  static constexpr int kDup = kTpr >> kSteps; /* lanes holding equal values */
  static constexpr int kMp = kM >> kSteps;
  static constexpr int kLph = kNt / kMp;

  /* Per warp: the stage ring, then softmax weights p [2][kRpw][kM] and
   * rescale factors [2][kRpw][GMAX], double-buffered by tile parity. */
  static constexpr int kPBufFloats = 2 * kRpw * kM;
  static constexpr int kABufFloats = 2 * kRpw * GMAX;
  static constexpr int kRegion =
      (kStages * kTileBytes + 4 * (kPBufFloats + kABufFloats) + 15) / 16 * 16;
  static constexpr int kSmem = kWarps * kRegion;
  /* After its loop a warp stores acc [kRpw][GMAX][HD], m and l [kRpw][GMAX]
   * over its own stage ring. */
  static constexpr int kMergeFloats = kRpw * GMAX * HD + 2 * kRpw * GMAX;

  static_assert(HD % 64 == 0 && HD <= 256, "head_dim 64, 128 or 256");
  static_assert(kNt == 4, "p is read back as one float4 per head");
  static_assert(kMp <= kNt && kNt % kMp == 0,
                "a lane's scores belong to one head");
  static_assert(4 * kMergeFloats <= kStages * kTileBytes,
                "merge data fits the ring");
};

/* Tokens of plan row b in this layer. */
__device__ __forceinline__ int row_len(const Params &p, int b) {
  const int64_t len = (int64_t)p.base_len[b] + p.n_appended[b];
  /* Clamped so that rounding up to whole blocks cannot overflow int. */
  return len <= 0 ? 0 : (int)(len < INT_MAX / 2 ? len : INT_MAX / 2);
}

__device__ __forceinline__ int block_count(int len, const Params &p) {
  return (len >> p.log_block) + ((len & (p.block_size - 1)) != 0);
}

/* Splits of a row of nblk blocks for a chunk of `chunk` blocks: rows that
 * fit (empty ones included) stay whole. */
__device__ __forceinline__ int row_splits(int nblk, int64_t chunk) {
  return nblk <= chunk ? 1 : (int)((nblk + chunk - 1) / chunk);
}

/* Sum or max over the planning CTA; every thread gets the result. */
template <bool MAX>
__device__ __forceinline__ long long plan_reduce(long long v,
                                                 long long *scratch) {
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) {
    const long long y = __shfl_xor_sync(kFullMask, v, o);
    v = MAX ? (y > v ? y : v) : v + y;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  long long r = scratch[0];
  for (int w = 1; w < kPlanThreads / 32; ++w)
    r = MAX ? (scratch[w] > r ? scratch[w] : r) : r + scratch[w];
  __syncthreads(); /* scratch is reused by the next call */
  return r;
}

/* Plans one layer's decode attention from the rows' lengths on the device
 * (they change between replays of a captured graph): picks the chunk, cuts
 * the rows longer than it into equal ranges of whole blocks and writes the
 * work list, split rows' items first (the hardware starts CTAs roughly in
 * index order, so the long items start early instead of forming the tail). */
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const Params p) {
  __shared__ long long scratch[kPlanThreads / 32];
  const int per = p.num_kv_heads * p.chunks; /* CTAs per item */
  long long total = 0, longest = 0;
  for (int b = threadIdx.x; b < p.n_seqs; b += kPlanThreads) {
    const int n = block_count(row_len(p, b), p);
    total += n;
    if (n > longest) longest = n;
  }
  total = plan_reduce<false>(total, scratch);
  longest = plan_reduce<true>(longest, scratch);

  int64_t chunk = (total * per + p.work_slots - 1) / p.work_slots;
  if (chunk < p.min_chunk_blocks) chunk = p.min_chunk_blocks;
  if (chunk < (longest + kMaxSplits - 1) / kMaxSplits)
    chunk = (longest + kMaxSplits - 1) / kMaxSplits;
  if (chunk < 1) chunk = 1;
  if (PVLK_MUTANT(10)) chunk = longest > 0 ? longest : 1; /* never cuts */
  /* Split items: a split row has more than `chunk` blocks, so there are
   * fewer than total / chunk <= work_slots / per of them, and its
   * ceil(nblk / chunk) <= nblk / chunk + 1 items sum to at most
   * 2 * work_slots / per (and at most kMaxSplits per row): the launcher's
   * ws_cap. The loop only guards that bound against a slip, so that an
   * item never lands past the workspace: a larger chunk means fewer
   * splits, and a chunk of `longest` none. */
  long long split_items;
  for (;;) {
    long long mine = 0;
    for (int b = threadIdx.x; b < p.n_seqs; b += kPlanThreads) {
      const int s = row_splits(block_count(row_len(p, b), p), chunk);
      if (s > 1) mine += s;
    }
    split_items = plan_reduce<false>(mine, scratch);
    if (split_items <= p.ws_cap) break;
    chunk *= 2;
  }

  /* Exclusive scan of (split items, whole rows) over the rows, kPlanThreads
   * rows at a time; split items go first, whole rows after them. */
  __shared__ long long warp_sum[kPlanThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  long long base_split = 0, base_whole = PVLK_MUTANT(9) ? 0 : split_items;
  for (int b0 = 0; b0 < p.n_seqs; b0 += kPlanThreads) {
    const int b = b0 + threadIdx.x;
    int nblk = 0, s = 0;
    if (b < p.n_seqs) {
      nblk = block_count(row_len(p, b), p);
      s = row_splits(nblk, chunk);
    }
    /* (split items << 32) | whole rows: both stay far below 2^31. */
    const long long v =
        b < p.n_seqs ? (s > 1 ? (long long)s << 32 : 1ll) : 0ll;
    long long x = v;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const long long y = __shfl_sync(kFullMask, x, lane >= o ? lane - o : 0);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_sum[warp] = x;
    __syncthreads();
    long long before = 0, all = 0;
    for (int w = 0; w < kPlanThreads / 32; ++w) {
      if (w < warp) before += warp_sum[w];
      all += warp_sum[w];
    }
    __syncthreads(); /* warp_sum is rewritten by the next round */
    const long long ex = before + x - v;
    if (b < p.n_seqs) {
      int32_t *rs = p.row_split + 2 * (int64_t)b;
      if (s > 1) {
        const long long first = base_split + (ex >> 32);
        rs[0] = s;
        rs[1] = (int32_t)first;
        for (int i = 0; i < s; ++i) {
          const int lo = (int)((int64_t)i * nblk / s);
          const int hi = (int)((int64_t)(i + 1) * nblk / s) -
                         (int)(PVLK_MUTANT(8) && i == s - 1);
          int32_t *w = p.work + 4 * (first + i);
          w[0] = b;
          w[1] = lo;
          w[2] = hi - lo;
          w[3] = i;
        }
      } else {
        rs[0] = 1;
        rs[1] = 0;
        int32_t *w = p.work + 4 * (base_whole + (ex & 0xffffffffll));
        w[0] = b;
        w[1] = 0;
        w[2] = nblk;
        w[3] = 0;
      }
    }
    base_split += all >> 32;
    base_whole += all & 0xffffffffll;
  }
  if (threadIdx.x == 0) *p.n_items = (int32_t)base_whole;
}

/* Reduces SZ values per lane across the lanes of an O*2-wide group: at each
 * step a lane keeps one half of its values (by its lane bit O), receives the
 * partner's copy of that half and adds, so the work halves every step
 * instead of repeating a full butterfly per value. Once one value is left
 * the remaining steps are an ordinary butterfly. */
template <int O, int SZ>
__device__ __forceinline__ void transpose_reduce(float *v, int c) {
  if constexpr (O >= 1) {
    if constexpr (SZ > 1) {
      const bool upper = (c & O) != 0;
#pragma unroll
      for (int j = 0; j < SZ / 2; ++j) {
        const float send = upper ? v[j] : v[j + SZ / 2];
        const float keep = upper ? v[j + SZ / 2] : v[j];
        v[j] = keep + __shfl_xor_sync(kFullMask, send, O);
      }
      transpose_reduce<O / 2, SZ / 2>(v, c);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], O);
      transpose_reduce<O / 2, 1>(v, c);
    }
  }
}

template <typename T, int HD, int GMAX>
__global__ void __launch_bounds__(kThreads, GMAX >= 8 ? 2 : 4)
    decode_kernel(const Params p) {
  using S = Shape<HD, GMAX>;
  constexpr int TPR = S::kTpr, RPW = S::kRpw, NT = S::kNt, M = S::kM,
                TT = S::kTile;
  constexpr int DUP = S::kDup, MP = S::kMp, LPH = S::kLph;
  constexpr int ROW = HD * 2; /* bytes of one K or V row */

  PVLK_DYNAMIC_SMEM(smem);
  __shared__ float fac[kWarps * RPW][GMAX];
  __shared__ float head_m[GMAX], head_l[GMAX];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / TPR, c = lane % TPR;
  /* Scores this lane owns after the reduction: head g_own, tile rows
   * (i_own + j) * RPW + r for j < MP. */
  const int grp = c / DUP;
  const int g_own = grp / LPH;
  const int i_own = (grp % LPH) * MP;
  const bool p_writer = (c % DUP) == 0;
  const bool head_writer = p_writer && (grp % LPH) == 0;

  /* The grid covers the capacity; CTAs past the planned items have none. */
  int x = blockIdx.x;
  const int chunk = x % p.chunks;
  x /= p.chunks;
  const int kvh = x % p.num_kv_heads;
  const int item = x / p.num_kv_heads;
  if (item >= *p.n_items) return;
  const int32_t *work = p.work + 4 * (int64_t)item;
  const int b = work[0], blk_begin = work[1], item_blocks = work[2],
            split = work[3];
  const int nsplit = p.row_split[2 * (int64_t)b];
  const int len = row_len(p, b);

  const int g0 = chunk * kMaxGroup;
  const int gcount = cmin(GMAX, p.group - g0);
  const int64_t qrow0 =
      (int64_t)b * p.num_q_heads + (int64_t)kvh * p.group + g0;
  T *out = static_cast<T *>(p.out);

  if (item_blocks == 0) {
    /* An empty row is one item (never split): its zeros are written here. */
    for (int v = threadIdx.x; v < gcount * TPR; v += kThreads)
      *reinterpret_cast<uint4 *>(out + (qrow0 + v / TPR) * HD +
                                 (v % TPR) * 8) = make_uint4(0, 0, 0, 0);
    return;
  }

  const int blk_end = blk_begin + item_blocks;
  const int tb = blk_begin << p.log_block;
  const int te = (int)min((int64_t)len, (int64_t)blk_end << p.log_block);
  const int ntiles = (te - tb + TT - 1) / TT;
  const int my_tiles = warp < ntiles ? (ntiles - 1 - warp) / kWarps + 1 : 0;
  /* TT divides block_size, so a tile never straddles blocks (or splits). */
  const int log_tpb = p.log_block - ilog2(TT);

  /* q of the group, pre-scaled into the exp2 domain; heads past gcount are
   * zero and their results are never stored. */
  float qf[GMAX][8];
  {
    const T *q = static_cast<const T *>(p.q);
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < gcount) {
        const uint4 raw =
            __ldg(reinterpret_cast<const uint4 *>(q + (qrow0 + g) * HD) + c);
        unpack8<T>(raw, qf[g]);
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[g][e] *= p.qscale;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[g][e] = 0.f;
      }
    }
  }

  unsigned char *region = smem + warp * S::kRegion;
  const uint32_t ring = smem_addr(region) + lane * 16;
  float *pbuf = reinterpret_cast<float *>(region + kStages * kTileBytes);
  float *abuf = pbuf + S::kPBufFloats;

  const char *lane_base =
      p.storage + (int64_t)kvh * p.block_size * ROW + r * ROW + c * 16;
  const int32_t *bids = p.block_ids + p.row_offset[b];

  /* Block ids of the warp's next 32 tiles, one per lane, so the id lookup
   * costs one dependent load per 32 tiles instead of one per tile. */
  int bid_pref = -1;
  auto issue = [&](int k) {
    if (k < my_tiles) {
      if ((k & 31) == 0) {
        const int t = warp + kWarps * (k + lane);
        bid_pref = t < ntiles ? bids[blk_begin + (t >> log_tpb)] : -1;
      }
      const int bid = __shfl_sync(kFullMask, bid_pref, k & 31);
      const int t = warp + kWarps * k;
      const int valid = te - (tb + t * TT);
      const int64_t off = bid >= 0 ? (int64_t)bid * p.block_bytes : 0;
      const char *src =
          lane_base + off + (int64_t)((t & ((1 << log_tpb) - 1)) * TT) * ROW;
      const uint32_t dst = ring + (k % kStages) * kTileBytes;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        /* Slots past the row's end (partial last block) are zero-filled:
         * their contents are undefined and 0 * NaN would poison acc. */
        const bool ok = bid >= 0 && i * RPW + r < valid;
        const char *ks = ok ? src + i * RPW * ROW : p.storage;
        cp_async16(dst + i * 512, ks, ok);
        cp_async16(dst + (NT + i) * 512, ok ? ks + p.v_off : p.storage, ok);
      }
    }
    /* Empty groups keep the wait_group arithmetic uniform. */
    cp_async_commit();
  };

  float acc[GMAX][8];
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  float m_run = neg_inf(), l_run = 0.f; /* of head g_own over this row group */

#pragma unroll
  for (int k = 0; k < kStages - 1; ++k) issue(k);

  for (int k = 0; k < my_tiles; ++k) {
    /* Refills the stage read in iteration k-1. Each lane reads back only the
     * vectors it copied itself, and has consumed them before issuing, so the
     * ring needs no barrier, only this thread's wait_group. */
    issue(k + kStages - 1);
    if (PVLK_MUTANT(2))
      cp_async_wait<kStages>();
    else
      cp_async_wait<kStages - 1>();
    const uint4 *ks =
        reinterpret_cast<const uint4 *>(region + (k % kStages) * kTileBytes) +
        lane;
    const uint4 *vs = ks + NT * 32;

    float s[M];
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      float kf[8];
      unpack8<T>(ks[i * 32], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
        s[g * NT + i] = d;
      }
    }
    transpose_reduce<TPR / 2, M>(s, c);

    /* Online softmax of this row group's share of head g_own. */
    const int valid = te - (tb + (warp + kWarps * k) * TT);
    float mt = neg_inf();
#pragma unroll
    for (int j = 0; j < MP; ++j) {
      if ((i_own + j) * RPW + r >= valid + (int)PVLK_MUTANT(1))
        s[j] = neg_inf();
      mt = fmaxf(mt, s[j]);
    }
#pragma unroll
    for (int o = DUP; o < DUP * LPH; o *= 2)
      mt = fmaxf(mt, __shfl_xor_sync(kFullMask, mt, o));
    const float m_new = fmaxf(m_run, mt);
    /* Until a row group has seen a token its max is -inf; subtracting 0
     * instead keeps exp2 at 0 rather than NaN. */
    const float m_use = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < MP; ++j) {
      s[j] = exp2f(s[j] - m_use);
      psum += s[j];
    }
    l_run = l_run * alpha + psum;
    m_run = m_new;

    /* Every lane of the row group needs every p and every head's rescale
     * factor: publish them through shared memory. The two parities keep
     * this tile's writes clear of the previous tile's reads. */
    float *pb = pbuf + ((k & 1) * RPW + r) * M;
    float *ab = abuf + ((k & 1) * RPW + r) * GMAX;
    if (p_writer) {
#pragma unroll
      for (int j = 0; j < MP; ++j) pb[grp * MP + j] = s[j];
      if (head_writer) ab[g_own] = alpha;
    }
    __syncwarp();

    /* Once the running maxima settle, most tiles change none of them
     * (alpha == 1 exactly): skip the rescale then. */
    if (__any_sync(kFullMask, alpha != 1.f)) {
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        const float a = ab[g];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] *= a;
      }
    }
    float pr[GMAX][NT];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float4 p4 = *reinterpret_cast<const float4 *>(pb + g * NT);
      pr[g][0] = p4.x;
      pr[g][1] = p4.y;
      pr[g][2] = p4.z;
      pr[g][3] = p4.w;
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      float vf[8];
      unpack8<T>(vs[i * 32], vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e)
          acc[g][e] = fmaf(pr[g][i], vf[e], acc[g][e]);
    }
  }

  /* ---- merge the kWarps * RPW partial states of the CTA ---- */
  cp_async_wait<0>();
  /* the ring is reused below; all lanes are done reading it */
  if (!PVLK_MUTANT(4)) __syncwarp();
#pragma unroll
  for (int o = DUP; o < DUP * LPH; o *= 2)
    l_run += __shfl_xor_sync(kFullMask, l_run, o);
  {
    float *macc = reinterpret_cast<float *>(region);
    float *mm = macc + RPW * GMAX * HD;
    float *ml = mm + RPW * GMAX;
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float4 *d =
          reinterpret_cast<float4 *>(macc + (r * GMAX + g) * HD + c * 8);
      d[0] = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      d[1] = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
    }
    if (head_writer) {
      mm[r * GMAX + g_own] = m_run;
      ml[r * GMAX + g_own] = l_run;
    }
  }
  if (!PVLK_MUTANT(3)) __syncthreads();

  if (threadIdx.x < GMAX) {
    const int g = threadIdx.x;
    float mx = neg_inf();
    for (int w = 0; w < kWarps; ++w) {
      const float *mm = reinterpret_cast<const float *>(smem + w * S::kRegion) +
                        RPW * GMAX * HD;
      for (int rr = 0; rr < RPW; ++rr) mx = fmaxf(mx, mm[rr * GMAX + g]);
    }
    const float mu = mx == neg_inf() ? 0.f : mx;
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float *mm = reinterpret_cast<const float *>(smem + w * S::kRegion) +
                        RPW * GMAX * HD;
      const float *ml = mm + RPW * GMAX;
      for (int rr = 0; rr < RPW; ++rr) {
        const float f = exp2f(mm[rr * GMAX + g] - mu);
        fac[w * RPW + rr][g] = f;
        l += f * ml[rr * GMAX + g];
      }
    }
    head_m[g] = mx;
    head_l[g] = l;
  }
  __syncthreads();

  for (int v = threadIdx.x; v < gcount * TPR; v += kThreads) {
    const int g = v / TPR, cc = v % TPR;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float *macc =
          reinterpret_cast<const float *>(smem + w * S::kRegion);
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) {
        const float f = fac[w * RPW + rr][g];
        const float4 *src = reinterpret_cast<const float4 *>(
            macc + (rr * GMAX + g) * HD + cc * 8);
        const float4 a = src[0], bb = src[1];
        o[0] += f * a.x;
        o[1] += f * a.y;
        o[2] += f * a.z;
        o[3] += f * a.w;
        o[4] += f * bb.x;
        o[5] += f * bb.y;
        o[6] += f * bb.z;
        o[7] += f * bb.w;
      }
    }
    const int64_t row = qrow0 + g;
    if (nsplit == 1) {
      const float inv = head_l[g] > 0.f ? 1.f / head_l[g] : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] *= inv;
      *reinterpret_cast<uint4 *>(out + row * HD + cc * 8) = pack8<T>(o);
    } else {
      const int64_t slot =
          (int64_t)p.row_split[2 * (int64_t)b + 1] * p.num_q_heads +
          (row - (int64_t)b * p.num_q_heads) * nsplit + split;
      float4 *d = reinterpret_cast<float4 *>(p.ws_acc + slot * HD + cc * 8);
      d[0] = make_float4(o[0], o[1], o[2], o[3]);
      d[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (cc == 0) p.ws_ml[slot] = make_float2(head_m[g], head_l[g]);
    }
  }
}

/* One warp per (row, query head): log-sum-exp merge of the splits of a row
 * that was cut; the decode kernel stored every other row itself (empty
 * rows are never cut). */
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
  constexpr int EPL = HD / 32; /* dims per lane */
  const int lane = threadIdx.x % 32;
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= (int64_t)p.n_seqs * p.num_q_heads) return;
  const int b = (int)(row / p.num_q_heads);
  const int eff = p.row_split[2 * (int64_t)b];
  if (eff <= 1) return;

  float o[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) o[e] = 0.f;
  {
    const int64_t slot0 =
        (int64_t)p.row_split[2 * (int64_t)b + 1] * p.num_q_heads +
        (row - (int64_t)b * p.num_q_heads) * eff;
    const float2 ml =
        lane < eff ? p.ws_ml[slot0 + lane] : make_float2(neg_inf(), 0.f);
    float mx = ml.x;
#pragma unroll
    for (int off = 16; off >= 1; off /= 2)
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
    const float mu = mx == neg_inf() ? 0.f : mx;
    const float w = lane < eff ? exp2f(ml.x - mu) : 0.f;
    float l = w * ml.y;
#pragma unroll
    for (int off = 16; off >= 1; off /= 2)
      l += __shfl_xor_sync(kFullMask, l, off);

    const float *acc = p.ws_acc + slot0 * HD + lane * EPL;
#pragma unroll 4
    for (int s = 0; s < eff - (int)PVLK_MUTANT(7); ++s) {
      const float ws = __shfl_sync(kFullMask, w, s);
      const float *src = acc + (int64_t)s * HD;
      if constexpr (EPL == 2) {
        const float2 a = *reinterpret_cast<const float2 *>(src);
        o[0] += ws * a.x;
        o[1] += ws * a.y;
      } else {
#pragma unroll
        for (int e = 0; e < EPL; e += 4) {
          const float4 a = *reinterpret_cast<const float4 *>(src + e);
          o[e] += ws * a.x;
          o[e + 1] += ws * a.y;
          o[e + 2] += ws * a.z;
          o[e + 3] += ws * a.w;
        }
      }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) o[e] *= inv;
  }
  store_floats<T, EPL>(static_cast<T *>(p.out) + row * HD + lane * EPL, o);
}

} // namespace decode
} // namespace pvlk

#endif /* PVL_KERNELS_ATTENTION_DECODE_CUH */
