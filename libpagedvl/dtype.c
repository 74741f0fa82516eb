/* fp16 and bf16 <-> fp32 conversion for the CPU backend, bit-exact with
 * CUDA's __float2half_rn / __float2bfloat16_rn (round to nearest even). */
#include <string.h>

#include "internal.h"

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

float pvl__f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    /* zero or subnormal: man * 2^-24 */
    float f = (float)man * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t pvl__f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) /* inf or nan (keep nan quiet) */
    return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
  if (abs >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
    return (uint16_t)(sign | 0x7c00u);
  if (abs < 0x38800000u) { /* below the smallest normal half: subnormal */
    /* value * 2^24 rounded to nearest even is the subnormal mantissa */
    float scaled = bits_f32(abs) * 16777216.0f;
    uint32_t m = (uint32_t)scaled;
    float rem = scaled - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return (uint16_t)(sign | m);
  }
  uint32_t exp = ((abs >> 23) - 112) << 10;
  uint32_t man = (abs >> 13) & 0x3ffu;
  uint32_t h = exp | man;
  uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

float pvl__bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t pvl__f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

void pvl__load_f32(pvl_dtype dtype, const void *src, float *dst, size_t n) {
  switch (dtype) {
  case PVL_DTYPE_F32:
    memcpy(dst, src, n * sizeof(float));
    break;
  case PVL_DTYPE_F16: {
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = pvl__f16_to_f32(s[i]);
    break;
  }
  case PVL_DTYPE_BF16: {
    const uint16_t *s = src;
    for (size_t i = 0; i < n; i++) dst[i] = pvl__bf16_to_f32(s[i]);
    break;
  }
  }
}

void pvl__store_f32(pvl_dtype dtype, const float *src, void *dst, size_t n) {
  switch (dtype) {
  case PVL_DTYPE_F32:
    memcpy(dst, src, n * sizeof(float));
    break;
  case PVL_DTYPE_F16: {
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = pvl__f32_to_f16(src[i]);
    break;
  }
  case PVL_DTYPE_BF16: {
    uint16_t *d = dst;
    for (size_t i = 0; i < n; i++) d[i] = pvl__f32_to_bf16(src[i]);
    break;
  }
  }
}
