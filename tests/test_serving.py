"""ContinuousBatcher: requests at different steps of different plans share ticks, and each result equals
sampling that request alone with the same seed."""

import threading

import pytest
import torch

import fastdiff as fd
from fastdiff.models import GaussianMixture
from fastdiff.serving import ContinuousBatcher, QueueFullError

SCH = fd.schedules.EDM()
MIX = GaussianMixture([-1.0, 2.0], [0.3, 0.5])
BASE = MIX.model(SCH, "epsilon")


def model(x, t, shift=None):
    out = BASE(x, t)
    return out if shift is None else out + 0.05 * shift.reshape(-1, *([1] * (x.dim() - 1)))


PLANS = [fd.plan("euler_ancestral", SCH, 6), fd.plan("dpmpp_2m", SCH, 4), fd.plan("heun", SCH, 3),
         fd.plan("dpmpp_3m", SCH, 5), fd.plan("heun", SCH, 3, s_churn=3.0), fd.plan("ddim", SCH, 7, eta=0.5)]
SHAPE = (3, 5)


def alone(plan, seed, **kw):
    return fd.sample(model, plan, shape=(1,) + SHAPE, seeds=[seed], **kw)[0]


def test_mixed_plans_equal_sampling_alone():
    with ContinuousBatcher(model, max_batch=4) as batcher:
        futs = [(p, s, batcher.submit(p, s, SHAPE)) for s, p in enumerate(PLANS * 2, start=100)]
        results = [(p, s, f.result(timeout=60)) for p, s, f in futs]
    for p, s, x in results:
        torch.testing.assert_close(x, alone(p, s), rtol=1e-6, atol=1e-6)
    # fewer model calls than sampling one by one: requests shared ticks
    assert batcher.ticks < sum(p.nfe for p, _, _ in results)


def test_guidance_and_conditioning_per_request():
    plan = fd.plan("dpmpp_2m", SCH, 5)
    with ContinuousBatcher(model, max_batch=8) as batcher:
        futs = [batcher.submit(plan, s, SHAPE, cond={"shift": torch.tensor(float(s))},
                               uncond={"shift": torch.tensor(0.0)}, guidance_scale=1.0 + s)
                for s in range(5)]
        xs = [f.result(timeout=60) for f in futs]
    for s, x in enumerate(xs):
        want = alone(plan, s, cond={"shift": torch.tensor([float(s)])}, uncond={"shift": torch.tensor([0.0])},
                     guidance_scale=1.0 + s)
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


def test_concurrent_submitters():
    plan = fd.plan("euler_ancestral", SCH, 4)
    results = {}
    with ContinuousBatcher(model, max_batch=8) as batcher:
        def worker(base):
            futs = {s: batcher.submit(plan, s, SHAPE) for s in range(base, base + 5)}
            for s, f in futs.items():
                results[s] = f.result(timeout=60)

        threads = [threading.Thread(target=worker, args=(b,)) for b in (0, 100, 200, 300)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 20
    for s in (0, 104, 302):
        torch.testing.assert_close(results[s], alone(plan, s), rtol=1e-6, atol=1e-6)


def test_failing_model_fails_only_its_batch():
    plan = fd.plan("ddim", SCH, 3)
    calls = {"n": 0}
    fail = threading.Event()

    def flaky(x, t):
        calls["n"] += 1
        if fail.is_set():
            fail.clear()
            raise RuntimeError("boom")
        return model(x, t)

    with ContinuousBatcher(flaky, max_batch=4) as batcher:
        fail.set()
        bad = batcher.submit(plan, 1, SHAPE)
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=60)
        good = batcher.submit(plan, 2, SHAPE)  # the batcher keeps serving
        torch.testing.assert_close(good.result(timeout=60), alone(plan, 2), rtol=1e-6, atol=1e-6)


def test_full_queue_is_a_clear_error():
    batcher = ContinuousBatcher(model, max_queue=2)  # not started: nothing drains the queue
    plan = fd.plan("ddim", SCH, 2)
    batcher.submit(plan, 1, SHAPE)
    batcher.submit(plan, 2, SHAPE)
    with pytest.raises(QueueFullError, match="queue is full"):
        batcher.submit(plan, 3, SHAPE)


def test_model_calls_record_no_autograd_graph():
    """Grad mode is per thread: the batcher's own thread must not build graphs through a trainable model."""
    lin = torch.nn.Linear(4, 4)
    seen = []

    def model(x, t):
        out = lin(x)
        seen.append(out.requires_grad)
        return out

    plan = fd.plan("ddim", fd.schedules.DiscreteVP.scaled_linear(), 3, prediction="x0")
    with ContinuousBatcher(model, max_batch=4) as b:
        x = b.submit(plan, 1, (2, 4)).result()
    assert seen and not any(seen) and not x.requires_grad


def test_cpu_threads_of_the_batcher_thread():
    with pytest.raises(ValueError, match="cpu_threads"):
        ContinuousBatcher(model, cpu_threads=0)
    before = torch.get_num_threads()
    with ContinuousBatcher(model, max_batch=4, cpu_threads=1) as batcher:
        x = batcher.submit(PLANS[1], 7, SHAPE).result(timeout=60)
    torch.testing.assert_close(x, alone(PLANS[1], 7), rtol=1e-6, atol=1e-6)
    assert torch.get_num_threads() == before  # the caller's setting is untouched
