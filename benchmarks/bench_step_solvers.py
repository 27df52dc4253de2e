"""Per-step cost of every common solver at several sizes, with a precomputed model output (sampler cost only).

Solvers: ddim, euler, heun, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, euler_ancestral (scaled_linear DiscreteVP, 20 steps)
and flow_euler (rectified flow).  Sizes: 1x4x64x64, 2x4x128x128 (a CFG batch), 16x4x128x128 and 1x4M.
Providers: fastdiff's kernel for this device, the same stages as eager torch ops (fastdiff's torch backend), and
diffusers' scheduler ``step`` where one maps directly.  Reported per step: median and p20/p80 time, effective GB/s
(bytes a stage must move: x, out, history reads and writes) and the fraction of the copy bandwidth of the run.

    python benchmarks/bench_step_solvers.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fastdiff as fd
from fastdiff import ops, rng
from fastdiff.backends import resolve
from fastdiff.backends.torch_eager import run_stage

try:
    from _common import timeit, write
except ImportError:
    from ._common import timeit, write

SOLVERS = ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler_ancestral", "flow_euler"]
SIZES = [(1, 4, 64, 64), (2, 4, 128, 128), (16, 4, 128, 128), (1, 4 * 2**20)]


def diffusers_scheduler(solver):
    """A diffusers scheduler doing the same steps, or None."""
    import diffusers as d

    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    return {"ddim": lambda: d.DDIMScheduler(**sd, set_alpha_to_one=True),
            "euler": lambda: d.EulerDiscreteScheduler(**sd),
            "dpmpp_2m": lambda: d.DPMSolverMultistepScheduler(**sd, final_sigmas_type="zero"),
            "dpmpp_3m": lambda: d.DPMSolverMultistepScheduler(**sd, solver_order=3, final_sigmas_type="zero"),
            "euler_ancestral": lambda: d.EulerAncestralDiscreteScheduler(**sd),
            "flow_euler": lambda: d.FlowMatchEulerDiscreteScheduler()}.get(solver, lambda: None)()


def stage_bytes(plan, k, numel, elem):
    reads, writes, use_out, _, _ = plan.stage_flags[k]
    arrays = 2 + int(use_out) + bin(reads).count("1") + bin(writes).count("1")  # x in/out, out, slots
    return arrays * numel * elem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sizes = SIZES[:1] if args.quick else SIZES
    repeats = 3 if args.quick else 7
    kernel = resolve("auto", "cuda" if torch.cuda.is_available() else "cpu")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else None
    rows = []
    for shape in sizes:
        numel = int(np.prod(shape))
        src, dst = torch.randn(shape, device=dev), torch.empty(shape, device=dev)
        copy = timeit(lambda: dst.copy_(src), repeats=repeats, sync=sync)["median"]
        copy_gbs = 2 * numel * 4 / copy / 1e9
        x0 = torch.randn(shape, device=dev)
        out = torch.randn(shape, device=dev)
        seeds_list = list(range(shape[0]))
        seeds = rng.seeds_tensor(seeds_list, device=dev)
        for solver in SOLVERS:
            sch = fd.schedules.RectifiedFlow() if solver == "flow_euler" else fd.schedules.DiscreteVP.scaled_linear()
            plan = fd.plan(solver, sch, 20, prediction="flow" if solver == "flow_euler" else "epsilon")
            rows_t = torch.tensor(plan.rows(), dtype=torch.float32, device=dev)
            draws = torch.tensor(plan.draw, device=dev)
            slots = torch.zeros((plan.num_slots,) + shape, device=dev)

            def fused():
                x = x0
                for k in range(plan.num_stages):
                    rd, wr, uo, nz, lg = plan.stage_flags[k]
                    x = ops.step(x, out, slots, rows_t[k:k + 1], seeds, draws[k:k + 1], slot_reads=rd,
                                 slot_writes=wr, use_out=uo, noise=nz, langevin=lg, kernel=kernel)
                return x

            def eager():
                x, sl = x0, [None] * plan.num_slots
                for k in range(plan.num_stages):
                    z = (rng.normals_per_sample(seeds, torch.full_like(seeds, int(plan.draw[k])), numel // shape[0])
                         .reshape(shape) if plan.draw[k] >= 0 else None)
                    x = run_stage(plan, k, x, out if plan.calls_model[k] else None, sl, z)
                return x

            nbytes = sum(stage_bytes(plan, k, numel, 4) for k in range(plan.num_stages))
            providers = {"fastdiff-" + kernel: fused, "torch-eager": eager}
            sched = diffusers_scheduler(solver) if shape[0] <= 16 else None
            if sched is not None:
                def theirs(sched=sched):
                    sched.set_timesteps(20)
                    x = x0
                    gen = torch.Generator(device=dev).manual_seed(0)
                    for t in sched.timesteps:
                        kw = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}
                        if hasattr(sched, "scale_model_input"):  # part of a diffusers loop (DDIM: identity)
                            sched.scale_model_input(x, t)
                        x = sched.step(out, t, x, **kw).prev_sample
                    return x

                providers["diffusers"] = theirs
            torch.testing.assert_close(fused(), eager(), rtol=1e-4, atol=1e-4)  # correctness before timing
            for name, fn in providers.items():
                t = timeit(fn, repeats=repeats if numel <= 2**20 else 3, warmup=1, sync=sync)
                per = {q: t[q] / plan.num_stages for q in ("median", "p20", "p80")}
                gbs = nbytes / t["median"] / 1e9
                rows.append(dict(bench="step_solvers", solver=solver, shape=list(shape), provider=name,
                                 stages=plan.num_stages, time_per_step=per, gbps=gbs,
                                 fraction_of_copy=gbs / copy_gbs if name.startswith("fastdiff") else None,
                                 copy_gbps=copy_gbs))
            by = {r["provider"]: r for r in rows if r["solver"] == solver and r["shape"] == list(shape)}
            ours = by["fastdiff-" + kernel]
            ratio = "  ".join(f"{p} x{by[p]['time_per_step']['median'] / ours['time_per_step']['median']:.1f}"
                              for p in by if p != ours["provider"])
            print(f"{'x'.join(map(str, shape)):>14s} {solver:16s} {1e6 * ours['time_per_step']['median']:9.1f} us/step"
                  f"  {ours['gbps']:6.1f} GB/s ({ours['fraction_of_copy']:.2f} of copy)  {ratio}", flush=True)
    print(f"wrote {write('step_solvers_quick' if args.quick else 'step_solvers', rows, args.out)}")
    return rows


if __name__ == "__main__":
    main()
