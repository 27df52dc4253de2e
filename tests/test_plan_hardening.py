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
