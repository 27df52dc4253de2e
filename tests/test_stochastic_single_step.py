"""ComfyUI's stochastic and single-step samplers: dpm_2_ancestral, dpmpp_sde, heunpp2, gradient_estimation, tcd,
flow_euler_ancestral, er_sde, seeds_2, seeds_3.

Plan == float64 reference for every schedule and prediction is in test_reference_equivalence.py's sweep, the
per-stage cpu kernel in test_kernel_cpu.py (both iterate over every registered solver).  Here:

- k-diffusion 0.1.1 run side by side (dpm_2_ancestral, dpmpp_sde), with fastdiff's Philox normals fed through its
  ``noise_sampler``; for dpmpp_sde the second normal of a step is the Brownian-tree increment k-diffusion would get;
- the joint law of dpmpp_sde's two noises (k-diffusion's Brownian tree), measured on the plan's own draws;
- diffusers' TCDScheduler run side by side with fastdiff's tcd;
- the stochastic samplers reach the exact target N(mu, s^2); the deterministic ones (and the stochastic ones at
  eta = 0) converge at their order on the exact Gaussian PF-ODE;
- reference options the sweep does not cover (churn, eta, r, solver_type, stages, quadrature);
- the cpu backend equals the torch backend over a whole run, batch invariance, errors for bad options.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff as fd
import fastdiff.reference as ref
from fastdiff import rng
from fastdiff.models import GaussianMixture as Gaussian
from peers import (FP32_RTOL, SEEDS, GaussianMixture, assert_close, load_k_diffusion, noise_draws, prior_noise,
                   schedule_model)
from solver_checks import one_thread  # noqa: F401  (autouse: one torch thread in this module)

NEW = ("dpm_2_ancestral", "dpmpp_sde", "heunpp2", "gradient_estimation", "tcd", "flow_euler_ancestral", "er_sde",
       "seeds_2", "seeds_3")
GM = GaussianMixture(dim=32)
EDM = fd.schedules.EDM()
VP = fd.schedules.DiscreteVP.scaled_linear()


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion side by side
# ---------------------------------------------------------------------------------------------------------------

try:
    _KD = load_k_diffusion()
except ImportError:  # scipy / tqdm missing: k-diffusion's sampling module cannot be executed
    _KD = None
needs_kd = pytest.mark.skipif(_KD is None, reason="k-diffusion's sampling module is not available")


class _Draws:
    """k-diffusion ``noise_sampler(sigma, sigma_next)`` handing out fastdiff's draws in order (dpm_2_ancestral)."""

    def __init__(self, draws):
        self.draws, self.calls = list(draws), 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        return self.draws.pop(0)


class _BrownianPairs(_Draws):
    """k-diffusion's noise for sample_dpmpp_sde from fastdiff's draws, as its Brownian tree defines it.

    A step calls (sigma, sigma_1) then (sigma, sigma_next); the tree returns (W(b) - W(a)) / sqrt(|b - a|) for one
    Brownian motion W.  With W's independent increments over [sigma_1, sigma] and [sigma_next, sigma_1] set to
    sqrt(length) times fastdiff's two draws z_a, z_b of the step, the calls return z_a and
    (sqrt(sigma - sigma_1) z_a + sqrt(sigma_1 - sigma_next) z_b) / sqrt(sigma - sigma_next).
    """

    pending = None

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        z = self.draws.pop(0)
        if self.pending is None:
            self.pending = (float(sigma), float(sigma_next), z)
            return z
        s, s_1, z_a = self.pending
        self.pending = None
        assert float(sigma) == s
        s_next = float(sigma_next)
        return (math.sqrt(s - s_1) * z_a + math.sqrt(s_1 - s_next) * z) / math.sqrt(s - s_next)


KD_CASES = {
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", dict(eta=1.0), "dpm_2_ancestral", dict(eta=1.0), _Draws),
    "dpm_2_ancestral_eta0.5": ("sample_dpm_2_ancestral", dict(eta=0.5, s_noise=1.01), "dpm_2_ancestral",
                               dict(eta=0.5, s_noise=1.01), _Draws),
    "dpmpp_sde": ("sample_dpmpp_sde", dict(eta=1.0), "dpmpp_sde", dict(eta=1.0), _BrownianPairs),
    "dpmpp_sde_eta0.5_r0.4": ("sample_dpmpp_sde", dict(eta=0.5, r=0.4, s_noise=0.9), "dpmpp_sde",
                              dict(eta=0.5, r=0.4, s_noise=0.9), _BrownianPairs),
}


def _karras(n, sigma_min, sigma_max, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _KD[0].get_sigmas_karras(n, sigma_min, sigma_max)
    finally:
        torch.set_default_dtype(old)


def _kd_pair(case, sigmas, kd_model, fd_model, schedule, prediction):
    kd_name, kd_kwargs, solver, opts, feeder_cls = KD_CASES[case]
    dtype = sigmas.dtype
    plan = fd.plan(solver, schedule, prediction=prediction, sigmas=sigmas.double().numpy(), **opts)
    y_T = prior_noise(dtype) * sigmas[0]
    draws = noise_draws(plan, dtype)
    feeder = feeder_cls(draws)
    want = feeder_cls(draws)  # untouched copy for the count
    kd_out = getattr(_KD[0], kd_name)(kd_model, y_T.clone(), sigmas, disable=True, noise_sampler=feeder, **kd_kwargs)
    assert not feeder.draws and feeder.calls == len(want.draws), "k-diffusion and fastdiff disagree on the draws"
    got = fd.sample(fd_model, plan, x_T=y_T * plan.alphas[0], seeds=SEEDS, backend="torch")
    assert got.dtype == kd_out.dtype == dtype
    return kd_out, got


@needs_kd
@pytest.mark.parametrize("dname, n", [("fp64", 1), ("fp64", 2), ("fp64", 7), ("fp32", 3), ("fp32", 10)])
@pytest.mark.parametrize("case", list(KD_CASES))
def test_edm_matches_k_diffusion(case, dname, n):
    """EDM (k-diffusion's own space), the exact mixture denoiser as k-diffusion's model, Karras sigmas."""
    dtype, rtol = {"fp64": (torch.float64, 1e-9), "fp32": (torch.float32, FP32_RTOL)}[dname]
    kd_out, got = _kd_pair(case, _karras(n, 0.002, 80.0, dtype), lambda x, s, **_: GM.denoise(x, 1.0, s),
                           schedule_model(GM, EDM, "x0"), EDM, "x0")
    assert_close(f"k-diffusion {case} EDM n={n} {dname}", got, kd_out, rtol)


@needs_kd
@pytest.mark.parametrize("case", list(KD_CASES))
def test_discrete_vp_eps_model_matches_k_diffusion(case):
    """Stable Diffusion's schedule with an epsilon model wrapped by k-diffusion's DiscreteEpsDDPMDenoiser (its
    midpoints are at noise levels between the table's timesteps)."""
    eps_model = schedule_model(GM, VP, "epsilon")
    den = _KD[1].DiscreteEpsDDPMDenoiser(eps_model, torch.as_tensor(VP.alphas_cumprod), quantize=False)
    sigmas = _karras(8, float(den.sigma_min), float(den.sigma_max), torch.float64)
    kd_out, got = _kd_pair(case, sigmas, den, eps_model, VP, "epsilon")
    assert_close(f"k-diffusion {case} DiscreteVP eps n=8", got, kd_out, 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# dpmpp_sde: the joint law of a step's two noises is the Brownian tree's
# ---------------------------------------------------------------------------------------------------------------


def test_dpmpp_sde_noise_law_is_the_brownian_trees():
    """One step sigma -> sigma' (EDM, eta = 1), data estimate D = 0 and x_T = 0: the model's second input is
    x_2 = su_1 z_1 and the result is su_2 z_2, so the plan's two normals z_1, z_2 are read off directly.  Brownian
    motion in sigma gives z_1 = (W(sigma_1) - W(sigma)) / sqrt(sigma - sigma_1), z_2 = (W(sigma') - W(sigma)) /
    sqrt(sigma - sigma'): standard normals with correlation sqrt((sigma - sigma_1) / (sigma - sigma'))."""
    s, s_next = 3.0, 0.4
    s_1 = math.sqrt(s * s_next)  # r = 1/2: the midpoint in log sigma
    inputs = []

    def zero_denoiser(x, t):
        inputs.append(x.clone())
        return torch.zeros_like(x)

    plan = fd.plan("dpmpp_sde", EDM, prediction="x0", sigmas=[s, s_next])
    assert plan.num_draws == 3  # the prior and one per stage
    seeds = [7, 8, 9, 10]
    x = fd.sample(zero_denoiser, plan, x_T=torch.zeros(4, 40_000, dtype=torch.float64), seeds=seeds, backend="torch")

    def sigma_up(a, b):  # get_ancestral_step with eta = 1
        return math.sqrt(b * b * (a * a - b * b) / (a * a))

    z_1 = (inputs[1] / sigma_up(s, s_1)).flatten().numpy()
    z_2 = (x / sigma_up(s, s_next)).flatten().numpy()
    n = z_1.size
    for z in (z_1, z_2):
        assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.var() - 1) < 6 * math.sqrt(2 / n)
        assert stats.kstest(z, "norm").pvalue > 1e-3
    rho = math.sqrt((s - s_1) / (s - s_next))
    corr = float(np.corrcoef(z_1, z_2)[0, 1])
    assert abs(corr - rho) < 4 * (1 - rho * rho) / math.sqrt(n), (corr, rho)
    # the fresh part is independent of z_1 and normal: z_2 - rho z_1 ~ N(0, 1 - rho^2)
    w = (z_2 - rho * z_1) / math.sqrt(1 - rho * rho)
    assert abs(np.corrcoef(z_1, w)[0, 1]) < 4 / math.sqrt(n) and abs(w.var() - 1) < 6 * math.sqrt(2 / n)


# ---------------------------------------------------------------------------------------------------------------
# tcd: diffusers' TCDScheduler side by side
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, steps, prediction", [(0.3, 4, "epsilon"), (0.3, 1, "epsilon"), (0.0, 3, "epsilon"),
                                                      (1.0, 4, "epsilon"), (0.5, 6, "v")])
def test_tcd_matches_diffusers(gamma, steps, prediction, monkeypatch):
    """diffusers' TCDScheduler (eta = gamma) on SD's schedule and its own timesteps; fastdiff's plan on the same
    boundaries plus t = 0, where diffusers' last step lands.  diffusers' noise is replaced by fastdiff's draws."""
    from diffusers import TCDScheduler
    from diffusers.schedulers import scheduling_tcd

    dp = {"epsilon": "epsilon", "v": "v_prediction"}[prediction]
    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=dp)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), VP.alphas_cumprod, rtol=1e-6)
    plan = fd.plan("tcd", VP, prediction=prediction, boundaries=ts + [0], final="t_min", gamma=gamma)
    model = schedule_model(GM, VP, prediction)
    x_T = prior_noise(torch.float32)
    draws = noise_draws(plan, torch.float32)
    used = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **_):
        used.append(1)
        return draws[len(used) - 1].to(dtype)

    monkeypatch.setattr(scheduling_tcd, "randn_tensor", fake_randn)
    x = x_T.clone()
    for t in sched.timesteps:
        out = model(x, torch.full((x.shape[0],), float(t))).to(torch.float32)
        x = sched.step(out, t, x, eta=gamma).prev_sample
    assert len(used) == len(draws)
    got = fd.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch")
    assert_close(f"diffusers TCD gamma={gamma} steps={steps} {prediction}", got, x, FP32_RTOL)


# ---------------------------------------------------------------------------------------------------------------
# Distributions and convergence on exact Gaussian models
# ---------------------------------------------------------------------------------------------------------------

MU, S = 0.7, 0.5
DATA = Gaussian(means=[MU], stds=[S])
TARGET_CASES = {
    "dpm_2_ancestral": ("dpm_2_ancestral", EDM, 60, "epsilon", {}),
    "dpmpp_sde": ("dpmpp_sde", EDM, 40, "epsilon", {}),
    "dpmpp_sde_vp": ("dpmpp_sde", fd.schedules.ContinuousVP(), 40, "v", {"eta": 0.7}),
    "seeds_2": ("seeds_2", EDM, 40, "epsilon", {}),
    "seeds_2_phi_2": ("seeds_2", fd.schedules.ContinuousVP(), 40, "epsilon", {"solver_type": "phi_2"}),
    "seeds_3": ("seeds_3", EDM, 30, "epsilon", {}),
    "er_sde": ("er_sde", EDM, 60, "epsilon", {}),
    "er_sde_vp": ("er_sde", fd.schedules.DiscreteVP(), 60, "epsilon", {}),
    "flow_euler_ancestral": ("flow_euler_ancestral", fd.schedules.RectifiedFlow(), 240, "flow", {}),  # 1st order
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_reaches_target_distribution(case):
    """With the exact denoiser of N(mu, s^2) data the samples' mean, std and a KS test match N(mu, s^2).  (Not tcd:
    its DDIM jump t -> (1 - gamma) t' stays large however many steps, so with gamma > 0 it does not converge to the
    target of a plain denoiser; it is built for consistency-distilled models.)"""
    solver, schedule, steps, pred, opts = TARGET_CASES[case]
    plan = fd.plan(solver, schedule, steps, prediction=pred, **opts)
    assert plan.num_draws > 1
    seeds = [11, 22, 33, 44]
    x = fd.sample(DATA.model(schedule, pred), plan, shape=(len(seeds), 5000), seeds=seeds, backend="torch")
    samples = x.double().flatten().numpy()
    n = samples.size
    assert abs(samples.mean() - MU) < 4 * S / np.sqrt(n), f"mean {samples.mean():.4f} vs {MU}"
    assert abs(samples.std() / S - 1) < 0.03, f"std {samples.std():.4f} vs {S}"
    assert stats.kstest(samples, stats.norm(MU, S).cdf).pvalue > 1e-3


ORDER_CASES = {  # solver, options, order, steps
    "heunpp2": ("heunpp2", {}, 1, [16, 32, 64, 128]),  # the 3-point weights s/(3 s_0) are not Heun's 1/2
    "gradient_estimation": ("gradient_estimation", {}, 1, [64, 128, 256, 512]),
    "dpmpp_sde_eta0": ("dpmpp_sde", {"eta": 0.0}, 2, [16, 32, 64, 128]),
    "seeds_2_eta0_phi_2": ("seeds_2", {"eta": 0.0, "solver_type": "phi_2"}, 2, [16, 32, 64, 128]),
    "seeds_3_eta0": ("seeds_3", {"eta": 0.0}, 3, [32, 64, 128, 256]),
    "tcd_gamma0": ("tcd", {"gamma": 0.0}, 1, [16, 32, 64, 128]),
    "flow_euler_ancestral_eta0": ("flow_euler_ancestral", {"eta": 0.0}, 1, [16, 32, 64, 128]),
}


def _global_error(solver, schedule, steps, opts):
    plan = fd.plan(solver, schedule, steps, prediction="epsilon", spacing="logsnr", final="t_min", **opts)
    assert plan.num_draws == 1
    a_T, s_T = plan.alphas[0], plan.sigmas[0]
    std_T = math.sqrt(a_T**2 * S**2 + s_T**2)
    x_T = a_T * MU + std_T * torch.linspace(-3, 3, 31, dtype=torch.float64)[:, None]
    x = fd.sample(DATA.model(schedule, "epsilon"), plan, x_T=x_T, backend="torch")
    return (x - DATA.pf_ode_solution(x_T, a_T, s_T, plan.alphas[-1], plan.sigmas[-1])).abs().max().item()


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_convergence_order(case):
    """Global error on the exact Gaussian PF-ODE (closed-form solution) falls at the solver's order."""
    solver, opts, order, steps = ORDER_CASES[case]
    for schedule in (EDM, fd.schedules.ContinuousVP()):
        errors = [_global_error(solver, schedule, n, opts) for n in steps]
        fitted = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert abs(fitted - order) <= 0.3, f"{case} on {schedule!r}: errors {errors}, fitted order {fitted:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Options beyond the sweep: plan == reference (float64, torch backend)
# ---------------------------------------------------------------------------------------------------------------

SHAPE = (3, 2, 3, 5)
REF_SEEDS = [3, 11, 12345]
OPTION_CASES = [
    ("dpm_2_ancestral", EDM, dict(eta=0.5, s_noise=0.9)),
    ("dpm_2_ancestral", VP, dict(eta=1.3)),  # sigma_down reaches 0 before the end: Euler, no noise
    ("dpmpp_sde", VP, dict(eta=0.6, r=0.3, s_noise=1.1)),
    ("heunpp2", EDM, dict(s_churn=10.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    ("heunpp2", VP, dict(s_churn=40.0)),  # churn above the table's top sigma
    ("gradient_estimation", EDM, dict(ge_gamma=1.5)),
    ("tcd", VP, dict(gamma=0.8)),
    ("flow_euler_ancestral", fd.schedules.RectifiedFlow(shift=3.0), dict(eta=0.6, s_noise=0.8)),
    ("flow_euler_ancestral", fd.schedules.RectifiedFlow.lipman(), dict(eta=1.0)),
    ("er_sde", EDM, dict(max_stage=2, s_noise=0.7)),
    ("er_sde", VP, dict(max_stage=1)),
    ("er_sde", fd.schedules.ContinuousVP(), dict(integration_points=37)),
    ("seeds_2", EDM, dict(eta=0.5, r=0.7, solver_type="phi_2")),
    ("seeds_2", VP, dict(r=1.0, solver_type="phi_2")),  # ComfyUI's exp_heun_2_x0_sde
    ("seeds_3", VP, dict(eta=0.4, s_noise=1.2, r_1=0.25, r_2=0.75)),
]


def _mixture_model(schedule, prediction):
    return schedule_model(GaussianMixture(dim=30, seed=5), schedule, prediction)


@pytest.mark.parametrize("solver, schedule, opts", OPTION_CASES,
                         ids=[f"{c[0]}-{type(c[1]).__name__}-{c[2]}" for c in OPTION_CASES])
def test_options_match_reference(solver, schedule, opts):
    pred = "flow" if schedule.kind == "flow" else "epsilon"
    for steps in (1, 6):
        plan = fd.plan(solver, schedule, steps, prediction=pred, final="t_min" if steps == 6 else "zero", **opts)
        model = _mixture_model(schedule, pred)
        x_T = plan.init_scale * rng.randn(SHAPE, REF_SEEDS, draw=0, dtype=torch.float64)
        x_fd = fd.sample(model, plan, x_T=x_T, seeds=REF_SEEDS, backend="torch")
        noises = [rng.randn(SHAPE, REF_SEEDS, draw=k, dtype=torch.float64) for k in range(1, plan.num_draws)]
        x_ref = ref.sample(model, solver, schedule, steps, x_T, noises=noises, prediction=pred, final=plan.final,
                           **opts)
        assert torch.isfinite(x_ref).all()
        err = (x_fd - x_ref).abs().max().item()
        assert err <= 1e-10 * (1 + x_ref.abs().max().item()), (solver, opts, steps, err)


def test_er_sde_quadrature_converges_to_the_integrals():
    """ComfyUI's 200-point left Riemann sums of ER-SDE's integrals approach the exact integrals (scipy's quad in the
    reference): the sampler with many points agrees with the exact-integral reference to O(1/points)."""
    model = _mixture_model(EDM, "epsilon")
    x_T = 80.0 * rng.randn(SHAPE, REF_SEEDS, draw=0, dtype=torch.float64)
    plan = fd.plan("er_sde", EDM, 8, integration_points=20_000)
    noises = [rng.randn(SHAPE, REF_SEEDS, draw=k, dtype=torch.float64) for k in range(1, plan.num_draws)]
    exact = ref.sample(model, "er_sde", EDM, 8, x_T, noises=noises, integration_points=None)
    coarse = ref.sample(model, "er_sde", EDM, 8, x_T, noises=noises, integration_points=200)
    fine = fd.sample(model, plan, x_T=x_T, seeds=REF_SEEDS, backend="torch")
    err_fine, err_coarse = (fine - exact).abs().max().item(), (coarse - exact).abs().max().item()
    assert err_fine < 1e-4 and err_coarse > 10 * err_fine, (err_fine, err_coarse)


# ---------------------------------------------------------------------------------------------------------------
# Backends, batch invariance, errors
# ---------------------------------------------------------------------------------------------------------------


def _run_plan(solver):
    schedule, pred = (fd.schedules.RectifiedFlow(), "flow") if solver == "flow_euler_ancestral" else (VP, "v")
    return fd.plan(solver, schedule, 5, prediction=pred), schedule_model(GM, schedule, pred)


@pytest.mark.parametrize("solver", NEW)
def test_cpu_backend_matches_torch(solver):
    from fastdiff.backends import cpu

    ok, why = cpu.available()
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    plan, model = _run_plan(solver)
    seeds = [5, 6, 7]
    x_T = plan.init_scale * rng.randn((3, 32), seeds, draw=0)
    a = fd.sample(model, plan, x_T=x_T, seeds=seeds, backend="torch")
    b = fd.sample(model, plan, x_T=x_T, seeds=seeds, backend="cpu")
    scale = max(1.0, a.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("solver", NEW)
def test_batch_invariance(solver):
    """A sample is the same alone and in a batch (per-sample noise; the model is per-sample)."""
    plan, model = _run_plan(solver)
    seeds = [5, 6, 7]
    x_T = plan.init_scale * rng.randn((3, 32), seeds, draw=0, dtype=torch.float64)
    batch = fd.sample(model, plan, x_T=x_T, seeds=seeds, backend="torch")
    alone = fd.sample(model, plan, x_T=x_T[1:2], seeds=seeds[1:2], backend="torch")
    assert torch.equal(batch[1:2], alone)


@pytest.mark.parametrize("solver, opts, match", [
    ("flow_euler_ancestral", dict(eta=1.5), "eta"),
    ("tcd", dict(gamma=1.2), "gamma"),
    ("dpmpp_sde", dict(r=1.0), "r must"),
    ("seeds_2", dict(solver_type="phi_3"), "solver_type"),
    ("seeds_3", dict(r_1=0.7, r_2=0.6), "r_1"),
    ("er_sde", dict(max_stage=4), "max_stage"),
    ("gradient_estimation", dict(ge_gamma=math.inf), "ge_gamma"),
    ("heunpp2", dict(s_churn=-1.0), "s_churn"),
])
def test_bad_options_are_named(solver, opts, match):
    with pytest.raises(ValueError, match=match):
        fd.plan(solver, EDM, 5, **opts)


@pytest.mark.parametrize("solver", ["dpmpp_sde", "seeds_2", "seeds_3", "er_sde", "heunpp2", "dpm_2_ancestral"])
def test_alpha_zero_start_is_refused_with_alternatives(solver):
    """These solvers divide by alpha at a step start: on rectified flow from t = 1 the error names the way out."""
    with pytest.raises(ValueError, match="alpha") as e:
        fd.plan(solver, fd.schedules.RectifiedFlow(), 5, prediction="flow")
    assert "flow_euler_ancestral" in str(e.value)
