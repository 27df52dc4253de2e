"""The command line's cheap paths: ``fastdiff info`` never builds kernels and says why one is unavailable;
``fastdiff bench`` skips subjects whose peers are missing and keeps ``--quick`` results out of the committed ones."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile

import pytest

from fastdiff import backends, cli
from fastdiff.backends import cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _never_build(*args, **kwargs):
    raise AssertionError("fastdiff info must not build the cpu kernels")


def test_info_reports_an_unbuilt_kernel_without_building_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built yet
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "build", _never_build)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: not built yet" in out and str(tmp_path) in out
    assert list(tmp_path.iterdir()) == []


def test_info_says_why_the_cpu_kernels_cannot_build(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_missing_tools", lambda: ["ninja"])
    assert cli.main(["info"]) == 0
    assert "cpu: unavailable (fastdiff's cpu backend needs ninja: pip install ninja)" in capsys.readouterr().out


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, recwarn):
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_missing_tools", lambda: ["a C++ compiler (g++/clang++)"])
    monkeypatch.setattr(backends, "_WARNED", set())
    assert backends.resolve("auto", "cpu") == "torch"
    assert backends.resolve("auto", "cpu") == "torch"
    warned = [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and "C++ compiler" in str(warned[0].message)


def test_auto_falls_back_to_torch_when_the_build_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "_missing_tools", lambda: [])

    def failed_build(*args, **kwargs):
        raise RuntimeError("fastdiff's cpu backend failed to build: no OpenMP")

    monkeypatch.setattr(cpu, "build", failed_build)
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="no OpenMP"):
        assert backends.resolve("auto", "cpu") == "torch"
    assert cpu.status()[0] == "unavailable"


class _Runs:
    """Stands in for subprocess.run: records the benchmark scripts that would have run."""

    def __init__(self):
        self.calls = []

    def __call__(self, cmd, **kwargs):
        self.calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0)


def test_bench_skips_subjects_whose_peers_are_missing(tmp_path, monkeypatch, capsys):
    runs = _Runs()
    monkeypatch.setattr(subprocess, "run", runs)
    monkeypatch.setattr(cli, "_installed", lambda module: module != "diffusers")
    assert cli.main(["bench", "--only", "dropin", "quality", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "dropin" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "pip install" in skipped[0]
    assert "Traceback" not in out
    assert [pathlib.Path(c[1]).name for c in runs.calls] == ["bench_quality.py"]
    assert runs.calls[0][0] == sys.executable


def test_bench_quick_writes_outside_the_committed_results(tmp_path, monkeypatch, capsys):
    runs = _Runs()
    monkeypatch.setattr(subprocess, "run", runs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the quick run's temporary directory lands here
    assert cli.main(["bench", "--quick", "--only", "quality", "serving"]) == 0
    out = capsys.readouterr().out
    outs = [pathlib.Path(c[c.index("--out") + 1]) for c in runs.calls]
    assert len(outs) == 2
    results = ROOT / "benchmarks" / "results"
    for path in outs:
        assert results not in path.parents and str(path.parent) in out  # elsewhere, and said where


def test_ring_demo_is_named_for_what_it_runs():
    assert callable(cli.ring_demo) and callable(cli.demo_digits)
    assert not hasattr(cli, "demo")
