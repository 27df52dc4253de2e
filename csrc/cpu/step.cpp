// fastdiff CPU kernels: fastdiff::step, fastdiff::add_noise, fastdiff::randn (C++17, OpenMP).
//
// Three thin layers (STYLE.md): plain-C++ kernels templated over the storage type T (float, at::Half,
// at::BFloat16, double) and the math type A (float; double for double storage); glue that checks the torch
// tensors and hands raw pointers down; pybind11 bindings.  Every kernel implements fastdiff.ops.step_reference:
//
//   D  = cx x + co out          (out = out_u + w (out_c - out_u) with cfg)
//   x' = M[0].[x, D, S] + g z (+ eps s + sqrt(2 eps) z, s = lsx x + lsD D, Langevin)
//   S_i = M[1+i].[x, D, S]      for the slots written (every right-hand side reads the values from before the step)
//
// Memory: ONE pass over x, out (both CFG halves), the slots read, x' and the slots written.  Work is split into
// OpenMP items of (sample, tile of TILE elements); an item walks its tile in CHUNKs of 256 elements.  With fp32
// (fp64) storage x, out and the slots are read straight from memory; fp16 / bf16 chunks are converted into fp32
// temporaries.  D, the noise and partial sums live in per-thread temporaries that stay in L1, so every element of
// DRAM / L3 is touched once while each inner loop is a simple unit-stride loop over a chunk.  Outputs are summed
// two terms per pass in the reference's order (three in one pass for the common a x + b D + g z), the last pass
// converting and storing; they are written in an order where none overwrites a register that a later output
// still reads (x' in place, a slot read and rewritten), with a copy to a temporary only for cyclic reads.
// Langevin stages first run a reduction pass (||z||^2, ||s||^2 per sample, double accumulators, z regenerated from
// Philox, never stored).  Dynamic thresholds (Imagen; computed by fastdiff.ops.dynamic_threshold, a reduction pass
// in torch) clamp and scale D as it is formed: D = clamp(D, -s_b, s_b) / s_b.
//
// Vectorization (checked with g++ 12 -O3 -march=native -fopt-info-vec-all on an AVX-512 Xeon): every loop over
// a chunk reports "loop vectorized using 64 byte vectors": the fp16/bf16 loads and the converting stores, D (with
// the CFG mix), the two-term output passes, the Langevin score and sums and the Box-Muller loop.  Only the control
// loops over chunks, slots and outputs stay scalar.  Philox is hand-vectorized in philox_simd.h (AVX-512: each
// word of 8 counters in a zmm's 64-bit lanes, vpmuludq + vpshufd + vpternlogd per round, 4 independent zmm per
// step; AVX2: even / odd vpmuludq, 8 counters per ymm; else philox.h per block): g++'s auto-vectorization of
// philox.h's 32x32->64 products (vpmovzxdq + vpmullq) ran at about 2 ns per normal and core on that Xeon, the
// hand-vectorized stream at about 0.4 ns, with exactly philox.h's words (tested bit for bit).  Box-Muller
// (normals_simd.h) uses branch-free float32 log / sin / cos (Cephes polynomials evaluated with explicit fma, about
// 1 ulp on the ranges used) because libm's scalar calls do not vectorize; normals agree with libm (fastdiff.rng,
// philox.h's philox_normals4) to a few ulp.  On AVX-512 Philox and Box-Muller are fused in registers.  Noise is
// still compute-bound: about 1.0 ns per normal and core (Philox 0.4 of it), against about 0.3 ns per element and
// core for an fp32 copy.
//
// Compile with -O3 -fopenmp -ffp-contract=off -fno-math-errno -fno-trapping-math -march=native (see
// fastdiff/backends/cpu.py): no FMA contraction, so fp32 results round like the torch reference (bit for bit
// where no noise is involved); the only fused multiply-adds are the explicit ones of the normals' polynomials.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "philox_simd.h"
#include "normals_simd.h"

namespace fdcpu {

constexpr int64_t CHUNK = 256;     // elements per inner chunk (multiple of 4: Philox blocks never straddle chunks)
constexpr int64_t TILE = 4096;     // elements per OpenMP work item (multiple of CHUNK)
constexpr int KMAX = 8;            // history slots supported
constexpr int ROW_HEAD = 7;        // cx, co, g, snr, r, lsx, lsD
// Work (elements; an element with noise counts NOISE_COST) below which a call runs on one thread, as torch's
// GRAIN_SIZE.  Noise is compute-bound (Philox + Box-Muller, about 1.1 ns per normal and core) where memory streams
// are not, hence the weight: an SD latent (16K elements) steps on one thread, ~1.3 us slower than on two on a quiet
// 2-core machine, but then no OpenMP barrier can wait a scheduler time slice (ms) for a core another process holds.
int64_t g_parallel_min = 1 << 15;
constexpr int64_t NOISE_COST = 8;

// ---------------------------------------------------------------------------------------------------------------
// Storage <-> math conversions, written with integer ops so the loops vectorize (same rounding as c10:
// round-to-nearest-even, NaN kept NaN).
// ---------------------------------------------------------------------------------------------------------------

using fastdiff::simd::bits_from_f32;
using fastdiff::simd::f32_from_bits;

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

// Storage traits: the element type in memory (S) and its conversion to / from the math type.
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
struct St<at::Half> {
  using S = uint16_t;
  static inline float get(S v) { return half_to_float(v); }
  static inline S put(float v) { return float_to_half(v); }
};
template <>
struct St<at::BFloat16> {
  using S = uint16_t;
  static inline float get(S v) { return bf16_to_float(v); }
  static inline S put(float v) { return float_to_bf16(v); }
};

// load n elements of storage T as math type A
template <class T, class A>
static inline void load(const typename St<T>::S* __restrict s, A* __restrict d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = (A)St<T>::get(s[j]);
}

// Philox normals of a chunk (normals_simd.h): blocks [blk0, blk0 + nb), nb <= CHUNK / 4
using fastdiff::simd::normals_blocks;
static_assert(CHUNK / 4 == fastdiff::simd::NORMALS_MAX_BLOCKS, "a chunk's normals are one normals_blocks call");

// ---------------------------------------------------------------------------------------------------------------
// The step kernel
// ---------------------------------------------------------------------------------------------------------------

template <class T, class A>
struct StepArgs {
  using S = typename St<T>::S;
  const S* x;
  S* xo;           // may equal x (in place)
  const S* out;    // [B | 2B, N]
  S* slots;        // [K, B, N]
  const A* rows;   // [B | 1, R]
  int64_t row_stride;
  const int64_t* seeds;
  const int64_t* draws;
  int64_t draw_stride;
  const A* guidance;
  int64_t guid_stride;
  const A* thresholds;  // [B] dynamic thresholds, or nullptr
  int64_t B, N;
  int K;
  unsigned reads, writes;
  bool use_out, cfg, noise, langevin;
};

// Per-thread temporaries of one chunk, in math type A (fp32 for fp32 / fp16 / bf16 storage).
template <class A>
struct Chunk {
  alignas(64) A x[CHUNK];
  alignas(64) A D[CHUNK];
  alignas(64) A acc[CHUNK];
  alignas(64) A z[CHUNK];
  alignas(64) A s[CHUNK];  // the Langevin score lsx x + lsD D
  alignas(64) float zf[CHUNK];
  alignas(64) A slot[KMAX][CHUNK];
};

template <class A>
struct Term {
  A c;
  const A* v;
};

// dst[j] = value, converted to storage when Dst is the storage type (Dst == A: a temporary, or fp32 storage)
template <class T, class A, class Dst>
static inline Dst cvt(A v) {
  if constexpr (std::is_same<Dst, A>::value) return v;
  else return St<T>::put(v);
}

// One pass over a chunk adding up to two terms: dst = [acc +] c0 v0 [+ c1 v1], in the reference's order.  dst may be
// acc, or (in place) the memory v0 / v1 come from: every iteration reads its element before writing it (ivdep).
template <class T, class A, class Dst>
static inline void pass(Dst* dst, const A* acc, const Term<A>* t, int cnt, int64_t n) {
  const A c0 = t[0].c;
  const A* v0 = t[0].v;
  if (cnt == 2) {
    const A c1 = t[1].c;
    const A* v1 = t[1].v;
    if (acc) {
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, Dst>((acc[j] + c0 * v0[j]) + c1 * v1[j]);
    } else {
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, Dst>(c0 * v0[j] + c1 * v1[j]);
    }
  } else {
    if (acc) {
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, Dst>(acc[j] + c0 * v0[j]);
    } else {
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, Dst>(c0 * v0[j]);
    }
  }
}

// dst = sum_t c_t v_t, two terms per pass through L1, the last pass converting and storing to dst.
template <class T, class A>
static void emit(typename St<T>::S* dst, const Term<A>* t, int nt, A* acc, int64_t n) {
  using S = typename St<T>::S;
  if (nt == 0) {
    for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, S>((A)0);
    return;
  }
  if (nt == 3) {  // the common noisy update a x + b D + g z in one pass, rounded as two passes would
    const A c0 = t[0].c, c1 = t[1].c, c2 = t[2].c;
    const A *v0 = t[0].v, *v1 = t[1].v, *v2 = t[2].v;
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) dst[j] = cvt<T, A, S>((c0 * v0[j] + c1 * v1[j]) + c2 * v2[j]);
    return;
  }
  int i = std::min(nt, 2);
  if (i == nt) return pass<T, A, S>(dst, nullptr, t, i, n);
  pass<T, A, A>(acc, nullptr, t, i, n);
  while (i < nt) {
    const int k = std::min(nt - i, 2);
    if (i + k == nt) pass<T, A, S>(dst, acc, t + i, k, n);
    else pass<T, A, A>(acc, acc, t + i, k, n);
    i += k;
  }
}

// Register ids: 0 = x, 1 = D, 2 + i = slot i.  Output ids: 0 = x', 1 + i = slot i.
// With fp32 (fp64) storage the kernel reads x and the slots straight from memory; then outputs are written in an
// order where none overwrites a register a later output still reads (in place, a slot read and rewritten), and a
// register is copied to a temporary only when the reads form a cycle (e.g. two slots swapped).
struct OutputOrder {
  int order[KMAX + 1];
  int n = 0;
  unsigned temps = 0;  // registers to copy into temporaries first
};

template <class T, class A>
static OutputOrder plan_outputs(const StepArgs<T, A>& p, const A* M, bool direct) {
  const int W = 2 + p.K;
  unsigned reads[KMAX + 1];
  int clobbers[KMAX + 1];
  unsigned remaining = 0;
  auto regs_read = [&](const A* row) {
    unsigned r = row[0] != (A)0 ? 1u : 0u;
    for (int i = 0; i < p.K; ++i)
      if (((p.reads >> i) & 1u) && row[2 + i] != (A)0) r |= 1u << (2 + i);
    return r;
  };
  reads[0] = regs_read(M);
  clobbers[0] = p.xo == p.x ? 0 : -1;
  remaining |= 1u;
  for (int i = 0; i < p.K; ++i) {
    if (!((p.writes >> i) & 1u)) continue;
    reads[1 + i] = regs_read(M + (1 + i) * W);
    clobbers[1 + i] = 2 + i;
    remaining |= 1u << (1 + i);
  }
  OutputOrder o;
  if (!direct) {  // every register is a temporary already
    for (int k = 0; k <= p.K; ++k)
      if ((remaining >> k) & 1u) o.order[o.n++] = k;
    return o;
  }
  while (remaining) {
    int pick = -1;
    for (int k = 0; k <= p.K && pick < 0; ++k) {
      if (!((remaining >> k) & 1u)) continue;
      const int r = clobbers[k];
      bool safe = r < 0 || ((o.temps >> r) & 1u);
      if (!safe) {
        safe = true;
        for (int q = 0; q <= p.K; ++q)
          if (q != k && ((remaining >> q) & 1u) && ((reads[q] >> r) & 1u)) safe = false;
      }
      if (safe) pick = k;
    }
    if (pick < 0) {  // a cycle: park the first remaining output's register in a temporary
      for (int k = 0; k <= p.K && pick < 0; ++k)
        if ((remaining >> k) & 1u) pick = k;
      o.temps |= 1u << clobbers[pick];
    }
    o.order[o.n++] = pick;
    remaining &= ~(1u << pick);
  }
  return o;
}

// D = cx x + co out, out = out_u + w (out_c - out_u) with cfg; one pass, storage converted on the fly.  With
// dynamic thresholds, D = clamp(D, -s, s) / s (written with compares so NaN stays NaN, as torch.clamp).
template <class T, class A>
static inline void compute_D(const StepArgs<T, A>& p, int64_t b, int64_t off, const A* c, const A* xr, A* D,
                             int64_t n) {
  using S = typename St<T>::S;
  const A cx = c[0], co = c[1];
  const S* __restrict ou = p.out + off;
  if (p.cfg) {
    const A w = p.guidance[b * p.guid_stride];
    const S* __restrict oc = p.out + p.B * p.N + off;
    for (int64_t j = 0; j < n; ++j) {
      const A u = (A)St<T>::get(ou[j]);
      D[j] = cx * xr[j] + co * (u + w * ((A)St<T>::get(oc[j]) - u));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) D[j] = cx * xr[j] + co * (A)St<T>::get(ou[j]);
  }
  if (p.thresholds) {
    const A s = p.thresholds[b];
    for (int64_t j = 0; j < n; ++j) {
      const A d = D[j];
      D[j] = (d > s ? s : (d < -s ? -s : d)) / s;
    }
  }
}

template <class A>
static inline void noise_chunk(uint64_t seed, uint32_t draw, int64_t e, int64_t n, float* zf, A* z) {
  if constexpr (std::is_same<A, float>::value) {
    normals_blocks(seed, draw, (uint64_t)e >> 2, (n + 3) >> 2, z);
    (void)zf;
  } else {
    normals_blocks(seed, draw, (uint64_t)e >> 2, (n + 3) >> 2, zf);
    for (int64_t j = 0; j < n; ++j) z[j] = (A)zf[j];
  }
}

// s = lsx x + lsD D (D = 0 without a model call)
template <class A>
static inline void score(A lsx, const A* __restrict xr, A lsD, const A* __restrict D, bool has_D, A* __restrict s,
                         int64_t n) {
  if (has_D) {
    for (int64_t j = 0; j < n; ++j) s[j] = lsx * xr[j] + lsD * D[j];
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = lsx * xr[j];
  }
}

// Langevin pass 1 over elements [e0, e1) of sample b: partial sums of z^2 and s^2 (double).
template <class T, class A>
static void langevin_sums(const StepArgs<T, A>& p, int64_t b, int64_t e0, int64_t e1, double* zz, double* ss) {
  constexpr bool direct = std::is_same<typename St<T>::S, A>::value;
  const A* c = p.rows + b * p.row_stride;
  const bool need_z = p.draws[b * p.draw_stride] >= 0;
  Chunk<A> ch;
  double sz = 0.0, sv = 0.0;
  for (int64_t e = e0; e < e1; e += CHUNK) {
    const int64_t n = std::min(CHUNK, e1 - e);
    const int64_t off = b * p.N + e;
    const A* xr;
    if constexpr (direct) {
      xr = p.x + off;
    } else {
      load<T, A>(p.x + off, ch.x, n);
      xr = ch.x;
    }
    if (p.use_out) compute_D(p, b, off, c, xr, ch.D, n);
    score(c[5], xr, c[6], ch.D, p.use_out, ch.s, n);
    double a = 0.0, q = 0.0;
#pragma omp simd reduction(+ : a)
    for (int64_t j = 0; j < n; ++j) a += (double)ch.s[j] * (double)ch.s[j];
    if (need_z) {
      noise_chunk(p.seeds[b], (uint32_t)p.draws[b * p.draw_stride], e, n, ch.zf, ch.z);
#pragma omp simd reduction(+ : q)
      for (int64_t j = 0; j < n; ++j) q += (double)ch.z[j] * (double)ch.z[j];
    }
    sv += a;
    sz += q;
  }
  *zz = sz;
  *ss = sv;
}

// The affine pass over elements [e0, e1) of sample b; eps / sq: the sample's Langevin step and sqrt(2 eps).
template <class T, class A>
static void step_range(const StepArgs<T, A>& p, int64_t b, int64_t e0, int64_t e1, A eps, A sq) {
  using S = typename St<T>::S;
  constexpr bool direct = std::is_same<S, A>::value;
  const A* c = p.rows + b * p.row_stride;
  const int W = 2 + p.K;
  const A* M = c + ROW_HEAD;
  const bool has_draw = p.draws[b * p.draw_stride] >= 0;
  const bool add_g = p.noise && has_draw && c[2] != (A)0;
  const bool add_l = p.langevin && has_draw && c[3] != (A)0 && eps != (A)0;
  const OutputOrder ord = plan_outputs(p, M, direct);
  Chunk<A> ch;
  const A* reg[2 + KMAX];
  Term<A> terms[2 + KMAX + 3];
  for (int64_t e = e0; e < e1; e += CHUNK) {
    const int64_t n = std::min(CHUNK, e1 - e);
    const int64_t off = b * p.N + e;
    // registers: x, D, the slots read (straight from memory where that is safe, else temporaries)
    if (!direct || (ord.temps & 1u)) {
      load<T, A>(p.x + off, ch.x, n);
      reg[0] = ch.x;
    } else {
      reg[0] = reinterpret_cast<const A*>(p.x + off);
    }
    reg[1] = nullptr;
    if (p.use_out) {
      compute_D(p, b, off, c, reg[0], ch.D, n);
      reg[1] = ch.D;
    }
    for (int i = 0; i < p.K; ++i) {
      reg[2 + i] = nullptr;
      if (!((p.reads >> i) & 1u)) continue;
      const S* src = p.slots + ((int64_t)i * p.B) * p.N + off;
      if (!direct || ((ord.temps >> (2 + i)) & 1u)) {
        load<T, A>(src, ch.slot[i], n);
        reg[2 + i] = ch.slot[i];
      } else {
        reg[2 + i] = reinterpret_cast<const A*>(src);
      }
    }
    if (add_g || add_l) noise_chunk(p.seeds[b], (uint32_t)p.draws[b * p.draw_stride], e, n, ch.zf, ch.z);
    if (add_l) score(c[5], reg[0], c[6], ch.D, p.use_out, ch.s, n);
    // outputs: x' = M[0].[x, D, S] + g z (+ eps s + sqrt(2 eps) z);  S_i = M[1+i].[x, D, S]
    for (int k = 0; k < ord.n; ++k) {
      const int o = ord.order[k];
      const A* row = M + o * W;
      int nt = 0;
      for (int r = 0; r < W; ++r)
        if (reg[r] && row[r] != (A)0) terms[nt++] = {row[r], reg[r]};
      if (o == 0) {
        if (add_g) terms[nt++] = {c[2], ch.z};
        if (add_l) {
          terms[nt++] = {eps, ch.s};
          terms[nt++] = {sq, ch.z};
        }
        emit<T, A>(p.xo + off, terms, nt, ch.acc, n);
      } else {
        emit<T, A>(p.slots + ((int64_t)(o - 1) * p.B) * p.N + off, terms, nt, ch.acc, n);
      }
    }
  }
}

template <class T, class A>
static void step_kernel(const StepArgs<T, A>& p) {
  const int64_t tiles = (p.N + TILE - 1) / TILE;
  const int64_t items = p.B * tiles;
  const bool par = p.B * p.N * ((p.noise || p.langevin) ? NOISE_COST : 1) >= g_parallel_min && items > 1;
  std::vector<A> eps(p.B, (A)0), sq(p.B, (A)0);
  if (p.langevin) {
    // pass 1: per-(sample, tile) partial sums, combined in a fixed order (deterministic for any thread count)
    std::vector<double> zz(items, 0.0), ss(items, 0.0);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / tiles, t = it % tiles;
      if (p.rows[b * p.row_stride + 3] == (A)0) continue;  // snr = 0: no corrector term for this sample
      langevin_sums(p, b, t * TILE, std::min(p.N, (t + 1) * TILE), &zz[it], &ss[it]);
    }
    for (int64_t b = 0; b < p.B; ++b) {
      const A* c = p.rows + b * p.row_stride;
      if (c[3] == (A)0) continue;
      double z2 = 0.0, s2 = 0.0;
      for (int64_t t = 0; t < tiles; ++t) {
        z2 += zz[b * tiles + t];
        s2 += ss[b * tiles + t];
      }
      // eps = 2 r (snr ||z|| / ||s||)^2 (Song et al. 2021, Algorithm 4)
      const double ratio = std::sqrt(z2) / std::sqrt(s2);
      const double snr_ratio = (double)c[3] * ratio;
      eps[b] = (A)(2.0 * (double)c[4] * snr_ratio * snr_ratio);
      sq[b] = std::sqrt((A)2 * eps[b]);
    }
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / tiles, t = it % tiles;
    step_range(p, b, t * TILE, std::min(p.N, (t + 1) * TILE), eps[b], sq[b]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// add_noise and randn
// ---------------------------------------------------------------------------------------------------------------

template <class T, class A>
static void add_noise_kernel(const typename St<T>::S* x0, typename St<T>::S* xt, const A* alpha, int64_t as,
                             const A* sigma, int64_t ss, const int64_t* seeds, const int64_t* draws, int64_t ds,
                             int64_t B, int64_t N) {
  const int64_t tiles = (N + TILE - 1) / TILE, items = B * tiles;
#pragma omp parallel for schedule(static) if (B * N * NOISE_COST >= g_parallel_min && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / tiles, t = it % tiles;
    const int64_t e1 = std::min(N, (t + 1) * TILE);
    const A a = alpha[b * as], s = sigma[b * ss];
    alignas(64) A xv[CHUNK], zv[CHUNK];
    alignas(64) float zf[CHUNK];
    for (int64_t e = t * TILE; e < e1; e += CHUNK) {
      const int64_t n = std::min(CHUNK, e1 - e);
      load<T, A>(x0 + b * N + e, xv, n);
      noise_chunk(seeds[b], (uint32_t)draws[b * ds], e, n, zf, zv);
      const Term<A> terms[2] = {{a, xv}, {s, zv}};  // alpha x0 + sigma z
      emit<T, A>(xt + b * N + e, terms, 2, xv, n);
    }
  }
}

template <class T>
static void randn_kernel(typename St<T>::S* z, const int64_t* seeds, const int64_t* draws, int64_t ds, int64_t B,
                         int64_t N) {
  const int64_t tiles = (N + TILE - 1) / TILE, items = B * tiles;
#pragma omp parallel for schedule(static) if (B * N * NOISE_COST >= g_parallel_min && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / tiles, t = it % tiles;
    const int64_t e1 = std::min(N, (t + 1) * TILE);
    alignas(64) float zf[CHUNK];
    for (int64_t e = t * TILE; e < e1; e += CHUNK) {
      const int64_t n = std::min(CHUNK, e1 - e);
      normals_blocks((uint64_t)seeds[b], (uint32_t)draws[b * ds], (uint64_t)e >> 2, (n + 3) >> 2, zf);
      typename St<T>::S* d = z + b * N + e;
      for (int64_t j = 0; j < n; ++j) d[j] = St<T>::put(zf[j]);  // drawn in fp32, cast once
    }
  }
}


// ---------------------------------------------------------------------------------------------------------------
// Glue: torch::Tensor in, checks with messages that say what to do, raw pointers down
// ---------------------------------------------------------------------------------------------------------------

static std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

static bool storage_ok(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

static void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastdiff cpu kernel: ", name, " is on ", t.device(),
                    "; every input must be a CPU tensor (use the triton or cuda kernel for GPU tensors)");
}

// [B or 1] column as a contiguous tensor of dtype `dt` (a no-op when it already is)
static at::Tensor column(const at::Tensor& t, const char* name, int64_t B, at::ScalarType dt) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == B), "fastdiff cpu kernel: ", name,
                    " must be a 1-D tensor of length ", B, " or 1, got shape ", shape_str(t));
  return t.to(dt).contiguous();
}

static bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = (const char*)a.data_ptr();
  const char* b0 = (const char*)b.data_ptr();
  const char* a1 = a0 + a.numel() * a.element_size();
  const char* b1 = b0 + b.numel() * b.element_size();
  return a0 < b1 && b0 < a1;
}

static void check_seeds_draws(const at::Tensor& seeds, const at::Tensor& draws, int64_t B) {
  check_cpu(seeds, "seeds");
  check_cpu(draws, "draws");
  TORCH_CHECK_VALUE(seeds.scalar_type() == at::kLong && seeds.dim() == 1 && seeds.size(0) == B,
                    "fastdiff cpu kernel: seeds must be an int64 tensor with one entry per sample (", B,
                    "), got ", shape_str(seeds), " ", seeds.scalar_type());
  TORCH_CHECK_VALUE(draws.scalar_type() == at::kLong && draws.dim() == 1 && (draws.size(0) == 1 || draws.size(0) == B),
                    "fastdiff cpu kernel: draws must be an int64 tensor of length ", B, " or 1, got ",
                    shape_str(draws), " ", draws.scalar_type());
}

at::Tensor step(const at::Tensor& x, const at::Tensor& out, const at::Tensor& slots, const at::Tensor& rows,
                const at::Tensor& seeds, const at::Tensor& draws, const at::Tensor& guidance, int64_t slot_reads,
                int64_t slot_writes, bool use_out, bool cfg, bool noise, bool langevin,
                const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& thresholds) {
  const char* who = "fastdiff cpu step: ";
  check_cpu(x, "x");
  TORCH_CHECK_VALUE(storage_ok(x.scalar_type()), who, "x must be float32, float16, bfloat16 or float64, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, who, "x must have a batch dimension [B, ...], got a 0-d tensor");
  TORCH_CHECK_VALUE(x.is_contiguous(), who, "x must be contiguous (call .contiguous() first): the kernel streams it");
  const int64_t B = x.size(0);
  const int64_t N = B ? x.numel() / B : 0;
  // slots [K, B, *S]
  check_cpu(slots, "slots");
  const int64_t K = slots.dim() >= 1 ? slots.size(0) : -1;
  TORCH_CHECK_VALUE(slots.dim() == x.dim() + 1 && slots.sizes().slice(1) == x.sizes(), who,
                    "slots must be [K, *x.shape] = [K, ", x.sizes(), "], got ", shape_str(slots));
  TORCH_CHECK_VALUE(K <= KMAX, who, "at most ", KMAX, " history slots are supported, got K = ", K);
  TORCH_CHECK_VALUE(K == 0 || slots.scalar_type() == x.scalar_type(), who, "slots are ", slots.scalar_type(),
                    " but x is ", x.scalar_type(), ": keep the history in x's dtype");
  TORCH_CHECK_VALUE(K == 0 || slots.is_contiguous(), who, "slots must be contiguous (call .contiguous() first)");
  TORCH_CHECK_VALUE(slot_reads >= 0 && slot_writes >= 0 && (slot_reads >> K) == 0 && (slot_writes >> K) == 0, who,
                    "slot_reads / slot_writes are bitmasks over the K = ", K, " slots, got ", slot_reads, " / ",
                    slot_writes);
  // out [B | 2B, *S]
  if (use_out) {
    check_cpu(out, "out");
    std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
    want[0] = cfg ? 2 * B : B;
    TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(want), who, "out has shape ", shape_str(out), ", expected ",
                      at::IntArrayRef(want), cfg ? " ([uncond; cond] with cfg)" : " (x's shape)");
    TORCH_CHECK_VALUE(out.scalar_type() == x.scalar_type(), who, "out is ", out.scalar_type(), " but x is ",
                      x.scalar_type(), ": cast the model output to x's dtype");
    TORCH_CHECK_VALUE(out.is_contiguous(), who, "out must be contiguous (call .contiguous() first)");
  }
  // rows [B | 1, R], coefficients in the math type
  const at::ScalarType mt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t R = ROW_HEAD + (1 + K) * (2 + K);
  check_cpu(rows, "rows");
  TORCH_CHECK_VALUE(rows.dim() == 2 && (rows.size(0) == 1 || rows.size(0) == B) && rows.size(1) == R, who,
                    "rows must be [B or 1, ", R, "] for K = ", K, " slots (B = ", B, "), got ", shape_str(rows));
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble, who,
                    "rows must be float32 (or float64), got ", rows.scalar_type());
  const at::Tensor rows_c = rows.to(mt).contiguous();
  check_seeds_draws(seeds, draws, B);
  const at::Tensor draws_c = draws.contiguous();
  const at::Tensor guid_c = column(guidance, "guidance", B, mt);
  const at::Tensor seeds_c = seeds.contiguous();
  // dynamic thresholds [B], in the math type (float32; float64 for float64 x)
  at::Tensor thr_c;
  if (thresholds.has_value()) {
    const at::Tensor& t = *thresholds;
    check_cpu(t, "thresholds");
    TORCH_CHECK_VALUE(t.scalar_type() == mt && t.dim() == 1 && t.size(0) == B, who,
                      "thresholds must be a ", mt, " tensor with one entry per sample (", B, ") for ",
                      x.scalar_type(), " x, got ", shape_str(t), " ", t.scalar_type());
    thr_c = t.contiguous();
  }
  // output, possibly in place
  at::Tensor xo;
  if (x_out.has_value()) {
    xo = *x_out;
    check_cpu(xo, "x_out");
    TORCH_CHECK_VALUE(xo.sizes() == x.sizes() && xo.scalar_type() == x.scalar_type() && xo.is_contiguous(), who,
                      "x_out must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), ", got ",
                      shape_str(xo), " ", xo.scalar_type());
    TORCH_CHECK_VALUE(xo.data_ptr() == x.data_ptr() || !overlaps(xo, x), who,
                      "x_out must be x itself or not overlap it");
    TORCH_CHECK_VALUE(!(use_out && overlaps(xo, out)) && !overlaps(xo, slots), who,
                      "x_out must not overlap out or slots");
  } else {
    xo = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  TORCH_CHECK_VALUE(!overlaps(x, slots), who, "x must not overlap slots (the slots are updated in place)");
  if (B == 0 || N == 0) return xo;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastdiff_cpu_step", [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
    using S = typename St<T>::S;
    StepArgs<T, A> p;
    p.x = reinterpret_cast<const S*>(x.data_ptr<T>());
    p.xo = reinterpret_cast<S*>(xo.data_ptr<T>());
    p.out = use_out ? reinterpret_cast<const S*>(out.data_ptr<T>()) : nullptr;
    p.slots = K ? reinterpret_cast<S*>(slots.data_ptr<T>()) : nullptr;
    p.rows = rows_c.data_ptr<A>();
    p.row_stride = rows_c.size(0) == 1 ? 0 : R;
    p.seeds = seeds_c.data_ptr<int64_t>();
    p.draws = draws_c.data_ptr<int64_t>();
    p.draw_stride = draws_c.size(0) == 1 ? 0 : 1;
    p.guidance = guid_c.data_ptr<A>();
    p.guid_stride = guid_c.size(0) == 1 ? 0 : 1;
    p.B = B;
    p.N = N;
    p.K = (int)K;
    p.reads = (unsigned)slot_reads;
    p.writes = (unsigned)slot_writes;
    p.use_out = use_out;
    p.cfg = cfg;
    p.noise = noise;
    p.langevin = langevin;
    p.thresholds = thr_c.defined() && use_out ? thr_c.data_ptr<A>() : nullptr;
    step_kernel(p);
  });
  return xo;
}

at::Tensor add_noise(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, const at::Tensor& seeds,
                     const at::Tensor& draws) {
  const char* who = "fastdiff cpu add_noise: ";
  check_cpu(x0, "x0");
  TORCH_CHECK_VALUE(storage_ok(x0.scalar_type()), who, "x0 must be float32, float16, bfloat16 or float64, got ",
                    x0.scalar_type());
  TORCH_CHECK_VALUE(x0.dim() >= 1, who, "x0 must have a batch dimension [B, ...]");
  const int64_t B = x0.size(0);
  const int64_t N = B ? x0.numel() / B : 0;
  const at::Tensor xc = x0.contiguous();
  check_seeds_draws(seeds, draws, B);
  const at::ScalarType mt = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor a = column(alpha, "alpha", B, mt), s = column(sigma, "sigma", B, mt);
  const at::Tensor sd = seeds.contiguous(), dr = draws.contiguous();
  at::Tensor xt = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (B == 0 || N == 0) return xt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastdiff_cpu_add_noise", [&] {
    using T = scalar_t;
    using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
    using S = typename St<T>::S;
    add_noise_kernel<T, A>(reinterpret_cast<const S*>(xc.data_ptr<T>()), reinterpret_cast<S*>(xt.data_ptr<T>()),
                           a.data_ptr<A>(), a.size(0) == 1 ? 0 : 1,
                           s.data_ptr<A>(), s.size(0) == 1 ? 0 : 1, sd.data_ptr<int64_t>(), dr.data_ptr<int64_t>(),
                           dr.size(0) == 1 ? 0 : 1, B, N);
  });
  return xt;
}

at::Tensor randn(const at::Tensor& seeds, const at::Tensor& draws, std::vector<int64_t> shape, at::ScalarType dtype) {
  const char* who = "fastdiff cpu randn: ";
  TORCH_CHECK_VALUE(!shape.empty(), who, "shape must have a batch dimension (shape[0])");
  for (int64_t d : shape) TORCH_CHECK_VALUE(d >= 0, who, "shape must have non-negative sizes, got ", shape);
  TORCH_CHECK_VALUE(storage_ok(dtype), who, "dtype must be float32, float16, bfloat16 or float64, got ", dtype);
  const int64_t B = shape[0];
  check_seeds_draws(seeds, draws, B);
  at::Tensor z = at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kCPU));
  const int64_t N = B ? z.numel() / B : 0;
  if (B == 0 || N == 0) return z;
  const at::Tensor sd = seeds.contiguous(), dr = draws.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastdiff_cpu_randn", [&] {
    using S = typename St<scalar_t>::S;
    randn_kernel<scalar_t>(reinterpret_cast<S*>(z.data_ptr<scalar_t>()), sd.data_ptr<int64_t>(),
                           dr.data_ptr<int64_t>(), dr.size(0) == 1 ? 0 : 1, B, N);
  });
  return z;
}

// Test hooks: the raw Philox words (known-answer tests) and the scalar libm normals of philox.h.
std::vector<uint32_t> philox_raw(std::vector<int64_t> counter, std::vector<int64_t> key) {
  TORCH_CHECK_VALUE(counter.size() == 4 && key.size() == 2, "philox_raw needs 4 counter words and 2 key words");
  for (int64_t v : counter) TORCH_CHECK_VALUE(v >= 0 && v <= 0xFFFFFFFFll, "counter words must lie in [0, 2**32)");
  for (int64_t v : key) TORCH_CHECK_VALUE(v >= 0 && v <= 0xFFFFFFFFll, "key words must lie in [0, 2**32)");
  const fastdiff::uint4x32 r = fastdiff::philox4x32_10(
      {(uint32_t)counter[0], (uint32_t)counter[1], (uint32_t)counter[2], (uint32_t)counter[3]}, (uint32_t)key[0],
      (uint32_t)key[1]);
  return {r.x, r.y, r.z, r.w};
}

// The hand-vectorized Philox of philox_simd.h on blocks (counter[0] | counter[1] << 32) + j, j < nblocks, with
// counter[2], counter[3], key: nblocks x 4 words.  isa: "" (the path the kernels take) or one compiled variant.
std::vector<uint32_t> philox_blocks_raw(std::vector<int64_t> counter, std::vector<int64_t> key, int64_t nblocks,
                                        const std::string& isa) {
  TORCH_CHECK_VALUE(counter.size() == 4 && key.size() == 2, "philox_blocks_raw needs 4 counter words and 2 key words");
  for (int64_t v : counter) TORCH_CHECK_VALUE(v >= 0 && v <= 0xFFFFFFFFll, "counter words must lie in [0, 2**32)");
  for (int64_t v : key) TORCH_CHECK_VALUE(v >= 0 && v <= 0xFFFFFFFFll, "key words must lie in [0, 2**32)");
  TORCH_CHECK_VALUE(nblocks >= 0, "nblocks must be >= 0");
  using Fn = void (*)(uint64_t, uint32_t, uint32_t, uint32_t, uint32_t, int64_t, uint32_t*, uint32_t*, uint32_t*,
                      uint32_t*);
  Fn fn = nullptr;
  if (isa.empty()) fn = &fastdiff::simd::philox_blocks;
  else if (isa == "scalar") fn = &fastdiff::simd::philox_blocks_scalar;
#if defined(__AVX512F__)
  else if (isa == "avx512") fn = &fastdiff::simd::philox_blocks_avx512;
#endif
#if defined(__AVX2__)
  else if (isa == "avx2") fn = &fastdiff::simd::philox_blocks_avx2;
#endif
  TORCH_CHECK_VALUE(fn != nullptr, "philox_blocks_raw: isa '", isa, "' is not compiled in (see philox_isas())");
  std::vector<uint32_t> w(4 * nblocks), r(4 * nblocks);
  const uint64_t blk0 = (uint64_t)counter[0] | ((uint64_t)counter[1] << 32);
  fn(blk0, (uint32_t)counter[2], (uint32_t)counter[3], (uint32_t)key[0], (uint32_t)key[1], nblocks, w.data(),
     w.data() + nblocks, w.data() + 2 * nblocks, w.data() + 3 * nblocks);
  for (int64_t j = 0; j < nblocks; ++j)
    for (int i = 0; i < 4; ++i) r[4 * j + i] = w[i * nblocks + j];
  return r;
}

std::vector<std::string> philox_isas() {
  std::vector<std::string> v{fastdiff::simd::philox_blocks_isa()};
#if defined(__AVX512F__)
  if (v[0] != "avx512") v.push_back("avx512");
#endif
#if defined(__AVX2__)
  if (v[0] != "avx2") v.push_back("avx2");
#endif
  if (v[0] != "scalar") v.push_back("scalar");
  return v;
}

at::Tensor normals_libm(int64_t seed, int64_t draw, int64_t blk0, int64_t nblocks) {
  at::Tensor z = at::empty({nblocks * 4}, at::kFloat);
  float* p = z.data_ptr<float>();
  for (int64_t j = 0; j < nblocks; ++j)
    fastdiff::philox_normals4((uint64_t)seed, (uint32_t)draw, 0u, (uint64_t)(blk0 + j), p + 4 * j);
  return z;
}

// The vectorized normals the kernels use, for blocks [blk0, blk0 + nblocks) (any blk0: tests the counter's high
// word).  isa: "" (the kernels' path) or one compiled variant of normals_isas().
at::Tensor normals_fast(int64_t seed, int64_t draw, int64_t blk0, int64_t nblocks, const std::string& isa) {
  using Fn = void (*)(uint64_t, uint32_t, uint64_t, int64_t, float*);
  Fn fn = nullptr;
  if (isa.empty()) fn = &fastdiff::simd::normals_blocks;
  else if (isa == "portable") fn = &fastdiff::simd::normals_blocks_portable;
#if defined(__AVX512F__)
  else if (isa == "avx512") fn = &fastdiff::simd::normals_blocks_avx512;
#endif
  TORCH_CHECK_VALUE(fn != nullptr, "normals_fast: isa '", isa, "' is not compiled in (see normals_isas())");
  TORCH_CHECK_VALUE(nblocks >= 0, "nblocks must be >= 0");
  at::Tensor z = at::empty({nblocks * 4}, at::kFloat);
  float* p = z.data_ptr<float>();
  for (int64_t j = 0; j < nblocks; j += CHUNK / 4)
    fn((uint64_t)seed, (uint32_t)draw, (uint64_t)(blk0 + j), std::min(CHUNK / 4, nblocks - j), p + 4 * j);
  return z;
}

std::vector<std::string> normals_isas() {
  std::vector<std::string> v{fastdiff::simd::normals_blocks_isa()};
  if (v[0] != "portable") v.push_back("portable");
  return v;
}

}  // namespace fdcpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff CPU kernels (C++/OpenMP): step, add_noise, randn";
  m.def("step", &fdcpu::step, "one sampler stage in one memory pass (see fastdiff.ops)", py::arg("x"), py::arg("out"),
        py::arg("slots"), py::arg("rows"), py::arg("seeds"), py::arg("draws"), py::arg("guidance"),
        py::arg("slot_reads"), py::arg("slot_writes"), py::arg("use_out"), py::arg("cfg"), py::arg("noise"),
        py::arg("langevin"), py::arg("x_out") = py::none(), py::arg("thresholds") = py::none());
  m.def("add_noise", &fdcpu::add_noise, "x_t = alpha x0 + sigma z with Philox z", py::arg("x0"), py::arg("alpha"),
        py::arg("sigma"), py::arg("seeds"), py::arg("draws"));
  m.def("randn", &fdcpu::randn, "Philox normals, batch-invariant", py::arg("seeds"), py::arg("draws"),
        py::arg("shape"), py::arg("dtype"));
  m.def("philox_raw", &fdcpu::philox_raw, "raw Philox4x32-10 words for (counter[4], key[2])");
  m.def("philox_blocks_raw", &fdcpu::philox_blocks_raw,
        "philox_simd.h's words of nblocks consecutive blocks from counter[4], key[2] (nblocks x 4)",
        py::arg("counter"), py::arg("key"), py::arg("nblocks"), py::arg("isa") = "");
  m.def("philox_isas", &fdcpu::philox_isas, "the compiled Philox paths, the kernels' first");
  m.def("normals_libm", &fdcpu::normals_libm, "philox.h's scalar libm normals of blocks [blk0, blk0 + nblocks)");
  m.def("normals_fast", &fdcpu::normals_fast, "the kernels' vectorized normals of blocks [blk0, blk0 + nblocks)",
        py::arg("seed"), py::arg("draw"), py::arg("blk0"), py::arg("nblocks"), py::arg("isa") = "");
  m.def("normals_isas", &fdcpu::normals_isas, "the compiled normals paths, the kernels' first");
  m.def("num_threads", []() { return omp_get_max_threads(); });
  m.def("set_parallel_min", [](int64_t n) {
    int64_t old = fdcpu::g_parallel_min;
    fdcpu::g_parallel_min = n;
    return old;
  }, "elements below which a call runs single-threaded; returns the previous value");
}
