"""The cpu backend: C++/OpenMP kernels from ``csrc/cpu`` (``bindings.cpp`` over ``step_kernels.h``), built with
ninja on first use.

The build goes to the torch extensions cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) in a
directory keyed on everything the binary depends on: the source files' contents, the torch version, the Python ABI,
the compiler and its flags, and the host CPU's instruction sets (the code is compiled with ``-march=native``).  So
every later process with the same sources reuses it, while two checkouts or environments never overwrite each
other's build; a file lock keeps concurrent first builds from racing.  ``OPS`` has the signatures of
``fastdiff.ops.step_reference`` / ``add_noise_reference`` / ``_randn_reference``; ``step`` also takes ``x_out``
(e.g. ``x_out=x`` for an in-place update) and ``nonfinite`` (per-sample flags raised as x' is written), ``randn``
an ``out`` buffer.  Arguments are validated by ``fastdiff.ops``; the extension checks only its own limits (CPU
tensors, storage dtypes, contiguity, at most 8 slots).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import threading

from ._sources import csrc_dir

NAME = "fastdiff_cpu"
# -ffp-contract=off: no FMA contraction, so backends round alike.  -fno-math-errno / -fno-trapping-math change no
# result (IEEE semantics stay; only errno and FP-exception flags are not kept), but without them g++ will not
# vectorize loops with sqrt or with a float->int conversion after a select (Box-Muller).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-march=native"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_ext = None
_error: str | None = None


def sources() -> list:
    """The C++ sources handed to the compiler (the headers they include are in ``include_dirs()``)."""
    return [csrc_dir() / "cpu" / "bindings.cpp"]


def include_dirs() -> list:
    return [csrc_dir() / "cpu", csrc_dir() / "common"]


def _host_tag() -> str:
    """The host's instruction sets: -march=native binaries must not move between CPU models."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return flags


def build_key(srcs=None, includes=None, cflags=()) -> str:
    """Hash of what the built binary depends on: sources and headers (contents), torch, Python ABI, compiler, flags
    (``CFLAGS`` + ``cflags``), CPU."""
    import torch

    h = hashlib.sha256()
    files = set(srcs if srcs is not None else sources())
    for d in includes if includes is not None else include_dirs():
        files.update(p for p in d.iterdir() if p.suffix in (".h", ".hpp", ".cpp", ".cc"))
    for p in sorted(files, key=str):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    abi = sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag
    for part in (torch.__version__, abi, os.environ.get("CXX", ""), " ".join([*CFLAGS, *cflags]), " ".join(LDFLAGS),
                 _host_tag()):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def build_directory(name: str = NAME, srcs=None, includes=None, cflags=()) -> str:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, f"{name}_{build_key(srcs, includes, cflags)}")


def _built(bdir: str, name: str) -> bool:
    return os.path.isfile(os.path.join(bdir, name + ".so"))


def _missing_tools() -> list[str]:
    missing = []
    cxx = os.environ.get("CXX")
    if cxx and not shutil.which(cxx):
        missing.append(f"the C++ compiler CXX={cxx} (not found)")
    elif not cxx and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler (g++/clang++)")
    if not shutil.which("ninja"):  # pip's ninja in a venv that is not activated: put its binary on PATH
        for d in (os.path.dirname(sys.executable), _pip_ninja_dir()):
            if d and os.path.isfile(os.path.join(d, "ninja")):
                os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
                break
    if not shutil.which("ninja"):
        missing.append("ninja")
    return missing


def _missing_message(missing: list[str]) -> str:
    hints = (["apt-get install g++ (or set CXX to a C++17 compiler)"] if "ninja" not in missing[0] else []) + \
        (["pip install ninja"] if "ninja" in missing else [])
    return f"fastdiff's cpu backend needs {' and '.join(missing)}: {'; '.join(hints)}"


def _pip_ninja_dir() -> str | None:
    try:
        import ninja

        return getattr(ninja, "BIN_DIR", None)
    except ImportError:
        return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(str(text).strip().splitlines()[-lines:])


def build(name: str, srcs: list, includes: list, what: str, cflags=()):
    """Compile (or load the cached build of) a torch extension from ``srcs`` with the kernels' flags, then ``cflags``
    (which can narrow the instruction sets, e.g. ``["-mno-avx512f"]``: the tests build the probes that way); returns
    the module or raises RuntimeError saying what is missing.  Prints one line to stderr when a build starts."""
    missing = _missing_tools()
    if missing:
        raise RuntimeError(_missing_message(missing))
    from torch.utils.cpp_extension import load

    for src in srcs:
        if not src.is_file():
            raise RuntimeError(f"fastdiff's cpu backend source is missing: {src}")
    bdir = build_directory(name, srcs, includes, cflags)
    os.makedirs(bdir, exist_ok=True)
    # torch's own lock (a 'lock' file) is left behind by a killed build and then blocks forever; flock is released
    # by the kernel when its holder dies, so take it around the whole load (POSIX; elsewhere torch's lock only).
    try:
        import fcntl
    except ImportError:
        fcntl = None

    with open(os.path.join(bdir, "fastdiff.flock"), "w") as lockf:
        if fcntl is not None:
            fcntl.flock(lockf, fcntl.LOCK_EX)
        try:
            stale = os.path.join(bdir, "lock")
            if fcntl is not None and os.path.exists(stale):  # we hold the flock: nobody else is building
                os.remove(stale)
            if not _built(bdir, name):
                print(f"fastdiff: building the {what} (first use, ~1 minute)...", file=sys.stderr, flush=True)
            return load(name=name, sources=[str(s) for s in srcs], extra_cflags=[*CFLAGS, *cflags],
                        extra_ldflags=LDFLAGS,
                        extra_include_paths=[str(d) for d in includes], build_directory=bdir, verbose=False)
        except Exception as e:  # the compiler's message is in the exception text
            raise RuntimeError("fastdiff's cpu backend failed to build (it needs a C++17 compiler (g++/clang++) "
                               f"with OpenMP and ninja; build directory {bdir}):\n{_tail(e)}") from None
        finally:
            if fcntl is not None:
                fcntl.flock(lockf, fcntl.LOCK_UN)


def ext():
    """The compiled extension module (built on first use, cached for the process)."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None:
            if _error is not None:
                raise RuntimeError(_error)
            try:
                _ext = build(NAME, sources(), include_dirs(), "cpu kernels")
            except RuntimeError as e:
                _error = str(e)
                raise
    return _ext


def status() -> tuple[str, str]:
    """Where the kernels stand, without building anything: ("built" | "not built yet" | "unavailable", detail)."""
    if _ext is not None:
        return "built", "loaded"
    if _error is not None:
        return "unavailable", _error
    missing = _missing_tools()
    if missing:
        return "unavailable", _missing_message(missing)
    bdir = build_directory()
    if _built(bdir, NAME):
        return "built", bdir
    return "not built yet", f"builds on first use into {bdir}"


def available() -> tuple[bool, str]:
    """(True, state) when the kernels are built or can be built here, else (False, the reason).  Never builds."""
    state, detail = status()
    return state != "unavailable", (detail if state == "unavailable" else f"{state} ({detail})")


# ---------------------------------------------------------------------------------------------------------------
# OPS: the contract of fastdiff.ops (step_reference etc.)
# ---------------------------------------------------------------------------------------------------------------


def step(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin,
         x_out=None, thresholds=None, nonfinite=None, cfg_rescale=None, uncond=False):
    """fastdiff::step on CPU tensors; returns x' (``x_out`` when given, which may be ``x``) and updates ``slots``.

    ``thresholds``: optional [B] dynamic thresholds in the math dtype (float32; float64 for float64 x);
    ``nonfinite``: optional int32 [B] flags, set to 1 for a sample whose stored x' has NaN / Inf;
    ``cfg_rescale``: optional [B] guidance_rescale factors; ``uncond``: CFG++ rows (the U column)."""
    return ext().step(x, out, slots, rows, seeds, draws, guidance, int(slot_reads), int(slot_writes), bool(use_out),
                      bool(cfg), bool(noise), bool(langevin), x_out, thresholds, nonfinite, cfg_rescale,
                      bool(uncond))


def step_kernel():
    """The extension's step itself, for ``fastdiff.ops._step_kernel``: ``step``'s arguments, all positional, with
    Python ints / bools for the masks and flags (no conversion layer: a loop calls it once per stage)."""
    return ext().step


def add_noise(x0, alpha, sigma, seeds, draws):
    """x_t = alpha x0 + sigma z (per-sample alpha, sigma [B | 1], Philox z of (seed, draw))."""
    return ext().add_noise(x0, alpha, sigma, seeds, draws)


def randn(seeds, draws, shape, dtype, out=None):
    """Philox normals of ``shape`` (batch first) in fp32, cast once to ``dtype``; into ``out`` when given."""
    return ext().randn(seeds, draws, [int(s) for s in shape], dtype, out)


OPS = {"step": step, "add_noise": add_noise, "randn": randn}

__all__ = ["OPS", "add_noise", "available", "build", "build_directory", "ext", "randn", "status", "step", "step_kernel"]
