/* Shared CUDA plumbing for kernels/: dtype traits (fp16/bf16 <-> fp32, 16-byte
 * vectors of 8 elements), cp.async wrappers, the DISPATCH_* macros that turn
 * runtime shapes into template parameters, geometry checks and the
 * translation of CUDA errors into pvl_status. */
#ifndef PVL_KERNELS_COMMON_CUH
#define PVL_KERNELS_COMMON_CUH

#ifdef PVL_EMU
/* The host emulator of tests/emu: the same source, run on the CPU. */
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>
#include <string.h>

#include <atomic>

#include "pvl_kernels.h"

namespace pvlk {

constexpr unsigned kFullMask = 0xffffffffu;

/* ---- bit casts ---------------------------------------------------------- */

template <typename To, typename From>
__host__ __device__ __forceinline__ To bit_cast(const From &from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

/* ---- dtype traits ------------------------------------------------------- */
/* Kernels move data as 32-bit words holding two elements and as 16-byte
 * vectors holding eight; the traits convert those words to and from fp32. */
template <typename T> struct DType;

template <> struct DType<__half> {
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return __half22float2(bit_cast<__half2>(w));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return bit_cast<uint32_t>(__floats2half2_rn(lo, hi));
  }
};

template <> struct DType<__nv_bfloat16> {
  /* bf16 is the top half of an fp32: widening is a shift or a mask, which is
   * exact and cheaper than the generic conversion. */
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return make_float2(__uint_as_float(w << 16),
                       __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
};

/* 8 elements in one 16-byte vector <-> 8 floats. */
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 &raw, float (&f)[8]) {
  const float2 a = DType<T>::unpack2(raw.x), b = DType<T>::unpack2(raw.y);
  const float2 c = DType<T>::unpack2(raw.z), d = DType<T>::unpack2(raw.w);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = b.x;
  f[3] = b.y;
  f[4] = c.x;
  f[5] = c.y;
  f[6] = d.x;
  f[7] = d.y;
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 r;
  r.x = DType<T>::pack2(f[0], f[1]);
  r.y = DType<T>::pack2(f[2], f[3]);
  r.z = DType<T>::pack2(f[4], f[5]);
  r.w = DType<T>::pack2(f[6], f[7]);
  return r;
}

/* Stores N (2, 4 or 8) floats as N elements of T with one 4/8/16-byte store;
 * dst must be aligned to N * sizeof(T). */
template <typename T, int N>
__device__ __forceinline__ void store_floats(T *dst, const float *f) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  if constexpr (N == 2) {
    *reinterpret_cast<uint32_t *>(dst) = DType<T>::pack2(f[0], f[1]);
  } else if constexpr (N == 4) {
    *reinterpret_cast<uint2 *>(dst) =
        make_uint2(DType<T>::pack2(f[0], f[1]), DType<T>::pack2(f[2], f[3]));
  } else {
    *reinterpret_cast<uint4 *>(dst) =
        make_uint4(DType<T>::pack2(f[0], f[1]), DType<T>::pack2(f[2], f[3]),
                   DType<T>::pack2(f[4], f[5]), DType<T>::pack2(f[6], f[7]));
  }
}

__device__ __forceinline__ float neg_inf() {
  return __int_as_float(0xff800000);
}

/* ---- cp.async (sm_80+) --------------------------------------------------- */
/* The "memory" clobbers keep the compiler from moving ordinary shared-memory
 * loads across the copies and the waits. */

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16 bytes global -> shared, bypassing L1 (K/V are streamed once). When `ok`
 * is false nothing is read and the destination is zero-filled. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src,
                                           bool ok) {
#ifdef PVL_EMU
  pvl_emu::cp_async(dst, src, 16, ok ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
               "l"(src), "r"(ok ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PVL_EMU
  pvl_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/* Waits until at most N of this thread's commit groups are still in flight. */
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef PVL_EMU
  pvl_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

/* ---- host helpers ------------------------------------------------------ */

/* Bytes of one element, 0 for a dtype the kernels do not know. */
inline size_t dtype_bytes(int32_t dtype) {
  switch (dtype) {
  case PVL_DTYPE_F32: return 4;
  case PVL_DTYPE_F16: return 2;
  case PVL_DTYPE_BF16: return 2;
  default: return 0;
  }
}

/* Byte geometry of the pool, derived once per launch from pvl_kv_geom. */
struct PoolBytes {
  int64_t elem;  /* bytes of one element */
  int64_t row;   /* head_dim elements: one (head, slot) row */
  int64_t block; /* one whole block, K and V */
  int64_t v_off; /* from a K row to the V row of the same (head, slot) */
};

/* Validates `g` (positive sizes, a known dtype, block_elems consistent, no
 * int64 overflow) and derives the byte strides. */
inline pvl_status check_geom(const pvl_kv_geom *g, PoolBytes *out) {
  if (g == nullptr) return PVL_ERR_INVALID_ARGUMENT;
  if (g->num_kv_heads < 1 || g->head_dim < 1 || g->block_size < 1)
    return PVL_ERR_INVALID_ARGUMENT;
  const int64_t es = (int64_t)dtype_bytes(g->dtype);
  if (es == 0) return PVL_ERR_UNSUPPORTED;
  /* Each factor is below 2^31, so checking the running product against
   * 2^62 / next factor keeps everything inside int64. */
  const int64_t lim = (int64_t)1 << 62;
  int64_t e = 2 * (int64_t)g->num_kv_heads;
  if (e > lim / g->block_size) return PVL_ERR_INVALID_ARGUMENT;
  e *= g->block_size;
  if (e > lim / g->head_dim) return PVL_ERR_INVALID_ARGUMENT;
  e *= g->head_dim;
  if (g->block_elems != e || e > lim / es) return PVL_ERR_INVALID_ARGUMENT;
  out->elem = es;
  out->row = (int64_t)g->head_dim * es;
  out->block = e * es;
  out->v_off = (int64_t)g->num_kv_heads * g->block_size * out->row;
  return PVL_SUCCESS;
}

/* Largest power of two <= 16 dividing every value: the widest vector that
 * keeps all the given byte offsets and addresses aligned. */
inline int vec_bytes_for(uint64_t bits) {
  int w = 16;
  while (w > 1 && (bits & (uint64_t)(w - 1)) != 0) w >>= 1;
  return w;
}

/* ---- CUDA errors ------------------------------------------------------- */
/* cudaGetLastError both reads and resets the runtime's last-error slot, so a
 * failed launch (bad configuration, too much shared memory) does not leak
 * into the next, unrelated CUDA call. Errors that poison the context
 * (illegal address, ...) cannot be reset; every later launch reports them
 * again, which is what the caller needs to see. */
/* Launchers return a pvl_status and clear that slot, so the error itself is
 * kept per thread for the host library to name (pvlk_last_cuda_error). */
inline thread_local int last_cuda_error = 0;

inline pvl_status launch_status() {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return PVL_SUCCESS;
  last_cuda_error = (int)e;
  return PVL_ERR_CUDA;
}

/* check_geom plus the shapes the attention and observe kernels are built
 * for: f16/bf16, head_dim 64/128/256, block_size 16/32 (else UNSUPPORTED). */
inline pvl_status check_kernel_shape(const pvl_kv_geom *g, PoolBytes *out) {
  const pvl_status st = check_geom(g, out);
  if (st != PVL_SUCCESS) return st;
  if (g->dtype != PVL_DTYPE_F16 && g->dtype != PVL_DTYPE_BF16)
    return PVL_ERR_UNSUPPORTED;
  if (g->head_dim != 64 && g->head_dim != 128 && g->head_dim != 256)
    return PVL_ERR_UNSUPPORTED;
  if (g->block_size != 16 && g->block_size != 32) return PVL_ERR_UNSUPPORTED;
  return PVL_SUCCESS;
}

/* Multiprocessors of the current device, 0 when it cannot be read (the
 * launch heuristics then assume a large GPU). */
inline int sm_count() {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) {
    last_cuda_error = (int)e;
    (void)cudaGetLastError();
    return 0;
  }
  return sms;
}

inline pvl_status cuda_status(cudaError_t e) {
  if (e == cudaSuccess) return PVL_SUCCESS;
  last_cuda_error = (int)e;
  (void)cudaGetLastError();
  return PVL_ERR_CUDA;
}

/* Raises a kernel's dynamic shared-memory limit once per device, not on
 * every launch: the attribute belongs to the (kernel, device) pair and
 * stays set, while setting it is a driver call on the launch path. `done`
 * is the caller's mask of devices already set, one per kernel (a static of
 * the launching template); devices past 63 are set on every launch. */
template <typename F>
inline cudaError_t set_max_smem_once(F *kernel, int smem,
                                     std::atomic<uint64_t> &done) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const uint64_t bit = dev >= 0 && dev < 64 ? (uint64_t)1 << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0)
    return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           smem);
  if (e == cudaSuccess && bit != 0)
    done.fetch_or(bit, std::memory_order_release);
  return e;
}

} // namespace pvlk

/* ---- launches and test hooks ----------------------------------------------
 * PVLK_LAUNCH((kernel), grid, block, smem, stream, args...) is
 * kernel<<<grid, block, smem, stream>>>(args...); the kernel is in
 * parentheses because its template arguments contain commas. The emulator
 * of tests/emu runs it on the CPU instead. PVLK_DYNAMIC_SMEM declares the kernel's
 * dynamic shared memory (extern __shared__, which host C++ cannot spell).
 * PVLK_MUTANT(n) is false except in the emulator's deliberately broken
 * variant n, which must make the emulated suite fail. */
#define PVLK_UNPAREN(...) __VA_ARGS__
#ifdef PVL_EMU
#define PVLK_LAUNCH(kernel, grid, block, smem, stream, ...)                    \
  pvl_emu::launcher(#kernel, grid, block, smem, stream,                        \
                    PVLK_UNPAREN kernel)(__VA_ARGS__)
#define PVLK_DYNAMIC_SMEM(name)                                                \
  unsigned char *const name = pvl_emu::dynamic_smem()
#define PVLK_MUTANT(n) (pvl_emu::mutant() == (n))
#else
#define PVLK_LAUNCH(kernel, grid, block, smem, stream, ...)                    \
  PVLK_UNPAREN kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define PVLK_DYNAMIC_SMEM(name)                                                \
  extern __shared__ __align__(16) unsigned char name[]
#define PVLK_MUTANT(n) false
#endif

/* ---- dispatch --------------------------------------------------------------
 * Each macro binds a compile-time name to a runtime value and runs the body
 * (usually `return launch<...>(...)`); a value outside the built set returns
 * PVL_ERR_UNSUPPORTED from the enclosing launcher. */

#define PVLK_DISPATCH_DTYPE(dtype, T, ...)                                     \
  switch (dtype) {                                                             \
  case PVL_DTYPE_F16: {                                                        \
    using T = __half;                                                          \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case PVL_DTYPE_BF16: {                                                       \
    using T = __nv_bfloat16;                                                   \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  default: return PVL_ERR_UNSUPPORTED;                                         \
  }

#define PVLK_DISPATCH_HEAD_DIM(head_dim, HD, ...)                              \
  switch (head_dim) {                                                          \
  case 64: {                                                                   \
    constexpr int HD = 64;                                                     \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 128: {                                                                  \
    constexpr int HD = 128;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 256: {                                                                  \
    constexpr int HD = 256;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  default: return PVL_ERR_UNSUPPORTED;                                         \
  }

/* Query heads one decode CTA holds, rounded up to a power of two: 1, 2, 4, 8
 * (3 runs as 4 with the fourth head masked). */
#define PVLK_DISPATCH_GROUP(group_pow2, GMAX, ...)                             \
  switch (group_pow2) {                                                        \
  case 1: {                                                                    \
    constexpr int GMAX = 1;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 2: {                                                                    \
    constexpr int GMAX = 2;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 4: {                                                                    \
    constexpr int GMAX = 4;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 8: {                                                                    \
    constexpr int GMAX = 8;                                                    \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  default: return PVL_ERR_UNSUPPORTED;                                         \
  }

/* Copy kernels move opaque bytes: the vector width is the only parameter. */
#define PVLK_DISPATCH_VEC(vec_bytes, VT, ...)                                  \
  switch (vec_bytes) {                                                         \
  case 16: {                                                                   \
    using VT = uint4;                                                          \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 8: {                                                                    \
    using VT = uint2;                                                          \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 4: {                                                                    \
    using VT = uint32_t;                                                       \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  case 2: {                                                                    \
    using VT = uint16_t;                                                       \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  default: {                                                                   \
    using VT = uint8_t;                                                        \
    __VA_ARGS__;                                                               \
  } break;                                                                     \
  }

#endif /* PVL_KERNELS_COMMON_CUH */
