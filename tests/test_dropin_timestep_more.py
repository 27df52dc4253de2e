"""fastdiff's diffusers drop-ins DEIS, iPNDM, TCD, FlowMatchHeun, PNDM and SA-Solver against stock diffusers run
side by side on the same inputs (the exact Gaussian-mixture denoiser of ``peers.py``): full loops over configs,
per-sample step tensors, stateless ``state=`` runs and generator noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peers import FP32_RTOL, assert_close, prediction_output
from test_integration_diffusers import GM, LINEAR, SD, model_fn, x_start

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword",
                                        "ignore::FutureWarning", "ignore::UserWarning")
import fastdiff.integrations.diffusers as fdd  # noqa: E402


def model(scheduler, x, t):
    """The model both sides call: the mixture denoiser at the noise level the scheduler's timestep names."""
    if isinstance(scheduler, diffusers.IPNDMScheduler):  # a v-model on alpha = cos(pi t / 2), sigma = sin(pi t / 2)
        a, s = np.cos(np.pi * float(t) / 2), np.sin(np.pi * float(t) / 2)
        return prediction_output(GM, x.double(), max(a, 0.0), s, "v").to(x.dtype)
    if isinstance(scheduler, diffusers.FlowMatchHeunDiscreteScheduler):  # a velocity model on x = (1 - s) x0 + s n
        s = float(t) / scheduler.config.num_train_timesteps
        return prediction_output(GM, x.double(), 1.0 - s, s, "flow").to(x.dtype)
    return model_fn(scheduler, x, t)


def loop(scheduler, n, x_T, seed=7, state=None, seeds=None, set_kwargs=None, **step_kwargs):
    """diffusers' standard loop; a generator of ``seed`` where ``step`` takes one (unless ``seeds`` is given)."""
    scheduler.set_timesteps(n, **(set_kwargs or {}))
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    g = torch.Generator().manual_seed(seed)
    if seeds is None and "generator" in scheduler.step.__code__.co_varnames:
        step_kwargs["generator"] = g
    if state is not None:
        step_kwargs["state"] = state(scheduler)
    if seeds is not None:
        step_kwargs["seeds"] = seeds
    for t in scheduler.timesteps:
        scale = getattr(scheduler, "scale_model_input", None)
        xin = scale(x, t) if scale is not None else x
        x = scheduler.step(model(scheduler, xin, t), t, x, **step_kwargs).prev_sample
    return x


def pair(name, config):
    stock = getattr(diffusers, name)(**config)
    ours = getattr(fdd, name).from_config(stock.config)
    assert type(ours).__name__ == name and isinstance(ours, getattr(diffusers, name))
    return stock, ours


def check_parity(name, config, steps, **kw):
    for n in steps:
        stock, ours = pair(name, config)
        x_T = x_start()
        assert_close(f"{name} {config} n={n}", loop(ours, n, x_T, **kw), loop(stock, n, x_T, **kw), FP32_RTOL)


# -- DEIS ---------------------------------------------------------------------------------------------------------

DEIS_CASES = [
    (dict(SD), (1, 2, 5, 16)),
    (dict(SD, solver_order=3), (4, 12)),
    (dict(SD, solver_order=1, timestep_spacing="leading", steps_offset=1), (5,)),
    (dict(SD, solver_order=3, lower_order_final=False, use_karras_sigmas=True), (6,)),
    (dict(SD, use_exponential_sigmas=True, prediction_type="v_prediction"), (5,)),
    (dict(LINEAR, use_beta_sigmas=True, prediction_type="sample", timestep_spacing="trailing"), (5,)),
    (dict(SD, prediction_type="sample", thresholding=True, sample_max_value=1.2), (5,)),
    (dict(SD, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), (6,)),
]


@pytest.mark.parametrize("config,steps", DEIS_CASES)
def test_deis_matches_diffusers(config, steps):
    check_parity("DEISMultistepScheduler", config, steps)


def test_deis_logrho_weights_integrate_the_lagrange_basis_in_log_rho():
    """The closed forms against Simpson's rule on the Lagrange basis written here."""
    from fastdiff.solvers.adams import deis_logrho_weights

    rho = [14.6, 5.2, 1.9, 0.7]
    for i, o in ((0, 1), (1, 2), (2, 3)):
        nodes = [np.log(rho[i - k]) for k in range(o)]
        r = np.linspace(rho[i], rho[i + 1], 20001)
        for j, c in enumerate(deis_logrho_weights(rho, i, o)):
            basis = np.ones_like(r)
            for k in range(o):
                if k != j:
                    basis = basis * (np.log(r) - nodes[k]) / (nodes[j] - nodes[k])
            h = r[1] - r[0]
            simpson = h / 3 * (basis[0] + basis[-1] + 4 * basis[1:-1:2].sum() + 2 * basis[2:-1:2].sum())
            assert abs(c - simpson) < 1e-9 * max(1.0, abs(simpson)), (i, o, j, c, simpson)


# -- iPNDM --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_ipndm_matches_diffusers(n):
    check_parity("IPNDMScheduler", dict(num_train_timesteps=1000), (n,))


def test_ipndm_second_loop_continues_the_history_like_diffusers():
    """diffusers keeps its ets list across a reset of the step index: the second loop starts at order 4."""
    stock, ours = pair("IPNDMScheduler", dict(num_train_timesteps=1000))
    x_T = x_start()
    res = []
    for s in (stock, ours):
        s.set_timesteps(4)
        x = x_T.clone()
        for _ in range(2):
            s._step_index = None
            for t in s.timesteps[1:]:  # from the second timestep: alpha > 0 at the start of each loop
                x = s.step(model(s, x, t), t, x).prev_sample
        res.append(x)
    assert_close("ipndm two loops", res[1], res[0], FP32_RTOL)


# -- TCD ----------------------------------------------------------------------------------------------------------

TCD_CASES = [
    (dict(SD), (1, 4), {}),
    (dict(SD), (8,), {"eta": 0.0}),
    (dict(SD, prediction_type="v_prediction", timestep_spacing="trailing"), (6,), {"eta": 0.7}),
    (dict(LINEAR, prediction_type="sample", original_inference_steps=20), (5,), {"eta": 1.0}),
    (dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), (4,), {}),
    (dict(SD, clip_sample=True, clip_sample_range=0.5), (4,), {}),  # diffusers' TCD step ignores clip_sample
]


@pytest.mark.parametrize("config,steps,kw", TCD_CASES)
def test_tcd_matches_diffusers(config, steps, kw):
    check_parity("TCDScheduler", config, steps, **kw)


def test_tcd_pred_noised_sample_and_float32_floor_match_diffusers():
    """Timesteps 170 and 90 with eta 0.3: diffusers' float32 (1 - eta) t' floors to 119 and 63 (float64: 118, 62)."""
    stock, ours = pair("TCDScheduler", dict(SD))
    x_T = x_start()
    res = []
    for s in (stock, ours):
        s.set_timesteps(timesteps=[250, 170, 90, 10])
        x, g, steps = x_T.clone(), torch.Generator().manual_seed(1), []
        for t in s.timesteps:
            o = s.step(model(s, x, t), t, x, 0.3, g)
            steps.append((o.prev_sample, o.pred_noised_sample))
            x = o.prev_sample
        res.append(steps)
    for k, ((x, xs), (rx, rxs)) in enumerate(zip(res[1], res[0])):
        assert_close(f"tcd step {k}", x, rx, FP32_RTOL)
        assert_close(f"tcd step {k} pred_noised_sample", xs, rxs, FP32_RTOL)


# -- FlowMatchHeun -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,steps", [(dict(num_train_timesteps=1000), (1, 2, 6)),
                                          (dict(num_train_timesteps=1000, shift=3.0), (5,))])
def test_flow_match_heun_matches_diffusers(config, steps):
    check_parity("FlowMatchHeunDiscreteScheduler", config, steps)


def test_flow_match_heun_from_the_middle_with_set_begin_index():
    stock, ours = pair("FlowMatchHeunDiscreteScheduler", dict(num_train_timesteps=1000, shift=2.0))
    x_T = x_start()
    res = []
    for s in (stock, ours):
        s.set_timesteps(6)
        s.set_begin_index(4)
        x = x_T.clone()
        for t in s.timesteps[4:]:
            x = s.step(model(s, x, t), t, x).prev_sample
        res.append(x)
    assert_close("flow heun from step 4", res[1], res[0], FP32_RTOL)


# -- PNDM ---------------------------------------------------------------------------------------------------------

PNDM_CASES = [
    (dict(SD, skip_prk_steps=True), (1, 2, 6)),
    (dict(LINEAR), (5, 10)),
    (dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", skip_prk_steps=True), (7,)),
    (dict(LINEAR, prediction_type="v_prediction", set_alpha_to_one=False), (8,)),
    (dict(SD, timestep_spacing="leading", steps_offset=1), (6,)),
]


@pytest.mark.parametrize("config,steps", PNDM_CASES)
def test_pndm_matches_diffusers(config, steps):
    check_parity("PNDMScheduler", config, steps)


def test_pndm_step_prk_then_step_plms_match_diffusers():
    """diffusers' own loop over prk_timesteps with step_prk and plms_timesteps with step_plms, plus a call of
    step_plms at a timestep off the schedule (a one-row program)."""
    stock, ours = pair("PNDMScheduler", dict(LINEAR))
    x_T = x_start()
    res = []
    for s in (stock, ours):
        s.set_timesteps(7)
        x = x_T.clone()
        for t in s.prk_timesteps:
            x = s.step_prk(model(s, x, t), t, x).prev_sample
        for t in s.plms_timesteps[:-1]:
            x = s.step_plms(model(s, x, t), t, x).prev_sample
        x = s.step_plms(model(s, x, 37), 37, x).prev_sample
        res.append(x)
    assert_close("pndm prk / plms", res[1], res[0], FP32_RTOL)


def test_pndm_step_plms_before_the_runge_kutta_steps_raises_like_diffusers():
    for s in pair("PNDMScheduler", dict(LINEAR)):
        s.set_timesteps(5)
        x = x_start()
        with pytest.raises(ValueError, match="prk"):
            s.step_plms(x, 1, x)


# -- SA-Solver ----------------------------------------------------------------------------------------------------


def _tau_zero(t):
    return 0


SA_CASES = [
    (dict(LINEAR), (1, 2, 5, 10)),
    (dict(SD, predictor_order=3, corrector_order=4), (8,)),
    (dict(SD, predictor_order=4, corrector_order=3, lower_order_final=False, timestep_spacing="trailing"), (7,)),
    (dict(SD, algorithm_type="noise_prediction", predictor_order=3), (6,)),
    (dict(SD, algorithm_type="noise_prediction", prediction_type="sample"), (5,)),
    (dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), (6,)),
    (dict(SD, use_exponential_sigmas=True, prediction_type="sample", thresholding=True, sample_max_value=1.2), (5,)),
    (dict(SD, predictor_order=1, corrector_order=1), (5,)),
    (dict(LINEAR, tau_func=_tau_zero), (6,)),  # the ODE: no noise
    (dict(SD, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), (6,)),
]


@pytest.mark.parametrize("config,steps", SA_CASES)
def test_sa_solver_matches_diffusers(config, steps):
    check_parity("SASolverScheduler", config, steps)


def test_sa_solver_from_set_begin_index_matches_diffusers():
    stock, ours = pair("SASolverScheduler", dict(SD, predictor_order=3, corrector_order=3))
    x_T = x_start()
    res = []
    for s in (stock, ours):
        s.set_timesteps(8)
        s.set_begin_index(3)
        x, g = x_T.clone(), torch.Generator().manual_seed(2)
        for t in s.timesteps[3:]:
            x = s.step(model(s, x, t), t, x, generator=g).prev_sample
        res.append(x)
    assert_close("sa-solver from step 3", res[1], res[0], FP32_RTOL)


# -- per-sample steps and stateless use, every class ----------------------------------------------------------------

PER_SAMPLE = [
    ("DEISMultistepScheduler", dict(SD, solver_order=3)),
    ("IPNDMScheduler", dict(num_train_timesteps=1000)),
    ("TCDScheduler", dict(SD)),
    ("FlowMatchHeunDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
    ("PNDMScheduler", dict(LINEAR)),
    ("PNDMScheduler", dict(SD, skip_prk_steps=True)),
    ("SASolverScheduler", dict(SD, predictor_order=3, corrector_order=4)),
]


def _alone(name, config, x_T, n, b):
    return loop(getattr(fdd, name)(**config), n, x_T, seeds=[b])


UNIQUE_TIMESTEPS = {"DEISMultistepScheduler", "IPNDMScheduler", "TCDScheduler", "SASolverScheduler"}


@pytest.mark.parametrize("name,config,by", [(n, c, "step_index") for n, c in PER_SAMPLE]
                         + [(n, c, "timestep") for n, c in PER_SAMPLE if n in UNIQUE_TIMESTEPS])
def test_per_sample_steps_equal_each_sample_alone(name, config, by):
    """Sample b starts ``offsets[b]`` calls late; one step call serves all (``step_index`` [B] or, where the
    timesteps name the steps, ``timestep`` [B]; one state)."""
    s = getattr(fdd, name)(**config)
    n, offsets = 5, [0, 2, 1]
    x_T = x_start()
    s.set_timesteps(n)
    ts, B = s.timesteps, x_T.shape[0]
    st = s.new_state()
    x = x_T * getattr(s, "init_noise_sigma", 1.0)
    done = [None] * B
    for tick in range(len(ts) + max(offsets)):
        idx = [tick - o for o in offsets]
        k = torch.tensor([min(max(i, 0), len(ts) - 1) for i in idx])
        t = ts[k]
        scale = getattr(s, "scale_model_input", None)
        xin = scale(x, t, step_index=k) if scale is not None else x
        out = torch.cat([model(s, xin[b:b + 1], t[b]) for b in range(B)])
        where = dict(step_index=k) if by == "step_index" else {}
        new = s.step(out, t, x, seeds=list(range(B)), state=st, **where).prev_sample
        for b in range(B):
            if 0 <= idx[b] < len(ts):
                x[b] = new[b]
                if idx[b] == len(ts) - 1:
                    done[b] = x[b].clone()
    for b in range(B):
        alone = _alone(name, config, x_T[b:b + 1], n, b)
        assert torch.allclose(done[b][None], alone, rtol=1e-5, atol=1e-5), (b, (done[b] - alone[0]).abs().max())


@pytest.mark.parametrize("name,config", PER_SAMPLE)
def test_stateless_run_equals_stock_and_leaves_the_scheduler_alone(name, config):
    stock, ours = pair(name, config)
    x_T = x_start()
    got = loop(ours, 6, x_T, state=lambda s: s.new_state())
    assert_close(f"{name} state=", got, loop(stock, 6, x_T), FP32_RTOL)
    counter = "counter" if isinstance(ours, diffusers.PNDMScheduler) else "step_index"
    assert getattr(ours, counter) in (None, 0)  # the scheduler's own counter was never touched


def test_flow_match_heun_refuses_integer_timesteps_like_diffusers():
    for s in pair("FlowMatchHeunDiscreteScheduler", dict(num_train_timesteps=1000)):
        s.set_timesteps(4)
        x = x_start()
        with pytest.raises(ValueError, match="integer indices"):
            s.step(x, 0, x)


@pytest.mark.parametrize("name,config", [("DEISMultistepScheduler", dict(SD)), ("SASolverScheduler", dict(SD)),
                                         ("TCDScheduler", dict(SD)), ("PNDMScheduler", dict(LINEAR))])
def test_add_noise_matches_diffusers(name, config):
    stock, ours = pair(name, config)
    x0, noise = x_start(), x_start().flip(0)
    for s in (stock, ours):
        s.set_timesteps(6)
    t = stock.timesteps[[0, 3, 5]]
    assert_close(f"{name} add_noise", ours.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), FP32_RTOL)


def test_ipndm_has_no_add_noise_like_diffusers():
    """diffusers' IPNDMScheduler has no add_noise; the drop-in must not offer one that fails on a missing table."""
    ours = fdd.IPNDMScheduler()
    assert not hasattr(diffusers.IPNDMScheduler(), "add_noise")
    assert not hasattr(ours, "add_noise")
    with pytest.raises(AttributeError, match="has no attribute 'add_noise'"):
        ours.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1]))
