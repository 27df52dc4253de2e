"""diffusers drop-in schedulers: per-step cost of fastdiff's class vs diffusers' own in the standard loop.

For every scheduler class in ``fastdiff.integrations.diffusers.__all__`` (new drop-ins are picked up by name), a
20-step loop ``set_timesteps; for t: scale_model_input; step`` with a precomputed model output (so only the
scheduler's cost remains) at an SD latent 1x4x64x64 and a Flux-size latent 1x16x128x128 fp32; the classes are timed
alternately (round-robin) in one run and the ratio is reported.  Both get a ``torch.Generator`` where ``step`` takes
one, so the drop-in draws diffusers' own noise (torch.randn) for parity; for the stochastic schedulers (a run with
the generator differs from one without) a third column times the drop-in without a generator, i.e. with fastdiff's
Philox noise drawn inside the kernel.  Before timing, the drop-in's result is checked against the stock
scheduler's on the same inputs.  ``SCHEDULERS`` holds the configurations; a class without an entry gets the SD
schedule arguments its diffusers ``__init__`` accepts (none for flow-matching ones).

    python benchmarks/bench_dropin.py [--quick] [--only NAME ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

try:
    from _common import write
except ImportError:
    from ._common import write

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "DDIMScheduler": dict(SD, clip_sample=False, timestep_spacing="trailing"),
    "DDPMScheduler": dict(SD, clip_sample=False, timestep_spacing="trailing"),
    "EulerDiscreteScheduler": dict(SD),
    "EulerAncestralDiscreteScheduler": dict(SD),
    "HeunDiscreteScheduler": dict(SD),
    "DPMSolverMultistepScheduler": dict(SD),
    "DPMSolverSinglestepScheduler": dict(SD),
    "UniPCMultistepScheduler": dict(SD),
    "FlowMatchEulerDiscreteScheduler": dict(num_train_timesteps=1000),
    "LCMScheduler": dict(SD),
    # seeded: diffusers then draws its Brownian tree from this seed and the drop-in takes the same draws
    "DPMSolverSDEScheduler": dict(SD, noise_sampler_seed=0),
}
SIZES = [(1, 4, 64, 64), (1, 16, 128, 128)]
STEPS = 20


def dropin_names():
    """The scheduler classes the drop-in package exports (each has a diffusers class of the same name)."""
    import diffusers

    import fastdiff.integrations.diffusers as fdd

    return [n for n in fdd.__all__ if isinstance(getattr(fdd, n), type) and hasattr(getattr(fdd, n), "step")
            and hasattr(diffusers, n)]


def config_for(name):
    """``SCHEDULERS[name]``, else the SD schedule arguments the diffusers class accepts."""
    import diffusers

    if name in SCHEDULERS:
        return SCHEDULERS[name]
    accepted = inspect.signature(getattr(diffusers, name).__init__).parameters
    return {k: v for k, v in SD.items() if k in accepted} if "beta_schedule" in accepted else {}


def loop(scheduler, x_T, out, seed=0, generator=True):
    scheduler.set_timesteps(STEPS)
    x = x_T
    g = torch.Generator().manual_seed(seed)
    accepts = scheduler.step.__code__.co_varnames
    kw = {"generator": g} if generator and "generator" in accepts else {}
    scale = getattr(scheduler, "scale_model_input", None)
    for t in scheduler.timesteps:
        if scale is not None:
            scale(x, t)
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the SD latent only, 3 repeats (dropin_quick.json)")
    parser.add_argument("--only", nargs="*", help="scheduler class names (default: every drop-in)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    import diffusers

    import fastdiff.integrations.diffusers as fdd

    sizes = SIZES[:1] if args.quick else SIZES
    names = args.only or dropin_names()
    repeats = 3 if args.quick else 9
    rows = []
    for shape in sizes:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        out = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(2))
        for name in names:
            try:
                stock = getattr(diffusers, name)(**config_for(name))
            except ImportError as e:  # an optional dependency of diffusers' class (torchsde) is missing
                print(f"{name}: skipped ({str(e).strip().splitlines()[0]})")
                continue
            ours = getattr(fdd, name).from_config(stock.config)
            with torch.inference_mode():
                ref, got = loop(stock, x_T, out), loop(ours, x_T, out)  # warm-up and correctness check
                err = float((ref - got).abs().max()) / max(1.0, float(ref.abs().max()))
                if not err < 1e-3:
                    raise AssertionError(f"{name}: drop-in differs from diffusers by {err:.2e} (relative)")
                runs = [("diffusers", stock, True), ("fastdiff", ours, True)]
                if not torch.equal(got, loop(ours, x_T, out, generator=False)):  # it draws noise
                    runs.append(("fastdiff_philox", ours, False))
                times = {label: [] for label, _, _ in runs}
                for _ in range(repeats):
                    for label, s, gen in runs:
                        t0 = time.perf_counter()
                        loop(s, x_T, out, generator=gen)
                        times[label].append((time.perf_counter() - t0) / len(s.timesteps))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(bench="dropin", scheduler=name, shape=list(shape), steps=STEPS, max_rel_diff=err,
                       diffusers_us_per_step=1e6 * med["diffusers"], fastdiff_us_per_step=1e6 * med["fastdiff"],
                       speedup=med["diffusers"] / med["fastdiff"])
            line = (f"{'x'.join(map(str, shape)):>12} {name:34s} diffusers {row['diffusers_us_per_step']:8.1f} us  "
                    f"fastdiff {row['fastdiff_us_per_step']:8.1f} us  x{row['speedup']:.2f}")
            if "fastdiff_philox" in med:
                row["fastdiff_philox_us_per_step"] = 1e6 * med["fastdiff_philox"]
                row["speedup_philox"] = med["diffusers"] / med["fastdiff_philox"]
                line += f"  (Philox noise {row['fastdiff_philox_us_per_step']:.1f} us x{row['speedup_philox']:.2f})"
            rows.append(row)
            print(line, flush=True)
    print(f"wrote {write('dropin_quick' if args.quick else 'dropin', rows, args.out)}")


if __name__ == "__main__":
    main()
