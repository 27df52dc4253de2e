// Philox4x32-10 over runs of consecutive blocks, hand-vectorized for the CPU kernel's noise loop.
//
// The SAME stream as philox.h's philox4x32_10 (the single scalar definition; tests check these words against it
// and fastdiff.rng bit for bit): counter = (block lo, block hi, c2, c3) for block = blk0 + j, key = (k0, k1).
// g++ compiles philox.h's 32x32->64 products into vpmovzxdq + vpmullq when it auto-vectorizes them; here the
// products are vpmuludq (_mm512_mul_epu32 / _mm256_mul_epu32) on the even and the odd 32-bit lanes, whose low and
// high halves are put back in place with a shift and a blend:
//   AVX-512F (__AVX512F__): 16 counters per zmm;   AVX2 (__AVX2__): 8 counters per ymm;   else philox.h per block.
// philox_blocks() picks the widest compiled; the per-ISA entry points exist where compiled (for the tests).
#pragma once
#include <stdint.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "philox.h"

// The register-level helpers below must be inlined into their loops (their arguments are registers, their state
// lives in registers): in a large translation unit (the extension's bindings.cpp, with every storage type's kernels)
// g++'s inliner otherwise leaves some as calls, with the state passed through memory (seen: a third slower).
#if defined(__GNUC__)
#define FD_SIMD_INLINE inline __attribute__((always_inline))
#else
#define FD_SIMD_INLINE inline
#endif

namespace fastdiff {
namespace simd {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;

// Scalar: philox.h, one block at a time (also the tail of the AVX2 path).
static inline void philox_blocks_scalar(uint64_t blk0, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int64_t nb,
                                 uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  for (int64_t j = 0; j < nb; ++j) {
    const uint64_t blk = blk0 + (uint64_t)j;
    const uint4x32 r = philox4x32_10({(uint32_t)blk, (uint32_t)(blk >> 32), c2, c3}, k0, k1);
    w0[j] = r.x;
    w1[j] = r.y;
    w2[j] = r.z;
    w3[j] = r.w;
  }
}

#if defined(__AVX512F__)
// Each word of 8 counters lives in the low halves of a zmm's 64-bit lanes: _mm512_mul_epu32 (which reads only the
// low halves) gives the 8 full products, hi = the products' high halves moved down by a vpshufd (port 5, beside
// the multiplies on port 0), lo = the products themselves.  The high halves of the lanes carry garbage that no
// multiply reads and XOR never moves into a low half; the low halves hold exactly philox.h's words.
static FD_SIMD_INLINE __m512i hi_to_lo(__m512i p) { return _mm512_shuffle_epi32(p, (_MM_PERM_ENUM)0xF5); }  // [1,1,3,3]

// 10 Philox rounds on V independent zmm of 8 counters each (words x, y, z, w in the low halves of the 64-bit
// lanes; the V chains hide vpmuludq's latency).  Shared by the raw stream below and the normals (normals_simd.h).
template <int V>
static FD_SIMD_INLINE void philox_rounds_avx512(__m512i* x, __m512i* y, __m512i* z, __m512i* w, uint32_t k0,
                                                uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(PHILOX_M0), m1 = _mm512_set1_epi64(PHILOX_M1);
  uint32_t ka = k0, kb = k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    if (round) {
      ka += PHILOX_W0;
      kb += PHILOX_W1;
    }
    const __m512i vka = _mm512_set1_epi32((int)ka), vkb = _mm512_set1_epi32((int)kb);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m512i p0 = _mm512_mul_epu32(x[v], m0), p1 = _mm512_mul_epu32(z[v], m1);
      x[v] = _mm512_ternarylogic_epi32(hi_to_lo(p1), y[v], vka, 0x96);  // hi1 ^ y ^ ka
      z[v] = _mm512_ternarylogic_epi32(hi_to_lo(p0), w[v], vkb, 0x96);  // hi0 ^ w ^ kb
      y[v] = p1;                                                        // lo1
      w[v] = p0;                                                        // lo0
    }
  }
}

// Counters of 8 blocks: 64-bit lanes block = base + lanes[i] (the carry into the high word comes with the 64-bit
// add), word 2 = c2, word 3 = c3.
static FD_SIMD_INLINE void philox_counters_avx512(uint64_t base, __m512i lanes, uint32_t c2, uint32_t c3, __m512i& x,
                                                  __m512i& y, __m512i& z, __m512i& w) {
  const __m512i blk = _mm512_add_epi64(_mm512_set1_epi64((long long)base), lanes);
  x = blk;                           // low half: block lo
  y = _mm512_srli_epi64(blk, 32);    // block hi
  z = _mm512_set1_epi64(c2);
  w = _mm512_set1_epi64(c3);
}

static inline void philox_blocks_avx512(uint64_t blk0, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int64_t nb,
                                 uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  constexpr int V = 4;  // 4 zmm of 8 counters per step
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t j = 0; j < nb; j += 8 * V) {
    __m512i x[V], y[V], z[V], w[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      philox_counters_avx512(blk0 + (uint64_t)(j + 8 * v), iota, c2, c3, x[v], y[v], z[v], w[v]);
    philox_rounds_avx512<V>(x, y, z, w, k0, k1);
#pragma GCC unroll 2
    for (int v = 0; v < V; v += 2) {  // pack the low halves of two zmm: 16 consecutive blocks
      const int64_t o = j + 8 * v, left = nb - o;
      const __m512i r0 = _mm512_permutex2var_epi32(x[v], evens, x[v + 1]);
      const __m512i r1 = _mm512_permutex2var_epi32(y[v], evens, y[v + 1]);
      const __m512i r2 = _mm512_permutex2var_epi32(z[v], evens, z[v + 1]);
      const __m512i r3 = _mm512_permutex2var_epi32(w[v], evens, w[v + 1]);
      if (left >= 16) {
        _mm512_storeu_si512((void*)(w0 + o), r0);
        _mm512_storeu_si512((void*)(w1 + o), r1);
        _mm512_storeu_si512((void*)(w2 + o), r2);
        _mm512_storeu_si512((void*)(w3 + o), r3);
      } else if (left > 0) {
        const __mmask16 keep = (__mmask16)((1u << left) - 1u);
        _mm512_mask_storeu_epi32((void*)(w0 + o), keep, r0);
        _mm512_mask_storeu_epi32((void*)(w1 + o), keep, r1);
        _mm512_mask_storeu_epi32((void*)(w2 + o), keep, r2);
        _mm512_mask_storeu_epi32((void*)(w3 + o), keep, r3);
      }
    }
  }
}
#endif

#if defined(__AVX2__)
// Two layouts on ymm.  The raw words (philox_blocks_avx2) keep one word of 8 counters per ymm: the products of the
// even and the odd 32-bit lanes are put back in place with shifts and blends (18 operations per round and 8
// counters, and the 8 words are ready to store).  The fused normals (normals_simd.h) use the AVX-512 layout on
// ymm instead: each word of 4 counters in the low halves of the 64-bit lanes, so that one _mm256_mul_epu32 gives
// the 4 full products and hi = their high halves moved down (16 operations per round and 8 counters; the words
// come out as pairs of 64-bit lanes, which is what Box-Muller pairs up anyway).
static FD_SIMD_INLINE __m256i hi_to_lo(__m256i p) { return _mm256_shuffle_epi32(p, 0xF5); }  // [1,1,3,3]

// Counters of 4 blocks in the 64-bit-lane layout: block = base + lanes[i] (the carry into the high word comes with
// the 64-bit add), word 2 = c2, word 3 = c3.
static FD_SIMD_INLINE void philox_counters_avx2(uint64_t base, __m256i lanes, uint32_t c2, uint32_t c3, __m256i& x,
                                                __m256i& y, __m256i& z, __m256i& w) {
  const __m256i blk = _mm256_add_epi64(_mm256_set1_epi64x((long long)base), lanes);
  x = blk;                         // low half: block lo
  y = _mm256_srli_epi64(blk, 32);  // block hi
  z = _mm256_set1_epi64x(c2);
  w = _mm256_set1_epi64x(c3);
}

// One Philox round on 4 counters in the 64-bit-lane layout, round keys (ka, kb) broadcast to every 32-bit lane.
// The high halves of the lanes carry garbage that no multiply reads and XOR never moves into a low half.
static FD_SIMD_INLINE void philox_round_avx2(__m256i& x, __m256i& y, __m256i& z, __m256i& w, __m256i ka, __m256i kb) {
  const __m256i p0 = _mm256_mul_epu32(x, _mm256_set1_epi64x(PHILOX_M0));
  const __m256i p1 = _mm256_mul_epu32(z, _mm256_set1_epi64x(PHILOX_M1));
  x = _mm256_xor_si256(hi_to_lo(p1), _mm256_xor_si256(y, ka));  // hi1 ^ y ^ ka (the key XOR off the mul's chain)
  z = _mm256_xor_si256(hi_to_lo(p0), _mm256_xor_si256(w, kb));  // hi0 ^ w ^ kb
  y = p1;                                                        // lo1
  w = p0;                                                        // lo0
}

static FD_SIMD_INLINE void mulhilo_x8(__m256i a, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i pe = _mm256_mul_epu32(a, m);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

static inline void philox_blocks_avx2(uint64_t blk0, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int64_t nb,
                               uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  constexpr int V = 2;  // ymm per step: two independent chains (16 ymm registers: 8 for the state)
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
  const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
  int64_t j = 0;
  for (; j + 8 * V <= nb; j += 8 * V) {
    __m256i x[V], y[V], z[V], w[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t b = blk0 + (uint64_t)(j + 8 * v);
      const __m256i blo = _mm256_set1_epi32((int)(uint32_t)b), bhi = _mm256_set1_epi32((int)(uint32_t)(b >> 32));
      x[v] = _mm256_add_epi32(blo, iota);
      // carry where x < blo unsigned (signed compare with the sign bits flipped); cmpgt gives -1: subtract it
      const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(blo, sign), _mm256_xor_si256(x[v], sign));
      y[v] = _mm256_sub_epi32(bhi, carry);
      z[v] = _mm256_set1_epi32((int)c2);
      w[v] = _mm256_set1_epi32((int)c3);
    }
    uint32_t ka = k0, kb = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      if (round) {
        ka += PHILOX_W0;
        kb += PHILOX_W1;
      }
      const __m256i vka = _mm256_set1_epi32((int)ka), vkb = _mm256_set1_epi32((int)kb);
      for (int v = 0; v < V; ++v) {
        __m256i lo0, hi0, lo1, hi1;
        mulhilo_x8(x[v], m0, lo0, hi0);
        mulhilo_x8(z[v], m1, lo1, hi1);
        x[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, y[v]), vka);
        z[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, w[v]), vkb);
        y[v] = lo1;
        w[v] = lo0;
      }
    }
    for (int v = 0; v < V; ++v) {
      const int64_t o = j + 8 * v;
      _mm256_storeu_si256((__m256i*)(w0 + o), x[v]);
      _mm256_storeu_si256((__m256i*)(w1 + o), y[v]);
      _mm256_storeu_si256((__m256i*)(w2 + o), z[v]);
      _mm256_storeu_si256((__m256i*)(w3 + o), w[v]);
    }
  }
  philox_blocks_scalar(blk0 + (uint64_t)j, c2, c3, k0, k1, nb - j, w0 + j, w1 + j, w2 + j, w3 + j);
}
#endif

// Words of blocks [blk0, blk0 + nb): w_i[j] = word i of philox4x32_10((blk0 + j lo, hi, c2, c3), k0, k1).
static inline void philox_blocks(uint64_t blk0, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, int64_t nb,
                          uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
#if defined(__AVX512F__)
  philox_blocks_avx512(blk0, c2, c3, k0, k1, nb, w0, w1, w2, w3);
#elif defined(__AVX2__)
  philox_blocks_avx2(blk0, c2, c3, k0, k1, nb, w0, w1, w2, w3);
#else
  philox_blocks_scalar(blk0, c2, c3, k0, k1, nb, w0, w1, w2, w3);
#endif
}

// The path philox_blocks takes: "avx512", "avx2" or "scalar".
static inline const char* philox_blocks_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace simd
}  // namespace fastdiff
