"""Step spacings: where on a schedule the sampler stops.

``timesteps(schedule, steps, spacing)`` returns the ``steps + 1`` step boundaries, descending, in the schedule's
own time unit.  The first ``steps`` are where the model is called by one-stage solvers; the last is where sampling
ends: ``final="zero"`` ends on the clean point (alpha = 1, sigma = 0, time label ``schedule.t_zero``), as EDM,
k-diffusion and diffusers' ``final_sigmas_type="zero"`` do; ``final="t_min"`` ends on the schedule's smallest
time.  With ``final="zero"`` the spacing places ``steps`` points from ``t_max`` down to ``t_min`` inclusive and
appends the clean point (EDM eq. 5 and k-diffusion's ``get_sigmas_*``); with ``final="t_min"`` it places
``steps + 1`` points on the same interval.

Spacings:

- ``"uniform"``: uniform in t;
- ``"logsnr"``: uniform in lambda = log(alpha / sigma) (DPM-Solver's "logSNR");
- ``"karras"``: Karras et al. 2022 eq. 5 in k-diffusion's sigma = sigma / alpha, ``rho`` = 7;
- ``"exponential"``: uniform in log(sigma / alpha) (k-diffusion's ``get_sigmas_exponential``; on these
  schedules it coincides with ``"logsnr"``);
- ``"quadratic"``: t_min + (t_max - t_min) u^2 on uniform u (DDIM's "quad");
- ``"leading"``, ``"trailing"``, ``"linspace"``: diffusers' discrete spacings on DiscreteVP (``steps_offset``
  shifts "leading"), each giving ``steps`` integer-or-fractional model times followed by the final point.

A RectifiedFlow schedule's ``shift`` warps the times of every spacing.
"""

from __future__ import annotations

import numpy as np

from .schedules import DiscreteVP, RectifiedFlow, Schedule

SPACINGS = ("uniform", "logsnr", "karras", "exponential", "quadratic", "leading", "trailing", "linspace")
FINALS = ("zero", "t_min")
_DISCRETE_SPACINGS = ("leading", "trailing", "linspace")


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_final(final):
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}, got {final!r}")


def _sigma_ratio(schedule, t):
    return np.exp(-np.asarray(schedule.lambda_(t), dtype=np.float64))


def timesteps(schedule: Schedule, steps: int, spacing: str | None = None, *, final: str = "zero",
              rho: float = 7.0, steps_offset: int = 0) -> np.ndarray:
    """Descending step boundaries (float64, length ``steps + 1``) in the schedule's time unit.

    Parameters
    ----------
    schedule : Schedule
    steps : int
        Number of solver steps (>= 1).
    spacing : str, optional
        One of ``SPACINGS``; defaults to ``schedule.default_spacing``.
    final : {"zero", "t_min"}
        Where the last step ends (see the module docstring).
    rho : float
        Karras spacing exponent.
    steps_offset : int
        diffusers' ``steps_offset`` for the "leading" spacing.
    """
    steps = _check_steps(steps)
    _check_final(final)
    spacing = schedule.default_spacing if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    t_max, t_min = float(schedule.t_max), float(schedule.t_min)

    if spacing in _DISCRETE_SPACINGS:
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"spacing {spacing!r} is diffusers' discrete spacing and needs a DiscreteVP schedule; "
                             "use 'uniform', 'logsnr' or 'karras' for continuous schedules")
        calls = _discrete_spacing(schedule.num_train_timesteps, steps, spacing, steps_offset)
        end = schedule.t_zero if final == "zero" else t_min
        return np.append(calls, end)

    n = steps if final == "zero" else steps + 1
    u = np.linspace(0.0, 1.0, n)  # 0 at t_max, 1 at t_min
    if spacing == "uniform":
        t = t_max + (t_min - t_max) * u
    elif spacing == "quadratic":
        t = t_min + (t_max - t_min) * (1.0 - u) ** 2
    elif spacing in ("logsnr", "exponential"):
        lam = schedule.lambda_(t_max) + (schedule.lambda_(t_min) - schedule.lambda_(t_max)) * u
        if not np.all(np.isfinite(lam)):
            raise ValueError(f"{spacing!r} spacing needs a finite log-SNR on [t_min, t_max]; {schedule!r} has "
                             "alpha = 0 at t_max: use 'uniform' or lower t_max")
        t = schedule.t_from_lambda(lam)
    else:  # karras, in k-diffusion's sigma = sigma / alpha
        s_max, s_min = _sigma_ratio(schedule, t_max), _sigma_ratio(schedule, t_min)
        if not np.isfinite(s_max):
            raise ValueError(f"'karras' spacing needs a finite sigma/alpha at t_max; {schedule!r} has alpha = 0 "
                             "there: use 'uniform' or lower t_max")
        s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = schedule.t_from_sigma_ratio(s)
    t = np.array(t, dtype=np.float64)
    t[0], t[-1] = t_max, (t_min if n > 1 else t_max)  # exact ends, no rounding or round trip through lambda
    if isinstance(schedule, RectifiedFlow):
        t = schedule.warp(t)
    t = np.asarray(t, dtype=np.float64)
    return np.append(t, schedule.t_zero) if final == "zero" else t


def _discrete_spacing(num_train: int, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """diffusers' ``timestep_spacing`` options (Lin et al. 2023, Table 2), ``steps`` model times."""
    if steps > num_train:
        raise ValueError(f"steps={steps} exceeds the schedule's num_train_timesteps={num_train}")
    if spacing == "linspace":
        return np.linspace(0.0, num_train - 1.0, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
    ratio = num_train / steps  # trailing
    return np.round(np.arange(num_train, 0, -ratio)).astype(np.float64) - 1.0


def custom_times(schedule: Schedule, *, timesteps=None, sigmas=None, boundaries=None,
                 final: str = "zero") -> np.ndarray:
    """Boundaries from a user's sequence.

    ``timesteps``: descending model-call times in the schedule's unit; the final point is appended per ``final``.
    ``sigmas``: descending k-diffusion sigmas (sigma / alpha) including the end, as k-diffusion samplers take them;
    a last value of 0 is the clean point.
    ``boundaries``: the step boundaries themselves (descending times including the end; ``schedule.t_zero`` is the
    clean point), e.g. one step between two arbitrary DiscreteVP timesteps.
    """
    _check_final(final)
    if sum(v is not None for v in (timesteps, sigmas, boundaries)) != 1:
        raise ValueError("give exactly one of timesteps=, sigmas= and boundaries=")
    if boundaries is not None:
        seq = np.asarray(boundaries, dtype=np.float64)
        if seq.ndim != 1 or seq.size < 2 or not np.all(np.isfinite(seq)) or np.any(np.diff(seq) >= 0):
            raise ValueError(f"boundaries= must be a strictly decreasing finite sequence of at least 2 times, "
                             f"got {seq.tolist()}")
        lo = schedule.t_zero if seq[-1] == schedule.t_zero else float(schedule.t_min)
        if seq[-1] < lo or seq[0] > float(schedule.t_max) or np.any(seq[:-1] < float(schedule.t_min)):
            raise ValueError(f"boundaries= must lie in [{schedule.t_min}, {schedule.t_max}] (the last may be the clean "
                             f"point {schedule.t_zero}), got {seq.tolist()}")
        return seq
    name = "timesteps" if timesteps is not None else "sigmas"
    seq = np.asarray(timesteps if timesteps is not None else sigmas, dtype=np.float64)
    if seq.ndim != 1 or seq.size < (1 if timesteps is not None else 2):
        raise ValueError(f"{name}= must be a 1-D sequence (sigmas= needs at least 2 values: start and end)")
    if not np.all(np.isfinite(seq)):
        raise ValueError(f"{name}= contains NaN or Inf: {seq.tolist()}")
    if np.any(np.diff(seq) >= 0):
        raise ValueError(f"{name}= must be strictly decreasing (from noise to data), got {seq.tolist()}")
    if sigmas is not None:
        if seq[-1] < 0:
            raise ValueError("sigmas= must be >= 0")
        return np.asarray(schedule.t_from_sigma_ratio(seq), dtype=np.float64)
    end = schedule.t_zero if final == "zero" else float(schedule.t_min)
    if seq[-1] <= end:
        raise ValueError(f"timesteps= must stay above the final point {end} (final={final!r}); got {seq.tolist()}")
    return np.append(seq, end)
