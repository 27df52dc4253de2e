"""Benchmark of the cpu step kernel (csrc/cpu) against diffusers, torch.compile and eager torch.

(a) Per-step cost on a Stable Diffusion latent (1x4x64x64 fp32), 20 steps of dpmpp_2m with precomputed model outputs:
    fastdiff's cpu kernel (through the backend's OPS and through the ``fastdiff::step`` custom op) vs diffusers'
    ``DPMSolverMultistepScheduler.step`` (scaled_linear, 20 steps), a torch.compile'd (inductor) DDIM step
    ``x' = a x + b out`` and the same step in eager torch.
(b) Bandwidth on 4M+ elements fp32: a DDIM step (read x, out; write x'), dpmpp_2m (also read + write one history
    slot) and euler_ancestral (Philox noise drawn in the kernel), as effective GB/s (bytes the step must move / time)
    and as a fraction of torch's copy bandwidth (``dst.copy_(src)``) measured in the same run, interleaved.

Every provider is checked against the reference before it is timed.  Timings: time.perf_counter, warmups, median and
p20 / p80 over repeats.  Long-format JSON goes to benchmarks/results/cpu-<machine>/step_cpu.json.

    python benchmarks/bench_step_cpu.py [--quick] [--sizes 4194304,33554432] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config

import fastdiff as fd

try:
    from _common import cpu_model, machine_name
except ImportError:  # imported as benchmarks.bench_step_cpu
    from ._common import cpu_model, machine_name
from fastdiff import ops, rng
from fastdiff import schedules as S
from fastdiff.backends import cpu

STEPS = 20
LATENT = (1, 4, 64, 64)
TARGETS = {  # the targets
    "per_step_vs_diffusers": 10.0,  # fastdiff per-step cost at least 10x lower than diffusers
    "per_step_vs_compiled": 3.0,  # and 3x lower than the torch.compile'd eager DDIM step
    "ddim_frac_copy": 0.85,
    "dpmpp_2m_frac_copy": 0.75,
    "euler_ancestral_frac_copy": 0.75,
}


# ---------------------------------------------------------------------------------------------------------------
# Machine and timing helpers
# ---------------------------------------------------------------------------------------------------------------


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def quantiles(ts):
    ts = sorted(ts)

    def q(f):
        return ts[min(len(ts) - 1, round(f * (len(ts) - 1)))]

    return {"median": statistics.median(ts), "p20": q(0.2), "p80": q(0.8)}


def time_interleaved(cases: dict, reps: int, warmup: int = 3) -> dict:
    """Time each case's ``run`` (after its untimed ``prepare``) ``reps`` times, round-robin over the cases, so that
    slow phases of a shared machine hit all providers alike.  Returns {name: [seconds]}."""
    for prepare, run in cases.values():
        for _ in range(warmup):
            prepare()
            run()
    out = {name: [] for name in cases}
    for _ in range(reps):
        for name, (prepare, run) in cases.items():
            prepare()
            t0 = time.perf_counter()
            run()
            out[name].append(time.perf_counter() - t0)
    return out


def assert_close(got, want, rtol, what):
    got, want = got.double(), want.double()
    err = float((got - want).abs().max())
    scale = float(want.abs().max()) or 1.0
    if not err <= rtol * scale:
        raise AssertionError(f"refcheck failed for {what}: max |err| {err:.3g} > {rtol:g} * {scale:.3g}")
    return err / scale


# ---------------------------------------------------------------------------------------------------------------
# (a) per-step cost on an SD latent
# ---------------------------------------------------------------------------------------------------------------


def diffusers_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", solver_order=2, algorithm_type="dpmsolver++")


class StageLoop:
    """A plan's stages on the cpu kernel with precomputed model outputs; ``call`` is the step function used."""

    def __init__(self, plan, x0, outs, seeds, via_ops=False):
        self.plan, self.x0, self.outs, self.seeds, self.via_ops = plan, x0, outs, seeds, via_ops
        rows = torch.tensor(plan.rows(), dtype=torch.float32)
        self.rows = [rows[k:k + 1] for k in range(plan.num_stages)]
        self.draws = [torch.tensor([int(d)]) for d in plan.draw]
        self.flags = [(plan.slot_reads(k), plan.slot_writes(k), bool(plan.calls_model[k]), bool(plan.draw[k] >= 0),
                       bool(plan.langevin[k, 0] != 0)) for k in range(plan.num_stages)]
        self.slots = torch.zeros((plan.num_slots,) + tuple(x0.shape))
        self.x = torch.empty_like(x0)
        self.guidance = torch.zeros(1)
        self.step = cpu.OPS["step"]

    def prepare(self):
        self.x.copy_(self.x0)

    def run(self):
        x, slots, outs = self.x, self.slots, self.outs
        if self.via_ops:
            for k in range(self.plan.num_stages):
                r, w, use_out, noise, lang = self.flags[k]
                x = ops.step(x, outs[k], slots, self.rows[k], self.seeds, self.draws[k], slot_reads=r, slot_writes=w,
                             use_out=use_out, noise=noise, langevin=lang, backend="cpu")
        else:
            step = self.step
            for k in range(self.plan.num_stages):
                r, w, use_out, noise, lang = self.flags[k]
                step(x, outs[k], slots, self.rows[k], self.seeds, self.draws[k], self.guidance, r, w, use_out, False,
                     noise, lang, x_out=x)  # in place
        return x

    def reference(self):
        x, slots = self.x0.clone(), torch.zeros_like(self.slots)
        for k in range(self.plan.num_stages):
            r, w, use_out, noise, lang = self.flags[k]
            x = ops.step_reference(x, self.outs[k], slots, self.rows[k], self.seeds, self.draws[k], self.guidance, r,
                                   w, use_out, False, noise, lang)
        return x


def bench_latent(reps: int, records: list, meta: dict):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(LATENT, generator=g)
    outs = [torch.randn(LATENT, generator=g) for _ in range(STEPS)]  # precomputed "model outputs" (epsilon)
    seeds = rng.seeds_tensor([1])
    sch = diffusers_scheduler()
    sch.set_timesteps(STEPS)
    timesteps = sch.timesteps.clone()
    # fastdiff on diffusers' own grid and betas (so the results are comparable, not only the cost)
    plan = fd.plan("dpmpp_2m", S.DiscreteVP(betas=sch.betas.double().numpy()), timesteps=timesteps.numpy())
    ddim_plan = fd.plan("ddim", S.DiscreteVP(betas=sch.betas.double().numpy()), timesteps=timesteps.numpy())
    assert plan.nfe == STEPS and plan.num_stages == STEPS

    loops = {"fastdiff-cpu": StageLoop(plan, x0, outs, seeds), "fastdiff-cpu-ddim": StageLoop(ddim_plan, x0, outs,
                                                                                              seeds),
             "fastdiff-ops": StageLoop(plan, x0, outs, seeds, via_ops=True)}

    def diffusers_prepare():
        sch.set_timesteps(STEPS)  # resets the multistep history and the step index (untimed)
        state["x"] = x0.clone()

    state = {}

    def diffusers_run():
        x = state["x"]
        for k, t in enumerate(timesteps):
            x = sch.step(outs[k], t, x, return_dict=False)[0]
        state["x"] = x
        return x

    # the DDIM step as torch ops, eager and compiled with inductor; coefficients as 0-d tensors (no recompiles)
    ac = np.asarray(ddim_plan.rows(), dtype=np.float64)
    K0 = ops.ROW_HEAD
    # x' = M00 x + M01 D, D = cx x + co out  ->  a x + b out
    a_k = [torch.tensor(r[K0] + r[K0 + 1] * r[0], dtype=torch.float32) for r in ac]
    b_k = [torch.tensor(r[K0 + 1] * r[1], dtype=torch.float32) for r in ac]

    def ddim_step(x, out, a, b):
        return a * x + b * out

    # compile in this process: inductor's worker pool starts in the background and competes with the timing
    torch._inductor.config.compile_threads = 1
    compiled = torch.compile(ddim_step, backend="inductor", fullgraph=True, dynamic=False)

    def torch_loop(fn):
        def run():
            x = x0
            for k in range(STEPS):
                x = fn(x, outs[k], a_k[k], b_k[k])
            state["t"] = x
            return x

        return run

    # refchecks
    errs = {}
    for name, lp in loops.items():
        lp.prepare()
        got = lp.run().clone()
        errs[name] = assert_close(got, lp.reference(), 1e-5, f"{name} vs the torch reference kernel")
    diffusers_prepare()
    dif = diffusers_run()
    rel_vs_diffusers = float((loops["fastdiff-cpu"].x - dif).abs().max() / dif.abs().max())
    ddim_ref = loops["fastdiff-cpu-ddim"].reference()
    errs["torch-compile"] = assert_close(torch_loop(compiled)(), ddim_ref, 1e-5, "compiled DDIM vs reference")
    errs["torch-eager"] = assert_close(torch_loop(ddim_step)(), ddim_ref, 1e-5, "eager DDIM vs reference")
    errs["diffusers"] = rel_vs_diffusers  # informational: same grid and betas, diffusers computes in fp32

    cases = {name: (lp.prepare, lp.run) for name, lp in loops.items()}
    cases["diffusers"] = (diffusers_prepare, diffusers_run)
    cases["torch-compile"] = (lambda: None, torch_loop(compiled))
    cases["torch-eager"] = (lambda: None, torch_loop(ddim_step))
    what = {"fastdiff-cpu": "dpmpp_2m", "fastdiff-cpu-ddim": "ddim", "fastdiff-ops": "dpmpp_2m",
            "diffusers": "dpmpp_2m", "torch-compile": "ddim", "torch-eager": "ddim"}
    times = time_interleaved(cases, reps)
    result = {}
    for name, ts in times.items():
        q = quantiles([t / STEPS for t in ts])
        result[name] = q
        for stat, v in q.items():
            records.append({**meta, "benchmark": "per_step_latent", "provider": name, "solver": what[name],
                            "shape": list(LATENT), "dtype": "float32", "steps": STEPS, "metric": "time_per_step",
                            "stat": stat, "value": v * 1e6, "unit": "us",
                            "refcheck_rel_err": errs.get(name)})
    result["fastdiff_vs_diffusers_rel_diff"] = rel_vs_diffusers
    return result


# ---------------------------------------------------------------------------------------------------------------
# (b) bandwidth on large tensors
# ---------------------------------------------------------------------------------------------------------------

BW_CASES = {  # name: (solver, schedule, stage, arrays moved per element: reads + writes)
    "ddim": ("ddim", S.EDM(), 1, 3),
    "dpmpp_2m": ("dpmpp_2m", S.EDM(), 1, 5),
    "euler_ancestral": ("euler_ancestral", S.EDM(), 1, 3),
}


def bench_bandwidth(numel: int, reps: int, records: list, meta: dict, check_prefix: int = 1 << 22):
    shape = (1, numel)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    src, dst = torch.randn(shape, generator=g), torch.empty(shape)
    seeds = rng.seeds_tensor([42])
    step = cpu.OPS["step"]
    cases = {"copy": (lambda: None, lambda: dst.copy_(src))}
    arrays = {"copy": 2}
    for name, (solver, sch, k, n_arrays) in BW_CASES.items():
        plan = fd.plan(solver, sch, STEPS)
        rows = torch.tensor(plan.rows()[k:k + 1], dtype=torch.float32)
        draws = torch.tensor([int(plan.draw[k])])
        flags = (plan.slot_reads(k), plan.slot_writes(k), True, False, bool(plan.draw[k] >= 0), False)
        assert bool(flags[1]) == (n_arrays == 5) and flags[4] == (name == "euler_ancestral")
        slots = torch.randn((plan.num_slots,) + shape, generator=g)
        slots0 = slots.clone()
        xo = torch.empty(shape)
        # refcheck on a prefix (the noise of element e depends on e only, so a prefix is a smaller instance)
        m = min(numel, check_prefix)
        pre_slots = slots0[:, :, :m].clone()
        want = ops.step_reference(x[:, :m], out[:, :m], pre_slots, rows, seeds, draws, torch.zeros(1), *flags)
        s_chk = slots0.clone()
        got = step(x, out, s_chk, rows, seeds, draws, torch.zeros(1), *flags)
        assert_close(got[:, :m], want, 1e-5, f"{name} step vs reference")
        if flags[1]:
            assert_close(s_chk[:, :, :m], pre_slots, 1e-5, f"{name} slot vs reference")
        # the slot is rewritten each call (D of the same x, out: idempotent), x' goes to a separate buffer
        cases[name] = (lambda: None, lambda a=(x, out, slots, rows, seeds, draws, torch.zeros(1), *flags), o=xo:
                       step(*a, x_out=o))
        arrays[name] = n_arrays
    times = time_interleaved(cases, reps, warmup=2)
    copy_bw = 2 * 4 * numel / statistics.median(times["copy"])
    result = {}
    for name, ts in times.items():
        q = quantiles(ts)
        nbytes = arrays[name] * 4 * numel
        bw = {stat: nbytes / v / 1e9 for stat, v in q.items()}  # p20 of time = p80 of bandwidth: name by time
        frac = nbytes / q["median"] / copy_bw
        # the fraction per repeat (copy and kernel timed back to back), robust to a shared machine's slow phases
        paired = statistics.median((nbytes / t) / (2 * 4 * numel / c) for t, c in zip(ts, times["copy"], strict=True))
        result[name] = {"time_median_ms": q["median"] * 1e3, "gbps_median": bw["median"], "frac_copy": frac,
                        "frac_copy_paired": paired}
        for stat in ("median", "p20", "p80"):
            base = {**meta, "benchmark": "bandwidth", "provider": "torch" if name == "copy" else "fastdiff-cpu",
                    "op": name, "shape": list(shape), "dtype": "float32", "arrays": arrays[name], "stat": stat}
            records.append({**base, "metric": "time", "value": q[stat] * 1e3, "unit": "ms"})
            records.append({**base, "metric": "effective_bandwidth", "value": bw[stat], "unit": "GB/s"})
        records.append({**meta, "benchmark": "bandwidth", "provider": "fastdiff-cpu", "op": name,
                        "shape": list(shape), "dtype": "float32", "metric": "fraction_of_copy_bandwidth",
                        "stat": "median", "value": frac, "unit": "1", "paired_median": paired})
    return result


# ---------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 4M elements only")
    ap.add_argument("--sizes", default="4194304,33554432", help="element counts for the bandwidth part")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>/step_cpu.json; "
                    "step_cpu_quick.json with --quick)")
    args = ap.parse_args()
    ok, why = cpu.available()
    if not ok:
        raise SystemExit(f"the cpu backend is unavailable: {why}")
    import diffusers

    meta = {"machine": machine_name(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
            "threads": cpu.ext().num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "fastdiff": getattr(fd, "__version__", "dev"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    records: list = []
    load0 = loadavg()
    sizes = [4194304] if args.quick else [int(s) for s in args.sizes.split(",")]
    latent = bench_latent(args.reps or (30 if args.quick else 200), records, meta)
    bw = {n: bench_bandwidth(n, args.reps or (10 if args.quick else (30 if n <= 1 << 23 else 10)), records, meta)
          for n in sizes}
    load1 = loadavg()
    for r in records:
        r["loadavg_1min"] = [load0, load1]

    name = "step_cpu_quick.json" if args.quick else "step_cpu.json"  # a quick run never replaces the full results
    path = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / meta["machine"] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n  ".join(json.dumps(r) for r in records)  # long format: one record per line
    head = json.dumps({**meta, "loadavg_1min": [load0, load1]})
    path.write_text(f'{{"meta": {head},\n "records": [\n  {body}\n]}}\n')

    # report
    us = {k: v["median"] * 1e6 for k, v in latent.items() if isinstance(v, dict)}
    print(f"\n{meta['cpu_model']} ({meta['cores']} cores, {meta['threads']} OpenMP threads), "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}; load average {load0:.2f} -> {load1:.2f}")
    print(f"\n(a) per-step cost, {'x'.join(map(str, LATENT))} fp32, {STEPS} steps (median, p20-p80 in us)")
    for k, v in latent.items():
        if isinstance(v, dict):
            print(f"  {k:20s} {v['median'] * 1e6:8.2f}   ({v['p20'] * 1e6:.2f} - {v['p80'] * 1e6:.2f})")
    r_dif = us["diffusers"] / us["fastdiff-cpu"]
    r_cmp = us["torch-compile"] / us["fastdiff-cpu"]
    t_dif, t_cmp = TARGETS["per_step_vs_diffusers"], TARGETS["per_step_vs_compiled"]
    print(f"  diffusers / fastdiff-cpu (dpmpp_2m)      {r_dif:7.1f}x   target >= {t_dif:g}x: "
          f"{'met' if r_dif >= t_dif else 'MISSED'}")
    print(f"  torch-compile ddim / fastdiff-cpu        {r_cmp:7.1f}x   target >= {t_cmp:g}x: "
          f"{'met' if r_cmp >= t_cmp else 'MISSED'}")
    print(f"  torch-eager ddim / fastdiff-cpu          {us['torch-eager'] / us['fastdiff-cpu']:7.1f}x")
    print(f"  fastdiff.ops custom-op overhead per step {us['fastdiff-ops'] - us['fastdiff-cpu']:7.2f} us")
    print(f"  fastdiff vs diffusers result: max rel diff {latent['fastdiff_vs_diffusers_rel_diff']:.2e}")
    print("\n(b) bandwidth, fp32 (effective GB/s at the median; fraction of copy bandwidth, median / paired median)")
    for n, res in bw.items():
        print(f"  {n} elements:")
        for name, v in res.items():
            tgt = TARGETS.get(f"{name}_frac_copy")
            verdict = "" if tgt is None else f"target >= {tgt}: {'met' if v['frac_copy'] >= tgt else 'MISSED'}"
            print(f"    {name:16s} {v['time_median_ms']:8.3f} ms {v['gbps_median']:7.1f} GB/s  "
                  f"{v['frac_copy']:5.2f} / {v['frac_copy_paired']:5.2f}  {verdict}")
    if load0 > 0.6 * (os.cpu_count() or 1):  # at the start, before this script's own threads count
        print(f"\nWARNING: the machine was busy (1-min load average {load0:.2f} at the start, {os.cpu_count()} "
              "cores): OpenMP regions wait for descheduled threads, so these timings are not representative")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
