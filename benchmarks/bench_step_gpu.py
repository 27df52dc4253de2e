"""Step-kernel bandwidth on a CUDA GPU: the triton kernel (and the "cuda" kernel where it loads) against the
device's own copy bandwidth, measured in the same run.

For ddim (deterministic), dpmpp_2m (one history slot read and written) and euler_ancestral (Philox noise) at 16M+
elements in fp32 and bf16: CUDA-event times (median, p20, p80) as GB/s of the bytes the step must move, and as a
fraction of ``torch`` copy bandwidth; kernel launches per step counted with torch.profiler (exactly 1 without
Langevin, 3 with); the step loop run under ``torch.cuda.set_sync_debug_mode("error")`` to show it never syncs with
the host.  Each kernel is checked against ``fastdiff.ops.step_reference`` before it is timed.

    python benchmarks/bench_step_gpu.py [--numel 16777216] [--reps 50] [--out benchmarks/results]
    TRITON_INTERPRET=1 python benchmarks/bench_step_gpu.py --dry-run   # the script's own check, on CPU: no numbers

Writes long-format JSON to benchmarks/results/<gpu name>/step_gpu.json (one record per measured value).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys

import numpy as np
import torch

CASES = {  # solver -> (plan factory, stage); a stage in the steady state of the plan
    "ddim": (lambda fd, S: fd.plan("ddim", S.DiscreteVP.scaled_linear(), 20), 5),
    "dpmpp_2m": (lambda fd, S: fd.plan("dpmpp_2m", S.DiscreteVP.scaled_linear(), 20), 5),
    "euler_ancestral": (lambda fd, S: fd.plan("euler_ancestral", S.EDM(), 20), 5),
    "pc": (lambda fd, S: fd.plan("pc", S.VE(), 10), None),  # first Langevin corrector stage: launch count only
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DRY_RUN = False  # --dry-run: CPU tensors through Triton's interpreter, tiny sizes, to test this script itself


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_info() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(p.total_memory / 2**30, 1),
        "sm_count": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_cuda(fn, reps: int, warmup: int = 5) -> np.ndarray:
    """Per-call milliseconds from CUDA events around each call (no host sync between calls)."""
    if DRY_RUN:
        import time

        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return np.array(t)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])


def host_syncs(fn, what: str) -> int:
    """1 if ``fn`` synchronizes with the host (torch.cuda.set_sync_debug_mode("error") raises), else 0."""
    if DRY_RUN:
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return 0
    except RuntimeError as e:
        print(f"host sync in {what}: {e}")
        return 1
    finally:
        torch.cuda.set_sync_debug_mode(0)


def stats(ms: np.ndarray) -> dict:
    return {"median": float(np.median(ms)), "p20": float(np.percentile(ms, 20)), "p80": float(np.percentile(ms, 80))}


def count_launches(fn) -> tuple[int, list[str]]:
    """Kernel launches made by one call of ``fn`` (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    if DRY_RUN:
        fn()
        return -1, []
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and not e.name.startswith(("Memcpy", "Memset", "cudaMemcpy"))]
    return len(names), names


def _with_x_out(step):
    """A step that takes ``x_out=``; kernels without it write a new tensor (then the copy-back is not timed)."""
    import inspect

    if "x_out" in inspect.signature(step).parameters:
        return step
    return lambda *args, x_out=None: step(*args)


def providers():
    """name -> step function with the reference signature (+ x_out)."""
    from fastdiff.backends import load

    out = {}
    tri = load("triton")
    ok, why = tri.available()
    if ok:
        out["triton"] = _with_x_out(tri.OPS["step"])
    else:
        print(f"triton kernel unavailable: {why}")
    try:
        cu = load("cuda")
        ok, why = cu.available() if hasattr(cu, "available") else (True, "")
        if ok:
            out["cuda"] = _with_x_out(cu.OPS["step"])
        else:
            print(f"cuda kernel unavailable: {why}")
    except (RuntimeError, ImportError, OSError) as e:  # not built here, no toolkit, ...
        print(f"cuda kernel unavailable: {e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements in x (batch 4), default 16M")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--dry-run", action="store_true", help="check the script on CPU (TRITON_INTERPRET=1); no results")
    args = ap.parse_args(argv)
    global DRY_RUN
    DRY_RUN = args.dry_run
    if DRY_RUN:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment")
            return 2
        return run(args, torch.device("cpu"), {"gpu_name": "dry run (cpu)"}, min(args.numel, 4096), min(args.reps, 2))
    if not torch.cuda.is_available():
        print("bench_step_gpu.py needs a CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels.")
        return 2

    return run(args, torch.device("cuda"), machine_info(), args.numel, args.reps)


def bench_copy(rec, dname, dt, shape, dev, reps) -> float:
    """Device copy bandwidth (GB/s, median) for a tensor of ``shape`` in ``dt``: reads + writes."""
    src = torch.randn(shape, device=dev).to(dt)
    dst = torch.empty_like(src)
    st = stats(time_cuda(lambda: dst.copy_(src), reps))
    nbytes = 2 * src.numel() * src.element_size()
    for q, v in st.items():
        rec(bench="copy", provider="torch", solver="-", dtype=dname, metric=f"time_ms_{q}", value=v)
        rec(bench="copy", provider="torch", solver="-", dtype=dname, metric=f"gbps_{q}", value=nbytes / (v * 1e-3) / 1e9)
    gbps = nbytes / (st["median"] * 1e-3) / 1e9
    print(f"copy {dname}: {gbps:.0f} GB/s")
    return gbps


def bench_step(rec, provs, solver, plan, k, dname, dt, shape, dev, reps, copy_gbps):
    """Every provider on stage ``k`` of ``plan``: refcheck, launches, host syncs, then CUDA-event timings."""
    from fastdiff import ops, rng

    B, numel = shape[0], shape[0] * shape[1]
    seeds = rng.seeds_tensor(list(range(1, B + 1)), device=dev)
    g = torch.zeros(1, device=dev)
    reads, writes = plan.slot_reads(k), plan.slot_writes(k)
    use_out, noise, langevin = bool(plan.calls_model[k]), bool(plan.draw[k] >= 0), bool(plan.langevin[k, 0] != 0)
    rows = torch.tensor(plan.rows()[k : k + 1], dtype=torch.float32, device=dev)
    draws = torch.tensor([int(plan.draw[k])], device=dev)
    x = torch.randn(shape, device=dev).to(dt)
    out = torch.randn(shape, device=dev).to(dt)
    slots = torch.randn((plan.num_slots,) + tuple(shape), device=dev).to(dt)
    # bytes the step must move: x, out and the read slots in; x' and the written slots out
    nbytes = numel * x.element_size() * (2 + int(use_out) + reads.bit_count() + writes.bit_count())
    ref_slots = slots.clone()
    ref = ops.step_reference(x, out, ref_slots, rows, seeds, draws, g, reads, writes, use_out, False, noise, langevin)

    for pname, step in provs.items():
        def call(x_out=None, s=slots, step=step):
            return step(x, out, s, rows, seeds, draws, g, reads, writes, use_out, False, noise, langevin, x_out=x_out)

        def tag(pname=pname, **kw):
            rec(bench="step", provider=pname, solver=solver, dtype=dname, stage=k, **kw)

        # refcheck (also tunes the launch configuration before anything is timed or profiled)
        s_chk = slots.clone()
        got = call(s=s_chk)
        err = ((got.float() - ref.float()).abs() / (1 + ref.float().abs())).max().item()
        if writes:
            err = max(err, ((s_chk.float() - ref_slots.float()).abs() / (1 + ref_slots.float().abs())).max().item())
        ok = err <= (1e-4 if dt == torch.float32 else 2e-2)
        tag(metric="refcheck_max_rel_err", value=err)
        n_launch, names = count_launches(lambda: call(x_out=x))
        tag(metric="launches_per_step", value=n_launch, kernels=names)
        # zero host syncs in a loop of steps (in place, as in a sampler)
        syncs = host_syncs(lambda: [call(x_out=x) for _ in range(3)], f"{pname} {solver} {dname}")
        tag(metric="host_syncs_in_loop", value=syncs)
        status = f"launches {n_launch}  syncs {syncs}{'' if ok else f'  REFCHECK FAILED ({err:.3g})'}"
        if langevin:  # the corrector's reduction passes: launch count only
            print(f"{pname:6s} {solver:16s} {dname:8s} {status}")
            continue
        st = stats(time_cuda(lambda: call(x_out=x), reps))
        for q, v in st.items():
            gbps = nbytes / (v * 1e-3) / 1e9
            tag(metric=f"time_ms_{q}", value=v)
            tag(metric=f"gbps_{q}", value=gbps)
            tag(metric=f"frac_of_copy_{q}", value=gbps / copy_gbps)
        gbps = nbytes / (st["median"] * 1e-3) / 1e9
        print(f"{pname:6s} {solver:16s} {dname:8s} {st['median'] * 1e3:8.1f} us  {gbps:6.0f} GB/s  "
              f"{gbps / copy_gbps:5.1%} of copy  {status}")


def run(args, dev, info, numel, reps) -> int:
    import fastdiff as fd
    from fastdiff import schedules as S

    provs = providers()
    B = 4
    shape = (B, numel // B)
    records = []

    def rec(**kw):
        records.append({**kw, "numel": shape[0] * shape[1], "shape": list(shape)})

    copy_gbps = {dname: bench_copy(rec, dname, dt, shape, dev, reps) for dname, dt in DTYPES.items()}
    for solver, (factory, k) in CASES.items():
        plan = factory(fd, S)
        if k is None:
            k = int(np.flatnonzero(plan.langevin[:, 0] != 0)[0])
        for dname, dt in DTYPES.items():
            bench_step(rec, provs, solver, plan, k, dname, dt, shape, dev, reps, copy_gbps[dname])

    if DRY_RUN:
        print(f"dry run: {len(records)} records, nothing written")
        return 0
    path = os.path.join(args.out, slug(info["gpu_name"]), "step_gpu.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, "records": records}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
