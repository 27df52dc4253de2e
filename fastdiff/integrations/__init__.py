"""Integrations with other stacks: ``diffusers`` (drop-in schedulers) and ``k_diffusion`` (k-diffusion-style
sampling functions), imported on first access so that ``fastdiff.integrations`` does not pull diffusers in."""

import importlib

_SUBMODULES = ("diffusers", "k_diffusion")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
