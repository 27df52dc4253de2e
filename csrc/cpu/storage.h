// Storage types of the CPU kernels: how an element of float32, float16, bfloat16 or float64 is kept in memory and
// converted to / from the math type (float32; float64 for float64 storage).
//
// The conversions are written with integer ops so the kernels' loops vectorize, and round as c10 does
// (round-to-nearest-even, NaN kept NaN).  No torch here: fp16 and bf16 are the tag types f16 / bf16 stored as their
// raw 16 bits.
#pragma once
#include <stdint.h>
#include <string.h>

#include "float_bits.h"

#include <cmath>

namespace fdcpu {

struct f16 {};   // IEEE half, stored as its 16 bits
struct bf16 {};  // bfloat16, stored as its 16 bits

using fastdiff::bits_from_f32;
using fastdiff::f32_from_bits;

// IEEE half -> float (branch-free, as c10::detail::fp16_ieee_to_fp32_value).
static inline float half_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized);
  return f32_from_bits(sign | r);
}

// float -> IEEE half, round to nearest even (as c10::detail::fp16_ieee_from_fp32_value).
static inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_from_f32(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = bits_from_f32(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float bf16_to_float(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_from_f32(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(f != f ? 0x7FC0u : rounded);
}

// Storage traits of T (float, double, f16, bf16): the element type in memory (S) and its conversion to / from the
// math type.
template <class T>
struct St;
template <>
struct St<float> {
  using S = float;
  static inline float get(S v) { return v; }
  static inline S put(float v) { return v; }
};
template <>
struct St<double> {
  using S = double;
  static inline double get(S v) { return v; }
  static inline S put(double v) { return v; }
};
template <>
struct St<f16> {
  using S = uint16_t;
  static inline float get(S v) { return half_to_float(v); }
  static inline S put(float v) { return float_to_half(v); }
};
template <>
struct St<bf16> {
  using S = uint16_t;
  static inline float get(S v) { return bf16_to_float(v); }
  static inline S put(float v) { return float_to_bf16(v); }
};

// load n elements of storage T as math type A
template <class T, class A>
static inline void load(const typename St<T>::S* __restrict s, A* __restrict d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = (A)St<T>::get(s[j]);
}

}  // namespace fdcpu
