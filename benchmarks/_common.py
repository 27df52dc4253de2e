"""Shared benchmark plumbing: machine description, timing with quantiles, long-format JSON results."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
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


def source_version() -> dict:
    """The commit the measured code comes from, and whether the library sources (fastdiff/, csrc/) differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastdiff", "csrc"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "sources_modified": bool(dirty)}


def machine_info() -> dict:
    info = {"machine": machine_name(), "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "threads": torch.get_num_threads(), **source_version()}
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
    return _quantiles([_timed(fn, sync) for _ in range(repeats)])


def _timed(fn, sync=None) -> float:
    """Wall seconds of one call, with the device synchronized before and after when ``sync`` is given."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def _quantiles(times: list) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median": statistics.median(times), "p20": q[1], "p80": q[7], "repeats": len(times)}


def time_interleaved(cases: dict, repeats=20, warmup=1, sync=None) -> dict:
    """Time each ``cases[name]()`` ``repeats`` times, round-robin over the cases, so that the slow phases of a
    shared machine hit every provider alike; returns {name: timeit-style dict}.  Warm-up (compilation, caches)
    runs before any timing."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn, sync))
    return {name: _quantiles(ts) for name, ts in times.items()}


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def load_k_diffusion():
    """k-diffusion's ``sampling`` module, or None when it is not installed.

    ``import k_diffusion`` imports every submodule, torchvision included, whose build may not match torch; its
    ``sampling.py`` needs only ``utils.append_dims`` and, at import time, torchsde / torchdiffeq.  So, as
    tests/peers.py does: execute that one file, unmodified, in a private stand-in package whose ``utils`` holds
    ``append_dims``, with stubs for torchsde / torchdiffeq when they are missing (only BrownianTreeNoiseSampler
    needs them, and the benchmark passes ``noise_sampler=``).  The stubs leave ``sys.modules`` afterwards.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    if not path.is_file():
        return None
    pkg_name = "_fastdiff_bench_k_diffusion"
    pkg, utils = types.ModuleType(pkg_name), types.ModuleType(pkg_name + ".utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    stubs = {pkg_name: pkg, pkg_name + ".utils": utils}
    for name, attr in (("torchsde", "BrownianTree"), ("torchdiffeq", "odeint")):
        if importlib.util.find_spec(name) is None:
            stubs[name] = types.ModuleType(name)
            setattr(stubs[name], attr, None)
    name = pkg_name + ".sampling"
    saved = {n: sys.modules[n] for n in [*stubs, name] if n in sys.modules}
    sys.modules.update(stubs)
    try:
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    finally:
        for n in [*stubs, name]:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    return module


def write(name: str, rows: list, out: str | None = None, extra: dict | None = None) -> Path:
    """Write {"info": machine_info() | extra, "rows": [...]} to results/<machine>/<name>.json (or ``out``)."""
    path = Path(out) if out else RESULTS / machine_name() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {**machine_info(), **(extra or {})}, "rows": rows}, indent=1))
    return path
