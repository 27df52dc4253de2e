"""The solver language (Builder, slots, history rings), the solver declarations, and plan() on bad or extreme input."""

import ast
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

import fastdiff as fd
from fastdiff import schedules as S
from fastdiff.solvers import SOLVERS, alpha_zero_solvers
from fastdiff.solvers.builder import Builder, Lin

PKG = pathlib.Path(fd.__file__).parent


# ---- imports: plan -> solvers, never back; no circle anywhere ----------------------------------------------------


def _import_graph():
    """Module -> modules it imports (module level and inside functions), resolved within the fastdiff package."""
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = ("fastdiff",) + f.relative_to(PKG).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                # "from pkg import sub" imports the submodule; "from pkg import name" reads pkg's __init__
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def test_no_import_circle_and_solvers_do_not_import_plan():
    graph = _import_graph()
    assert "fastdiff.solvers.builder" in graph and "fastdiff.plan" in graph
    for m, deps in graph.items():
        if m.startswith("fastdiff.solvers"):
            assert "fastdiff.plan" not in deps, f"{m} imports fastdiff.plan"
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# ---- the Builder's slots and history rings ----------------------------------------------------------------------


def test_builder_counts_slots_and_rings_hide_the_modular_arithmetic():
    b = Builder(S.EDM(), "x0")
    x_hat = b.slot("x_hat")
    ring = b.history("D", 3)
    assert b.num_slots == 4 and x_hat.index == 0
    written = []
    for i in range(7):
        X, D = b.call(1.0)
        if i >= 1:
            assert ring[1].c == {1 + (i - 1) % 3: 1.0}  # the previous push, written out by hand
        if i >= 3:
            assert ring[3].c == {1 + (i - 3) % 3: 1.0}
        with pytest.raises(IndexError):
            ring[min(i, 3) + 1]
        ring.push(D + i * X)
        b.update(x=X, slots={x_hat: X})
        written.append(b.stages[-1].slots)
    for i, w in enumerate(written):
        assert set(w) == {0, 1 + i % 3} and w[1 + i % 3].c == ({"D": 1.0, "x": float(i)} if i else {"D": 1.0, "x": 0.0})
    empty = b.history("nothing", 0)
    b.call(1.0)
    empty.push(Lin({"D": 1.0}))
    b.update(x=b.X)
    assert b.stages[-1].slots == {} and b.num_slots == 4


# ---- which solvers run where alpha = 0 is declared, and the errors list them -------------------------------------

ZERO_SNR = (S.RectifiedFlow(), S.DiscreteVP.scaled_linear(rescale_betas_zero_snr=True))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_alpha_zero_declarations_match_what_builds(solver):
    built = []
    for sch in ZERO_SNR:
        try:
            fd.plan(solver, sch, 5, prediction="v")
            built.append(True)
        except ValueError as e:
            msg = str(e)
            assert solver in msg and repr(sch) in msg and "alpha" in msg, msg
            others = [n for n in alpha_zero_solvers() if n != solver]
            assert ", ".join(others) in msg, msg  # the list comes from the declarations
            built.append(False)
    if solver in ("flow_euler", "flow_heun"):  # the discrete table's derivatives are not finite at its last entry
        assert built[0]
    else:
        assert all(built) == SOLVERS[solver].alpha_zero and any(built) == all(built), built


def test_rk4_on_a_flow_says_which_solvers_work_there():
    with pytest.raises(ValueError) as e:
        fd.plan("rk4", S.RectifiedFlow(), 8, prediction="flow")
    msg = str(e.value)
    assert "'rk4'" in msg and "RectifiedFlow" in msg and "alpha = 0" in msg and "flow_heun" in msg
    assert "nan" not in msg.split("(")[0]
    # below the alpha = 0 end it runs
    fd.plan("rk4", S.RectifiedFlow(), prediction="flow", timesteps=np.linspace(0.99, 0.01, 8).tolist())


# ---- the prior matches the plan's first time -----------------------------------------------------------------------


@pytest.mark.parametrize("solver,sigmas", [
    ("heun", [10, 5, 2, 1, 0.5, 0.2, 0]),
    ("dpmpp_2m", list(np.geomspace(10.0, 0.01, 40)) + [0.0]),
])
def test_custom_sigmas_start_from_the_prior_at_their_first_sigma(solver, sigmas):
    """Unit-variance Gaussian data, exact denoiser: the PF-ODE maps N(0, 1 + s0^2) at s0 to N(0, 1); with the prior
    N(0, s0^2) the exact answer is std s0 / sqrt(1 + s0^2) (the same closed form as GaussianMixture's docstring)."""
    from fastdiff.models import GaussianMixture

    edm = S.EDM()
    p = fd.plan(solver, edm, sigmas=sigmas)
    s0 = float(sigmas[0])
    assert p.init_scale == pytest.approx(s0, rel=1e-12)  # not the schedule's sigma_max = 80
    model = GaussianMixture([0.0], [1.0]).model(edm, "epsilon")
    x = fd.sample(model, p, shape=(32, 255), seeds=list(range(32)), backend="torch", dtype=torch.float64)
    exact = s0 / math.sqrt(1.0 + s0 * s0)
    tol = 0.1 if len(sigmas) < 10 else 0.01  # the first plan has 6 steps: its ODE error shows
    sample_err = 3.0 / math.sqrt(x.numel())  # std of a sample std, times 3
    assert abs(x.std().item() - exact) < tol + exact * sample_err, x.std().item()


def test_init_scale_keeps_each_schedules_convention_at_t_max():
    for sch in (S.VE(), S.EDM(), S.DiscreteVP(), S.ContinuousVP(), S.SubVP(), S.RectifiedFlow()):
        assert fd.plan("euler", sch, 6, prediction="v").init_scale == sch.init_scale
    flow = S.RectifiedFlow()
    p = fd.plan("flow_euler", flow, prediction="flow", timesteps=[0.6, 0.3])
    assert p.init_scale == pytest.approx(math.hypot(0.4, 0.6))  # x = (1 - t) x0 + t n with unit-variance data
    assert fd.plan("ddim", S.DiscreteVP(), timesteps=[500, 250]).init_scale == 1.0


# ---- bounded cost ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver,kw,match", [
    ("euler", dict(steps=10**6), "steps must be an integer >= 1 and <= 100000"),
    ("pc", dict(steps=10, corrector_steps=10**9), "corrector_steps must be an integer in 1..100000"),
    ("pc", dict(steps=100, corrector_steps=5000), "more than 100000 stages"),
    ("annealed_langevin", dict(steps=2000, corrector_steps=100), "more than 100000 stages"),
    ("unipc", dict(steps=10, order=10**9), "order must be 1, 2, 3 or 4"),
    ("lms", dict(steps=10, order=50), "order must be an integer in 1..6"),
    ("euler", dict(sigmas=np.linspace(80.0, 0.0, 10**6)), "sigmas= has 1000000 entries"),
])
def test_huge_requests_fail_fast_with_the_cap(solver, kw, match):
    with pytest.raises(ValueError, match=match):
        fd.plan(solver, S.EDM(), **kw)


def test_plan_cache_is_bounded_in_bytes(monkeypatch):
    plan_module = sys.modules["fastdiff.plan"]  # the module (fastdiff.plan is the function)
    plan_module.cache_clear()
    one = fd.plan("dpmpp_3m", S.EDM(), 50)
    size = plan_module._plan_bytes(one)
    assert size > 50 * one.rows().shape[1] * 8  # the rows alone
    monkeypatch.setattr(plan_module, "MAX_CACHE_BYTES", int(2.5 * size))
    plans = [fd.plan("dpmpp_3m", S.EDM(), 50, spacing="karras", rho=7.0 + k) for k in range(6)]
    cached = list(plan_module._CACHE.values())
    assert len(cached) <= 2 and sum(plan_module._plan_bytes(p) for p in cached) <= 2.5 * size
    assert cached[-1] is plans[-1] and fd.plan("dpmpp_3m", S.EDM(), 50, spacing="karras", rho=12.0) is plans[-1]
    assert fd.plan("dpmpp_3m", S.EDM(), 50) is not one  # evicted: rebuilt, equal
    assert fd.plan("dpmpp_3m", S.EDM(), 50) == one
    plan_module.cache_clear()


# ---- pc in float32: the score is formed on the coefficients, not from x and D in the kernel ------------------------


def _float64_model(schedule, prediction):
    """The exact Gaussian denoiser evaluated in float64 whatever the sample dtype (its own float32 path rounds D
    before forming epsilon, which is not what is tested here)."""
    from fastdiff.models import GaussianMixture

    m = GaussianMixture([0.0], [1.0]).model(schedule, prediction)
    return lambda x, t: m(x.double(), t).to(x.dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_pc_float32_follows_float64_at_small_sigma(backend, predictor):
    """sub-VP ends at sigma ~ 1e-4: score coefficients ~ 8e7 on x and on D cancelled in float32 (error ~0.8)."""
    sch = S.SubVP()
    p = fd.plan("pc", sch, 60, prediction="epsilon", predictor=predictor)
    assert np.abs(p.langevin[:, 2:]).max() <= 1.0  # the kernel's score is the D register: s = 0 x + 1 D
    model = _float64_model(sch, "epsilon")
    kw = dict(shape=(3, 65), seeds=[0, 1, 2], check_finite="off")
    ref = fd.sample(model, p, backend="torch", dtype=torch.float64, **kw)
    x = fd.sample(model, p, backend=backend, dtype=torch.float32, **kw)
    assert torch.isfinite(x).all()
    assert (x.double() - ref).abs().max() < 1e-4


def test_pc_langevin_register_is_the_score():
    """The D register of a Langevin stage is (alpha D - x) / sigma^2 written out independently from the schedule;
    ``denoised_coefs`` keep the data estimate."""
    sch = S.ContinuousVP()
    p = fd.plan("pc", sch, 5, prediction="v")
    for k in np.flatnonzero(p.langevin[:, 0] != 0):
        t = p.stage_times[k]
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        n = a * a + s * s  # v = a eps - s x0: x0 = (a x - s v) / n
        np.testing.assert_allclose(p.denoised_coefs[k], [a / n, -s / n], rtol=1e-12)
        np.testing.assert_allclose(p.data_coefs[k], [(a * a / n - 1) / s**2, -a * s / n / s**2], rtol=1e-9)
        assert tuple(p.langevin[k, 2:]) == (0.0, 1.0)
    other = ~(p.langevin[:, 0] != 0)
    assert np.array_equal(p.denoised_coefs[other], p.data_coefs[other])


# ---- annealed Langevin's default step size follows the plan's smallest level -----------------------------------


@pytest.mark.parametrize("sch", [S.EDM(), S.SubVP(), S.RectifiedFlow()], ids=repr)
def test_annealed_langevin_default_step_is_stable(sch):
    """Data near the points -1 and 1: the score's Lipschitz constant ~ 1 / sigma^2 at the last level, where NCSN's
    fixed 2e-5 (chosen for sigma_L = 0.01) overshoots; the default scaled to sigma_L lands the samples near +-1."""
    from fastdiff.models import GaussianMixture

    m = GaussianMixture([-1.0, 1.0], [5e-4, 5e-4]).model(sch, "v")
    model = lambda x, t: m(x.double(), t).to(x.dtype)  # noqa: E731
    kw = dict(shape=(8, 63), seeds=list(range(8)), backend="torch", dtype=torch.float64, check_finite="off")
    x = fd.sample(model, fd.plan("annealed_langevin", sch, 6, prediction="v", corrector_steps=60), **kw)
    assert torch.isfinite(x).all() and abs(x.abs().mean().item() - 1.0) < 0.2
    fixed = fd.sample(model, fd.plan("annealed_langevin", sch, 6, prediction="v", corrector_steps=60,
                                     step_size=2e-5), **kw)
    assert not torch.isfinite(fixed).all() or fixed.abs().mean().item() > 100.0
    assert fd.solver_options("annealed_langevin")["step_size"] is None


def test_annealed_langevin_default_is_ncsn_at_its_smallest_level():
    ve = S.VE(sigma_min=0.01, sigma_max=1.0)
    default = fd.plan("annealed_langevin", ve, 4, corrector_steps=2, final="t_min")
    sigma_L = default.sigmas[-1]
    assert sigma_L == pytest.approx(0.01, rel=1e-3)  # NCSN's smallest level: its epsilon = 2e-5 is the default
    ncsn = fd.plan("annealed_langevin", ve, 4, corrector_steps=2, final="t_min", step_size=2e-5 * (sigma_L / 0.01) ** 2)
    np.testing.assert_allclose(default.rows(), ncsn.rows(), rtol=1e-12, atol=0)
