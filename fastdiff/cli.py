"""Command line: ``fastdiff demo | bench | info``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _ring(n_modes=8, radius=2.0, std=0.15):
    import numpy as np

    from .models import GaussianMixture

    ang = 2 * np.pi * np.arange(n_modes) / n_modes
    return GaussianMixture(means=np.stack([radius * np.cos(ang), radius * np.sin(ang)], 1), stds=[std] * n_modes)


def _density_image(points, size=160, extent=3.2):
    import numpy as np

    h, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]])
    img = np.log1p(h[::-1])
    return (255 * (1 - img / max(img.max(), 1e-9))).astype(np.uint8)


def _digit_grid(images, rows: int, scale: int = 4):
    """[N, 1, 8, 8] in [-1, 1] -> a uint8 grid image (white background, dark ink, like the scans)."""
    import numpy as np

    x = ((1 - images.clamp(-1, 1).squeeze(1).numpy()) * 127.5).astype(np.uint8)
    x = x.repeat(scale, 1).repeat(scale, 2)
    n, h, w = x.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + 2), cols * (w + 2)), 255, dtype=np.uint8)
    for i in range(n):
        r, c = i % rows, i // rows
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    return grid


def _diffusers_loop(unet, sch, steps, labels, x_T, w):
    """The same UNet driven by diffusers' DPMSolverMultistepScheduler with CFG, for a side-by-side time."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    ds = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                     timestep_spacing="trailing", final_sigmas_type="zero",
                                     prediction_type="v_prediction")
    ds.set_timesteps(steps)
    x = x_T.clone()
    null = torch.full_like(labels, 10)
    for t in ds.timesteps:
        tt = torch.full((2 * len(labels),), float(t))
        out = unet(torch.cat([x, x]), tt, torch.cat([null, labels]))
        out_u, out_c = out.chunk(2)
        x = ds.step(out_u + w * (out_c - out_u), t, x).prev_sample
    return x


def demo_digits(out_dir: str = "fastdiff-demo", per_class: int = 20, quick: bool = False) -> list[dict]:
    """Class-conditional digits with several solvers: wall time per image, classifier accuracy, Frechet distance."""
    import numpy as np
    import torch

    import fastdiff as fd

    from .models import digits
    from .png import write_png

    per_class = 3 if quick else per_class
    unet, clf = digits.pretrained_unet(), digits.pretrained_classifier()
    sch = digits.schedule()
    labels = torch.arange(10).repeat_interleave(per_class)
    n = len(labels)
    seeds = list(range(1000, 1000 + n))
    null = {"label": torch.full_like(labels, 10)}
    w = 2.0
    runs = [("dpmpp_2m", 10, w), ("unipc", 10, w), ("ddim", 10, w), ("euler_ancestral", 25, w),
            ("dpmpp_2m_sde", 25, w), ("ddpm", 100 if quick else 1000, None)]
    os.makedirs(out_dir, exist_ok=True)
    real, real_labels = digits.load_digits("test")
    floor = digits.quality(real[:n], real_labels[:n], clf)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"fastdiff demo: {n} class-conditional 8x8 digits from a {n_params / 1e3:.0f}k-parameter UNet (cosine "
          f"schedule, {digits.PREDICTION}-prediction), guidance w={w}, backend {fd.backends.resolve('auto')}")
    print(f"{'solver':18s} {'steps':>5s} {'NFE':>4s} {'CFG':>4s} {'ms/image':>9s} {'accuracy':>9s} {'Frechet':>8s}")
    rows = []

    def report(name, steps, nfe, guided, seconds, images):
        q = digits.quality(images, labels, clf)
        row = dict(solver=name, steps=steps, nfe=nfe, cfg=guided, ms_per_image=1e3 * seconds / n, **q)
        rows.append(row)
        print(f"{name:18s} {steps:5d} {nfe:4d} {'yes' if guided else 'no':>4s} {row['ms_per_image']:9.2f} "
              f"{q['accuracy']:9.3f} {q['frechet']:8.2f}")

    with torch.inference_mode():
        # warm-up (first model call, kernel load) outside the timings
        fd.Sampler(unet, fd.plan("dpmpp_2m", sch, 2, prediction=digits.PREDICTION), guidance_scale=w).sample(
            (2, 1, 8, 8), seeds=[0, 1], cond={"label": labels[:2]}, uncond={"label": null["label"][:2]})
        for solver, steps, gw in runs:
            plan = fd.plan(solver, sch, steps, prediction=digits.PREDICTION)
            print(f"  running {solver}: {steps} steps, {plan.nfe} model calls on {n} images...", flush=True)
            sampler = fd.Sampler(unet, plan, guidance_scale=gw, progress=False)
            t0 = time.perf_counter()
            x = sampler.sample((n, 1, 8, 8), seeds=seeds, cond={"label": labels}, uncond=null if gw else None)
            report(solver, steps, plan.nfe, gw is not None, time.perf_counter() - t0, x)
            write_png(os.path.join(out_dir, f"digits_{solver}_{steps}.png"), _digit_grid(x, per_class))
        try:
            x_T = fd.rng.randn((n, 1, 8, 8), seeds)
            print(f"  running diffusers' DPMSolverMultistepScheduler: 10 steps on {n} images...", flush=True)
            t0 = time.perf_counter()
            x = _diffusers_loop(unet, sch, 10, labels, x_T, w)
            report("diffusers dpm++2m", 10, 10, True, time.perf_counter() - t0, x)
        except ImportError:
            print("(diffusers is not installed: pip install diffusers for the side-by-side time)")
    print(f"accuracy: a digits classifier (held-out accuracy {floor['accuracy']:.3f}) on the samples vs their labels; "
          f"Frechet: distance of its features to {len(real)} held-out real digits (real digits score "
          f"{floor['frechet']:.2f} at this sample size).\nwrote {out_dir}/digits_*.png (one column per class)")
    return rows


def ring_demo(out_dir: str = "fastdiff-demo", n: int = 4000, quick: bool = False) -> list[dict]:
    """Sample a 2-D ring of 8 Gaussians with its exact denoiser using several solvers; print quality and time.

    Quality: the mean distance of each sample to the nearest mode centre relative to the true value, and for
    deterministic solvers the error against a 400-step RK4 solution of the same probability-flow ODE.
    """
    import numpy as np
    import torch

    import fastdiff as fd

    from .png import write_png

    data = _ring()
    sch = fd.schedules.DiscreteVP.scaled_linear()
    n = 500 if quick else n
    seeds = list(range(n))
    model = data.model(sch, "epsilon")
    x_T = fd.rng.randn((n, 2), seeds, dtype=torch.float64)
    ref = fd.sample(model, fd.plan("rk4", sch, 400, spacing="logsnr"), x_T=x_T).numpy()
    truth = data.sample(n, generator=torch.Generator().manual_seed(0)).numpy()
    centres = data.means.numpy()

    def ring_distance(p):
        return np.min(np.linalg.norm(p[:, None, :] - centres[None], axis=2), axis=1).mean()

    runs = [("ddim", 10, {}), ("euler", 10, {}), ("heun", 6, {}), ("dpmpp_2m", 10, {}), ("unipc", 10, {}),
            ("dpm_solver_3", 4, {}), ("euler_ancestral", 20, {}), ("dpmpp_2m_sde", 20, {}), ("ddpm", 100, {})]
    os.makedirs(out_dir, exist_ok=True)
    rows, tiles = [], [_density_image(truth)]
    print(f"fastdiff demo: {n} samples of an 8-mode 2-D Gaussian ring, exact denoiser, SD's scaled_linear schedule")
    print(f"{'solver':18s} {'steps':>5s} {'NFE':>4s} {'ms/sample':>9s} {'ODE err':>9s} {'ring dist':>9s}")
    true_dist = ring_distance(truth)
    for solver, steps, opts in runs:
        plan = fd.plan(solver, sch, steps, **opts)
        t0 = time.perf_counter()
        x = fd.sample(model, plan, x_T=x_T, seeds=seeds).numpy()
        dt = time.perf_counter() - t0
        ode_err = float(np.abs(x - ref).max()) if plan.num_draws == 1 else float("nan")
        row = dict(solver=solver, steps=steps, nfe=plan.nfe, ms_per_sample=1e3 * dt / n, ode_error=ode_err,
                   ring_distance=ring_distance(x) / true_dist)
        rows.append(row)
        tiles.append(_density_image(x))
        err = "-" if np.isnan(ode_err) else f"{ode_err:9.2e}"
        print(f"{solver:18s} {steps:5d} {plan.nfe:4d} {row['ms_per_sample']:9.4f} {err:>9s} "
              f"{row['ring_distance']:9.3f}")
    grid = np.concatenate([np.pad(t, 4, constant_values=255) for t in tiles], axis=1)
    path = os.path.join(out_dir, "ring_samples.png")
    write_png(path, grid)
    print(f"ring distance: mean distance to the nearest mode / the data's own (1.0 is exact). ODE err: max |x - "
          f"RK4(400)| for deterministic solvers.\nwrote {path} (data, then each solver in table order)")
    return rows


def _bench_dir():
    import pathlib

    here = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    if not here.is_dir():
        raise SystemExit("fastdiff bench runs the scripts in the repository's benchmarks/ directory: run it from a "
                         "source checkout (pip install -e .)")
    return here


# The peers a benchmark subject compares against (modules it cannot run without).
PEERS = {"step_cpu": ("diffusers",), "step_solvers": ("diffusers",), "e2e": ("diffusers",), "dropin": ("diffusers",)}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def bench(quick: bool = False, as_json: bool = False, only=None, out_dir=None, no_compile: bool = False) -> int:
    """Run the benchmark scripts and print key ratios.

    Full runs write benchmarks/results/<machine>/<subject>.json (the committed results); ``quick`` runs write to a
    fresh temporary directory (printed) unless ``out_dir`` is given, so they never overwrite full results.
    Subjects whose peers (diffusers) are not installed are skipped with a one-line hint.
    """
    import json
    import pathlib
    import subprocess
    import tempfile

    import torch

    import fastdiff as fd

    root = _bench_dir()
    subjects = []
    if fd.backends.status("cpu")[0]:
        subjects.append(("step_cpu", ["--quick"] if quick else []))
    if torch.cuda.is_available():
        subjects.append(("step_gpu", ["--reps", "10"] if quick else []))
    subjects += [(name, ["--quick"] if quick else []) for name in ("step_solvers", "e2e", "quality", "serving",
                                                                 "dropin")]
    if no_compile:  # the torch.compile providers: inductor's warm-up is the slow part of a run
        subjects = [(name, [*args, "--no-compile"] if name in ("step_solvers", "e2e") else args)
                    for name, args in subjects]
    if only:
        subjects = [s for s in subjects if s[0] in only]
    if quick and not out_dir:
        out_dir = tempfile.mkdtemp(prefix="fastdiff-bench-quick-")
        print(f"(--quick: results go to {out_dir}, not to benchmarks/results/)", flush=True)
    rc = 0
    written = {}
    for name, args in subjects:
        missing = [m for m in PEERS.get(name, ()) if not _installed(m)]
        if missing:
            print(f"== {name} == skipped: it compares against {', '.join(missing)}, which is not installed "
                  f"(pip install 'fastdiff[peers]')", flush=True)
            continue
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        if out_dir:  # tests, quick and dry runs write elsewhere than the committed results
            args = [*args, "--out", os.path.join(out_dir, name if name == "step_gpu" else f"{name}.json")]
        r = subprocess.run([sys.executable, str(root / f"bench_{name}.py"), *args], cwd=root)
        print(f"({name}: {time.perf_counter() - t0:.0f} s, exit {r.returncode})", flush=True)
        rc = rc or r.returncode
        if out_dir:
            written[name] = pathlib.Path(out_dir) / f"{name}.json"
        else:  # results/<machine>/<name>.json, the newest one
            found = sorted((root / "results").glob(f"*/{name}.json"), key=lambda p: p.stat().st_mtime)
            written[name] = found[-1] if found else None
    for line in _key_ratios({k: v for k, v in written.items() if v is not None and v.exists()}):
        print(line)
    if as_json:
        out = {}
        paths = sorted(pathlib.Path(out_dir).glob("*.json")) if out_dir else sorted((root / "results").glob("*/*.json"))
        for path in paths:
            out[f"{path.parent.name}/{path.name}"] = json.loads(path.read_text())
        print(json.dumps(out))
    return rc


def _key_ratios(paths: dict) -> list:
    """Headline lines from the JSON the benchmark scripts wrote: how many times longer each peer takes than
    fastdiff per step (the smallest size, dpmpp_2m), and end to end at the most steps measured."""
    import json

    lines = []
    if "step_solvers" in paths:
        rows = json.loads(paths["step_solvers"].read_text())["rows"]
        shape = rows[0]["shape"] if rows else None
        sub = {r["provider"]: r["time_per_step"]["median"] for r in rows
               if r["shape"] == shape and r["solver"] == "dpmpp_2m"}
        ours = next((v for k, v in sub.items() if k.startswith("fastdiff")), None)
        if ours:
            ratios = ", ".join(f"{k} {v / ours:.1f}x" for k, v in sub.items() if not k.startswith("fastdiff"))
            lines.append(f"per step, dpmpp_2m {'x'.join(map(str, shape))}: fastdiff {ours * 1e6:.1f} us; "
                         f"the others take {ratios}")
    if "e2e" in paths:
        rows = json.loads(paths["e2e"].read_text())["rows"]
        for model in dict.fromkeys(r["model"] for r in rows):
            steps = max(r["steps"] for r in rows if r["model"] == model)
            sub = [r for r in rows if r["model"] == model and r["steps"] == steps]
            ratios = ", ".join(f"{r['provider']} {r['vs_fastdiff']:.2f}x" for r in sub if r["provider"] != "fastdiff")
            alone = ", ".join(f"{r['provider']} {r['loop_alone_per_step'] * 1e6:.0f} us" for r in sub
                              if "compile" not in r["provider"])
            lines.append(f"end to end, {model} {steps} steps (loop time / fastdiff's): {ratios}; "
                         f"the loop without its model per step: {alone}")
    return (["== key ratios =="] + lines) if lines else []


def _backend_state(name: str) -> str:
    """One line on a kernel backend without building it: built / not built yet / unavailable, and why."""
    from . import backends

    try:
        module = backends.load(name)
    except Exception as e:  # e.g. triton not installed
        return f"unavailable ({type(e).__name__}: {e})"
    if hasattr(module, "status"):
        state, detail = module.status()
        return f"{state} ({detail})"
    ok, why = module.available()
    return ("available" if ok else "unavailable") + (f" ({why})" if why else "")


def info() -> None:
    import numpy as np
    import torch

    import fastdiff as fd

    print(f"fastdiff {fd.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"numpy {np.__version__}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}")
    print(f"cuda: {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"backends available: {', '.join(fd.backends.available())}")
    for name in ("cpu", "triton", "cuda"):  # never builds or compiles anything
        print(f"  {name}: {_backend_state(name)}")
    print(f"solvers: {', '.join(fd.SOLVERS)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the HTTP service parses its own options
        from .serving.http import main as serve_main

        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fastdiff", description="fast, exact, reproducible diffusion sampling")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", add_help=False, help="HTTP sampling service, see `fastdiff serve --help` (needs the "
                   "extra fastdiff[serve])")
    p_demo = sub.add_parser("demo", help="sample the digits model with several solvers; print time and quality")
    p_demo.add_argument("--out", default="fastdiff-demo", help="directory for the PNGs (default: fastdiff-demo)")
    p_demo.add_argument("--quick", action="store_true", help="fewer samples and steps")
    p_demo.add_argument("--ring", action="store_true",
                        help="instead: a 2-D Gaussian ring with its exact denoiser and exact-ODE errors")
    p_bench = sub.add_parser("bench", help="run the benchmarks (results under benchmarks/results/<machine>/)")
    p_bench.add_argument("--quick", action="store_true",
                         help="small sizes, under 2 minutes on 2 cores; results go to a temporary directory")
    p_bench.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    p_bench.add_argument("--only", nargs="*",
                         help="subjects: step_cpu step_gpu step_solvers e2e quality serving dropin")
    p_bench.add_argument("--out-dir", help="write the JSON here instead of benchmarks/results/<machine>/")
    p_bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    sub.add_parser("info", help="versions, devices and available backends")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        if args.ring:
            ring_demo(args.out, quick=args.quick)
        else:
            demo_digits(args.out, quick=args.quick)
    elif args.cmd == "bench":
        return bench(args.quick, args.json, args.only, args.out_dir, args.no_compile)
    elif args.cmd == "info":
        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
