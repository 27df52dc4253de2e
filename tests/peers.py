"""Shared helpers for the peer-equivalence tests: ``test_peers_kdiffusion.py`` and
``test_peers_diffusers.py``.

Imported as ``from peers import ...``: tests/ has no ``__init__.py``, so pytest's default ``prepend`` import mode
puts tests/ on ``sys.path`` while it collects these files; no conftest and no ``sys.path`` edits are needed.

The peers run on a fixed nonlinear model: the exact denoiser of a Gaussian mixture (``GaussianMixture``), which
every prediction type (x0 / epsilon / v / flow) is derived from, so "the same model" means the same function of
(x, alpha, sigma) on both sides.  Stochastic samplers get fastdiff's Philox draws (``stage_noises``), so a
stochastic comparison is as exact as a deterministic one.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from fastdiff import rng

SHAPE = (4, 2, 4, 4)  # batch 4, 32 features per sample
SEEDS = [101, 202, 303, 404]
FP32_RTOL = 1e-4  # fp32 tolerance, relative to the data scale (max |x0| of the compared samples, at least 1)


# ---------------------------------------------------------------------------------------------------------------
# The fixed model: exact posterior mean of a Gaussian mixture
# ---------------------------------------------------------------------------------------------------------------


class GaussianMixture:
    """Data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in ``dim`` dimensions; ``denoise`` is E[x0 | alpha x0 + sigma n = x].

    Written in x = alpha x0 + sigma n directly (not in x / alpha), so it is finite at alpha = 0 (rectified flow's
    t = 1), where it returns the prior mean.
    """

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.means = 0.8 * torch.randn(3, dim, generator=g, dtype=torch.float64)
        # stds not much below the mean separation: a sharper mixture makes the posterior switch abruptly at low
        # noise, and the sampling problem itself then amplifies float32 rounding beyond the fp32 tolerance
        self.stds = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64)
        self.logw = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log()
        self.dim = dim

    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Posterior mean; ``alpha``, ``sigma``: floats or tensors with one entry per sample."""
        B, dt = x.shape[0], x.dtype
        xf = x.reshape(B, -1)
        a = _per_sample(alpha, B, dt)[:, None]  # [B, 1]
        s = _per_sample(sigma, B, dt)[:, None]
        mu, s2, logw = self.means.to(dt), self.stds.to(dt) ** 2, self.logw.to(dt)
        var = a * a * s2[None, :] + s * s  # [B, K]: variance of x given component k
        diff = xf[:, None, :] - a[:, :, None] * mu[None]  # [B, K, d]
        logp = logw[None] - 0.5 * self.dim * var.log() - 0.5 * (diff * diff).sum(-1) / var
        # softmax written out: torch.softmax takes ~10 ms per call on this CPU build, exp/sum take microseconds
        resp = (logp - logp.amax(dim=1, keepdim=True)).exp()
        resp = resp / resp.sum(dim=1, keepdim=True)
        post = mu[None] + (a * s2[None, :] / var)[..., None] * diff  # E[x0 | x, k]
        return (resp[..., None] * post).sum(1).reshape(x.shape)


def _per_sample(v, batch, dtype):
    v = torch.as_tensor(v, dtype=dtype)
    return v.expand(batch) if v.dim() == 0 else v.reshape(batch)


def prediction_output(gm: GaussianMixture, x, alpha, sigma, prediction: str) -> torch.Tensor:
    """The model output in a parameterization, from the exact denoiser D (x = alpha D + sigma eps).

    ``prediction``: "x0"/"sample", "epsilon", "v"/"v_prediction" (v = alpha eps - sigma D), "flow" (eps - D).
    """
    B, dt = x.shape[0], x.dtype
    D = gm.denoise(x, alpha, sigma)
    if prediction in ("x0", "sample"):
        return D
    shape = (B,) + (1,) * (x.dim() - 1)
    a = _per_sample(alpha, B, dt).reshape(shape)
    s = _per_sample(sigma, B, dt).reshape(shape)
    eps = (x - a * D) / s
    if prediction == "epsilon":
        return eps
    if prediction in ("v", "v_prediction"):
        return a * eps - s * D
    if prediction in ("flow", "flow_prediction"):
        return eps - D
    raise ValueError(prediction)


def schedule_model(gm, schedule, prediction):
    """``model(x, t)`` in fastdiff's convention: the mixture's output at the schedule's (alpha, sigma) of t."""

    def model(x, t, **_):
        tn = torch.as_tensor(t).detach().double().cpu().numpy()
        alpha = torch.as_tensor(np.asarray(schedule.alpha(tn), dtype=np.float64))
        sigma = torch.as_tensor(np.asarray(schedule.sigma(tn), dtype=np.float64))
        return prediction_output(gm, x, alpha, sigma, prediction)

    return model


# ---------------------------------------------------------------------------------------------------------------
# Shared noise and comparisons
# ---------------------------------------------------------------------------------------------------------------


def prior_noise(dtype=torch.float32) -> torch.Tensor:
    """Unit prior noise (fastdiff's draw 0 of SEEDS)."""
    return rng.randn(SHAPE, SEEDS, draw=0, dtype=dtype)


def stage_noises(plan, dtype=torch.float32) -> list:
    """The unit normal fastdiff's sampler draws at each stage of ``plan`` (zeros where a stage draws none).

    Same call as fastdiff.sampler: ``rng.randn(shape, seeds, draw=plan.draw[k], dtype=x.dtype)``.
    """
    return [rng.randn(SHAPE, SEEDS, draw=int(d), dtype=dtype) if d >= 0 else torch.zeros(SHAPE, dtype=dtype)
            for d in plan.draw]


def noise_draws(plan, dtype=torch.float32) -> list:
    """The plan's noise draws 1 .. num_draws-1 in order (the order a peer consumes them)."""
    return [rng.randn(SHAPE, SEEDS, draw=d, dtype=dtype) for d in range(1, plan.num_draws)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def data_scale(*xs) -> float:
    return max([1.0] + [float(x.double().abs().max()) for x in xs])


def assert_close(label, got, ref, rtol, record_property=None):
    """Assert max |got - ref| <= rtol * data scale; record and print the actual difference."""
    assert torch.isfinite(got).all() and torch.isfinite(ref).all(), f"{label}: non-finite values"
    diff, scale = max_diff(got, ref), data_scale(got, ref)
    if record_property is not None:
        record_property("max_abs_diff", f"{diff:.3e}")
        record_property("data_scale", f"{scale:.3g}")
    print(f"[peer] {label}: max|diff| = {diff:.3e} (scale {scale:.3g}, tol {rtol * scale:.1e})")
    assert diff <= rtol * scale, f"{label}: max|diff| = {diff:.3e} > {rtol * scale:.1e}"
    return diff


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion without its package __init__
# ---------------------------------------------------------------------------------------------------------------


def append_dims(x, target_dims):
    """k_diffusion.utils.append_dims, rewritten: trailing singleton dims up to ``target_dims``."""
    if x.ndim > target_dims:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * (target_dims - x.ndim)]


_KD_PACKAGE = "_fastdiff_peer_k_diffusion"


@functools.lru_cache(maxsize=None)
def load_k_diffusion():
    """(sampling, external) modules of the installed k-diffusion, or None when it is not installed.

    ``import k_diffusion`` fails here: its ``__init__`` imports every submodule, and ``k_diffusion.utils`` imports
    torchvision, whose build does not match the CPU torch (and PIL, safetensors ...).  ``sampling.py`` and
    ``external.py`` need none of that: only ``utils.append_dims`` (through ``from . import utils``), scipy, tqdm,
    and, at import time, ``torchsde`` and ``torchdiffeq`` (used only by BrownianTreeNoiseSampler and
    log_likelihood, which these tests never reach: every stochastic sampler gets ``noise_sampler=``).

    So: locate the package directory with ``importlib.util.find_spec("k_diffusion")`` (finding a spec does not
    execute the package), create an empty stand-in package under the private name ``_KD_PACKAGE`` whose ``utils``
    is a stub holding our ``append_dims``, and execute the two source files, unmodified, as
    ``_KD_PACKAGE.sampling`` / ``_KD_PACKAGE.external`` with ``importlib``.  ``torchsde`` / ``torchdiffeq`` get
    stubs when they are not installed.  These ``sys.modules`` entries live only during the exec and are removed
    afterwards, so no other test can see a stub.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "sampling.py").is_file():
        return None
    pkg = types.ModuleType(_KD_PACKAGE)
    pkg.__path__ = []  # a package, but nothing is found on its path: only what we register below
    utils = types.ModuleType(_KD_PACKAGE + ".utils")
    utils.append_dims = append_dims
    stubs = {_KD_PACKAGE: pkg, _KD_PACKAGE + ".utils": utils}
    for name, attr in (("torchsde", "BrownianTree"), ("torchdiffeq", "odeint")):
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)

            def _missing(*args, _name=name, **kwargs):
                raise ImportError(f"{_name} is not installed (stubbed by tests/peers.py)")

            setattr(stub, attr, _missing)
            stubs[name] = stub
    # Register exactly our entries and remove exactly them afterwards.  (Not mock.patch.dict(sys.modules): on exit
    # it also drops every module the exec imported for real -- scipy, tqdm -- and re-importing scipy's C extensions
    # later fails with "cannot load module more than once per process".)
    names = list(stubs) + [f"{_KD_PACKAGE}.{sub}" for sub in ("sampling", "external")]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    sys.modules.update(stubs)
    modules = {}
    try:
        for sub in ("sampling", "external"):
            name = f"{_KD_PACKAGE}.{sub}"
            mspec = importlib.util.spec_from_file_location(name, root / f"{sub}.py")
            mod = importlib.util.module_from_spec(mspec)
            sys.modules[name] = mod
            setattr(pkg, sub, mod)
            mspec.loader.exec_module(mod)
            modules[sub] = mod
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return modules["sampling"], modules["external"]
