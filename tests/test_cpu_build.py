"""Where the cpu kernels are built: a cache directory keyed on everything the binary depends on, and one line on
stderr when a build starts (none when a cached build is loaded).  No compiler runs here: torch's loader is faked."""

from __future__ import annotations

import shutil

import pytest
import torch

from fastdiff.backends import _sources, cpu


@pytest.fixture
def csrc_copy(tmp_path, monkeypatch):
    """A private copy of csrc/ that the cpu backend reads instead of the real one."""
    root = tmp_path / "csrc"
    shutil.copytree(_sources.csrc_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cpu, "csrc_dir", lambda: root)
    return root


def test_build_directory_follows_sources_torch_and_flags(csrc_copy, monkeypatch):
    base = cpu.build_directory()
    assert base == cpu.build_directory()  # stable
    header = csrc_copy / "cpu" / "step_kernels.h"
    header.write_text(header.read_text() + "\n// changed\n")
    changed_source = cpu.build_directory()
    assert changed_source != base
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    changed_torch = cpu.build_directory()
    monkeypatch.setattr(cpu, "CFLAGS", cpu.CFLAGS + ["-DOTHER"])
    changed_flags = cpu.build_directory()
    assert len({base, changed_source, changed_torch, changed_flags}) == 4


def test_one_line_when_a_build_starts_none_when_cached(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_missing_tools", lambda: [])
    loads = []

    def fake_load(name, build_directory, **kwargs):
        loads.append(build_directory)
        (tmp_path / build_directory / f"{name}.so").write_bytes(b"")  # what a finished build leaves
        return "module"

    monkeypatch.setattr(cpp, "load", fake_load)
    assert cpu.build(cpu.NAME, cpu.sources(), cpu.include_dirs(), "cpu kernels") == "module"
    first = capsys.readouterr().err
    assert first == "fastdiff: building the cpu kernels (first use, ~1 minute)...\n"
    assert cpu.build(cpu.NAME, cpu.sources(), cpu.include_dirs(), "cpu kernels") == "module"
    assert capsys.readouterr().err == ""
    assert len(loads) == 2 and loads[0] == loads[1] == cpu.build_directory()


def test_missing_tools_are_reported_not_built(monkeypatch):
    monkeypatch.setattr(cpu, "_missing_tools", lambda: ["ninja"])
    with pytest.raises(RuntimeError, match="pip install ninja"):
        cpu.build(cpu.NAME, cpu.sources(), cpu.include_dirs(), "cpu kernels")
