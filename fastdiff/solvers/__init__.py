"""Solver registry: each solver is a function that drives a ``plan.Builder`` over a ``Grid`` of step boundaries.

One module per family; a solver declares its options with defaults and validators, so unknown or out-of-range
options fail with a message that lists what is allowed.  Solver math never touches tensors of data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..plan import Builder

SOLVERS: dict = {}


@dataclass(frozen=True)
class Option:
    default: object
    check: object = None  # callable(value) -> bool
    hint: str = ""


def solver(name: str, num_slots, **options: Option):
    """Register ``fn(b, grid, **opts)``; ``num_slots`` is an int or a callable of the options."""

    def deco(fn):
        SOLVERS[name] = (fn, num_slots, options)
        return fn

    return deco


def solver_options(name: str) -> dict:
    """The options of a solver and their defaults."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    return {k: o.default for k, o in SOLVERS[name][2].items()}


class Grid:
    """Step boundaries of a plan with the schedule's quantities at them (float64).

    ``t[i]``, ``alpha[i]``, ``sigma[i]``, ``lam[i]`` (log alpha/sigma), ``s[i]`` (sigma/alpha, k-diffusion's sigma)
    for i = 0..steps; ``zero[i]`` marks the clean point.
    """

    def __init__(self, schedule, times, final):
        self.schedule = schedule
        self.t = np.asarray(times, dtype=np.float64)
        self.steps = len(self.t) - 1
        self.alpha = np.asarray(schedule.alpha(self.t), dtype=np.float64).copy()
        self.sigma = np.asarray(schedule.sigma(self.t), dtype=np.float64).copy()
        self.zero = np.zeros(len(self.t), dtype=bool)
        if final == "zero":
            self.alpha[-1], self.sigma[-1], self.zero[-1] = 1.0, 0.0, True
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)
            self.s = self.sigma / self.alpha

    def at(self, t):
        """(alpha, sigma) at an intermediate time."""
        return float(self.schedule.alpha(t)), float(self.schedule.sigma(t))

    def t_of_lambda(self, lam):
        return float(self.schedule.t_from_lambda(lam))

    def t_of_s(self, s):
        return float(self.schedule.t_from_sigma_ratio(s))

    def point_at_s(self, s):
        """(t, alpha, sigma) with sigma / alpha = s exactly.

        Beyond the schedule's range (EDM churn above a DiscreteVP table's largest sigma) the time is clamped, so
        the model is conditioned on the nearest time as k-diffusion and diffusers do, while alpha and sigma keep
        the requested noise level (VP: alpha^2 + sigma^2 = 1; VE: alpha = 1).
        """
        t = self.t_of_s(s)
        a, sg = self.at(t)
        if abs(sg / a - s) <= 1e-9 * s:
            return t, a, sg
        if abs(a * a + sg * sg - 1.0) < 1e-9:
            a = 1.0 / math.sqrt(1.0 + s * s)
            return t, a, s * a
        if a == 1.0:
            return t, 1.0, s
        raise ValueError(f"noise level sigma/alpha={s:g} lies outside {self.schedule!r}'s range")


def eps_hat(X, D, alpha, sigma):
    """The noise estimate (x - alpha D) / sigma, which is also dy/ds in k-diffusion's sigma space."""
    return (X - alpha * D) / sigma


def expm1_neg(alpha_t, sigma_t, alpha_s, sigma_s):
    """e^{-h} with h = lambda_t - lambda_s, as a ratio (exact 0 at sigma_t = 0 or alpha_s = 0, no logs)."""
    return (sigma_t * alpha_s) / (alpha_t * sigma_s)


def build(name, schedule, prediction, times, final, opts):
    fn, num_slots, spec = SOLVERS[name]
    unknown = sorted(set(opts) - set(spec))
    if unknown:
        allowed = ", ".join(f"{k}={o.default!r}" for k, o in spec.items()) or "none"
        raise ValueError(f"solver {name!r} has no option(s) {', '.join(unknown)}; its options: {allowed}")
    used = {}
    for k, o in spec.items():
        v = opts.get(k, o.default)
        if o.check is not None and not o.check(v):
            raise ValueError(f"{name}: {k}={v!r} is not allowed; {o.hint}")
        used[k] = v
    grid = Grid(schedule, times, final)
    K = num_slots(used) if callable(num_slots) else num_slots
    b = Builder(schedule, prediction, K)
    try:
        with np.errstate(all="ignore"):  # infinities are caught by Plan's finiteness check with a clear message
            fn(b, grid, **used)
    except (ZeroDivisionError, OverflowError) as e:
        raise ValueError(
            f"solver {name!r} cannot run on {schedule!r} over t in [{grid.t[-1]:g}, {grid.t[0]:g}] ({e}): it divides "
            "by alpha or sigma where one is 0. Schedules that reach alpha = 0 at t_max (flows, zero terminal SNR) "
            "work with flow_euler, flow_heun, ddim, euler, ddpm, dpmpp_2m/3m and unipc; for the others lower t_max "
            "or pass timesteps="
        ) from None
    return b.stages, K, used


def _nonneg(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive(v):
    return _nonneg(v) and v > 0


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _flag(v):
    return isinstance(v, bool)


ETA = Option(0.0, _nonneg, "eta must be a finite number >= 0 (0: deterministic, 1: ancestral)")
ETA1 = Option(1.0, _nonneg, "eta must be a finite number >= 0 (0: deterministic, 1: full ancestral noise)")
S_NOISE = Option(1.0, _nonneg, "s_noise must be a finite number >= 0")
LOWER_ORDER_FINAL = Option(True, _flag, "lower_order_final must be True or False")

# Register the families (import for side effects).
from . import consistency, ddpm, dpm_solver, flow, ode, sde, unipc  # noqa: E402,F401

__all__ = ["SOLVERS", "solver_options", "build", "Grid"]
