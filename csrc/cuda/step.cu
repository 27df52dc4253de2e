// fastdiff CUDA kernels: the fused sampler step, its Langevin reduction pass, add_noise, randn, raw Philox.
//
// Framework-free CUDA C++: compiled at run time by NVRTC (fastdiff/backends/cuda.py, through CuPy) and by nvcc in
// the tests.  Every kernel is an extern "C" wrapper around a template instantiated per storage dtype, so NVRTC and
// CuPy find it by its plain name: fastdiff_step_{f32,f16,bf16} (any K <= 8, vector or scalar accesses),
// fastdiff_step_*_vec_k4 (the common case specialised: K <= 4, vector accesses, <= 64 registers),
// fastdiff_step_reduce_* (Langevin pass 1: per-block partial sums of z^2 and s^2, added up in a fixed order by the
// step kernel, so the result is deterministic: no atomics), fastdiff_add_noise_*, fastdiff_randn_*.
//
// Semantics are exactly fastdiff.ops.step_reference (the oracle), per sample b and element e:
//     o  = cfg ? out_u + w (out_c - out_u) : out                  (out_u = out[b], out_c = out[B + b])
//     o  = m_b o                                                   (guidance_rescale's factors m [B], kRescale)
//     D  = cx x + co o                                             (only with use_out; else D is absent)
//     D  = clamp(D, -s_b, s_b) / s_b                               (with dynamic thresholds s [B], flag kThreshold)
//     x' = M[0] . [x, D, S] + g z  (+ eps s + sqrt(2 eps) z with Langevin)
//     S_i = M[1+i] . [x, D, S]     for every slot i written; slot i is read only if its bit is in slot_reads
// CFG++ rows (flag kUncond) have a column for U = cx x + co out_u (thresholded as D; U = D without cfg):
//     M . [x, D, U, S]
// Every read of an element happens before any write of it, so x' may alias x.  The dot products accumulate from 0
// in the order [x, D, S_0, S_1, ...] with separate multiplies and adds, like the reference; compile with
// contraction off (--fmad=false) so that the result matches the other backends to the last bit or two.
//
// Coefficient rows are float32 [B or 1, R] in device memory (row stride 0 for one shared row), never host scalars:
// a CUDA graph that captured a launch stays valid when the row values change.  All math is float32.
//
// Layout of the work: blockIdx.y walks the samples (grid-stride when B > gridDim.y), blockIdx.x / threadIdx.x walk
// groups of 4 consecutive elements of one sample (grid-stride).  One Philox call gives exactly the 4 normals of
// Philox block e / 4, so a group never splits a block.  When every pointer is 4-element aligned and numel % 4 == 0
// the group is one vector access (16 bytes for fp32, 8 bytes for fp16 / bf16); otherwise scalar accesses with a
// bounds check (odd sizes, views such as x[1:] of a flat buffer).
#ifndef __CUDACC_RTC__
#include <stdint.h>
#else
// NVRTC has no C library headers; fastdiff/backends/cuda.py inlines philox.h without its #include lines.
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif
#include "philox.h"
#include "half_bits.cuh"

namespace fastdiff {
namespace cuda {

constexpr int kThreads = 256;  // block size of every kernel below (a multiple of 32; see block_sum2)
constexpr int kMaxSlots = 8;
constexpr int kRowHead = 7;  // cx, co, g, snr, r, lsx, lsD
constexpr int kMaxRow = kRowHead + (1 + kMaxSlots) * (3 + kMaxSlots);  // with CFG++'s U column

// flags (host constants of the launch)
constexpr int kUseOut = 1;
constexpr int kCfg = 2;
constexpr int kNoise = 4;
constexpr int kLangevin = 8;
constexpr int kVec = 16;  // every pointer 4-element aligned and numel % 4 == 0: vector accesses
constexpr int kThreshold = 32;  // dynamic thresholds [B] given: D = clamp(D, -s_b, s_b) / s_b
constexpr int kRescale = 64;  // guidance_rescale's factors [B] given (with kCfg): o = m_b (out_u + w (out_c - out_u))
constexpr int kUncond = 128;  // CFG++ rows: M's columns are [x, D, U, S_0 ..]

// ---------------------------------------------------------------------------------------------------------------
// Storage types: fp32 as float, fp16 and bf16 as their raw 16 bits (no cuda_fp16.h / cuda_bf16.h needed, which
// keeps the source NVRTC-friendly).  Conversions round to nearest even, as torch's .to(dtype).
// ---------------------------------------------------------------------------------------------------------------

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float f) { return f; }
  static __device__ __forceinline__ void load4(const T* p, float v[4]) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  }
  static __device__ __forceinline__ void store4(T* p, const float v[4]) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

struct Half16 {  // shared by F16 and BF16: 4 elements = 8 bytes = one uint2
  typedef unsigned short T;
};


struct F16 : Half16 {
  static __device__ __forceinline__ float load(T v) { return fd_half_bits_to_float(v); }
  static __device__ __forceinline__ T store(float f) { return fd_float_to_half_bits(f); }
};

struct BF16 : Half16 {
  static __device__ __forceinline__ float load(T v) { return __uint_as_float(((uint32_t)v) << 16); }
  static __device__ __forceinline__ T store(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)0x7fffu;  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                          // round to nearest, ties to even
    return (T)(u >> 16);
  }
};

template <class S>
struct Vec4 {  // 4 x 16-bit storage as one 8-byte access
  typedef typename S::T T;
  static __device__ __forceinline__ void load4(const T* p, float v[4]) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = S::load((T)(q.x & 0xffffu)); v[1] = S::load((T)(q.x >> 16));
    v[2] = S::load((T)(q.y & 0xffffu)); v[3] = S::load((T)(q.y >> 16));
  }
  static __device__ __forceinline__ void store4(T* p, const float v[4]) {
    uint2 q;
    q.x = (uint32_t)S::store(v[0]) | ((uint32_t)S::store(v[1]) << 16);
    q.y = (uint32_t)S::store(v[2]) | ((uint32_t)S::store(v[3]) << 16);
    *reinterpret_cast<uint2*>(p) = q;
  }
};

template <class S>
__device__ __forceinline__ void vload4(const float* p, float v[4]) { F32::load4(p, v); }
template <class S>
__device__ __forceinline__ void vload4(const unsigned short* p, float v[4]) { Vec4<S>::load4(p, v); }
template <class S>
__device__ __forceinline__ void vstore4(float* p, const float v[4]) { F32::store4(p, v); }
template <class S>
__device__ __forceinline__ void vstore4(unsigned short* p, const float v[4]) { Vec4<S>::store4(p, v); }

// Load / store the group of (up to) 4 elements at p; n = valid elements (4 unless at the end of a sample).
template <class S, bool VEC>
__device__ __forceinline__ void load_group(const typename S::T* p, int n, float v[4]) {
  if (VEC) {
    vload4<S>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < n ? S::load(p[j]) : 0.0f;
  }
}

template <class S, bool VEC>
__device__ __forceinline__ void store_group(typename S::T* p, int n, const float v[4]) {
  if (VEC) {
    vstore4<S>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (j < n) p[j] = S::store(v[j]);
  }
}

// Sum (a, b) over the block; the result is valid in every thread.  All threads must call it; `red` holds 64 floats.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // earlier readers of red are done
  if (lane == 0) { red[2 * warp] = a; red[2 * warp + 1] = b; }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? red[2 * lane] : 0.0f;
    b = lane < nwarps ? red[2 * lane + 1] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (lane == 0) { red[0] = a; red[1] = b; }
  }
  __syncthreads();
  a = red[0];
  b = red[1];
}

// Per-sample values every thread of a block needs, read once per sample from device memory.
struct SampleCtx {
  float cx, co, g, lsx, lsD, w;
  float thr;  // the sample's dynamic threshold (with kThreshold)
  float m;    // the sample's guidance_rescale factor (with kRescale)
  uint64_t seed;
  uint32_t draw;
  bool has_z;  // this sample draws noise in this launch
};

__device__ __forceinline__ SampleCtx sample_ctx(const float* coef, const long long* seeds, const long long* draws,
                                                long long draw_stride, const float* guidance,
                                                long long guidance_stride, const float* thresholds,
                                                const float* cfg_rescale, long long b, int flags) {
  SampleCtx c;
  c.cx = coef[0]; c.co = coef[1]; c.g = coef[2]; c.lsx = coef[5]; c.lsD = coef[6];
  c.w = (flags & kCfg) ? guidance[b * guidance_stride] : 0.0f;
  c.thr = (flags & kThreshold) ? thresholds[b] : 1.0f;
  c.m = ((flags & kRescale) && (flags & kCfg)) ? cfg_rescale[b] : 1.0f;
  const long long d = draws[b * draw_stride];
  c.has_z = (flags & (kNoise | kLangevin)) && d >= 0;  // draw < 0: this sample takes no noise
  c.draw = (uint32_t)d;
  c.seed = (uint64_t)seeds[b];
  return c;
}

// Dynamic thresholding of 4 values: clamp(v, -s, s) / s, written with compares so NaN stays NaN, IEEE division.
__device__ __forceinline__ void threshold4(float v[4], float s) {
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = (v[j] > s ? s : (v[j] < -s ? -s : v[j])) / s;  // IEEE (prec-div)
}

// D for one group (the reference: o = ou + w (oc - ou), times m with kRescale; D = cx x + co o; with thresholds
// D = clamp(D, -s, s) / s), zeros without use_out.  With kUncond also CFG++'s U = cx x + co ou (thresholded the
// same way; U = D without cfg) into uv.
template <class S, bool VEC>
__device__ __forceinline__ void data_estimate(const typename S::T* out, long long batch, long long numel,
                                              long long b, long long e0, int n, int flags, const SampleCtx& c,
                                              const float xv[4], float dv[4], float uv[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) dv[j] = uv[j] = 0.0f;
  if (flags & kUseOut) {
    float o[4];
    load_group<S, VEC>(out + b * numel + e0, n, o);
    const bool cfgpp_u = (flags & kUncond) && (flags & kCfg);
    if (cfgpp_u) {
#pragma unroll
      for (int j = 0; j < 4; ++j) uv[j] = c.cx * xv[j] + c.co * o[j];
      if (flags & kThreshold) threshold4(uv, c.thr);
    }
    if (flags & kCfg) {
      float oc[4];
      load_group<S, VEC>(out + (batch + b) * numel + e0, n, oc);
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = o[j] + c.w * (oc[j] - o[j]);
      if (flags & kRescale) {
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = c.m * o[j];
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) dv[j] = c.cx * xv[j] + c.co * o[j];
    if (flags & kThreshold) threshold4(dv, c.thr);
    if ((flags & kUncond) && !cfgpp_u) {
#pragma unroll
      for (int j = 0; j < 4; ++j) uv[j] = dv[j];
    }
  }
}

// Load the row of sample b into shared memory (all threads call it).
__device__ __forceinline__ void load_row(float* coef, const float* rows, long long row_stride, long long b, int R) {
  const float* row = rows + b * row_stride;
  for (int j = threadIdx.x; j < R; j += blockDim.x) coef[j] = row[j];
}

// ---------------------------------------------------------------------------------------------------------------
// The step
// ---------------------------------------------------------------------------------------------------------------

template <class S, bool VEC, int KMAX>
__device__ __forceinline__ void step_impl(const typename S::T* x, typename S::T* x_out, const typename S::T* out,
                                          typename S::T* slots, const float* rows, long long row_stride,
                                          const long long* seeds, const long long* draws, long long draw_stride,
                                          const float* guidance, long long guidance_stride,
                                          const float* thresholds, const float* partials,
                                          int num_partials, long long batch, long long numel, int K, int reads,
                                          int writes, int flags, int* nonfinite, const float* cfg_rescale) {
  typedef typename S::T T;
  __shared__ float coef[kMaxRow];
  __shared__ float red[64];
  const bool uncond = (flags & kUncond) != 0;
  const int SB = uncond ? 3 : 2;  // column of slot 0
  const int W = SB + K;  // columns of M: x, D, (U,) S_0 .. S_{K-1}
  const int R = kRowHead + (1 + K) * W;
  const bool use_out = (flags & kUseOut) != 0;
  const bool langevin = (flags & kLangevin) != 0;
  const long long ngroups = (numel + 3) / 4;
  // One group per thread (the grid covers the sample): no grid-stride loop, so the compiler has no reason to keep
  // per-slot addresses or coefficients live across iterations (it did: 170 registers, 1 block per SM).
  const long long grp = (long long)blockIdx.x * blockDim.x + threadIdx.x;

  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    __syncthreads();  // the previous sample's readers of coef are done
    load_row(coef, rows, row_stride, b, R);
    float eps = 0.0f, sq = 0.0f;
    if (langevin) {
      // ||z||^2 and ||s||^2 of this sample: the deterministic sum of the reduce pass's partials.
      float zz = 0.0f, ss = 0.0f;
      for (int p = threadIdx.x; p < num_partials; p += blockDim.x) {
        zz += partials[(b * num_partials + p) * 2];
        ss += partials[(b * num_partials + p) * 2 + 1];
      }
      block_sum2(zz, ss, red);  // has __syncthreads: coef is loaded after it
      const float snr = coef[3], r = coef[4];
      const float ratio = sqrtf(zz) / sqrtf(ss);
      const float t = snr * ratio;
      // Song et al. 2021, Algorithm 4: eps = 2 r (snr ||z|| / ||s||)^2, written in the reference's order.
      eps = snr != 0.0f ? (2.0f * r) * (t * t) : 0.0f;
      sq = sqrtf(2.0f * eps);
    } else {
      __syncthreads();
    }
    const SampleCtx c = sample_ctx(coef, seeds, draws, draw_stride, guidance, guidance_stride, thresholds,
                                   cfg_rescale, b, flags);
    const T* xb = x + b * numel;
    T* xob = x_out + b * numel;

    if (grp < ngroups) {
      const long long e0 = grp * 4;
      const int n = (int)(numel - e0 < 4 ? numel - e0 : 4);
      // ---- every load first (x' may alias x; slots are updated in place) ----
      float xv[4], dv[4], uv[4];
      load_group<S, VEC>(xb + e0, n, xv);
      data_estimate<S, VEC>(out, batch, numel, b, e0, n, flags, c, xv, dv, uv);
      float sv[KMAX][4];
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
        if (i < K && ((reads >> i) & 1)) {
          load_group<S, VEC>(slots + ((long long)i * batch + b) * numel + e0, n, sv[i]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) sv[i][j] = 0.0f;
        }
      }
      float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (c.has_z) philox_normals4(c.seed, c.draw, 0u, (uint64_t)grp, z);

      // ---- x' = M[0] . regs + g z (+ Langevin) ----
      float xn[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const volatile float* m = coef + kRowHead;  // volatile: read at use, not hoisted into ~90 registers
        float acc = 0.0f;
        acc = acc + m[0] * xv[j];
        if (use_out) acc = acc + m[1] * dv[j];
        if (use_out && uncond) acc = acc + m[2] * uv[j];
#pragma unroll
        for (int i = 0; i < KMAX; ++i)
          if (i < K && ((reads >> i) & 1)) acc = acc + m[SB + i] * sv[i][j];
        if (c.has_z) acc = acc + c.g * z[j];
        if (langevin) {
          const float s = c.lsx * xv[j] + c.lsD * dv[j];
          acc = acc + eps * s;
          acc = acc + sq * z[j];
        }
        xn[j] = acc;
      }
      // ---- slot writes S_i = M[1+i] . regs (from the registers loaded above) ----
#pragma unroll
      for (int i = 0; i < KMAX; ++i) {
        if (i < K && ((writes >> i) & 1)) {
          const volatile float* m = coef + kRowHead + (1 + i) * W;
          float v[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float acc = 0.0f;
            acc = acc + m[0] * xv[j];
            if (use_out) acc = acc + m[1] * dv[j];
            if (use_out && uncond) acc = acc + m[2] * uv[j];
#pragma unroll
            for (int q = 0; q < KMAX; ++q)
              if (q < K && ((reads >> q) & 1)) acc = acc + m[SB + q] * sv[q][j];
            v[j] = acc;
          }
          store_group<S, VEC>(slots + ((long long)i * batch + b) * numel + e0, n, v);
        }
      }
      store_group<S, VEC>(xob + e0, n, xn);
      if (nonfinite) {  // the values as stored (an fp16 overflow counts): v - v is 0 only for finite v
        bool bad = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float v = S::load(S::store(xn[j]));
          bad = bad || (j < n && !(v - v == 0.0f));
        }
        if (bad) atomicOr(nonfinite + b, 1);
      }
    }
  }
}

// Langevin pass 1: per sample and block, the partial sums of z^2 and s^2 (s = lsx x + lsD D) into
// partials[b, blockIdx.x, 0:2] (gridDim.x partials per sample; the step kernel sums them in a fixed order, so the
// result is deterministic, unlike atomics).
template <class S, bool VEC>
__device__ __forceinline__ void reduce_impl(const typename S::T* x, const typename S::T* out, const float* rows,
                                            long long row_stride, const long long* seeds, const long long* draws,
                                            long long draw_stride, const float* guidance, long long guidance_stride,
                                            const float* thresholds, float* partials, long long batch,
                                            long long numel, int K, int flags, const float* cfg_rescale) {
  __shared__ float coef[kMaxRow];
  __shared__ float red[64];
  const int R = kRowHead + (1 + K) * (((flags & kUncond) ? 3 : 2) + K);
  const long long ngroups = (numel + 3) / 4;
  const long long gstride = (long long)gridDim.x * blockDim.x;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    __syncthreads();
    load_row(coef, rows, row_stride, b, R);
    __syncthreads();
    const SampleCtx c = sample_ctx(coef, seeds, draws, draw_stride, guidance, guidance_stride, thresholds,
                                   cfg_rescale, b, flags);
    float zz = 0.0f, ss = 0.0f;
    for (long long grp = (long long)blockIdx.x * blockDim.x + threadIdx.x; grp < ngroups; grp += gstride) {
      const long long e0 = grp * 4;
      const int n = (int)(numel - e0 < 4 ? numel - e0 : 4);
      float xv[4], dv[4], uv[4];
      load_group<S, VEC>(x + b * numel + e0, n, xv);
      data_estimate<S, VEC>(out, batch, numel, b, e0, n, flags & ~kUncond, c, xv, dv, uv);
      float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (c.has_z) philox_normals4(c.seed, c.draw, 0u, (uint64_t)grp, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < n) {
          const float s = c.lsx * xv[j] + c.lsD * dv[j];
          zz += z[j] * z[j];
          ss += s * s;
        }
      }
    }
    block_sum2(zz, ss, red);
    if (threadIdx.x == 0) {
      partials[(b * gridDim.x + blockIdx.x) * 2] = zz;
      partials[(b * gridDim.x + blockIdx.x) * 2 + 1] = ss;
    }
  }
}

// x_t = alpha x0 + sigma z (the forward process), per-sample alpha, sigma.
template <class S, bool VEC>
__device__ __forceinline__ void add_noise_impl(const typename S::T* x0, typename S::T* xt, const float* alpha,
                                               long long alpha_stride, const float* sigma, long long sigma_stride,
                                               const long long* seeds, const long long* draws, long long draw_stride,
                                               long long batch, long long numel) {
  const long long ngroups = (numel + 3) / 4;
  const long long gstride = (long long)gridDim.x * blockDim.x;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    const float a = alpha[b * alpha_stride], s = sigma[b * sigma_stride];
    const uint64_t seed = (uint64_t)seeds[b];
    const uint32_t draw = (uint32_t)draws[b * draw_stride];
    for (long long grp = (long long)blockIdx.x * blockDim.x + threadIdx.x; grp < ngroups; grp += gstride) {
      const long long e0 = grp * 4;
      const int n = (int)(numel - e0 < 4 ? numel - e0 : 4);
      float v[4], z[4];
      load_group<S, VEC>(x0 + b * numel + e0, n, v);
      philox_normals4(seed, draw, 0u, (uint64_t)grp, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = a * v[j] + s * z[j];
      store_group<S, VEC>(xt + b * numel + e0, n, v);
    }
  }
}

// Normals [B, numel] computed in float32 and cast once.
template <class S, bool VEC>
__device__ __forceinline__ void randn_impl(typename S::T* z, const long long* seeds, const long long* draws,
                                           long long draw_stride, long long batch, long long numel) {
  const long long ngroups = (numel + 3) / 4;
  const long long gstride = (long long)gridDim.x * blockDim.x;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    const uint64_t seed = (uint64_t)seeds[b];
    const uint32_t draw = (uint32_t)draws[b * draw_stride];
    for (long long grp = (long long)blockIdx.x * blockDim.x + threadIdx.x; grp < ngroups; grp += gstride) {
      const long long e0 = grp * 4;
      const int n = (int)(numel - e0 < 4 ? numel - e0 : 4);
      float v[4];
      philox_normals4(seed, draw, 0u, (uint64_t)grp, v);
      store_group<S, VEC>(z + b * numel + e0, n, v);
    }
  }
}

}  // namespace cuda
}  // namespace fastdiff

// -------------------------------------------------------------------------------------------------------------------
// extern "C" entry points, one per storage dtype (the vector / scalar choice is a uniform branch on flags & kVec)
// -------------------------------------------------------------------------------------------------------------------

#define FD_STEP_KERNEL(SUFFIX, S)                                                                                    \
  /* General step: any K <= 8, vector or scalar accesses (a uniform branch on flags & kVec). */                      \
  extern "C" __global__ void __launch_bounds__(fastdiff::cuda::kThreads) fastdiff_step_##SUFFIX(                     \
      const S::T* x, S::T* x_out, const S::T* out, S::T* slots, const float* rows, long long row_stride,            \
      const long long* seeds, const long long* draws, long long draw_stride, const float* guidance,                  \
      long long guidance_stride, const float* thresholds, const float* partials, int num_partials, long long batch,  \
      long long numel, int num_slots, int slot_reads, int slot_writes, int flags, int* nonfinite,                   \
      const float* cfg_rescale) {                                                                                    \
    if (flags & fastdiff::cuda::kVec)                                                                                \
      fastdiff::cuda::step_impl<S, true, fastdiff::cuda::kMaxSlots>(                                                 \
          x, x_out, out, slots, rows, row_stride, seeds, draws, draw_stride, guidance, guidance_stride, thresholds,   \
          partials, num_partials, batch, numel, num_slots, slot_reads, slot_writes, flags, nonfinite, cfg_rescale);  \
    else                                                                                                             \
      fastdiff::cuda::step_impl<S, false, fastdiff::cuda::kMaxSlots>(                                                \
          x, x_out, out, slots, rows, row_stride, seeds, draws, draw_stride, guidance, guidance_stride, thresholds,   \
          partials, num_partials, batch, numel, num_slots, slot_reads, slot_writes, flags, nonfinite, cfg_rescale);  \
  }                                                                                                                  \
  /* The common case, specialised: K <= 4 and vector accesses only (<= 64 registers: 4 blocks of 256 per SM). */     \
  extern "C" __global__ void __launch_bounds__(fastdiff::cuda::kThreads) fastdiff_step_##SUFFIX##_vec_k4(            \
      const S::T* x, S::T* x_out, const S::T* out, S::T* slots, const float* rows, long long row_stride,            \
      const long long* seeds, const long long* draws, long long draw_stride, const float* guidance,                  \
      long long guidance_stride, const float* thresholds, const float* partials, int num_partials, long long batch,  \
      long long numel, int num_slots, int slot_reads, int slot_writes, int flags, int* nonfinite,                   \
      const float* cfg_rescale) {                                                                                    \
    fastdiff::cuda::step_impl<S, true, 4>(x, x_out, out, slots, rows, row_stride, seeds, draws, draw_stride,         \
                                          guidance, guidance_stride, thresholds, partials, num_partials, batch,      \
                                          numel, num_slots, slot_reads, slot_writes, flags, nonfinite, cfg_rescale); \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(fastdiff::cuda::kThreads) fastdiff_step_reduce_##SUFFIX(              \
      const S::T* x, const S::T* out, const float* rows, long long row_stride, const long long* seeds,              \
      const long long* draws, long long draw_stride, const float* guidance, long long guidance_stride,               \
      const float* thresholds, float* partials, long long batch, long long numel, int num_slots, int flags,          \
      const float* cfg_rescale) {                                                                                    \
    if (flags & fastdiff::cuda::kVec)                                                                                \
      fastdiff::cuda::reduce_impl<S, true>(x, out, rows, row_stride, seeds, draws, draw_stride, guidance,            \
                                           guidance_stride, thresholds, partials, batch, numel, num_slots, flags,    \
                                           cfg_rescale);                                                             \
    else                                                                                                             \
      fastdiff::cuda::reduce_impl<S, false>(x, out, rows, row_stride, seeds, draws, draw_stride, guidance,           \
                                            guidance_stride, thresholds, partials, batch, numel, num_slots, flags,   \
                                            cfg_rescale);                                                            \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(fastdiff::cuda::kThreads) fastdiff_add_noise_##SUFFIX(                \
      const S::T* x0, S::T* xt, const float* alpha, long long alpha_stride, const float* sigma,                      \
      long long sigma_stride, const long long* seeds, const long long* draws, long long draw_stride,                 \
      long long batch, long long numel, int flags) {                                                                 \
    if (flags & fastdiff::cuda::kVec)                                                                                \
      fastdiff::cuda::add_noise_impl<S, true>(x0, xt, alpha, alpha_stride, sigma, sigma_stride, seeds, draws,        \
                                              draw_stride, batch, numel);                                            \
    else                                                                                                             \
      fastdiff::cuda::add_noise_impl<S, false>(x0, xt, alpha, alpha_stride, sigma, sigma_stride, seeds, draws,       \
                                               draw_stride, batch, numel);                                           \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(fastdiff::cuda::kThreads) fastdiff_randn_##SUFFIX(                    \
      S::T* z, const long long* seeds, const long long* draws, long long draw_stride, long long batch,               \
      long long numel, int flags) {                                                                                  \
    if (flags & fastdiff::cuda::kVec)                                                                                \
      fastdiff::cuda::randn_impl<S, true>(z, seeds, draws, draw_stride, batch, numel);                               \
    else                                                                                                             \
      fastdiff::cuda::randn_impl<S, false>(z, seeds, draws, draw_stride, batch, numel);                              \
  }

// One dtype per module when the build names one (the runtime build compiles each dtype on first use: a third of
// the compile time); all three otherwise.
#if !defined(FASTDIFF_CUDA_ONLY_F32) && !defined(FASTDIFF_CUDA_ONLY_F16) && !defined(FASTDIFF_CUDA_ONLY_BF16)
#define FASTDIFF_CUDA_ONLY_F32
#define FASTDIFF_CUDA_ONLY_F16
#define FASTDIFF_CUDA_ONLY_BF16
#endif
#ifdef FASTDIFF_CUDA_ONLY_F32
FD_STEP_KERNEL(f32, fastdiff::cuda::F32)
#endif
#ifdef FASTDIFF_CUDA_ONLY_F16
FD_STEP_KERNEL(f16, fastdiff::cuda::F16)
#endif
#ifdef FASTDIFF_CUDA_ONLY_BF16
FD_STEP_KERNEL(bf16, fastdiff::cuda::BF16)
#endif

#undef FD_STEP_KERNEL
