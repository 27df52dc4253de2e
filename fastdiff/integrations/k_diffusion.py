"""k-diffusion-style samplers on fastdiff plans: the signatures and results of ``k_diffusion.sampling``.

``model(x, sigma [B], **extra_args) -> denoised`` is k-diffusion's denoiser convention, which is fastdiff's model
convention with ``prediction="x0"`` on the EDM schedule (alpha = 1, t = sigma), so each function is a Plan built
from the given ``sigmas``.  Differences from k-diffusion, by design:

- noise is fastdiff's per-sample Philox (a sample's noise does not depend on the batch) unless a
  ``noise_sampler(sigma, sigma_next)`` is given, which is then called exactly where k-diffusion calls it;
  ``seeds=`` (one per sample) fixes the Philox noise; by default seeds are drawn from torch's global generator;
- a step to sigma = 0 is never a special case in the loop (it is decided when the plan is built);
- ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` also work with a single step.
Churn noise of ``sample_heun`` / ``sample_dpm_2`` is Philox (k-diffusion uses ``torch.randn_like`` there).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import plan as make_plan
from ..sampler import Sampler
from ..schedules import EDM

_SCHEDULE = EDM()

__all__ = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_euler_ancestral", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_2s_ancestral"]


def _run(solver, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, seeds=None, **options):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor [B, ...] (the noisy start, e.g. randn * sigmas[0])")
    sig_t = torch.as_tensor(sigmas)
    sig = [float(s) for s in sig_t.flatten().tolist()]  # k-diffusion passes sigmas as a tensor: one host copy
    plan = make_plan(solver, _SCHEDULE, sigmas=sig, prediction="x0", **options)
    extra_args = extra_args or {}

    def denoiser(xx, t):
        return model(xx, t.to(xx.dtype), **extra_args)

    steps = plan.stage_step
    noise_fn = None
    if noise_sampler is not None:
        def noise_fn(k):
            i = int(steps[k])
            return noise_sampler(sig_t[i], sig_t[i + 1])

    cb = None
    if callback is not None:
        # k-diffusion reports, once per step, the state entering the step's first model call and that call's D
        first = {}
        for k in np.flatnonzero(plan.calls_model)[::-1]:
            first[int(steps[k])] = int(k)
        state = {"x": x}

        def cb(k, xk, D):
            i = int(steps[k])
            if first[i] == k:
                callback({"x": state["x"], "i": i, "sigma": sig_t[i],
                          "sigma_hat": float(plan.stage_times[k]), "denoised": D})
            state["x"] = xk

    if seeds is None:
        seeds = torch.randint(0, 2**62, (x.shape[0],)).tolist()
    progress = None if disable is None else not disable
    sampler = Sampler(denoiser, plan, backend="torch" if noise_fn is not None else "auto", progress=progress)
    return sampler.sample(x_T=x, seeds=seeds, callback=cb, noise_fn=noise_fn)


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=math.inf, s_noise=1.0, seeds=None):
    """Euler steps (Karras et al. 2022, Algorithm 2 without the correction); churn is not supported here."""
    if s_churn:
        raise ValueError("sample_euler with s_churn > 0 is not available; use sample_heun(s_churn=...) or "
                         "fastdiff.plan('heun', ..., s_churn=...)")
    return _run("euler", model, x, sigmas, extra_args, callback, disable, seeds=seeds)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=math.inf, s_noise=1.0, seeds=None):
    """Karras et al. 2022, Algorithm 2 (Heun steps with optional churn)."""
    return _run("heun", model, x, sigmas, extra_args, callback, disable, seeds=seeds, s_churn=float(s_churn),
                s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=math.inf, s_noise=1.0, seeds=None):
    """A DPM-Solver-2-style midpoint sampler in log sigma (k-diffusion's sample_dpm_2)."""
    return _run("dpm_2", model, x, sigmas, extra_args, callback, disable, seeds=seeds, s_churn=float(s_churn),
                s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, seeds=None):
    """Linear multistep in sigma (k-diffusion's sample_lms), exact polynomial integrals."""
    return _run("lms", model, x, sigmas, extra_args, callback, disable, seeds=seeds, order=int(order))


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, seeds=None):
    """Ancestral sampling with Euler steps."""
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise))


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None, seeds=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise))


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, seeds=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2)."""
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, seeds=seeds, lower_order_final=False)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", seeds=None):
    """DPM-Solver++(2M) SDE."""
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise), solver_type=solver_type, lower_order_final=False)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, seeds=None):
    """DPM-Solver++(3M) SDE."""
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise), lower_order_final=False)
