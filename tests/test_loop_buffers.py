"""The sampler loop runs in preallocated buffers (no allocation per step) and checks finiteness from the kernels'
per-sample flags (no extra pass), naming the samples and, with check_finite="step", the stage."""

import threading

import pytest
import torch

import fastdiff as fd
from fastdiff import schedules as S

SHAPE = (2, 4, 8, 8)


def stored_model(shape=SHAPE, seed=0):
    """A model returning one stored tensor, recording the addresses of the x it is called with."""
    out = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    seen = []

    def model(x, t):
        seen.append(x.data_ptr())
        return out

    return model, out, seen


def cpu_or_skip():
    ok, why = fd.backends.status("cpu")
    if not ok:
        pytest.skip(f"cpu kernels unavailable: {why}")


def allocations(fn) -> int:
    """Number of CPU allocator events with positive bytes while ``fn`` runs (torch profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if getattr(e, "cpu_memory_usage", 0) > 0)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral", "ddim"])
def test_loop_allocates_nothing_per_step(solver):
    """Buffer identity across steps, and the allocator's events: a 12-step run allocates as much as a 3-step one."""
    cpu_or_skip()
    model, _, seen = stored_model()
    sampler = {n: fd.Sampler(model, fd.plan(solver, S.DiscreteVP(), n), backend="cpu") for n in (3, 12)}
    for s in sampler.values():  # warm: kernels built, workspaces made
        s.sample(shape=SHAPE, seeds=[1, 2])
    seen.clear()
    sampler[12].sample(shape=SHAPE, seeds=[1, 2])
    assert len(set(seen)) == 1, f"the model saw x at {len(set(seen))} addresses over 12 steps"
    counts = {n: allocations(lambda s=s: s.sample(shape=SHAPE, seeds=[1, 2])) for n, s in sampler.items()}
    assert counts[12] == counts[3], f"allocations grow with the steps: {counts}"


def test_buffers_reused_across_calls_and_results_independent():
    cpu_or_skip()
    model, _, seen = stored_model()
    s = fd.Sampler(model, fd.plan("dpmpp_2m", S.DiscreteVP(), 5), backend="cpu")
    a = s.sample(shape=SHAPE, seeds=[1, 2])
    first = set(seen)
    a_copy = a.clone()
    seen.clear()
    b = s.sample(shape=SHAPE, seeds=[3, 4])
    assert set(seen) == first  # the same state buffer
    assert torch.equal(a, a_copy), "a later call overwrote an earlier result"
    assert a.data_ptr() != b.data_ptr()
    # the reused slots start clean: the same seeds give the same sample as a fresh process-state would
    c = s.sample(shape=SHAPE, seeds=[1, 2])
    assert torch.equal(c, a)


def test_matches_the_torch_oracle_and_x_T_untouched():
    cpu_or_skip()
    model, _, _ = stored_model()
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 6)
    x_T = torch.randn(SHAPE)
    keep = x_T.clone()
    got = fd.sample(model, plan, x_T=x_T, backend="cpu")
    want = fd.sample(model, plan, x_T=x_T.double(), backend="torch")
    assert torch.equal(x_T, keep)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_model_returning_x_itself():
    """A model whose output is its input (aliasing the state buffer) still runs: that step writes elsewhere."""
    plan = fd.plan("ddim", S.DiscreteVP(), 4)
    for backend in ("torch", "cpu"):
        if backend == "cpu":
            cpu_or_skip()
        got = fd.sample(lambda x, t: x, plan, shape=SHAPE, seeds=[1, 2], backend=backend)
        want = fd.sample(lambda x, t: x.clone(), plan, shape=SHAPE, seeds=[1, 2], backend=backend)
        assert torch.equal(got, want)


def test_threads_get_their_own_buffers():
    cpu_or_skip()
    model, _, _ = stored_model()
    s = fd.Sampler(model, fd.plan("dpmpp_2m", S.DiscreteVP(), 8), backend="cpu")
    want = {i: s.sample(shape=SHAPE, seeds=[i, i + 1]) for i in range(4)}
    got, errors = {}, []

    def run(i):
        try:
            for _ in range(3):
                got[i] = s.sample(shape=SHAPE, seeds=[i, i + 1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(got[i], want[i]) for i in range(4))


def test_callback_gets_tensors_it_may_keep():
    cpu_or_skip()
    model, _, _ = stored_model()
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 5)
    kept = []
    fd.sample(model, plan, shape=SHAPE, seeds=[1, 2], backend="cpu", callback=lambda k, x, D: kept.append(x))
    assert len({x.data_ptr() for x in kept}) == len(kept)
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("where", ["end", "step"])
def test_nan_in_one_sample_is_named(backend, where):
    """NaN in the model output of sample 1 at the third model call: the error names sample 1 (and, per step, the
    stage and the model output as the cause); the other samples are not named."""
    if backend == "cpu":
        cpu_or_skip()
    B = 3
    out = torch.randn((B,) + SHAPE[1:])
    calls = []

    def model(x, t):
        calls.append(1)
        o = out.clone()
        if len(calls) == 3:
            o[1, 0, 2, 5] = float("nan")
        return o

    plan = fd.plan("dpmpp_2m", S.DiscreteVP(), 6)
    with pytest.raises(FloatingPointError) as e:
        fd.sample(model, plan, shape=(B,) + SHAPE[1:], seeds=[1, 2, 3], backend=backend, check_finite=where)
    msg = str(e.value)
    assert "sample 1 " in msg and "samples" not in msg and "sample 0" not in msg and "sample 2" not in msg
    if where == "step":
        assert f"after stage 2 (t={plan.stage_times[2]:g})" in msg and "model output has NaN" in msg


def test_check_finite_off_returns_the_nan():
    model, out, _ = stored_model()
    bad = out.clone()
    bad[0, 0, 0, 0] = float("inf")
    x = fd.sample(lambda x, t: bad, fd.plan("ddim", S.DiscreteVP(), 3), shape=SHAPE, seeds=[1, 2], backend="torch",
                  check_finite="off")
    assert not torch.isfinite(x[0]).all() and torch.isfinite(x[1]).all()
