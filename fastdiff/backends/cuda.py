"""The ``cuda`` backend: csrc/cuda/step.cu compiled at run time with NVRTC (through CuPy), launched on torch's stream.

Three thin layers, as everywhere in fastdiff: the framework-free kernels in ``csrc/cuda/step.cu``; this glue, which
checks the kernels' own limits (CUDA tensors, dtypes, layouts), picks the launch shape and launches on torch's
*current* stream (so the launch is captured by ``torch.cuda.graph``); and the public ops in ``fastdiff.ops``
(``backend="cuda"``), which validate the arguments (shapes, devices, seeds, rows length) before calling here.

No toolkit is needed on the user's machine: NVRTC (through CuPy) compiles the source for the device at hand on first
use of a dtype (once per process and device; the binary is kept on disk, see ``cache_dir()``, so later processes
only load it).  CuPy is imported lazily, so ``import fastdiff`` works without it.  Tensors are passed to the kernels
by ``data_ptr()``; the glue never reads device data on the host (no ``.item()``), so a step costs no host sync, and
coefficient rows are read by the kernel from device memory, so a captured graph follows new row values written in
place.

Run one step (or ``randn``) before capturing a graph: the first call compiles and loads the module, which must not
happen inside a capture.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import tempfile
import threading

import numpy as np
import torch

from ._sources import csrc_dir

THREADS = 256  # block size of every kernel (kThreads in step.cu)
MAX_SLOTS = 8  # kMaxSlots in step.cu
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; the kernels loop over samples beyond it
ROW_HEAD = 7

# flags (step.cu)
_USE_OUT, _CFG, _NOISE, _LANGEVIN, _VEC, _THRESHOLD, _RESCALE, _UNCOND = 1, 2, 4, 8, 16, 32, 64, 128

_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")

_INSTALL_HINT = "pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13), or: pip install 'fastdiff[cuda]'"


# ---------------------------------------------------------------------------------------------------------------
# Availability and compilation
# ---------------------------------------------------------------------------------------------------------------


def available() -> tuple[bool, str]:
    """(True, "") when this backend can run here, else (False, what is missing). Does not compile anything."""
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False, f"CuPy is not installed: {_INSTALL_HINT}"
    except Exception as e:  # a broken CuPy install (wrong CUDA major, missing libraries)
        return False, f"CuPy failed to import ({type(e).__name__}: {e}); reinstall it: {_INSTALL_HINT}"
    return True, ""


def source() -> str:
    """The NVRTC source: step.cu with its local headers (csrc/common/philox.h, csrc/cuda/half_bits.cuh) inlined.

    NVRTC has no C library headers, so philox.h's ``#include <stdint.h>`` / ``<math.h>`` lines are dropped (step.cu
    declares the integer types under ``__CUDACC_RTC__``; the math functions are NVRTC built-ins).  Inlining keeps
    the source one string, so the disk cache is keyed on the exact text that was compiled.
    """
    root = csrc_dir()
    text = (root / "cuda" / "step.cu").read_text()
    for folder, name in (("common", "philox.h"), ("cuda", "half_bits.cuh")):
        header = (root / folder / name).read_text()
        header = re.sub(r"^\s*#\s*include\s*<[^>]+>\s*$", "", header, flags=re.MULTILINE)
        inc = re.compile(r'^\s*#\s*include\s*"' + re.escape(name) + r'"\s*$', flags=re.MULTILINE)
        if not inc.search(text):
            raise RuntimeError(f"csrc/cuda/step.cu no longer includes \"{name}\": update "
                               "fastdiff.backends.cuda.source()")
        text = inc.sub(lambda _: f"// ---- csrc/{folder}/{name} (inlined) ----\n{header}\n// ---- end {name} ----",
                       text, count=1)
    return text


_lock = threading.Lock()


def _kernel_names(sfx: str) -> tuple[str, ...]:
    return (f"fastdiff_step_{sfx}", f"fastdiff_step_{sfx}_vec_k4", f"fastdiff_step_reduce_{sfx}",
            f"fastdiff_add_noise_{sfx}", f"fastdiff_randn_{sfx}")


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept between processes: $FASTDIFF_CACHE_DIR, else ~/.cache/fastdiff/cuda."""
    env = os.environ.get("FASTDIFF_CACHE_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "fastdiff" / "cuda"


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _compile_to_file(sfx: str, device_index: int) -> str:
    """NVRTC-compile the module of one dtype for one device; returns the path of the cubin (or PTX), cached on disk.

    CuPy's ``RawModule(code=...)`` always adds ``-ftz=true`` (denormals flushed to zero), which the torch, C++ and
    Triton backends do not do; so compile with ``cupy.cuda.compiler.compile_using_nvrtc`` (no ftz) and load the
    binary with ``RawModule(path=...)``.
    """
    import cupy
    from cupy.cuda import compiler, nvrtc

    src = source()
    options = NVRTC_OPTIONS + (f"-DFASTDIFF_CUDA_ONLY_{sfx.upper()}",)
    with cupy.cuda.Device(device_index) as dev:
        cc = str(dev.compute_capability)
        key = hashlib.sha256("\0".join([src, repr(options), repr(nvrtc.getVersion()), cc, cupy.__version__])
                             .encode()).hexdigest()[:32]
        name = f"fastdiff_{sfx}_sm{cc}_{key}.bin"
        for folder in (cache_dir(), pathlib.Path(tempfile.gettempdir()) / f"fastdiff-cuda-{_uid()}"):
            path = folder / name
            if path.is_file():
                return str(path)
        res = compiler.compile_using_nvrtc(src, options)  # arch: the current device's (cubin, PTX if too new)
        binary = res[0] if isinstance(res, tuple) else res
        if isinstance(binary, str):
            binary = binary.encode()
    for folder in (cache_dir(), pathlib.Path(tempfile.gettempdir()) / f"fastdiff-cuda-{_uid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            os.replace(tmp, folder / name)  # atomic: concurrent processes never load a half-written file
            return str(folder / name)
        except OSError:
            continue
    raise RuntimeError(f"could not write the compiled CUDA kernels to {cache_dir()} or the temp dir")


@functools.cache
def _functions(sfx: str, device_index: int) -> dict:
    """The kernels of one dtype, compiled (or read from the disk cache) and loaded for one device, once per process."""
    import cupy

    with _lock, cupy.cuda.Device(device_index):
        try:
            from cupy.cuda import compiler

            compiler.compile_using_nvrtc  # noqa: B018  (present in every supported CuPy; checked, not assumed)
        except (ImportError, AttributeError):  # pragma: no cover - very old or future CuPy: its RawModule (ftz on)
            mod = cupy.RawModule(code=source(), options=NVRTC_OPTIONS + (f"-DFASTDIFF_CUDA_ONLY_{sfx.upper()}",))
        else:
            mod = cupy.RawModule(path=_compile_to_file(sfx, device_index))
        # The loaded cupy.cuda.function.Function of each kernel (bound to this device): called directly, with the
        # stream passed explicitly, it is the thinnest launch CuPy has.
        return {name: mod.get_function(name).kernel for name in _kernel_names(sfx)}


def load(device=None, dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> None:
    """Compile / load the kernels for ``device`` now (call before capturing a CUDA graph; the first step does it)."""
    idx = torch.device(device if device is not None else "cuda").index
    idx = torch.cuda.current_device() if idx is None else idx
    for dt in dtypes:
        _functions(_SUFFIX[dt], idx)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class _Stream:
    """What CuPy's launch needs of a stream: its raw handle in ``.ptr``."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


def _launch(device_index: int, sfx: str, name: str, grid: tuple, args: tuple) -> None:
    import cupy

    fn = _functions(sfx, device_index)[name]
    stream = _Stream(torch.cuda.current_stream(device_index).cuda_stream)
    if cupy.cuda.runtime.getDevice() == device_index:
        fn(grid, (THREADS,), args, 0, stream)
    else:
        with cupy.cuda.Device(device_index):
            fn(grid, (THREADS,), args, 0, stream)


# ---------------------------------------------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------------------------------------------


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None or t.numel() == 0 else t.data_ptr())


def _i64(v) -> np.int64:
    return np.int64(v)


def _i32(v) -> np.int32:
    return np.int32(v)


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    """The kernels read CUDA memory (fastdiff.ops has checked that every input is on x's device)."""
    if t.device.type != "cuda":
        raise ValueError(f"the cuda kernel needs CUDA tensors, but {name} is on {t.device}")


def _check_storage(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUFFIX:
        raise ValueError(f"the cuda kernel stores fp32 / fp16 / bf16, but {name} is {t.dtype} "
                         "(use backend='torch' for float64)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first): the kernel streams it linearly")


def _per_sample(name: str, t: torch.Tensor, dtype: torch.dtype, device) -> int:
    """A [B or 1] per-sample tensor read by pointer: its dtype; returns its stride in elements (0 for one value)."""
    _check_cuda(name, t, device)
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} for the cuda kernel, got {t.dtype}")
    return 0 if t.shape[0] == 1 else int(t.stride(0))


def _aligned(tensors, elem_size: int) -> bool:
    """Every base pointer on a 4-element boundary (16 bytes for fp32, 8 for fp16 / bf16)."""
    return all(t.data_ptr() % (4 * elem_size) == 0 for t in tensors if t is not None and t.numel())


def _grid_x(ngroups: int) -> int:
    return max(1, -(-ngroups // THREADS))


# ---------------------------------------------------------------------------------------------------------------
# The ops (signatures of fastdiff.ops.step_reference, add_noise_reference, _randn_reference)
# ---------------------------------------------------------------------------------------------------------------


def step(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin,
         x_out=None, thresholds=None, nonfinite=None, cfg_rescale=None, uncond=False):
    """One fused sampler stage on the GPU: returns x' and updates ``slots`` in place (``fastdiff.ops`` contract).

    Parameters
    ----------
    x : Tensor [B, *S] fp32 / fp16 / bf16, contiguous, CUDA
    out : Tensor [B or 2B, *S] in x's dtype (read only with ``use_out``; [uncond; cond] with ``cfg``)
    slots : Tensor [K, B, *S] in x's dtype, contiguous, K <= 8 (updated in place)
    rows : float32 Tensor [B or 1, 7 + (1+K)(2+K)] (7 + (1+K)(3+K) with ``uncond``), contiguous (read on device:
        graph replays follow new values)
    seeds : int64 [B];  draws : int64 [B or 1] (< 0: no noise for that sample);  guidance : float32 [B or 1]
    slot_reads, slot_writes : int bitmasks;  use_out, cfg, noise, langevin : bool
    x_out : Tensor like x, optional
        Where to write x' (may be ``x`` itself for an in-place update); a new tensor when None.
    thresholds : float32 Tensor [B], optional
        Dynamic thresholds: D = clamp(D, -s_b, s_b) / s_b (``fastdiff.ops.dynamic_threshold``).
    nonfinite : int32 Tensor [B], optional
        Per-sample flags: 1 is OR-ed in (atomically) for a sample whose stored x' has NaN / Inf.
    cfg_rescale : float32 Tensor [B], optional
        guidance_rescale's factors m (with ``cfg``): the guided output times m_b.
    uncond : bool
        CFG++ rows: M's columns are [x, D, U, S] with U = cx x + co out_u.

    One kernel launch (two with ``langevin``: a per-sample reduction of ||z||^2 and ||s||^2 first), no host sync.
    """
    dev = x.device
    _check_cuda("x", x, dev)
    _check_storage("x", x)
    B = x.shape[0]
    numel = x[0].numel() if B else 0
    K = slots.shape[0]
    if K > MAX_SLOTS:
        raise ValueError(f"the cuda kernel supports at most {MAX_SLOTS} history slots, got K={K}")
    if K:
        _check_storage("slots", slots)
    if use_out:
        _check_storage("out", out)
    R = ROW_HEAD + (1 + K) * ((3 if uncond else 2) + K)
    if rows.dtype != torch.float32 or not rows.is_contiguous():  # read on device, as float32 rows of R values
        raise ValueError(f"rows must be float32 and contiguous for the cuda kernel, got {rows.dtype}")
    row_stride = 0 if rows.shape[0] == 1 else R
    if B and seeds.stride(0) != 1:
        raise ValueError("seeds must be contiguous (call .contiguous() first)")
    draw_stride = _per_sample("draws", draws, torch.int64, dev)
    guidance_stride = 0
    cfg = bool(cfg and use_out)  # guidance only combines model outputs
    if cfg:
        if guidance.is_floating_point() and guidance.dtype != torch.float32:
            guidance = guidance.to(torch.float32)  # a device-side cast (one more launch), no sync
        guidance_stride = _per_sample("guidance", guidance, torch.float32, dev)
    threshold = thresholds is not None and bool(use_out)  # no D to threshold without a model output
    if thresholds is not None:
        _check_cuda("thresholds", thresholds, dev)
    if thresholds is not None and (thresholds.dtype != torch.float32 or (B and thresholds.stride(0) != 1)):
        raise ValueError(f"thresholds must be a contiguous float32 tensor for the cuda kernel, got {thresholds.dtype}")
    rescale = cfg_rescale is not None and cfg
    if rescale:
        _check_cuda("cfg_rescale", cfg_rescale, dev)
        if cfg_rescale.dtype != torch.float32 or (B and cfg_rescale.stride(0) != 1):
            raise ValueError(f"cfg_rescale must be a contiguous float32 tensor for the cuda kernel, got "
                             f"{cfg_rescale.dtype}")
    if nonfinite is not None:
        _check_cuda("nonfinite", nonfinite, dev)
        if nonfinite.dtype != torch.int32 or not nonfinite.is_contiguous():
            raise ValueError(f"nonfinite must be a contiguous int32 tensor for the cuda kernel, got {nonfinite.dtype}")
    if x_out is None:
        x_out = torch.empty_like(x)
    else:
        _check_cuda("x_out", x_out, dev)
        _check_storage("x_out", x_out)
        if x_out.shape != x.shape or x_out.dtype != x.dtype:
            raise ValueError("x_out must have x's shape and dtype")
    if B == 0 or numel == 0:
        return x_out

    mask = (1 << K) - 1
    reads, writes = int(slot_reads) & mask, int(slot_writes) & mask
    flags = (_USE_OUT if use_out else 0) | (_CFG if cfg else 0) | (_NOISE if noise else 0) \
        | (_LANGEVIN if langevin else 0) | (_THRESHOLD if threshold else 0) | (_RESCALE if rescale else 0) \
        | (_UNCOND if uncond else 0)
    touched = [x, x_out] + ([out] if use_out else []) + ([slots] if (reads | writes) else [])
    vec = numel % 4 == 0 and _aligned(touched, x.element_size())
    if vec:
        flags |= _VEC

    idx = _device_index(x)
    sfx = _SUFFIX[x.dtype]
    ngroups = -(-numel // 4)
    grid = (_grid_x(ngroups), min(B, MAX_GRID_Y))
    out_arg = out if use_out else None
    guidance_arg = guidance if cfg else None
    thresholds_arg = thresholds if threshold else None
    rescale_arg = cfg_rescale if rescale else None

    partials, num_partials = None, 0
    if langevin:
        # Pass 1: per-sample partial sums of z^2 and s^2, one pair per block of the reduction grid.  The step
        # kernel adds them in a fixed order: deterministic, and no buffer to zero first.
        num_partials = max(1, min(_grid_x(ngroups), (4 * _num_sms(idx)) // grid[1]))
        partials = torch.empty((B, num_partials, 2), dtype=torch.float32, device=dev)
        _launch(idx, sfx, f"fastdiff_step_reduce_{sfx}", (num_partials, min(B, MAX_GRID_Y)), (
            _ptr(x), _ptr(out_arg), _ptr(rows), _i64(row_stride), _ptr(seeds), _ptr(draws), _i64(draw_stride),
            _ptr(guidance_arg), _i64(guidance_stride), _ptr(thresholds_arg), _ptr(partials), _i64(B), _i64(numel),
            _i32(K), _i32(flags), _ptr(rescale_arg)))

    name = f"fastdiff_step_{sfx}_vec_k4" if (vec and K <= 4) else f"fastdiff_step_{sfx}"
    _launch(idx, sfx, name, grid, (
        _ptr(x), _ptr(x_out), _ptr(out_arg), _ptr(slots if K else None), _ptr(rows), _i64(row_stride), _ptr(seeds),
        _ptr(draws), _i64(draw_stride), _ptr(guidance_arg), _i64(guidance_stride), _ptr(thresholds_arg),
        _ptr(partials), _i32(num_partials), _i64(B), _i64(numel), _i32(K), _i32(reads), _i32(writes), _i32(flags),
        _ptr(nonfinite), _ptr(rescale_arg)))
    return x_out


def _stream_grid(idx: int, ngroups: int, batch: int) -> tuple[int, int]:
    """Grid for the grid-stride kernels (add_noise, randn): about 8 blocks per SM in all."""
    gy = min(batch, MAX_GRID_Y)
    return max(1, min(_grid_x(ngroups), -(-8 * _num_sms(idx) // gy))), gy


def add_noise(x0, alpha, sigma, seeds, draws):
    """Forward process ``alpha x0 + sigma z`` (``fastdiff.ops.add_noise_reference``), one launch.

    ``alpha``, ``sigma``: float32 [B or 1];  ``seeds``: int64 [B];  ``draws``: int64 [B or 1].
    """
    dev = x0.device
    _check_cuda("x0", x0, dev)
    _check_storage("x0", x0)
    B = x0.shape[0]
    numel = x0[0].numel() if B else 0
    # alpha / sigma in any float dtype, as the reference; cast on device (no sync) when not float32
    alpha = alpha.to(torch.float32) if alpha.is_floating_point() else alpha
    sigma = sigma.to(torch.float32) if sigma.is_floating_point() else sigma
    a_stride = _per_sample("alpha", alpha, torch.float32, dev)
    s_stride = _per_sample("sigma", sigma, torch.float32, dev)
    if B and seeds.stride(0) != 1:
        raise ValueError("seeds must be contiguous (call .contiguous() first)")
    d_stride = _per_sample("draws", draws, torch.int64, dev)
    xt = torch.empty_like(x0)
    if B == 0 or numel == 0:
        return xt
    flags = _VEC if (numel % 4 == 0 and _aligned([x0, xt], x0.element_size())) else 0
    idx = _device_index(x0)
    _launch(idx, _SUFFIX[x0.dtype], f"fastdiff_add_noise_{_SUFFIX[x0.dtype]}", _stream_grid(idx, -(-numel // 4), B), (
        _ptr(x0), _ptr(xt), _ptr(alpha), _i64(a_stride), _ptr(sigma), _i64(s_stride), _ptr(seeds), _ptr(draws),
        _i64(d_stride), _i64(B), _i64(numel), _i32(flags)))
    return xt


def randn(seeds, draws, shape, dtype):
    """Philox normals of ``shape`` (batch first) on the seeds' device, computed in float32 and cast once."""
    dev = seeds.device
    _check_cuda("seeds", seeds, dev)
    shape = [int(s) for s in shape]
    B = shape[0]
    if B and seeds.stride(0) != 1:
        raise ValueError("seeds must be contiguous (call .contiguous() first)")
    d_stride = _per_sample("draws", draws, torch.int64, dev)
    store = dtype if dtype in _SUFFIX else torch.float32
    z = torch.empty(shape, dtype=store, device=dev)
    numel = z[0].numel() if B else 0
    if B and numel:
        flags = _VEC if (numel % 4 == 0 and _aligned([z], z.element_size())) else 0
        idx = _device_index(z)
        _launch(idx, _SUFFIX[store], f"fastdiff_randn_{_SUFFIX[store]}", _stream_grid(idx, -(-numel // 4), B), (
            _ptr(z), _ptr(seeds), _ptr(draws), _i64(d_stride), _i64(B), _i64(numel), _i32(flags)))
    return z if store == dtype else z.to(dtype)  # e.g. float64: drawn in float32, cast once (as the reference)


OPS = {"step": step, "add_noise": add_noise, "randn": randn}
