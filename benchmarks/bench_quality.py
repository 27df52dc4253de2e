"""Quality vs NFE: which deterministic solver and spacing win at which budget.

(a) Exact problem: an 8-mode 2-D Gaussian ring (exact denoiser) on SD's scaled_linear schedule.  Every
    deterministic solver of ``fastdiff.SOLVERS`` (one draw, the start noise, with default options) x the spacings
    below x NFE 4..20: RMS and max error to the probability-flow ODE solution from the same start (RK4, 400 steps
    in log-SNR), and the sliced Wasserstein-1 distance of 1000 samples to as many exact data samples (its sampling
    floor is about 0.04-0.09: compare it between solvers only well above that).
(b) Digits: the trained class-conditional UNet (guidance 2) on a smaller grid: the ring's best solvers x the
    schedule's default spacing, "ays" and "karras": RMS error to the guided ODE solution (RK4, 40 steps), classifier
    accuracy and Frechet distance of 50 samples (too few for a Frechet distance to rank close solvers).
A solver runs the largest step count whose plan fits the NFE budget; writes results/<machine>/quality.json.

    python benchmarks/bench_quality.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import fastdiff as fd

try:
    from _common import write
except ImportError:  # imported as benchmarks._common
    from ._common import write

SPACINGS = ["karras", "exponential", "kl_optimal", "beta", "ays", "gits", "simple", "linear_quadratic", "uniform"]
NFES = [4, 6, 8, 10, 15, 20]
QUICK_SPACINGS, QUICK_NFES = ["karras", "uniform"], [4, 10]
DIGITS_SOLVERS = 6  # how many of the ring's best solvers run on digits
SCH = fd.schedules.DiscreteVP.scaled_linear()


def deterministic_solvers(schedule, prediction="epsilon"):
    """The solvers of fd.SOLVERS whose default plan on ``schedule`` draws only the start noise."""
    out = []
    for name in fd.SOLVERS:
        try:
            plan = fd.plan(name, schedule, 10, prediction=prediction)
        except ValueError:  # not for this schedule / prediction (e.g. flow-only solvers)
            continue
        if plan.num_draws == 1:
            out.append(name)
    return out


def plan_for(solver, schedule, spacing, nfe, prediction="epsilon"):
    """The plan with the most steps whose NFE fits ``nfe``, or None when no step count fits (or the spacing
    cannot give that many steps on this schedule)."""
    for steps in range(nfe, 0, -1):
        try:
            plan = fd.plan(solver, schedule, steps, prediction=prediction, spacing=spacing)
        except ValueError:
            continue
        if plan.nfe <= nfe:
            return plan
    return None


def sliced_w1(a, b, n_proj=64, seed=0):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_proj, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.abs(pa - pb).mean())


def ode_errors(x, exact):
    """RMS over samples of the per-sample L2 error (per coordinate), and the max abs error."""
    d = (x - exact).reshape(len(x), -1)
    if not np.isfinite(d).all():
        return math.inf, math.inf
    return float(np.sqrt((d * d).mean())), float(np.abs(d).max())


def ring_quality(quick):
    from fastdiff.cli import _ring

    data = _ring()
    n = 300 if quick else 1000
    model = data.model(SCH, "epsilon")
    x_T = fd.rng.randn((n, 2), list(range(n)), dtype=torch.float64)
    exact = fd.sample(model, fd.plan("rk4", SCH, 200 if quick else 400, spacing="logsnr"), x_T=x_T).numpy()
    truth = data.sample(n, generator=torch.Generator().manual_seed(1)).numpy()
    rows = []
    for solver in deterministic_solvers(SCH):
        print(f"ring: {solver}", flush=True)
        for spacing in QUICK_SPACINGS if quick else SPACINGS:
            for nfe in QUICK_NFES if quick else NFES:
                plan = plan_for(solver, SCH, spacing, nfe)
                if plan is None:
                    continue
                x = fd.sample(model, plan, x_T=x_T, backend="torch", check_finite="off").numpy()
                rmse, max_err = ode_errors(x, exact)
                w1 = sliced_w1(x, truth) if np.isfinite(x).all() else math.inf
                rows.append(dict(bench="quality", problem="ring", solver=solver, spacing=spacing, budget=nfe,
                                 steps=plan.steps, nfe=plan.nfe, ode_rmse=rmse, ode_error=max_err, sliced_w1=w1))
    return rows


def best_solvers(rows, k):
    """The k solvers with the lowest mean over budgets of log10 of their best (over spacings) ODE error."""
    score = {}
    for solver in dict.fromkeys(r["solver"] for r in rows):
        best = {}
        for r in rows:
            if r["solver"] == solver:
                best[r["budget"]] = min(best.get(r["budget"], math.inf), r["ode_rmse"])
        score[solver] = np.mean([math.log10(max(v, 1e-300)) for v in best.values()])
    return sorted(score, key=score.get)[:k]


def digits_quality(quick, solvers, save=lambda rows: None):
    from fastdiff.models import digits

    unet, clf = digits.pretrained_unet(), digits.pretrained_classifier()
    sch, pred = digits.schedule(), digits.PREDICTION
    labels = torch.arange(10).repeat_interleave(2 if quick else 5)
    shape, seeds = (len(labels), 1, 8, 8), list(range(len(labels)))
    guided = dict(guidance_scale=2.0, cond={"label": labels}, uncond={"label": torch.full_like(labels, 10)})
    rows = []
    with torch.inference_mode():
        x_T = fd.rng.randn(shape, seeds)
        ref = fd.plan("rk4", sch, 10 if quick else 40, prediction=pred, spacing="logsnr")
        exact = fd.sample(unet, ref, x_T=x_T * ref.init_scale, **guided).numpy()
        for solver in solvers:
            print(f"digits: {solver}", flush=True)
            for spacing in dict.fromkeys([sch.default_spacing] + ([] if quick else ["ays", "karras"])):
                for nfe in [4] if quick else NFES:
                    plan = plan_for(solver, sch, spacing, nfe, pred)
                    if plan is None:
                        continue
                    x = fd.sample(unet, plan, x_T=x_T * plan.init_scale, check_finite="off", **guided)
                    rmse, max_err = ode_errors(x.numpy(), exact)
                    q = digits.quality(x, labels, clf) if torch.isfinite(x).all() else {}
                    rows.append(dict(bench="quality", problem="digits", solver=solver, spacing=spacing, budget=nfe,
                                     steps=plan.steps, nfe=plan.nfe, ode_rmse=rmse, ode_error=max_err, **q))
            save(rows)  # the digits grid is slow on a CPU: keep what is done
    return rows


def best_per_budget(rows, key="ode_rmse"):
    """{budget: the row with the lowest ``key``} (ties: the first)."""
    out = {}
    for r in rows:
        if r["budget"] not in out or r[key] < out[r["budget"]][key]:
            out[r["budget"]] = r
    return dict(sorted(out.items()))


def report(rows):
    for problem in ("ring", "digits"):
        sub = [r for r in rows if r["problem"] == problem]
        if not sub:
            continue
        budgets = sorted({r["budget"] for r in sub})
        print(f"\n{problem}: RMS error to the ODE solution, best spacing per solver (lower is better)")
        print(f"{'solver':24s}" + "".join(f"{n:>16d}" for n in budgets))
        for solver in dict.fromkeys(r["solver"] for r in sub):
            best = best_per_budget([r for r in sub if r["solver"] == solver])
            cells = [f"{best[n]['ode_rmse']:.1e} {best[n]['spacing'][:6]:>6s}" if n in best else "" for n in budgets]
            print(f"{solver:24s}" + "".join(f"{c:>16s}" for c in cells))
        print(f"\n{problem}: best solver + spacing per NFE budget")
        extra = "sliced_w1" if problem == "ring" else "frechet"
        for n, r in best_per_budget(sub).items():
            print(f"  NFE {n:>2d}: {r['solver']} + {r['spacing']} ({r['steps']} steps): ode_rmse {r['ode_rmse']:.2e}, "
                  f"{extra} {r.get(extra, float('nan')):.3f}")


def main(argv=None, quick=False):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds): two spacings, NFE 4 and 10")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    quick = quick or args.quick
    name = "quality_quick" if quick else "quality"
    rows = ring_quality(quick)
    path = write(name, rows, args.out)
    try:
        rows += digits_quality(quick, best_solvers(rows, 2 if quick else DIGITS_SOLVERS),
                               lambda digits_rows: write(name, rows + digits_rows, args.out))
    except FileNotFoundError as e:
        print(f"(digits skipped: {e})")
    path = write(name, rows, args.out)
    report(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
