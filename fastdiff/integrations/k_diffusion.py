"""k-diffusion-style samplers on fastdiff plans: the signatures and results of ``k_diffusion.sampling``.

``model(x, sigma [B], **extra_args) -> denoised`` is k-diffusion's denoiser convention, which is fastdiff's model
convention with ``prediction="x0"`` on the EDM schedule (alpha = 1, t = sigma), so each function is a Plan built
from the given ``sigmas``.  Differences from k-diffusion, by design:

- noise is fastdiff's per-sample Philox (a sample's noise does not depend on the batch) unless a
  ``noise_sampler(sigma, sigma_next)`` is given, which is then called exactly where k-diffusion calls it;
  ``seeds=`` (one per sample) fixes the Philox noise; by default seeds are drawn from torch's global generator;
- a step to sigma = 0 is never a special case in the loop (it is decided when the plan is built);
- ``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde`` also work with a single step.

Samplers k-diffusion 0.1.1 lacks (heunpp2, gradient_estimation, er_sde, seeds_2/3, ipndm(_v), deis, res_multistep
(_ancestral), sa_solver(_pece)) take ComfyUI's signatures; ComfyUI options fastdiff has no rows for (a custom
``noise_scaler`` / ``tau_func``, ``cfg_pp``, ``deis_mode="rhoab"``) raise a ValueError that says so.
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
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_2s_ancestral", "sample_dpm_2_ancestral",
           "sample_dpmpp_sde", "sample_heunpp2", "sample_gradient_estimation", "sample_er_sde", "sample_seeds_2",
           "sample_seeds_3", "sample_dpm_fast", "sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep",
           "sample_res_multistep_ancestral", "sample_sa_solver", "sample_sa_solver_pece"]


def _run(solver, model, x, sigmas, extra_args, callback, disable, noise_sampler=None, seeds=None, noise_args="step",
         boundaries=None, **options):
    """Build the plan of ``solver`` on ``sigmas`` and run it with k-diffusion's plumbing.

    ``noise_args`` says what a given ``noise_sampler`` is called with at a noisy stage of step i: "step":
    (sigma_i, sigma_{i+1}); "stage": (the stage's sigma, the sigma the stage steps to) as ComfyUI's SEEDS;
    "dpmpp_sde": k-diffusion's sample_dpmpp_sde pair, see ``_dpmpp_sde_noise``.  ``boundaries`` are the step
    boundaries k-diffusion reports when they are not ``sigmas`` (sample_dpm_fast).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor [B, ...] (the noisy start, e.g. randn * sigmas[0])")
    sig_t = torch.as_tensor(sigmas)
    sig = [float(s) for s in sig_t.flatten().tolist()]  # k-diffusion passes sigmas as a tensor: one host copy
    plan = make_plan(solver, _SCHEDULE, sigmas=sig, prediction="x0", **options)
    bounds = sig_t if boundaries is None else boundaries
    extra_args = extra_args or {}

    def denoiser(xx, t):
        return model(xx, t.to(xx.dtype), **extra_args)

    steps = plan.stage_step
    noise_fn = None
    if noise_sampler is not None:
        if noise_args == "dpmpp_sde":
            noise_fn = _dpmpp_sde_noise(plan, sig_t, noise_sampler, options["r"])
        elif noise_args == "stage":
            times = torch.tensor(plan.stage_times, dtype=sig_t.dtype)

            def noise_fn(k):
                i = int(steps[k])
                inner = k + 1 < len(steps) and int(steps[k + 1]) == i
                return noise_sampler(times[k], times[k + 1] if inner else bounds[i + 1])
        else:
            def noise_fn(k):
                i = int(steps[k])
                return noise_sampler(bounds[i], bounds[i + 1])

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
                callback({"x": state["x"], "i": i, "sigma": bounds[i], "sigma_hat": float(plan.stage_times[k]),
                          "denoised": D})
            state["x"] = xk

    if seeds is None:
        seeds = torch.randint(0, 2**62, (x.shape[0],)).tolist()
    progress = None if disable is None else not disable
    sampler = Sampler(denoiser, plan, backend="torch" if noise_fn is not None else "auto", progress=progress)
    return sampler.sample(x_T=x, seeds=seeds, callback=cb, noise_fn=noise_fn)


def _dpmpp_sde_noise(plan, sig_t, noise_sampler, r):
    """noise_fn for the dpmpp_sde plan from k-diffusion's noise_sampler.

    k-diffusion draws z_1 = noise_sampler(sigma, sigma_1) for the step to the midpoint sigma_1 and
    z_2 = noise_sampler(sigma, sigma_next) for the whole step (a Brownian tree makes them correlated).  The plan's
    second stage draws the fresh part w of z_2 = rho z_1 + sqrt(1 - rho^2) w, so w = (z_2 - rho z_1) /
    sqrt(1 - rho^2) gives k-diffusion's result for any noise_sampler.
    """
    steps, flags = plan.stage_step, plan.stage_flags
    z_1 = {}

    def noise_fn(k):
        i = int(steps[k])
        t, t_next = sig_t[i].log().neg(), sig_t[i + 1].log().neg()  # k-diffusion's arithmetic: equal arguments
        sigma, sigma_1, sigma_next = t.neg().exp(), (t + (t_next - t) * r).neg().exp(), t_next.neg().exp()
        if not any(flags[j].noise for j in range(k) if int(steps[j]) == i):  # the step's first draw
            z_1[i] = noise_sampler(sigma, sigma_1)
            return z_1[i]
        rho = math.sqrt((float(sigma) - float(sigma_1)) / (float(sigma) - float(sigma_next)))
        return (noise_sampler(sigma, sigma_next) - rho * z_1.pop(i)) / math.sqrt(1.0 - rho * rho)

    return noise_fn


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


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, seeds=None):
    """Ancestral sampling with DPM-Solver-2 midpoint steps (k-diffusion's sample_dpm_2_ancestral)."""
    return _run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise))


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=0.5, seeds=None):
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde.

    Without a ``noise_sampler`` the two correlated draws of a step have the joint law of k-diffusion's Brownian
    tree (other numbers for a given seed); with one, the result is k-diffusion's for the same noise_sampler.
    """
    return _run("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                noise_args="dpmpp_sde", eta=float(eta), s_noise=float(s_noise), r=float(r))


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None, seeds=None):
    """DPM-Solver-fast (k-diffusion's sample_dpm_fast): ``n`` model calls in steps equally spaced in log sigma from
    ``sigma_max`` to ``sigma_min`` (orders 3, ..., 3 and a last one or two lower); ends at ``sigma_min``, not 0.

    The callback's dict also has k-diffusion's ``t`` and ``t_up`` (-log sigma) for each step.
    """
    if not (sigma_max > sigma_min > 0):
        raise ValueError(f"sigma_min and sigma_max must satisfy sigma_max > sigma_min > 0, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of model calls) must be an integer >= 1, got {n!r}")
    # the plan needs the grid's two ends only; k-diffusion's step boundaries for the callback and the noise_sampler
    t_start, t_end = torch.tensor(sigma_max).log().neg(), torch.tensor(sigma_min).log().neg()
    bounds = torch.linspace(t_start, t_end, n // 3 + 2).neg().exp()
    if callback is not None:
        report = callback

        def callback(info):
            report({**info, "t": info["sigma"].log().neg(), "t_up": info["sigma"].log().neg()})

    return _run("dpm_fast", model, x, np.geomspace(float(sigma_max), float(sigma_min), n + 1), extra_args, callback,
                disable, noise_sampler, seeds, boundaries=bounds, eta=float(eta), s_noise=float(s_noise))


def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                   s_tmax=math.inf, s_noise=1.0, seeds=None):
    """Heun++ (ComfyUI's sample_heunpp2): up to three model calls per step, weighted by the step's position."""
    return _run("heunpp2", model, x, sigmas, extra_args, callback, disable, seeds=seeds, s_churn=float(s_churn),
                s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))


def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0,
                               cfg_pp=False, seeds=None):
    """Euler with the gradient-estimation correction of the previous step's direction (ComfyUI's
    sample_gradient_estimation); ``cfg_pp`` is not supported."""
    if cfg_pp:
        raise ValueError("sample_gradient_estimation with cfg_pp=True is not available; use cfg_pp=False")
    return _run("gradient_estimation", model, x, sigmas, extra_args, callback, disable, seeds=seeds,
                ge_gamma=float(ge_gamma))


def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3, seeds=None):
    """Extended reverse-time SDE solver (Cui et al. 2025, ComfyUI's sample_er_sde) with its default noise scaler;
    a custom ``noise_scaler`` is not supported."""
    if noise_scaler is not None:
        raise ValueError("sample_er_sde with a custom noise_scaler is not available; pass noise_scaler=None (the "
                         "default x (e^(x^0.3) + 10))")
    return _run("er_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                s_noise=float(s_noise), max_stage=int(max_stage))


def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1", seeds=None):
    """SEEDS-2 (Gonzalez et al. 2023, ComfyUI's sample_seeds_2); a ``noise_sampler`` is called once per stage with
    the stage's (sigma, sigma_next) as ComfyUI does."""
    return _run("seeds_2", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, noise_args="stage",
                eta=float(eta), s_noise=float(s_noise), r=float(r), solver_type=solver_type)


def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3, seeds=None):
    """SEEDS-3 (Gonzalez et al. 2023, ComfyUI's sample_seeds_3); noise_sampler as in ``sample_seeds_2``."""
    return _run("seeds_3", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds, noise_args="stage",
                eta=float(eta), s_noise=float(s_noise), r_1=float(r_1), r_2=float(r_2))


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, seeds=None):
    """Improved PNDM (Zhang & Chen 2023; ComfyUI's sample_ipndm): fixed-step Adams-Bashforth on the noise
    estimate, of order min(max_order, step + 1)."""
    return _run("ipndm", model, x, sigmas, extra_args, callback, disable, seeds=seeds, max_order=int(max_order))


def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4, seeds=None):
    """iPNDM with ComfyUI's variable-step weights (sample_ipndm_v)."""
    return _run("ipndm_v", model, x, sigmas, extra_args, callback, disable, seeds=seeds, max_order=int(max_order))


def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode="tab",
                seeds=None):
    """DEIS tAB (Zhang & Chen 2023; ComfyUI's sample_deis); only ``deis_mode="tab"``."""
    if deis_mode != "tab":
        raise ValueError(f"sample_deis with deis_mode={deis_mode!r} is not available; use deis_mode='tab'")
    return _run("deis", model, x, sigmas, extra_args, callback, disable, seeds=seeds, max_order=int(max_order))


def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0,
                         noise_sampler=None, seeds=None):
    """RES second-order multistep (ComfyUI's sample_res_multistep).  Deterministic: ``s_noise`` and
    ``noise_sampler`` are accepted for ComfyUI's signature and, as there (eta = 0), unused."""
    return _run("res_multistep", model, x, sigmas, extra_args, callback, disable, seeds=seeds)


def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                   s_noise=1.0, noise_sampler=None, seeds=None):
    """RES multistep with ancestral noise (ComfyUI's sample_res_multistep_ancestral)."""
    return _run("res_multistep_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seeds,
                eta=float(eta), s_noise=float(s_noise))


def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False,
                     eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, seeds=None):
    """SA-Solver (Xue et al. 2023; ComfyUI's sample_sa_solver).  The stochasticity window is given by ``eta``,
    ``sde_start_percent`` and ``sde_end_percent`` (the options of ComfyUI's SamplerSASolver node, which builds
    ``tau_func`` from them); a custom ``tau_func`` is not supported.  ``use_pece=True`` is sample_sa_solver_pece."""
    if tau_func is not None:
        raise ValueError("sample_sa_solver with a custom tau_func is not available; pass tau_func=None and set eta, "
                         "sde_start_percent, sde_end_percent")
    return _run("sa_solver_pece" if use_pece else "sa_solver", model, x, sigmas, extra_args, callback, disable,
                noise_sampler, seeds, eta=float(eta), sde_start_percent=float(sde_start_percent),
                sde_end_percent=float(sde_end_percent), s_noise=float(s_noise), predictor_order=int(predictor_order),
                corrector_order=int(corrector_order), simple_order_2=bool(simple_order_2))


def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None,
                          s_noise=1.0, noise_sampler=None, predictor_order=3, corrector_order=4, simple_order_2=False,
                          eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8, seeds=None):
    """SA-Solver predict-evaluate-correct-evaluate (ComfyUI's sample_sa_solver_pece)."""
    return sample_sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                            predictor_order, corrector_order, True, simple_order_2, eta, sde_start_percent,
                            sde_end_percent, seeds)
