"""fastdiff's drop-ins for diffusers' LMS, KDPM2, KDPM2 ancestral, DPMSolverSDE, EDM Euler and EDM DPM-Solver
multistep, each run side by side with the stock class on the same inputs (exact Gaussian-mixture denoiser as the
model): full loops over configs and dtypes, per-sample steps, stateless use, generator noise, the Brownian tree
noise's law, and the options refused on purpose.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from peers import FP32_RTOL, assert_close
from test_integration_diffusers import GM, LINEAR, SD, assert_threads_equal_sequential, model_fn, run_loop, x_start

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword",
                                        "ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")  # numpy 2 on diffusers' _sigma_to_t
import fastdiff.integrations.diffusers as fdd  # noqa: E402

EDM_NAMES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
_MADE: dict = {}


def make(package, name, **config):
    """A fresh scheduler: a copy of one constructed once per class and config (the KDPM2 family's and DPMSolverSDE's
    __init__ runs set_timesteps over all training timesteps, about a second)."""
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde (in the test extra)")
    key = (package.__name__, name, repr(sorted(config.items())))
    if key not in _MADE:
        _MADE[key] = getattr(package, name)(**config)
    return copy.deepcopy(_MADE[key])


def pair(name, **config):
    stock, ours = make(diffusers, name, **config), make(fdd, name, **config)
    assert type(ours).__name__ == name and isinstance(ours, getattr(diffusers, name))
    assert dict(ours.config) == dict(stock.config)
    return stock, ours


def edm_model(scheduler, x_in, t):
    """EDM's raw network output F for the exact denoiser: x_in = c_in x, D = c_skip x + c_out F, sigma = e^{4 t}
    (diffusers' c_noise = log(sigma) / 4), written here from Karras et al. 2022, Table 1."""
    sd = float(scheduler.config.sigma_data)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    sigma = torch.exp(4.0 * t).expand(x_in.shape[0]).reshape((-1,) + (1,) * (x_in.dim() - 1))
    norm = torch.sqrt(sigma**2 + sd**2)
    x = x_in.double() * norm  # c_in = 1 / norm
    D = GM.denoise(x, 1.0, sigma.reshape(-1))
    c_out = sigma * sd / norm * (-1.0 if scheduler.config.prediction_type == "v_prediction" else 1.0)
    return ((D - (sd**2 / norm**2) * x) / c_out).to(x_in.dtype)


def model_of(scheduler):
    return edm_model if type(scheduler).__name__ in EDM_NAMES else model_fn


def loop(scheduler, n, x_T, step_kwargs=None, seed=7):
    """run_loop with the EDM model where the scheduler is an EDM one; the final sample."""
    if type(scheduler).__name__ not in EDM_NAMES:
        return run_loop(scheduler, n, x_T, seed=seed, step_kwargs=step_kwargs)
    scheduler.set_timesteps(n)
    x = x_T * scheduler.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        out = edm_model(scheduler, scheduler.scale_model_input(x, t), t)
        kw = dict(step_kwargs or {})
        if "generator" in scheduler.step.__code__.co_varnames:
            kw["generator"] = g
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


def both(name, config, n, dtype=torch.float32, step_kwargs=None):
    stock, ours = pair(name, **config)
    x_T = x_start().to(dtype)
    return loop(ours, n, x_T, step_kwargs), loop(stock, n, x_T, step_kwargs)


CASES = [
    # (class, config, steps)
    ("LMSDiscreteScheduler", dict(SD), (1, 5, 12)),
    ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), (7,)),
    ("LMSDiscreteScheduler", dict(LINEAR, timestep_spacing="trailing", use_exponential_sigmas=True), (6,)),
    ("LMSDiscreteScheduler", dict(SD, use_beta_sigmas=True, prediction_type="sample",
                                  timestep_spacing="leading", steps_offset=1), (6,)),
    ("KDPM2DiscreteScheduler", dict(SD), (1, 4, 9)),
    ("KDPM2DiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), (5,)),
    ("KDPM2DiscreteScheduler", dict(LINEAR, timestep_spacing="trailing", use_exponential_sigmas=True), (5,)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD), (1, 4, 9)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction",
                                             timestep_spacing="trailing"), (5,)),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=0), (1, 4, 8)),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=3, use_karras_sigmas=True,
                                   prediction_type="v_prediction"), (5,)),
    ("DPMSolverSDEScheduler", dict(LINEAR, noise_sampler_seed=1, timestep_spacing="leading",
                                   use_beta_sigmas=True), (5,)),
    ("EDMEulerScheduler", dict(), (1, 5, 12)),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", prediction_type="v_prediction"), (6,)),
    ("EDMEulerScheduler", dict(final_sigmas_type="sigma_min", rho=5.0, sigma_data=0.7), (6,)),
    ("EDMDPMSolverMultistepScheduler", dict(), (1, 5, 12, 20)),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction"), (4, 9)),
    ("EDMDPMSolverMultistepScheduler", dict(solver_type="heun", final_sigmas_type="sigma_min"), (7,)),
    ("EDMDPMSolverMultistepScheduler", dict(lower_order_final=False, final_sigmas_type="sigma_min"), (7,)),
    ("EDMDPMSolverMultistepScheduler", dict(sigma_schedule="exponential", euler_at_final=True), (6,)),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), (5, 9)),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                            final_sigmas_type="sigma_min"), (6,)),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=1), (5,)),
    ("EDMDPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1.5, solver_order=3), (6,)),
]


@pytest.mark.parametrize("name,config,n", [(c, cfg, n) for c, cfg, ns in CASES for n in ns])
def test_full_loop_matches_diffusers(name, config, n, record_property):
    got, ref = both(name, config, n)
    assert_close(f"{name} {config} n={n}", got, ref, FP32_RTOL, record_property)


@pytest.mark.parametrize("name,config", [
    ("LMSDiscreteScheduler", dict(SD)), ("KDPM2DiscreteScheduler", dict(SD)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD)), ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=0)),
    ("EDMEulerScheduler", dict()), ("EDMDPMSolverMultistepScheduler", dict(solver_order=3)),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_match_diffusers(name, config, dtype):
    got, ref = both(name, config, 5, dtype=dtype)
    assert got.dtype == dtype
    # float64: diffusers' sigmas are float32 (and EDM Euler computes in float32); bf16: diffusers rounds every
    # intermediate to 8 bits
    tol = 1e-6 if dtype == torch.float64 else 0.1
    assert_close(f"{name} {dtype}", got.double(), ref.double(), tol)


def _float64_tables(scheduler):
    """diffusers' noise-level tables recomputed in float64 from its float32 base sigmas, as its set_timesteps forms
    them (KDPM2 ancestral: sigma_up / sigma_down / interpolated sigmas; LMS: the sigmas its Lagrange nodes use)."""
    if isinstance(scheduler, diffusers.LMSDiscreteScheduler):
        scheduler.sigmas = scheduler.sigmas.double()
        return
    b = scheduler.sigmas.double()[0::2]
    nxt = b.roll(-1)
    nxt[-1] = 0.0
    up = (nxt**2 * (b**2 - nxt**2) / b**2) ** 0.5
    down = (nxt**2 - up**2) ** 0.5
    down[-1] = 0.0
    mid = b.log().lerp(down.log(), 0.5).exp()
    mid[-2:] = 0.0

    def interleave(v):
        return torch.cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])

    scheduler.sigmas, scheduler.sigmas_up = interleave(b), interleave(up)
    scheduler.sigmas_down, scheduler.sigmas_interpol = interleave(down), interleave(mid)


@pytest.mark.parametrize("name", ["LMSDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_float64_run_equals_diffusers_formulas_in_float64(name):
    """In float64 the drop-in is diffusers' algorithm to ~1e-9 once diffusers' own tables are float64 too: its fp32
    differences to stock diffusers (a few 1e-7 of the data, which the checksums of diffusers' full-loop tests of
    these two classes can see) are float32 rounding, not arithmetic."""
    stock, ours = pair(name, **SD)
    res = []
    for s in (stock, ours):
        s.set_timesteps(6)
        if s is stock:
            _float64_tables(s)
        x, g = x_start().double() * s.init_noise_sigma, torch.Generator().manual_seed(2)
        kw = {"generator": g} if "generator" in s.step.__code__.co_varnames else {}
        for t in s.timesteps:
            x = s.step(model_fn(s, s.scale_model_input(x, t), t), t, x, **kw).prev_sample
        res.append(x)
    assert_close(f"{name} float64", res[1], res[0], 1e-8)


@pytest.mark.parametrize("name,config", [
    ("LMSDiscreteScheduler", dict(SD)), ("KDPM2DiscreteScheduler", dict(SD, prediction_type="v_prediction")),
    ("KDPM2AncestralDiscreteScheduler", dict(SD)), ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=0)),
    ("EDMEulerScheduler", dict()), ("EDMDPMSolverMultistepScheduler", dict()),
])
def test_each_step_and_pred_original_sample_match_diffusers(name, config):
    stock, ours = pair(name, **config)
    for s in (stock, ours):
        s.set_timesteps(4)
    xs = {}
    for label, s in (("ours", ours), ("stock", stock)):
        x, res = x_start() * s.init_noise_sigma, []
        g = torch.Generator().manual_seed(4)
        kw = {"generator": g} if "generator" in s.step.__code__.co_varnames else {}
        for t in s.timesteps:
            xin = s.scale_model_input(x, t)
            res.append((xin, s.step(model_of(s)(s, xin, t), t, x, **kw)))
            x = res[-1][1].prev_sample
        xs[label] = res
    for k, ((xin, o), (rxin, r)) in enumerate(zip(xs["ours"], xs["stock"])):
        assert_close(f"{name} step {k} scale_model_input", xin, rxin, FP32_RTOL)
        assert_close(f"{name} step {k}", o.prev_sample, r.prev_sample, FP32_RTOL)
        assert type(o) is type(r)
        if hasattr(r, "pred_original_sample"):
            assert_close(f"{name} step {k} x0", o.pred_original_sample, r.pred_original_sample, FP32_RTOL)


def img2img(scheduler, n, start, seed=4):
    """A pipeline's img2img loop: add_noise at the first kept timestep, set_begin_index(start * order), then the
    steps from there."""
    scheduler.set_timesteps(n)
    begin = start * scheduler.order
    ts = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    x0, noise = x_start(), torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    x = scheduler.add_noise(x0, noise, ts[:1])
    g = torch.Generator().manual_seed(seed)
    kw = {"generator": g} if "generator" in scheduler.step.__code__.co_varnames else {}
    for t in ts:
        x = scheduler.step(model_of(scheduler)(scheduler, scheduler.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("name,config", [
    ("LMSDiscreteScheduler", dict(SD)), ("LMSDiscreteScheduler", dict(SD, use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", dict(SD)), ("KDPM2AncestralDiscreteScheduler", dict(SD)),
    ("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=2)), ("EDMEulerScheduler", dict()),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3)),
])
@pytest.mark.parametrize("start", [1, 2, 5])
def test_late_start_matches_diffusers(name, config, start):
    """img2img: LMS's Lagrange nodes reach back before the start (diffusers' order min(begin + i + 1, 4) with only
    the slopes since the start), the two-call schedulers start on a first call, EDM adds noise in x."""
    stock, ours = pair(name, **config)
    assert_close(f"{name} start={start}", img2img(ours, 7, start), img2img(stock, 7, start), FP32_RTOL)


@pytest.mark.parametrize("sname,past", [("EDM", (300.0, 160.0, 110.0)), ("DiscreteVP", (157.0,)),
                                        ("scaled_linear", (30.0, 20.0))])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_lms_past_sigmas_match_the_float64_reference(sname, past, prediction):
    """The lms option diffusers' late start needs, against the paper-style float64 reference (scipy quadrature)."""
    from test_reference_equivalence import SCHEDULES, compare

    assert compare("lms", SCHEDULES[sname], 7, prediction, "zero", past_sigmas=past) is not None


def test_lms_step_order_argument_matches_diffusers():
    for order in (1, 2, 3, 6):
        got, ref = both("LMSDiscreteScheduler", dict(SD), 8, step_kwargs={"order": order})
        assert_close(f"LMS order={order}", got, ref, FP32_RTOL)


def test_dpmsolver_sde_step_s_noise_matches_diffusers():
    """step's s_noise reaches the rows (the program key's second entry): with diffusers' own tree draws, and without
    a seed at s_noise = 0 (no noise on either side, whatever diffusers' random tree draws)."""
    for s_noise in (0.5, 1.3):
        got, ref = both("DPMSolverSDEScheduler", dict(SD, noise_sampler_seed=4), 6, step_kwargs={"s_noise": s_noise})
        assert_close(f"DPMSolverSDE s_noise={s_noise}", got, ref, FP32_RTOL)
    got, ref = both("DPMSolverSDEScheduler", dict(SD), 6, step_kwargs={"s_noise": 0.0})
    assert_close("DPMSolverSDE s_noise=0 without a seed", got, ref, FP32_RTOL)


def test_edm_euler_takes_pred_original_sample_like_diffusers():
    stock, ours = diffusers.EDMEulerScheduler(), fdd.EDMEulerScheduler()
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    res = []
    for s in (stock, ours):
        s.set_timesteps(5)
        x = x_start() * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(torch.zeros_like(x), t, x, pred_original_sample=x0).prev_sample
        res.append(x)
    assert_close("EDM Euler pred_original_sample", res[1], res[0], FP32_RTOL)


def test_edm_add_noise_and_scale_model_input_match_diffusers():
    for name in EDM_NAMES:
        stock, ours = getattr(diffusers, name)(), getattr(fdd, name)()
        for s in (stock, ours):
            s.set_timesteps(10)
        x0, noise = x_start(), torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(9))
        t = stock.timesteps[torch.tensor([0, 4, 9])]
        assert torch.allclose(ours.add_noise(x0, noise, t), stock.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_edm_rising_final_sigma_is_a_still_step_where_diffusers_turns_nan():
    """final_sigmas_type="sigma_min": the float32 Karras sigmas end just below sigma_min, so diffusers' last step
    rises by a relative 2e-7; its heun order-2 update divides by that float32 h (NaN with lower_order_final=False).
    fastdiff steps there as on a still step: x stays where the step before left it."""
    config = dict(solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min")
    got, ref = both("EDMDPMSolverMultistepScheduler", config, 7)
    assert torch.isfinite(got).all() and not torch.isfinite(ref).all()
    stock = diffusers.EDMDPMSolverMultistepScheduler(**config)
    stock.set_timesteps(7)
    x = x_start() * stock.init_noise_sigma
    for t in stock.timesteps[:-1]:
        x = stock.step(edm_model(stock, stock.scale_model_input(x, t), t), t, x).prev_sample
    assert_close("EDM DPM-Solver heun sigma_min", got, x, FP32_RTOL)


# -- per-sample steps, stateless use, Philox noise ---------------------------------------------------------------


def _alone(scheduler, x_T, seeds, n):
    scheduler.set_timesteps(n)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_of(scheduler)(scheduler, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, seeds=seeds).prev_sample
    return x


PER_SAMPLE = [
    ("LMSDiscreteScheduler", dict(SD)), ("KDPM2DiscreteScheduler", dict(SD)),
    ("KDPM2AncestralDiscreteScheduler", dict(SD)), ("DPMSolverSDEScheduler", dict(SD)),
    ("EDMEulerScheduler", dict()), ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
]


@pytest.mark.parametrize("name,config", PER_SAMPLE)
def test_per_sample_step_index_equals_each_sample_alone(name, config):
    """One step call serves samples at different steps (``step_index`` [B] with a state holding each sample's
    history); each sample equals its own run with the same Philox seed."""
    s = make(fdd, name, **config)
    n, offsets = 4, [0, 2, 1]
    s.set_timesteps(n)
    ts = s.timesteps
    x_T = x_start()
    state = s.new_state()
    x = x_T * s.init_noise_sigma
    done = [None] * 3
    for tick in range(len(ts) + max(offsets)):
        idx = [tick - o for o in offsets]
        k = torch.tensor([min(max(i, 0), len(ts) - 1) for i in idx])
        t = ts[k]
        xin = s.scale_model_input(x, t, step_index=k)
        out = torch.cat([model_of(s)(s, xin[b:b + 1], t[b]) for b in range(3)])
        new = s.step(out, t, x, seeds=[0, 1, 2], step_index=k, state=state).prev_sample
        for b in range(3):
            if 0 <= idx[b] < len(ts):
                x[b] = new[b]
                if idx[b] == len(ts) - 1:
                    done[b] = x[b].clone()
    for b in range(3):
        alone = _alone(make(fdd, name, **config), x_T[b:b + 1], [b], n)
        assert torch.allclose(done[b][None], alone, rtol=1e-5, atol=1e-5), (b, (done[b] - alone[0]).abs().max())


@pytest.mark.parametrize("name,config", [PER_SAMPLE[1], PER_SAMPLE[3], PER_SAMPLE[5]])
def test_stateless_runs_share_one_scheduler_across_threads(name, config):
    s = make(fdd, name, **config)
    s.set_timesteps(5)
    x_T = x_start()

    def run(b, results):
        st = s.new_state()
        x = x_T[b:b + 1] * s.init_noise_sigma
        for t in s.timesteps:
            out = model_of(s)(s, s.scale_model_input(x, t, state=st), t)
            x = s.step(out, t, x, seeds=[b], state=st).prev_sample
        results[b] = x

    assert_threads_equal_sequential(run, 3)
    assert s.step_index is None  # the scheduler's own counter was never touched


@pytest.mark.parametrize("name,config", [PER_SAMPLE[2], PER_SAMPLE[3], PER_SAMPLE[5]])
def test_philox_noise_is_per_sample(name, config):
    s = make(fdd, name, **config)
    x_T = x_start()
    batch = _alone(s, x_T, [5, 6, 7], 4)
    assert torch.equal(batch[1:2], _alone(s, x_T[1:2], [6], 4))
    other = _alone(s, x_T, [5, 60, 7], 4)
    assert not torch.allclose(other[1], batch[1]) and torch.equal(other[0], batch[0])


def test_dpmsolver_sde_philox_noise_has_the_brownian_tree_law():
    """Without noise_sampler_seed the two noises of a step are Philox draws with the Brownian tree's joint law:
    with a zero model (D = 0) the step is linear in the noises, so over many samples the two stages' outputs have
    the mean, variances and covariance the tree gives (torchsde's tree: z_1 = W(sigma -> sigma_mid) / sqrt(.),
    z_2 = W(sigma -> sigma_next) / sqrt(.), correlation sqrt((sigma - sigma_mid) / (sigma - sigma_next)))."""
    s = make(fdd, "DPMSolverSDEScheduler", **SD)
    s.set_timesteps(4)
    B = 20000
    x = torch.zeros(B, 1, dtype=torch.float64)
    sig = s.sigmas.double()
    st = s.new_state()
    x0 = torch.zeros_like(x)
    seeds = list(range(B))
    x1 = s.step(x0, s.timesteps[0], x, seeds=seeds, state=st, step_index=0).prev_sample  # model output: x - 0 = eps
    sigma, sigma_next = sig[0].item(), sig[1].item()
    sigma_mid = np.sqrt(sigma * sigma_next)  # the midpoint in log sigma
    # x is y; the model's epsilon output y / sigma_mid gives D_2 = y - sigma_mid * eps = 0 on the second call
    x2 = s.step(x1 / sigma_mid, s.timesteps[1], x1, seeds=seeds, state=st, step_index=1).prev_sample
    up1 = np.sqrt(sigma_mid**2 * (sigma**2 - sigma_mid**2) / sigma**2)
    up2 = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    rho = np.sqrt((sigma - sigma_mid) / (sigma - sigma_next))
    z1, z2 = (x1[:, 0] / up1).numpy(), (x2[:, 0] / up2).numpy()
    tol = 4.0 / np.sqrt(B)
    assert abs(z1.mean()) < tol and abs(z2.mean()) < tol
    assert abs(z1.var() - 1) < 4 * tol and abs(z2.var() - 1) < 4 * tol
    assert abs(np.mean(z1 * z2) - rho) < 4 * tol


# -- options refused on purpose, bad calls ------------------------------------------------------------------------


def test_refused_options_raise_clearly():
    s = fdd.EDMEulerScheduler()
    s.set_timesteps(4)
    x = x_start()
    with pytest.raises(NotImplementedError, match="s_churn"):
        s.step(x, s.timesteps[0], x, s_churn=1.0)
    with pytest.raises(NotImplementedError, match="solver_order=3"):
        fdd.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3).set_timesteps(4)
    k = make(fdd, "KDPM2DiscreteScheduler", **SD)
    k.set_timesteps(4)
    k.set_begin_index(1)
    with pytest.raises(ValueError, match="begin_index must be even"):
        k.step(x, k.timesteps[1], x)
    lms = fdd.LMSDiscreteScheduler(**SD)
    lms.set_timesteps(4)
    with pytest.raises(ValueError, match="order must be an integer in 1..6"):
        lms.step(x, lms.timesteps[0], x, order=0)
