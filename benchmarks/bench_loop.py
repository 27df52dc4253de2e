"""The whole sampling loop with the model replaced by a stored output: what the sampler itself costs.

Three tables, every provider timed interleaved (round-robin) in one run, so a shared machine's slow phases hit all:

1. ``loop``: 1, 4 and 25 DPM-Solver++(2M) steps at an SD latent 1x4x64x64, 1x16x128x128 and a video latent
   1x16x21x60x104, through the public API:

   - ``fastdiff``: ``fastdiff.sample(model, plan, x_T=...)`` on this machine's kernel (backend "auto");
   - ``diffusers``: ``DPMSolverMultistepScheduler`` in the usual loop (set_timesteps, scale_model_input, step);
   - ``torch-compile``: the same coefficient rows as fastdiff's plan applied by a ``torch.compile``'d step
     (inductor fuses it into one loop per stage), in a Python loop (``--no-compile`` skips it).

   Each loop's result is checked against fastdiff's before timing.

2. ``host``: the host time of ``fastdiff.sample`` per step at 1x4x64x64 for dpmpp_2m, ddim and euler_ancestral:
   per step = (loop of 25 steps - loop of 1 step) / 24, against the same stages' kernels called directly (the
   backend's kernel function on precomputed arguments, in place: "kernel alone"); ``host_overhead_us`` is the
   difference.  For dpmpp_2m the diffusers loop is timed the same way and ``speedup_vs_diffusers`` is the ratio of
   the per-step times (the public API against diffusers' ``DPMSolverMultistepScheduler.step`` loop).

3. ``bandwidth``: ``fastdiff.sample`` per step at 4M and 32M elements (one sample) for ddim, dpmpp_2m and
   euler_ancestral, as a fraction of torch's copy bandwidth measured in the same rounds.  Per step = (loop of
   S steps - loop of 1 step) / (S - 1), which removes the per-call costs (prior, result allocation); bytes per
   step are the streams the stage must move (x, the model output, the slots read, x', the slots written).  The
   normals alone (``fastdiff.ops.randn`` of one sample into a preallocated buffer, same backend, same rounds) give
   a noisy step's ceiling, ``noise_ceiling_fraction``: the fraction it would reach if everything but drawing its
   normals were free.

``--quick`` (fewer repeats; 25 steps become 10 in the bandwidth table) writes ``loop_quick.json``, never the full
results ``loop.json``.

    python benchmarks/bench_loop.py [--quick] [--no-compile] [--host-only] [--out PATH]
"""

from __future__ import annotations

import argparse

import torch

import fastdiff as fd

try:
    from _common import loadavg, source_version, time_interleaved, write
except ImportError:
    from ._common import loadavg, source_version, time_interleaved, write

SHAPES = {"sd-1x4x64x64": (1, 4, 64, 64), "1x16x128x128": (1, 16, 128, 128),
          "video-1x16x21x60x104": (1, 16, 21, 60, 104)}
STEPS = [1, 4, 25]
BANDWIDTH_SIZES = {"4M": 1 << 22, "32M": 1 << 25}
BANDWIDTH_SOLVERS = ["ddim", "dpmpp_2m", "euler_ancestral"]
RTOL = 1e-3


def schedule():
    return fd.schedules.DiscreteVP.scaled_linear()


def diffusers_loop(config, steps, x_T, out):
    from diffusers import DPMSolverMultistepScheduler

    ds = DPMSolverMultistepScheduler(**config)
    ds.set_timesteps(steps)
    x = x_T * ds.init_noise_sigma
    for t in ds.timesteps:
        x = ds.step(out, t, ds.scale_model_input(x, t)).prev_sample
    return x


def make_compiled_loop(plan, x_T, out):
    """fastdiff's plan rows applied by a torch.compile'd step (the same math as the kernels, fused by inductor)."""
    K = plan.num_slots
    rows = [torch.tensor(r, dtype=torch.float32) for r in plan.rows()]
    W = 2 + K

    def step(x, o, slots, row):
        D = row[0] * x + row[1] * o
        regs = [x, D] + [slots[i] for i in range(K)]
        new_x = sum(row[7 + j] * regs[j] for j in range(W))
        new_slots = [sum(row[7 + (1 + i) * W + j] * regs[j] for j in range(W)) for i in range(K)]
        return new_x, torch.stack(new_slots) if K else slots

    compiled = torch.compile(step, dynamic=False)

    def run():
        x, slots = x_T, torch.zeros((K,) + tuple(x_T.shape))
        for k in range(plan.num_stages):
            x, slots = compiled(x, out, slots, rows[k])
        return x

    return run


DIFFUSERS_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")


def loop_rows(repeats, compile_loops):
    from diffusers import DPMSolverMultistepScheduler  # noqa: F401  (fail early without diffusers)

    config = DIFFUSERS_CONFIG
    rows = []
    for name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn(shape, generator=g)
        out = torch.randn(shape, generator=g)
        model = lambda x, t: out  # noqa: E731
        for steps in STEPS:
            plan = fd.plan("dpmpp_2m", schedule(), steps)
            cases = {"fastdiff": lambda: fd.sample(model, plan, x_T=x_T),
                     "diffusers": lambda: diffusers_loop(config, steps, x_T, out)}
            if compile_loops:
                cases["torch-compile"] = make_compiled_loop(plan, x_T, out)
            want = cases["fastdiff"]()
            scale = float(want.abs().max())
            for who, fn in cases.items():
                got = fn()
                err = float((got - want).abs().max()) / max(scale, 1e-12)
                if err > RTOL:
                    raise AssertionError(f"{who} differs from fastdiff at {name}, {steps} steps: {err:.2e}")
            t = time_interleaved(cases, repeats=repeats, warmup=1)
            for who, q in t.items():
                rows.append({"table": "loop", "shape": name, "steps": steps, "provider": who,
                             "seconds": q["median"], "p20": q["p20"], "p80": q["p80"],
                             "per_step_us": q["median"] / steps * 1e6,
                             "speedup_vs_diffusers": t["diffusers"]["median"] / q["median"]})
                print(f"{name:22s} {steps:3d} steps {who:14s} {q['median'] * 1e3:9.3f} ms "
                      f"({q['median'] / steps * 1e6:8.1f} us/step, x{t['diffusers']['median'] / q['median']:.2f} "
                      "vs diffusers)", flush=True)
    return rows


HOST_SHAPE = (1, 4, 64, 64)
HOST_SOLVERS = ["dpmpp_2m", "ddim", "euler_ancestral"]
HOST_STEPS = 25
HOST_CALLS = 20  # calls per timed sample: a 1-step loop is tens of microseconds


def kernel_alone(plan, x_T, out, seeds):
    """The plan's stages as direct calls of the backend's kernel on precomputed arguments, in place, with the
    per-sample non-finite flags that ``fastdiff.sample`` passes by default (what it runs per step, without any
    Python around it; the start state is copied in first, one pass per loop, counted in)."""
    from fastdiff import ops, rng
    from fastdiff.sampler import device_rows

    kernel = ops._step_kernel(fd.backends.resolve("auto", x_T.device.type))
    rows, draws = device_rows(plan, x_T.device)
    x, slots = x_T.clone(), torch.zeros((plan.num_slots,) + tuple(x_T.shape))
    seeds_t, w = rng.seeds_tensor(seeds), torch.zeros(1)
    flags = torch.zeros(x_T.shape[0], dtype=torch.int32)
    stages = [(rows[k : k + 1], draws[k : k + 1], int(f.slot_reads), int(f.slot_writes), bool(f.use_out), False,
               bool(f.noise), bool(f.langevin)) for k, f in enumerate(plan.stage_flags)]

    def run():
        x.copy_(x_T)  # from the start state each time: a loop repeated on its own result runs into NaN / Inf
        slots.zero_()
        for row, draw, reads, writes, use_out, cfg, noise, langevin in stages:
            kernel(x, out, slots, row, seeds_t, draw, w, reads, writes, use_out, cfg, noise, langevin, x, None, flags)

    return run


def repeated(fn, n=HOST_CALLS):
    def run():
        for _ in range(n):
            fn()
    return run


def host_rows(repeats, config):
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(HOST_SHAPE, generator=g)
    out = torch.randn(HOST_SHAPE, generator=g)
    model = lambda x, t: out  # noqa: E731
    rows = []
    for solver in HOST_SOLVERS:
        plans = {n: fd.plan(solver, schedule(), n) for n in (1, HOST_STEPS)}
        cases = {f"fastdiff/{n}": repeated(lambda p=p: fd.sample(model, p, x_T=x_T, seeds=[7]))
                 for n, p in plans.items()}
        cases["kernel"] = repeated(kernel_alone(plans[HOST_STEPS], x_T, out, [7]))
        if solver == "dpmpp_2m":
            for n in (1, HOST_STEPS):
                cases[f"diffusers/{n}"] = repeated(lambda n=n: diffusers_loop(config, n, x_T, out))
        t = {k: v["median"] / HOST_CALLS for k, v in time_interleaved(cases, repeats=repeats, warmup=1).items()}
        per_step = (t[f"fastdiff/{HOST_STEPS}"] - t["fastdiff/1"]) / (HOST_STEPS - 1)
        kernel = t["kernel"] / HOST_STEPS
        row = {"table": "host", "shape": "x".join(map(str, HOST_SHAPE)), "solver": solver,
               "per_step_us": per_step * 1e6, "kernel_alone_us": kernel * 1e6,
               "host_overhead_us": (per_step - kernel) * 1e6, "call_of_1_step_us": t["fastdiff/1"] * 1e6}
        line = (f"host {solver:16s} fd.sample {per_step * 1e6:7.2f} us/step  kernel alone {kernel * 1e6:7.2f}  "
                f"host overhead {(per_step - kernel) * 1e6:6.2f} us/step")
        if solver == "dpmpp_2m":
            theirs = (t[f"diffusers/{HOST_STEPS}"] - t["diffusers/1"]) / (HOST_STEPS - 1)
            row.update(diffusers_per_step_us=theirs * 1e6, speedup_vs_diffusers=theirs / per_step)
            line += f"  diffusers {theirs * 1e6:7.1f} us/step (x{theirs / per_step:.1f})"
        rows.append(row)
        print(line, flush=True)
    return rows


def stage_bytes(plan, elem_bytes, n):
    """Bytes one stage must move, averaged over the plan's stages: x, out, the slots read, x', the slots written."""
    total = 0
    for f in plan.stage_flags:
        streams = 2 + int(f.use_out) + bin(f.slot_reads).count("1") + bin(f.slot_writes).count("1")
        total += streams * n * elem_bytes
    return total / plan.num_stages


def bandwidth_rows(repeats, steps):
    rows = []
    for size_name, n in BANDWIDTH_SIZES.items():
        g = torch.Generator().manual_seed(1)
        x_T = torch.randn((1, n), generator=g)
        out = torch.randn((1, n), generator=g)
        model = lambda x, t: out  # noqa: E731
        dst = torch.empty_like(x_T)
        z = torch.empty_like(x_T)
        backend = fd.backends.resolve("auto", x_T.device.type)
        cases = {"copy": lambda: dst.copy_(x_T),
                 # the normals alone (one per element, as an ancestral step draws), into a preallocated buffer
                 "noise": lambda: fd.ops.randn((1, n), [7], 1, backend=backend, out=z)}
        plans = {}
        for solver in BANDWIDTH_SOLVERS:
            for s in (1, steps):
                plans[(solver, s)] = fd.plan(solver, schedule(), s)
                cases[f"{solver}/{s}"] = (lambda p=plans[(solver, s)]: fd.sample(model, p, x_T=x_T, seeds=[7]))
        t = time_interleaved(cases, repeats=repeats, warmup=1)
        copy_bw = 2 * n * 4 / t["copy"]["median"]
        rows.append({"table": "bandwidth", "size": size_name, "provider": "torch-copy", "GBps": copy_bw / 1e9})
        noise_s = t["noise"]["median"]
        threads = torch.get_num_threads()
        rows.append({"table": "bandwidth", "size": size_name, "provider": "fastdiff-randn", "backend": backend,
                     "ms": noise_s * 1e3, "ns_per_normal_per_thread": noise_s * 1e9 * threads / n,
                     "threads": threads})
        print(f"{size_name:4s} {'normals alone':16s} {noise_s * 1e3:8.3f} ms ({noise_s * 1e9 * threads / n:.2f} ns "
              f"per normal and thread, {threads} threads)", flush=True)
        for solver in BANDWIDTH_SOLVERS:
            per_step = (t[f"{solver}/{steps}"]["median"] - t[f"{solver}/1"]["median"]) / (steps - 1)
            nbytes = stage_bytes(plans[(solver, steps)], 4, n)
            bw = nbytes / per_step
            row = {"table": "bandwidth", "size": size_name, "provider": "fastdiff", "solver": solver,
                   "per_step_ms": per_step * 1e3, "GBps": bw / 1e9, "fraction_of_copy": bw / copy_bw}
            ceiling = ""
            if any(f.noise for f in plans[(solver, steps)].stage_flags):
                # the fraction this step would reach if everything but drawing its normals were free
                row["noise_ceiling_fraction"] = nbytes / noise_s / copy_bw
                ceiling = f"  (drawing the normals alone: {row['noise_ceiling_fraction']:.2f})"
            rows.append(row)
            print(f"{size_name:4s} {solver:16s} {per_step * 1e3:8.3f} ms/step  {bw / 1e9:6.2f} GB/s  "
                  f"{bw / copy_bw:.2f} of copy ({copy_bw / 1e9:.2f} GB/s){ceiling}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; writes loop_quick.json")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd loop")
    parser.add_argument("--host-only", action="store_true", help="only the host table (loop_host_quick.json)")
    parser.add_argument("--out", help="output path (default results/<machine>/loop[_quick].json)")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 15
    load0 = loadavg()
    rows = host_rows(repeats, DIFFUSERS_CONFIG)
    if args.host_only:
        print(f"wrote {write('loop_host_quick' if args.quick else 'loop_host', rows, args.out)}")
        return
    rows += loop_rows(repeats, not args.no_compile)
    rows += bandwidth_rows(repeats, 10 if args.quick else 25)
    path = write("loop_quick" if args.quick else "loop", rows, args.out,
                 extra={"loadavg_1min": [load0, loadavg()], "torch_threads": torch.get_num_threads(),
                        **source_version()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
