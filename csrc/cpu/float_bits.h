// float <-> IEEE bit pattern, by memcpy (no aliasing UB); shared by the storage conversions and the SIMD normals.
#pragma once

#include <stdint.h>
#include <string.h>

namespace fastdiff {

static inline float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

}  // namespace fastdiff
