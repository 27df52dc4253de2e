"""Property-based tests (hypothesis) of plan() and sample() over solver x schedule x spacing x options x dtype.

Properties:

1. ``fd.plan(...)`` either raises a ValueError whose message names one of the arguments or options it was given
   (never another exception type), or returns a plan with which ``fd.sample`` on the exact Gaussian-mixture model
   (``fastdiff.models.GaussianMixture``, which predicts what the plan declares) returns a finite sample.  Values no
   option accepts (NaN, a string for a number, an unknown option name) must be refused.
2. For accepted plans the cpu backend equals the torch backend within float32 tolerance.
3. ``fd.sample``'s bad arguments raise ValueError naming the argument.

Solvers are drawn from ``fd.SOLVERS`` and options from ``fd.solver_options(name)`` at run time, so solvers added
later are covered without editing this file.

Where half precision is not tested (the strategies leave these out; float32 and float64 cover them):

- fp16 on VE / EDM schedules with sigma_max > 60000: the prior std itself overflows float16 (max 65504); the
  strategies' VE / EDM schedules stay below that, so fp16 runs on them.
- fp16 for plans with a coefficient beyond 2^11 = 2048 (float16's significand): the rounding of the stored x and
  slots (2^-11 relative) times such a coefficient exceeds the data's scale, so the result is noise even where it is
  finite, and a slot holding such a multiple of x overflows.  This happens a step away from alpha = 0 with the
  k-diffusion-style solvers, which work in y = x / alpha (``dpm_2`` on ``RectifiedFlow`` from t = 0.99999: a slot
  of 1e5 x), and with epsilon / score predictions at tiny alpha (D = (x - sigma eps) / alpha).
- Langevin solvers (``pc``, ``annealed_langevin``) in fp16: the corrector's step size is a ratio of per-sample
  norms, ``||z||^2 / ||score||^2``, and the score at small sigma is ~ x / sigma^2 (1e6 at sigma = 1e-3), whose
  squared norm overflows float16.  bf16 has float32's range and is tested.

Not checked for finiteness (it runs, the result is not asserted): ``annealed_langevin`` with a ``step_size`` at or
above 4 sigma_L^2 (sigma_L: the smallest level), where the Langevin update expands instead of contracting along
data directions of small variance (see ``_stable``).

Profiles: ``ci`` (default; a fixed example count, derandomized, so CI runs the same examples every time) and
``long`` (many more random examples, by hand): ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.models import GaussianMixture
from fastdiff.timesteps import SPACING_OPTIONS

# numpy's "invalid value" warnings mark a NaN made on the way (e.g. the log of a negative alpha): an error here
pytestmark = pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, suppress_health_check=_HEALTH,
                          database=None, print_blob=True)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=_HEALTH,
                          print_blob=True)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
_CI = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci"


def _few(n):
    """The profile with ``n`` examples under ``ci`` (a property cheaper or dearer than the main one)."""
    return settings(PROFILE, max_examples=n) if _CI else PROFILE


GM = GaussianMixture([-1.0, 0.5, 2.0], [0.5, 0.2, 0.3], weights=[0.3, 0.3, 0.4])
LANGEVIN = ("pc", "annealed_langevin")

SCHEDULES = [
    S.DiscreteVP.scaled_linear(),
    S.DiscreteVP.linear(),
    S.DiscreteVP.cosine(),
    S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True),
    S.DiscreteVP.linear(num_train_timesteps=50),
    S.ContinuousVP(),
    S.SubVP(),
    S.VE(),
    S.VE(sigma_min=0.002, sigma_max=300.0),
    S.EDM(),
    S.EDM(sigma_min=0.01, sigma_max=700.0),
    S.RectifiedFlow(),
    S.RectifiedFlow.lipman(),
]
schedules = st.one_of(
    st.sampled_from(SCHEDULES),
    st.builds(S.RectifiedFlow, shift=st.floats(0.2, 6.0)),
    st.builds(lambda s: S.ContinuousVP(t_min=s, t_max=1.0), st.floats(1e-4, 0.5)),
)

# Values no option of any solver or spacing accepts; a plan given one must refuse it.
POISON = [float("nan"), "abc", [1.0, "x"], {"a": 1}, object()]


def _rare(draw, n):
    """True with probability about 1 / n.  (Hypothesis draws the ends of an integer range far more often than the
    middle, so the rare case is a middle value.)"""
    return draw(st.integers(0, n - 1)) == n // 2


def _near(default):
    """Valid-looking values around an option's default (the solver may still refuse some: that is allowed)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(max(0, default - 3), default + 3) if default < 20 else st.integers(1, 8)
    if isinstance(default, float):
        if math.isinf(default):
            return st.sampled_from([default, 1.0, 50.0])
        return st.one_of(st.just(default), st.floats(0.0, max(2.0 * abs(default), 1.0)))
    if isinstance(default, tuple):
        return st.one_of(st.just(default), st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple))
    if default is None:
        return st.one_of(st.none(), st.floats(1e-4, 0.5))
    return st.just(default)


def _odd(default):
    """Values that are out of range or of the wrong type for most options (may be refused, must not crash)."""
    return st.sampled_from([-1.0, -1, float("inf"), -float("inf"), 0, 0.0, 10**9, 1e30, True, None, "",
                            "midpoint", "bh1", "dpmsolver++", "fixed_large", "euler", (), (1, 2), 2.5])


@st.composite
def solver_options(draw, solver):
    """(options dict, names of poisoned options): a subset of the solver's options, valid, odd or poison."""
    defaults = fd.solver_options(solver)
    opts, poisoned = {}, []
    for name, default in defaults.items():
        kind = "poison" if _rare(draw, 12) else draw(st.sampled_from(["skip", "near", "skip", "odd", "near", "skip", "near"]))
        if kind == "near":
            opts[name] = draw(_near(default))
        elif kind == "odd":
            opts[name] = draw(_odd(default))
        elif kind == "poison":
            opts[name] = draw(st.sampled_from(POISON))
            poisoned.append(name)
    if _rare(draw, 10):  # an unknown option name
        bad = draw(st.sampled_from(["etaa", "order_", "step", "noise", "bogus"]))
        opts[bad] = 1.0
        poisoned.append(bad)
    return opts, poisoned


SPACING_VALUES = {
    "rho": st.one_of(st.floats(0.5, 10.0), st.sampled_from([0, -1.0, float("nan"), "7"])),
    "steps_offset": st.one_of(st.integers(0, 3), st.sampled_from([-1, 1.5, 10**6])),
    "beta_dist_alpha": st.one_of(st.floats(0.2, 3.0), st.sampled_from([0.0, -1.0, float("inf")])),
    "beta_dist_beta": st.one_of(st.floats(0.2, 3.0), st.sampled_from([0.0, -1.0, float("nan")])),
    "laplace_mu": st.one_of(st.floats(-2.0, 2.0), st.sampled_from([float("nan")])),
    "laplace_beta": st.one_of(st.floats(0.1, 2.0), st.sampled_from([0.0, -0.5])),
    "threshold_noise": st.one_of(st.floats(0.005, 0.5), st.sampled_from([0.0, 1.0, 2.0])),
    "linear_steps": st.one_of(st.integers(1, 10), st.sampled_from([0, -1, 2.5])),
    "ays_model": st.sampled_from(["sd15", "sdxl", "svd", "sd3", 1]),
}


@st.composite
def spacing_options(draw):
    opts = {}
    for name in SPACING_OPTIONS:
        if name in SPACING_VALUES and _rare(draw, 6):
            opts[name] = draw(SPACING_VALUES[name])
    return opts


@st.composite
def grids(draw, schedule):
    """A custom grid keyword: {"sigmas": [...]}, {"timesteps": [...]} (valid or not), or {} for a named spacing."""
    kind = "bad" if _rare(draw, 8) else draw(st.sampled_from(["none", "sigmas", "none", "timesteps", "none"]))
    n = draw(st.integers(1, 12))
    if kind == "sigmas":
        s_hi = float(np.exp(-schedule.lambda_(schedule.t_max)))
        s_lo = float(np.exp(-schedule.lambda_(schedule.t_min)))
        s_hi = min(s_hi, 1e3)  # zero-SNR / flow schedules: sigma/alpha = inf at t_max
        pts = np.sort(np.unique(np.exp(draw(st.lists(st.floats(math.log(s_lo), math.log(s_hi)),
                                                     min_size=n + 1, max_size=n + 1)))))[::-1]
        pts = list(map(float, pts))
        if len(pts) < 2 or draw(st.booleans()):  # repeated draws collapse in unique(): end on the clean point
            pts.append(0.0)
        return {"sigmas": pts}
    if kind == "timesteps":
        lo, hi = float(schedule.t_min), float(schedule.t_max)
        pts = sorted(set(draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))), reverse=True)
        if pts[-1] <= schedule.t_zero:
            pts = pts[:-1] or [hi]
        return {"timesteps": pts}
    if kind == "bad":
        return {draw(st.sampled_from(["sigmas", "timesteps"])): draw(st.sampled_from(
            [[1.0, 2.0, 0.0], [5.0, float("nan"), 0.0], [5.0, 5.0, 1.0], [3.0, -1.0], "1,2,3", [[1.0, 0.5]], [],
             [1e12, 1.0, 0.0], ["a", "b"]]))}
    return {}


@st.composite
def plan_requests(draw):
    """Keyword arguments for fd.plan and the names that a refusal may blame, plus the poisoned option names."""
    solver = draw(st.sampled_from(fd.SOLVERS))
    schedule = draw(schedules)
    opts, poisoned = draw(solver_options(solver))
    kw = dict(solver=solver, schedule=schedule, prediction=draw(st.sampled_from(fd.PREDICTIONS)), **opts)
    grid = draw(grids(schedule))
    if grid:
        kw.update(grid)
        if _rare(draw, 5):
            kw["steps"] = draw(st.integers(1, 30))
    else:
        kw["steps"] = draw(st.integers(1, 30))
        if draw(st.booleans()):
            kw["spacing"] = draw(st.sampled_from(fd.SPACINGS))
        kw["final"] = draw(st.sampled_from(["zero", "t_min"]))
        kw.update(draw(spacing_options()))
    if solver in ("annealed_langevin", "pc"):  # keep the stage count (run time) bounded
        cs = kw.get("corrector_steps")
        if cs is None or (isinstance(cs, int) and not isinstance(cs, bool) and cs > 5):
            kw["corrector_steps"] = draw(st.integers(1, 5))
    if _rare(draw, 20):  # a bad top-level argument
        name, value = draw(st.sampled_from([("final", "end"), ("prediction", "eps"), ("spacing", "karas"),
                                            ("steps", 0), ("steps", 2.5), ("spacing", 3), ("final", None)]))
        kw[name] = value
        poisoned.append(name)
    return kw, poisoned


def _blamable(kw):
    """Words a refusal of this request may name: its arguments, options and the schedule's class."""
    words = set(kw) | {type(kw["schedule"]).__name__, "solver", "schedule", "spacing", "steps", "prediction",
                       "final"}
    words |= {str(kw["solver"])} | {str(kw.get("spacing"))}
    return words


def _check_refusal(err, kw):
    msg = str(err)
    assert any(w in msg for w in _blamable(kw)), f"the ValueError names none of the arguments: {msg}"


def _model(plan):
    return GM.model(plan.schedule, plan.prediction)


def _try_plan(kw, poisoned):
    kw = dict(kw)
    solver, schedule = kw.pop("solver"), kw.pop("schedule")
    try:
        p = fd.plan(solver, schedule, **kw)
    except ValueError as e:
        _check_refusal(e, {"solver": solver, "schedule": schedule, **kw})
        if poisoned and all(n in kw for n in poisoned):
            clean = {k: v for k, v in kw.items() if k not in poisoned}
            try:
                fd.plan(solver, schedule, **clean)
            except ValueError:
                return None  # refused for another reason as well
            assert any(n in str(e) for n in poisoned), f"the refusal names none of {poisoned}: {e}"
        return None
    assert not poisoned, f"plan accepted the bad values of {poisoned}: {p!r}"
    return p


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _stable(plan):
    """False for the one accepted option that diverges by design: an annealed_langevin step_size >= 4 sigma_L^2.

    The update x += eps/2 score contracts each direction by 1 - eps / (2 var) with var >= sigma^2 (the level's
    noise), so with eps_i = step_size sigma_i^2 / sigma_L^2 it expands along data directions of small variance
    once step_size >= 4 sigma_L^2.  The plan accepts it: whether it diverges depends on the data's variance and on
    corrector_steps (a few steps of a large size are used, e.g. against the reference implementation).
    """
    options = dict(plan.options)
    if plan.solver != "annealed_langevin" or options.get("step_size") is None:
        return True
    levels = plan.sigmas[1:][plan.sigmas[1:] > 0]
    return not levels.size or options["step_size"] < 4.0 * float(levels[-1]) ** 2


def _half_ok(plan, dtype):
    """fp16 / bf16 cases the module docstring excludes."""
    if dtype == torch.float16 and plan.solver in LANGEVIN:
        return False
    if dtype == torch.float16:
        # the prior x_T = init_scale * n itself overflows float16 (a custom sigmas= grid can start at any level)
        if plan.init_scale * 6 > torch.finfo(torch.float16).max:
            return False
        # coefficients beyond 2^11 (float16's significand) amplify the rounding of the stored x / slots past the
        # data's scale: the result is noise, and a slot holding such a multiple of x overflows (k-diffusion-style
        # solvers' y = x / alpha a step from alpha = 0, e.g. dpm_2 on RectifiedFlow from t = 0.99999)
        if np.abs(plan.rows()).max() > 2.0**11:
            return False
    return True


@PROFILE
@given(req=plan_requests(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(["torch", "cpu"]))
@example(req=({"solver": "heun", "schedule": S.EDM(), "sigmas": [10, 5, 2, 1, .5, .2, 0]}, []),
         dtype=torch.float32, backend="torch")
# diverges by design (step_size far above 4 sigma_L^2): runs, its result is not checked
@example(req=({"solver": "annealed_langevin", "schedule": S.DiscreteVP.scaled_linear(), "prediction": "epsilon",
               "step_size": 10**9, "steps": 2, "final": "t_min", "corrector_steps": 2}, []),
         dtype=torch.float32, backend="torch")
# RectifiedFlow.warp(1) was 1 + 2^-52 for shift 0.2: alpha < 0 at the first time (log of a negative number)
@example(req=({"solver": "annealed_langevin", "schedule": S.RectifiedFlow(shift=0.2), "prediction": "epsilon",
               "steps": 1, "final": "zero", "corrector_steps": 1}, []), dtype=torch.float32, backend="torch")
def test_plan_refuses_clearly_or_samples_finite(req, dtype, backend):
    kw, poisoned = req
    p = _try_plan(kw, poisoned)
    if p is None:
        return
    if dtype == torch.float64:
        backend = "torch"  # the kernels take float32 / float16 / bfloat16 data
    if not _half_ok(p, dtype):
        dtype = torch.float32
    x = fd.sample(_model(p), p, shape=(2, 3), seeds=[1, 2], dtype=dtype, backend=backend,
                  check_finite="end" if _stable(p) else "off")
    assert x.dtype == dtype and x.shape == (2, 3)
    if _stable(p):
        assert torch.isfinite(x).all(), f"{p!r} gave {x} in {dtype} on {backend}"


@_few(100)
@given(req=plan_requests())
def test_cpu_backend_equals_torch_backend(req):
    kw, poisoned = req
    p = _try_plan(kw, poisoned)
    if p is None:
        return
    model = _model(p)
    a = fd.sample(model, p, shape=(2, 3), seeds=[1, 2], dtype=torch.float32, backend="torch")
    b = fd.sample(model, p, shape=(2, 3), seeds=[1, 2], dtype=torch.float32, backend="cpu")
    scale = 1.0 + float(a.abs().max())
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale)


_PLAN = fd.plan("euler_ancestral", S.DiscreteVP.scaled_linear(), steps=3)
BAD_SAMPLE_ARGS = [
    ("seeds", dict(shape=(2, 3), seeds=5)),
    ("seeds", dict(shape=(2, 3), seeds=[1])),
    ("seeds", dict(shape=(2, 3), seeds=["a", "b"])),
    ("seeds", dict(shape=(2, 3), seeds=[-1, 2])),
    ("seeds", dict(shape=(2, 3))),
    ("shape", dict(shape=3, seeds=[1, 2, 3])),
    ("shape", dict(shape=(2, -3), seeds=[1, 2])),
    ("shape", dict(shape=(0, 3), seeds=[])),
    ("shape", dict(shape=(2, 3), x_T=torch.zeros(2, 4), seeds=[1, 2])),
    ("dtype", dict(shape=(2, 3), seeds=[1, 2], dtype="float")),
    ("dtype", dict(shape=(2, 3), seeds=[1, 2], dtype=torch.int32)),
    ("backend", dict(shape=(2, 3), seeds=[1, 2], backend="nope")),
    ("guidance_scale", dict(shape=(2, 3), seeds=[1, 2], guidance_scale=2.0)),
    ("guidance_scale", dict(shape=(2, 3), seeds=[1, 2], guidance_scale="abc", uncond={})),
    ("uncond", dict(shape=(2, 3), seeds=[1, 2], uncond={"y": torch.zeros(2)})),
    ("cond", dict(shape=(2, 3), seeds=[1, 2], cond=[1, 2])),
    ("cond", dict(shape=(2, 3), seeds=[1, 2], cond=torch.zeros(2))),
    ("check_finite", dict(shape=(2, 3), seeds=[1, 2], check_finite="always")),
    ("x_T", dict(x_T=[[1.0, 2.0]], seeds=[1])),
    ("noise", dict(x_T=torch.zeros(2, 3), noise=torch.zeros(2, 3), seeds=[1, 2])),
    ("callback", dict(shape=(2, 3), seeds=[1, 2], callback=3)),
    ("device", dict(shape=(2, 3), seeds=[1, 2], device="nodevice")),
]


@_few(40)
@given(case=st.sampled_from(BAD_SAMPLE_ARGS), backend=st.sampled_from(["torch", "cpu"]))
def test_sample_bad_arguments_raise_value_error(case, backend):
    name, kwargs = case
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError) as info:
        fd.sample(_model(_PLAN), _PLAN, **kwargs)
    assert name in str(info.value) or (name == "x_T" and "start state" in str(info.value)), str(info.value)


def test_plan_not_a_plan_or_model_not_callable():
    with pytest.raises(ValueError, match="plan"):
        fd.sample(_model(_PLAN), "euler", shape=(2, 3), seeds=[1, 2])
    with pytest.raises(ValueError, match="model"):
        fd.sample(3, _PLAN, shape=(2, 3), seeds=[1, 2])
