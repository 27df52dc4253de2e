"""Plans (coefficient rows run by the torch backend, float64) against ``fastdiff.reference`` (the papers' algorithms
written out in float64), on a nonlinear model with the same Philox noise.

The model is the exact denoiser of a two-component Gaussian mixture, so every solver's steps see curvature and a
wrong coefficient cannot hide.  Noise: the torch backend draws ``rng.randn(shape, seeds, draw=k)`` for its k-th noisy
stage (k = 1, 2, ..; draw 0 is the prior), so the reference gets the same tensors as a list, consumed in order, and
must consume exactly as many.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastdiff
import fastdiff.reference as ref
from fastdiff import rng
from fastdiff.schedules import EDM, VE, ContinuousVP, DiscreteVP, RectifiedFlow, SubVP
from solver_checks import one_thread  # noqa: F401  (autouse: one torch thread in this module)

SHAPE = (3, 2, 3, 5)
SEEDS = [3, 11, 12345]
RTOL = 1e-10

SCHEDULES = {
    "DiscreteVP": DiscreteVP(),
    "scaled_linear": DiscreteVP.scaled_linear(),
    "ContinuousVP": ContinuousVP(),
    "SubVP": SubVP(),
    "VE": VE(),
    "EDM": EDM(),
    "RectifiedFlow": RectifiedFlow(),
}
SOLVERS = [s for s in fastdiff.SOLVERS if s != "unipc"]  # unipc is checked against diffusers (test_peers_*)
MULTISTEP = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms")
# solvers whose steps divide by alpha at the step start (x / alpha, f = alpha'/alpha): no step from alpha = 0
DIVIDE_BY_ALPHA = ("dpm_solver_singlestep", "dpm_solver_multistep", "heun", "dpm_2", "rk4", "lms", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "euler_maruyama",
                   "ipndm", "ipndm_v", "deis", "plms", "pndm", "res_multistep", "res_multistep_ancestral", "dpm_fast",
                   "sa_solver", "sa_solver_pece")
DIVIDE_BY_ALPHA += ("dpm_2_ancestral", "dpmpp_sde", "heunpp2", "seeds_2", "seeds_3", "er_sde")
DIVIDE_BY_ALPHA += ("deis_logrho",)  # diffusers' DEIS divides by alpha (x / alpha) and log rho
# options that keep the long inner loops short
FAST = {"annealed_langevin": {"corrector_steps": 3}}


# ---------------------------------------------------------------------------------------------------------------
# The test model: exact E[x0 | x_t] of a two-component isotropic Gaussian mixture, in any prediction type
# ---------------------------------------------------------------------------------------------------------------

_n = int(np.prod(SHAPE[1:]))
_MU = (torch.linspace(-1.0, 1.0, _n, dtype=torch.float64).reshape(SHAPE[1:]),
       0.5 + 0.8 * torch.cos(torch.arange(_n, dtype=torch.float64)).reshape(SHAPE[1:]))
_VAR = (0.3**2, 0.6**2)
_LOGW = (math.log(0.3), math.log(0.7))


def mixture_denoiser(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """D(x) = sum_k w_k(x) (mu_k + alpha s_k^2 / v_k (x - alpha mu_k)), v_k = alpha^2 s_k^2 + sigma^2, per sample."""
    logp, means = [], []
    for mu, s2, lw in zip(_MU, _VAR, _LOGW):
        v = alpha * alpha * s2 + sigma * sigma
        r = x - alpha * mu
        logp.append(lw - 0.5 * _n * math.log(v) - 0.5 * (r * r).reshape(x.shape[0], -1).sum(1) / v)
        means.append(mu + (alpha * s2 / v) * r)
    lp = torch.stack(logp, 1)
    w = (lp - lp.max(1, keepdim=True).values).exp()  # posterior weights (a hand-written softmax: tiny tensors)
    w = w / w.sum(1, keepdim=True)
    return sum(w[:, k].reshape((-1,) + (1,) * (x.dim() - 1)) * means[k] for k in range(len(_MU)))


def make_model(schedule, prediction):
    """model(x, model_time) -> output in ``prediction`` form, from the exact denoiser."""

    def model(x, t_model):
        mt = float(t_model[0])
        assert torch.all(t_model == mt)
        t = 1.0 - mt if getattr(schedule, "lipman_time", False) else mt  # schedule time
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        D = mixture_denoiser(x.to(torch.float64), a, s)
        if prediction == "x0":
            return D
        eps = (x - a * D) / s
        if prediction == "epsilon":
            return eps
        if prediction == "v":
            return a * eps - s * D
        if prediction == "score":
            return -eps / s
        return (float(schedule.dalpha(t)) * D + float(schedule.dsigma(t)) * eps) / schedule.model_time_rate

    return model


class Noises(list):
    """The Philox draws as a list that records how many the reference read."""

    def __init__(self, items):
        super().__init__(items)
        self.used = 0

    def __getitem__(self, k):
        self.used = max(self.used, k + 1)
        return super().__getitem__(k)


def _plan_or_none(solver, schedule, steps, prediction, final, grid_kw, opts):
    try:
        return fastdiff.plan(solver, schedule, steps, prediction, final=final, **grid_kw, **opts), None
    except ValueError as e:
        return None, e


def compare(solver, schedule, steps, prediction, final="zero", tol=None, grid_kw=None, **opts):
    """Run plan and reference; returns None when the plan (rightly) refuses the combination."""
    grid_kw = grid_kw or {}
    if tol is None:  # the documented exception for pc on SubVP applies to every test that compares
        tol = _tolerance(solver, schedule, final)
    plan, err = _plan_or_none(solver, schedule, steps, prediction, final, grid_kw, opts)
    model = make_model(schedule, prediction)
    if plan is None:
        # Only alpha = 0 at the start (rectified flow's t = 1) may make a plan impossible: an epsilon / score model
        # gives no data estimate there, and some solvers divide by alpha. The reference must refuse it too.
        assert isinstance(schedule, RectifiedFlow) and float(schedule.alpha(schedule.t_max)) == 0.0, err
        assert prediction in ("epsilon", "score") or solver in DIVIDE_BY_ALPHA, err
        x_T = rng.randn(SHAPE, SEEDS, draw=0, dtype=torch.float64)
        noises = [torch.zeros(SHAPE, dtype=torch.float64)] * 10_000
        with pytest.raises(ValueError):
            ref.sample(model, solver, schedule, steps, x_T, noises=noises, prediction=prediction, final=final,
                       **grid_kw, **opts)
        return None
    x_T = plan.init_scale * rng.randn(SHAPE, SEEDS, draw=0, dtype=torch.float64)
    x_fd = fastdiff.sample(model, plan, x_T=x_T, seeds=SEEDS, backend="torch")
    noises = Noises([rng.randn(SHAPE, SEEDS, draw=k, dtype=torch.float64) for k in range(1, plan.num_draws)])
    x_ref = ref.sample(model, solver, schedule, steps, x_T, noises=noises, prediction=prediction, final=final,
                       **grid_kw, **opts)
    assert x_fd.dtype == torch.float64 and x_ref.dtype == torch.float64
    assert noises.used == len(noises), f"reference used {noises.used} noise draws, the plan {len(noises)}"
    assert torch.isfinite(x_ref).all()
    diff = (x_fd - x_ref).abs()
    bound = tol * (1.0 + x_ref.abs().max().item())
    worst = int(diff.argmax())
    assert diff.max().item() <= bound, (
        f"{solver} on {schedule!r}, {prediction}, steps={steps}, final={final}, {opts}: max |plan - ref| = "
        f"{diff.max().item():.3e} > {bound:.3e} at flat index {worst} (plan {x_fd.flatten()[worst].item():.12g}, "
        f"ref {x_ref.flatten()[worst].item():.12g}); {int((diff > bound).sum())} of {diff.numel()} elements differ")
    return diff.max().item()


def _tolerance(solver, schedule, final):
    # Song's Langevin step size 2 r (snr ||z|| / ||score||)^2 on sub-VP at t_min (sigma = 1.1e-4): the score is
    # (alpha D - x) / sigma^2 from two O(1) numbers that agree to ~1e-7, and the step size depends on its norm, so the
    # plan's route (D first, then the score) and the reference's (the score from the output) differ by ~1e-9 relative
    # from rounding alone.
    if solver == "pc" and isinstance(schedule, SubVP) and final == "zero":
        return 1e-8
    # PNDM's one pseudo Runge-Kutta step from sub-VP's t = 1 (alpha = 0.0066) to t_min: the transfers scale x by
    # alpha_t / alpha_s = 152 and the fourth call's eps = (x - alpha D) / sigma divides by sigma = 1.1e-4, so the step
    # amplifies rounding ~1e6-fold; the plan (D first, eps from it) and the reference (eps from the output) differ by
    # ~2e-10 relative.
    if solver == "pndm" and isinstance(schedule, SubVP) and final == "t_min":
        return 1e-9
    return RTOL


# ---------------------------------------------------------------------------------------------------------------
# The sweep: every solver x schedule x prediction, two grids each (steps 1, 4, 7 and both finals across the row)
# ---------------------------------------------------------------------------------------------------------------

GRIDS = {
    "epsilon": [(1, "t_min"), (7, "zero")],
    "x0": [(1, "zero"), (4, "t_min")],
    "v": [(7, "t_min"), (4, "zero")],
    "score": [(4, "zero"), (7, "t_min")],
    "flow": [(7, "zero"), (1, "t_min")],
}
LONG_GRIDS = {"x0": (16, "t_min"), "v": (16, "zero")}  # >= 15 steps: multistep solvers without lower_order_final


def _sweep_cases():
    for solver in SOLVERS:
        for sname in SCHEDULES:
            for pred in fastdiff.PREDICTIONS:
                grids = list(GRIDS[pred])
                if solver in MULTISTEP and pred in LONG_GRIDS:
                    grids.append(LONG_GRIDS[pred])
                for steps, final in grids:
                    yield solver, sname, pred, steps, final


def _param(solver, sname, pred, steps, final):
    return pytest.param(solver, sname, pred, steps, final, id=f"{solver}-{sname}-{pred}-{steps}-{final}")


@pytest.mark.parametrize("solver,sname,prediction,steps,final", [_param(*c) for c in _sweep_cases()])
def test_plan_matches_reference(solver, sname, prediction, steps, final):
    schedule = SCHEDULES[sname]
    compare(solver, schedule, steps, prediction, final, tol=_tolerance(solver, schedule, final), **FAST.get(solver, {}))


# ---------------------------------------------------------------------------------------------------------------
# Solver options
# ---------------------------------------------------------------------------------------------------------------

_ALL = tuple(SCHEDULES)
_VPVE = ("DiscreteVP", "ContinuousVP", "SubVP", "VE", "EDM")
OPTION_CASES = [
    ("ddim", dict(eta=0.0), _ALL),
    ("ddim", dict(eta=0.5), _ALL),
    ("ddim", dict(eta=1.0), _ALL),
    ("ddpm", dict(variance="fixed_large"), _ALL),
    ("tcd", dict(gamma=0.3, float32_floor=True), ("DiscreteVP", "scaled_linear")),
    ("deis_logrho", dict(order=3, lower_order_final=False), ("DiscreteVP", "EDM")),
    ("heun", dict(s_churn=40.0), ("EDM", "VE", "ContinuousVP")),
    ("heun", dict(s_churn=10.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003), ("EDM", "DiscreteVP", "scaled_linear")),
    ("heun", dict(s_churn=40.0, s_noise=0.0), ("EDM",)),
    ("dpm_2", dict(s_churn=40.0), ("EDM", "SubVP")),
    ("dpm_2", dict(s_churn=10.0, s_tmin=0.05, s_tmax=10.0), ("DiscreteVP",)),
    # churn above the top of a DiscreteVP table: the model at the clamped t_max, the state at the level s_hat
    ("heun", dict(s_churn=40.0), ("DiscreteVP", "scaled_linear")),
    ("dpm_2", dict(s_churn=40.0), ("DiscreteVP",)),
    ("pc", dict(predictor="reverse_diffusion", corrector_steps=2), _ALL),
    ("pc", dict(predictor="euler_maruyama", corrector_steps=2, snr=0.3), _VPVE),
    ("annealed_langevin", dict(corrector_steps=3, step_size=1e-3), ("DiscreteVP", "VE", "EDM", "RectifiedFlow")),
    ("dpmpp_2m", dict(solver_type="heun"), _ALL),
    ("dpmpp_2m", dict(lower_order_final=False), _VPVE),
    ("dpmpp_3m", dict(solver_type="heun"), _ALL),
    ("dpmpp_3m", dict(lower_order_final=False), ("EDM", "ContinuousVP")),
    ("dpmpp_2m_sde", dict(solver_type="heun"), _ALL),
    ("dpmpp_2m_sde", dict(eta=0.5, s_noise=0.8), _VPVE),
    ("dpmpp_2m_sde", dict(eta=0.0), ("EDM", "RectifiedFlow")),
    ("dpmpp_3m_sde", dict(eta=0.5, s_noise=0.8), _VPVE),
    ("dpmpp_3m_sde", dict(eta=0.0, lower_order_final=False), ("EDM", "RectifiedFlow")),
    ("dpmpp_3m_sde", dict(solver_type="midpoint", eta=0.5), _VPVE),
    ("dpmpp_2m", dict(euler_at_final=True, lower_order_final=False), ("EDM", "DiscreteVP")),
    ("dpmpp_3m", dict(euler_at_final=True, lower_order_final=False), ("EDM", "ContinuousVP")),
    ("dpmpp_2m_sde", dict(euler_at_final=True, lower_order_final=False), ("VE",)),
    ("euler_ancestral", dict(eta=0.5), _VPVE),
    ("euler_ancestral", dict(eta=1.0, s_noise=0.5), _ALL),
    ("euler_ancestral", dict(eta=0.0), ("EDM",)),
    ("dpmpp_2s_ancestral", dict(eta=0.5), _VPVE),
    ("dpmpp_2s_ancestral", dict(eta=0.0), ("EDM",)),
    ("lms", dict(order=2), ("EDM", "DiscreteVP")),
    ("lms", dict(order=3), ("VE",)),
    ("dpm_solver_singlestep", dict(order=3), _ALL),
    ("dpm_solver_singlestep", dict(order=3, solver_type="heun"), _VPVE),
    ("dpm_solver_singlestep", dict(order=1), ("EDM",)),
    ("dpm_solver_singlestep", dict(algorithm="sde-dpmsolver++", order=3, solver_type="heun"), _VPVE),
    ("dpm_solver_singlestep", dict(algorithm="sde-dpmsolver++", order=2), ("EDM", "DiscreteVP")),
    ("lcm", dict(timestep_scaling=1.0), ("DiscreteVP", "scaled_linear")),
]

# noise-prediction singlestep DPM-Solver cannot end on the clean point (sigma_t (e^h - 1) = 0 * inf): t_min grids
NOISE_SINGLESTEP = [
    pytest.param("dpm_solver_singlestep", dict(algorithm="dpmsolver", order=o, solver_type=st), sname, pred, n,
                 "t_min", id=f"dpmsolver-{o}-{st}-{sname}-{pred}-{n}")
    for o in (2, 3) for st in ("midpoint", "heun") for sname in ("DiscreteVP", "EDM", "ContinuousVP")
    for pred, n in (("epsilon", 7), ("v", 6))
] + [
    pytest.param("dpm_solver_multistep", dict(algorithm=a, order=o, solver_type=st, lower_order_final=lof), sname,
                 pred, n, "t_min", id=f"multistep-{a}-{o}-{st}-{lof}-{sname}-{pred}-{n}")
    for a, o in (("dpmsolver", 1), ("dpmsolver", 2), ("dpmsolver", 3), ("sde-dpmsolver", 2))
    for st in ("midpoint", "heun") for lof in (True, False) for sname in ("DiscreteVP", "EDM", "SubVP")
    for pred, n in (("epsilon", 7), ("x0", 16))
] + [
    # explicit group orders (what a diffusers img2img start in the middle of a group gives)
    pytest.param("dpm_solver_singlestep", dict(solver_type="heun", orders=(1, 2, 1, 1, 2, 3, 1)), sname, "epsilon",
                 7, "zero", id=f"singlestep-orders-{sname}") for sname in ("DiscreteVP", "EDM")
]


def _option_cases():
    for solver, opts, snames in OPTION_CASES:
        for sname in snames:
            for pred, steps, final in (("v", 4, "t_min"), ("epsilon", 7, "zero"), ("x0", 16, "zero")):
                if steps == 16 and solver not in MULTISTEP:
                    continue
                kv = ",".join(f"{k}={v}" for k, v in opts.items())
                yield pytest.param(solver, opts, sname, pred, steps, final,
                                   id=f"{solver}[{kv}]-{sname}-{pred}-{steps}-{final}")


@pytest.mark.parametrize("solver,opts,sname,prediction,steps,final", list(_option_cases()) + NOISE_SINGLESTEP)
def test_options_match_reference(solver, opts, sname, prediction, steps, final):
    schedule = SCHEDULES[sname]
    compare(solver, schedule, steps, prediction, final, tol=_tolerance(solver, schedule, final), **opts)


# ---------------------------------------------------------------------------------------------------------------
# Grids: spacings, custom timesteps / sigmas, flow time conventions
# ---------------------------------------------------------------------------------------------------------------

GRID_CASES = [
    ("DiscreteVP", dict(spacing="karras")),
    ("DiscreteVP", dict(spacing="logsnr")),
    ("DiscreteVP", dict(spacing="leading", steps_offset=1)),
    ("scaled_linear", dict(spacing="linspace")),
    ("ContinuousVP", dict(spacing="logsnr")),
    ("VE", dict(spacing="karras", rho=5.0)),
    ("EDM", dict(spacing="uniform")),
    ("SubVP", dict(spacing="quadratic")),
]
GRID_SOLVERS = ("ddim", "ddpm", "heun", "rk4", "lms", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m_sde", "euler_ancestral",
                "dpmpp_2s_ancestral", "pc", "flow_heun")


@pytest.mark.parametrize("solver", GRID_SOLVERS)
@pytest.mark.parametrize("sname,grid", GRID_CASES, ids=[f"{s}-{'-'.join(map(str, g.values()))}" for s, g in GRID_CASES])
def test_spacings_match_reference(solver, sname, grid):
    schedule = SCHEDULES[sname]
    grid = dict(grid)
    spacing = {"spacing": grid.pop("spacing")}
    compare(solver, schedule, 5, "v", "zero", grid_kw=spacing, **grid)


CUSTOM = [
    ("EDM", dict(sigmas=[80.0, 20.0, 4.0, 1.0, 0.3, 0.05, 0.0])),
    ("EDM", dict(sigmas=[14.6, 3.0, 0.7, 0.2])),
    ("scaled_linear", dict(sigmas=[14.6, 5.0, 1.5, 0.4, 0.1, 0.0])),
    ("DiscreteVP", dict(timesteps=[999, 800, 601, 400.5, 200, 50])),
    ("ContinuousVP", dict(timesteps=[1.0, 0.7, 0.45, 0.2, 0.05])),
]


@pytest.mark.parametrize("solver", ("ddim", "euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                                    "euler_ancestral", "dpm_solver_2", "euler_maruyama"))
@pytest.mark.parametrize("sname,grid", CUSTOM, ids=[f"{s}-{next(iter(g))}{len(next(iter(g.values())))}"
                                                    for s, g in CUSTOM])
def test_custom_grids_match_reference(solver, sname, grid):
    compare(solver, SCHEDULES[sname], None, "epsilon", "zero", grid_kw=grid)


@pytest.mark.parametrize("solver", ("flow_euler", "flow_heun", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "pc"))
@pytest.mark.parametrize("schedule", [RectifiedFlow.lipman(), RectifiedFlow(shift=3.0)], ids=["lipman", "shift3"])
@pytest.mark.parametrize("prediction", ("flow", "x0"))
def test_flow_conventions_match_reference(solver, schedule, prediction):
    """Lipman's time (model called at 1 - t, model_time_rate = -1) and SD3's shift."""
    compare(solver, schedule, 6, prediction, "zero")
    compare(solver, schedule, 3, prediction, "t_min")


# ---------------------------------------------------------------------------------------------------------------
# Regressions: mismatches this suite found in the plan (now fixed)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sname", ("EDM", "ContinuousVP"))
def test_dpmpp_2s_ancestral_large_eta_keeps_its_noise(sname):
    """sigma_down = 0 with sigma_up > 0: the Euler step is followed by the ancestral noise, as in k-diffusion."""
    compare("dpmpp_2s_ancestral", SCHEDULES[sname], 4, "epsilon", "zero", eta=2.0)


def test_euler_ancestral_eta_below_one_from_alpha_zero():
    """sigma_up's limit eta s' when the step starts at alpha = 0 (rectified flow, t = 1)."""
    compare("euler_ancestral", RectifiedFlow(), 4, "v", "zero", eta=0.5)


def test_dpm_2_midpoint_above_discrete_table():
    """A churned midpoint above a DiscreteVP table converts the model output at its own noise level."""
    compare("dpm_2", SCHEDULES["DiscreteVP"], 40, "epsilon", "zero", s_churn=40.0)


# ---------------------------------------------------------------------------------------------------------------
# The registry and errors
# ---------------------------------------------------------------------------------------------------------------


def test_reference_does_not_import_the_plan_machinery():
    """The reference is the independent check on the rows: only schedules and timesteps may be shared."""
    import ast
    import pathlib

    allowed = {"fastdiff.schedules", "fastdiff.timesteps"}
    root = pathlib.Path(ref.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                mod = "fastdiff.reference" if node.level == 1 else "fastdiff"
                names = [f"{mod}.{node.module}" if node.module else f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("fastdiff") and not name.startswith("fastdiff.reference"):
                    assert name in allowed, f"{path.name} imports {name}"


def test_reference_covers_exactly_the_plan_solvers():
    assert set(ref.REFERENCES) <= set(fastdiff.SOLVERS), set(ref.REFERENCES) - set(fastdiff.SOLVERS)
    assert set(fastdiff.SOLVERS) - set(ref.REFERENCES) == {"unipc"}


@pytest.mark.parametrize("solver", SOLVERS)
def test_reference_defaults_match_plan_defaults(solver):
    assert ref.options(solver) == fastdiff.solver_options(solver)


def test_unknown_solver_and_option_raise():
    model = make_model(EDM(), "x0")
    x_T = torch.zeros(SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match="no reference"):
        ref.sample(model, "no_such_solver", EDM(), 4, x_T)
    with pytest.raises(ValueError, match="no reference"):
        ref.sample(model, "unipc", EDM(), 4, x_T)
    with pytest.raises(ValueError, match="no option"):
        ref.sample(model, "euler", EDM(), 4, x_T, eta=1.0)
    with pytest.raises(ValueError, match="prediction"):
        ref.sample(model, "euler", EDM(), 4, x_T, prediction="velocity")


def test_noise_list_errors():
    model = make_model(EDM(), "x0")
    x_T = 80.0 * rng.randn(SHAPE, SEEDS, dtype=torch.float64)
    with pytest.raises(ValueError, match="noises"):
        ref.sample(model, "euler_ancestral", EDM(), 4, x_T)
    z = [rng.randn(SHAPE, SEEDS, draw=k, dtype=torch.float64) for k in (1, 2)]
    with pytest.raises(ValueError, match="noises has 2"):
        ref.sample(model, "euler_ancestral", EDM(), 4, x_T, noises=z)  # needs 3 draws
    out = ref.sample(model, "euler_ancestral", EDM(), 4, x_T, noises=z + [z[0]])
    assert out.dtype == torch.float64 and out.shape == SHAPE
