"""Serving benchmarks (digits UNet, dpmpp_2m, guidance 2).

1. Throughput: images/s of the ContinuousBatcher vs serving each request alone at 1 / 8 / 32 concurrent requests
   (every other request uses a 6-step plan so requests join and leave mid-batch).
2. Load and faults (skipped with --quick unless --load-seconds is given): 64 concurrent clients on 127.0.0.1 for a
   bounded time against the in-process batcher, ``fastdiff serve`` (uvicorn, a subprocess) and the Ray Serve
   deployment with 1 and 2 replicas (when ray is installed), with injected faults: 10% malformed bodies, 5%
   requests whose model call raises (label 11 makes the model raise), 3% client disconnects (the client gives up
   after 20-300 ms), 2% requests with a 1 ms deadline, and a queue bound (max_queue 32 per batcher) below the
   number of clients, so the queue is full much of the time (answered 503, the client backs off 50 ms).
   Reported per target: requests sent / answered / abandoned by their client / lost (no answer, a dropped
   connection, a wrong status or a non-JSON error: must be 0; requests never resolved on the server count too),
   answers differing from the same request sampled alone (max abs difference; tolerance 1e-4 with the digits UNet,
   whose float32 convolutions are not bit-identical across batch sizes), p50 / p99 latency and throughput of the
   good requests, vs one client sending good requests one at a time to the same target.

    python benchmarks/bench_serving.py [--quick] [--load-seconds 10] [--targets batcher serve ray1 ray2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastdiff as fd

try:
    from _common import write
except ImportError:
    from ._common import write

HERE = Path(__file__).resolve().parent
POISON = 11  # a label that makes the benchmark's model raise
CLIENTS = 64
MAX_QUEUE = 32
TOLERANCE = 1e-4
MALFORMED = [b"[1]", b"null", b'{"guidance": NaN}', b'{"seed": -1}', b"{", b'{"steps": 0}', b'{"solver": "nope"}',
             b'{"label": 42}', b'{"seed": "7"}', b"\xff"]


def faulty_spec():
    """The digits service whose model raises for label 11 (``--model bench_serving:faulty_spec``)."""
    from fastdiff.serving.http import ModelSpec, digits_spec

    base = digits_spec()
    unet = base.model

    def model(x, t, label):
        if (label == POISON).any():
            raise RuntimeError("injected model failure (label 11)")
        return unet(x, t, label=label)

    return ModelSpec(model, base.schedule, base.prediction, base.shape, num_labels=12, null_label=10,
                     default_label=0, default_guidance=2.0, name="digits-faulty")


# -- 1. throughput ---------------------------------------------------------------------------------------------
def throughput(quick):
    from fastdiff.models import digits
    from fastdiff.serving import ContinuousBatcher

    unet, sch = digits.pretrained_unet(), digits.schedule()
    plans = [fd.plan("dpmpp_2m", sch, 10, prediction=digits.PREDICTION),
             fd.plan("dpmpp_2m", sch, 6, prediction=digits.PREDICTION)]
    null = torch.tensor(10)
    rows = []
    with torch.inference_mode():  # warm-up: kernel build / load and first model call outside the timings
        fd.sample(unet, plans[1], shape=(1, 1, 8, 8), seeds=[0], guidance_scale=2.0, cond={"label": null[None]},
                  uncond={"label": null[None]})
    for n in [1, 8] if quick else [1, 8, 32]:
        reqs = [(plans[i % 2], i, torch.tensor(i % 10)) for i in range(n)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for p, s, lab in reqs:
                fd.sample(unet, p, shape=(1, 1, 8, 8), seeds=[s], guidance_scale=2.0, cond={"label": lab[None]},
                          uncond={"label": null[None]})
            t_alone = time.perf_counter() - t0
            t_batch = {}
            for threads in (None, 1):  # the caller's thread count, and one intra-op thread on the batcher's thread
                with ContinuousBatcher(unet, max_batch=32, cpu_threads=threads) as b:
                    t0 = time.perf_counter()
                    futs = [b.submit(p, s, (1, 8, 8), cond={"label": lab}, uncond={"label": null},
                                     guidance_scale=2.0) for p, s, lab in reqs]
                    for f in futs:
                        f.result()
                    t_batch[threads] = time.perf_counter() - t0
        row = dict(bench="serving", concurrent=n, alone_images_per_s=n / t_alone,
                   batcher_images_per_s=n / t_batch[None], speedup=t_alone / t_batch[None],
                   batcher_1thread_images_per_s=n / t_batch[1], speedup_1thread=t_alone / t_batch[1], ticks=b.ticks)
        rows.append(row)
        print(f"{n:3d} concurrent: alone {row['alone_images_per_s']:7.1f} img/s  batcher "
              f"{row['batcher_images_per_s']:7.1f} img/s  x{row['speedup']:.2f}  batcher(cpu_threads=1) "
              f"{row['batcher_1thread_images_per_s']:7.1f} img/s  x{row['speedup_1thread']:.2f}  "
              f"({b.ticks} model calls)", flush=True)
    return rows


# -- 2. load and faults ----------------------------------------------------------------------------------------
def draw(rng: random.Random, faults=True):
    """(kind, body dict or bytes, client give-up seconds or None) of one request; only good ones without
    ``faults``."""
    u = rng.random() if faults else 1.0
    seed = rng.randrange(48)
    good = {"seed": seed, "label": seed % 10, "steps": (6, 10)[seed % 2], "solver": "dpmpp_2m"}
    if u < 0.10:
        return "malformed", rng.choice(MALFORMED), None
    if u < 0.15:
        return "model_error", dict(good, label=POISON), None
    if u < 0.18:
        return "disconnect", good, rng.uniform(0.02, 0.3)
    if u < 0.20:
        return "deadline", dict(good, timeout=0.001), None
    return "good", good, None


EXPECTED = {"malformed": {400, 422}, "model_error": {500, 503}, "deadline": {504, 503}, "good": {200, 503},
            "disconnect": {200, 503}}


class Tally:
    def __init__(self):
        self.sent = self.answered = self.abandoned = self.lost = self.full = 0
        self.by_status, self.latencies, self.results, self.problems = {}, [], [], []

    def problem(self, what):
        self.lost += 1
        if len(self.problems) < 10:
            self.problems.append(what)


async def http_clients(base_url, seconds, clients, tally, faults=True):
    import httpx

    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:
        async def client(i):
            rng = random.Random(i)
            while time.monotonic() < end:
                kind, body, give_up = draw(rng, faults)
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                tally.sent += 1
                t0 = time.perf_counter()
                try:
                    r = await asyncio.wait_for(http.post("/sample", content=content,
                                                         headers={"content-type": "application/json"}),
                                               give_up or 120)
                except asyncio.TimeoutError:
                    if kind == "disconnect":
                        tally.abandoned += 1
                    else:
                        tally.problem(f"{kind}: no answer within 120 s")
                    continue
                except Exception as e:  # a dropped or refused connection
                    tally.problem(f"{kind}: {type(e).__name__}: {e}")
                    continue
                tally.answered += 1
                tally.by_status[r.status_code] = tally.by_status.get(r.status_code, 0) + 1
                if r.status_code not in EXPECTED[kind]:
                    tally.problem(f"{kind}: status {r.status_code} {r.text[:200]}")
                    continue
                if r.status_code != 200:
                    try:
                        assert "error" in r.json()
                    except Exception:
                        tally.problem(f"{kind}: {r.status_code} without a JSON error body")
                    if r.status_code == 503:
                        tally.full += 1
                        await asyncio.sleep(0.05)
                    continue
                tally.latencies.append(time.perf_counter() - t0)
                tally.results.append((body["seed"], body["label"], body["steps"], r.json()["sample"]))

        await asyncio.gather(*[client(i) for i in range(clients)])


async def batcher_clients(batcher, spec, seconds, clients, tally, faults=True):
    """The same workload on the in-process batcher: submit / await / cancel instead of HTTP."""
    from fastdiff.serving import QueueFull

    end = time.monotonic() + seconds
    plans = {n: fd.plan("dpmpp_2m", spec.schedule, n, prediction=spec.prediction) for n in (6, 10)}
    null = torch.tensor(spec.null_label)

    async def client(i):
        rng = random.Random(i)
        while time.monotonic() < end:
            kind, body, give_up = draw(rng, faults)
            tally.sent += 1
            t0 = time.perf_counter()
            try:
                if kind == "malformed":  # what the HTTP layer would have refused, given to submit
                    bad = rng.choice([dict(seed=-1), dict(guidance_scale=float("nan")), dict(shape=(0, 8)),
                                      dict(seed=2**64)])
                    args = dict(plan=plans[6], seed=1, shape=spec.shape, guidance_scale=2.0) | bad
                    batcher.submit(args.pop("plan"), args.pop("seed"), args.pop("shape"), **args)
                    tally.problem("malformed: accepted")
                    continue
                fut = batcher.submit(plans[body["steps"]], body["seed"], spec.shape,
                                     cond={"label": torch.tensor(body["label"])}, uncond={"label": null},
                                     guidance_scale=2.0, timeout=body.get("timeout", 120))
            except ValueError:
                tally.answered += 1
                continue
            except QueueFull:
                tally.answered += 1
                tally.full += 1
                await asyncio.sleep(0.05)
                continue
            waiting = asyncio.wrap_future(fut)
            done, _ = await asyncio.wait({waiting}, timeout=give_up or 120)
            if not done:  # the client gives up: cancel
                fut.cancel()
                if kind == "disconnect":
                    tally.abandoned += 1
                else:
                    tally.problem(f"{kind}: no result within 120 s")
                continue
            try:
                x = fut.result()
            except Exception as e:  # its own failure (the batcher's TimeoutError included)
                if not waiting.cancelled():
                    waiting.exception()
                tally.answered += 1
                ok = (kind == "model_error" and isinstance(e, RuntimeError)) or (
                    kind == "deadline" and isinstance(e, TimeoutError))
                if not ok:
                    tally.problem(f"{kind}: {type(e).__name__}: {e}")
                continue
            tally.answered += 1
            if kind not in ("good", "disconnect"):
                tally.problem(f"{kind}: got a result")
                continue
            tally.latencies.append(time.perf_counter() - t0)
            tally.results.append((body["seed"], body["label"], body["steps"], x))

    await asyncio.gather(*[client(i) for i in range(clients)])


_REFS: dict = {}


def differing(results, spec):
    """(count over the tolerance, max abs difference) of answers vs the same request sampled alone."""
    worst, count = 0.0, 0
    for seed, label, steps, got in results:
        key = (seed, label, steps)
        if key not in _REFS:
            plan = fd.plan("dpmpp_2m", spec.schedule, steps, prediction=spec.prediction)
            with torch.inference_mode():
                _REFS[key] = fd.sample(spec.model, plan, shape=(1,) + spec.shape, seeds=[seed], guidance_scale=2.0,
                                       cond={"label": torch.tensor([label])},
                                       uncond={"label": torch.tensor([spec.null_label])})[0]
        d = float((torch.as_tensor(got, dtype=torch.float32) - _REFS[key]).abs().max())
        worst = max(worst, d)
        count += d > TOLERANCE
    return count, worst


def summary(target, tally, seconds, spec, unresolved, alone):
    lat = sorted(tally.latencies)
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    n_diff, worst = differing(tally.results, spec)
    row = dict(bench="serving_load", target=target, clients=CLIENTS, seconds=seconds, sent=tally.sent,
               answered=tally.answered, abandoned_by_client=tally.abandoned, lost=tally.lost + unresolved,
               unresolved_on_server=unresolved, queue_full_answers=tally.full,
               statuses={str(k): v for k, v in sorted(tally.by_status.items())}, good_answers=len(lat),
               differing_from_alone=n_diff, max_abs_diff_vs_alone=worst, tolerance=TOLERANCE,
               p50_latency_s=q(0.50), p99_latency_s=q(0.99), good_per_s=len(lat) / seconds,
               alone_p50_latency_s=alone["p50"], alone_good_per_s=alone["per_s"],
               throughput_vs_alone=(len(lat) / seconds) / alone["per_s"] if alone["per_s"] else float("nan"),
               problems=tally.problems)
    print(f"{target:8s} sent {row['sent']:5d} answered {row['answered']:5d} abandoned {row['abandoned_by_client']:3d} "
          f"lost {row['lost']}  503 {tally.full:4d}  differing {n_diff} (max {worst:.2e})  p50 "
          f"{row['p50_latency_s'] * 1e3:6.0f} ms p99 {row['p99_latency_s'] * 1e3:6.0f} ms  {row['good_per_s']:6.1f}"
          f" img/s  alone: p50 {alone['p50'] * 1e3:5.0f} ms {alone['per_s']:5.1f} img/s", flush=True)
    for p in tally.problems:
        print("   problem:", p)
    return row


def alone_stats(tally, seconds):
    lat = sorted(tally.latencies)
    return {"p50": statistics.median(lat) if lat else float("nan"), "per_s": len(lat) / seconds}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url, seconds=120, proc=None):
    import httpx

    end = time.monotonic() + seconds
    while time.monotonic() < end and (proc is None or proc.poll() is None):
        try:
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base_url} did not come up within {seconds} s")


def unresolved_http(base_url, seconds=15):
    """Requests the server accepted but never ended (after the clients stopped; one replica's view)."""
    import httpx

    end = time.monotonic() + seconds
    n = -1
    while time.monotonic() < end:
        text = httpx.get(base_url + "/metrics", timeout=5).text
        n = int(float(next(line.split()[1] for line in text.splitlines()
                           if line.startswith("fastdiff_unfinished_requests "))))
        if n == 0:
            return 0
        time.sleep(0.2)
    return n


def run_http_target(name, base_url, seconds, alone_seconds, spec):
    warm = Tally()
    asyncio.run(http_clients(base_url, 2, 1, warm, faults=False))  # warm-up
    alone = Tally()
    asyncio.run(http_clients(base_url, alone_seconds, 1, alone, faults=False))
    tally = Tally()
    asyncio.run(http_clients(base_url, seconds, CLIENTS, tally))
    return summary(name, tally, seconds, spec, unresolved_http(base_url), alone_stats(alone, alone_seconds))


def load(seconds, alone_seconds, targets):
    from fastdiff.serving import ContinuousBatcher

    spec = faulty_spec()
    rows = []
    torch.set_num_threads(1)  # like the batchers' threads (cpu_threads=1): "alone" and the references too
    if "batcher" in targets:
        with torch.inference_mode():
            alone = Tally()
            plans = {n: fd.plan("dpmpp_2m", spec.schedule, n, prediction=spec.prediction) for n in (6, 10)}
            fd.sample(spec.model, plans[6], shape=(1,) + spec.shape, seeds=[0], guidance_scale=2.0,
                      cond={"label": torch.tensor([0])}, uncond={"label": torch.tensor([10])})  # warm-up
            rng = random.Random(0)
            t_end = time.monotonic() + alone_seconds
            while time.monotonic() < t_end:  # serving each alone: fd.sample one request at a time
                seed = rng.randrange(48)
                t0 = time.perf_counter()
                fd.sample(spec.model, plans[(6, 10)[seed % 2]], shape=(1,) + spec.shape, seeds=[seed],
                          guidance_scale=2.0, cond={"label": torch.tensor([seed % 10])},
                          uncond={"label": torch.tensor([10])})
                alone.latencies.append(time.perf_counter() - t0)
        with ContinuousBatcher(spec.model, max_batch=32, max_queue=MAX_QUEUE, cpu_threads=1) as b:
            tally = Tally()
            asyncio.run(batcher_clients(b, spec, seconds, CLIENTS, tally))
            end = time.monotonic() + 15
            while b.unfinished() and time.monotonic() < end:
                time.sleep(0.1)
            unresolved = b.unfinished()
        rows.append(summary("batcher", tally, seconds, spec, unresolved, alone_stats(alone, alone_seconds)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    if "serve" in targets:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "fastdiff.serving.http", "--model", "bench_serving:faulty_spec",
                                 "--port", str(port), "--max-batch", "32", "--max-queue", str(MAX_QUEUE),
                                 "--cpu-threads", "1"], env=env, cwd=HERE)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, proc=proc)
            rows.append(run_http_target("serve", base, seconds, alone_seconds, spec))
        finally:
            proc.terminate()
            proc.wait(30)
    ray_targets = [t for t in targets if t.startswith("ray")]
    if ray_targets:
        try:
            import ray
            from ray import serve
        except ImportError:
            print("ray is not installed: skipping the Ray Serve targets")
            return rows
        from fastdiff.serving.ray import deployment

        os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the replicas import bench_serving
        port = free_port()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for t in ray_targets:
                replicas = int(t[3:] or 1)
                app = deployment("bench_serving:faulty_spec", num_replicas=replicas, max_batch=32,
                                 max_queue=MAX_QUEUE, cpu_threads=1,
                                 ray_actor_options={"num_cpus": os.cpu_count() / replicas})
                serve.run(app, name="fastdiff", route_prefix="/")
                base = f"http://127.0.0.1:{port}"
                wait_healthy(base)
                rows.append(run_http_target(f"ray{replicas}", base, seconds, alone_seconds, spec))
                serve.delete("fastdiff")
        finally:
            serve.shutdown()
            ray.shutdown()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--load-seconds", type=float, default=None,
                        help="seconds of load per target (default 10; 0 skips; --quick skips unless given)")
    parser.add_argument("--alone-seconds", type=float, default=4.0)
    parser.add_argument("--targets", nargs="*", default=["batcher", "serve", "ray1", "ray2"])
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    seconds = args.load_seconds if args.load_seconds is not None else (0 if args.quick else 10.0)
    rows = [] if args.skip_throughput else throughput(args.quick)
    if seconds > 0:
        rows += load(seconds, args.alone_seconds, args.targets)
    note = ("2-core machine shared with other jobs while measured; load: 64 asyncio+httpx clients on 127.0.0.1 in "
            "the same process as the in-process batcher, a separate process for fastdiff serve and Ray")
    print(f"wrote {write('serving_quick' if args.quick else 'serving', rows, args.out, extra={'note': note})}")


if __name__ == "__main__":
    main()
