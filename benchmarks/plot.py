"""Plots from the committed results: python benchmarks/plot.py [results/<machine>]  (needs matplotlib).

Writes per_step.png (step_solvers.json), roofline.png (step_cpu.json), e2e.png and quality.png next to the JSON
files they come from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list:
    d = json.loads(path.read_text())
    return d.get("rows") or d.get("records") or []


PROVIDER_COLORS = {"fastdiff": "C0", "torch-eager": "C1", "torch-compile": "C2", "diffusers": "C3",
                   "k-diffusion": "C4"}


def plot_per_step(plt, rows: list, folder: Path) -> Path:
    """Time per step of every solver and provider, one panel per size (step_solvers.json)."""
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes) + 1, 4.2), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if tuple(r["shape"]) == shape]
        solvers = list(dict.fromkeys(r["solver"] for r in sub))
        width = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            pts = [(i, r["time_per_step"]["median"] * 1e6) for i, s in enumerate(solvers) for r in sub
                   if r["solver"] == s and r["provider"] == prov]
            if pts:
                ys, xs = zip(*pts)
                color = PROVIDER_COLORS.get(prov.split("-")[0] if prov.startswith("fastdiff") else prov)
                ax.barh([y + (j - (len(providers) - 1) / 2) * width for y in ys], xs, height=width, color=color,
                        label=prov)
        ax.set_yticks(range(len(solvers)), solvers)
        ax.set_xscale("log")
        ax.set_xlabel("us per step")
        ax.set_title("x".join(map(str, shape)) if len(shape) > 2 else f"{shape[-1] / 2**20:.0f}M elements")
    axes[0][0].invert_yaxis()  # once: the panels share the y axis
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"per-step cost (precomputed model output, fp32), {folder.name}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(folder / "per_step.png", dpi=120)
    return folder / "per_step.png"


def plot_e2e(plt, rows: list, folder: Path) -> Path:
    """Loop time relative to fastdiff's with the same model, and the sampler's own cost per step (e2e.json)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        sub = [r for r in rows if r["model"] == model]
        for prov in dict.fromkeys(r["provider"] for r in sub):
            pts = [(r["steps"], r["vs_fastdiff_same_model"]) for r in sub if r["provider"] == prov]
            if not prov.startswith("fastdiff"):
                ax1.plot(*zip(*pts), "o-" if "compile" not in prov else "s--", color=f"C{m}",
                         label=f"{model}: {prov} / fastdiff{'+compile' if 'compile' in prov else ''}")
        for prov in ("fastdiff", "diffusers"):
            pts = [(r["steps"], r["loop_alone_per_step"] * 1e6) for r in sub if r["provider"] == prov]
            ax2.plot(*zip(*pts), "o-" if prov == "fastdiff" else "s--", color=f"C{m}", label=f"{model}: {prov}")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_xlabel("steps")
    ax1.set_ylabel("loop time / fastdiff's (same model)")
    ax1.legend(fontsize=7)
    ax1.set_title("end to end")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("steps")
    ax2.set_ylabel("us per step")
    ax2.set_title("the loop without its model (precomputed output)")
    ax2.legend(fontsize=7)
    steps = sorted({r["steps"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.set_xticks([], minor=True)
    fig.suptitle(folder.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "e2e.png", dpi=120)
    return folder / "e2e.png"


def plot_machine(folder: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    solvers = folder / "step_solvers.json"
    if solvers.exists():
        written.append(plot_per_step(plt, load(solvers), folder))
    step = folder / "step_cpu.json"
    if step.exists():
        recs = load(step)
        frac = [r for r in recs if r.get("metric") == "fraction_of_copy_bandwidth" and r.get("op") != "copy"]
        if frac:
            fig, ax = plt.subplots(figsize=(6, 3))
            names = [f"{r['op']} {r['shape'][-1] / 2**20:.0f}M" for r in frac]
            ax.barh(names, [r["value"] for r in frac])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xlabel("effective bandwidth / torch copy bandwidth")
            ax.set_title(f"roofline fraction, {folder.name}")
            fig.tight_layout()
            fig.savefig(folder / "roofline.png", dpi=120)
            written.append(folder / "roofline.png")
    e2e = folder / "e2e.json"
    if e2e.exists():
        written.append(plot_e2e(plt, load(e2e), folder))
    quality = folder / "quality.json"
    if quality.exists():
        rows = load(quality)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, problem in zip(axes, ("ring", "digits")):
            # per solver: the best spacing's RMS error to the ODE solution at each NFE budget
            sub = [r for r in rows if r["problem"] == problem and "ode_rmse" in r]
            for n, solver in enumerate(dict.fromkeys(r["solver"] for r in sub)):
                best = {}
                for r in sub:
                    if r["solver"] == solver and r["ode_rmse"] < best.get(r["budget"], float("inf")):
                        best[r["budget"]] = r["ode_rmse"]
                if best:
                    ax.plot(*zip(*sorted(best.items())), ["o-", "s--", "^:"][n // 10 % 3], ms=3, label=solver)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE budget")
            ax.set_ylabel("RMS error to the ODE solution (best spacing)")
            ax.set_title(problem)
            ax.legend(fontsize=5, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / "quality.png", dpi=120)
        written.append(folder / "quality.png")
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    folders = [Path(a) for a in argv] or sorted(p for p in RESULTS.iterdir() if p.is_dir())
    for folder in folders:
        for path in plot_machine(folder):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
