"""Plots from the committed results: python benchmarks/plot.py [results/<machine>]  (needs matplotlib).

Writes per_step.png, roofline.png, e2e.png and quality.png next to the JSON files they come from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list:
    d = json.loads(path.read_text())
    return d.get("rows") or d.get("records") or []


def plot_machine(folder: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    step = folder / "step_cpu.json"
    if step.exists():
        recs = load(step)
        lat = [r for r in recs if r.get("benchmark") == "per_step_latent" and r.get("stat") == "median"
               and r.get("metric") == "time_per_step"]
        if lat:
            fig, ax = plt.subplots(figsize=(6, 3))
            names = [f"{r['provider']}\n{r['solver']}" for r in lat]
            ax.barh(names, [r["value"] for r in lat])
            ax.set_xscale("log")
            ax.set_xlabel("time per step (us), 1x4x64x64 fp32")
            ax.set_title(f"per-step cost, {folder.name}")
            fig.tight_layout()
            fig.savefig(folder / "per_step.png", dpi=120)
            written.append(folder / "per_step.png")
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
        rows = load(e2e)
        fig, ax = plt.subplots(figsize=(5, 3))
        for model in dict.fromkeys(r["model"] for r in rows):
            sub = [r for r in rows if r["model"] == model]
            ax.plot([r["steps"] for r in sub], [r["speedup"] for r in sub], "o-", label=model)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel("diffusers loop / fastdiff loop")
        ax.legend()
        ax.set_title(f"end to end, {folder.name}")
        fig.tight_layout()
        fig.savefig(folder / "e2e.png", dpi=120)
        written.append(folder / "e2e.png")
    quality = folder / "quality.json"
    if quality.exists():
        rows = load(quality)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, (problem, key) in zip(axes, (("ring", "sliced_w1"), ("digits", "frechet"))):
            sub = [r for r in rows if r["problem"] == problem]
            for solver in dict.fromkeys(r["solver"] for r in sub):
                pts = [(r["nfe"], r[key]) for r in sub if r["solver"] == solver]
                ax.plot(*zip(*pts), "o-", ms=3, label=solver)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(key)
            ax.set_title(problem)
        axes[0].legend(fontsize=6)
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
