"""The lean per-step path (the Sampler loop, the diffusers drop-ins and the batcher call the backend's kernel
directly, ``ops._step_kernel``) gives bit-identical results to the public, validating ``ops.step``, and the argument
checks still run: once per layout in the loops, on every call of the public op (a bad layout always raises)."""

import pytest
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff import schedules as S


def backends():
    """Backends that run on CPU tensors here: torch, cpu (built), triton (under TRITON_INTERPRET, tiny shapes)."""
    names = ["torch"]
    for name in ("cpu", "triton"):
        ok, _ = fd.backends.status(name)
        if ok and (name != "triton" or torch.cuda.is_available() is False):
            names.append(name)
    return names


def stored_model(shape, seed=0):
    out = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return lambda x, t: out.to(x.dtype)


def public_loop(model, plan, x_T, seeds, backend, w=None):
    """The loop written with the public op: ops.step per stage on the plan's rows, no workspace, no shortcut."""
    B = x_T.shape[0]
    cdt = ops.compute_dtype(x_T.dtype)
    rows = torch.tensor(plan.rows(), dtype=cdt)
    draws = torch.tensor(plan.draw, dtype=torch.int64)
    seeds_t = rng.seeds_tensor(seeds)
    guidance = torch.full((1,), w if w is not None else 0.0, dtype=cdt)
    slots = torch.zeros((plan.num_slots,) + tuple(x_T.shape), dtype=x_T.dtype)
    x = x_T.clone()
    for k in range(plan.num_stages):
        reads, writes, use_out, noise, langevin = plan.stage_flags[k]
        out = x
        if use_out:
            t = torch.full((2 * B if w is not None else B,), float(plan.schedule.model_time(plan.stage_times[k])),
                           dtype=cdt)
            out = model(torch.cat([x, x]), t) if w is not None else model(x, t)
        x = ops.step(x, out, slots, rows[k : k + 1], seeds_t, draws[k : k + 1], guidance, slot_reads=reads,
                     slot_writes=writes, use_out=use_out, cfg=w is not None and use_out, noise=noise,
                     langevin=langevin, backend=backend)
    return x


CASES = [("dpmpp_2m", S.DiscreteVP.scaled_linear()), ("ddim", S.DiscreteVP()), ("euler_ancestral", S.EDM()),
         ("dpmpp_3m_sde", S.DiscreteVP())]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("solver,schedule", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_sampler_matches_the_public_op_bitwise(backend, solver, schedule, dtype, guided):
    shape = (3, 5, 7) if backend != "triton" else (2, 3)
    plan = fd.plan(solver, schedule, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    seeds = [5, 2**64 - 3, 11][: shape[0]]
    w = 2.5 if guided else None
    model = stored_model((2 * shape[0],) + shape[1:] if guided else shape)
    uncond = {} if guided else None
    want = public_loop(model, plan, x_T, seeds, backend, w)
    for _ in range(2):  # the second call reuses the workspace (its checked stage arguments)
        got = fd.Sampler(lambda x, t: model(x, t), plan, backend=backend, guidance_scale=w).sample(
            x_T=x_T, seeds=seeds, uncond=uncond)
        assert torch.equal(got, want)


def test_sampler_checks_each_stage_once_per_workspace(monkeypatch):
    calls = []
    check = ops._check_step_args
    monkeypatch.setattr(ops, "_check_step_args", lambda *a, **k: (calls.append(1), check(*a, **k))[1])
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 7)
    shape = (2, 3, 5)  # a shape no other test uses: a new workspace
    sampler = fd.Sampler(stored_model(shape), plan, backend="torch")
    sampler.sample(shape=shape, seeds=[1, 2])
    assert len(calls) == plan.num_stages  # each stage's arguments, when the workspace was made
    sampler.sample(shape=shape, seeds=[3, 4])
    assert len(calls) == plan.num_stages  # none per step, none for a later call


def test_sampler_still_checks_every_model_output():
    shape = (2, 3, 4)
    good = torch.randn(shape)
    calls = []

    def model(x, t):
        calls.append(1)
        return good[:1] if len(calls) == 3 else good  # a wrong shape at the third call

    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 5)
    with pytest.raises(ValueError, match=r"the model returned \(1, 3, 4\), expected a tensor of shape \(2, 3, 4\)"):
        fd.sample(model, plan, shape=shape, seeds=[1, 2], backend="torch")
    # an output in another dtype or not contiguous is converted, as the public op would need it
    out64 = torch.randn(shape, dtype=torch.float64)
    a = fd.sample(lambda x, t: out64, plan, shape=shape, seeds=[1, 2], backend="torch")
    b = fd.sample(lambda x, t: out64.float(), plan, shape=shape, seeds=[1, 2], backend="torch")
    assert torch.equal(a, b)
    wide = torch.randn(shape[::-1])
    c = fd.sample(lambda x, t: wide.transpose(0, 2), plan, shape=shape, seeds=[1, 2], backend="torch")
    d = fd.sample(lambda x, t: wide.transpose(0, 2).contiguous(), plan, shape=shape, seeds=[1, 2], backend="torch")
    assert torch.equal(c, d)


def test_sampler_model_returning_its_input():
    """A model that returns x itself (the loop's state buffer): the step must not write over its own input."""
    plan = fd.plan("ddim", S.DiscreteVP(), 4)
    x_T = torch.randn(2, 3, 4)
    a = fd.sample(lambda x, t: x, plan, x_T=x_T, backend="torch")
    b = fd.sample(lambda x, t: x.clone(), plan, x_T=x_T, backend="torch")
    assert torch.equal(a, b)


def test_public_op_rejects_a_bad_layout_every_time():
    """The layouts the loops checked do not make the public op skip its checks for a bad one."""
    x = torch.randn(2, 3)
    slots = torch.zeros(1, 2, 3)
    rows = torch.zeros(1, ops.row_length(1))
    seeds = torch.zeros(2, dtype=torch.int64)
    draws = torch.zeros(1, dtype=torch.int64)
    ops.step(x, x, slots, rows, seeds, draws, slot_writes=1)  # a good layout, now known
    bad = [dict(rows=torch.zeros(1, ops.row_length(1) + 1)), dict(draws=torch.zeros(1, dtype=torch.int32)),
           dict(seeds=torch.zeros(3, dtype=torch.int64)), dict(x_out=torch.empty(2, 4))]
    for change in bad:
        args = dict(rows=rows, draws=draws, seeds=seeds)
        args.update(change)
        x_out = args.pop("x_out", None)
        for _ in range(2):  # and again: a failed layout is not remembered
            with pytest.raises(ValueError):
                ops.step(x, x, slots, args["rows"], args["seeds"], args["draws"], slot_writes=1, x_out=x_out)


# ---------------------------------------------------------------------------------------------------------------
# The diffusers drop-ins
# ---------------------------------------------------------------------------------------------------------------

DROPINS = ["DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
           "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]


def _dropin_run(name, backend, x_T, out, seeds):
    fdd = pytest.importorskip("fastdiff.integrations.diffusers")
    cls = getattr(fdd, name)
    s = cls() if name == "FlowMatchEulerDiscreteScheduler" else cls(beta_schedule="scaled_linear")
    s.backend = backend
    s.set_timesteps(6)
    x = x_T
    for t in s.timesteps:
        x = s.step(out, t, s.scale_model_input(x, t), seeds=seeds).prev_sample
    return x


@pytest.mark.parametrize("backend", [b for b in backends() if b != "triton"])
@pytest.mark.parametrize("name", DROPINS)
def test_dropin_fast_path_matches_the_public_op_bitwise(monkeypatch, name, backend):
    x_T = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    out = 0.3 * torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    lean = _dropin_run(name, backend, x_T, out, [7, 8])
    used = []

    def public(backend_name):
        def step(x, out, slots, rows, seeds, draws, guidance, reads, writes, use_out, cfg, noise, langevin, x_out,
                 thresholds, nonfinite):
            used.append(1)
            return ops.step(x, out, slots, rows, seeds, draws, guidance, slot_reads=reads, slot_writes=writes,
                            use_out=use_out, cfg=cfg, noise=noise, langevin=langevin, backend=backend_name,
                            x_out=x_out, thresholds=thresholds, nonfinite=nonfinite)
        return step

    monkeypatch.setattr(ops, "_step_kernel", public)
    monkeypatch.setattr("fastdiff.integrations.diffusers._base._KERNELS", {})  # the kernels the drop-ins resolved
    checked = _dropin_run(name, backend, x_T, out, [7, 8])
    assert used, "the drop-in never took its lean path"
    assert torch.equal(lean, checked)


def test_dropin_checks_its_arguments_once_per_run(monkeypatch):
    fdd = pytest.importorskip("fastdiff.integrations.diffusers")
    calls = []
    check = ops._check_step_args
    monkeypatch.setattr(ops, "_check_step_args", lambda *a, **k: (calls.append(1), check(*a, **k))[1])
    monkeypatch.setattr(ops, "_CHECKED_LAYOUTS", set())  # the public op's memory of checked layouts, emptied
    s = fdd.DPMSolverMultistepScheduler(beta_schedule="scaled_linear")
    s.backend = "torch"
    for shape in ((1, 3, 4, 4), (1, 3, 4, 4), (2, 3, 4, 4)):
        x, out = torch.randn(shape), torch.randn(shape)
        s.set_timesteps(5)
        for t in s.timesteps:
            x = s.step(out, t, x).prev_sample
    assert len(calls) == 2  # the first step of the first run of each layout; no other step, no second run
    with pytest.raises(ValueError, match="must be tensors"):
        s.step(out, s.timesteps[0], "x")
