/* Small kernels with one known defect each, compiled like the real kernels
 * (instrumented, PVL_EMU): the emulator must report every defect and stay
 * silent on the correct variants, or its silence on the real kernels means
 * nothing. */
#include "emu_names.h"

#include "common.cuh"
#include "emu_selftest.h"

namespace {

/* Two warps write the same words: a race unless a barrier separates them. */
__global__ void waw_kernel(int *out, bool barrier) {
  __shared__ int s[32];
  if (threadIdx.x < 32) s[threadIdx.x] = 1;
  if (barrier) __syncthreads();
  if (threadIdx.x >= 32) s[threadIdx.x - 32] = 2;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32];
}

/* Lane l writes, lane l ^ 1 reads: ordered only by a __syncwarp. */
__global__ void warp_kernel(int *out, bool syncwarp) {
  __shared__ int s[32];
  s[threadIdx.x] = (int)threadIdx.x;
  if (syncwarp) __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 1];
}

/* Reads a word nobody wrote. */
__global__ void uninit_kernel(int *out) {
  __shared__ int s[64];
  if (threadIdx.x > 0) s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

/* A full-mask shuffle after lane 3 returned. */
__global__ void exited_lane_kernel(int *out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

/* Lanes at different collectives. */
__global__ void divergent_kernel(int *out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x % 2)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = __any_sync(0xffffffffu, v);
  out[threadIdx.x] = v;
}

/* cp.async destination read before (wait) or after the wait_group. */
__global__ void cp_async_kernel(const int4_like *src, int *out, bool wait) {
  __shared__ __align__(16) int4_like s[32];
  pvlk::cp_async16(pvlk::smem_addr(&s[threadIdx.x]), src + threadIdx.x, true);
  pvlk::cp_async_commit();
  if (wait) pvlk::cp_async_wait<0>();
  out[threadIdx.x] = s[threadIdx.x].v[0];
}

/* A shuffle and a ballot that must give exact values. */
__global__ void values_kernel(int *out) {
  const int l = (int)threadIdx.x;
  const int x = __shfl_xor_sync(0xffffffffu, l * 10, 5);
  const unsigned b = __ballot_sync(0xffffffffu, l % 3 == 0);
  out[l] = x + (int)(b == 0x49249249u ? 0 : 100000);
}

} // namespace

namespace pvl_emu_selftest {

long waw(bool barrier) {
  int out[64];
  PVLK_LAUNCH((waw_kernel), 1, 64, 0, nullptr, out, barrier);
  return pvl_emu::take_errors();
}

long warp_sync(bool syncwarp) {
  int out[32];
  PVLK_LAUNCH((warp_kernel), 1, 32, 0, nullptr, out, syncwarp);
  return pvl_emu::take_errors();
}

long uninit() {
  int out[64];
  PVLK_LAUNCH((uninit_kernel), 1, 64, 0, nullptr, out);
  return pvl_emu::take_errors();
}

long exited_lane() {
  int out[32];
  PVLK_LAUNCH((exited_lane_kernel), 1, 32, 0, nullptr, out);
  return pvl_emu::take_errors();
}

long divergent() {
  int out[32];
  PVLK_LAUNCH((divergent_kernel), 1, 32, 0, nullptr, out);
  return pvl_emu::take_errors();
}

long cp_async(bool wait, bool *values_ok) {
  int4_like src[32];
  int out[32];
  for (int i = 0; i < 32; ++i) src[i] = int4_like{{i + 7, 0, 0, 0}};
  PVLK_LAUNCH((cp_async_kernel), 1, 32, 0, nullptr, src, out, wait);
  *values_ok = true;
  for (int i = 0; i < 32; ++i) *values_ok &= out[i] == i + 7;
  return pvl_emu::take_errors();
}

bool values() {
  int out[32];
  PVLK_LAUNCH((values_kernel), 1, 32, 0, nullptr, out);
  bool ok = pvl_emu::take_errors() == 0;
  for (int l = 0; l < 32; ++l) ok &= out[l] == (l ^ 5) * 10;
  return ok;
}

} // namespace pvl_emu_selftest
