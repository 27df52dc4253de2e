"""Backend registry: which implementations of the step can run here, and the choice behind ``backend="auto"``."""

from __future__ import annotations

BACKENDS = ("torch",)


def load(kernel: str):
    """Import a kernel backend module (``fastdiff.backends.<kernel>``), building it on first use.

    The module provides ``OPS = {"step": fn, "add_noise": fn, "randn": fn}`` with the signatures of
    ``fastdiff.ops.step_reference`` etc.; an import or build failure raises RuntimeError saying what is missing.
    """
    import importlib

    try:
        return importlib.import_module(f"fastdiff.backends.{kernel}")
    except ModuleNotFoundError as e:
        if e.name == f"fastdiff.backends.{kernel}":
            raise RuntimeError(f"the {kernel!r} kernel backend is not part of this build of fastdiff") from None
        raise


def available() -> list[str]:
    """Backends that work on this machine, fastest first."""
    return ["torch"]


def resolve(backend: str, device=None) -> str:
    """Map a user's ``backend=`` to a concrete one, with a clear error for unknown names."""
    if backend == "auto":
        return available()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    if backend not in available():
        raise ValueError(f"backend {backend!r} is not available here; available: {', '.join(available())}")
    return backend
