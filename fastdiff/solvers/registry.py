"""The solver registry: ``@solver(name, alpha_zero=..., **options)`` declarations, option validation, the errors
that list what is allowed.  Solver families import this module; ``fastdiff.solvers`` imports the families.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._names import unknown_name

# Upper bound on the stages of one plan: building and running beyond it is a mistake, not a sampler.
MAX_STAGES = 100_000


@dataclass(frozen=True)
class Option:
    default: object
    check: object = None  # callable(value) -> bool
    hint: str = ""


@dataclass(frozen=True)
class SolverSpec:
    fn: object  # fn(b: Builder, g: Grid, **options)
    options: dict  # name -> Option
    alpha_zero: bool  # builds where alpha = 0 (the noise end of flows and zero-terminal-SNR schedules)
    cfgpp: bool = False  # has a CFG++ variant (plan option guidance="cfg++")


SOLVERS: dict = {}  # name -> SolverSpec


def solver(name: str, alpha_zero: bool = False, cfgpp: bool = False, **options: Option):
    """Register ``fn(b, grid, **opts)``; ``alpha_zero``: the solver's rows stay finite where alpha = 0; ``cfgpp``:
    it has a CFG++ variant (it names U through ``b.call(t, uncond=True)``)."""

    def deco(fn):
        SOLVERS[name] = SolverSpec(fn, options, alpha_zero, cfgpp)
        return fn

    return deco


GUIDANCE_MODES = ("cfg", "cfg++")


def cfgpp_solvers() -> list:
    """Names of the solvers with a CFG++ variant (``fastdiff.plan(..., guidance="cfg++")``)."""
    return sorted(name for name, spec in SOLVERS.items() if spec.cfgpp)


def solver_options(name: str) -> dict:
    """The options of a solver and their defaults."""
    if name not in SOLVERS:
        raise unknown_name("solver", name, SOLVERS)
    return {k: o.default for k, o in SOLVERS[name].options.items()}


def alpha_zero_solvers() -> list:
    """Names of the solvers that work where alpha = 0 (from their registrations)."""
    return sorted(name for name, spec in SOLVERS.items() if spec.alpha_zero)


def alpha_zero_hint() -> str:
    return (f"solvers that work there: {', '.join(alpha_zero_solvers())}; or start below the alpha = 0 end with "
            "timesteps= / sigmas= (or a lower t_max)")


def alpha_zero_error(name, schedule, times, why) -> ValueError:
    """The error of a solver whose coefficients are infinite on ``schedule`` over ``times`` (it divides by alpha or
    sigma where one is 0, or needs a point at sigma/alpha = inf)."""
    where = (f"alpha = 0 at t={times[0]:g} (zero SNR)" if schedule.alpha(times[0]) == 0
             else f"alpha or sigma is 0 in t in [{times[-1]:g}, {times[0]:g}]")
    if SOLVERS[name].alpha_zero:  # declared to work at alpha = 0: the schedule's derivatives are not finite there
        others = [n for n in alpha_zero_solvers() if n != name]
        return ValueError(f"solver {name!r} gives non-finite coefficients on {schedule!r} ({why}; {where}, where "
                          f"this schedule's derivatives are not finite); try one of {', '.join(others)}, or a grid "
                          "that avoids that end")
    return ValueError(f"solver {name!r} cannot run on {schedule!r}: {where} and it divides by alpha or sigma there "
                      f"({why}); {alpha_zero_hint()}")


def check_options(name: str, opts: dict) -> dict:
    """The solver's options with defaults filled in; ValueError naming any unknown or bad option."""
    spec = SOLVERS[name].options
    allowed = ", ".join(f"{k}={o.default!r}" for k, o in spec.items()) or "none"
    for k in opts:
        if k not in spec:
            close = difflib.get_close_matches(str(k), list(spec), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"solver {name!r} has no option {k!r}{hint} (its options: {allowed})")
    used = {}
    for k, o in spec.items():
        v = opts.get(k, o.default)
        ok = False
        try:
            ok = o.check is None or bool(o.check(v))
        except (TypeError, ValueError):
            pass
        if not ok:
            raise ValueError(f"{name}: option {k}={v!r} is not allowed; {o.hint}")
        used[k] = v
    return used


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _nonneg(v):
    return _real(v) and math.isfinite(v) and v >= 0


def _positive(v):
    return _nonneg(v) and v > 0


def _count(v, cap=MAX_STAGES):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= cap


def _flag(v):
    return isinstance(v, (bool, np.bool_))


def _one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices


def _int_in(lo, hi):
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


ETA = Option(0.0, _nonneg, "eta must be a finite number >= 0 (0: deterministic, 1: ancestral)")
ETA1 = Option(1.0, _nonneg, "eta must be a finite number >= 0 (0: deterministic, 1: full ancestral noise)")
S_NOISE = Option(1.0, _nonneg, "s_noise must be a finite number >= 0")
LOWER_ORDER_FINAL = Option(True, _flag, "lower_order_final must be True or False")
