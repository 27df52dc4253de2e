"""Peer equivalence with diffusers' schedulers.

Each diffusers scheduler is built from its constructor (no hub download) and run with the standard loop

    scheduler.set_timesteps(n); x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t); x = scheduler.step(out, t, x).prev_sample

on a fixed nonlinear model (the exact Gaussian-mixture denoiser of ``peers.py``, output as epsilon / v / x0 / flow),
and fastdiff runs the matching solver on a DiscreteVP schedule built from the scheduler's own betas
(``DiscreteVP(betas=scheduler.betas)``; a RectifiedFlow for FlowMatchEuler) on the same grid:

- ``grid="timesteps"``: fastdiff gets ``timesteps=scheduler.timesteps`` (and ``final="t_min"`` where diffusers ends
  on alpha_bar[0]: DDIM ``set_alpha_to_one=False``, ``final_sigmas_type="sigma_min"``), and the model is a fixed
  function of diffusers' timestep t: (alpha, sigma) of t on the float64 table.  Used wherever diffusers' model times
  are integers, so both sides call the model at the same t.
- ``grid="sigmas"``: fastdiff gets ``sigmas=scheduler.sigmas`` (k-diffusion sigma = diffusers' sigma, with its
  final 0).  Used where diffusers' sigmas are not those of its timesteps on fastdiff's table: Euler/Heun
  "linspace" (fractional t, sigma interpolated linearly in sigma by diffusers, in log-sigma by fastdiff) and
  DPMSolver ``use_karras_sigmas`` (diffusers rounds the timesteps it calls the model with, but steps with the
  unrounded Karras sigmas).  There the model times differ (by < 0.5, checked), so the model depends on the noise
  level only: diffusers' side evaluates it at the sigma of the step (``scheduler.sigmas[i]``), fastdiff's side at
  the (alpha, sigma) of its model time, which is the same noise level.

diffusers works in float32 (its ``alphas_cumprod`` too); fastdiff runs in float32 with float64 coefficients.  Both
must agree to ``FP32_RTOL`` of the data scale.  Stochastic schedulers get fastdiff's Philox draws: through
``variance_noise=`` (DDIM, DPMSolver SDE) or a patched ``randn_tensor`` in the scheduler's module (DDPM,
EulerAncestral).  Where fastdiff draws no noise at a step, diffusers gets a different nonzero normal, so noise that
diffusers adds and fastdiff does not cannot hide.  Mismatches that are genuine are ``xfail(strict=True)`` with the
diagnosis in the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import rng
from peers import (FP32_RTOL, SEEDS, SHAPE, GaussianMixture, assert_close, prediction_output, prior_noise,
                   schedule_model, stage_noises)

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.interp on torch tensors, which numpy 2 warns about on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

GM = GaussianMixture(dim=32)
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
STEPS = (1, 2, 5, 10, 25)
PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


@dataclass
class Case:
    cls: type
    config: dict
    solver: str
    options: dict = field(default_factory=dict)
    grid: str = "timesteps"  # "timesteps" | "sigmas" (see the module docstring)
    space: str = "x"  # "x": diffusers' sample is x; "y": x / alpha (Euler-type: scale_model_input divides)
    noise: str | None = None  # None | "variance_noise" | "randn_tensor"
    step_kwargs: dict = field(default_factory=dict)
    steps: tuple = STEPS
    xfail: dict = field(default_factory=dict)  # n -> reason ("all": every n)


# ---------------------------------------------------------------------------------------------------------------
# Diagnosed mismatches (xfail strict)
# ---------------------------------------------------------------------------------------------------------------

DDPM_FINAL_NOISE = (
    "diffusers bug: DDPMScheduler adds noise whenever t > 0, also on the last step, whose previous timestep is -1 "
    "(alpha_bar = 1). With fixed_large that noise has variance beta = 1 - alpha_bar_t (0.245 at t = 199, the last "
    "of n = 5 trailing), so the 'sample' is x0_hat + N(0, 1 - alpha_bar_t); with that noise zeroed both agree to "
    "1e-6. Ho et al. 2020 Algorithm 2 sets z = 0 on the last step; fastdiff returns the posterior mean there. "
    "(With fixed_small that variance is ~1e-20 -> agrees.)")
DDIM_STRIDE = (
    "diffusers quirk: DDIMScheduler.step takes prev_timestep = t - N // n, a fixed stride, while 'trailing' "
    "timesteps for N % n != 0 are round(arange(N, 0, -N/n)) - 1 (n = 3: 999, 666, 332): the step from 666 lands on "
    "alpha_bar[333] but the next model call is at t = 332. fastdiff steps between consecutive model times.")
SDE_3M = (
    "diffusers bug: DPMSolverMultistepScheduler sde-dpmsolver++ order 3 uses the D2 coefficient "
    "alpha_t * ((1 - e^{-2h} - 2h) / (2h)^2 - 0.5); the exponential-integrator Taylor term is "
    "alpha_t * ((1 - e^{-2h} - 2h) / (2h)^2 + 0.5) (= h/3 + O(h^2), the ODE's (h - 1 + e^{-h}) / h^2 - 1/2 with "
    "h -> 2h, and k-diffusion's sample_dpmpp_3m_sde: -phi_3 with phi_3 = phi_2 / h_eta - 1/2). diffusers' term is "
    "-1 + O(h), i.e. an O(h^2) error per step. fastdiff follows k-diffusion (test_peers_kdiffusion: 1e-13 in "
    "float64); with diffusers' sign patched to +0.5 it agrees with fastdiff to 5e-6.")

UNIPC_BH1_NAN = (
    "diffusers bug: UniPCMultistepScheduler with solver_type='bh1' and final_sigmas_type='zero' (the default) "
    "returns NaN: on the last step sigma_t = 0 gives h = inf, B(h) = hh = -inf, and the first-order predictor "
    "computes x_t_ - alpha_t * B_h * pred_res with pred_res = 0 -> -inf * 0 = NaN. (bh2 has B(h) = expm1(-inf) = -1 "
    "and is fine.) fastdiff returns D on a step to sigma = 0; bh1 with final_sigmas_type='sigma_min' agrees.")

CASES = {
    # ---- DDIM (Song et al. 2021), epsilon / v, leading (steps_offset=1) / trailing, set_alpha_to_one --------
    "ddim_leading_offset1": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="leading",
                                                     steps_offset=1), "ddim"),
    "ddim_trailing": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing"), "ddim"),
    "ddim_trailing_v": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing",
                                                prediction_type="v_prediction"), "ddim"),
    "ddim_leading_offset1_alpha_final": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="leading",
                                                                 steps_offset=1, set_alpha_to_one=False), "ddim"),
    "ddim_trailing_alpha_final_v": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing",
                                                            set_alpha_to_one=False, prediction_type="v_prediction"),
                                        "ddim"),
    "ddim_linear_betas_trailing": Case(DDIMScheduler, dict(LINEAR, clip_sample=False, timestep_spacing="trailing"),
                                       "ddim"),
    "ddim_eta1_trailing": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing"), "ddim",
                               dict(eta=1.0), noise="variance_noise", step_kwargs=dict(eta=1.0)),
    "ddim_eta0.5_leading_offset1": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="leading",
                                                            steps_offset=1), "ddim", dict(eta=0.5),
                                        noise="variance_noise", step_kwargs=dict(eta=0.5)),
    "ddim_trailing_stride": Case(DDIMScheduler, dict(SD, clip_sample=False, timestep_spacing="trailing"), "ddim",
                                 steps=(3, 7), xfail={"all": DDIM_STRIDE}),
    # ---- DDPM (Ho et al. 2020, Algorithm 2) with few steps -------------------------------------------------------
    "ddpm_fixed_small_leading": Case(DDPMScheduler, dict(SD, clip_sample=False, variance_type="fixed_small"),
                                     "ddpm", dict(variance="fixed_small"), noise="randn_tensor"),
    "ddpm_fixed_large_leading": Case(DDPMScheduler, dict(SD, clip_sample=False, variance_type="fixed_large"),
                                     "ddpm", dict(variance="fixed_large"), noise="randn_tensor"),
    "ddpm_fixed_small_trailing": Case(DDPMScheduler, dict(SD, clip_sample=False, variance_type="fixed_small",
                                                          timestep_spacing="trailing"),
                                      "ddpm", dict(variance="fixed_small"), noise="randn_tensor"),
    "ddpm_fixed_large_trailing": Case(DDPMScheduler, dict(SD, clip_sample=False, variance_type="fixed_large",
                                                          timestep_spacing="trailing"),
                                      "ddpm", dict(variance="fixed_large"), noise="randn_tensor",
                                      steps=(5,), xfail={5: DDPM_FINAL_NOISE}),
    # ---- DPM-Solver++ multistep ---------------------------------------------------------------------------------
    "dpmpp_2m_midpoint": Case(DPMSolverMultistepScheduler, dict(SD), "dpmpp_2m", dict(solver_type="midpoint")),
    "dpmpp_2m_heun": Case(DPMSolverMultistepScheduler, dict(SD, solver_type="heun"), "dpmpp_2m",
                          dict(solver_type="heun")),
    "dpmpp_2m_no_lower_order_final": Case(DPMSolverMultistepScheduler, dict(SD, lower_order_final=False),
                                          "dpmpp_2m", dict(lower_order_final=False)),
    "dpmpp_2m_sigma_min_final": Case(DPMSolverMultistepScheduler, dict(SD, lower_order_final=False,
                                                                       final_sigmas_type="sigma_min"),
                                     "dpmpp_2m", dict(lower_order_final=False)),
    "dpmpp_2m_trailing_v": Case(DPMSolverMultistepScheduler, dict(SD, timestep_spacing="trailing",
                                                                  prediction_type="v_prediction"), "dpmpp_2m"),
    "dpmpp_2m_karras": Case(DPMSolverMultistepScheduler, dict(SD, use_karras_sigmas=True), "dpmpp_2m",
                            grid="sigmas"),
    "dpmpp_3m": Case(DPMSolverMultistepScheduler, dict(SD, solver_order=3, solver_type="heun"), "dpmpp_3m",
                     dict(solver_type="heun")),
    "dpmpp_3m_no_lower_order_final": Case(DPMSolverMultistepScheduler, dict(SD, solver_order=3, solver_type="heun",
                                                                            lower_order_final=False),
                                          "dpmpp_3m", dict(lower_order_final=False, solver_type="heun")),
    "dpmpp_3m_x0": Case(DPMSolverMultistepScheduler, dict(SD, solver_order=3, solver_type="heun",
                                                          prediction_type="sample"), "dpmpp_3m",
                        dict(solver_type="heun")),
    "dpmpp_3m_midpoint_default": Case(DPMSolverMultistepScheduler, dict(SD, solver_order=3), "dpmpp_3m",
                                      dict(solver_type="midpoint"), steps=(5, 10)),
    "sde_dpmpp_2m_midpoint": Case(DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++"),
                                  "dpmpp_2m_sde", dict(eta=1.0, solver_type="midpoint"), noise="variance_noise"),
    "sde_dpmpp_2m_heun": Case(DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++",
                                                                solver_type="heun"),
                              "dpmpp_2m_sde", dict(eta=1.0, solver_type="heun"), noise="variance_noise"),
    "sde_dpmpp_2m_karras": Case(DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++",
                                                                  use_karras_sigmas=True),
                                "dpmpp_2m_sde", dict(eta=1.0), grid="sigmas", noise="variance_noise"),
    # (solver_type="heun" so that the D2 coefficient is the only difference; see SDE_3M)
    "sde_dpmpp_3m": Case(DPMSolverMultistepScheduler, dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3,
                                                           solver_type="heun"),
                         "dpmpp_3m_sde", dict(eta=1.0), noise="variance_noise", steps=(5, 10, 25),
                         xfail={5: SDE_3M, 10: SDE_3M, 25: SDE_3M}),
    # ---- Euler (Karras et al. 2022 Algorithm 1 in y = x / alpha) --------------------------------------------------
    "euler_linspace": Case(EulerDiscreteScheduler, dict(SD), "euler", grid="sigmas", space="y"),
    "euler_leading_offset1": Case(EulerDiscreteScheduler, dict(SD, timestep_spacing="leading", steps_offset=1),
                                  "euler", space="y"),
    "euler_trailing": Case(EulerDiscreteScheduler, dict(SD, timestep_spacing="trailing"), "euler", space="y"),
    "euler_trailing_v": Case(EulerDiscreteScheduler, dict(SD, timestep_spacing="trailing",
                                                          prediction_type="v_prediction"), "euler", space="y"),
    "euler_trailing_x0": Case(EulerDiscreteScheduler, dict(SD, timestep_spacing="trailing",
                                                           prediction_type="sample"), "euler", space="y"),
    "euler_trailing_sigma_min_final": Case(EulerDiscreteScheduler, dict(SD, timestep_spacing="trailing",
                                                                        final_sigmas_type="sigma_min"),
                                           "euler", space="y"),
    "euler_karras": Case(EulerDiscreteScheduler, dict(SD, use_karras_sigmas=True), "euler", grid="sigmas",
                         space="y"),
    # ---- Euler ancestral ----------------------------------------------------------------------------------------
    "euler_ancestral_trailing": Case(EulerAncestralDiscreteScheduler, dict(SD, timestep_spacing="trailing"),
                                     "euler_ancestral", dict(eta=1.0), space="y", noise="randn_tensor"),
    "euler_ancestral_linspace": Case(EulerAncestralDiscreteScheduler, dict(SD), "euler_ancestral", dict(eta=1.0),
                                     grid="sigmas", space="y", noise="randn_tensor"),
    "euler_ancestral_leading_v": Case(EulerAncestralDiscreteScheduler, dict(SD, timestep_spacing="leading",
                                                                            steps_offset=1,
                                                                            prediction_type="v_prediction"),
                                      "euler_ancestral", dict(eta=1.0), space="y", noise="randn_tensor"),
    # ---- Heun (Karras et al. 2022 Algorithm 2, no churn) ---------------------------------------------------------
    "heun_trailing": Case(HeunDiscreteScheduler, dict(SD, timestep_spacing="trailing"), "heun", space="y"),
    "heun_linspace": Case(HeunDiscreteScheduler, dict(SD), "heun", grid="sigmas", space="y"),
    "heun_karras": Case(HeunDiscreteScheduler, dict(SD, use_karras_sigmas=True), "heun", grid="sigmas",
                        space="y"),
    "heun_trailing_v": Case(HeunDiscreteScheduler, dict(SD, timestep_spacing="trailing",
                                                        prediction_type="v_prediction"), "heun", space="y"),
    # ---- UniPC (Zhao et al. 2023), data prediction ---------------------------------------------------------------
    "unipc_bh1_order2": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh1", solver_order=2), "unipc",
                             dict(order=2, solver_type="bh1"), xfail={"all": UNIPC_BH1_NAN}),
    "unipc_bh1_order2_sigma_min_final": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh1", solver_order=2,
                                                                           final_sigmas_type="sigma_min"), "unipc",
                                             dict(order=2, solver_type="bh1")),
    "unipc_bh2_order2": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh2", solver_order=2), "unipc",
                             dict(order=2, solver_type="bh2")),
    "unipc_bh1_order3": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh1", solver_order=3), "unipc",
                             dict(order=3, solver_type="bh1"), steps=(5,), xfail={"all": UNIPC_BH1_NAN}),
    "unipc_bh1_order3_sigma_min_final": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh1", solver_order=3,
                                                                           final_sigmas_type="sigma_min"), "unipc",
                                             dict(order=3, solver_type="bh1")),
    "unipc_bh2_order3": Case(UniPCMultistepScheduler, dict(SD, solver_type="bh2", solver_order=3), "unipc",
                             dict(order=3, solver_type="bh2")),
    "unipc_bh2_order3_trailing_v": Case(UniPCMultistepScheduler, dict(SD, solver_order=3, timestep_spacing="trailing",
                                                                      prediction_type="v_prediction"), "unipc",
                                        dict(order=3, solver_type="bh2")),
    "unipc_bh2_order2_sigma_min_final": Case(UniPCMultistepScheduler, dict(SD, solver_order=2, lower_order_final=False,
                                                                           final_sigmas_type="sigma_min"), "unipc",
                                             dict(order=2, solver_type="bh2", lower_order_final=False)),
}

FLOW_SHIFTS = (1.0, 3.0)


# ---------------------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------------------


def _fastdiff_vp(scheduler):
    """fastdiff's DiscreteVP from the scheduler's own (float32) betas, accumulated in float64."""
    return fastdiff.schedules.DiscreteVP(betas=scheduler.betas.double().numpy())


def _final(case):
    cfg = case.config
    if cfg.get("set_alpha_to_one", True) is False or cfg.get("final_sigmas_type") == "sigma_min":
        return "t_min"
    return "zero"


def _distinct_noise(i, dtype):
    """Noise for a step where fastdiff draws none: a different stream, so it cannot cancel out."""
    return rng.randn(SHAPE, SEEDS, draw=i, stream=7, dtype=dtype)


def run_diffusers(scheduler, n, model_fn, noises=None, noise_via=None, step_kwargs=None, monkeypatch=None):
    """The standard diffusers loop; returns (start sample, final sample).  ``model_fn(x_in, t, i)``."""
    scheduler.set_timesteps(n)
    x = prior_noise(torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch has none: 1
    x_start = x.clone()
    box = {}
    if noise_via == "randn_tensor":
        module = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])

        def fake_randn_tensor(shape, *args, dtype=None, **kwargs):
            assert tuple(shape) == SHAPE
            return box["z"].to(dtype or torch.float32)

        monkeypatch.setattr(module, "randn_tensor", fake_randn_tensor)
    for i, t in enumerate(scheduler.timesteps):
        # (FlowMatchEuler has no scale_model_input: its pipelines feed x as is)
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = model_fn(x_in, t, i)
        kwargs = dict(step_kwargs or {})
        if noise_via == "variance_noise":
            kwargs["variance_noise"] = noises[i]
        elif noise_via == "randn_tensor":
            box["z"] = noises[i]
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    if monkeypatch is not None:
        monkeypatch.undo()
    return x_start, x


def _case_params():
    params = []
    for name, case in CASES.items():
        for n in case.steps:
            reason = case.xfail.get("all", case.xfail.get(n))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(name, n, id=f"{name}-n{n}", marks=marks))
    return params


@pytest.mark.parametrize("name, n", _case_params())
def test_scheduler_matches_diffusers(name, n, monkeypatch, record_property):
    case = CASES[name]
    scheduler = case.cls(**case.config)
    scheduler.set_timesteps(n)
    vp = _fastdiff_vp(scheduler)
    pred = case.config.get("prediction_type", "epsilon")
    fd_pred = PREDICTION[pred]
    ts = scheduler.timesteps.double().numpy()

    # fastdiff's plan on the same grid
    if case.grid == "timesteps":
        times = ts if case.solver != "heun" else ts[::2]  # Heun's timesteps repeat each inner time twice
        plan = fastdiff.plan(case.solver, vp, prediction=fd_pred, timesteps=times, final=_final(case),
                             **case.options)
        assert np.array_equal(plan.model_times, ts), (plan.model_times, ts)
    else:
        sigmas = scheduler.sigmas.double().numpy()
        if case.solver == "heun":  # diffusers' Heun sigmas: s0, s1, s1, s2, s2, ..., 0
            sigmas = np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        plan = fastdiff.plan(case.solver, vp, prediction=fd_pred, sigmas=sigmas, **case.options)
        # the same noise levels, but not the same model times (see the module docstring): within half a step
        assert plan.model_times.shape == ts.shape
        dt = float(np.abs(plan.model_times - ts).max())
        record_property("max_model_time_diff", f"{dt:.3g}")
        assert dt <= 0.5 + 1e-3, (plan.model_times, ts)
    assert plan.nfe == len(ts)

    # the model: a fixed function of diffusers' timestep (grid="timesteps") or of the step's noise level
    def model_fn(x_in, t, i):
        if case.grid == "timesteps":
            tt = float(t)
            return prediction_output(GM, x_in, vp.alpha(tt), vp.sigma(tt), fd_pred)
        s = float(scheduler.sigmas[i])
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        return prediction_output(GM, x_in, alpha, s * alpha, fd_pred)

    noises = None
    if case.noise is not None:
        assert plan.num_stages == len(ts), "stochastic comparisons need one stage per diffusers step"
        noises = [z if d >= 0 else _distinct_noise(i, torch.float32)
                  for i, (z, d) in enumerate(zip(stage_noises(plan, torch.float32), plan.draw))]
    else:
        assert plan.num_draws == 1, "a deterministic plan drew noise"
    x_start, ref = run_diffusers(case.cls(**case.config), n, model_fn, noises, case.noise, case.step_kwargs,
                                 monkeypatch)

    # fastdiff's state is x = alpha y for the Euler-type schedulers (their sample is y = x / alpha)
    scale_in = plan.alphas[0] if case.space == "y" else 1.0
    scale_out = plan.alphas[-1] if case.space == "y" else 1.0
    got = fastdiff.sample(schedule_model(GM, vp, fd_pred), plan, x_T=x_start * scale_in, seeds=SEEDS,
                          backend="torch")
    assert got.dtype == ref.dtype == torch.float32
    assert_close(f"diffusers {name} n={n}", got, ref * scale_out, FP32_RTOL, record_property)


# ---------------------------------------------------------------------------------------------------------------
# FlowMatchEuler vs RectifiedFlow (model time = diffusers' timestep / 1000, flow-velocity prediction)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("shift", FLOW_SHIFTS)
def test_flow_match_euler_matches_diffusers(shift, n, record_property):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(n)
    sched = fastdiff.schedules.RectifiedFlow(shift=shift)
    ts = scheduler.timesteps.double().numpy() / 1000.0
    assert np.allclose(ts, scheduler.sigmas[:-1].double().numpy(), rtol=1e-6)
    plan = fastdiff.plan("flow_euler", sched, prediction="flow", timesteps=ts, final="zero")

    def model_fn(x_in, t, i):
        tt = float(t) / 1000.0  # diffusers' timestep is sigma * 1000
        return prediction_output(GM, x_in, 1.0 - tt, tt, "flow")

    x_start, ref = run_diffusers(scheduler, n, model_fn)
    got = fastdiff.sample(schedule_model(GM, sched, "flow"), plan, x_T=x_start, seeds=SEEDS, backend="torch")
    assert_close(f"diffusers FlowMatchEuler shift={shift} n={n}", got, ref, FP32_RTOL, record_property)


FLOW_DOUBLE_SHIFT = (
    "spacing difference, not a solver one: diffusers (like SD3's reference sampler) takes sigma_min = "
    "shift(1/1000), spaces linspace(1, sigma_min) and then applies the shift again, so the low end is shifted twice "
    "(n = 5, shift 3: last sigma 0.0089); fastdiff's RectifiedFlow(shift) warps its uniform spacing on [t_min, 1] "
    "once (last 0.0030). Identical for shift = 1; pass timesteps=scheduler.sigmas[:-1] to reproduce diffusers.")


@pytest.mark.parametrize("shift", [1.0, pytest.param(3.0, marks=pytest.mark.xfail(strict=True,
                                                                                    reason=FLOW_DOUBLE_SHIFT))])
def test_flow_shifted_spacing_matches_diffusers(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(5)
    ours = fastdiff.timesteps(fastdiff.schedules.RectifiedFlow(shift=shift), 5, "uniform", final="zero")
    ref = scheduler.sigmas.double().numpy()
    print(f"[peer] FlowMatch shift={shift}: diffusers {np.round(ref, 5)} fastdiff {np.round(ours, 5)}")
    assert np.allclose(ours, ref, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Spacings: fastdiff's named discrete spacings reproduce diffusers' timesteps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS + (3, 7, 50))
@pytest.mark.parametrize("cls, spacing, offset", [
    (DDIMScheduler, "leading", 1), (DDIMScheduler, "leading", 0), (DDIMScheduler, "trailing", 0),
    (DDPMScheduler, "leading", 0), (EulerDiscreteScheduler, "trailing", 0), (EulerDiscreteScheduler, "linspace", 0),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_named_spacing_matches_diffusers(cls, spacing, offset, n):
    """fastdiff.timesteps(..., spacing) gives diffusers' timesteps (Euler's fractional "linspace" too; DDIM's
    "linspace" rounds to integers and DPMSolver/UniPC's "linspace" drops t = 0 of n + 1 points, so those differ
    by design and are passed as ``timesteps=``)."""
    scheduler = cls(**SD, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(n)
    ours = fastdiff.timesteps(_fastdiff_vp(scheduler), n, spacing, steps_offset=offset)[:-1]
    ref = scheduler.timesteps.double().numpy()
    assert np.allclose(ours, ref, rtol=1e-6, atol=0), (ours, ref)
