"""The cuda kernel (csrc/cuda/step.cu + fastdiff/backends/cuda.py) against the torch reference.

Three tiers, so a machine without a GPU still checks most of it:

* ``nvcc`` builds step.cu for sm_80 and sm_90 (when nvcc is on PATH), and g++ checks the shared Philox header
  (csrc/common/philox.h) against the Random123 known answers.
* Host emulation: g++ compiles step.cu itself as C++ (one CUDA thread per block, blocks run in order; a thin shim
  stands in for the CUDA built-ins) and the real glue in fastdiff/backends/cuda.py launches it through the same
  argument packing as on the GPU.  Every semantic test below runs on this ``emu`` target: indexing, slot masks,
  vector and scalar paths, CFG, Langevin, dtypes.
* ``gpu``-marked: the same tests on a CUDA device (CuPy / NVRTC build), plus Random123 answers on the device, CUDA
  graph capture with rows changed in place, zero host syncs, and exactly one kernel launch per step.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S
from fastdiff.backends import cuda as cb
from threshold_ref import CASES as THRESHOLD_CASES
from threshold_ref import check_thresholded_stage
from kernel_checks import DTYPES, KAT, M32, assert_like_torch, assert_verbose_close, check_nonfinite_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
STEP_CU = CSRC / "cuda" / "step.cu"

SEEDS = [3, 2**64 - 5, (1 << 40) + 7, 12345]  # small, >= 2^63 (negative int64 pattern), >= 2^32
# batch 1, odd sizes (scalar path), multiples of 4 (vector path), 4097 elements (scalar path with a tail)
SHAPES = [(1, 4097), (2, 3), (3, 4, 9), (2, 11), (2, 4, 8, 8)]
EMU_SHAPES = [(1, 4097), (3, 4, 9), (2, 11)]
PLAN_OPTIONS = {"pc": dict(corrector_steps=1), "annealed_langevin": dict(corrector_steps=2)}


def small_plan(solver: str):
    """A 3-step plan of ``solver`` on the first schedule it accepts (flow solvers on a flow first)."""
    candidates = [(S.EDM(), "epsilon"), (S.DiscreteVP(), "epsilon"), (S.VE(), "epsilon"),
                  (S.RectifiedFlow(), "flow")]
    if solver.startswith("flow"):
        candidates = candidates[::-1]
    errors = []
    for sch, pred in candidates:
        for opts in (PLAN_OPTIONS.get(solver, {}), {}):
            try:
                return fd.plan(solver, sch, 3, prediction=pred, **opts)
            except (ValueError, TypeError) as e:
                errors.append(f"{sch!r}/{pred}/{opts}: {e}")
    raise AssertionError(f"no small plan for {solver}: {errors}")


# ---------------------------------------------------------------------------------------------------------------
# Tier 1: nvcc and the Philox header (no GPU needed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvcc_build(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    out = tmp_path_factory.mktemp("nvcc") / "step.o"
    cmd = [nvcc, "-c", "-std=c++17", "--fmad=false", "--threads", "0", "-I", str(CSRC / "common"),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Xcompiler", "-Wall", "-o", str(out), str(STEP_CU)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return cmd, proc, out


def test_nvcc_compiles_for_sm80_and_sm90(nvcc_build):
    cmd, proc, out = nvcc_build
    log = f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, f"nvcc failed:\n{log}"
    assert out.is_file() and out.stat().st_size > 0
    # Warnings are part of the contract too: the source builds cleanly (host compiler with -Wall, cudafe, ptxas).
    assert "warning" not in proc.stderr.lower(), f"nvcc warnings:\n{log}"


def test_nvcc_object_exports_the_kernels_the_glue_launches(nvcc_build):
    cmd, proc, out = nvcc_build
    assert proc.returncode == 0, proc.stderr
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not on PATH")
    symbols = subprocess.run([nm, str(out)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    for sfx in ("f32", "f16", "bf16"):
        for name in cb._kernel_names(sfx):
            assert name in exported, f"{name} (launched by fastdiff/backends/cuda.py) is not an extern \"C\" kernel"


def _find_nvrtc():
    """libnvrtc from $FASTDIFF_NVRTC_LIB, the nvidia-cuda-nvrtc wheels, or the system; None if absent."""
    import ctypes.util
    import glob
    import os
    import sys

    found = [os.environ.get("FASTDIFF_NVRTC_LIB", "")]
    for base in sys.path:
        for pat in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(p for p in glob.glob(os.path.join(base, pat)) if "builtins" not in p and ".alt." not in p)
    found += [ctypes.util.find_library("nvrtc") or "", "/usr/local/cuda/lib64/libnvrtc.so"]
    for path in filter(None, found):
        try:
            for b in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by name
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def test_nvrtc_source_is_self_contained():
    """What the cuda backend hands NVRTC: step.cu with philox.h inlined and no C library includes left."""
    src = cb.source()
    assert '#include "philox.h"' not in src  # inlined: NVRTC needs no include path (and has no libc headers)
    assert "include <stdint.h>" not in src.split("philox.h (inlined)")[1]
    assert "philox4x32_10" in src and "FD_STEP_KERNEL(f32" in src
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or set FASTDIFF_NVRTC_LIB)")
    for sfx in ("f32", "f16", "bf16"):
        # the options CuPy's compile_using_nvrtc ends up with (its -arch for an H100, its default-device flag)
        opts = list(cb.NVRTC_OPTIONS) + [f"-DFASTDIFF_CUDA_ONLY_{sfx.upper()}", "-arch=compute_90",
                                         "--device-as-default-execution-space"]
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"step.cu", 0, None, None) == 0
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC failed for {sfx}:\n{log.value.decode()}"
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        ptx = ptx.value.decode()
        for name in cb._kernel_names(sfx):
            assert f".entry {name}(" in ptx, f"{name} missing from the {sfx} module"
        assert ".ftz" not in ptx, "denormals must not be flushed (the other backends keep them)"


PHILOX_MAIN = r"""
#include <stdio.h>
#include "philox.h"
int main() {
  const unsigned M = 0xFFFFFFFFu;
  const fastdiff::uint4x32 ctr[3] = {{0, 0, 0, 0}, {M, M, M, M}, {0x243F6A88u, 0x85A308D3u, 0x13198A2Eu, 0x03707344u}};
  const unsigned key[3][2] = {{0, 0}, {M, M}, {0xA4093822u, 0x299F31D0u}};
  for (int i = 0; i < 3; ++i) {
    fastdiff::uint4x32 r = fastdiff::philox4x32_10(ctr[i], key[i][0], key[i][1]);
    printf("%08x %08x %08x %08x\n", r.x, r.y, r.z, r.w);
  }
  float z[4];  // normals of blocks 0..2, seed 2^64 - 5, draw 3, stream 0
  for (unsigned long long blk = 0; blk < 3; ++blk) {
    fastdiff::philox_normals4(0xFFFFFFFFFFFFFFFBull, 3u, 0u, blk, z);
    printf("%.9g %.9g %.9g %.9g\n", z[0], z[1], z[2], z[3]);
  }
  return 0;
}
"""


def test_philox_header_known_answers_on_host(tmp_path):
    """The shared header (what step.cu includes) gives Random123's answers and fastdiff.rng's normals."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    src, exe = tmp_path / "kat.cpp", tmp_path / "kat"
    src.write_text(PHILOX_MAIN)
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-I", str(CSRC / "common"),
                            str(src), "-o", str(exe), "-lm"], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    words = [tuple(int(w, 16) for w in line.split()) for line in lines[:3]]
    assert words == [k[2] for k in KAT]
    assert lines[0] == "6627e8d5 e169c58d bc57ac4c 9b00dbd8"
    normals = np.array([[float(v) for v in line.split()] for line in lines[3:]], dtype=np.float32).ravel()
    want = rng.randn_numpy((1, 12), [2**64 - 5], draw=3)[0]
    np.testing.assert_allclose(normals, want, rtol=1e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Tier 2: host emulation of step.cu (no GPU needed)
# ---------------------------------------------------------------------------------------------------------------

# Test-only kernel: raw Philox4x32-10 words of philox.h on the device (known-answer tests), compiled after step.cu
# (whose NVRTC source has philox.h inlined): out[i] = philox(ctr[i], key[i]); ctr [n, 4], key [n, 2], out [n, 4].
PHILOX_RAW_CU = r"""
extern "C" __global__ void fastdiff_philox_raw(const unsigned int* ctr, const unsigned int* key, unsigned int* out,
                                               long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    fastdiff::uint4x32 c = {ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3]};
    const fastdiff::uint4x32 r = fastdiff::philox4x32_10(c, key[2 * i], key[2 * i + 1]);
    out[4 * i] = r.x;
    out[4 * i + 1] = r.y;
    out[4 * i + 2] = r.z;
    out[4 * i + 3] = r.w;
  }
}
"""


@functools.cache
def _gpu_philox_raw():
    import cupy

    code = cb.source() + PHILOX_RAW_CU
    return cupy.RawModule(code=code, options=cb.NVRTC_OPTIONS + ("-DFASTDIFF_CUDA_ONLY_F32",)).get_function(
        "fastdiff_philox_raw")


EMU_SHIM = r"""
// Host emulation shim for csrc/cuda/step.cu: one CUDA thread per block, blocks run one after another.  With one
// thread per block, shared memory is a static array, __syncthreads is a no-op and a warp shuffle has no partner.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <utility>
struct fd_dim3 { unsigned int x, y, z; };
static fd_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { float4 r = {a, b, c, d}; return r; }
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __shfl_xor_sync(unsigned int, float, int) { return 0.0f; }
static inline void __syncthreads() {}
static inline int atomicOr(int* p, int v) { const int old = *p; *p = old | v; return old; }
#include "step.cu"  // a copy beside this file, so that its #include "half_bits.cuh" finds EMU_HALF_BITS below
PHILOX_RAW_CU

// cuLaunchKernel-style entry: args[i] points at the value of parameter i.
template <class... P, size_t... I>
static void fd_call(void (*k)(P...), void** args, std::index_sequence<I...>) { k(*static_cast<P*>(args[I])...); }
template <class... P>
static void fd_grid(void (*k)(P...), unsigned gx, unsigned gy, void** args) {
  blockDim = {1, 1, 1}; gridDim = {gx, gy, 1}; threadIdx = {0, 0, 0};
  for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) { blockIdx = {x, y, 0}; fd_call(k, args, std::index_sequence_for<P...>{}); }
}
template <class... P>
static int fd_sizes(void (*)(P...), int* out) {
  const int s[] = {(int)sizeof(P)...};
  for (size_t i = 0; i < sizeof...(P); ++i) out[i] = s[i];
  return (int)sizeof...(P);
}
#define FD_EMU(NAME)                                                                                   \
  extern "C" void emu_##NAME(unsigned gx, unsigned gy, void** args) { fd_grid(NAME, gx, gy, args); } \
  extern "C" int emu_sizes_##NAME(int* out) { return fd_sizes(NAME, out); }
#define FD_EMU_DTYPE(S) FD_EMU(fastdiff_step_##S) FD_EMU(fastdiff_step_##S##_vec_k4) FD_EMU(fastdiff_step_reduce_##S) \
  FD_EMU(fastdiff_add_noise_##S) FD_EMU(fastdiff_randn_##S)
FD_EMU_DTYPE(f32)
FD_EMU_DTYPE(f16)
FD_EMU_DTYPE(bf16)
FD_EMU(fastdiff_philox_raw)
"""

# Host stand-in for csrc/cuda/half_bits.cuh (whose PTX only a CUDA compiler takes): the compiler's _Float16.
EMU_HALF_BITS = r"""
#pragma once
static inline float fd_half_bits_to_float(unsigned short v) { _Float16 h; memcpy(&h, &v, 2); return (float)h; }
static inline unsigned short fd_float_to_half_bits(float f) {
  _Float16 h = (_Float16)f; unsigned short v; memcpy(&v, &h, 2); return v;
}
"""

_CTYPE = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32}


class Target:
    """Where the cuda backend's kernels run: the GPU, or the host emulation (CPU tensors)."""

    def __init__(self, name, device, lib=None):
        self.name, self.device, self.lib = name, torch.device(device), lib

    @contextlib.contextmanager
    def _active(self):
        if self.lib is None:
            yield
            return
        saved = {k: getattr(cb, k) for k in ("_launch", "_check_cuda", "_device_index", "_num_sms")}

        def check_device(name, t, device):
            if not isinstance(t, torch.Tensor) or t.device != device:
                raise ValueError(f"{name} is on {getattr(t, 'device', None)} but x is on {device}")

        cb._launch, cb._check_cuda = self._emu_launch, check_device
        cb._device_index, cb._num_sms = (lambda t: 0), (lambda idx: 2)  # 2 "SMs": small grids, loops exercised
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(cb, k, v)

    def _emu_launch(self, device_index, sfx, name, grid, args):
        grid = tuple(grid) + (1,) * (2 - len(grid))
        gx, gy = grid[0], grid[1]
        if name.startswith("fastdiff_step_") and "reduce" not in name:
            gx *= cb.THREADS  # one group per thread on the GPU; here one thread per block
        # the argument list must match the kernel's parameters in number and size (cuLaunchKernel copies
        # sizeof(param) bytes from each pointer: a wrong size would read garbage on the GPU)
        sizes = (ctypes.c_int * 64)()
        nparams = getattr(self.lib, f"emu_sizes_{name}")(sizes)
        assert nparams == len(args), f"{name}: {len(args)} arguments for {nparams} parameters"
        vals = []
        for i, a in enumerate(args):
            ct = _CTYPE.get(type(a))
            assert ct is not None, f"{name}: kernel argument of type {type(a).__name__} (want numpy scalars)"
            assert ctypes.sizeof(ct) == sizes[i], f"{name}: argument {i} has {ctypes.sizeof(ct)} bytes, " \
                                                  f"the parameter {sizes[i]}"
            vals.append(ct(int(a)))
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        getattr(self.lib, f"emu_{name}")(ctypes.c_uint(gx), ctypes.c_uint(gy), ptrs)

    def step(self, *args, **kw):
        with self._active():
            return cb.step(*args, **kw)

    def add_noise(self, *args):
        with self._active():
            return cb.add_noise(*args)

    def randn(self, *args):
        with self._active():
            return cb.randn(*args)

    def philox_raw(self, counters, keys):
        """Raw Philox words through the test-only kernel: uint32 [n, 4] counters, [n, 2] keys -> [n, 4]."""
        c = np.ascontiguousarray(counters, dtype=np.uint32).reshape(-1, 4)
        k = np.ascontiguousarray(keys, dtype=np.uint32).reshape(-1, 2)
        n = c.shape[0]
        grid = (max(1, min(-(-n // cb.THREADS), 1024)),)
        if self.lib is None:
            import cupy

            cc, kc = cupy.asarray(c), cupy.asarray(k)
            oc = cupy.empty_like(cc)
            if n:
                _gpu_philox_raw()(grid, (cb.THREADS,), (cc, kc, oc, np.int64(n)))
            return cupy.asnumpy(oc)
        ct, kt = torch.from_numpy(c.view(np.int32).copy()), torch.from_numpy(k.view(np.int32).copy())
        ot = torch.empty_like(ct)
        if n:
            self._emu_launch(0, "f32", "fastdiff_philox_raw", grid, (np.uint64(ct.data_ptr()), np.uint64(kt.data_ptr()),
                                                                    np.uint64(ot.data_ptr()), np.int64(n)))
        return ot.numpy().view(np.uint32)


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    d = tmp_path_factory.mktemp("emu")
    src, lib = d / "emu.cpp", d / "libfdemu.so"
    src.write_text(EMU_SHIM.replace("PHILOX_RAW_CU", PHILOX_RAW_CU))
    shutil.copy(STEP_CU, d / "step.cu")
    (d / "half_bits.cuh").write_text(EMU_HALF_BITS)
    cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
           "-I", str(CSRC / "common"), str(src), "-o", str(lib), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip(f"this C++ compiler has no _Float16: {proc.stderr[:300]}")
    assert proc.returncode == 0, f"host emulation build failed:\n{proc.stderr}"
    return ctypes.CDLL(str(lib))


def _gpu_target():
    ok, why = cb.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {why}")
    return Target("gpu", "cuda")


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def target(request):
    if request.param == "gpu":
        return _gpu_target()
    return Target("emu", "cpu", request.getfixturevalue("emu_lib"))


@pytest.fixture
def gpu():
    return _gpu_target()


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def stage_flags(plan, k):
    return dict(slot_reads=plan.slot_reads(k), slot_writes=plan.slot_writes(k), use_out=bool(plan.calls_model[k]),
                noise=bool(plan.draw[k] >= 0), langevin=bool(plan.langevin[k, 0] != 0))


def model(x, k, cfg):
    """A deterministic stand-in for the network; [uncond; cond] with cfg."""
    o = torch.tanh(x.float()) * 0.8 + 0.1 * (k + 1)
    if cfg:
        o = torch.cat([o, torch.sin(x.float()) + 0.05 * k])
    return o.to(x.dtype)


def call(fn, x, out, slots, rows, seeds, draws, guidance, flags, cfg=False, **kw):
    return fn(x, out, slots, rows, seeds, draws, guidance, flags["slot_reads"], flags["slot_writes"],
              flags["use_out"], cfg, flags["noise"], flags["langevin"], **kw)


def check_stage(target, x, out, slots, rows, seeds, draws, guidance, flags, cfg=False, what=""):
    """One stage three ways from the same inputs (kernel, torch in x's dtype, torch in float64) and compare.

    The kernel updates ``slots`` itself (views keep their alignment); returns the kernel's (x', slots)."""
    before, s_t, s_64 = slots.clone(), slots.clone(), slots.double()
    x0, out0 = x.clone(), out.clone()
    same = call(ops.step_reference, x0, out0, s_t, rows, seeds, draws, guidance, flags, cfg)
    ref = call(ops.step_reference, x0.double(), out0.double(), s_64, rows.double(), seeds, draws, guidance.double(),
               flags, cfg)
    got = call(target.step, x, out, slots, rows, seeds, draws, guidance, flags, cfg)
    assert got.dtype == x.dtype and got.shape == x.shape and got.device == x.device
    assert torch.equal(x, x0) and torch.equal(out, out0), f"{what}: the kernel wrote into x or out"
    assert_like_torch(got, same, ref, f"{what} x'")
    for i in range(slots.shape[0]):
        if (flags["slot_writes"] >> i) & 1:
            assert_like_torch(slots[i], s_t[i], s_64[i], f"{what} slot {i}")
        else:
            assert torch.equal(slots[i], before[i]), f"{what}: slot {i} changed without its write bit"
    return got, slots


def run_plan(target, plan, shape, dtype, cfg=False, seeds=SEEDS):
    """Every stage of ``plan`` on ``target``, each compared from identical inputs; continue from the kernel."""
    dev = target.device
    B = shape[0]
    seeds_t = rng.seeds_tensor(seeds[:B], device=dev)
    g = torch.Generator().manual_seed(sum(shape) + len(plan.solver))
    x = (plan.init_scale * torch.randn(shape, generator=g)).to(dtype).to(dev)
    slots = torch.zeros((plan.num_slots,) + tuple(shape), dtype=dtype, device=dev)
    guidance = torch.linspace(1.0, 7.5, B, dtype=torch.float32, device=dev) if cfg else \
        torch.zeros(1, dtype=torch.float32, device=dev)
    for k in range(plan.num_stages):
        rows = torch.as_tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=dev)
        draws = torch.tensor([int(plan.draw[k])], dtype=torch.int64, device=dev)
        flags = stage_flags(plan, k)
        out = model(x, k, cfg)
        x, slots = check_stage(target, x, out, slots, rows, seeds_t, draws, guidance, flags, cfg,
                               f"{plan.solver} stage {k}/{plan.num_stages} {dtype} {shape} on {target.name}")
    return x


# ---------------------------------------------------------------------------------------------------------------
# Philox and normals
# ---------------------------------------------------------------------------------------------------------------


def test_philox_known_answers(target):
    ctr = np.array([k[0] for k in KAT], dtype=np.uint32)
    key = np.array([k[1] for k in KAT], dtype=np.uint32)
    got = target.philox_raw(ctr, key)
    assert [tuple(int(w) for w in row) for row in got] == [k[2] for k in KAT]
    # and random counters / keys, bit for bit against the numpy oracle
    r = np.random.default_rng(0)
    ctr = r.integers(0, 2**32, size=(1000, 4), dtype=np.uint64).astype(np.uint32)
    key = r.integers(0, 2**32, size=(1000, 2), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(target.philox_raw(ctr, key), rng.philox4x32_10(ctr, key))


@pytest.mark.parametrize("shape", [(3, 4097), (2, 4, 8, 8), (1, 3)])
def test_randn_matches_rng_and_is_batch_invariant(target, shape):
    dev = target.device
    seeds = SEEDS[: shape[0]]
    s = rng.seeds_tensor(seeds, device=dev)
    draws = torch.tensor([5], dtype=torch.int64, device=dev)
    z = target.randn(s, draws, list(shape), torch.float32)
    want = rng.randn(shape, seeds, draw=5)
    assert z.dtype == torch.float32 and tuple(z.shape) == shape and z.device == dev
    torch.testing.assert_close(z.cpu(), want, rtol=1e-6, atol=2e-6)  # a few ulp (libm)
    # batch invariance, bit for bit: each sample alone, and a per-sample draw vector
    for b in range(shape[0]):
        alone = target.randn(s[b: b + 1], draws, [1] + list(shape[1:]), torch.float32)
        assert torch.equal(alone[0], z[b]), f"sample {b} depends on its batch"
    per = torch.tensor([5, 9, 5][: shape[0]], dtype=torch.int64, device=dev)
    zp = target.randn(s, per, list(shape), torch.float32)
    for b in range(shape[0]):
        d = int(per[b])
        assert torch.equal(zp[b], target.randn(s[b: b + 1], per[b: b + 1], [1] + list(shape[1:]), torch.float32)[0])
        torch.testing.assert_close(zp[b].cpu(), rng.randn((1,) + shape[1:], [seeds[b]], draw=d)[0], rtol=1e-6,
                                   atol=2e-6)
    # low precision: drawn in fp32 and cast once (round to nearest even, as torch's .to)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(target.randn(s, draws, list(shape), dt), z.to(dt)), dt


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_matches_reference(target, dtype):
    dev = target.device
    shape = (3, 5, 7)
    seeds = rng.seeds_tensor(SEEDS[:3], device=dev)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(dev)
    alpha = torch.tensor([1.0, 0.5, 0.1], device=dev)
    sigma = torch.tensor([0.0, 0.8, 0.99], device=dev)
    draws = torch.tensor([4, 0, 7], dtype=torch.int64, device=dev)
    got = target.add_noise(x0, alpha, sigma, seeds, draws)
    same = ops.add_noise_reference(x0, alpha, sigma, seeds, draws)
    ref = ops.add_noise_reference(x0.double(), alpha.double(), sigma.double(), seeds, draws)
    assert_like_torch(got, same, ref, f"add_noise {dtype}")
    # alpha / sigma in float64 are accepted (cast on device) and one shared draw broadcasts
    got1 = target.add_noise(x0, alpha.double(), sigma.double(), seeds, draws[:1])
    same1 = ops.add_noise_reference(x0, alpha, sigma, seeds, draws[:1])
    assert_like_torch(got1, same1, ops.add_noise_reference(x0.double(), alpha.double(), sigma.double(), seeds,
                                                           draws[:1]), "add_noise shared draw")


# ---------------------------------------------------------------------------------------------------------------
# The step: every solver, every dtype, odd shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("solver", fd.SOLVERS)
def test_step_every_solver_emulated(emu_lib, solver, dtype, shape):
    run_plan(Target("emu", "cpu", emu_lib), small_plan(solver), shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("solver", fd.SOLVERS)
def test_step_every_solver_gpu(gpu, solver, dtype, shape):
    run_plan(gpu, small_plan(solver), shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cfg_with_per_sample_guidance(target, dtype):
    run_plan(target, fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 4), (3, 4, 9), dtype, cfg=True)
    run_plan(target, fd.plan("euler_ancestral", S.EDM(), 3), (2, 11), dtype, cfg=True)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 11)], ids=["vector", "scalar"])
def test_in_place(target, shape):
    """x_out=x: every read happens before any write, so the in-place result equals the out-of-place one."""
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    dev = target.device
    k = 1
    flags = stage_flags(plan, k)
    rows = torch.as_tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=dev)
    draws = torch.tensor([int(plan.draw[k])], device=dev)
    seeds = rng.seeds_tensor(SEEDS[: shape[0]], device=dev)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(dev)
    out = torch.randn(shape, generator=g).to(dev)
    slots = torch.randn((plan.num_slots,) + shape, generator=g).to(dev)
    guidance = torch.zeros(1, device=dev)
    s1 = slots.clone()
    want = call(target.step, x, out, s1, rows, seeds, draws, guidance, flags)
    x2, s2 = x.clone(), slots.clone()
    got = call(target.step, x2, out, s2, rows, seeds, draws, guidance, flags, x_out=x2)
    assert got.data_ptr() == x2.data_ptr()
    assert torch.equal(got, want) and torch.equal(s2, s1)


@pytest.mark.parametrize("noise", [False, True], ids=["affine", "noisy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_flags(target, dtype, noise):
    """Flags exactly the samples whose stored x' has NaN / Inf (fp16 overflow included), OR-ed into set flags."""
    check_nonfinite_flags(target.step, target.device, dtype, noise)


def test_per_sample_rows_of_different_plans(target):
    """One launch serves samples at different stages of different plans (rows [B, R], draws [B])."""
    dev = target.device
    p1, p2 = fd.plan("euler_ancestral", S.EDM(), 5), fd.plan("ddim", S.EDM(), 3, eta=0.5)
    p3 = fd.plan("euler", S.EDM(), 4)
    picks = [(p1, 2), (p2, 1), (p3, 0)]
    assert len({p.num_slots for p, _ in picks}) == 1
    rows = torch.tensor(np.stack([p.rows()[k] for p, k in picks]), dtype=torch.float32, device=dev)
    draws = torch.tensor([int(p.draw[k]) for p, k in picks], dtype=torch.int64, device=dev)
    assert (draws < 0).any() and (draws >= 0).any()
    for dtype in DTYPES:
        shape = (3, 4, 9)
        g = torch.Generator().manual_seed(5)
        x = (20 * torch.randn(shape, generator=g)).to(dtype).to(dev)
        out = torch.randn(shape, generator=g).to(dtype).to(dev)
        flags = dict(slot_reads=0, slot_writes=0, use_out=True, noise=True, langevin=False)
        slots = torch.zeros((0,) + shape, dtype=dtype, device=dev)
        got, _ = check_stage(target, x, out, slots, rows, rng.seeds_tensor(SEEDS[:3], device=dev), draws,
                             torch.zeros(1, device=dev), flags, what=f"mixed plans {dtype}")
        # and each sample equals its own single-sample launch, bit for bit
        for b, (p, _k) in enumerate(picks):
            alone = call(target.step, x[b: b + 1], out[b: b + 1], slots[:, b: b + 1], rows[b: b + 1],
                         rng.seeds_tensor(SEEDS[b: b + 1], device=dev), draws[b: b + 1],
                         torch.zeros(1, device=dev), flags)
            assert torch.equal(alone[0], got[b]), f"sample {b} ({p.solver}) depends on its batch"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 4097)], ids=["vector", "scalar"])
def test_langevin_mixed_batch(target, dtype, shape):
    """Langevin corrector rows for some samples, none (snr = 0) or no noise (draw < 0) for others."""
    dev = target.device
    plan = fd.plan("pc", S.VE(), 3, corrector_steps=1)
    ks = [k for k in range(plan.num_stages) if plan.langevin[k, 0] != 0]
    plain = [k for k in range(plan.num_stages) if plan.langevin[k, 0] == 0 and plan.calls_model[k]]
    assert ks and plain and plan.num_slots == 0
    B = shape[0]
    picks = ([ks[0], plain[0], ks[-1]] * B)[:B]
    rows = torch.tensor(np.stack([plan.rows()[k] for k in picks]), dtype=torch.float32, device=dev)
    draws = torch.tensor([int(plan.draw[k]) for k in picks], dtype=torch.int64, device=dev)
    if B > 2:
        draws[2] = -1  # a corrector sample without noise: eps = 0 (||z|| = 0), x' from the affine part only
    flags = dict(slot_reads=0, slot_writes=0, use_out=True, noise=True, langevin=True)
    g = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(shape, generator=g)).to(dtype).to(dev)
    out = torch.randn(shape, generator=g).to(dtype).to(dev)
    slots = torch.zeros((0,) + shape, dtype=dtype, device=dev)
    check_stage(target, x, out, slots, rows, rng.seeds_tensor(SEEDS[:B], device=dev), draws,
                torch.zeros(1, device=dev), flags, what=f"langevin {dtype} {shape}")
    # Langevin without a model call (D absent: s = lsx x)
    flags_no_out = dict(flags, use_out=False)
    check_stage(target, x, out, slots, rows, rng.seeds_tensor(SEEDS[:B], device=dev), draws,
                torch.zeros(1, device=dev), flags_no_out, what=f"langevin no model {dtype} {shape}")
    # with CFG
    out2 = torch.cat([out, (out.float() * 0.5 - 0.1).to(dtype)])
    check_stage(target, x, out2, slots, rows, rng.seeds_tensor(SEEDS[:B], device=dev), draws,
                torch.linspace(1, 3, B, device=dev), flags, cfg=True, what=f"langevin cfg {dtype} {shape}")


@pytest.mark.parametrize("K", [5, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_many_slots_random_rows(target, K, dtype):
    """K > 4 takes the general kernel; random rows and masks exercise every column of M."""
    for shape in [(2, 4, 8, 8), (2, 11)]:  # vector and scalar paths
        _many_slots(target, K, dtype, shape)


def _many_slots(target, K, dtype, shape):
    dev = target.device
    g = torch.Generator().manual_seed(K)
    R = ops.row_length(K)
    rows = (torch.rand((2, R), generator=g) - 0.5).to(dev)
    rows[:, 3:7] = 0.0  # no Langevin
    x = torch.randn(shape, generator=g).to(dtype).to(dev)
    out = torch.randn(shape, generator=g).to(dtype).to(dev)
    slots = torch.randn((K,) + shape, generator=g).to(dtype).to(dev)
    seeds = rng.seeds_tensor(SEEDS[:2], device=dev)
    draws = torch.tensor([3, -1], dtype=torch.int64, device=dev)
    for reads, writes in [((1 << K) - 1, (1 << K) - 1), (0b10110 & ((1 << K) - 1), 0b01001), (0, 1 << (K - 1))]:
        flags = dict(slot_reads=reads, slot_writes=writes, use_out=True, noise=True, langevin=False)
        check_stage(target, x, out, slots, rows, seeds, draws, torch.zeros(1, device=dev), flags,
                    what=f"K={K} reads={reads:b} writes={writes:b} {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_misaligned_views(target, dtype):
    """x[1:] of a flat buffer is not 16-byte aligned: the scalar path handles it (same answer as aligned)."""
    dev = target.device
    plan = fd.plan("dpmpp_3m_sde", S.EDM(), 4)
    k = 1
    flags = stage_flags(plan, k)
    shape = (2, 4, 8)
    n = int(np.prod(shape))
    g = torch.Generator().manual_seed(11)
    flat = [torch.randn(1 + m * n, generator=g).to(dtype).to(dev) for m in (1, 1, plan.num_slots)]
    x, out = flat[0][1:].view(shape), flat[1][1:].view(shape)
    slots = flat[2][1:].view((plan.num_slots,) + shape)
    assert x.data_ptr() % 16 and slots.data_ptr() % 16 and x.is_contiguous() and slots.is_contiguous()
    rows = torch.as_tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=dev)
    draws = torch.tensor([int(plan.draw[k])], device=dev)
    seeds = rng.seeds_tensor(SEEDS[:2], device=dev)
    s_orig, s_aligned = slots.clone(), slots.clone()
    got, _ = check_stage(target, x, out, slots, rows, seeds, draws, torch.zeros(1, device=dev), flags,
                         what=f"misaligned {dtype}")
    aligned, _ = check_stage(target, x.clone(), out.clone(), s_aligned, rows, seeds, draws,
                             torch.zeros(1, device=dev), flags, what=f"aligned {dtype}")
    # the scalar path (misaligned) and the vector path (aligned) do the same arithmetic
    assert torch.equal(got, aligned) and torch.equal(slots, s_aligned)
    # and an in-place update of a misaligned x
    x2 = x.clone()
    xv = torch.cat([x2.new_zeros(1), x2.flatten()])[1:].view(shape)
    res = call(target.step, xv, out, s_orig, rows, seeds, draws, torch.zeros(1, device=dev), flags,
               x_out=xv)
    assert res.data_ptr() == xv.data_ptr() and torch.equal(res, got)


def test_rejects_bad_input(target):
    dev = target.device
    plan = fd.plan("dpmpp_2m", S.EDM(), 4)
    k = 1
    f = stage_flags(plan, k)
    x = torch.randn(2, 3, 5, device=dev)
    good = dict(x=x, out=torch.randn(2, 3, 5, device=dev), slots=torch.zeros(1, 2, 3, 5, device=dev),
                rows=torch.as_tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=dev),
                seeds=rng.seeds_tensor([1, 2], device=dev), draws=torch.tensor([0], device=dev),
                guidance=torch.zeros(1, device=dev))

    def run(**change):
        a = dict(good, **change)
        return target.step(a["x"], a["out"], a["slots"], a["rows"], a["seeds"], a["draws"], a["guidance"],
                           f["slot_reads"], f["slot_writes"], f["use_out"], False, f["noise"], f["langevin"])

    run()  # the good call works
    with pytest.raises(ValueError, match="float64"):
        run(x=x.double(), out=good["out"].double(), slots=good["slots"].double())
    with pytest.raises(ValueError, match="rows must be float32"):
        run(rows=good["rows"].double())
    with pytest.raises(ValueError, match="contiguous"):
        run(slots=torch.zeros(1, 2, 5, 3, device=dev).transpose(2, 3))
    with pytest.raises(ValueError, match="at most 8"):
        run(slots=torch.zeros(9, 2, 3, 5, device=dev), rows=torch.zeros(1, ops.row_length(9), device=dev))
    with pytest.raises(ValueError, match="draws"):
        run(draws=torch.tensor([0.0], device=dev))
    if dev.type == "cuda":
        with pytest.raises(ValueError, match="CUDA tensors"):
            run(x=x.cpu())


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(THRESHOLD_CASES))
def test_dynamic_thresholding(target, name, dtype, cfg):
    """Thresholds from ops.dynamic_threshold applied in the kernel (step and Langevin reduction) vs Imagen's
    formula in float64; odd sizes take the scalar path, (2, 4, 8, 8) the vector path."""
    for shape in [(3, 4, 9, 11), (2, 4, 8, 8)] + ([(1, 4097)] if dtype == torch.float32 else []):
        check_thresholded_stage(target.step, name, shape, dtype, target.device, cfg=cfg)


@pytest.mark.parametrize("thresholded", [False, True], ids=["plain", "thresholded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_guidance_rescale_and_cfgpp_rows(target, dtype, thresholded):
    """guidance_rescale's per-sample factors (cfg_rescale) and CFG++ rows (uncond: the U column) against the torch
    reference, on the scalar and the vector path, continuing from the kernel's state."""
    from fastdiff.guidance import rescale_factors

    dev = target.device
    cases = [(fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 4, guidance="cfg++"), (3, 4, 9)),
             (fd.plan("dpmpp_2s_ancestral", S.EDM(), 2, guidance="cfg++"), (2, 4, 8, 8)),
             (fd.plan("euler", S.EDM(), 2), (2, 11))]
    for plan, shape in cases:
        B = shape[0]
        seeds = rng.seeds_tensor(SEEDS[:B], device=dev)
        x = (plan.init_scale * torch.randn(shape, generator=torch.Generator().manual_seed(B))).to(dtype).to(dev)
        slots = torch.zeros((plan.num_slots,) + shape, dtype=dtype, device=dev)
        guidance = torch.linspace(0.5, 6.0, B, dtype=torch.float32, device=dev)
        for k in range(plan.num_stages):
            rows = torch.tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=dev)
            draws = torch.tensor([int(plan.draw[k])], dtype=torch.int64, device=dev)
            flags = stage_flags(plan, k)
            out = model(x, k, True)
            m = rescale_factors(out, guidance, 0.7)
            thr = ops.dynamic_threshold(x, out, rows, guidance, True, 0.9, 2.0, cfg_rescale=m) if thresholded \
                else None
            kw = dict(cfg_rescale=m, uncond=plan.uncond_column, thresholds=thr)
            s_t, s_64 = slots.clone(), slots.double()
            same = call(ops.step_reference, x, out, s_t, rows, seeds, draws, guidance, flags, True, **kw)
            kw64 = dict(kw, cfg_rescale=m.double(), thresholds=None if thr is None else thr.double())
            ref = call(ops.step_reference, x.double(), out.double(), s_64, rows.double(), seeds, draws,
                       guidance.double(), flags, True, **kw64)
            got = call(target.step, x, out, slots, rows, seeds, draws, guidance, flags, True, **kw)
            what = f"{plan.solver} cfg++={plan.uncond_column} stage {k} {dtype} {shape} on {target.name}"
            assert_like_torch(got, same, ref, f"{what} x'")
            for i in range(slots.shape[0]):
                if (flags["slot_writes"] >> i) & 1:
                    assert_like_torch(slots[i], s_t[i], s_64[i], f"{what} slot {i}")
            x = got


def test_rejects_bad_thresholds(target):
    dev = target.device
    x = torch.randn(2, 3, 5, device=dev)
    args = (x, x, torch.zeros(0, 2, 3, 5, device=dev), torch.zeros(1, ops.row_length(0), device=dev),
            rng.seeds_tensor([1, 2], device=dev), torch.zeros(1, dtype=torch.int64, device=dev),
            torch.zeros(1, device=dev), 0, 0, True, False, False, False)
    # the kernel's own limits; a wrong length is fastdiff.ops's to reject (tests/test_threshold.py)
    for bad in (torch.ones(2, dtype=torch.float64, device=dev), torch.ones(4, device=dev)[::2]):
        with pytest.raises(ValueError, match="thresholds must be a contiguous float32 tensor"):
            target.step(*args, thresholds=bad)
    with pytest.raises(ValueError, match="thresholds is on meta|on meta"):
        target.step(*args, thresholds=torch.ones(2, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# GPU only: the fastdiff.ops entry points, graph capture, host syncs, launch count
# ---------------------------------------------------------------------------------------------------------------


def _stage_inputs(plan, k, shape, dtype=torch.float32, device="cuda"):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    out = torch.randn(shape, generator=g).to(dtype).to(device)
    slots = torch.randn((plan.num_slots,) + shape, generator=g).to(dtype).to(device)
    rows = torch.as_tensor(plan.rows()[k: k + 1], dtype=torch.float32, device=device)
    draws = torch.tensor([int(plan.draw[k])], dtype=torch.int64, device=device)
    seeds = rng.seeds_tensor(SEEDS[: shape[0]], device=device)
    return x, out, slots, rows, draws, seeds, torch.zeros(1, device=device)


@pytest.mark.gpu
def test_ops_entry_points_use_the_cuda_kernel(gpu):
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    k = 1
    f = stage_flags(plan, k)
    x, out, slots, rows, draws, seeds, guidance = _stage_inputs(plan, k, (2, 3, 5))
    s1, s2 = slots.clone(), slots.clone()
    got = ops.step(x, out, s1, rows, seeds, draws, guidance, kernel="cuda", **f)
    want = call(ops.step_reference, x, out, s2, rows, seeds, draws, guidance, f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    z = ops.randn((2, 3, 5), [1, 2], draw=3, device="cuda", kernel="cuda")
    torch.testing.assert_close(z.cpu(), rng.randn((2, 3, 5), [1, 2], draw=3), rtol=1e-6, atol=2e-6)
    xt = ops.add_noise(x, torch.tensor([0.9, 0.5], device="cuda"), torch.tensor([0.3, 0.8], device="cuda"), seeds,
                       kernel="cuda")
    torch.testing.assert_close(xt, ops.add_noise(x, torch.tensor([0.9, 0.5], device="cuda"),
                                                 torch.tensor([0.3, 0.8], device="cuda"), seeds), rtol=1e-5,
                               atol=1e-5)
    args = (x, out, slots.clone(), rows, seeds, draws, guidance, f["slot_reads"], f["slot_writes"], f["use_out"],
            False, f["noise"], f["langevin"], "cuda")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_graph_replay_follows_new_rows(gpu, dtype):
    """Rows / draws are read on device: a captured step replays with values written into them afterwards."""
    plan = fd.plan("dpmpp_2m_sde", S.EDM(), 6)
    k1, k2 = 1, 3
    f = stage_flags(plan, k1)
    assert f == stage_flags(plan, k2), "pick two stages with the same structure"
    x, out, slots0, rows, draws, seeds, guidance = _stage_inputs(plan, k1, (2, 4, 16), dtype)
    slots = slots0.clone()
    cb.load("cuda", dtypes=(dtype,))
    call(cb.step, x, out, slots.clone(), rows, seeds, draws, guidance, f)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(cb.step, x, out, slots, rows, seeds, draws, guidance, f)
    # new coefficient values and a new draw, written in place; fresh slots
    rows.copy_(torch.as_tensor(plan.rows()[k2: k2 + 1], dtype=torch.float32))
    draws.fill_(int(plan.draw[k2]))
    slots.copy_(slots0)
    graph.replay()
    torch.cuda.synchronize()
    s_ref = slots0.clone()
    want = call(ops.step_reference, x, out, s_ref, rows, seeds, draws, guidance, f)
    s_64 = slots0.double()
    ref = call(ops.step_reference, x.double(), out.double(), s_64, rows.double(), seeds, draws, guidance.double(), f)
    assert_like_torch(y, want, ref, "graph replay x'")
    for i in range(plan.num_slots):
        if (f["slot_writes"] >> i) & 1:
            assert_like_torch(slots[i], s_ref[i], s_64[i], f"graph replay slot {i}")
    # and the replay differs from what the captured values gave: the graph did not bake them in
    s_old = slots0.clone()
    old = call(ops.step_reference, x, out, s_old,
               torch.as_tensor(plan.rows()[k1: k1 + 1], dtype=torch.float32, device="cuda"), seeds,
               torch.tensor([int(plan.draw[k1])], device="cuda"), guidance, f)
    assert not torch.allclose(y.float(), old.float())


@pytest.mark.gpu
def test_no_host_sync(gpu):
    plan = fd.plan("pc", S.VE(), 3, corrector_steps=1)
    kl = next(k for k in range(plan.num_stages) if plan.langevin[k, 0] != 0)
    plan2 = fd.plan("dpmpp_2m_sde", S.EDM(), 4)
    inputs = [(plan2, 1, _stage_inputs(plan2, 1, (2, 4, 64))), (plan, kl, _stage_inputs(plan, kl, (2, 4, 64)))]
    inputs.append((plan2, 1, _stage_inputs(plan2, 1, (2, 11))))
    alpha = torch.tensor([0.5, 0.9], device="cuda")
    for p, k, args in inputs:  # warm up (compile, load)
        x, out, slots, rows, draws, seeds, guidance = args
        call(cb.step, x, out, slots, rows, seeds, draws, guidance, stage_flags(p, k))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for p, k, (x, out, slots, rows, draws, seeds, guidance) in inputs:
            call(cb.step, x, out, slots, rows, seeds, draws, guidance, stage_flags(p, k))
            call(cb.step, x, out, slots, rows, seeds, draws, guidance, stage_flags(p, k), x_out=x)
        cb.randn(seeds, draws.clamp(min=0), [2, 4, 64], torch.float16)
        cb.add_noise(inputs[0][2][0], alpha, alpha, inputs[0][2][5], torch.zeros(1, dtype=torch.int64,
                                                                                   device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_thresholded_sampler_graph_and_no_host_sync(gpu, backend):
    """Dynamic thresholding on the GPU: the reduction pass and the step replay from the CUDA graph equal to the
    eager loop, and neither issues a host sync."""
    if not fd.backends.status(backend)[0]:
        pytest.skip(f"{backend} backend unavailable: {fd.backends.status(backend)[1]}")
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 6)

    def model(x, t):
        return 1.5 * torch.tanh(3 * x) - 0.2

    kw = dict(dynamic_threshold=0.95, sample_max_value=1.5, backend=backend)
    eager = fd.Sampler(model, plan, cuda_graph=False, **kw).sample((2, 4, 32, 32), seeds=[1, 2], device="cuda")
    graphed = fd.Sampler(model, plan, cuda_graph=True, **kw)
    graphed.sample((2, 4, 32, 32), seeds=[5, 6], device="cuda")  # capture with other seeds
    torch.testing.assert_close(graphed.sample((2, 4, 32, 32), seeds=[1, 2], device="cuda"), eager, rtol=0, atol=0)
    x, out, slots, rows, draws, seeds, guidance = _stage_inputs(plan, 2, (2, 4, 64))
    out = 3 * out
    f = stage_flags(plan, 2)
    thr = ops.dynamic_threshold(x, out, rows, ratio=0.9, max_value=2.0)
    call(cb.step, x, out, slots, rows, seeds, draws, guidance, f, thresholds=thr)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        thr = ops.dynamic_threshold(x, out, rows, ratio=0.9, max_value=2.0)
        call(cb.step, x, out, slots, rows, seeds, draws, guidance, f, thresholds=thr)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _device_events(fn):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # device-side events: kernels, and memcpy / memset if the glue did any (it must not); not CUPTI's bookkeeping
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA and "Activity Buffer" not in e.name]


def _kernels_launched(fn):
    t = torch.ones(8, device="cuda")
    if not _device_events(lambda: t.mul_(2)):  # calibration: does the profiler see device kernels here at all?
        pytest.skip("torch.profiler records no CUDA kernels on this machine (CUPTI unavailable)")
    return _device_events(fn)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["k0_scalar", "k1_vector", "k2_cfg", "k8_general"])
def test_one_kernel_launch_per_step(gpu, case):
    plans = {"k0_scalar": (fd.plan("euler_ancestral", S.EDM(), 4), (2, 11), False),
             "k1_vector": (fd.plan("dpmpp_2m_sde", S.EDM(), 4), (2, 4, 64), False),
             "k2_cfg": (fd.plan("dpmpp_3m", S.EDM(), 4), (2, 4, 64), True)}
    if case == "k8_general":
        K = 8
        x, out, slots, rows, draws, seeds, guidance = _stage_inputs(fd.plan("euler", S.EDM(), 3), 0, (2, 4, 64))
        slots = torch.randn((K,) + tuple(x.shape), device="cuda")
        rows = torch.rand((1, ops.row_length(K)), device="cuda")
        rows[:, 3:7] = 0
        f = dict(slot_reads=0xFF, slot_writes=0x81, use_out=True, noise=True, langevin=False)
        cfg = False
    else:
        plan, shape, cfg = plans[case]
        f = stage_flags(plan, 1)
        x, out, slots, rows, draws, seeds, guidance = _stage_inputs(plan, 1, shape)
        if cfg:
            out = torch.cat([out, out * 0.5])
            guidance = torch.tensor([2.0, 7.5], device="cuda")
    call(cb.step, x, out, slots, rows, seeds, draws, guidance, f, cfg)  # warm up
    names = _kernels_launched(lambda: call(cb.step, x, out, slots, rows, seeds, draws, guidance, f, cfg))
    assert len(names) == 1 and names[0].startswith("fastdiff_step_f32"), names


@pytest.mark.gpu
def test_langevin_step_is_two_launches(gpu):
    plan = fd.plan("pc", S.VE(), 3, corrector_steps=1)
    k = next(k for k in range(plan.num_stages) if plan.langevin[k, 0] != 0)
    f = stage_flags(plan, k)
    x, out, slots, rows, draws, seeds, guidance = _stage_inputs(plan, k, (2, 4, 64))
    call(cb.step, x, out, slots, rows, seeds, draws, guidance, f)
    names = _kernels_launched(lambda: call(cb.step, x, out, slots, rows, seeds, draws, guidance, f))
    assert len(names) == 2 and names[0].startswith("fastdiff_step_reduce_f32") \
        and names[1].startswith("fastdiff_step_f32"), names


@pytest.mark.gpu
def test_larger_shapes_and_batch(gpu):
    """A latent-sized batch (vector path, many blocks) and a long odd one (scalar path, many blocks)."""
    run_plan(gpu, fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 3), (8, 4, 64, 64), torch.float16,
             seeds=list(range(100, 108)))
    run_plan(gpu, fd.plan("euler_ancestral", S.EDM(), 3), (3, 100_003), torch.bfloat16)
