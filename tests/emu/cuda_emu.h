/* Host emulation of the CUDA subset kernels/ uses, so the kernels' own
 * source compiles as host C++17 and runs on the CPU (tests only; see
 * tests/emu/README section of the top-level README).
 *
 * Included by kernels/common.cuh when PVL_EMU is defined, in place of the
 * CUDA headers. Everything that touches emulator state is out of line in
 * cuda_emu.cpp: the kernel translation units are compiled with outline
 * memory-access instrumentation (-fsanitize=kernel-address), and every load
 * and store they make is checked against the shared-memory shadow there, so
 * emulator state must not be read from them directly. */
#ifndef PVL_CUDA_EMU_H
#define PVL_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

/* ---- qualifiers --------------------------------------------------------- */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
/* Fibers of one CTA run on one OS thread and CTAs run one after the other,
 * so a function-local static is exactly one copy per running CTA. Static
 * storage is how the shadow tells shared memory apart: inside a kernel,
 * every access to the executable's data segment is a shared access. */
#define __shared__ static

/* ---- vector types --------------------------------------------------------- */
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) {
  return float4{x, y, z, w};
}

/* ---- fp16 / bf16 ------------------------------------------------------------
 * Storage types only; the conversions round to nearest even like the
 * hardware's cvt.rn (cuda_emu.cpp). */
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace pvl_emu {
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
} // namespace pvl_emu

static inline float2 __half22float2(__half2 h) {
  return float2{pvl_emu::f16_to_f32(h.x.bits), pvl_emu::f16_to_f32(h.y.bits)};
}
static inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{{pvl_emu::f32_to_f16(lo)}, {pvl_emu::f32_to_f16(hi)}};
}
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{{pvl_emu::f32_to_bf16(lo)}, {pvl_emu::f32_to_bf16(hi)}};
}
static inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
static inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}

/* Device min/max are overloaded for every integer width. */
template <typename T> static inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> static inline T max(T a, T b) { return a < b ? b : a; }

template <typename T> static inline T __ldg(const T *p) { return *p; }

/* ---- runtime API ------------------------------------------------------- */
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace pvl_emu {

/* ---- state the tests drive ---- */
void set_sm_count(int sms);   /* what cudaDeviceGetAttribute reports */
void set_seed(uint64_t seed); /* thread order between sync points */
void set_mutant(int n);       /* PVLK_MUTANT(n) is true in the kernels */
void set_quiet(bool quiet);   /* count errors without printing them */
int mutant();
/* Errors (races, collective misuse, deadlocks, bad launches) since the last
 * call; the first few are printed to stderr when they happen. */
long take_errors();
/* Launches and CTAs run so far (the suite prints them). */
void counters(long *launches, long *ctas);

cudaError_t last_error(bool reset);
cudaError_t set_func_attr(const void *fn, int attr, int value);
int device_sms();

/* ---- the kernel side ---- */
uint3 thread_idx();
uint3 block_idx();
uint3 block_dim();
uint3 grid_dim();
unsigned char *dynamic_smem();
uint32_t smem_offset(const void *p);

void syncthreads();
enum Collective { kShfl, kShflXor, kSyncWarp, kAny, kAll, kBallot };
uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width);
void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]);
void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
             bool bf16);
void cp_async(uint32_t dst, const void *src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
float atomic_add_f32(float *p, float v);
unsigned long long atomic_add_u64(unsigned long long *p, unsigned long long v);

/* ---- launches ---- */
typedef void (*Body)(void *);
void run_grid(const char *name, const void *fn, dim3 grid, dim3 block,
              size_t smem, Body body, void *ctx);

template <typename Fn> struct Launch {
  const char *name;
  Fn fn;
  dim3 grid, block;
  size_t smem;
  template <typename... A> void operator()(A &&...args) const {
    /* Arguments are copied once, as the real launch does: every thread
     * reads the same parameter block. */
    using Params = std::tuple<std::decay_t<A>...>;
    Params params(std::forward<A>(args)...);
    struct Ctx {
      Fn fn;
      Params *params;
    } ctx{fn, &params};
    run_grid(
        name, reinterpret_cast<const void *>(fn), grid, block, smem,
        [](void *c) {
          Ctx *x = static_cast<Ctx *>(c);
          std::apply(x->fn, *x->params);
        },
        &ctx);
  }
};

template <typename Fn>
Launch<Fn> launcher(const char *name, dim3 grid, dim3 block, size_t smem,
                    cudaStream_t stream, Fn fn) {
  (void)stream; /* one stream: launches run in order, synchronously */
  return Launch<Fn>{name, fn, grid, block, smem};
}

} // namespace pvl_emu

#define threadIdx (pvl_emu::thread_idx())
#define blockIdx (pvl_emu::block_idx())
#define blockDim (pvl_emu::block_dim())
#define gridDim (pvl_emu::grid_dim())

static inline void __syncthreads() { pvl_emu::syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)pvl_emu::warp_op(pvl_emu::kSyncWarp, mask, 0, 0, 32);
}

template <typename T> static inline uint64_t pvl_emu_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit shuffles");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> static inline T pvl_emu_from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return pvl_emu_from_bits<T>(
      pvl_emu::warp_op(pvl_emu::kShfl, mask, pvl_emu_bits(v), src, width));
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask,
                                int width = 32) {
  return pvl_emu_from_bits<T>(pvl_emu::warp_op(
      pvl_emu::kShflXor, mask, pvl_emu_bits(v), lane_mask, width));
}
static inline int __any_sync(unsigned mask, int pred) {
  return (int)pvl_emu::warp_op(pvl_emu::kAny, mask, pred != 0, 0, 32);
}
static inline int __all_sync(unsigned mask, int pred) {
  return (int)pvl_emu::warp_op(pvl_emu::kAll, mask, pred != 0, 0, 32);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)pvl_emu::warp_op(pvl_emu::kBallot, mask, pred != 0, 0, 32);
}

static inline float atomicAdd(float *p, float v) {
  return pvl_emu::atomic_add_f32(p, v);
}
static inline unsigned long long atomicAdd(unsigned long long *p,
                                           unsigned long long v) {
  return pvl_emu::atomic_add_u64(p, v);
}

static inline size_t __cvta_generic_to_shared(const void *p) {
  return pvl_emu::smem_offset(p);
}

/* Internal linkage: a build that also links the real CUDA runtime (the
 * library built with CUDA) keeps its own definitions. */
static inline cudaError_t cudaGetLastError() {
  return pvl_emu::last_error(true);
}
static inline cudaError_t cudaPeekAtLastError() {
  return pvl_emu::last_error(false);
}
static inline const char *cudaGetErrorName(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "cudaSuccess";
  case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
  case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
  default: return "cudaErrorLaunchFailure";
  }
}
static inline const char *cudaGetErrorString(cudaError_t e) {
  return cudaGetErrorName(e);
}
template <typename F>
static inline cudaError_t cudaFuncSetAttribute(F *fn, cudaFuncAttribute attr,
                                               int value) {
  return pvl_emu::set_func_attr(reinterpret_cast<const void *>(fn), (int)attr,
                                value);
}
static inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n,
                                          cudaStream_t s = nullptr) {
  (void)s;
  memset(p, v, n);
  return cudaSuccess;
}
static inline cudaError_t cudaGetDevice(int *dev) {
  *dev = 0;
  return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr attr,
                                                 int dev) {
  (void)dev;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = pvl_emu::device_sms();
  return cudaSuccess;
}

#endif /* PVL_CUDA_EMU_H */
