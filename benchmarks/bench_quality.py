"""Quality vs NFE: which solver wins at which budget.

(a) Exact problem: an 8-mode 2-D Gaussian ring (exact denoiser) on SD's scaled_linear schedule.  Deterministic
    solvers: max error to the probability-flow ODE solution (RK4, 800 steps); every solver: sliced Wasserstein-1
    distance of 4000 samples to 4000 exact data samples.
(b) Digits: classifier accuracy and Frechet distance of 200 class-conditional samples (guidance 2) from the
    trained UNet.
NFE budgets 4..50; writes results/<machine>/quality.json.

    python benchmarks/bench_quality.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fastdiff as fd

try:
    from _common import write
except ImportError:  # imported as benchmarks._common
    from ._common import write

SOLVERS = ["ddim", "euler", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc",
           "euler_ancestral", "dpmpp_2m_sde", "ddpm"]
NFES = [4, 6, 8, 10, 15, 20, 30, 50]


def steps_for(solver, nfe):
    """Largest step count whose plan fits the NFE budget (final = zero)."""
    best = None
    for steps in range(1, nfe + 1):
        try:
            plan = fd.plan(solver, SCH, steps)
        except ValueError:
            continue
        if plan.nfe <= nfe:
            best = steps
    return best


SCH = fd.schedules.DiscreteVP.scaled_linear()


def sliced_w1(a, b, n_proj=64, seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_proj, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.abs(pa - pb).mean())


def ring_quality(quick):
    from fastdiff.cli import _ring

    data = _ring()
    n = 1000 if quick else 4000
    seeds = list(range(n))
    model = data.model(SCH, "epsilon")
    x_T = fd.rng.randn((n, 2), seeds, dtype=torch.float64)
    exact = fd.sample(model, fd.plan("rk4", SCH, 800, spacing="logsnr"), x_T=x_T).numpy()
    truth = data.sample(n, generator=torch.Generator().manual_seed(1)).numpy()
    rows = []
    for solver in SOLVERS:
        for nfe in NFES[:4] if quick else NFES:
            steps = steps_for(solver, nfe)
            if steps is None:
                continue
            plan = fd.plan(solver, SCH, steps)
            x = fd.sample(model, plan, x_T=x_T, seeds=seeds, backend="torch").numpy()
            ode_err = float(np.abs(x - exact).max()) if plan.num_draws == 1 else None
            rows.append(dict(bench="quality", problem="ring", solver=solver, steps=steps, nfe=plan.nfe,
                             ode_error=ode_err, sliced_w1=sliced_w1(x, truth)))
    return rows


def digits_quality(quick):
    from fastdiff.models import digits

    unet, clf = digits.pretrained_unet(), digits.pretrained_classifier()
    sch = digits.schedule()
    labels = torch.arange(10).repeat_interleave(5 if quick else 20)
    seeds = list(range(len(labels)))
    rows = []
    with torch.inference_mode():
        for solver in ["ddim", "dpmpp_2m", "unipc", "heun", "euler_ancestral", "dpmpp_2m_sde"]:
            for nfe in [4, 10] if quick else [4, 6, 10, 20, 50]:
                pred = digits.PREDICTION
                steps = next(s for s in range(nfe, 0, -1) if fd.plan(solver, sch, s, prediction=pred).nfe <= nfe)
                plan = fd.plan(solver, sch, steps, prediction=pred)
                x = fd.sample(unet, plan, shape=(len(labels), 1, 8, 8), seeds=seeds, guidance_scale=2.0,
                              cond={"label": labels}, uncond={"label": torch.full_like(labels, 10)})
                rows.append(dict(bench="quality", problem="digits", solver=solver, steps=steps, nfe=plan.nfe,
                                 **digits.quality(x, labels, clf)))
    return rows


def main(argv=None, quick=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    quick = quick or args.quick
    rows = ring_quality(quick)
    try:
        rows += digits_quality(quick)
    except FileNotFoundError as e:
        print(f"(digits skipped: {e})")
    path = write("quality_quick" if quick else "quality", rows, args.out)
    for problem in ("ring", "digits"):
        sub = [r for r in rows if r["problem"] == problem]
        if not sub:
            continue
        key = "sliced_w1" if problem == "ring" else "frechet"
        print(f"\n{problem}: {key} by NFE (lower is better)")
        nfes = sorted({r["nfe"] for r in sub})
        print(f"{'solver':16s}" + "".join(f"{n:>8d}" for n in nfes))
        for solver in dict.fromkeys(r["solver"] for r in sub):
            vals = {r["nfe"]: r[key] for r in sub if r["solver"] == solver}
            print(f"{solver:16s}" + "".join(f"{vals[n]:8.3f}" if n in vals else f"{'':8s}" for n in nfes))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
