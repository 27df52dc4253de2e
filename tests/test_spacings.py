"""The practitioners' spacings (ComfyUI, k-diffusion, Align Your Steps, GITS, Flux's shift) against their formulas
written out here, scipy's Beta quantiles, the published tables verbatim and diffusers' own functions."""

import ast
import math
import pathlib

import numpy as np
import pytest
from scipy import stats

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.timesteps import beta_ppf

SD = S.DiscreteVP.scaled_linear()
EDM = S.EDM()
FLOW = S.RectifiedFlow()
SHIFTED_FLOW = S.RectifiedFlow(shift=3.0, t_max=0.99)  # alpha > 0 throughout: every solver runs on it
NEW = ("sgm_uniform", "simple", "beta", "kl_optimal", "linear_quadratic", "polyexponential", "laplace", "ays",
       "gits", "normal")


def k_sigma(sch, t):
    """k-diffusion's sigma (sigma / alpha) of a schedule, from its alpha and sigma."""
    return np.asarray(sch.sigma(t)) / np.asarray(sch.alpha(t))


def sd_sigma_range():
    """Stable Diffusion's s_min and s_max from its alphas_cumprod, written independently of the schedule."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)
    s = np.sqrt((1 - ab) / ab)
    return s[0], s[-1]


# ---- Beta quantiles ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's own root finder, not ours
@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0), (7.5, 11.0)])
def test_beta_ppf_matches_scipy(a, b):
    p = np.concatenate([[0.0, 1e-9, 1e-4], np.linspace(0, 1, 203)[1:-1], [1 - 1e-4, 1.0]])
    np.testing.assert_allclose(beta_ppf(p, a, b), stats.beta.ppf(p, a, b), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("sch", [SD, EDM, S.ContinuousVP()], ids=repr)
@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 1.5)])
@pytest.mark.parametrize("steps", [1, 9, 30])
def test_beta_spacing(sch, a, b, steps):
    q = stats.beta.ppf(1 - np.arange(steps + 1) / steps, a, b)
    expect = sch.t_min + (sch.t_max - sch.t_min) * q
    t = fd.timesteps(sch, steps, "beta", final="t_min", beta_dist_alpha=a, beta_dist_beta=b)
    np.testing.assert_allclose(t, expect, rtol=1e-10, atol=1e-12)
    z = fd.timesteps(sch, steps, "beta", beta_dist_alpha=a, beta_dist_beta=b)
    np.testing.assert_allclose(z[:-1], expect[:-1], rtol=1e-10, atol=1e-12)
    assert z[-1] == sch.t_zero


def test_beta_spacing_rounds_to_comfyui_timesteps():
    # ComfyUI's beta_scheduler: rint(ppf(1 - linspace(0, 1, steps, endpoint=False)) * 999) on the 1000-entry table
    steps = 12
    comfy = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
    np.testing.assert_array_equal(np.rint(fd.timesteps(SD, steps, "beta")[:-1]), comfy)


# ---- sigma-space spacings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 31])
def test_kl_optimal(steps):
    u = np.arange(steps) / max(steps - 1, 1)
    t = fd.timesteps(EDM, steps, "kl_optimal")
    np.testing.assert_allclose(t[:-1], np.tan(u * math.atan(0.002) + (1 - u) * math.atan(80.0)), rtol=1e-12)
    assert t[-1] == 0.0
    s_min, s_max = sd_sigma_range()
    ts = fd.timesteps(SD, steps, "kl_optimal")[:-1]
    np.testing.assert_allclose(k_sigma(SD, ts), np.tan(u * math.atan(s_min) + (1 - u) * math.atan(s_max)),
                               rtol=1e-9)


def test_kl_optimal_reaches_infinite_sigma_of_flows_and_zero_snr():
    for sch in (FLOW, S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True)):
        t = fd.timesteps(sch, 6, "kl_optimal")
        assert t[0] == sch.t_max and np.all(np.diff(t) < 0)
        s_min = k_sigma(sch, sch.t_min)
        u = np.arange(1, 6) / 5
        expect = np.tan(u * math.atan(s_min) + (1 - u) * math.pi / 2)
        np.testing.assert_allclose(k_sigma(sch, t[1:-1]), expect, rtol=1e-9)


@pytest.mark.parametrize("rho", [None, 0.5, 2.0])
def test_polyexponential_is_k_diffusion_formula(rho):
    n = 9
    ramp = np.linspace(1, 0, n) ** (1.0 if rho is None else rho)
    expect = np.exp(ramp * (math.log(80.0) - math.log(0.002)) + math.log(0.002))
    kw = {} if rho is None else dict(rho=rho)
    t = fd.timesteps(EDM, n, "polyexponential", **kw)
    np.testing.assert_allclose(t[:-1], expect, rtol=1e-12)
    if rho is None:  # rho = 1 is the exponential spacing
        np.testing.assert_allclose(t, fd.timesteps(EDM, n, "exponential"), rtol=1e-12)


@pytest.mark.parametrize("mu,beta", [(0.0, 0.5), (1.0, 0.3), (-0.5, 1.0)])
def test_laplace(mu, beta):
    n = 12
    x = np.linspace(0, 1, n)
    lmb = mu - beta * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)
    expect = np.clip(np.exp(lmb), 0.002, 80.0)
    t = fd.timesteps(EDM, n, "laplace", laplace_mu=mu, laplace_beta=beta)
    np.testing.assert_allclose(t[:-1], expect, rtol=1e-12)
    s_min, s_max = sd_sigma_range()
    ts = fd.timesteps(SD, n, "laplace", laplace_mu=mu, laplace_beta=beta, final="t_min")
    x = np.linspace(0, 1, n + 1)
    lmb = mu - beta * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)
    np.testing.assert_allclose(k_sigma(SD, ts), np.clip(np.exp(lmb), s_min, s_max), rtol=1e-9)


def test_laplace_with_clamped_repeats_is_an_error():
    with pytest.raises(ValueError, match="repeated times"):
        fd.timesteps(EDM, 8, "laplace", laplace_mu=10.0)


# ---- model-time spacings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sch", [SD, EDM, FLOW, S.VE()], ids=repr)
def test_sgm_uniform(sch):
    t = fd.timesteps(sch, 7, "sgm_uniform")
    np.testing.assert_allclose(t[:-1], np.linspace(sch.t_max, sch.t_min, 8)[:-1], rtol=1e-12)
    assert t[-1] == sch.t_zero
    np.testing.assert_allclose(fd.timesteps(sch, 7, "sgm_uniform", final="t_min"), np.linspace(sch.t_max, sch.t_min, 8))


@pytest.mark.parametrize("steps", [1, 7, 10, 33, 1000])
def test_simple_is_comfyui_on_the_training_table(steps):
    n = 1000
    comfy = [n - 1 - int(x * (n / steps)) for x in range(steps)]  # index of sigmas[-(1 + int(x * ss))]
    t = fd.timesteps(SD, steps, "simple")
    np.testing.assert_array_equal(t[:-1], comfy)
    assert t[-1] == -1.0


def test_simple_on_continuous_schedules_is_sgm_uniform():
    np.testing.assert_array_equal(fd.timesteps(EDM, 9, "simple"), fd.timesteps(EDM, 9, "sgm_uniform"))


def test_normal_is_uniform():
    np.testing.assert_array_equal(fd.timesteps(SD, 9, "normal"), fd.timesteps(SD, 9, "uniform"))
    np.testing.assert_allclose(fd.timesteps(SD, 9, "normal")[:-1], np.linspace(999, 0, 9))


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 999])
def test_ddim_uniform(steps):
    n = 1000
    comfy, x, ss = [], 1, max(n // steps, 1)
    while x < n:  # ComfyUI's ddim_scheduler walk
        comfy.append(x)
        x += ss
    # ComfyUI may walk one step more than asked; fastdiff keeps the first `steps`
    np.testing.assert_array_equal(fd.timesteps(SD, steps, "ddim_uniform")[:-1], comfy[:steps][::-1])
    with pytest.raises(ValueError, match="ddim_uniform"):
        fd.timesteps(EDM, steps, "ddim_uniform")


def comfy_linear_quadratic(steps, threshold_noise=0.025, linear_steps=None):
    """ComfyUI's linear_quadratic_schedule before its scaling by sigma_max (Mochi's schedule)."""
    if steps == 1:
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = steps // 2
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quadratic_steps = steps - linear_steps
    qc = diff / (linear_steps * quadratic_steps**2)
    lc = threshold_noise / linear_steps - 2 * diff / (quadratic_steps**2)
    const = qc * (linear_steps**2)
    quad = [qc * i**2 + lc * i + const for i in range(linear_steps, steps)]
    return [1.0 - x for x in lin + quad + [1.0]]


@pytest.mark.parametrize("steps,kw", [(1, {}), (2, {}), (10, {}), (25, {}), (10, dict(linear_steps=3)),
                                      (12, dict(threshold_noise=0.1, linear_steps=8))])
def test_linear_quadratic(steps, kw):
    frac = np.array(comfy_linear_quadratic(steps, **kw))
    t = fd.timesteps(FLOW, steps, "linear_quadratic", final="t_min", **kw)
    np.testing.assert_allclose(t, FLOW.t_min + (FLOW.t_max - FLOW.t_min) * frac, rtol=1e-12, atol=1e-15)
    z = fd.timesteps(FLOW, steps, "linear_quadratic", **kw)
    np.testing.assert_allclose(z[:-1], t[:-1], rtol=0, atol=0)
    assert z[-1] == 0.0


# ---- published tables -------------------------------------------------------------------------------------------

# Align Your Steps (Sabour et al. 2024), NVIDIA's 10-step noise levels
AYS = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}


def loglinear_interp(t_steps, num_steps):
    """The Align Your Steps how-to's interpolation, as published."""
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
    return np.exp(new_ys)[::-1].copy()


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("steps", [4, 10, 25])
def test_ays_sd_tables(model, steps):
    expect = AYS[model] if steps == 10 else loglinear_interp(np.array(AYS[model]), steps + 1)
    t = fd.timesteps(SD, steps, "ays", ays_model=model)
    np.testing.assert_allclose(k_sigma(SD, t[:-1]), expect[:-1], rtol=1e-9)
    assert t[-1] == -1.0
    t_min = fd.timesteps(SD, steps, "ays", ays_model=model, final="t_min")
    np.testing.assert_allclose(k_sigma(SD, t_min), np.clip(expect, *sd_sigma_range()), rtol=1e-9)


def test_ays_matches_diffusers_published_timesteps():
    from diffusers.schedulers import AysSchedules

    for model, key in (("sd15", "StableDiffusionTimesteps"), ("sdxl", "StableDiffusionXLTimesteps")):
        t = fd.timesteps(SD, 10, "ays", ays_model=model)[:-1]
        np.testing.assert_array_equal(np.round(t), AysSchedules[key])


def test_ays_svd_needs_a_schedule_reaching_sigma_700():
    t = fd.timesteps(S.EDM(sigma_max=700.0), 10, "ays", ays_model="svd")
    np.testing.assert_allclose(t, AYS["svd"][:-1] + [0.0], rtol=1e-12)
    with pytest.raises(ValueError, match="svd.*sigma_max=700"):
        fd.timesteps(EDM, 10, "ays", ays_model="svd")


# GITS (Chen et al. 2024), coefficient 1.20: the 2-, 5-, 10- and 20-step rows
GITS_120 = {
    2: [14.61464119, 0.803307, 0.02916753],
    5: [14.61464119, 2.84484982, 1.24153244, 0.59516323, 0.25053367, 0.02916753],
    10: [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
         0.19894916, 0.09824532, 0.02916753],
    20: [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921,
         0.74807048, 0.59516323, 0.50118381, 0.41087446, 0.34370604, 0.29807833, 0.25053367, 0.22545385,
         0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753],
}


@pytest.mark.parametrize("steps", [2, 5, 10, 20, 32])
def test_gits_table(steps):
    expect = GITS_120[steps] if steps in GITS_120 else loglinear_interp(np.array(GITS_120[20]), steps + 1)
    t = fd.timesteps(SD, steps, "gits")
    np.testing.assert_allclose(k_sigma(SD, t[:-1]), expect[:-1], rtol=1e-9)
    assert t[-1] == -1.0


# ---- Flux's resolution-dependent shift --------------------------------------------------------------------------


def diffusers_calculate_shift():
    """diffusers' FluxPipeline ``calculate_shift``, read from its source (the pipeline module itself imports
    transformers)."""
    diffusers = pytest.importorskip("diffusers")
    path = pathlib.Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "calculate_shift")
    namespace = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["calculate_shift"]


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6400, 100])
def test_flux_shift_matches_diffusers(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = diffusers_calculate_shift()(seq_len)
    assert math.isclose(S.flux_shift(seq_len), math.exp(mu), rel_tol=1e-12)
    sch = S.RectifiedFlow.for_resolution(seq_len)
    assert sch.shift == S.flux_shift(seq_len)
    steps = 7
    s = np.linspace(1.0, 1.0 / steps, steps)  # FluxPipeline's sigmas
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(sigmas=s, mu=mu)
    np.testing.assert_allclose(sch.warp(s), ref.sigmas[:-1].double().numpy(), rtol=2e-6)
    t = fd.timesteps(sch, steps, "uniform")[:-1]
    u = np.linspace(1.0, 1e-3, steps)
    np.testing.assert_allclose(t, math.exp(mu) * u / (1 + (math.exp(mu) - 1) * u), rtol=1e-12)


@pytest.mark.parametrize("bad", [dict(image_seq_len=0), dict(image_seq_len=float("nan")),
                                 dict(image_seq_len=1024, base_seq_len=4096, max_seq_len=256),
                                 dict(image_seq_len="1024")])
def test_flux_shift_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="seq_len"):
        S.flux_shift(**bad)


# ---- every new spacing drives the solvers -----------------------------------------------------------------------


@pytest.mark.parametrize("spacing", NEW)
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral"])
def test_plan_builds_with_every_new_spacing(spacing, solver):
    for sch in (SD, S.EDM(sigma_max=700.0) if spacing == "ays" else EDM, SHIFTED_FLOW):
        pred = "flow" if sch is SHIFTED_FLOW else "epsilon"
        p = fd.plan(solver, sch, 8, spacing=spacing, prediction=pred)
        np.testing.assert_array_equal(p.times, fd.timesteps(sch, 8, spacing))
        assert p.steps == 8 and np.all(np.isfinite(p.rows()))
