"""End to end: fastdiff's loop vs the same model in diffusers' scheduler loop, at 1 / 4 / 10 / 25 / 50 steps.

Models: the digits UNet (8x8, batch 64, guidance 2: one batched call of 128 per step) and a synthetic
diffusers UNet2DModel with random weights (a few million parameters, 4x32x32 latents, batch 4, no guidance).
Reports loop time, the model alone (the same calls without any sampler), the sampler's share (loop - model) per
step, and the ratio diffusers / fastdiff.  Solver: DPM-Solver++(2M) on both sides, the same schedule.

    python benchmarks/bench_e2e.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

import fastdiff as fd

try:
    from _common import timeit, write
except ImportError:
    from ._common import timeit, write

STEPS = [1, 4, 10, 25, 50]


def diffusers_loop(model, sched_cls, config, steps, x_T, kwargs, guided, w):
    ds = sched_cls(**config)
    ds.set_timesteps(steps)
    x = x_T * ds.init_noise_sigma
    for t in ds.timesteps:
        xin = ds.scale_model_input(x, t)
        tt = torch.full((x.shape[0] * (2 if guided else 1),), float(t))
        if guided:
            out = model(torch.cat([xin, xin]), tt, **kwargs)
            out_u, out_c = out.chunk(2)
            out = out_u + w * (out_c - out_u)
        else:
            out = model(xin, tt, **kwargs)
        x = ds.step(out, t, x).prev_sample
    return x


def synthetic_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(64, 128, 128), down_block_types=("DownBlock2D",) * 3,
                      up_block_types=("UpBlock2D",) * 3, norm_num_groups=32).eval()

    def model(x, t):
        return net(x, t).sample

    return model, sum(p.numel() for p in net.parameters())


def run_case(name, model, sched, config, shape, kwargs, guided, w, steps_list, repeats,
             prediction="epsilon"):
    from diffusers import DPMSolverMultistepScheduler

    rows = []
    seeds = list(range(shape[0]))
    x_T = fd.rng.randn(shape, seeds)
    for steps in steps_list:
        plan = fd.plan("dpmpp_2m", sched, steps, prediction=prediction, spacing="trailing")
        sampler = fd.Sampler(model, plan, guidance_scale=w if guided else None, progress=False)
        cond = {k: v[shape[0]:] for k, v in kwargs.items()} if guided else kwargs
        uncond = {k: v[: shape[0]] for k, v in kwargs.items()} if guided else None

        def ours():
            return sampler.sample(x_T=x_T, seeds=seeds, cond=cond, uncond=uncond)

        def theirs():
            return diffusers_loop(model, DPMSolverMultistepScheduler, config, steps, x_T, kwargs, guided, w)

        b = shape[0] * (2 if guided else 1)
        xin = torch.cat([x_T, x_T]) if guided else x_T
        tt = torch.full((b,), 500.0)

        def model_only():
            for _ in range(plan.nfe):
                model(xin, tt, **kwargs)

        with torch.inference_mode():
            diff = (ours() - theirs()).abs().max().item()  # correctness check before timing
            t_ours, t_theirs, t_model = (timeit(f, repeats=repeats, warmup=1) for f in (ours, theirs, model_only))
        row = dict(bench="e2e", model=name, steps=steps, nfe=plan.nfe, backend=fd.backends.resolve("auto"),
                   fastdiff=t_ours, diffusers=t_theirs, model_only=t_model, max_abs_diff=diff,
                   speedup=t_theirs["median"] / t_ours["median"],
                   fastdiff_overhead_per_step=(t_ours["median"] - t_model["median"]) / max(plan.nfe, 1),
                   diffusers_overhead_per_step=(t_theirs["median"] - t_model["median"]) / max(plan.nfe, 1),
                   sampler_share=(t_ours["median"] - t_model["median"]) / t_ours["median"])
        rows.append(row)
        print(f"{name:10s} {steps:3d} steps: fastdiff {1e3 * t_ours['median']:8.1f} ms  diffusers "
              f"{1e3 * t_theirs['median']:8.1f} ms  model {1e3 * t_model['median']:8.1f} ms  x{row['speedup']:.2f}  "
              f"overhead/step {1e6 * row['fastdiff_overhead_per_step']:7.0f} us vs "
              f"{1e6 * row['diffusers_overhead_per_step']:7.0f} us  (max|diff| {diff:.1e})")
    return rows


def main(argv=None, quick=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    quick = quick or args.quick
    steps_list = [1, 4, 10] if quick else STEPS
    repeats = 2 if quick else 5
    rows = []
    try:
        from fastdiff.models import digits

        unet = digits.pretrained_unet()
        labels = torch.arange(64) % 10
        kwargs = {"label": torch.cat([torch.full_like(labels, 10), labels])}
        cfg = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                   final_sigmas_type="zero", prediction_type="v_prediction")
        rows += run_case("digits", unet, digits.schedule(), cfg, (64, 1, 8, 8), kwargs, True, 2.0, steps_list,
                         repeats, prediction=digits.PREDICTION)
    except FileNotFoundError as e:
        print(f"(digits skipped: {e})")
    model, n_params = synthetic_unet()
    print(f"synthetic UNet2DModel: {n_params / 1e6:.1f} M parameters")
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               timestep_spacing="trailing", final_sigmas_type="zero")
    rows += run_case("synthetic", model, fd.schedules.DiscreteVP.scaled_linear(), cfg, (4, 4, 32, 32), {}, False,
                     None, steps_list[:3] if quick else steps_list, repeats)
    print(f"wrote {write('e2e_quick' if quick else 'e2e', rows, args.out)}")
    return rows


if __name__ == "__main__":
    main()
