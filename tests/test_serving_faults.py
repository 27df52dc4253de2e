"""ContinuousBatcher under faults: bad input, cancellation, failing models, NaN, a full queue, timeouts, starvation,
close, and errors of the loop itself. Whatever happens, every future ends and the healthy requests get what
sampling them alone gives (the Gaussian-mixture model is batch invariant). Every wait is bounded."""

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

import fastdiff as fd
from fastdiff.models import GaussianMixture
from fastdiff.serving import BatcherClosed, ContinuousBatcher, QueueFull, QueueFullError
from fastdiff.serving import batcher as batcher_module

SCH = fd.schedules.EDM()
BASE = GaussianMixture([-1.0, 2.0], [0.3, 0.5]).model(SCH, "epsilon")
SHAPE = (3, 5)
PLAN = fd.plan("dpmpp_2m", SCH, 4)
WAIT = 60  # seconds: a bound on every wait, never reached when things work


def model(x, t, tag=None):
    """The mixture's exact epsilon; rows tagged 1 raise, rows tagged 2 turn into NaN (the injected faults)."""
    out = BASE(x, t)
    if tag is not None:
        if (tag == 1).any():
            raise RuntimeError("injected model failure")
        out = torch.where((tag == 2).reshape(-1, *([1] * (x.dim() - 1))), torch.full_like(out, float("nan")), out)
    return out


def alone(plan, seed, shape=SHAPE):
    return fd.sample(model, plan, shape=(1,) + shape, seeds=[seed])[0]


def tag(v):
    return {"tag": torch.tensor(v)}


class Gate:
    """A model wrapper that blocks its n-th call until released, and records the batch size of every call."""

    def __init__(self, fn=model, block_call=None):
        self.fn, self.block_call, self.sizes = fn, block_call, []
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, x, t, **kw):
        self.sizes.append(x.shape[0])
        if len(self.sizes) == self.block_call:
            self.reached.set()
            assert self.release.wait(WAIT)
        return self.fn(x, t, **kw)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=True), "seed"), (dict(seed=1.5), "seed"),
    (dict(shape=(3, -5)), "shape"), (dict(shape=()), "shape"), (dict(shape=(10**6, 10**6)), "max_numel"),
    (dict(shape="abc"), "shape"), (dict(plan="dpmpp_2m"), "Plan"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(guidance_scale="x"), "guidance_scale"),
    (dict(cond={"tag": 3}), "cond"), (dict(cond=[1]), "cond"),
    (dict(guidance_scale=2.0, cond=tag(0)), "same keys"),
    (dict(guidance_scale=2.0, cond=tag(0), uncond={"tag": torch.zeros(2)}), "batched together"),
    (dict(timeout=-1), "timeout"), (dict(timeout=float("inf")), "timeout"),
])
def test_bad_requests_are_refused_at_submit_and_the_batcher_keeps_serving(kwargs, match):
    args = dict(plan=PLAN, seed=5, shape=SHAPE) | kwargs
    with ContinuousBatcher(model, max_batch=4) as b:
        with pytest.raises(ValueError, match=match):
            b.submit(args.pop("plan"), args.pop("seed"), args.pop("shape"), **args)
        x = b.submit(PLAN, 5, SHAPE).result(timeout=WAIT)
    torch.testing.assert_close(x, alone(PLAN, 5), rtol=1e-6, atol=1e-6)


def test_bad_batcher_settings_are_refused():
    for kwargs, match in [(dict(dtype=torch.int64), "dtype"), (dict(device="nonsense"), "device"),
                          (dict(max_queue=0), "max_queue"), (dict(max_batch=0), "max_batch"),
                          (dict(request_timeout=0), "request_timeout"),
                          (dict(dtype=torch.float64, backend="cpu"), "float64")]:
        with pytest.raises(ValueError, match=match):
            ContinuousBatcher(model, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ContinuousBatcher(model, device="cuda")


def test_seed_at_the_top_of_the_range():
    with ContinuousBatcher(model) as b:
        x = b.submit(PLAN, 2**64 - 1, SHAPE).result(timeout=WAIT)
    torch.testing.assert_close(x, alone(PLAN, 2**64 - 1), rtol=1e-6, atol=1e-6)


def test_failure_when_a_request_starts_fails_it_alone(monkeypatch):
    randn = batcher_module.ops.randn

    def flaky_randn(shape, seeds, *a, **k):
        if int(seeds[0]) == 13:
            raise RuntimeError("injected admission failure")
        return randn(shape, seeds, *a, **k)

    monkeypatch.setattr(batcher_module.ops, "randn", flaky_randn)
    with ContinuousBatcher(model, max_batch=4) as b:
        futs = {s: b.submit(PLAN, s, SHAPE) for s in (12, 13, 14)}
        with pytest.raises(RuntimeError, match="admission"):
            futs[13].result(timeout=WAIT)
        for s in (12, 14):
            torch.testing.assert_close(futs[s].result(timeout=WAIT), alone(PLAN, s), rtol=1e-6, atol=1e-6)
    assert b.unfinished() == 0


def test_cancel_before_start():
    b = ContinuousBatcher(model, max_batch=4, max_queue=3)
    futs = [b.submit(PLAN, s, SHAPE) for s in range(3)]
    assert futs[1].cancel()
    b.submit(PLAN, 3, SHAPE)  # the cancelled request no longer counts against max_queue
    with b:
        with pytest.raises(CancelledError):
            futs[1].result(timeout=WAIT)
        torch.testing.assert_close(futs[2].result(timeout=WAIT), alone(PLAN, 2), rtol=1e-6, atol=1e-6)


def test_cancel_during_sampling_frees_its_rows():
    gate = Gate(block_call=2)
    plan = fd.plan("euler", SCH, 5)
    b = ContinuousBatcher(gate, max_batch=4)
    # queued before the worker starts, so that its first tick admits all three (submitting to a running batcher
    # races its first tick, which may admit only the first)
    futs = [b.submit(plan, s, SHAPE) for s in range(3)]
    with b:
        assert gate.reached.wait(WAIT)  # all three are sampling
        assert futs[0].cancel()
        gate.release.set()
        with pytest.raises(CancelledError):
            futs[0].result(timeout=WAIT)
        for s in (1, 2):
            torch.testing.assert_close(futs[s].result(timeout=WAIT), alone(plan, s), rtol=1e-6, atol=1e-6)
    assert gate.sizes[:2] == [3, 3] and set(gate.sizes[2:]) == {2}  # its row left at the next tick
    assert b.unfinished() == 0 and b.stats["cancelled"] == 1


@pytest.mark.parametrize("fault, error", [(1, RuntimeError), (2, FloatingPointError)])
def test_model_fault_fails_only_its_request(fault, error):
    plans = [fd.plan("dpmpp_2m", SCH, 4), fd.plan("euler_ancestral", SCH, 5), fd.plan("heun", SCH, 3)]
    with ContinuousBatcher(model, max_batch=8) as b:
        futs = [(s, plans[s % 3], b.submit(plans[s % 3], s, SHAPE, cond=tag(fault if s in (2, 5) else 0)))
                for s in range(7)]
        for s, p, f in futs:
            if s in (2, 5):
                with pytest.raises(error):
                    f.result(timeout=WAIT)
            else:
                torch.testing.assert_close(f.result(timeout=WAIT), alone(p, s), rtol=1e-6, atol=1e-6)
    assert b.errors[error.__name__] == 2 and b.stats["completed"] == 5


def test_max_queue_bounds_sampling_and_waiting_requests():
    b = ContinuousBatcher(model, max_queue=3)  # not started: nothing drains
    for s in range(3):
        b.submit(PLAN, s, SHAPE)
    with pytest.raises(QueueFull, match="max_queue=3"):
        b.submit(PLAN, 9, SHAPE)
    assert QueueFullError is QueueFull
    b.close(drain=False)

    gate = Gate(block_call=1)
    with ContinuousBatcher(gate, max_batch=8, max_queue=2) as b:
        futs = [b.submit(PLAN, s, SHAPE) for s in range(2)]
        assert gate.reached.wait(WAIT)  # both are sampling, none waits: still the queue is full
        with pytest.raises(QueueFull):
            b.submit(PLAN, 2, SHAPE)
        gate.release.set()
        for f in futs:
            f.result(timeout=WAIT)
        b.submit(PLAN, 2, SHAPE).result(timeout=WAIT)


def test_timeout_fails_the_slow_request_only():
    def slow(x, t, **kw):
        time.sleep(0.01)
        return model(x, t, **kw)

    long_plan = fd.plan("euler", SCH, 200)
    with ContinuousBatcher(slow, max_batch=4, request_timeout=None) as b:
        late = b.submit(long_plan, 1, SHAPE, timeout=0.2)
        ok = b.submit(PLAN, 2, SHAPE)
        with pytest.raises(TimeoutError, match="timeout"):
            late.result(timeout=WAIT)
        torch.testing.assert_close(ok.result(timeout=WAIT), alone(PLAN, 2), rtol=1e-6, atol=1e-6)
    assert b.stats["timed_out"] == 1


def test_another_shape_is_not_starved_by_a_stream():
    """A request of another shape waits a bounded number of ticks while same-shape requests keep coming."""
    max_wait, stages = 3, PLAN.num_stages
    other_plan = fd.plan("euler", SCH, 3)
    with ContinuousBatcher(model, max_batch=2, max_wait_ticks=max_wait) as b:
        stream, done_at = [], {}
        stream.append(b.submit(PLAN, 0, SHAPE))
        start = b.steps
        other = b.submit(other_plan, 99, (4,))
        other.add_done_callback(lambda f: done_at.setdefault("other", b.steps))
        for s in range(1, 60):  # keep the running kind busy: more requests of the first shape than it can finish
            stream.append(b.submit(PLAN, s, SHAPE))
            time.sleep(0.002)
            if other.done():
                break
        x = other.result(timeout=WAIT)
        for f in stream:
            f.result(timeout=WAIT)
    # waited at most: max_wait ticks, the running batch draining, then its own stages (+1 for the submit race)
    assert done_at["other"] - start <= max_wait + stages + other_plan.num_stages + 1
    torch.testing.assert_close(x, alone(other_plan, 99, (4,)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("drain", [True, False])
def test_close_ends_every_future(drain):
    gate = Gate(block_call=2)
    b = ContinuousBatcher(gate, max_batch=2).start()
    futs = [b.submit(PLAN, s, SHAPE) for s in range(5)]  # 2 sampling, 3 waiting
    assert gate.reached.wait(WAIT)
    closer = threading.Thread(target=b.close, kwargs=dict(drain=drain))
    closer.start()
    with pytest.raises(BatcherClosed):
        while True:  # close() marks the batcher closed at once
            b.submit(PLAN, 9, SHAPE).cancel()
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive() and all(f.done() for f in futs)
    if drain:
        for s, f in enumerate(futs):
            torch.testing.assert_close(f.result(), alone(PLAN, s), rtol=1e-6, atol=1e-6)
    else:
        assert all(f.cancelled() for f in futs)


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), SystemExit(3)])
def test_an_error_of_the_loop_fails_only_what_was_in_flight(exc):
    gate = Gate(block_call=1)
    b = ContinuousBatcher(gate, max_batch=4).start()
    first = b.submit(PLAN, 1, SHAPE)
    assert gate.reached.wait(WAIT)
    real_admit, armed = b._admit, [True]

    def broken_admit():  # the loop itself fails once, after the tick in flight
        if armed:
            armed.pop()
            raise exc
        real_admit()

    b._admit = broken_admit
    gate.release.set()
    with pytest.raises(RuntimeError, match="internal error"):
        first.result(timeout=WAIT)
    x = b.submit(PLAN, 2, SHAPE).result(timeout=WAIT)
    b.close()
    torch.testing.assert_close(x, alone(PLAN, 2), rtol=1e-6, atol=1e-6)
    assert b.stats["restarts"] == 1


def test_a_dead_loop_thread_is_restarted(monkeypatch):
    b = ContinuousBatcher(model, max_batch=4)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    b._thread = dead  # as if the loop's thread had died
    x = b.submit(PLAN, 3, SHAPE).result(timeout=WAIT)
    b.close()
    torch.testing.assert_close(x, alone(PLAN, 3), rtol=1e-6, atol=1e-6)
    assert b.stats["restarts"] == 1


def test_every_future_ends_under_mixed_faults():
    plans = [fd.plan("dpmpp_2m", SCH, 4), fd.plan("euler_ancestral", SCH, 6), fd.plan("heun", SCH, 3)]
    rng = torch.Generator().manual_seed(0)
    outcome = {}
    with ContinuousBatcher(model, max_batch=5, max_queue=64) as b:
        futs = []
        for s in range(40):
            kind = int(torch.randint(0, 6, (), generator=rng))
            shape = SHAPE if s % 4 else (2,)
            f = b.submit(plans[s % 3], s, shape, cond=tag(kind if kind in (1, 2) else 0))
            if kind == 3:
                f.cancel()
            futs.append((s, kind, shape, f))
        b.close(drain=True)
    for s, kind, shape, f in futs:
        assert f.done()
        if f.cancelled():
            outcome[s] = "cancelled"
        elif f.exception() is not None:
            assert kind in (1, 2), f.exception()
            outcome[s] = "failed"
        else:
            assert kind not in (1, 2, 3)
            torch.testing.assert_close(f.result(), alone(plans[s % 3], s, shape), rtol=1e-6, atol=1e-6)
            outcome[s] = "ok"
    assert b.unfinished() == 0 and "ok" in outcome.values() and "failed" in outcome.values()
