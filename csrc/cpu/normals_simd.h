// Philox normals for the CPU kernels: philox_simd.h's words -> Box-Muller, vectorized over blocks.
//
// philox.h defines the stream (philox4x32_10, uint_to_uniform); the Box-Muller transform here uses branch-free
// float32 log / sin / cos (Cephes polynomials, S. Moshier) instead of libm's scalar logf / sinf / cosf, which do
// not vectorize.  The polynomials are evaluated with fused multiply-adds: half the operations of separate
// multiplies and adds, and as accurate (max 3 ulp of the normal against the float64 oracle fastdiff.rng over 4M
// normals, for both), so these normals agree with fastdiff.rng and libm (philox.h's philox_normals4) to a few ulp,
// like every backend's.
//
// Three implementations of exactly the same float32 operations in the same order, hence the same bits on every
// machine (tested bit for bit):
//   normals_blocks_portable: plain C++ loops over a chunk that g++ vectorizes (std::fma: vfmadd where the ISA has
//     it, else libm's correctly rounded fma);
//   normals_blocks_avx512:   AVX-512F intrinsics with Philox and Box-Muller fused in registers.  Per 8 blocks the
//     Philox words (w0, w2) and (w1, w3) are merged into one zmm each, so one Box-Muller pass gives all 32
//     normals; the counters are laid out [0, 4, 1, 5, 2, 6, 3, 7] so that two unpacks interleave them into memory
//     order;
//   normals_blocks_avx2:     the same on ymm (AVX2 + FMA, 4 blocks per ymm, counters [0, 2, 1, 3]), software-
//     pipelined in three stages over groups of 8 blocks: the Philox rounds of one group run interleaved with the
//     log of the group before and the rest of Box-Muller of the one before that (on a 4-pipe core neither the
//     integer Philox nor the float Box-Muller fills the pipes alone, and no dependency chain is then longer than
//     Philox's).
// normals_blocks() picks the widest path compiled: each is faster than the portable loops, and fused multiply-adds
// are faster than separate multiplies and adds (benchmarks/README.md has the numbers).
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
static FD_SIMD_INLINE float log_f32(float v) {
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
static FD_SIMD_INLINE void sincos_f32(float t, float& s, float& c) {
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
static FD_SIMD_INLINE __m512 ps(float v) { return _mm512_set1_ps(v); }
static FD_SIMD_INLINE __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
static FD_SIMD_INLINE __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
static FD_SIMD_INLINE __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
static FD_SIMD_INLINE __m512 fma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }

static FD_SIMD_INLINE __m512 uniform_avx512(__m512i w) {  // uint_to_uniform: ~i for negative i is i ^ (i >> 31)
  const __m512i i = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return mul(_mm512_cvtepi32_ps(i), ps(4.6566127342e-10f));
}

static FD_SIMD_INLINE __m512 log_avx512(__m512 v) {
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

static FD_SIMD_INLINE void sincos_avx512(__m512 t, __m512& s, __m512& c) {
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

#if defined(__AVX2__) && defined(__FMA__)
// The same operations on 8 lanes of a ymm (AVX2 + FMA), so the same bits.  Box-Muller is split into stages
// (BoxMuller8) so that normals_blocks_avx2 can interleave them with the Philox rounds of the next blocks: Philox
// is integer multiplies, shifts and XORs, Box-Muller is float multiply-adds, and out-of-order execution cannot
// overlap the two when each comes as one long run (one Philox step is ~160 operations).
static FD_SIMD_INLINE __m256 ps8(float v) { return _mm256_set1_ps(v); }
static FD_SIMD_INLINE __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
static FD_SIMD_INLINE __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
static FD_SIMD_INLINE __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
static FD_SIMD_INLINE __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }

static FD_SIMD_INLINE __m256 uniform_avx2(__m256i w) {  // uint_to_uniform: ~i for negative i is i ^ (i >> 31)
  const __m256i i = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return mul(_mm256_cvtepi32_ps(i), ps8(4.6566127342e-10f));
}

// Box-Muller of 8 pairs (radius word, angle word), stage by stage: log_f32 and sincos_f32 above, operation for
// operation.
struct BoxMuller8 {
  __m256 f, e, f2, y;  // ln u = e ln 2 + f + y: v = 2^e (1 + f), f2 = f^2, y the polynomial
  __m256 r;            // the radius sqrt(-2 ln u)
  __m256 t, q;         // the angle 2 pi u and its remainder after the multiple j of pi/2
  __m256i j;
  __m256 sp, cp;       // the polynomials of sin q, cos q
};

static FD_SIMD_INLINE void bm_log_begin(BoxMuller8& s, __m256i wa) {
  const __m256 v = _mm256_max_ps(uniform_avx2(wa), ps8(1e-7f));
  const __m256i off = _mm256_set1_epi32(0x3F3504F3);
  const __m256i ix = _mm256_sub_epi32(_mm256_castps_si256(v), off);
  s.e = _mm256_cvtepi32_ps(_mm256_srai_epi32(ix, 23));
  const __m256i fb = _mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007FFFFF)), off);
  s.f = sub(_mm256_castsi256_ps(fb), ps8(1.0f));
  s.f2 = mul(s.f, s.f);
  s.y = fma(ps8(7.0376836292E-2f), s.f, ps8(-1.1514610310E-1f));
}
static FD_SIMD_INLINE void bm_log_horner3(BoxMuller8& s, float c0, float c1, float c2) {
  s.y = fma(s.y, s.f, ps8(c0));
  s.y = fma(s.y, s.f, ps8(c1));
  s.y = fma(s.y, s.f, ps8(c2));
}
static FD_SIMD_INLINE void bm_log_end(BoxMuller8& s) {
  s.y = fma(s.y, s.f, ps8(3.3333331174E-1f));
  s.y = mul(mul(s.y, s.f), s.f2);
  s.y = fma(ps8(-2.12194440E-4f), s.e, s.y);
  s.y = fma(ps8(-0.5f), s.f2, s.y);
}
static FD_SIMD_INLINE void bm_radius(BoxMuller8& s) {
  const __m256 ln = fma(ps8(0.693359375f), s.e, add(s.f, s.y));
  s.r = _mm256_sqrt_ps(mul(ps8(-2.0f), ln));
}
static FD_SIMD_INLINE void bm_angle_begin(BoxMuller8& s, __m256i wb) {
  s.t = mul(ps8(6.2831855f), uniform_avx2(wb));
  const __m256i j = _mm256_cvttps_epi32(mul(s.t, ps8(1.27323954473516f)));
  s.j = _mm256_and_si256(_mm256_add_epi32(j, _mm256_set1_epi32(1)), _mm256_set1_epi32(~1));
}
static FD_SIMD_INLINE void bm_angle_reduce(BoxMuller8& s) {
  const __m256 y = _mm256_cvtepi32_ps(s.j);
  s.q = fma(y, ps8(-3.77489497744594108e-8f), fma(y, ps8(-2.4187564849853515625e-4f), fma(y, ps8(-0.78515625f), s.t)));
}
static FD_SIMD_INLINE void bm_angle_poly(BoxMuller8& s) {
  const __m256 z = mul(s.q, s.q);
  __m256 sp = ps8(-1.9515295891E-4f);
  sp = fma(sp, z, ps8(8.3321608736E-3f));
  sp = fma(sp, z, ps8(-1.6666654611E-1f));
  s.sp = fma(mul(sp, z), s.q, s.q);
  __m256 cp = ps8(2.443315711809948E-5f);
  cp = fma(cp, z, ps8(-1.388731625493765E-3f));
  cp = fma(cp, z, ps8(4.166664568298827E-2f));
  s.cp = fma(fma(cp, z, ps8(-0.5f)), z, ps8(1.0f));
}
// The normals r cos, r sin.  Quadrant q = (j >> 1) & 3 (j even): swap where bit 1 of j is set (vblendvps reads
// the sign bit: bit 1 << 30); sin negated where bit 2 of j is set, cos where bit 2 of j + 2 is: XORs of the sign
// bit (bit 2 << 29 = bit 31).
static FD_SIMD_INLINE void bm_finish(const BoxMuller8& s, __m256& rc, __m256& rs) {
  const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(s.j, 30));
  const __m256 sv = _mm256_blendv_ps(s.sp, s.cp, swap), cv = _mm256_blendv_ps(s.cp, s.sp, swap);
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
  const __m256i j2 = _mm256_add_epi32(s.j, _mm256_set1_epi32(2));
  const __m256 sn = _mm256_xor_ps(sv, _mm256_and_ps(_mm256_castsi256_ps(_mm256_slli_epi32(s.j, 29)), sign));
  const __m256 cs = _mm256_xor_ps(cv, _mm256_and_ps(_mm256_castsi256_ps(_mm256_slli_epi32(j2, 29)), sign));
  rc = mul(s.r, cs);
  rs = mul(s.r, sn);
}

// 4 blocks of Philox words in the 64-bit-lane layout (philox_simd.h): x, y, z, w hold words 0-3 of block
// order[i] in the low half of 64-bit lane i.
struct Philox4 {
  __m256i x, y, z, w;
};

// (w0, w2) and (w1, w3) of each block side by side: the odd 32-bit elements take w2 / w3 (the low halves of z /
// w); the even elements keep w0 / w1.  Box-Muller on the pairs gives [n0, n2] and [n1, n3] of each block.
static FD_SIMD_INLINE __m256i radius_words(const Philox4& p) {
  return _mm256_blend_epi32(p.x, _mm256_shuffle_epi32(p.z, 0xA0), 0xAA);  // [0,0,2,2]
}
static FD_SIMD_INLINE __m256i angle_words(const Philox4& p) {
  return _mm256_blend_epi32(p.y, _mm256_shuffle_epi32(p.w, 0xA0), 0xAA);
}

// The 16 normals of 4 blocks at dst: the 64-bit lanes hold blocks [0, 2, 1, 3], so per 128-bit lane k unpacklo
// gives [n0 n1 n2 n3] of block k and unpackhi that of block 2 + k: blocks 0-1, then 2-3, in memory order.  Only
// the first `left` blocks are stored (left >= 4: all).
static FD_SIMD_INLINE void store_normals4(float* dst, __m256 rc, __m256 rs, int64_t left) {
  const __m256 lo = _mm256_unpacklo_ps(rc, rs), hi = _mm256_unpackhi_ps(rc, rs);
  if (left >= 4) {
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
  } else if (left > 0) {  // vmaskmovps writes the lanes whose mask has the sign bit set
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int nlo = (int)std::min<int64_t>(left, 2), nhi = (int)left - nlo;
    _mm256_maskstore_ps(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(4 * nlo), lane), lo);
    if (nhi > 0) _mm256_maskstore_ps(dst + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(4 * nhi), lane), hi);
  }
}

// Philox of 8 blocks (two Philox4): counters of blocks base + [0, 8), then one round
static FD_SIMD_INLINE void philox8_begin(Philox4* p, uint64_t base, __m256i order, uint32_t draw) {
  for (int v = 0; v < 2; ++v) philox_counters_avx2(base + 4 * v, order, draw, 0u, p[v].x, p[v].y, p[v].z, p[v].w);
}
static FD_SIMD_INLINE void philox8_round(Philox4* p, __m256i ka, __m256i kb) {
  for (int v = 0; v < 2; ++v) philox_round_avx2(p[v].x, p[v].y, p[v].z, p[v].w, ka, kb);
}

// The round keys of a call, broadcast.
struct PhiloxKeys {
  __m256i a[10], b[10];
};

// One step of normals_blocks_avx2's three-stage pipeline, on groups of 8 blocks (two Philox4 / BoxMuller8): the
// Philox rounds of the next group (NEXT), the log of the current group (s, from its radius words wa), and the
// radius, angle and normals of the previous group (PREV: t, with its angle words wbp), stored at dst (`left`
// blocks).  The three are independent; their stages alternate so that integer and float work mix.  (Written out
// per BoxMuller8: g++'s register allocation, hence the speed, changes with small rewrites of this function;
// benchmark any change, e.g. with tests/cpu_rng_probe.cpp's normals_fast.)
template <bool NEXT, bool PREV>
static FD_SIMD_INLINE void normals_pipeline_step(Philox4* p, const PhiloxKeys& k, uint64_t next_base, __m256i order,
                                                 uint32_t draw, BoxMuller8* s, const __m256i* wa, BoxMuller8* t,
                                                 const __m256i* wbp, float* dst, int64_t left) {
  if (NEXT) {
    philox8_begin(p, next_base, order, draw);
    philox8_round(p, k.a[0], k.b[0]);
  }
  if (PREV) {
    bm_radius(t[0]);
    bm_radius(t[1]);
    bm_angle_begin(t[0], wbp[0]);
    bm_angle_begin(t[1], wbp[1]);
  }
  if (NEXT) philox8_round(p, k.a[1], k.b[1]);
  bm_log_begin(s[0], wa[0]);
  bm_log_begin(s[1], wa[1]);
  if (NEXT) philox8_round(p, k.a[2], k.b[2]);
  if (PREV) {
    bm_angle_reduce(t[0]);
    bm_angle_reduce(t[1]);
  }
  if (NEXT) philox8_round(p, k.a[3], k.b[3]);
  bm_log_horner3(s[0], 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f);
  bm_log_horner3(s[1], 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f);
  if (NEXT) philox8_round(p, k.a[4], k.b[4]);
  if (PREV) {
    bm_angle_poly(t[0]);
    bm_angle_poly(t[1]);
  }
  if (NEXT) philox8_round(p, k.a[5], k.b[5]);
  bm_log_horner3(s[0], -1.6668057665E-1f, 2.0000714765E-1f, -2.4999993993E-1f);
  bm_log_horner3(s[1], -1.6668057665E-1f, 2.0000714765E-1f, -2.4999993993E-1f);
  if (NEXT) philox8_round(p, k.a[6], k.b[6]);
  if (PREV) {
    __m256 rc, rs;
    bm_finish(t[0], rc, rs);
    store_normals4(dst, rc, rs, left);
    bm_finish(t[1], rc, rs);
    store_normals4(dst + 16, rc, rs, left - 4);
  }
  if (NEXT) philox8_round(p, k.a[7], k.b[7]);
  bm_log_end(s[0]);
  bm_log_end(s[1]);
  if (NEXT) {
    philox8_round(p, k.a[8], k.b[8]);
    philox8_round(p, k.a[9], k.b[9]);
  }
}

// The radius, angle and normals of a group whose log is done (the last group), `left` blocks.
static FD_SIMD_INLINE void normals_group_finish(BoxMuller8* t, const __m256i* wb, float* dst, int64_t left) {
  for (int v = 0; v < 2; ++v) {
    if (left - 4 * v <= 0) break;
    bm_radius(t[v]);
    bm_angle_begin(t[v], wb[v]);
    bm_angle_reduce(t[v]);
    bm_angle_poly(t[v]);
    __m256 rc, rs;
    bm_finish(t[v], rc, rs);
    store_normals4(dst + 16 * v, rc, rs, left - 4 * v);
  }
}

// Philox + Box-Muller fused in registers, software-pipelined over groups of 8 blocks in three stages: while the
// Philox rounds of group g + 1 run, group g goes through the log and group g - 1 through the radius (sqrt), the
// angle and the stores.  Box-Muller's dependency chain (~90 cycles: uniform, the log's 9 dependent multiply-adds,
// the sqrt) is thus cut in two, and no chain within a step is longer than Philox's 10 rounds (~50 cycles).  With
// Box-Muller whole in one step (two stages) that chain set the pace: a step's ~380 instructions exceed the
// reorder window, so out-of-order execution cannot overlap consecutive steps (llvm-mca's Zen 3 model: 134 cycles
// per 32 normals against a resource bound of 87.5; measured 1.44 ns per normal on one core, 1.24 ns now).
static inline void normals_blocks_avx2(uint64_t seed, uint32_t draw, uint64_t blk0, int64_t nb, float* __restrict z) {
  if (nb <= 0) return;
  const __m256i order = _mm256_setr_epi64x(0, 2, 1, 3);
  PhiloxKeys k;
  {
    uint32_t a = (uint32_t)seed, b = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      if (round) {
        a += PHILOX_W0;
        b += PHILOX_W1;
      }
      k.a[round] = _mm256_set1_epi32((int)a);
      k.b[round] = _mm256_set1_epi32((int)b);
    }
  }
  const int64_t groups = (nb + 7) / 8;
  Philox4 p[2];
  philox8_begin(p, blk0, order, draw);
  for (int round = 0; round < 10; ++round) philox8_round(p, k.a[round], k.b[round]);
  BoxMuller8 s[2], t[2];         // the current group (log), the previous one (radius, angle, normals)
  __m256i wa[2], wb[2], wbp[2];  // radius / angle words of the current group, angle words of the previous one
  auto take_words = [&]() {
    for (int v = 0; v < 2; ++v) {
      wa[v] = radius_words(p[v]);
      wb[v] = angle_words(p[v]);
    }
  };
  take_words();
  if (groups == 1) {
    bm_log_begin(s[0], wa[0]);
    bm_log_begin(s[1], wa[1]);
    for (int v = 0; v < 2; ++v) {
      bm_log_horner3(s[v], 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f);
      bm_log_horner3(s[v], -1.6668057665E-1f, 2.0000714765E-1f, -2.4999993993E-1f);
      bm_log_end(s[v]);
    }
    normals_group_finish(s, wb, z, nb);
    return;
  }
  normals_pipeline_step<true, false>(p, k, blk0 + 8, order, draw, s, wa, t, wbp, z, 0);  // log 0, Philox 1
  for (int64_t g = 1; g + 1 < groups; ++g) {
    t[0] = s[0];
    t[1] = s[1];
    wbp[0] = wb[0];
    wbp[1] = wb[1];
    take_words();
    normals_pipeline_step<true, true>(p, k, blk0 + (uint64_t)(8 * (g + 1)), order, draw, s, wa, t, wbp,
                                      z + 32 * (g - 1), 8);
  }
  t[0] = s[0];
  t[1] = s[1];
  wbp[0] = wb[0];
  wbp[1] = wb[1];
  take_words();
  normals_pipeline_step<false, true>(p, k, 0, order, draw, s, wa, t, wbp, z + 32 * (groups - 2), 8);
  normals_group_finish(s, wb, z + 32 * (groups - 1), nb - 8 * (groups - 1));
}
#endif

// Normals of blocks [blk0, blk0 + nb) of (seed, draw, stream 0): z[4 j + lane], nb <= NORMALS_MAX_BLOCKS.
static inline void normals_blocks(uint64_t seed, uint32_t draw, uint64_t blk0, int64_t nb, float* __restrict z) {
#if defined(__AVX512F__)
  normals_blocks_avx512(seed, draw, blk0, nb, z);
#elif defined(__AVX2__) && defined(__FMA__)
  normals_blocks_avx2(seed, draw, blk0, nb, z);
#else
  normals_blocks_portable(seed, draw, blk0, nb, z);
#endif
}

// The path normals_blocks takes: "avx512", "avx2" or "portable".
static inline const char* normals_blocks_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace simd
}  // namespace fastdiff
