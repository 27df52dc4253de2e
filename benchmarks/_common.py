"""Shared benchmark plumbing: machine description, timing with quantiles, long-format JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(name: str) -> str:
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "unknown"


def machine_name() -> str:
    """A short slug for results/<machine>/: the GPU when there is one, else cpu-<model>-<cores>c."""
    if torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"


def machine_info() -> dict:
    info = {"machine": machine_name(), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def timeit(fn, repeats=20, warmup=3, sync=None) -> dict:
    """Median and p20/p80 of wall seconds per call (CPU: perf_counter; pass sync=torch.cuda.synchronize on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7], "repeats": repeats}


def write(name: str, rows: list, out: str | None = None) -> Path:
    """Write {"machine": ..., "rows": [...]} to results/<machine>/<name>.json (or ``out``)."""
    path = Path(out) if out else RESULTS / machine_name() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": machine_info(), "rows": rows}, indent=1))
    return path
