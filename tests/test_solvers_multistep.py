"""The multistep / exponential-integrator solvers of ComfyUI's and the few-step literature's menus: ipndm, ipndm_v,
deis, res_multistep(_ancestral), dpm_fast, plms, pndm, sa_solver(_pece).

Plan == float64 reference on every schedule x prediction is in test_reference_equivalence (its sweep covers every
registered solver).  Here: convergence orders on the exact Gaussian PF-ODE; k-diffusion's sample_dpm_fast and
diffusers' PNDMScheduler (PRK warm-up and skip_prk_steps) run side by side; the weights against formulas worked out
by hand; the stochastic variants reach the exact target and are batch invariant on every CPU backend.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastdiff as fd
from fastdiff.models import GaussianMixture
from fastdiff.solvers.adams import AB_WEIGHTS, deis_weights, ipndm_v_weights
from peers import (FP32_RTOL, SEEDS, GaussianMixture as PeerMixture, assert_close, load_k_diffusion, noise_draws,
                   prior_noise, schedule_model)
from solver_checks import one_thread  # noqa: F401  (autouse: one torch thread in this module)


# ---------------------------------------------------------------------------------------------------------------
# Convergence orders on the exact Gaussian PF-ODE
# ---------------------------------------------------------------------------------------------------------------

DATA = GaussianMixture(means=[0.7], stds=[0.5])
EDM, VP = fd.schedules.EDM(), fd.schedules.ContinuousVP()


def global_error(solver, schedule, steps, grid, **opts):
    """Max error at the grid's end over 61 starts spread across the marginal at its start."""
    if grid == "uniform_sigma":  # equal steps in k-diffusion's sigma on [0.3, 3]: the fixed-step weights are exact
        plan = fd.plan(solver, schedule, prediction="epsilon", sigmas=np.linspace(3.0, 0.3, steps + 1), **opts)
    else:
        plan = fd.plan(solver, schedule, steps, prediction="epsilon", spacing="logsnr", final="t_min", **opts)
    a_T, s_T = plan.alphas[0], plan.sigmas[0]
    std_T = math.sqrt(a_T**2 * DATA.stds[0].item() ** 2 + s_T**2)
    x_T = a_T * DATA.means[0] + std_T * torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    x = fd.sample(DATA.model(schedule, "epsilon"), plan, x_T=x_T, backend="torch")
    exact = DATA.pf_ode_solution(x_T, a_T, s_T, plan.alphas[-1], plan.sigmas[-1])
    return (x - exact).abs().max().item()


# (solver, options, grid, steps, order).  Fixed-step Adams weights (ipndm, plms, pndm) are exact on equal steps in
# sigma, where they reach order 4 (pndm's Runge-Kutta warm-up keeps it; the warm-ups of ipndm and plms are of lower
# order but their error is tiny at high noise); on the usual geometric grids their weights are off by O(h) and the
# global order is 2.  dpm_fast: at least order 3 in the number of model calls (4 where its DPM-Solver-3 steps
# dominate the error, ContinuousVP here).  SA-Solver as an ODE (eta = 0; predictor 3, corrector 4): at least 3
# (3.3-3.7 fitted here, the corrector's fourth order not yet reached).
ORDER_CASES = [
    ("ipndm", {}, "uniform_sigma", (16, 32, 64, 128), 4),
    ("plms", {}, "uniform_sigma", (16, 32, 64, 128), 4),
    ("pndm", {}, "uniform_sigma", (16, 32, 64, 128), 4),
    ("ipndm", {}, "logsnr", (16, 32, 64, 128), 2),
    ("ipndm_v", dict(max_order=2), "logsnr", (32, 64, 128, 256), 2),
    ("deis", {}, "logsnr", (32, 64, 128, 256), 3),
    ("deis", dict(max_order=4), "logsnr", (32, 64, 128, 256), 4),
    ("res_multistep", {}, "logsnr", (16, 32, 64, 128), 2),
    ("dpm_fast", {}, "logsnr", (24, 48, 96, 192), 3),
    ("sa_solver", dict(eta=0.0), "logsnr", (16, 32, 64, 128), 3),
    ("sa_solver_pece", dict(eta=0.0), "logsnr", (16, 32, 64, 128), 3),
]
AT_LEAST = ("dpm_fast", "sa_solver", "sa_solver_pece")


@pytest.mark.parametrize("schedule", [EDM, VP], ids=["EDM", "ContinuousVP"])
@pytest.mark.parametrize("solver, opts, grid, steps, order", ORDER_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[4]}" for c in ORDER_CASES])
def test_convergence_order(solver, opts, grid, steps, order, schedule):
    errors = [global_error(solver, schedule, n, grid, **opts) for n in steps]
    fitted = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    ok = fitted >= order - 0.4 if solver in AT_LEAST else abs(fitted - order) <= 0.4
    assert ok, f"{solver} {opts} on {grid}: errors {errors}, fitted order {fitted:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Weights against formulas worked out by hand
# ---------------------------------------------------------------------------------------------------------------


def test_ipndm_v_weights():
    """Order 2: the exact variable-step AB2 (integral of the linear interpolant of d in sigma).  On equal steps:
    AB3 at order 3, and at order 4 ComfyUI's formula gives (57, -65, 43, -11) / 24, not AB4's (55, -59, 37, -9) / 24
    (its temp2 is 11/24 at equal steps where AB4 needs 3/8); fastdiff keeps ComfyUI's weights."""
    s = [9.0, 5.0, 3.5, 2.0]
    h, h1 = s[3] - s[2], s[2] - s[1]
    np.testing.assert_allclose(ipndm_v_weights(s + [1.2], 2, 2), [1 + h / (2 * h1), -h / (2 * h1)], rtol=1e-15)
    # integral over [s_2, s_3] of the line through (s_1, d_1), (s_2, d_2), divided by the step: weights of (d_2, d_1)
    w_d2 = 1 + (s[3] - s[2]) / (2 * (s[2] - s[1]))
    np.testing.assert_allclose(ipndm_v_weights(s, 2, 2)[0], w_d2, rtol=1e-15)
    uniform = [5.0, 4.0, 3.0, 2.0, 1.0]
    np.testing.assert_allclose(ipndm_v_weights(uniform, 2, 3), AB_WEIGHTS[3], rtol=1e-14)
    np.testing.assert_allclose(ipndm_v_weights(uniform, 3, 4), np.array([57, -65, 43, -11]) / 24, rtol=1e-14)
    uneven = [7.0, 4.0, 3.1, 1.3, 0.9]
    for o in (2, 3):  # consistency: the weights of any grid sum to 1
        assert abs(sum(ipndm_v_weights(uneven, 3, o)) - 1) < 1e-14
    # ComfyUI's order-4 weights sum to 1 + q (h2 / h3 - h1 / h2) temp2 (q = h1 (h1 + h2) / (h2 (h2 + h3))): 1 only
    # where the last steps are in geometric progression (log-SNR-uniform grids); elsewhere the step is inconsistent
    geometric = [8.0, 4.0, 2.0, 1.0, 0.5]
    assert abs(sum(ipndm_v_weights(geometric, 3, 4)) - 1) < 1e-14
    assert abs(sum(ipndm_v_weights(uneven, 3, 4)) - 1) > 0.1


@pytest.mark.parametrize("order", [2, 3, 4])
def test_deis_weights(order):
    """C_j = int_{s_i}^{s_{i+1}} L_j(tau(s)) ds: the basis sums to 1, so sum_j C_j = s_{i+1} - s_i; where the
    nodes are the current point only (order 1) C_0 is the step; and the weights integrate the polynomial exactly:
    for d = tau^k (k < order) sum_j C_j tau_{i-j}^k = int tau(s)^k ds (checked with scipy's adaptive quadrature)."""
    from scipy import integrate

    from fastdiff.solvers.adams import deis_tau

    s = [80.0, 20.0, 4.0, 1.1, 0.2, 0.01]
    i = 4
    w = deis_weights(s, i, order)
    assert abs(sum(w) - (s[i + 1] - s[i])) < 1e-13
    assert deis_weights(s, i, 1) == pytest.approx([s[i + 1] - s[i]], rel=1e-14)
    taus = [float(deis_tau(s[i - j])) for j in range(order)]
    for k in range(order):
        exact = integrate.quad(lambda v: float(deis_tau(v)) ** k, s[i], s[i + 1], epsabs=0, epsrel=1e-13)[0]
        assert sum(c * t**k for c, t in zip(w, taus)) == pytest.approx(exact, rel=1e-11, abs=1e-14)


def test_res_multistep_is_dpmpp_2m_heun():
    """Zhang et al.'s second-order multistep RES step is the exponential integrator with D linear in lambda, the
    form of DPM-Solver++(2M) diffusers calls 'heun' (no lower_order_final: RES has no cool-down)."""
    for sch in (EDM, fd.schedules.DiscreteVP()):
        res = fd.plan("res_multistep", sch, 9, prediction="epsilon")
        dpm = fd.plan("dpmpp_2m", sch, 9, prediction="epsilon", solver_type="heun", lower_order_final=False)
        np.testing.assert_allclose(res.rows()[:, :7], dpm.rows()[:, :7], rtol=1e-12, atol=1e-14)
        mx = DATA.model(sch, "epsilon")
        x_T = torch.linspace(-3, 3, 11, dtype=torch.float64)[:, None] * res.init_scale
        torch.testing.assert_close(fd.sample(mx, res, x_T=x_T, backend="torch"),
                                   fd.sample(mx, dpm, x_T=x_T, backend="torch"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 10])
def test_model_calls(steps):
    """NFE: one per step for the Adams / RES / SA solvers and dpm_fast; plms one more (its first step is redone); pndm
    3 more per warm-up step (at most three)."""
    for solver in ("ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_ancestral", "dpm_fast", "sa_solver"):
        assert fd.plan(solver, EDM, steps).nfe == steps, solver
    # PECE: a second call at the corrected state on every step but the first
    assert fd.plan("sa_solver_pece", EDM, steps).nfe == 2 * steps - 1
    assert fd.plan("plms", EDM, steps).nfe == steps + (steps > 1)
    # a warm-up step that ends on the clean point is a PLMS step
    assert fd.plan("pndm", EDM, steps).nfe == steps + 3 * min(3, steps - 1)
    assert fd.plan("pndm", EDM, steps, final="t_min").nfe == steps + 3 * min(3, steps)


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion's sample_dpm_fast side by side
# ---------------------------------------------------------------------------------------------------------------

_KD = load_k_diffusion()
kd = _KD[0] if _KD else None
needs_kd = pytest.mark.skipif(kd is None, reason="k-diffusion is not installed")
GM = PeerMixture(dim=32)


class _Feeder:
    """k-diffusion's noise_sampler: fastdiff's draws in order, then zeros (its last step multiplies by su = 0)."""

    def __init__(self, draws, like):
        self.draws, self.like, self.calls = list(draws), like, 0

    def __call__(self, sigma, sigma_next):
        z = self.draws[self.calls] if self.calls < len(self.draws) else torch.zeros_like(self.like)
        self.calls += 1
        return z


def _with_default_dtype(dtype, fn, *args, **kwargs):
    """sample_dpm_fast builds its times with torch.tensor(sigma), i.e. in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_default_dtype(old)


@needs_kd
@pytest.mark.parametrize("dtype, eta, rtol", [(torch.float32, 0.0, FP32_RTOL), (torch.float64, 0.0, 1e-9),
                                              (torch.float64, 1.0, 1e-9)], ids=["fp32", "fp64", "fp64-eta1"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
def test_dpm_fast_matches_k_diffusion(n, eta, dtype, rtol):
    """EDM, the exact denoiser as k-diffusion's model; fastdiff's grid has k-diffusion's ends sigma_max = 80 and
    sigma_min = 0.002 (final='t_min': sample_dpm_fast stops there) and n steps = n model calls.

    No float32 run with eta > 0: k-diffusion's float32 sigma_down of the step 80 -> 0.4 is 0.0020021 (float64:
    0.0019999999), on the other side of sigma_min = 0.002, so its step lands elsewhere and k-diffusion's float32
    and float64 results differ by 3e-2 (one DPM-Solver-2 step across 80 -> 0.002 amplifies it).
    """
    sigmas = np.geomspace(80.0, 0.002, n + 1)  # only the ends matter to dpm_fast
    plan = fd.plan("dpm_fast", EDM, prediction="x0", sigmas=sigmas, eta=eta)
    assert plan.nfe == n and plan.final == "t_min"
    x_T = prior_noise(dtype) * 80.0
    feeder = _Feeder(noise_draws(plan, dtype), x_T)
    ref = _with_default_dtype(dtype, kd.sample_dpm_fast, lambda x, s, **_: GM.denoise(x, 1.0, s), x_T.clone(), 0.002,
                              80.0, n, disable=True, eta=eta, noise_sampler=feeder)
    steps = n // 3 + 1  # k-diffusion's m: it calls the noise sampler once per step, fastdiff draws on all but the last
    assert feeder.calls == steps and len(feeder.draws) == (steps - 1 if eta else 0)
    got = fd.sample(schedule_model(GM, EDM, "x0"), plan, x_T=x_T, seeds=SEEDS, backend="torch")
    assert_close(f"dpm_fast n={n} eta={eta}", got, ref.to(dtype), rtol)


@needs_kd
def test_dpm_fast_to_the_clean_point_matches_k_diffusion_then_denoising():
    """final='zero': steps - 1 calls of DPM-Solver-fast to the last noisy point, then the denoising call."""
    vp = fd.schedules.DiscreteVP.scaled_linear()
    plan = fd.plan("dpm_fast", vp, 8, prediction="epsilon", spacing="karras")
    s = plan.sigmas / plan.alphas
    eps_model = schedule_model(GM, vp, "epsilon")
    x_T = prior_noise(torch.float64) * plan.init_scale

    def denoiser(y, s_k, **_):  # k-diffusion's model on y = x / alpha: D from the eps model at t(s)
        t = vp.t_from_sigma_ratio(float(s_k[0]))
        a = float(vp.alpha(t))
        x = a * y
        return (x - float(vp.sigma(t)) * eps_model(x, torch.full((y.shape[0],), float(vp.model_time(t))))) / a

    y = _with_default_dtype(torch.float64, kd.sample_dpm_fast, denoiser, x_T / plan.alphas[0], float(s[-2]),
                            float(s[0]), 7, disable=True)
    ref = denoiser(y, torch.tensor([s[-2]]))
    got = fd.sample(eps_model, plan, x_T=x_T, backend="torch")
    assert_close("dpm_fast final zero", got, ref, 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' PNDMScheduler side by side
# ---------------------------------------------------------------------------------------------------------------

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _run_pndm_scheduler(n, skip_prk_steps, steps_offset, prediction):
    """(diffusers' result, fastdiff's result) from the same float32 prior."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.PNDMScheduler(**SD, skip_prk_steps=skip_prk_steps, set_alpha_to_one=True,
                                    steps_offset=steps_offset, prediction_type=prediction)
    sched.set_timesteps(n)
    vp = fd.schedules.DiscreteVP(betas=sched.betas.double().numpy())
    times = (np.arange(n) * (1000 // n))[::-1] + steps_offset
    pred = {"epsilon": "epsilon", "v_prediction": "v"}[prediction]
    plan = fd.plan("plms" if skip_prk_steps else "pndm", vp, prediction=pred,
                   boundaries=np.append(times, vp.t_zero).astype(np.float64))
    model = schedule_model(GM, vp, pred)
    x = prior_noise(torch.float32)
    x_T = x.clone()
    calls = []
    for t in sched.timesteps:
        calls.append(int(t))
        x = sched.step(model(x, t.reshape(1).double().expand(x.shape[0])).float(), t, x).prev_sample
    np.testing.assert_array_equal(np.sort(plan.model_times), np.sort(calls))
    return x, fd.sample(model, plan, x_T=x_T, backend="torch")


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("skip_prk_steps", [True, False], ids=["plms", "pndm"])
@pytest.mark.parametrize("n", [5, 10, 25])  # 1000 // n even: diffusers' PRK midpoint t - (1000 // n) // 2 is exact
def test_pndm_matches_diffusers(n, skip_prk_steps, steps_offset):
    """diffusers' PNDMScheduler (leading spacing, set_alpha_to_one: the last step lands on the clean point) in float32
    against the plan on the same timesteps with the same epsilon model."""
    ref, got = _run_pndm_scheduler(n, skip_prk_steps, steps_offset, "epsilon")
    assert_close(f"PNDMScheduler skip_prk={skip_prk_steps} n={n}", got, ref, FP32_RTOL)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("skip_prk_steps", [True, False], ids=["plms", "pndm"])
def test_pndm_v_prediction_differs_in_diffusers(skip_prk_steps):
    """diffusers' PNDMScheduler combines the raw v outputs of several calls and converts the combination to eps with
    the current sample (eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t), so a v model of the same data gives another
    result than the epsilon model; fastdiff combines each call's noise estimate (the paper's method, independent of
    the parameterization) and gives diffusers' epsilon result for both."""
    ref_eps, got_eps = _run_pndm_scheduler(10, skip_prk_steps, 1, "epsilon")
    ref_v, got_v = _run_pndm_scheduler(10, skip_prk_steps, 1, "v_prediction")
    assert_close("fastdiff v vs diffusers epsilon", got_v, ref_eps, FP32_RTOL)
    assert (ref_v - ref_eps).abs().max() > 100 * FP32_RTOL * max(1.0, float(ref_eps.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# Stochastic variants: the exact target, batch invariance, the cpu kernel
# ---------------------------------------------------------------------------------------------------------------

MU, S = 0.7, 0.5
TARGET = GaussianMixture(means=[MU], stds=[S])
STOCHASTIC = {
    "res_multistep_ancestral": (100, {}),
    "res_multistep_ancestral_eta0.5": (100, dict(eta=0.5)),
    "dpm_fast_eta1": (60, dict(eta=1.0)),
    # SDE over the whole range (the default window is 20 %..80 % of the schedule's time)
    "sa_solver": (60, dict(sde_start_percent=0.0, sde_end_percent=1.0)),
    "sa_solver_pece": (40, dict(sde_start_percent=0.0, sde_end_percent=1.0)),
    "sa_solver_simple_order_2": (60, dict(predictor_order=2, corrector_order=2, simple_order_2=True)),
}


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_reaches_target_distribution(case):
    steps, opts = STOCHASTIC[case]
    solver = case.split("_eta")[0].replace("_simple_order_2", "")
    plan = fd.plan(solver, EDM, steps, prediction="epsilon", **opts)
    assert plan.num_draws > 1
    seeds = [11, 22, 33, 44]
    x = fd.sample(TARGET.model(EDM, "epsilon"), plan, shape=(len(seeds), 5000), seeds=seeds, backend="torch")
    samples = x.double().flatten().numpy()
    assert abs(samples.mean() - MU) < 4 * S / np.sqrt(samples.size), samples.mean()
    assert abs(samples.std() / S - 1) < 0.03, samples.std()
    assert stats.kstest(samples, stats.norm(MU, S).cdf).pvalue > 1e-3


BACKENDS = [b for b in ("torch", "cpu") if fd.backends.status(b)[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver, opts", [("res_multistep_ancestral", {}), ("dpm_fast", dict(eta=1.0)),
                                          ("pndm", {}), ("deis", {}), ("sa_solver_pece", dict(sde_start_percent=0.0))])
def test_batch_invariance(solver, opts, backend):
    """A seed gives a bitwise identical sample whatever the batch around it."""
    plan = fd.plan(solver, EDM, 7, **opts)
    model = TARGET.model(EDM, "epsilon")
    alone = fd.sample(model, plan, shape=(1, 3, 7), seeds=[123], backend=backend)
    batch = fd.sample(model, plan, shape=(3, 3, 7), seeds=[5, 123, 9], backend=backend)
    assert torch.equal(batch[1], alone[0])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="cpu backend unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver, opts", [("res_multistep_ancestral", dict(eta=0.7)), ("dpm_fast", dict(eta=1.0)),
                                          ("pndm", {}), ("plms", {}), ("ipndm_v", {}), ("deis", dict(max_order=4)),
                                          ("sa_solver", dict(sde_start_percent=0.0)), ("sa_solver_pece", {})])
def test_cpu_kernel_matches_torch_backend(solver, opts, dtype):
    sch = fd.schedules.DiscreteVP()
    plan = fd.plan(solver, sch, 9, **opts)
    model = TARGET.model(sch, "epsilon")
    a = fd.sample(model, plan, shape=(3, 5, 11), seeds=[1, 2, 3], backend="torch", dtype=dtype)
    b = fd.sample(model, plan, shape=(3, 5, 11), seeds=[1, 2, 3], backend="cpu", dtype=dtype)
    # the fused path takes float32 rows (and float32 noise) also for float64 states
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
