// The torch extension module of the CPU kernels (fastdiff/backends/cpu.py builds it): torch tensors in, the
// kernels' own limits checked (CPU tensors, storage dtypes, contiguity, at most KMAX slots, aliasing of x_out),
// raw pointers down to step_kernels.h.  Argument validation (shapes, devices, seeds, rows length) is done once, by
// fastdiff.ops, before a call gets here.
#include <torch/extension.h>

#include <omp.h>

#include <type_traits>
#include <vector>

#include "step_kernels.h"

namespace fdcpu {

// The kernels' storage type of a torch scalar type (storage.h's tags for fp16 / bf16).
template <class T>
struct StorageOf {
  using type = T;
};
template <>
struct StorageOf<at::Half> {
  using type = f16;
};
template <>
struct StorageOf<at::BFloat16> {
  using type = bf16;
};

static bool storage_ok(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

static void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastdiff cpu kernel: ", name, " is on ", t.device(),
                    "; every input must be a CPU tensor (use the triton or cuda kernel for GPU tensors)");
}

static void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastdiff cpu kernel: ", name,
                    " must be contiguous (call .contiguous() first): the kernel streams it");
}

static bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const char* a0 = (const char*)a.data_ptr();
  const char* b0 = (const char*)b.data_ptr();
  const char* a1 = a0 + a.numel() * a.element_size();
  const char* b1 = b0 + b.numel() * b.element_size();
  return a0 < b1 && b0 < a1;
}

// the math type of a storage type: float64 for float64, else float32
static at::ScalarType math_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor step(const at::Tensor& x, const at::Tensor& out, const at::Tensor& slots, const at::Tensor& rows,
                const at::Tensor& seeds, const at::Tensor& draws, const at::Tensor& guidance, int64_t slot_reads,
                int64_t slot_writes, bool use_out, bool cfg, bool noise, bool langevin,
                const c10::optional<at::Tensor>& x_out, const c10::optional<at::Tensor>& thresholds,
                const c10::optional<at::Tensor>& nonfinite, const c10::optional<at::Tensor>& cfg_rescale,
                bool uncond) {
  const char* who = "fastdiff cpu step: ";
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{x, "x"}, {slots, "slots"}, {rows, "rows"},
                                {seeds, "seeds"}, {draws, "draws"}, {guidance, "guidance"}})
    check_cpu(t, name);
  TORCH_CHECK_VALUE(storage_ok(x.scalar_type()), who, "x must be float32, float16, bfloat16 or float64, got ",
                    x.scalar_type());
  check_contiguous(x, "x");
  const int64_t B = x.size(0);
  const int64_t N = B ? x.numel() / B : 0;
  const int64_t K = slots.size(0);
  TORCH_CHECK_VALUE(K <= KMAX, who, "at most ", KMAX, " history slots are supported, got K = ", K);
  if (K) check_contiguous(slots, "slots");
  if (use_out) {
    check_cpu(out, "out");
    check_contiguous(out, "out");
  }
  const at::ScalarType mt = math_type(x.scalar_type());
  const int64_t R = ROW_HEAD + (1 + K) * ((uncond ? 3 : 2) + K);
  const at::Tensor rows_c = rows.to(mt).contiguous();
  const at::Tensor draws_c = draws.contiguous();
  const at::Tensor guid_c = guidance.to(mt).contiguous();
  const at::Tensor seeds_c = seeds.contiguous();
  at::Tensor thr_c;
  if (thresholds.has_value()) {
    check_cpu(*thresholds, "thresholds");
    thr_c = thresholds->contiguous();
  }
  at::Tensor resc_c;
  if (cfg_rescale.has_value()) {
    check_cpu(*cfg_rescale, "cfg_rescale");
    TORCH_CHECK_VALUE(cfg_rescale->dim() == 1 && cfg_rescale->size(0) == B, who, "cfg_rescale must be a tensor [B]");
    resc_c = cfg_rescale->to(mt).contiguous();
  }
  if (nonfinite.has_value()) {
    check_cpu(*nonfinite, "nonfinite");
    TORCH_CHECK_VALUE(nonfinite->scalar_type() == at::kInt && nonfinite->dim() == 1 && nonfinite->size(0) == B &&
                          nonfinite->is_contiguous(),
                      who, "nonfinite must be a contiguous int32 tensor [B]");
  }
  // output, possibly in place (x_out may be x)
  at::Tensor xo;
  if (x_out.has_value()) {
    xo = *x_out;
    check_cpu(xo, "x_out");
    TORCH_CHECK_VALUE(xo.sizes() == x.sizes() && xo.scalar_type() == x.scalar_type() && xo.is_contiguous(), who,
                      "x_out must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), ", got ",
                      xo.sizes(), " ", xo.scalar_type());
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
    using T = typename StorageOf<scalar_t>::type;
    using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
    using S = typename St<T>::S;
    StepArgs<T, A> p;
    p.x = reinterpret_cast<const S*>(x.data_ptr<scalar_t>());
    p.xo = reinterpret_cast<S*>(xo.data_ptr<scalar_t>());
    p.out = use_out ? reinterpret_cast<const S*>(out.data_ptr<scalar_t>()) : nullptr;
    p.slots = K ? reinterpret_cast<S*>(slots.data_ptr<scalar_t>()) : nullptr;
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
    const unsigned mask = (1u << K) - 1u;  // bits above the K slots name no slot
    p.reads = (unsigned)slot_reads & mask;
    p.writes = (unsigned)slot_writes & mask;
    p.use_out = use_out;
    p.cfg = cfg;
    p.noise = noise;
    p.langevin = langevin;
    p.thresholds = thr_c.defined() && use_out ? thr_c.data_ptr<A>() : nullptr;
    p.cfg_rescale = resc_c.defined() && use_out && cfg ? resc_c.data_ptr<A>() : nullptr;
    p.uncond = uncond;
    p.nonfinite = nonfinite.has_value() ? nonfinite->data_ptr<int32_t>() : nullptr;
    step_kernel(p);
  });
  return xo;
}

at::Tensor add_noise(const at::Tensor& x0, const at::Tensor& alpha, const at::Tensor& sigma, const at::Tensor& seeds,
                     const at::Tensor& draws) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{x0, "x0"}, {alpha, "alpha"},
                                {sigma, "sigma"}, {seeds, "seeds"}, {draws, "draws"}})
    check_cpu(t, name);
  TORCH_CHECK_VALUE(storage_ok(x0.scalar_type()), "fastdiff cpu add_noise: x0 must be float32, float16, bfloat16 "
                    "or float64, got ", x0.scalar_type());
  const int64_t B = x0.size(0);
  const int64_t N = B ? x0.numel() / B : 0;
  const at::Tensor xc = x0.contiguous();
  const at::ScalarType mt = math_type(x0.scalar_type());
  const at::Tensor a = alpha.to(mt).contiguous(), s = sigma.to(mt).contiguous();
  const at::Tensor sd = seeds.contiguous(), dr = draws.contiguous();
  at::Tensor xt = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (B == 0 || N == 0) return xt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastdiff_cpu_add_noise", [&] {
    using T = typename StorageOf<scalar_t>::type;
    using A = std::conditional_t<std::is_same<T, double>::value, double, float>;
    using S = typename St<T>::S;
    add_noise_kernel<T, A>(reinterpret_cast<const S*>(xc.data_ptr<scalar_t>()),
                           reinterpret_cast<S*>(xt.data_ptr<scalar_t>()), a.data_ptr<A>(), a.size(0) == 1 ? 0 : 1,
                           s.data_ptr<A>(), s.size(0) == 1 ? 0 : 1, sd.data_ptr<int64_t>(), dr.data_ptr<int64_t>(),
                           dr.size(0) == 1 ? 0 : 1, B, N);
  });
  return xt;
}

at::Tensor randn(const at::Tensor& seeds, const at::Tensor& draws, std::vector<int64_t> shape, at::ScalarType dtype,
                 const c10::optional<at::Tensor>& out) {
  check_cpu(seeds, "seeds");
  check_cpu(draws, "draws");
  TORCH_CHECK_VALUE(storage_ok(dtype), "fastdiff cpu randn: dtype must be float32, float16, bfloat16 or float64, got ",
                    dtype);
  at::Tensor z;
  if (out.has_value()) {  // draw into a caller's buffer (the sampler's state): no allocation
    z = *out;
    check_cpu(z, "out");
    TORCH_CHECK_VALUE(z.sizes() == at::IntArrayRef(shape) && z.scalar_type() == dtype && z.is_contiguous(),
                      "fastdiff cpu randn: out must be a contiguous ", dtype, " tensor of shape ", shape);
  } else {
    z = at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  const int64_t B = shape.empty() ? 0 : shape[0];
  const int64_t N = B ? z.numel() / B : 0;
  if (B == 0 || N == 0) return z;
  const at::Tensor sd = seeds.contiguous(), dr = draws.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastdiff_cpu_randn", [&] {
    using T = typename StorageOf<scalar_t>::type;
    using S = typename St<T>::S;
    randn_kernel<T>(reinterpret_cast<S*>(z.data_ptr<scalar_t>()), sd.data_ptr<int64_t>(), dr.data_ptr<int64_t>(),
                    dr.size(0) == 1 ? 0 : 1, B, N);
  });
  return z;
}

}  // namespace fdcpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff CPU kernels (C++/OpenMP): step, add_noise, randn";
  m.def("step", &fdcpu::step, "one sampler stage in one memory pass (see fastdiff.ops)", py::arg("x"), py::arg("out"),
        py::arg("slots"), py::arg("rows"), py::arg("seeds"), py::arg("draws"), py::arg("guidance"),
        py::arg("slot_reads"), py::arg("slot_writes"), py::arg("use_out"), py::arg("cfg"), py::arg("noise"),
        py::arg("langevin"), py::arg("x_out") = py::none(), py::arg("thresholds") = py::none(),
        py::arg("nonfinite") = py::none(), py::arg("cfg_rescale") = py::none(), py::arg("uncond") = false);
  m.def("add_noise", &fdcpu::add_noise, "x_t = alpha x0 + sigma z with Philox z", py::arg("x0"), py::arg("alpha"),
        py::arg("sigma"), py::arg("seeds"), py::arg("draws"));
  m.def("randn", &fdcpu::randn, "Philox normals, batch-invariant", py::arg("seeds"), py::arg("draws"),
        py::arg("shape"), py::arg("dtype"), py::arg("out") = py::none());
  m.def("num_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel call uses");
  m.def("set_parallel_min", [](int64_t n) {
    int64_t old = fdcpu::g_parallel_min;
    fdcpu::g_parallel_min = n;
    return old;
  }, "elements below which a call runs single-threaded; returns the previous value");
}
