// Philox4x32-10 counter-based normals shared by the CPU (C++) and CUDA backends: one source, one stream.
//
// Layout (fastdiff/rng.py is the oracle): key = (seed lo, seed hi); counter = (block lo, block hi, draw, stream)
// where block = element // 4 of the sample's flattened (C-order) element index.  One Philox call gives 4 words;
// words (w0, w1) -> normals 0, 1 and (w2, w3) -> normals 2, 3 of the block by Box-Muller:
//   u = (int32)w < 0 ? ~(int32)w : (int32)w, times 4.6566127342e-10f      (Triton's uint_to_uniform_float)
//   r = sqrtf(-2 logf(max(u_a, 1e-7f))), theta = 6.2831855f u_b, n0 = r cos(theta), n1 = r sin(theta).
// All math float32.  Compile with contraction off (-ffp-contract=off / --fmad=false) so backends agree.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdiff {

struct uint4x32 { uint32_t x, y, z, w; };

FD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
}

FD_HD uint4x32 philox4x32_10(uint4x32 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    uint4x32 n = {hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    c = n;
  }
  return c;
}

FD_HD float uint_to_uniform(uint32_t w) {
  int32_t i = (int32_t)w;
  if (i < 0) i = ~i;  // = -i - 1 without overflow
  return (float)i * 4.6566127342e-10f;
}

// The 4 normals of block `block` for (seed, draw, stream).
FD_HD void philox_normals4(uint64_t seed, uint32_t draw, uint32_t stream, uint64_t block, float out[4]) {
  uint4x32 c = {(uint32_t)block, (uint32_t)(block >> 32), draw, stream};
  uint4x32 r = philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
  float u[4] = {uint_to_uniform(r.x), uint_to_uniform(r.y), uint_to_uniform(r.z), uint_to_uniform(r.w)};
  for (int p = 0; p < 2; ++p) {
    float ua = u[2 * p] < 1e-7f ? 1e-7f : u[2 * p];
    float rad = sqrtf(-2.0f * logf(ua));
    float theta = 6.2831855f * u[2 * p + 1];
    out[2 * p] = rad * cosf(theta);
    out[2 * p + 1] = rad * sinf(theta);
  }
}

}  // namespace fastdiff
