// Test-only probes of the CPU kernels' random numbers, built by tests/test_kernel_cpu.py (never shipped): the raw
// Philox words of philox.h (Random123 known answers), the hand-vectorized words of philox_simd.h per compiled ISA,
// philox.h's scalar libm normals and normals_simd.h's vectorized normals per compiled ISA.  Compiled with the cpu
// backend's flags (fastdiff.backends.cpu.CFLAGS), so it sees the same ISA paths as the kernels; tests/test_rng.py
// also builds it with AVX-512 off and with AVX2 / FMA off, to check the narrower paths against each other.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "normals_simd.h"
#include "philox.h"
#include "philox_simd.h"

namespace probe {

// The raw Philox4x32-10 words of philox.h for (counter[4], key[2]).
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
#if defined(__AVX2__) && defined(__FMA__)
  else if (isa == "avx2") fn = &fastdiff::simd::normals_blocks_avx2;
#endif
  TORCH_CHECK_VALUE(fn != nullptr, "normals_fast: isa '", isa, "' is not compiled in (see normals_isas())");
  TORCH_CHECK_VALUE(nblocks >= 0, "nblocks must be >= 0");
  at::Tensor z = at::empty({nblocks * 4}, at::kFloat);
  float* p = z.data_ptr<float>();
  for (int64_t j = 0; j < nblocks; j += fastdiff::simd::NORMALS_MAX_BLOCKS)
    fn((uint64_t)seed, (uint32_t)draw, (uint64_t)(blk0 + j), std::min(fastdiff::simd::NORMALS_MAX_BLOCKS, nblocks - j), p + 4 * j);
  return z;
}

std::vector<std::string> normals_isas() {
  std::vector<std::string> v{fastdiff::simd::normals_blocks_isa()};
#if defined(__AVX512F__)
  if (v[0] != "avx512") v.push_back("avx512");
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (v[0] != "avx2") v.push_back("avx2");
#endif
  if (v[0] != "portable") v.push_back("portable");
  return v;
}

}  // namespace probe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("philox_raw", &probe::philox_raw, "raw Philox4x32-10 words for (counter[4], key[2])");
  m.def("philox_blocks_raw", &probe::philox_blocks_raw,
        "philox_simd.h's words of nblocks consecutive blocks from counter[4], key[2] (nblocks x 4)",
        py::arg("counter"), py::arg("key"), py::arg("nblocks"), py::arg("isa") = "");
  m.def("philox_isas", &probe::philox_isas, "the compiled Philox paths, the kernels' first");
  m.def("normals_libm", &probe::normals_libm, "philox.h's scalar libm normals of blocks [blk0, blk0 + nblocks)");
  m.def("normals_fast", &probe::normals_fast, "the kernels' vectorized normals of blocks [blk0, blk0 + nblocks)",
        py::arg("seed"), py::arg("draw"), py::arg("blk0"), py::arg("nblocks"), py::arg("isa") = "");
  m.def("normals_isas", &probe::normals_isas, "the compiled normals paths, the kernels' first");
}
