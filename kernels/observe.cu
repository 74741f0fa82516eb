/* Observation kernels (docs/design.md section 5) and their launcher: per (row,
 * query head) softmax statistics against a paged K table (pass 1), then per
 * key attention sums, seen counts and per head threshold counts (pass 2).
 * Owns pvlk_observe and pvlk_observe_workspace_bytes. */
#include <math.h>

#include <type_traits>

#include "common.cuh"

namespace {

/* ---- shapes ----------------------------------------------------------------
 * Both passes multiply on the tensor cores (mma.m16n8k16, fp32 accumulate)
 * with the query heads of a GQA group flattened into "M-rows": M-row f of a
 * KV head is (row f >> gsh, head f & (GP - 1)) where GP is the group size
 * rounded up to a power of two (padded heads are masked). Because GP divides
 * 8, the head of every accumulator element a lane owns is fixed for the whole
 * kernel, so per head counters are plain registers.
 *
 * Pass 1: a CTA holds 64 M-rows (16 per warp, their Q fragments live in
 * registers) and streams key tiles through a 2-stage cp.async ring; several
 * CTAs may split the keys of one row tile, merged by a combine kernel.
 * Pass 2: a CTA holds 64 keys (16 per warp, K fragments in registers) and
 * streams tiles of M-rows (Q and the pass 1 statistics) the same way; the
 * per key sums stay in registers until one atomicAdd per key per CTA. */
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr uint32_t kNoKey = 0xffffffffu; /* position no row sees */

/* Pass 1 key splits: only small row counts need them, so the partial
 * statistics are bounded by kSplitEntries (row, head) entries in total. */
constexpr int kMaxSplits = 16;
constexpr uint64_t kSplitEntries = 1u << 16;
/* Pass 2 row chunks (each adds one atomic per key). */
constexpr int kMaxRowChunks = 64;
/* CTAs per SM the split heuristics aim for. */
constexpr int kCtasPerSm = 4;

template <int HD> struct Shape {
  static constexpr int kStride =
      HD + 8; /* smem row: +16 bytes, no bank conflicts */
  static constexpr int kChunks = HD / 8;     /* 16-byte vectors per row */
  static constexpr int kSteps = HD / 16;     /* mma k-steps per dot product */
  static constexpr int kRows1 = kWarps * 16; /* pass 1 M-rows per CTA */
  static constexpr int kKeys1 = HD == 256 ? 32 : 64; /* pass 1 keys per stage */
  static constexpr int kKeys2 = kWarps * 16;         /* pass 2 keys per CTA */
  static constexpr int kRows2 =
      HD == 256 ? 32 : 64; /* pass 2 M-rows per stage */
  static_assert(kKeys1 % 16 == 0 && kRows2 % 16 == 0, "pairs of n-subtiles");
  /* Pass 2 stages its K tile in the Q ring before the loop. */
  static_assert(kKeys2 <= 2 * kRows2, "K tile fits in the Q ring");
};

struct Params {
  const char *storage;
  int64_t block_bytes;
  const int32_t *block_ids;
  const uint32_t *key_pos; /* NULL: key j is at position j */
  const char *q;
  float4 *stats; /* [entries] (max * log2e, 1 / sum, max + log_p, 0) */
  float2 *part;  /* [splits][entries] (max, sum) when splits > 1 */
  float *raw;
  uint32_t *seen;
  unsigned long long *below, *total;
  uint32_t n_keys, n_rows, first_pos;
  uint32_t entries; /* n_rows * hq */
  uint32_t m_rows;  /* n_rows << gsh: M-rows per KV head */
  int hq, group, gsh, log_bs;
  float scale, log_p;
  int splits; /* pass 1 key splits */
  int chunks; /* pass 2 row chunks */
};

/* ---- device helpers ------------------------------------------------------ */

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         uint32_t b0, uint32_t b1) {
#ifdef PVL_EMU
  pvl_emu::mma_f16(c, a, b0, b1, !std::is_same<T, __half>::value);
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

/* Four 8x8 b16 matrices; lane i addresses row i % 8 of matrix i / 8. */
__device__ __forceinline__ void
ldsm_x4(uint32_t addr, uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3) {
#ifdef PVL_EMU
  uint32_t r[4];
  pvl_emu::ldmatrix_x4(addr, r);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}

/* 4 bytes global -> shared (key positions ride the same commit groups as
 * their keys, so no thread stalls on a plain load). */
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src) {
#ifdef PVL_EMU
  pvl_emu::cp_async(dst, src, 4, 4);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src)
               : "memory");
#endif
}

__device__ __forceinline__ uint32_t lds32(const void *p) {
  return *reinterpret_cast<const uint32_t *>(p);
}

__device__ __forceinline__ uint32_t key_position(const Params &p, uint32_t j) {
  return p.key_pos ? __ldg(p.key_pos + j) : j;
}

/* First byte of the K row of key j < n_keys, KV head kvh. */
template <typename T, int HD>
__device__ __forceinline__ const char *key_row(const Params &p, uint32_t j,
                                               int kvh) {
  const int32_t blk = __ldg(p.block_ids + (j >> p.log_bs));
  const uint32_t slot = j & ((1u << p.log_bs) - 1);
  return p.storage + (int64_t)blk * p.block_bytes +
         ((int64_t)((uint32_t)kvh << p.log_bs) + slot) *
             (int64_t)(HD * sizeof(T));
}

/* First byte of query row `row`, head `head` (< hq). */
template <typename T, int HD>
__device__ __forceinline__ const char *q_row(const Params &p, uint32_t row,
                                             int head) {
  return p.q + ((int64_t)row * p.hq + head) * (int64_t)(HD * sizeof(T));
}

/* Rows (of n_rows, at first_pos + i) whose position is >= pos. */
__device__ __forceinline__ uint32_t rows_seeing(uint32_t pos,
                                                uint32_t first_pos,
                                                uint32_t n_rows) {
  if (pos <= first_pos) return n_rows;
  const uint32_t skip = pos - first_pos;
  return skip >= n_rows ? 0u : n_rows - skip;
}

/* Pass 2 reads the statistics in this form: one exp2, one multiply and one
 * compare per entry. Rows that see no key are never visible to any key, so
 * their entry is never used. A row that sees keys but has no positive sum
 * (every logit -inf or NaN, or a NaN sum) gets 1 / sum = NaN, so all its
 * probabilities are NaN and the host sees a non-finite observation, as on
 * the CPU backend, instead of a row that silently contributes nothing. */
__device__ __forceinline__ float4 finish_stats(float m, float l, float log_p) {
  if (!(l > 0.0f))
    return make_float4(0.0f, __int_as_float(0x7fc00000), pvlk::neg_inf(), 0.0f);
  return make_float4(m * kLog2e, 1.0f / l, m + log_p, 0.0f);
}

/* (m, l) <- merge of (m, l) and (mo, lo); m == -inf means "nothing yet". */
__device__ __forceinline__ void merge_ml(float &m, float &l, float mo,
                                         float lo) {
  const float mn = fmaxf(m, mo);
  if (mn == pvlk::neg_inf()) return;
  l = l * exp2f((m - mn) * kLog2e) + lo * exp2f((mo - mn) * kLog2e);
  m = mn;
}

/* ---- pass 1: row max and sum of exp ---------------------------------------
 * Grid (M-row tiles, KV heads, key splits). Warp w owns M-rows
 * f_cta + 16w .. +15 as the A operand; C element (g, 2t + c) of n-subtile nb
 * is (M-row g or g + 8, key nb * 8 + 2t + c). Each lane keeps an online
 * (max, sum) over its own columns and the 4 lanes of a row merge at the end,
 * so the key loop has no shuffles. */
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params p) {
  using S = Shape<HD>;
  constexpr int KT = S::kKeys1;
  __shared__ __align__(16) T ks[2][KT * S::kStride];
  __shared__ __align__(16) uint32_t kps[2][KT];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int kvh = blockIdx.y;
  const uint32_t gmask = (1u << p.gsh) - 1;
  const uint32_t f_cta = blockIdx.x * S::kRows1;
  const uint32_t f0 = f_cta + warp * 16 + g;
  const int hg = (int)(f0 & gmask); /* also the head of f0 + 8 */
  const uint32_t row[2] = {f0 >> p.gsh, (f0 + 8) >> p.gsh};
  bool valid[2];
  uint32_t p1[2]; /* key visible iff its position < p1 */
  for (int r = 0; r < 2; ++r) {
    valid[r] = hg < p.group && row[r] < p.n_rows;
    p1[r] = valid[r] ? p.first_pos + row[r] + 1 : 0u;
  }

  /* Q fragments, straight from global memory: read once per CTA. */
  uint32_t a[S::kSteps][4];
  {
    const T *qr[2] = {nullptr, nullptr};
    for (int r = 0; r < 2; ++r)
      if (valid[r])
        qr[r] = reinterpret_cast<const T *>(
                    q_row<T, HD>(p, row[r], kvh * p.group + hg)) +
                2 * t;
#pragma unroll
    for (int s = 0; s < S::kSteps; ++s) {
      a[s][0] = qr[0]
                    ? __ldg(reinterpret_cast<const unsigned *>(qr[0] + 16 * s))
                    : 0u;
      a[s][1] = qr[1]
                    ? __ldg(reinterpret_cast<const unsigned *>(qr[1] + 16 * s))
                    : 0u;
      a[s][2] =
          qr[0] ? __ldg(reinterpret_cast<const unsigned *>(qr[0] + 16 * s + 8))
                : 0u;
      a[s][3] =
          qr[1] ? __ldg(reinterpret_cast<const unsigned *>(qr[1] + 16 * s + 8))
                : 0u;
    }
  }

  /* Keys any row of this CTA sees: a prefix, as positions ascend. */
  const uint32_t f_last = min(f_cta + (uint32_t)S::kRows1, p.m_rows) - 1;
  const uint32_t p_max = p.first_pos + (f_last >> p.gsh);
  uint32_t vis_end;
  if (p.key_pos == nullptr) {
    vis_end = (uint32_t)min((uint64_t)p.n_keys, (uint64_t)p_max + 1);
  } else {
    uint32_t lo = 0, hi = p.n_keys;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (__ldg(p.key_pos + mid) <= p_max)
        lo = mid + 1;
      else
        hi = mid;
    }
    vis_end = lo;
  }
  const uint32_t tiles = (vis_end + KT - 1) / KT;
  const uint32_t per = (tiles + p.splits - 1) / p.splits;
  const uint32_t t_begin = min(tiles, blockIdx.z * per);
  const uint32_t t_end = min(tiles, t_begin + per);

  auto load = [&](uint32_t tile, int st) {
    const uint32_t j0 = tile * KT;
#pragma unroll 4
    for (int i = tid; i < KT * S::kChunks; i += kThreads) {
      const int key = i / S::kChunks, c = i % S::kChunks;
      const uint32_t j = j0 + key;
      const bool ok = j < vis_end;
      const char *src = ok ? key_row<T, HD>(p, j, kvh) + 16 * c : p.storage;
      pvlk::cp_async16(pvlk::smem_addr(&ks[st][key * S::kStride + 8 * c]), src,
                       ok);
    }
    for (int key = tid; key < KT; key += kThreads) {
      const uint32_t j = j0 + key;
      if (j < vis_end && p.key_pos != nullptr)
        cp_async4(pvlk::smem_addr(&kps[st][key]), p.key_pos + j);
      else
        kps[st][key] = j < vis_end ? j : kNoKey;
    }
  };

  float m[2] = {pvlk::neg_inf(), pvlk::neg_inf()}, l[2] = {0.0f, 0.0f};
  /* ldmatrix.x4 row address: lanes 0-7 / 8-15 read the low / high k half of
   * n-subtile nb, lanes 16-31 the same of nb + 1. */
  const int lrow = (lane & 7) + ((lane >> 4) << 3);
  const int lk = ((lane >> 3) & 1) * 8;

  if (t_begin < t_end) load(t_begin, 0);
  pvlk::cp_async_commit();
  for (uint32_t tile = t_begin; tile < t_end; ++tile) {
    const int st = (int)((tile - t_begin) & 1);
    if (tile + 1 < t_end) load(tile + 1, st ^ 1);
    pvlk::cp_async_commit(); /* possibly empty: keeps wait<1> exact */
    pvlk::cp_async_wait<1>();
    __syncthreads();

    float acc[KT / 8][4];
#pragma unroll
    for (int nb = 0; nb < KT / 8; ++nb)
      acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.0f;
    const uint32_t base = pvlk::smem_addr(&ks[st][0]);
#pragma unroll
    for (int s = 0; s < S::kSteps; ++s) {
#pragma unroll
      for (int nb = 0; nb < KT / 8; nb += 2) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(base + (uint32_t)(((nb * 8 + lrow) * S::kStride + 16 * s + lk) *
                                  sizeof(T)),
                b0, b1, b2, b3);
        mma16816<T>(acc[nb], a[s], b0, b1);
        mma16816<T>(acc[nb + 1], a[s], b2, b3);
      }
    }

    /* Scale, mask, then fold the tile into the running (max, sum). */
    float tmax[2] = {pvlk::neg_inf(), pvlk::neg_inf()};
#pragma unroll
    for (int nb = 0; nb < KT / 8; ++nb) {
      const uint2 kp =
          *reinterpret_cast<const uint2 *>(&kps[st][nb * 8 + 2 * t]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float v0 =
            kp.x < p1[r] ? acc[nb][2 * r] * p.scale : pvlk::neg_inf();
        const float v1 =
            kp.y < p1[r] ? acc[nb][2 * r + 1] * p.scale : pvlk::neg_inf();
        acc[nb][2 * r] = v0;
        acc[nb][2 * r + 1] = v1;
        tmax[r] = fmaxf(tmax[r], fmaxf(v0, v1));
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mn = fmaxf(m[r], tmax[r]);
      if (mn != pvlk::neg_inf()) {
        const float mnl = mn * kLog2e;
        float sum =
            l[r] * exp2f(fmaf(m[r], kLog2e, -mnl)); /* 0 while m = -inf */
#pragma unroll
        for (int nb = 0; nb < KT / 8; ++nb)
          sum += exp2f(fmaf(acc[nb][2 * r], kLog2e, -mnl)) +
                 exp2f(fmaf(acc[nb][2 * r + 1], kLog2e, -mnl));
        l[r] = sum;
        m[r] = mn;
      }
    }
    /* stage st is refilled next iteration */
    if (!PVLK_MUTANT(5)) __syncthreads();
  }

  /* The 4 lanes of a quad hold disjoint columns of the same two M-rows. */
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float mo = __shfl_xor_sync(kFull, m[r], off);
      const float lo = __shfl_xor_sync(kFull, l[r], off);
      merge_ml(m[r], l[r], mo, lo);
    }
  }
  if (t == 0) {
    for (int r = 0; r < 2; ++r) {
      if (!valid[r]) continue;
      const size_t e = (size_t)row[r] * p.hq + (size_t)kvh * p.group + hg;
      if (p.splits > 1)
        p.part[(size_t)blockIdx.z * p.entries + e] = make_float2(m[r], l[r]);
      else
        p.stats[e] = finish_stats(m[r], l[r], p.log_p);
    }
  }
}

/* Merges the key splits of pass 1: one thread per (row, query head). */
__global__ void combine_kernel(const Params p) {
  const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= p.entries) return;
  float m = pvlk::neg_inf(), l = 0.0f;
  for (int z = 0; z < p.splits; ++z) {
    const float2 v = p.part[(size_t)z * p.entries + e];
    merge_ml(m, l, v.x, v.y);
  }
  p.stats[e] = finish_stats(m, l, p.log_p);
}

/* ---- pass 2: probabilities, key sums, threshold counts --------------------
 * Grid (key tiles of 64, KV heads, row chunks). Warp w owns keys
 * key0 + 16w .. +15 as the A operand; C element (g, 2t + c) of n-subtile nb
 * is (key g or g + 8, M-row nb * 8 + 2t + c). Row chunk z takes the M-row
 * tiles z, z + chunks, ... of the rows that see the CTA's first key
 * (interleaved, so the causal triangle splits evenly). */
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads) scores_kernel(const Params p) {
  using S = Shape<HD>;
  constexpr int RT = S::kRows2;
  constexpr int KT = S::kKeys2;
  __shared__ __align__(16) T qs[2 * RT * S::kStride];
  __shared__ __align__(16) float4 sts[2][RT];
  __shared__ unsigned long long sh_below[8];
  __shared__ unsigned long long sh_total[KT / 32];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int kvh = blockIdx.y;
  const uint32_t gmask = (1u << p.gsh) - 1;
  const uint32_t key0 = blockIdx.x * KT;

  /* K tile -> smem (the Q ring is free until the loop); keys past the table
   * are zero-filled and at position kNoKey, which no row sees. */
  for (int i = tid; i < KT * S::kChunks; i += kThreads) {
    const int key = i / S::kChunks, c = i % S::kChunks;
    const uint32_t j = key0 + key;
    const bool ok = j < p.n_keys;
    const char *src = ok ? key_row<T, HD>(p, j, kvh) + 16 * c : p.storage;
    pvlk::cp_async16(pvlk::smem_addr(&qs[key * S::kStride + 8 * c]), src, ok);
  }
  pvlk::cp_async_commit();
  if (tid < 8) sh_below[tid] = 0;

  /* seen[j] and the per head total have closed forms: row i sees key j iff
   * first_pos + i >= pos(j), and every head of a row sees the same keys. */
  if (blockIdx.z == 0 && tid < KT) { /* whole warps: KT is a multiple of 32 */
    const uint32_t j = key0 + tid;
    uint32_t sn = 0;
    if (j < p.n_keys) {
      sn = rows_seeing(key_position(p, j), p.first_pos, p.n_rows);
      if (kvh == 0) p.seen[j] = sn;
    }
    unsigned long long v = sn;
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
    if (lane == 0) sh_total[warp] = v;
  }

  uint32_t kpk[2];
  for (int r = 0; r < 2; ++r) {
    const uint32_t j = key0 + warp * 16 + g + 8 * r;
    kpk[r] = j < p.n_keys ? key_position(p, j) : kNoKey;
  }
  const uint32_t kp_first = key_position(p, key0);

  pvlk::cp_async_wait<0>();
  __syncthreads();
  uint32_t a[S::kSteps][4];
  {
    const T *k0 = &qs[(warp * 16 + g) * S::kStride + 2 * t];
    const T *k1 = k0 + 8 * S::kStride;
#pragma unroll
    for (int s = 0; s < S::kSteps; ++s) {
      a[s][0] = lds32(k0 + 16 * s);
      a[s][1] = lds32(k1 + 16 * s);
      a[s][2] = lds32(k0 + 16 * s + 8);
      a[s][3] = lds32(k1 + 16 * s + 8);
    }
  }
  __syncthreads(); /* the K tile's smem becomes the Q ring */

  /* Rows before r_lo see none of this CTA's keys (positions ascend). */
  const uint32_t r_lo =
      kp_first > p.first_pos ? min(kp_first - p.first_pos, p.n_rows) : 0u;
  const uint32_t f_lo = r_lo << p.gsh; /* a multiple of GP, so heads stay put */
  const uint32_t n_tiles = (p.m_rows - f_lo + RT - 1) / RT;
  const uint32_t z = blockIdx.z, nz = (uint32_t)p.chunks;
  const uint32_t my_tiles = z < n_tiles ? (n_tiles - z + nz - 1) / nz : 0u;

  auto load = [&](uint32_t i, int st) {
    const uint32_t f_tile = f_lo + (z + i * nz) * RT;
#pragma unroll 4
    for (int x = tid; x < RT * S::kChunks; x += kThreads) {
      const int rr = x / S::kChunks, c = x % S::kChunks;
      const uint32_t f = f_tile + rr, rw = f >> p.gsh;
      const int hh = (int)(f & gmask);
      const bool ok = rw < p.n_rows && hh < p.group;
      const char *src =
          ok ? q_row<T, HD>(p, rw, kvh * p.group + hh) + 16 * c : p.q;
      pvlk::cp_async16(
          pvlk::smem_addr(&qs[(st * RT + rr) * S::kStride + 8 * c]), src, ok);
    }
    for (int rr = tid; rr < RT; rr += kThreads) {
      const uint32_t f = f_tile + rr, rw = f >> p.gsh;
      const int hh = (int)(f & gmask);
      const bool ok = rw < p.n_rows && hh < p.group;
      const float4 *src =
          ok ? p.stats + ((size_t)rw * p.hq + (size_t)kvh * p.group + hh)
             : p.stats;
      pvlk::cp_async16(pvlk::smem_addr(&sts[st][rr]), src, ok);
    }
  };

  /* Column c of every n-subtile belongs to head (2t + c) & (GP - 1). */
  const int hcol[2] = {(int)((2 * t) & gmask), (int)((2 * t + 1) & gmask)};
  const bool hok[2] = {hcol[0] < p.group, hcol[1] < p.group};
  float sum[2] = {0.0f, 0.0f};
  unsigned long long below[2] = {0, 0};
  const int lrow = (lane & 7) + ((lane >> 4) << 3);
  const int lk = ((lane >> 3) & 1) * 8;

  if (my_tiles > 0) load(0, 0);
  pvlk::cp_async_commit();
  for (uint32_t i = 0; i < my_tiles; ++i) {
    const int st = (int)(i & 1);
    if (i + 1 < my_tiles) load(i + 1, st ^ 1);
    pvlk::cp_async_commit();
    pvlk::cp_async_wait<1>();
    __syncthreads();

    const uint32_t f_tile = f_lo + (z + i * nz) * RT;
    const uint32_t base = pvlk::smem_addr(&qs[st * RT * S::kStride]);
    uint32_t cnt[2] = {0, 0}; /* 32-bit within a tile, 64-bit across */
#pragma unroll
    for (int nb = 0; nb < RT / 8; nb += 2) {
      float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int s = 0; s < S::kSteps; ++s) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(base + (uint32_t)(((nb * 8 + lrow) * S::kStride + 16 * s + lk) *
                                  sizeof(T)),
                b0, b1, b2, b3);
        mma16816<T>(acc[0], a[s], b0, b1);
        mma16816<T>(acc[1], a[s], b2, b3);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = (nb + u) * 8 + 2 * t + c;
          const uint32_t rw = (f_tile + col) >> p.gsh;
          const uint32_t p1 =
              hok[c] && rw < p.n_rows ? p.first_pos + rw + 1 : 0u;
          const float4 sv = sts[st][col];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float v = acc[u][2 * r + c] * p.scale;
            const bool vis = kpk[r] < p1;
            /* Select, never multiply: masked entries may be inf or NaN. */
            const float pr = exp2f(fmaf(v, kLog2e, -sv.x)) * sv.y;
            sum[r] += vis ? pr : 0.0f;
            cnt[c] += (vis && v < sv.z) ? 1u : 0u;
          }
        }
      }
    }
    below[0] += cnt[0];
    below[1] += cnt[1];
    __syncthreads(); /* stage st is refilled next iteration */
  }

  /* Keys g and g + 8: the quad's lanes hold disjoint M-rows. */
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(kFull, sum[r], 1);
    sum[r] += __shfl_xor_sync(kFull, sum[r], 2);
  }
  if (t == 0) {
    for (int r = 0; r < 2; ++r) {
      const uint32_t j = key0 + warp * 16 + g + 8 * r;
      if (j < p.n_keys && sum[r] != 0.0f) atomicAdd(p.raw + j, sum[r]);
    }
  }
  for (int c = 0; c < 2; ++c)
    if (hok[c] && below[c] != 0) atomicAdd(&sh_below[hcol[c]], below[c]);
  __syncthreads();
  if (tid < p.group) {
    const size_t h = (size_t)kvh * p.group + tid;
    if (sh_below[tid] != 0) atomicAdd(p.below + h, sh_below[tid]);
    if (blockIdx.z == 0) {
      unsigned long long tot = 0;
      for (int w = 0; w < KT / 32; ++w) tot += sh_total[w];
      if (tot != 0) atomicAdd(p.total + h, tot);
    }
  }
}

/* ---- host side --------------------------------------------------------- */


/* Most pass 1 splits a workspace for `entries` (row, head) pairs holds. */
int split_cap(uint64_t entries) {
  if (entries == 0 || entries >= kSplitEntries) return 1;
  const uint64_t c = kSplitEntries / entries;
  return c < (uint64_t)kMaxSplits ? (int)c : kMaxSplits;
}

size_t workspace_for(uint64_t entries) {
  const int cap = split_cap(entries);
  return (size_t)entries * sizeof(float4) +
         (cap > 1 ? (size_t)cap * (size_t)entries * sizeof(float2) : 0);
}

uint32_t ceil_div(uint64_t a, uint64_t b) {
  return (uint32_t)((a + b - 1) / b);
}

template <typename T, int HD>
pvl_status launch(Params p, int sms, cudaStream_t stream) {
  using S = Shape<HD>;
  const uint64_t target = (uint64_t)sms * kCtasPerSm;
  const int hkv = p.hq / p.group;

  /* Pass 1: split the keys only while the row tiles alone underfill the GPU. */
  const uint32_t row_tiles = ceil_div(p.m_rows, S::kRows1);
  const uint64_t base1 = (uint64_t)row_tiles * hkv;
  uint64_t splits = 1;
  if (base1 < target) {
    splits = (target + base1 - 1) / base1;
    const uint64_t key_tiles = ceil_div(p.n_keys, S::kKeys1);
    const uint64_t cap = (uint64_t)split_cap(p.entries);
    if (splits > cap) splits = cap;
    if (splits > key_tiles) splits = key_tiles;
    if (splits < 1) splits = 1;
  }
  p.splits = (int)splits;

  /* Pass 2: likewise, split the rows while the key tiles underfill it. */
  const uint32_t key_tiles2 = ceil_div(p.n_keys, S::kKeys2);
  const uint64_t base2 = (uint64_t)key_tiles2 * hkv;
  uint64_t chunks = 1;
  if (base2 < target) {
    chunks = (target + base2 - 1) / base2;
    const uint64_t row_tiles2 = ceil_div(p.m_rows, S::kRows2);
    if (chunks > row_tiles2) chunks = row_tiles2;
    if (chunks > (uint64_t)kMaxRowChunks) chunks = kMaxRowChunks;
    if (chunks < 1) chunks = 1;
  }
  p.chunks = (int)chunks;

  PVLK_LAUNCH((stats_kernel<T, HD>),
              dim3(row_tiles, (unsigned)hkv, (unsigned)splits), kThreads, 0,
              stream, p);
  pvl_status st = pvlk::launch_status();
  if (st != PVL_SUCCESS) return st;
  if (splits > 1) {
    PVLK_LAUNCH((combine_kernel), ceil_div(p.entries, 256), 256, 0, stream, p);
    st = pvlk::launch_status();
    if (st != PVL_SUCCESS) return st;
  }
  PVLK_LAUNCH((scores_kernel<T, HD>),
              dim3(key_tiles2, (unsigned)hkv, (unsigned)chunks), kThreads, 0,
              stream, p);
  return pvlk::launch_status();
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15) == 0; }

} // namespace

size_t pvlk_observe_workspace_bytes(uint32_t n_rows, int32_t num_q_heads) {
  if (n_rows == 0 || num_q_heads <= 0) return 0;
  return workspace_for((uint64_t)n_rows * (uint64_t)num_q_heads);
}

pvl_status pvlk_observe(const void *storage, const pvl_kv_geom *g,
                        const int32_t *block_ids, const uint32_t *key_pos,
                        uint32_t n_keys, int32_t num_q_heads, const void *q,
                        uint32_t first_pos, uint32_t n_rows, float scale,
                        float log_p, float *raw, uint32_t *seen,
                        unsigned long long *below, unsigned long long *total,
                        void *workspace, size_t workspace_bytes, void *stream) {
  pvlk::PoolBytes pb;
  const pvl_status gst = pvlk::check_kernel_shape(g, &pb);
  if (gst != PVL_SUCCESS) return gst;
  if (num_q_heads < 1 || num_q_heads % g->num_kv_heads != 0)
    return PVL_ERR_INVALID_ARGUMENT;
  const int group = num_q_heads / g->num_kv_heads;
  /* The padded group must divide 8 (each lane's heads stay fixed); grid.y
   * holds the KV heads. */
  if (group > 8 || g->num_kv_heads > 65535) return PVL_ERR_UNSUPPORTED;
  if (n_keys > (uint32_t)INT32_MAX) return PVL_ERR_INVALID_ARGUMENT;
  if (!isfinite(scale) || isnan(log_p)) return PVL_ERR_INVALID_ARGUMENT;
  if ((uint64_t)first_pos + n_rows > UINT32_MAX)
    return PVL_ERR_INVALID_ARGUMENT;
  if (below == nullptr || total == nullptr) return PVL_ERR_INVALID_ARGUMENT;
  if (n_keys > 0 && (raw == nullptr || seen == nullptr))
    return PVL_ERR_INVALID_ARGUMENT;
  if (n_keys > 0 && n_rows > 0) {
    if (storage == nullptr || block_ids == nullptr || q == nullptr ||
        workspace == nullptr)
      return PVL_ERR_INVALID_ARGUMENT;
    /* Rows start on multiples of head_dim * 2 bytes (a multiple of 16), so
     * aligned bases make every cp.async aligned. */
    if (!aligned16(storage) || !aligned16(q) || !aligned16(workspace))
      return PVL_ERR_INVALID_ARGUMENT;
  }

  int gp = 1, gsh = 0;
  while (gp < group) gp *= 2, ++gsh;
  const uint64_t m_rows = (uint64_t)n_rows << gsh;
  const uint64_t entries = (uint64_t)n_rows * (uint64_t)num_q_heads;
  if (m_rows > (uint64_t)INT32_MAX || entries > (uint64_t)INT32_MAX)
    return PVL_ERR_INVALID_ARGUMENT;
  if (n_keys > 0 && n_rows > 0 && workspace_bytes < workspace_for(entries))
    return PVL_ERR_INVALID_ARGUMENT;

  /* Outputs are overwritten: pass 2 only accumulates into raw, below and
   * total; seen is written whole by pass 2 whenever it runs. */
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const size_t head_bytes = (size_t)num_q_heads * sizeof(unsigned long long);
  pvl_status st = pvlk::cuda_status(cudaMemsetAsync(below, 0, head_bytes, s));
  if (st == PVL_SUCCESS)
    st = pvlk::cuda_status(cudaMemsetAsync(total, 0, head_bytes, s));
  if (st == PVL_SUCCESS && n_keys > 0)
    st = pvlk::cuda_status(
        cudaMemsetAsync(raw, 0, (size_t)n_keys * sizeof(float), s));
  if (st == PVL_SUCCESS && n_keys > 0 && n_rows == 0)
    st = pvlk::cuda_status(
        cudaMemsetAsync(seen, 0, (size_t)n_keys * sizeof(uint32_t), s));
  if (st != PVL_SUCCESS || n_keys == 0 || n_rows == 0) return st;

  int sms = pvlk::sm_count();
  if (sms <= 0) return PVL_ERR_CUDA;

  Params p;
  p.storage = static_cast<const char *>(storage);
  p.block_bytes = pb.block;
  p.block_ids = block_ids;
  p.key_pos = key_pos;
  p.q = static_cast<const char *>(q);
  p.stats = static_cast<float4 *>(workspace);
  p.part = reinterpret_cast<float2 *>(p.stats + entries);
  p.raw = raw;
  p.seen = seen;
  p.below = below;
  p.total = total;
  p.n_keys = n_keys;
  p.n_rows = n_rows;
  p.first_pos = first_pos;
  p.entries = (uint32_t)entries;
  p.m_rows = (uint32_t)m_rows;
  p.hq = num_q_heads;
  p.group = group;
  p.gsh = gsh;
  p.log_bs = g->block_size == 16 ? 4 : 5;
  p.scale = scale;
  p.log_p = log_p;
  p.splits = 1;
  p.chunks = 1;

  st = PVL_ERR_UNSUPPORTED;
  PVLK_DISPATCH_DTYPE(
      g->dtype, T,
      PVLK_DISPATCH_HEAD_DIM(g->head_dim, HD, st = launch<T, HD>(p, sms, s)));
  return st;
}

/* ---- accumulation of one observation into running sums ---- */

namespace {

/* acc_raw[j] += raw[j] in double, as the host did before the sums stayed
 * on the device: the same additions in the same order per key, so the
 * result does not depend on where it was summed. */
__global__ void accumulate_kernel(const float *raw, const uint32_t *seen,
                                  const unsigned long long *below,
                                  const unsigned long long *total,
                                  uint32_t n_keys, int32_t hq, double *acc_raw,
                                  uint32_t *acc_seen,
                                  unsigned long long *acc_below,
                                  unsigned long long *acc_total) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < n_keys;
       j += stride) {
    acc_raw[j] += (double)raw[j];
    acc_seen[j] += seen[j];
  }
  for (uint32_t h = blockIdx.x * blockDim.x + threadIdx.x; h < (uint32_t)hq;
       h += stride) {
    acc_below[h] += below[h];
    acc_total[h] += total[h];
  }
}

} // namespace

pvl_status pvlk_observe_accumulate(
    const float *raw, const uint32_t *seen, const unsigned long long *below,
    const unsigned long long *total, uint32_t n_keys, int32_t num_q_heads,
    double *acc_raw, uint32_t *acc_seen, unsigned long long *acc_below,
    unsigned long long *acc_total, void *stream) {
  if (num_q_heads < 1 || below == nullptr || total == nullptr ||
      acc_below == nullptr || acc_total == nullptr)
    return PVL_ERR_INVALID_ARGUMENT;
  if (n_keys > 0 && (raw == nullptr || seen == nullptr || acc_raw == nullptr ||
                     acc_seen == nullptr))
    return PVL_ERR_INVALID_ARGUMENT;
  const uint32_t n =
      n_keys > (uint32_t)num_q_heads ? n_keys : (uint32_t)num_q_heads;
  const uint32_t want = (n + 255) / 256;
  const unsigned grid = want < 1024 ? want : 1024;
  PVLK_LAUNCH((accumulate_kernel), grid, 256, 0,
              static_cast<cudaStream_t>(stream), raw, seen, below, total,
              n_keys, num_q_heads, acc_raw, acc_seen, acc_below, acc_total);
  return pvlk::launch_status();
}
