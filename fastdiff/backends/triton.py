"""The triton kernel backend: glue between ``fastdiff.ops`` and the Triton kernels in ``kernels/step.py``.

Checks what the kernels assume (device, dtype, contiguity) and launches them; the math lives in the kernels.
Argument validation (shapes, devices, seeds, rows length) is ``fastdiff.ops``'s, done before a call gets here.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests).
Triton is imported when this module is (``fastdiff.backends.load("triton")``), never by ``import fastdiff``.
"""

from __future__ import annotations

import os

import torch

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> tuple[bool, str]:
    """Whether the triton kernels can run here, and why (or why not)."""
    try:
        import triton
    except ImportError as e:  # pragma: no cover - depends on the machine
        return False, f"triton is not installed ({e}); pip install 'fastdiff[triton]'"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the triton kernels on CPU, slowly)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _kernels():
    from fastdiff.kernels import step as k

    return k


def _check_device(k, name, t):
    """CUDA tensors, or CPU tensors under the interpreter (fastdiff.ops has checked that the inputs share x's
    device)."""
    if t.device.type == "cuda":
        if k.interpreting():
            raise ValueError("the triton kernels were built for the interpreter (TRITON_INTERPRET=1 when triton was "
                             "imported): they take CPU tensors; unset TRITON_INTERPRET to run them on CUDA")
    elif t.device.type == "cpu":
        if not k.interpreting():
            raise ValueError("the triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                             "imported, to run it on CPU through the interpreter); use backend='cpu' or 'torch'")
    else:
        raise ValueError(f"the triton kernel does not run on {t.device.type} tensors ({name} is on {t.device})")


def _check_storage(name, t):
    if t.dtype not in STORAGE_DTYPES:
        raise ValueError(f"{name} is {t.dtype}; the triton kernel stores float32, float16 or bfloat16 "
                         "(use backend='torch' for float64)")


def _check_contiguous(**tensors):
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first): the triton kernel streams it "
                             "linearly")


def _small(t: torch.Tensor) -> torch.Tensor:
    """Per-sample parameter vectors / rows are tiny: a contiguous copy is free and graph-capturable."""
    return t if t.is_contiguous() else t.contiguous()


def step(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin,
         x_out=None, thresholds=None, nonfinite=None, cfg_rescale=None, uncond=False):
    """``fastdiff.ops.step_reference`` on the triton kernel; ``x_out`` (may be ``x``) receives x'; ``thresholds``:
    optional float32 [B] dynamic thresholds; ``nonfinite``: optional int32 [B] flags raised for samples whose x'
    has NaN / Inf; ``cfg_rescale``: optional float32 [B] guidance_rescale factors; ``uncond``: CFG++ rows."""
    k = _kernels()
    _check_device(k, "x", x)
    _check_storage("x", x)
    if not (rows.is_floating_point() and guidance.is_floating_point()):
        raise ValueError("rows and guidance must be floating-point tensors")
    _check_contiguous(x=x, slots=slots, **({"out": out} if use_out else {}))
    if x_out is not None:
        _check_device(k, "x_out", x_out)
        _check_contiguous(x_out=x_out)
        if x_out.shape != x.shape or x_out.dtype != x.dtype:
            raise ValueError(f"x_out must match x ({tuple(x.shape)} {x.dtype}), got {tuple(x_out.shape)} "
                             f"{x_out.dtype}")
    return k.step_forward(x, out, slots, _small(rows), _small(seeds), _small(draws), _small(guidance),
                          int(slot_reads), int(slot_writes), bool(use_out), bool(cfg), bool(noise), bool(langevin),
                          x_out, thresholds=None if thresholds is None else _small(thresholds), nonfinite=nonfinite,
                          cfg_rescale=None if cfg_rescale is None else _small(cfg_rescale), uncond=bool(uncond))


def add_noise(x0, alpha, sigma, seeds, draws):
    """``fastdiff.ops.add_noise_reference`` on the triton kernel."""
    k = _kernels()
    _check_device(k, "x0", x0)
    _check_storage("x0", x0)
    _check_contiguous(x0=x0)
    if seeds.dtype != torch.int64 or draws.dtype != torch.int64:
        raise ValueError("seeds and draws must be int64 tensors")
    return k.add_noise_forward(x0, _small(alpha), _small(sigma), _small(seeds), _small(draws))


def randn(seeds, draws, shape, dtype):
    """``fastdiff.ops._randn_reference`` on the triton kernel."""
    k = _kernels()
    _check_device(k, "seeds", seeds)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"the triton kernel draws float32, float16 or bfloat16 noise, not {dtype}")
    if seeds.dtype != torch.int64 or draws.dtype != torch.int64:
        raise ValueError("seeds and draws must be int64 tensors")
    return k.randn_forward(_small(seeds), _small(draws), [int(s) for s in shape], dtype)


OPS = {"step": step, "add_noise": add_noise, "randn": randn}
