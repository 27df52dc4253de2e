"""Shared pieces of the float64 references: the step grid, model-output conversions, noise consumption.

Nothing here knows about Plans or coefficient rows: the references call the model and update tensors directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..timesteps import custom_times
from ..timesteps import timesteps as _timesteps

PREDICTIONS = ("epsilon", "x0", "v", "score", "flow")


def log_ratio(a: float, b: float) -> float:
    """log(a / b) with log(0) = -inf and a / 0 = +inf (half the log-SNR at the ends of a schedule)."""
    if b == 0.0:
        return math.inf
    if a == 0.0:
        return -math.inf
    return math.log(a) - math.log(b)


def ratio(a: float, b: float) -> float:
    """a / b with a / 0 = +inf for a > 0 (k-diffusion's sigma where alpha = 0)."""
    return a / b if b != 0.0 else math.inf


class Grid:
    """The steps + 1 boundaries: ``t[i]``, ``alpha[i]``, ``sigma[i]``, ``lam[i]`` = log(alpha/sigma),
    ``s[i]`` = sigma/alpha (k-diffusion's sigma) and ``clean[i]`` (the clean point alpha = 1, sigma = 0)."""

    def __init__(self, schedule, steps, spacing, final, timesteps, sigmas, spacing_opts):
        if timesteps is not None or sigmas is not None:
            if spacing is not None:
                raise ValueError("give either spacing= or a custom timesteps= / sigmas=, not both")
            t = custom_times(schedule, timesteps=timesteps, sigmas=sigmas, final=final)
            if sigmas is not None:  # a k-diffusion sigma sequence says itself where it ends
                final = "zero" if float(np.asarray(sigmas, dtype=np.float64)[-1]) == 0.0 else "t_min"
            if steps is not None and steps != len(t) - 1:
                raise ValueError(f"steps={steps} disagrees with the {len(t) - 1} steps of the custom sequence")
        else:
            if steps is None:
                raise ValueError("steps is required (or a custom timesteps= / sigmas=)")
            t = _timesteps(schedule, steps, spacing, final=final, **spacing_opts)
        self.schedule = schedule
        self.t = [float(v) for v in t]
        self.steps = len(self.t) - 1
        self.alpha = [float(schedule.alpha(v)) for v in self.t]
        self.sigma = [float(schedule.sigma(v)) for v in self.t]
        self.clean = [False] * len(self.t)
        if final == "zero":  # the last boundary is the clean point itself
            self.alpha[-1], self.sigma[-1], self.clean[-1] = 1.0, 0.0, True
        self.lam = [log_ratio(a, s) for a, s in zip(self.alpha, self.sigma)]
        self.s = [ratio(s, a) for a, s in zip(self.alpha, self.sigma)]


class Out:
    """A model output converted to every parameterization an algorithm may need, at schedule time ``t``.

    ``x0`` (the data estimate D), ``eps`` (noise), ``score`` = -eps / sigma, ``velocity`` = dx/dt along the path
    x_t = alpha(t) x0 + sigma(t) eps, i.e. alpha'(t) x0 + sigma'(t) eps.
    """

    __slots__ = ("x0", "eps", "score", "velocity")


def _finite(c: float, what: str, prediction: str, t: float, alpha: float, sigma: float) -> float:
    if not math.isfinite(c):
        raise ValueError(f"reference: cannot form {what} from a {prediction!r} output at t={t:g} "
                         f"(alpha={alpha:g}, sigma={sigma:g})")
    return c


class Run:
    """One sampling run: the schedule, the model and its prediction type, the noise list, the grid."""

    def __init__(self, model, schedule, prediction, grid, noises, batch):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        self.model, self.schedule, self.prediction, self.grid = model, schedule, prediction, grid
        self.noises, self.batch, self.draws = noises, batch, 0

    # -- the model ----------------------------------------------------------------------------------------------
    def eval(self, x: torch.Tensor, t: float, alpha=None, sigma=None) -> Out:
        """Call the model at schedule time ``t`` (it receives ``schedule.model_time(t)``) and convert its output.

        ``alpha``, ``sigma``: the noise level of ``x`` where it differs from the time the model is conditioned on
        (a level above the top of a DiscreteVP table, see ``ode.point_at_s``); default: the schedule's at ``t``.
        """
        sch, t = self.schedule, float(t)
        tm = torch.full((x.shape[0],), float(sch.model_time(t)), dtype=torch.float64, device=x.device)
        out = self.model(x, tm).to(torch.float64)
        a = float(sch.alpha(t)) if alpha is None else float(alpha)
        s = float(sch.sigma(t)) if sigma is None else float(sigma)
        da, ds = float(sch.dalpha(t)), float(sch.dsigma(t))
        p, r = self.prediction, Out()
        if p == "epsilon":  # x = alpha x0 + sigma eps
            r.eps = out
            r.x0 = (x - s * out) * _finite(1.0 / a if a else math.inf, "x0", p, t, a, s)
        elif p == "x0":
            r.x0 = out
            r.eps = (x - a * out) * _finite(1.0 / s if s else math.inf, "eps", p, t, a, s)
        elif p == "v":  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
            n = a * a + s * s
            r.x0 = (a * x - s * out) / n
            r.eps = (s * x + a * out) / n
        elif p == "score":  # score = grad log p_t(x) = -eps / sigma
            r.eps = -s * out
            r.x0 = (x + (s * s) * out) * _finite(1.0 / a if a else math.inf, "x0", p, t, a, s)
        else:  # flow: out = dx / d(model time), so dx/dt = model_time_rate * out = alpha' x0 + sigma' eps
            v = sch.model_time_rate * out
            det = a * ds - s * da  # solve [[alpha, sigma], [alpha', sigma']] (x0, eps) = (x, v)
            r.x0 = (ds * x - s * v) / det
            r.eps = (a * v - da * x) / det
        # score and velocity from (x0, eps)
        r.score = -r.eps / s if s else None
        r.velocity = da * r.x0 + ds * r.eps
        return r

    # -- noise ----------------------------------------------------------------------------------------------------
    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """The next fresh N(0, I) draw, from the caller's list."""
        if self.noises is None:
            raise ValueError("reference: this run draws noise; pass noises=[...] (one tensor per draw, in order)")
        if self.draws >= len(self.noises):
            raise ValueError(f"reference: noises has {len(self.noises)} tensors but the run needs more "
                             f"(draw {self.draws + 1})")
        z = torch.as_tensor(self.noises[self.draws]).to(dtype=torch.float64, device=like.device)
        if z.shape != like.shape:
            raise ValueError(f"reference: noise {self.draws} has shape {tuple(z.shape)}, expected {tuple(like.shape)}")
        self.draws += 1
        return z
