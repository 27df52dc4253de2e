"""End to end: fastdiff's loop vs the same model in diffusers' scheduler loop, at 1 / 4 / 10 / 25 / 50 steps.

Models: the digits UNet (8x8, batch 64, guidance 2: one batched call of 128 per step) and a synthetic
diffusers UNet2DModel with random weights (a few million parameters, 4x32x32 latents, batch 4, no guidance).
Solver: DPM-Solver++(2M) on both sides, the same schedule and grid.

Providers, timed interleaved (round-robin) in one run:

- ``fastdiff``: ``fastdiff.Sampler`` on this machine's kernel, eager model;
- ``diffusers``: ``DPMSolverMultistepScheduler`` in the usual loop (scale_model_input, model, CFG, step), eager model;
- ``diffusers+compile`` and ``fastdiff+compile``: the same two loops with the model under ``torch.compile``
  (inductor, static shapes; one compiled model shared by both loops, compiled before any timing).
  ``--quick`` skips them (inductor takes ~30 s per UNet on 2 cores).

Host overhead per step = (loop time - the model alone) / model calls, where "the model alone" is the same calls
(eager or compiled, as the loop) without any sampler, timed in the same rounds.  That difference of two large
numbers is at the level of the model's own jitter, so the loop is also timed with the model replaced by a
precomputed output (``loop_alone_per_step``): the sampler's own cost per step, precisely.  Every loop's result is
checked against fastdiff's (eager model) before timing.

On a GPU (``--device cuda``) the same loops run with models and tensors on the device; ``fastdiff.Sampler`` runs the
whole loop as one CUDA graph (its default there), every timed call ends with ``torch.cuda.synchronize()``, and each
row also gives ``sampler_share``: (loop - model alone) / loop.

    python benchmarks/bench_e2e.py [--quick] [--no-compile] [--steps 1,4,10] [--device cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch._inductor.config

import fastdiff as fd

try:
    from _common import loadavg, source_version, time_interleaved, write
except ImportError:
    from ._common import loadavg, source_version, time_interleaved, write

STEPS = [1, 4, 10, 25, 50]
RTOL = 1e-3  # loop vs loop, relative to the data scale: fp32 models through up to 50 steps, compiled or not


def diffusers_loop(model, sched_cls, config, steps, x_T, kwargs, guided, w):
    ds = sched_cls(**config)
    ds.set_timesteps(steps, device=x_T.device)
    x = x_T * ds.init_noise_sigma
    for t in ds.timesteps:
        xin = ds.scale_model_input(x, t)
        tt = torch.full((x.shape[0] * (2 if guided else 1),), float(t), device=x.device)
        if guided:
            out = model(torch.cat([xin, xin]), tt, **kwargs)
            out_u, out_c = out.chunk(2)
            out = out_u + w * (out_c - out_u)
        else:
            out = model(xin, tt, **kwargs)
        x = ds.step(out, t, x).prev_sample
    return x


def synthetic_unet(device="cpu"):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(64, 128, 128), down_block_types=("DownBlock2D",) * 3,
                      up_block_types=("UpBlock2D",) * 3, norm_num_groups=32).eval().to(device)

    def model(x, t):
        return net(x, t).sample

    return model, sum(p.numel() for p in net.parameters())


@torch.no_grad()  # not inference_mode: a compiled model recompiles when inference and normal tensors mix
def run_case(name, model, sched, config, shape, kwargs, guided, w, steps_list, repeats, prediction="epsilon",
             compile_model=True, device=torch.device("cpu")):
    from diffusers import DPMSolverMultistepScheduler

    rows = []
    seeds = list(range(shape[0]))
    x_T = fd.rng.randn(shape, seeds).to(device)
    b = shape[0] * (2 if guided else 1)
    xin = torch.cat([x_T, x_T]) if guided else x_T
    tt = torch.full((b,), 500.0, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    models = {"": model}
    if compile_model:
        compiled = torch.compile(model, backend="inductor", dynamic=False)
        t0 = time.perf_counter()
        compiled(xin, tt, **kwargs)  # compiles; the loops then call it with these shapes and dtypes only
        print(f"{name}: torch.compile of the model took {time.perf_counter() - t0:.0f} s")
        models["+compile"] = compiled
    null_out = torch.randn(xin.shape, device=device)

    def null_model(x, t, **kw):  # the loop without a model: a precomputed output
        return null_out

    for steps in steps_list:
        plan = fd.plan("dpmpp_2m", sched, steps, prediction=prediction, spacing="trailing")
        cond = {k: v[shape[0]:] for k, v in kwargs.items()} if guided else kwargs
        uncond = {k: v[: shape[0]] for k, v in kwargs.items()} if guided else None

        def ours(m):
            sampler = fd.Sampler(m, plan, guidance_scale=w if guided else None, progress=False, compile=False)
            return lambda: sampler.sample(x_T=x_T, seeds=seeds, cond=cond, uncond=uncond)

        def theirs(m):
            return lambda: diffusers_loop(m, DPMSolverMultistepScheduler, config, steps, x_T, kwargs, guided, w)

        def alone(m):
            def run():
                for _ in range(plan.nfe):
                    m(xin, tt, **kwargs)

            return run

        cases = {}
        for suffix, m in models.items():
            cases["fastdiff" + suffix] = ours(m)
            cases["diffusers" + suffix] = theirs(m)
            cases["model alone" + suffix] = alone(m)
        cases["fastdiff (null model)"] = ours(null_model)
        cases["diffusers (null model)"] = theirs(null_model)
        ref = cases["fastdiff"]()
        scale = max(1.0, float(ref.abs().max()))
        diffs = {}
        for p in ("diffusers", "fastdiff+compile", "diffusers+compile"):  # correctness before timing
            if p in cases:
                diffs[p] = float((cases[p]() - ref).abs().max())
                if not diffs[p] <= RTOL * scale:
                    raise AssertionError(f"{name} {steps} steps: {p} differs from fastdiff by {diffs[p]:.3g}")
        times = time_interleaved(cases, repeats=repeats, warmup=1, sync=sync)
        line = []
        for suffix in models:
            alone_t = times["model alone" + suffix]
            for loop in ("fastdiff", "diffusers"):
                p = loop + suffix
                t = times[p]
                rows.append(dict(bench="e2e", model=name, steps=steps, nfe=plan.nfe, provider=p,
                                 compiled_model=bool(suffix), backend=fd.backends.resolve("auto", device.type),
                                 device=str(device), time=t, model_alone=alone_t,
                                 host_overhead_per_step=(t["median"] - alone_t["median"]) / max(plan.nfe, 1),
                                 sampler_share=(t["median"] - alone_t["median"]) / t["median"],
                                 loop_alone_per_step=times[f"{loop} (null model)"]["median"] / max(plan.nfe, 1),
                                 vs_fastdiff=t["median"] / times["fastdiff"]["median"],
                                 vs_fastdiff_same_model=t["median"] / times["fastdiff" + suffix]["median"],
                                 max_abs_diff=diffs.get(p, 0.0)))
                line.append(f"{p} {1e3 * t['median']:7.1f} ms ({1e6 * rows[-1]['host_overhead_per_step']:+6.0f} us)")
        loop_alone = {p: 1e6 * times[f"{p} (null model)"]["median"] / plan.nfe for p in ("fastdiff", "diffusers")}
        print(f"{name:9s} {steps:2d} steps: " + "  ".join(line)
              + f"  | model alone {1e3 * times['model alone']['median']:6.1f} ms"
              + (f" / {1e3 * times['model alone+compile']['median']:6.1f} ms compiled" if compile_model else "")
              + f"  | loop without model {loop_alone['fastdiff']:.0f} / {loop_alone['diffusers']:.0f} us/step",
              flush=True)
    return rows


def main(argv=None, quick=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-model providers")
    parser.add_argument("--steps", help="comma-separated step counts (default 1,4,10,25,50; --quick 1,4,10)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False here")
    quick = quick or args.quick
    steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [1, 4, 10] if quick else STEPS
    repeats = 2 if quick else 5
    compile_model = not (quick or args.no_compile)
    if not compile_model:
        print("(the compiled-model providers are skipped: " + ("--quick; inductor takes ~30 s per UNet on 2 cores)"
                                                               if quick else "--no-compile)"))
    # compile in this process: inductor's worker pool starts in the background and competes with the timing
    torch._inductor.config.compile_threads = 1
    load0, source = loadavg(), source_version()  # at the start: others may commit while this runs
    rows = []
    try:
        from fastdiff.models import digits

        unet = digits.pretrained_unet().to(device)
        labels = torch.arange(64, device=device) % 10
        kwargs = {"label": torch.cat([torch.full_like(labels, 10), labels])}
        cfg = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                   final_sigmas_type="zero", prediction_type="v_prediction")
        rows += run_case("digits", unet, digits.schedule(), cfg, (64, 1, 8, 8), kwargs, True, 2.0, steps_list,
                         repeats, prediction=digits.PREDICTION, compile_model=compile_model, device=device)
    except FileNotFoundError as e:
        print(f"(digits skipped: {e})")
    model, n_params = synthetic_unet(device)
    print(f"synthetic UNet2DModel: {n_params / 1e6:.1f} M parameters")
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               timestep_spacing="trailing", final_sigmas_type="zero")
    rows += run_case("synthetic", model, fd.schedules.DiscreteVP.scaled_linear(), cfg, (4, 4, 32, 32), {}, False,
                     None, steps_list, repeats, compile_model=compile_model, device=device)
    load1 = loadavg()
    if load0 > 0.6 * (os.cpu_count() or 1):  # at the start, before this script's own threads count
        print("WARNING: the machine was busy: OpenMP regions wait for descheduled threads, so these timings (and, "
              "less so, the interleaved ratios) are not representative")
    print(f"(1-min load average {load0:.2f} -> {load1:.2f}; ms per loop, (host overhead per step = (loop - model "
          "alone) / steps))")
    path = write("e2e_quick" if quick else "e2e", rows, args.out, extra={"loadavg_1min": [load0, load1], **source})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
