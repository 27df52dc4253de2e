// The CPU kernels of fastdiff::step, fastdiff::add_noise and fastdiff::randn: plain C++17 with OpenMP, templated
// over the storage type T (float, f16, bf16, double; see storage.h) and the math type A (float; double for double
// storage).  No torch here: csrc/cpu/bindings.cpp checks the tensors and hands raw pointers down.  Every kernel
// implements fastdiff.ops.step_reference:
//
//   D  = cx x + co out          (out = out_u + w (out_c - out_u) with cfg, times m_b with guidance_rescale)
//   x' = M[0].[x, D, S] + g z (+ eps s + sqrt(2 eps) z, s = lsx x + lsD D, Langevin)
//   S_i = M[1+i].[x, D, S]      for the slots written (every right-hand side reads the values from before the step)
// CFG++ rows (uncond) have one more column, U = cx x + co out_u: M . [x, D, U, S].
//
// Memory: ONE pass over x, out (both CFG halves), the slots read, x' and the slots written (a large fp32 x' with
// streaming stores, see STREAM_MIN).  Work is split into OpenMP items of (sample, tile of TILE elements); an item
// walks its tile in CHUNKs of 256 elements.  With fp32 (fp64) storage x, out and the slots are read straight from
// memory; fp16 / bf16 chunks are converted into fp32 temporaries.  D, the noise and partial sums live in per-thread
// temporaries that stay in L1, so every element of DRAM / L3 is touched once while each inner loop is a simple
// unit-stride loop over a chunk.  Outputs are summed
// two terms per pass in the reference's order (three in one pass for the common a x + b D + g z), the last pass
// converting and storing; they are written in an order where none overwrites a register that a later output
// still reads (x' in place, a slot read and rewritten), with a copy to a temporary only for cyclic reads.
// Langevin stages first run a reduction pass (||z||^2, ||s||^2 per sample, double accumulators, z regenerated from
// Philox, never stored).  Dynamic thresholds (Imagen; computed by fastdiff.ops.dynamic_threshold, a reduction pass
// in torch) clamp and scale D as it is formed: D = clamp(D, -s_b, s_b) / s_b.
//
// Vectorization (checked with g++ -O3 -march=native -fopt-info-vec-all on AVX-512): every loop over a chunk is
// vectorized: the fp16/bf16 loads and the converting stores, D (with the CFG mix), the two-term output passes, the
// Langevin score and sums and the Box-Muller loop.  Only the control loops over chunks, slots and outputs stay
// scalar.  Philox is hand-vectorized in philox_simd.h because g++'s auto-vectorization of philox.h's 32x32->64
// products (vpmovzxdq + vpmullq) is several times slower than vpmuludq on even / odd lanes; the words are exactly
// philox.h's (tested bit for bit).  Box-Muller (normals_simd.h) uses branch-free float32 log / sin / cos because
// libm's scalar calls do not vectorize; normals agree with libm (fastdiff.rng, philox.h's philox_normals4) to a few
// ulp.  Noise stays compute-bound (benchmarks/README.md has the numbers).
//
// Compile with -O3 -fopenmp -ffp-contract=off -fno-math-errno -fno-trapping-math -march=native (see
// fastdiff/backends/cpu.py): no FMA contraction, so fp32 results round like the torch reference (bit for bit
// where no noise is involved); the only fused multiply-adds are the explicit ones of the normals' polynomials.
#pragma once
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "normals_simd.h"
#include "storage.h"

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace fdcpu {

constexpr int64_t CHUNK = 256;     // elements per inner chunk (multiple of 4: Philox blocks never straddle chunks)
constexpr int64_t TILE = 4096;     // elements per OpenMP work item (multiple of CHUNK)
constexpr int KMAX = 8;            // history slots supported
constexpr int ROW_HEAD = 7;        // cx, co, g, snr, r, lsx, lsD
// Work (elements; an element with noise counts NOISE_COST) below which a call runs on one thread, as torch's
// GRAIN_SIZE.  Noise is compute-bound (Philox + Box-Muller) where memory streams are not, hence the weight.  Small
// calls (an SD latent) stay on one thread: a little slower than two on a quiet machine, but no OpenMP barrier can
// then wait a scheduler time slice for a core another process holds.  Changed through the bindings'
// set_parallel_min.
inline int64_t g_parallel_min = 1 << 15;
constexpr int64_t NOISE_COST = 8;
// fp32 x' of at least this many elements per call (32 MB: with x and out, more than a last-level cache slice) is
// written with non-temporal (streaming) stores: it is not read again within the step and would not stay in cache
// for the next one, and a streaming store skips the read-for-ownership of the line that a normal store makes (a
// third more memory traffic).  Smaller x' stays in cache for the next step.
constexpr int64_t STREAM_MIN = 1 << 23;

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
  const A* cfg_rescale;  // [B] guidance_rescale's factors (with cfg), or nullptr
  int32_t* nonfinite;   // [B] flags: 1 OR-ed in for a sample whose stored x' has NaN / Inf; or nullptr
  int64_t B, N;
  int K;
  unsigned reads, writes;
  bool use_out, cfg, noise, langevin;
  bool uncond;  // CFG++ rows: M's columns are [x, D, U, S_0 ..]
  int base() const { return uncond ? 3 : 2; }  // column (register id) of slot 0
};

// Per-thread temporaries of one chunk, in math type A (fp32 for fp32 / fp16 / bf16 storage).
template <class A>
struct Chunk {
  alignas(64) A x[CHUNK];
  alignas(64) A D[CHUNK];
  alignas(64) A U[CHUNK];  // CFG++: the unconditional data estimate
  alignas(64) A acc[CHUNK];
  alignas(64) A z[CHUNK];
  alignas(64) A s[CHUNK];  // the Langevin score lsx x + lsD D
  alignas(64) A xs[CHUNK];  // x' on its way to a streaming store
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

// Register ids (= columns of M): 0 = x, 1 = D, (2 = U with uncond,) base + i = slot i.  Output ids: 0 = x',
// 1 + i = slot i.
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
  const int base = p.base(), W = base + p.K;
  unsigned reads[KMAX + 1];
  int clobbers[KMAX + 1];
  unsigned remaining = 0;
  auto regs_read = [&](const A* row) {
    unsigned r = row[0] != (A)0 ? 1u : 0u;
    for (int i = 0; i < p.K; ++i)
      if (((p.reads >> i) & 1u) && row[base + i] != (A)0) r |= 1u << (base + i);
    return r;
  };
  reads[0] = regs_read(M);
  clobbers[0] = p.xo == p.x ? 0 : -1;
  remaining |= 1u;
  for (int i = 0; i < p.K; ++i) {
    if (!((p.writes >> i) & 1u)) continue;
    reads[1 + i] = regs_read(M + (1 + i) * W);
    clobbers[1 + i] = base + i;
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

// Dynamic thresholding of a chunk: v = clamp(v, -s, s) / s, written with compares so NaN stays NaN (as torch.clamp).
template <class A>
static inline void threshold_chunk(A s, A* v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const A d = v[j];
    v[j] = (d > s ? s : (d < -s ? -s : d)) / s;
  }
}

// D = cx x + co out, out = out_u + w (out_c - out_u) with cfg; one pass, storage converted on the fly.  With
// dynamic thresholds, D = clamp(D, -s, s) / s (threshold_chunk).
template <class T, class A>
static inline void compute_D(const StepArgs<T, A>& p, int64_t b, int64_t off, const A* c, const A* xr, A* D,
                             int64_t n) {
  using S = typename St<T>::S;
  const A cx = c[0], co = c[1];
  const S* __restrict ou = p.out + off;
  if (p.cfg && p.cfg_rescale) {  // guidance_rescale: the guided output times m_b
    const A w = p.guidance[b * p.guid_stride], m = p.cfg_rescale[b];
    const S* __restrict oc = p.out + p.B * p.N + off;
    for (int64_t j = 0; j < n; ++j) {
      const A u = (A)St<T>::get(ou[j]);
      D[j] = cx * xr[j] + co * (m * (u + w * ((A)St<T>::get(oc[j]) - u)));
    }
  } else if (p.cfg) {
    const A w = p.guidance[b * p.guid_stride];
    const S* __restrict oc = p.out + p.B * p.N + off;
    for (int64_t j = 0; j < n; ++j) {
      const A u = (A)St<T>::get(ou[j]);
      D[j] = cx * xr[j] + co * (u + w * ((A)St<T>::get(oc[j]) - u));
    }
  } else {
    for (int64_t j = 0; j < n; ++j) D[j] = cx * xr[j] + co * (A)St<T>::get(ou[j]);
  }
  if (p.thresholds) threshold_chunk(p.thresholds[b], D, n);
}

// CFG++'s U = cx x + co out_u (thresholded as D); only with cfg (without it U is D itself).
template <class T, class A>
static inline void compute_U(const StepArgs<T, A>& p, int64_t b, int64_t off, const A* c, const A* xr, A* U,
                             int64_t n) {
  using S = typename St<T>::S;
  const A cx = c[0], co = c[1];
  const S* __restrict ou = p.out + off;
  for (int64_t j = 0; j < n; ++j) U[j] = cx * xr[j] + co * (A)St<T>::get(ou[j]);
  if (p.thresholds) threshold_chunk(p.thresholds[b], U, n);
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

// Whether a chunk just stored (still in L1) holds a NaN or Inf: v - v is 0 for finite v and NaN otherwise (not
// folded away: no -ffinite-math-only).  Reads the stored values, so an fp16 overflow counts too.
template <class T, class A>
static inline bool has_nonfinite(const typename St<T>::S* v, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = 0; j < n; ++j) {
    const A a = (A)St<T>::get(v[j]);
    bad |= !((a - a) == (A)0);
  }
  return bad != 0;
}

// dst[0, n) = src[0, n) with streaming stores; dst 16-byte aligned, n a multiple of 4.  The caller fences.
static inline void stream_store(float* dst, const float* src, int64_t n) {
#if defined(__SSE__)
  for (int64_t j = 0; j < n; j += 4) _mm_stream_ps(dst + j, _mm_load_ps(src + j));
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
#endif
}

// The affine pass over elements [e0, e1) of sample b; eps / sq: the sample's Langevin step and sqrt(2 eps).
template <class T, class A>
static void step_range(const StepArgs<T, A>& p, int64_t b, int64_t e0, int64_t e1, A eps, A sq) {
  using S = typename St<T>::S;
  constexpr bool direct = std::is_same<S, A>::value;
  const A* c = p.rows + b * p.row_stride;
  const int base = p.base(), W = base + p.K;
  const A* M = c + ROW_HEAD;
  const bool has_draw = p.draws[b * p.draw_stride] >= 0;
  const bool add_g = p.noise && has_draw && c[2] != (A)0;
  const bool add_l = p.langevin && has_draw && c[3] != (A)0 && eps != (A)0;
  const OutputOrder ord = plan_outputs(p, M, direct);
  // x' streams (see STREAM_MIN) when it is fp32, large, not written in place and aligned (the chunks keep it so)
  constexpr bool f32 = std::is_same<S, float>::value;
  const bool stream = f32 && p.B * p.N >= STREAM_MIN && p.xo != p.x &&
                      reinterpret_cast<uintptr_t>(p.xo + b * p.N + e0) % 16 == 0;
  Chunk<A> ch;
  const A* reg[3 + KMAX];
  Term<A> terms[3 + KMAX + 3];
  bool bad = false;
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
    reg[1] = reg[2] = nullptr;
    if (p.use_out) {
      compute_D(p, b, off, c, reg[0], ch.D, n);
      reg[1] = ch.D;
      if (p.uncond) {
        if (p.cfg) compute_U(p, b, off, c, reg[0], ch.U, n);
        reg[2] = p.cfg ? ch.U : ch.D;
      }
    }
    for (int i = 0; i < p.K; ++i) {
      reg[base + i] = nullptr;
      if (!((p.reads >> i) & 1u)) continue;
      const S* src = p.slots + ((int64_t)i * p.B) * p.N + off;
      if (!direct || ((ord.temps >> (base + i)) & 1u)) {
        load<T, A>(src, ch.slot[i], n);
        reg[base + i] = ch.slot[i];
      } else {
        reg[base + i] = reinterpret_cast<const A*>(src);
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
        if constexpr (f32) {
          if (stream && n % 4 == 0) {  // x' into L1, checked there, then streamed out
            emit<T, A>(ch.xs, terms, nt, ch.acc, n);
            if (p.nonfinite && !bad) bad = has_nonfinite<T, A>(ch.xs, n);
            stream_store(p.xo + off, ch.xs, n);
            continue;
          }
        }
        emit<T, A>(p.xo + off, terms, nt, ch.acc, n);
        if (p.nonfinite && !bad) bad = has_nonfinite<T, A>(p.xo + off, n);
      } else {
        emit<T, A>(p.slots + ((int64_t)(o - 1) * p.B) * p.N + off, terms, nt, ch.acc, n);
      }
    }
  }
#if defined(__SSE__)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the kernel returns
#endif
  if (bad) __atomic_store_n(&p.nonfinite[b], 1, __ATOMIC_RELAXED);  // only ever set: work items of b may race
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
      typename St<T>::S* d = z + b * N + e;
      if constexpr (std::is_same<typename St<T>::S, float>::value) {
        if (n % 4 == 0) {  // whole blocks: drawn straight into the output (a block never spills past the chunk)
          normals_blocks((uint64_t)seeds[b], (uint32_t)draws[b * ds], (uint64_t)e >> 2, n >> 2, d);
          continue;
        }
      }
      normals_blocks((uint64_t)seeds[b], (uint32_t)draws[b * ds], (uint64_t)e >> 2, (n + 3) >> 2, zf);
      for (int64_t j = 0; j < n; ++j) d[j] = St<T>::put(zf[j]);  // drawn in fp32, cast once
    }
  }
}

}  // namespace fdcpu
