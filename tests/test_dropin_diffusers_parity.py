"""fastdiff's diffusers drop-ins on the corners diffusers' own scheduler tests exercise, each against stock diffusers
run side by side on the same inputs: repeated final sigmas, repeated and off-schedule timesteps, Heun from the middle
of its schedule, underflowed alpha_bar tables, log-linear sigmas, step before set_timesteps, pred_original_sample,
explicit timesteps / sigmas / mu, learned-variance outputs and thresholds below 1.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from peers import FP32_RTOL, assert_close
from test_integration_diffusers import LINEAR, SD, both, model_fn, x_start

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword",
                                        "ignore::FutureWarning", "ignore::UserWarning")
import fastdiff.integrations.diffusers as fdd  # noqa: E402


def pair(name, **config):
    stock = getattr(diffusers, name)(**config)
    return stock, getattr(fdd, name).from_config(stock.config)


def outputs(scheduler, timesteps, x, seed=5, **step_kwargs):
    """(prev_sample, pred_original_sample) of each step of a loop over ``timesteps`` (no set_timesteps here)."""
    g = torch.Generator().manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = g
    res = []
    for t in timesteps:
        scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
        out = model_fn(scheduler, scale(x, t), t)
        o = scheduler.step(out, t, x, **step_kwargs)
        res.append((o.prev_sample, getattr(o, "pred_original_sample", None)))
        x = o.prev_sample
    return res


def assert_same_outputs(label, got, ref, check_x0=True):
    assert len(got) == len(ref)
    for k, ((x, x0), (rx, rx0)) in enumerate(zip(got, ref)):
        assert_close(f"{label} step {k}", x, rx, FP32_RTOL)
        if check_x0:
            assert (x0 is None) == (rx0 is None), f"{label} step {k}: pred_original_sample {x0 is None=}"
            if rx0 is not None:
                assert_close(f"{label} step {k} pred_original_sample", x0, rx0, FP32_RTOL)


# -- final_sigmas_type="sigma_min" on Karras / exponential / beta / Lu sigmas: the last sigma repeats -------------

SIGMA_MIN_CASES = [
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True), (6, 16)),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True, solver_order=3), (7,)),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True, lower_order_final=False), (6,)),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True, prediction_type="v_prediction"), (7,)),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"), (6,)),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, algorithm_type="dpmsolver"), (6,)),
    ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True, solver_order=3), (7,)),
    ("UniPCMultistepScheduler", dict(use_karras_sigmas=True), (6, 16)),
    ("UniPCMultistepScheduler", dict(use_exponential_sigmas=True, solver_order=3), (7,)),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True), (6,)),
]


@pytest.mark.parametrize("name,config,n", [(c, cfg, n) for c, cfg, ns in SIGMA_MIN_CASES for n in ns])
def test_repeated_final_sigma_matches_diffusers(name, config, n):
    got, ref = both(name, dict(SD, final_sigmas_type="sigma_min", **config), n)
    assert_close(f"{name} {config} n={n}", got, ref, FP32_RTOL)


# -- a timestep that rounding repeats: DPM-Solver's set_timesteps(1000) -----------------------------------------


def test_repeated_timestep_is_a_still_step_where_diffusers_turns_nan():
    stock, ours = pair("DPMSolverMultistepScheduler", **SD)
    for s in (stock, ours):
        s.set_timesteps(1000)
    ts = stock.timesteps
    rep = int(np.flatnonzero(np.diff(ts.numpy()) == 0)[0])  # ts[rep] == ts[rep + 1]: step rep has length 0
    x = x_start()
    steps = ts[: rep + 3]
    got, ref = outputs(ours, steps, x), outputs(stock, steps, x)
    assert_same_outputs("DPM 2M to the repeat", got[: rep + 1], ref[: rep + 1])
    assert torch.equal(got[rep][0], got[rep - 1][0])  # the zero-length step leaves x as is
    assert not torch.isfinite(ref[rep + 1][0]).all()  # diffusers' next step divides by the zero length
    assert torch.isfinite(got[rep + 1][0]).all() and torch.isfinite(got[rep + 2][0]).all()


# -- timesteps off the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_from_any_timestep_to_t_minus_stride(eta):
    stock, ours = pair("DDIMScheduler", **SD, clip_sample=False)
    for s in (stock, ours):
        s.set_timesteps(10)
    x = x_start()
    for t in (1, 10, 49, 999):
        got = outputs(ours, [t], x, eta=eta)
        ref = outputs(stock, [t], x, eta=eta)
        assert_same_outputs(f"DDIM t={t}", got, ref)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                  "UniPCMultistepScheduler"])
def test_multistep_off_schedule_timestep_is_the_last_step(name):
    stock, ours = pair(name, **SD)
    for s in (stock, ours):
        s.set_timesteps(8)
    x = x_start()
    assert_same_outputs(name, outputs(ours, [3], x), outputs(stock, [3], x))


def test_heun_from_the_middle_of_its_schedule_without_set_begin_index():
    """img2img: timesteps[2 j:] starts on the second call of t_j, the occurrence diffusers' lookup takes."""
    for k in (2, 4):
        stock, ours = pair("HeunDiscreteScheduler", **SD)
        for s in (stock, ours):
            s.set_timesteps(6)
        ts = stock.timesteps[k:]
        x = stock.add_noise(x_start(), x_start().flip(0), ts[:1])
        assert_same_outputs(f"Heun from {k}", outputs(ours, ts, x), outputs(stock, ts, x))


# -- schedules diffusers builds that the plan could not take before ------------------------------------------------


def test_underflowed_alpha_bar_table_steps_like_diffusers():
    config = dict(LINEAR, beta_start=0.01, beta_end=0.2, clip_sample=False,  # float32 alpha_bar reaches 0
                  timestep_spacing="trailing")
    stock, ours = pair("DDIMScheduler", **config)
    assert float(stock.alphas_cumprod[-1]) == 0.0
    for s in (stock, ours):
        s.set_timesteps(10)
    x = x_start()
    tail = stock.timesteps[-3:]
    assert_same_outputs("DDIM low t", outputs(ours, tail, x), outputs(stock, tail, x))


def test_step_where_alpha_bar_has_no_data_estimate_raises_where_diffusers_returns_nan():
    stock, ours = pair("DDPMScheduler", **dict(LINEAR, beta_start=0.1, beta_end=2.0), clip_sample=False)  # alphas < 0
    x = x_start()
    tail = stock.timesteps[-2:]
    assert_same_outputs("DDPM low t", outputs(ours, tail, x), outputs(stock, tail, x))
    with pytest.raises(ValueError, match="cannot step from timestep 999"):
        ours.step(x, 999, x)


def test_euler_log_linear_sigmas_match_diffusers():
    got, ref = both("EulerDiscreteScheduler", dict(SD, interpolation_type="log_linear"), 7)
    assert_close("Euler log_linear", got, ref, FP32_RTOL)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_step_before_set_timesteps_runs_on_the_training_schedule(name):
    stock, ours = pair(name, **SD, **({"clip_sample": False} if name == "DDPMScheduler" else {}))
    ts = stock.timesteps[-3:]
    x = x_start()
    assert_same_outputs(name, outputs(ours, ts, x), outputs(stock, ts, x))


# -- what step returns ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", [
    ("DDIMScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing")),
    ("DDPMScheduler", dict(SD, clip_sample=False)),
    ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction")),
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(SD)),
])
def test_pred_original_sample_and_tuple_match_diffusers(name, config):
    stock, ours = pair(name, **config)
    for s in (stock, ours):
        s.set_timesteps(4)
    x = x_start()
    assert_same_outputs(name, outputs(ours, ours.timesteps, x), outputs(stock, stock.timesteps, x))
    for s in (stock, ours):
        s.set_timesteps(4)
    t = stock.timesteps[0]
    out = model_fn(stock, stock.scale_model_input(x, t), t)
    ours.scale_model_input(x, t)
    kw = lambda: {"generator": torch.Generator().manual_seed(2)} if name in ("DDPMScheduler",  # noqa: E731
                                                                              "EulerAncestralDiscreteScheduler") else {}
    ref, got = stock.step(out, t, x, return_dict=False, **kw()), ours.step(out, t, x, return_dict=False, **kw())
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert_close(f"{name} tuple", a, b, FP32_RTOL)


@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_last_step_on_alpha_bar_0_clips_like_diffusers(use_clipped):
    """set_alpha_to_one=False with the last timestep 0: diffusers steps from alpha_bar[0] to itself."""
    stock, ours = pair("DDIMScheduler", **SD, set_alpha_to_one=False, clip_sample=True, clip_sample_range=0.5,
                       timestep_spacing="leading")
    for s in (stock, ours):
        s.set_timesteps(5)
    assert int(stock.timesteps[-1]) == 0
    x = 3.0 * x_start()
    kw = dict(use_clipped_model_output=use_clipped)
    assert_same_outputs("DDIM", outputs(ours, stock.timesteps, x, **kw), outputs(stock, stock.timesteps, x, **kw))


# -- set_timesteps' own parameters: diffusers' retrieve_timesteps accepts the drop-ins ---------------------------


@pytest.mark.parametrize("name", fdd.__all__[:-1])
def test_set_timesteps_has_diffusers_signature(name):
    ours, stock = getattr(fdd, name), getattr(diffusers, name)
    assert inspect.signature(ours.set_timesteps) == inspect.signature(stock.set_timesteps)


@pytest.mark.parametrize("name,config,kwargs", [
    ("EulerDiscreteScheduler", SD, dict(timesteps=[999, 700, 400, 150, 20])),
    ("EulerDiscreteScheduler", SD, dict(sigmas=[14.6, 6.0, 2.5, 0.9, 0.2, 0.0])),
    ("DPMSolverMultistepScheduler", SD, dict(timesteps=[999, 800, 600, 300, 100, 10])),
    ("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, use_dynamic_shifting=True),
     dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1], mu=0.7)),
])
def test_explicit_timesteps_sigmas_mu_drive_the_dropins_like_diffusers(name, config, kwargs):
    """What diffusers' retrieve_timesteps does once the signature shows the parameter (FluxPipeline: sigmas=)."""
    stock, ours = pair(name, **config)
    for s in (stock, ours):
        assert set(kwargs) <= set(inspect.signature(s.set_timesteps).parameters)
        s.set_timesteps(device="cpu", **kwargs)
    assert torch.equal(ours.timesteps, stock.timesteps)
    x = x_start()
    assert_same_outputs(name, outputs(ours, ours.timesteps, x), outputs(stock, stock.timesteps, x))


# -- model outputs diffusers reads only in part, thresholds below 1 -----------------------------------------------


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"])
def test_learned_variance_output_uses_its_first_three_channels_like_diffusers(name):
    stock, ours = pair(name, **SD, variance_type="learned_range")
    for s in (stock, ours):
        s.set_timesteps(5)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for t in stock.timesteps:
        out = torch.cat([0.3 * x + 0.1, torch.randn_like(x)], dim=1)  # mean and variance channels
        ref = stock.step(out, t, x).prev_sample
        got = ours.step(out, t, x).prev_sample
        assert_close(f"{name} t={int(t)}", got, ref, FP32_RTOL)
        x = ref


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_dynamic_thresholding_with_sample_max_value_below_one(name):
    got, ref = both(name, dict(SD, thresholding=True, sample_max_value=0.6, prediction_type="sample"), 5)
    assert_close(f"{name} sample_max_value=0.6", got, ref, FP32_RTOL)


# -- use_flow_sigmas: diffusers' multistep solvers on flow times (alpha = 1 - sigma) ------------------------------


@pytest.mark.parametrize("name,config", [
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, use_karras_sigmas=True, solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0)),
    ("DPMSolverSinglestepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction")),
])
def test_flow_sigmas_match_diffusers(name, config):
    from peers import GaussianMixture, prediction_output

    gm = GaussianMixture(dim=32)
    pred = {"epsilon": "epsilon", "flow_prediction": "flow"}[config.get("prediction_type", "epsilon")]
    results = []
    for mod in (diffusers, fdd):
        s = getattr(mod, name)(**SD, **config)
        s.set_timesteps(7)
        x = x_start()
        for k, t in enumerate(s.timesteps):
            sig = float(s.sigmas[k])  # the model at diffusers' flow time (a fixed function of the step on both sides)
            out = prediction_output(gm, x.double(), 1.0 - sig, sig, pred).to(x.dtype)
            x = s.step(out, t, x).prev_sample
        results.append(x)
    assert_close(f"{name} {config}", results[1], results[0], FP32_RTOL)
