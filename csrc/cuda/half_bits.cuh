// IEEE half <-> float conversions on fp16's raw 16 bits, in PTX (cvt), for csrc/cuda/step.cu.  Kept apart from
// cuda_fp16.h (which NVRTC would need on its include path): two instructions are all the kernels use.
#pragma once

__device__ __forceinline__ float fd_half_bits_to_float(unsigned short v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

__device__ __forceinline__ unsigned short fd_float_to_half_bits(float f) {
  unsigned short v;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));  // round to nearest even
  return v;
}
