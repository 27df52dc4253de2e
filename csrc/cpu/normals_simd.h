// Philox normals for the CPU kernels: philox_simd.h's words -> Box-Muller, vectorized over blocks.
//
// philox.h defines the stream (philox4x32_10, uint_to_uniform); the Box-Muller transform here uses branch-free
// float32 log / sin / cos (Cephes polynomials, S. Moshier) instead of libm's scalar logf / sinf / cosf, which do
// not vectorize.  The polynomials are evaluated with fused multiply-adds: half the operations of separate
// multiplies and adds, and as accurate (max 3 ulp of the normal against the float64 oracle fastdiff.rng over 4M
// normals, for both), so these normals agree with fastdiff.rng and libm (philox.h's philox_normals4) to a few ulp,
// like every backend's.
//
// Two implementations of exactly the same float32 operations in the same order, hence the same bits (tested):
//   normals_blocks_portable: plain C++ loops over a chunk that g++ vectorizes (std::fma: vfmadd where the ISA has
//     it, else libm's correctly rounded fma);
//   normals_blocks_avx512:   AVX-512F intrinsics with Philox and Box-Muller fused in registers.  Per 8 blocks the
//     Philox words (w0, w2) and (w1, w3) are merged into one zmm each, so one Box-Muller pass gives all 32
//     normals; the counters are laid out [0, 4, 1, 5, 2, 6, 3, 7] so that two unpacks interleave them into memory
//     order.
// normals_blocks() picks the AVX-512 path where compiled: it is the faster of the two, and fused multiply-adds are
// faster than separate multiplies and adds (benchmarks/README.md has the numbers).
#pragma once
#include <stdint.h>
#include <string.h>

#include "float_bits.h"

#include <algorithm>
#include <cmath>

#include "philox.h"
#include "philox_simd.h"

namespace fastdiff {
namespace simd {

constexpr int64_t NORMALS_MAX_BLOCKS = 64;  // blocks per call (the kernels' chunk of 256 elements)

using fastdiff::bits_from_f32;
using fastdiff::f32_from_bits;

// natural log of a positive normal float.  v = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)), found with integer
// ops only (offsetting the bits by those of sqrt(1/2)); the same e, f as Cephes' frexp-and-compare, without a branch.
static inline float log_f32(float v) {
  const uint32_t ix = bits_from_f32(v) - 0x3F3504F3u;
  const float e = (float)((int32_t)ix >> 23);
  const float f = f32_from_bits((ix & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;  // exact (Sterbenz)
  const float z = f * f;
  float y = 7.0376836292E-2f;
  y = std::fma(y, f, -1.1514610310E-1f);
  y = std::fma(y, f, 1.1676998740E-1f);
  y = std::fma(y, f, -1.2420140846E-1f);
  y = std::fma(y, f, 1.4249322787E-1f);
  y = std::fma(y, f, -1.6668057665E-1f);
  y = std::fma(y, f, 2.0000714765E-1f);
  y = std::fma(y, f, -2.4999993993E-1f);
  y = std::fma(y, f, 3.3333331174E-1f);
  y = y * f * z;
  y = std::fma(-2.12194440E-4f, e, y);  // ln 2 = 0.693359375 - 2.12194440e-4, split so e * hi is exact
  y = std::fma(-0.5f, z, y);
  const float r = f + y;
  return std::fma(0.693359375f, e, r);
}

// sin and cos of theta in [0, 2pi): reduce by multiples of pi/2 (3-part Cody-Waite), then minimax polynomials
static inline void sincos_f32(float t, float& s, float& c) {
  int32_t j = (int32_t)(t * 1.27323954473516f);  // octant, t * 4/pi
  j = (j + 1) & ~1;                              // round up to even: nearest multiple of pi/2
  const float y = (float)j;
  const float r = std::fma(y, -3.77489497744594108e-8f,
                           std::fma(y, -2.4187564849853515625e-4f, std::fma(y, -0.78515625f, t)));
  const float z = r * r;
  float sp = -1.9515295891E-4f;
  sp = std::fma(sp, z, 8.3321608736E-3f);
  sp = std::fma(sp, z, -1.6666654611E-1f);
  sp = std::fma(sp * z, r, r);
  float cp = 2.443315711809948E-5f;
  cp = std::fma(cp, z, -1.388731625493765E-3f);
  cp = std::fma(cp, z, 4.166664568298827E-2f);
  cp = std::fma(std::fma(cp, z, -0.5f), z, 1.0f);
  const int32_t q = (j >> 1) & 3;  // quadrant: theta = q pi/2 + r
  const bool swap = (q & 1) != 0;
  const float sv = swap ? cp : sp, cv = swap ? sp : cp;
  s = (q & 2) ? -sv : sv;
  c = ((q + 1) & 2) ? -cv : cv;
}

// Normals of blocks [blk0, blk0 + nb) of (seed, draw, stream 0): z[4 j + lane], nb <= NORMALS_MAX_BLOCKS.
static inline void normals_blocks_portable(uint64_t seed, uint32_t draw, uint64_t blk0, int64_t nb,
                                           float* __restrict z) {
  constexpr int64_t NB = NORMALS_MAX_BLOCKS;
  alignas(64) uint32_t w0[NB], w1[NB], w2[NB], w3[NB];
  alignas(64) float n0[NB], n1[NB], n2[NB], n3[NB];
  philox_blocks(blk0, draw, 0u, (uint32_t)seed, (uint32_t)(seed >> 32), nb, w0, w1, w2, w3);
  for (int64_t j = 0; j < nb; ++j) {  // vectorized Box-Muller, pairs (w0, w1) and (w2, w3)
    const float ua = std::max(uint_to_uniform(w0[j]), 1e-7f);
    const float uc = std::max(uint_to_uniform(w2[j]), 1e-7f);
    const float ra = std::sqrt(-2.0f * log_f32(ua)), rc = std::sqrt(-2.0f * log_f32(uc));
    float sa, ca, sc, cc;
    sincos_f32(6.2831855f * uint_to_uniform(w1[j]), sa, ca);
    sincos_f32(6.2831855f * uint_to_uniform(w3[j]), sc, cc);
    n0[j] = ra * ca;
    n1[j] = ra * sa;
    n2[j] = rc * cc;
    n3[j] = rc * sc;
  }
  for (int64_t j = 0; j < nb; ++j) {  // interleave lanes: element 4 j + l
    z[4 * j] = n0[j];
    z[4 * j + 1] = n1[j];
    z[4 * j + 2] = n2[j];
    z[4 * j + 3] = n3[j];
  }
}

#if defined(__AVX512F__)
// The functions above on 16 lanes, operation for operation (so bit for bit).
static inline __m512 ps(float v) { return _mm512_set1_ps(v); }
static inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
static inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
static inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
static inline __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }

static inline __m512 uniform_avx512(__m512i w) {  // uint_to_uniform: ~i for negative i is i ^ (i >> 31)
  const __m512i i = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return mul(_mm512_cvtepi32_ps(i), ps(4.6566127342e-10f));
}

static inline __m512 log_avx512(__m512 v) {
  const __m512i off = _mm512_set1_epi32(0x3F3504F3);
  const __m512i ix = _mm512_sub_epi32(_mm512_castps_si512(v), off);
  const __m512 e = _mm512_cvtepi32_ps(_mm512_srai_epi32(ix, 23));
  const __m512i fb = _mm512_add_epi32(_mm512_and_si512(ix, _mm512_set1_epi32(0x007FFFFF)), off);
  const __m512 f = sub(_mm512_castsi512_ps(fb), ps(1.0f));
  const __m512 z = mul(f, f);
  __m512 y = ps(7.0376836292E-2f);
  y = fma(y, f, ps(-1.1514610310E-1f));
  y = fma(y, f, ps(1.1676998740E-1f));
  y = fma(y, f, ps(-1.2420140846E-1f));
  y = fma(y, f, ps(1.4249322787E-1f));
  y = fma(y, f, ps(-1.6668057665E-1f));
  y = fma(y, f, ps(2.0000714765E-1f));
  y = fma(y, f, ps(-2.4999993993E-1f));
  y = fma(y, f, ps(3.3333331174E-1f));
  y = mul(mul(y, f), z);
  y = fma(ps(-2.12194440E-4f), e, y);
  y = fma(ps(-0.5f), z, y);
  const __m512 r = add(f, y);
  return fma(ps(0.693359375f), e, r);
}

static inline void sincos_avx512(__m512 t, __m512& s, __m512& c) {
  __m512i j = _mm512_cvttps_epi32(mul(t, ps(1.27323954473516f)));
  j = _mm512_and_si512(_mm512_add_epi32(j, _mm512_set1_epi32(1)), _mm512_set1_epi32(~1));
  const __m512 y = _mm512_cvtepi32_ps(j);
  const __m512 r = fma(y, ps(-3.77489497744594108e-8f),
                       fma(y, ps(-2.4187564849853515625e-4f), fma(y, ps(-0.78515625f), t)));
  const __m512 z = mul(r, r);
  __m512 sp = ps(-1.9515295891E-4f);
  sp = fma(sp, z, ps(8.3321608736E-3f));
  sp = fma(sp, z, ps(-1.6666654611E-1f));
  sp = fma(mul(sp, z), r, r);
  __m512 cp = ps(2.443315711809948E-5f);
  cp = fma(cp, z, ps(-1.388731625493765E-3f));
  cp = fma(cp, z, ps(4.166664568298827E-2f));
  cp = fma(fma(cp, z, ps(-0.5f)), z, ps(1.0f));
  // quadrant q = (j >> 1) & 3 (j even): swap where q & 1 = bit 1 of j; sin negated where q & 2 = bit 2 of j; cos
  // negated where (q + 1) & 2 = bit 2 of j + 2.  The sign flips are XORs of the sign bit: bit 2 << 29 = bit 31.
  const __mmask16 swap = _mm512_test_epi32_mask(j, _mm512_set1_epi32(2));
  const __m512i sv = _mm512_castps_si512(_mm512_mask_blend_ps(swap, sp, cp));
  const __m512i cv = _mm512_castps_si512(_mm512_mask_blend_ps(swap, cp, sp));
  const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
  // ternary logic 0x78: a ^ (b & c)
  s = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sv, _mm512_slli_epi32(j, 29), sign, 0x78));
  c = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(
      cv, _mm512_slli_epi32(_mm512_add_epi32(j, _mm512_set1_epi32(2)), 29), sign, 0x78));
}

static inline void normals_blocks_avx512(uint64_t seed, uint32_t draw, uint64_t blk0, int64_t nb, float* __restrict z) {
  constexpr int V = 4;  // 4 zmm of 8 blocks per Philox step (independent chains)
  // 64-bit lane i holds block 8 v + order[i]: after Box-Muller, lane i gives the normals of that block in its two
  // 32-bit halves, and unpacklo / unpackhi put blocks 0-3 / 4-7 in memory order (see below).
  const __m512i order = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int64_t j = 0; j < nb; j += 8 * V) {
    __m512i x[V], y[V], zw[V], w[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      philox_counters_avx512(blk0 + (uint64_t)(j + 8 * v), order, draw, 0u, x[v], y[v], zw[v], w[v]);
    philox_rounds_avx512<V>(x, y, zw, w, k0, k1);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const int64_t left = nb - (j + 8 * v);  // blocks still wanted from this zmm
      if (left <= 0) break;
      // (w0, w2) and (w1, w3) of each block side by side: the odd 32-bit elements take w2 / w3 (the low halves
      // of zw / w); the even elements keep w0 / w1.
      const __m512i a = _mm512_mask_shuffle_epi32(x[v], 0xAAAA, zw[v], (_MM_PERM_ENUM)0xA0);  // [0,0,2,2]
      const __m512i b = _mm512_mask_shuffle_epi32(y[v], 0xAAAA, w[v], (_MM_PERM_ENUM)0xA0);
      // Box-Muller on 16 pairs: even elements (w0, w1) -> normals 0, 1, odd elements (w2, w3) -> normals 2, 3
      const __m512 r = _mm512_sqrt_ps(mul(ps(-2.0f), log_avx512(_mm512_max_ps(uniform_avx512(a), ps(1e-7f)))));
      __m512 sn, cs;
      sincos_avx512(mul(ps(6.2831855f), uniform_avx512(b)), sn, cs);
      const __m512 rc = mul(r, cs), rs = mul(r, sn);  // [n0, n2] and [n1, n3] of each block
      // per 128-bit lane k: unpacklo = [n0 n1 n2 n3] of the block in 64-bit lane 2k (block k), unpackhi of lane
      // 2k + 1 (block 4 + k)
      const __m512 lo = _mm512_unpacklo_ps(rc, rs), hi = _mm512_unpackhi_ps(rc, rs);
      float* dst = z + 4 * (j + 8 * v);
      if (left >= 8) {
        _mm512_storeu_ps(dst, lo);
        _mm512_storeu_ps(dst + 16, hi);
      } else {
        const int nlo = (int)std::min<int64_t>(left, 4), nhi = (int)left - nlo;
        _mm512_mask_storeu_ps(dst, (__mmask16)((1u << (4 * nlo)) - 1u), lo);
        if (nhi > 0) _mm512_mask_storeu_ps(dst + 16, (__mmask16)((1u << (4 * nhi)) - 1u), hi);
      }
    }
  }
}
#endif

// Normals of blocks [blk0, blk0 + nb) of (seed, draw, stream 0): z[4 j + lane], nb <= NORMALS_MAX_BLOCKS.
static inline void normals_blocks(uint64_t seed, uint32_t draw, uint64_t blk0, int64_t nb, float* __restrict z) {
#if defined(__AVX512F__)
  normals_blocks_avx512(seed, draw, blk0, nb, z);
#else
  normals_blocks_portable(seed, draw, blk0, nb, z);
#endif
}

// The path normals_blocks takes: "avx512" or "portable".
static inline const char* normals_blocks_isa() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace simd
}  // namespace fastdiff
