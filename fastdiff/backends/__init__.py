"""Backend registry: which implementations of the step can run here, and the choice behind ``backend="auto"``.

- ``torch``: ``fastdiff.ops.step_reference``, plain torch ops (any device, float64 too); the readable oracle.
- ``cpu``: C++/OpenMP kernel from csrc/cpu, built with ninja on first use (``status`` says whether it is built).
- ``triton``: Triton kernel from kernels/ (CUDA devices; CPU only under TRITON_INTERPRET=1, for tests).
- ``cuda``: CUDA C++ from csrc/cuda compiled at runtime through CuPy's NVRTC.
"""

from __future__ import annotations

import importlib
import warnings

from .._names import unknown_name

BACKENDS = ("torch", "cpu", "triton", "cuda")
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
_WARNED: set = set()  # backends whose absence backend="auto" has warned about


def load(backend: str):
    """Import a kernel backend module (``fastdiff.backends.<backend>``), building it on first use.

    The module provides ``OPS = {"step": fn, "add_noise": fn, "randn": fn}`` with the signatures of
    ``fastdiff.ops.step_reference`` etc. and ``available() -> (bool, reason)``.
    """
    if backend == "torch":
        raise ValueError("the torch backend has no kernel module (it is fastdiff.ops.step_reference); kernel "
                         "backends: cpu, triton, cuda")
    if backend not in BACKENDS:
        raise unknown_name("backend", backend, BACKENDS)
    try:
        return importlib.import_module(f"fastdiff.backends.{backend}")
    except ModuleNotFoundError as e:
        if e.name == f"fastdiff.backends.{backend}":
            raise RuntimeError(f"the {backend!r} kernel backend is not part of this build of fastdiff") from None
        raise


def status(backend: str) -> tuple[bool, str]:
    """(usable here, reason) for one backend; never raises."""
    if backend == "torch":
        return True, "plain torch ops"
    try:
        return load(backend).available()
    except Exception as e:  # a backend that cannot even be imported is simply unavailable
        return False, f"{type(e).__name__}: {e}"


def available() -> list[str]:
    """Backends that work on this machine, in order of preference."""
    return [k for k in ("cuda", "triton", "cpu", "torch") if status(k)[0]]


def resolve(backend: str, device_type: str = "cpu") -> str:
    """Map ``backend=`` to a concrete backend for tensors on ``device_type`` ("cpu" or "cuda")."""
    if backend == "auto":
        for k in _PREFERENCE.get(device_type, ("torch",)):
            ok, why = status(k)
            if ok and k == "cpu":  # buildable is not built: build now (its first use), so a failed build falls back
                try:
                    load("cpu").ext()
                except RuntimeError as e:
                    ok, why = False, str(e)
            if ok:
                return k
            if k == "cpu" and "cpu" not in _WARNED:  # say once why CPU sampling runs on the slower torch ops
                _WARNED.add("cpu")
                warnings.warn(f"fastdiff: backend='auto' uses plain torch ops on CPU because the cpu kernels cannot "
                              f"run here: {why}", RuntimeWarning, stacklevel=2)
        return "torch"
    if backend not in BACKENDS:
        raise unknown_name("backend", backend, ("auto",) + BACKENDS)
    if backend == "cpu" and device_type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, but the data is on {device_type}: use 'auto'")
    if backend == "cuda" and device_type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, but the data is on {device_type}: use 'auto'")
    ok, why = status(backend)
    if not ok:
        raise ValueError(f"backend {backend!r} is not available here: {why}")
    return backend
