"""The solver language: linear expressions over the registers, a Builder that records stages, the step Grid.

A solver is host code over float64 numbers that drives a ``Builder``:

    X, D = b.call(t)                       # a stage that calls the model at schedule time t
    b.update(x=a * X + c * D, slots={y_hat: X / alpha}, noise=g)

CFG++ variants also name U, the data estimate of the unconditional output: ``X, D, U = b.call(t, uncond=True)``.
U is its own register (the U column of the rows) in a CFG++ build (``Builder.cfgpp``) and D itself otherwise, so
a solver written with U gives the plain solver's rows unchanged.

``X``, ``D`` and slot handles are ``Lin`` (linear combinations of the registers), so solver code reads like the
paper.  Slots are allocated by name (``b.slot("y_hat")``) or as history rings (``b.history("D", 2)``); the Builder
counts what was allocated, so no solver counts slot indices.  ``fastdiff.plan`` turns the recorded stages into
coefficient rows; this module does not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PREDICTIONS = ("epsilon", "x0", "v", "score", "flow")


class Lin:
    """A linear combination of registers: keys "x", "D", "U" (CFG++) or a slot index (int)."""

    __slots__ = ("c",)

    def __init__(self, c=None):
        self.c = dict(c or {})

    def __add__(self, other):
        if not isinstance(other, Lin):
            return NotImplemented
        out = dict(self.c)
        for k, v in other.c.items():
            out[k] = out.get(k, 0.0) + v
        return Lin(out)

    def __sub__(self, other):
        return self + (-1.0) * other

    def __mul__(self, a):
        a = float(a)
        return Lin({k: a * v for k, v in self.c.items()})

    __rmul__ = __mul__

    def __truediv__(self, a):
        return self * (1.0 / float(a))

    def __neg__(self):
        return self * -1.0

    def __repr__(self):
        return " + ".join(f"{v:.6g}*{k}" for k, v in self.c.items()) or "0"


class Slot(Lin):
    """A history slot: reads as the slot's value before the stage; a key of ``Builder.update(slots=...)``."""

    __slots__ = ("index", "name")

    def __init__(self, index: int, name: str):
        super().__init__({index: 1.0})
        self.index, self.name = index, name

    __hash__ = object.__hash__

    def __repr__(self):
        return f"Slot({self.name!r}, {self.index})"


class History:
    """A ring of ``size`` slots holding the last values pushed, one push per stage at most.

    ``ring[j]`` is the value pushed j stages-with-a-push ago (j = 1: the latest), as seen by the open stage;
    ``push(lin)`` writes ``lin`` into the oldest slot when the open stage closes.  A ring of size 0 keeps nothing.
    """

    def __init__(self, builder: "Builder", name: str, slots: list):
        self._b, self.name, self._slots = builder, name, slots
        self.pushed = 0  # pushes of closed stages

    def __len__(self):
        return len(self._slots)

    def __getitem__(self, j: int) -> Lin:
        if not 1 <= j <= min(len(self._slots), self.pushed):
            raise IndexError(f"history {self.name!r} holds {min(len(self._slots), self.pushed)} earlier values; "
                             f"asked for the {j}-th previous")
        return self._slots[(self.pushed - j) % len(self._slots)]

    def push(self, value: Lin):
        self._b._push(self, value)


@dataclass
class Stage:
    t: float  # schedule time of the model call (nan: no model call)
    step: int = 0  # the solver step (grid interval) the stage belongs to
    cx: float = 0.0  # D register = cx x + co out
    co: float = 0.0
    denoised: tuple = None  # (cx, co) of the data estimate where the D register holds something else (the score)
    x: Lin = None
    slots: dict = None  # slot index -> Lin
    g: float = 0.0
    langevin: tuple = (0.0, 0.0, 0.0, 0.0)  # snr, r, lsx, lsD


class Builder:
    """Collects stages; each solver drives one through ``call`` / ``update`` (and ``add_noise``)."""

    X = Lin({"x": 1.0})
    D = Lin({"D": 1.0})
    U = Lin({"U": 1.0})

    def __init__(self, schedule, prediction: str, max_stages: int | None = None, cfgpp: bool = False):
        self.schedule = schedule
        self.cfgpp = bool(cfgpp)  # CFG++ build: U (the unconditional data estimate) is a register of its own
        self.prediction = prediction
        self.max_stages = max_stages
        self.stages: list[Stage] = []
        self._open: Stage | None = None
        self._pending: dict = {}  # History -> value pushed in the open stage
        self._names: list[str] = []  # slot names by index
        self.step = 0

    @property
    def num_slots(self) -> int:
        """Slots allocated so far (the plan's K)."""
        return len(self._names)

    def slot(self, name: str) -> Slot:
        """Allocate a named slot."""
        self._names.append(name)
        return Slot(len(self._names) - 1, name)

    def history(self, name: str, size: int) -> History:
        """Allocate a ring of ``size`` slots for the last ``size`` values of ``name``."""
        return History(self, name, [self.slot(f"{name}[{j}]") for j in range(max(int(size), 0))])

    def expect(self, stages: int):
        """Fail fast (``StageLimit``) when the solver knows it will need more than ``max_stages`` stages."""
        if self.max_stages is not None and stages > self.max_stages:
            raise StageLimit(self.max_stages)

    def steps(self, n: int, start: int = 0):
        """Iterate the solver's steps, recording which step each stage belongs to (``Plan.stage_step``)."""
        for i in range(start, start + n):
            self.step = i - start
            yield i

    def call(self, t: float, alpha=None, sigma=None, uncond: bool = False):
        """Open a stage that calls the model at schedule time ``t``; returns the registers (X, D), or (X, D, U)
        with ``uncond`` (U: the unconditional output's data estimate in a CFG++ build, else D itself).

        ``alpha``, ``sigma`` override the schedule's values where the noise level differs from the time the
        model is conditioned on (a churned level beyond the schedule's range, see ``Grid.point_at_s``).
        """
        assert self._open is None, "previous stage not closed"
        t = float(t)
        if math.isnan(t):
            raise OutOfRange("it needs a model call at a time the schedule does not have (t = nan)")
        cx, co = conversion(self.schedule, self.prediction, t, alpha, sigma)
        self._open = Stage(t=t, cx=cx, co=co, step=self.step)
        if uncond:
            return self.X, self.D, (self.U if self.cfgpp else self.D)
        return self.X, self.D

    def score_call(self, t: float, alpha: float, sigma: float):
        """Open a stage that calls the model at ``t`` with the score (alpha D - x) / sigma^2 in the D register.

        The coefficients are formed in float64 from the data estimate's, so the cancellation of x against alpha D
        (coefficients ~ 1 / sigma^2) happens here and not in the kernel's float32: the score of an epsilon model is
        -out / sigma exactly.  Only for stages that use the score alone (Langevin correctors).
        """
        X, D = self.call(t)
        st = self._open
        st.denoised = (st.cx, st.co)
        st.cx, st.co = (alpha * st.cx - 1.0) / (sigma * sigma), alpha * st.co / (sigma * sigma)
        return X, D

    def _push(self, ring: History, value: Lin):
        assert self._open is not None, "push() outside a stage"
        assert ring not in self._pending, f"two pushes to {ring.name!r} in one stage"
        self._pending[ring] = value

    def update(self, x: Lin, slots: dict | None = None, noise: float = 0.0, langevin=None):
        """Close the open stage with x' = ``x`` + noise * z, the slot writes ``slots`` {Slot: Lin} and the pushes."""
        st = self._open
        assert st is not None, "update() without call()"
        writes = {s.index: v for s, v in (slots or {}).items()}
        for ring, value in self._pending.items():
            if len(ring):
                writes[ring._slots[ring.pushed % len(ring)].index] = value
            ring.pushed += 1
        self._pending = {}
        st.x, st.slots, st.g = x, writes, float(noise)
        if langevin is not None:
            st.langevin = tuple(float(v) for v in langevin)
        self._append(st)
        self._open = None

    def add_noise(self, scale: float, gain: float):
        """x <- scale * x + gain * z before the next model call (EDM churn), fused into the previous stage."""
        if gain == 0.0 and scale == 1.0:
            return
        prev = self.stages[-1] if self.stages else None
        if prev is not None and prev.g == 0.0 and prev.langevin[0] == 0.0:
            prev.x, prev.g = scale * prev.x, gain
        else:  # nothing to fuse into: a stage without a model call
            self._append(Stage(t=math.nan, x=scale * self.X, slots={}, g=gain, step=self.step))

    def _append(self, st: Stage):
        if self.max_stages is not None and len(self.stages) >= self.max_stages:
            raise StageLimit(self.max_stages)
        self.stages.append(st)


class OutOfRange(ValueError):
    """A point the solver needs lies outside the schedule (e.g. sigma/alpha = inf where alpha = 0)."""


class StageLimit(Exception):
    """Raised by a Builder that reached its ``max_stages`` (turned into a ValueError naming the options)."""


def conversion(schedule, prediction: str, t: float, alpha=None, sigma=None):
    """(cx, co) with D = cx * x + co * out for a model output in ``prediction`` parameterization at time t."""
    a = np.float64(schedule.alpha(t) if alpha is None else alpha)
    s = np.float64(schedule.sigma(t) if sigma is None else sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction == "epsilon":  # x = a D + s eps
            cx, co = 1.0 / a, -s / a
        elif prediction == "x0":
            cx, co = 0.0, 1.0
        elif prediction == "v":  # v = a eps - s x0  (Salimans & Ho 2022)
            n = a * a + s * s
            cx, co = a / n, -s / n
        elif prediction == "score":  # score = (a D - x) / s^2
            cx, co = 1.0 / a, s * s / a
        elif prediction == "flow":  # out = dx / d(model time);  dx/dt = da D + ds eps
            da, ds, rate = schedule.dalpha(t), schedule.dsigma(t), schedule.model_time_rate
            det = ds * a - s * da
            cx, co = ds / det, -s * rate / det
        else:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if not (math.isfinite(cx) and math.isfinite(co)):
        raise ValueError(
            f"a model predicting {prediction!r} cannot be converted to a data estimate at t={t:g} on {schedule!r} "
            f"(alpha={a:g}, sigma={s:g}); this solver calls the model there. Use an 'x0', 'v' or 'flow' model, "
            "or a spacing / t_max that avoids alpha = 0"
        )
    return float(cx), float(co)


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
        raise OutOfRange(f"it needs the noise level sigma/alpha={s:g}, outside the schedule's range")


def eps_hat(X, D, alpha, sigma):
    """The noise estimate (x - alpha D) / sigma, which is also dy/ds in k-diffusion's sigma space."""
    return (X - alpha * D) / sigma


def exp_neg_h(alpha_t, sigma_t, alpha_s, sigma_s):
    """e^{-h} with h = lambda_t - lambda_s, as the ratio sigma_t alpha_s / (alpha_t sigma_s): exact 0 at sigma_t = 0
    or alpha_s = 0, no logs."""
    return (sigma_t * alpha_s) / (alpha_t * sigma_s)
