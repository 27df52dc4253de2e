"""Step spacings: where on a schedule the sampler stops.

``timesteps(schedule, steps, spacing)`` returns the ``steps + 1`` step boundaries, descending, in the schedule's
own time unit.  The first ``steps`` are where the model is called by one-stage solvers; the last is where sampling
ends: ``final="zero"`` ends on the clean point (alpha = 1, sigma = 0, time label ``schedule.t_zero``), as EDM,
k-diffusion, ComfyUI and diffusers' ``final_sigmas_type="zero"`` do; ``final="t_min"`` ends on the schedule's
smallest time.

"sigma" below is k-diffusion's noise level sigma / alpha (= sigma on VE / EDM); a spacing written in sigma is
mapped to the schedule's times with ``schedule.t_from_sigma_ratio``, so it means the same noise levels on every
schedule.  s_max and s_min are the sigmas at ``t_max`` and ``t_min``.

Spacings that place points on ``[t_min, t_max]`` including both ends (with ``final="zero"``: ``steps`` points, then
the clean point, as EDM eq. 5 and k-diffusion's ``get_sigmas_*``; with ``final="t_min"``: ``steps + 1`` points):

- ``"uniform"`` (alias ``"normal"``, ComfyUI's name): uniform in t;
- ``"quadratic"``: t_min + (t_max - t_min) u^2 on uniform u (DDIM's "quad");
- ``"logsnr"``: uniform in lambda = log(alpha / sigma) (DPM-Solver's "logSNR");
- ``"exponential"``: uniform in log sigma (k-diffusion's ``get_sigmas_exponential``; the same as "logsnr");
- ``"karras"``: Karras et al. 2022 eq. 5 in sigma, option ``rho`` (default 7);
- ``"polyexponential"``: log sigma = log s_min + r^rho (log s_max - log s_min), r from 1 to 0 (k-diffusion's
  ``get_sigmas_polyexponential``), option ``rho`` (default 1, where it is "exponential");
- ``"kl_optimal"``: sigma = tan(u atan(s_min) + (1 - u) atan(s_max)), u from 0 to 1 (the KL-optimal schedule
  of Sabour et al. 2024, "Align Your Steps", ComfyUI's ``kl_optimal``);
- ``"laplace"``: log sigma = mu - beta sign(1/2 - u) log(1 - 2 |1/2 - u| + 1e-5), clamped to [s_min, s_max]
  (Tiankai et al. 2024; ComfyUI's ``laplace``), options ``laplace_mu`` (0) and ``laplace_beta`` (0.5).  Its ends
  are where the clamp puts them, not necessarily t_max and t_min.

Spacings that place ``steps + 1`` points from ``t_max`` to ``t_min`` (ComfyUI's model-time schedulers); with
``final="zero"`` the last point (t_min) is replaced by the clean point:

- ``"sgm_uniform"``: uniform in t (ComfyUI's ``sgm_uniform``);
- ``"simple"``: ComfyUI's ``simple``: on a DiscreteVP the training timesteps N - 1 - floor(i N / steps); on
  continuous schedules (no training table) the same as "sgm_uniform";
- ``"beta"``: t = t_min + (t_max - t_min) F^-1(1 - i / steps) with F the Beta(a, b) distribution function (Lee et
  al. 2024, ComfyUI's ``beta``), options ``beta_dist_alpha`` (a = 0.6) and ``beta_dist_beta`` (b = 0.6).  ComfyUI
  rounds these times to integer timesteps and drops repeats; fastdiff keeps them (a DiscreteVP interpolates
  between timesteps), so there are always ``steps`` steps;
- ``"linear_quadratic"``: Movie Gen's / Mochi's linear-then-quadratic schedule (ComfyUI's ``linear_quadratic``):
  fractions x_i rise linearly from 0 to ``threshold_noise`` (0.025) over ``linear_steps`` (steps // 2) steps,
  then quadratically to 1, and t = t_min + (t_max - t_min)(1 - x_i).  (ComfyUI scales its model's sigma by
  1 - x_i; on flow models, the ones it is made for, that sigma is t.)
- ``"ays"``: Align Your Steps (Sabour et al. 2024): the published 10-step sigma tables for option ``ays_model``
  ("sd15", "sdxl", "svd"), log-linearly interpolated to ``steps + 1`` points as NVIDIA's ``loglinear_interp``;
- ``"gits"``: GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling") sigma
  tables for Stable Diffusion with ComfyUI's default coefficient 1.20 (2 to 20 steps; other step counts
  interpolate the 20-step table log-linearly).

The "ays" and "gits" tables are absolute noise levels of particular models: the schedule must cover them (an
"svd" table needs sigma up to 700, e.g. ``EDM(sigma_max=700)``).

diffusers' discrete spacings on DiscreteVP, each giving ``steps`` model times followed by the final point:
``"leading"`` (option ``steps_offset``), ``"trailing"``, ``"linspace"``, and ComfyUI's ``"ddim_uniform"``
(timesteps 1 + k (N // steps), k < steps; ComfyUI adds one more step when N // steps leaves room for it).

A RectifiedFlow schedule's ``shift`` warps the times of every spacing except the "ays" / "gits" tables (absolute
noise levels, like a custom ``sigmas=``).
"""

from __future__ import annotations

import math

import numpy as np

from ._names import unknown_name
from .schedules import DiscreteVP, RectifiedFlow, Schedule

SPACINGS = ("uniform", "logsnr", "karras", "exponential", "quadratic", "leading", "trailing", "linspace",
            "normal", "sgm_uniform", "simple", "ddim_uniform", "beta", "kl_optimal", "linear_quadratic",
            "polyexponential", "laplace", "ays", "gits")
FINALS = ("zero", "t_min")
# the keyword options of timesteps(); plan() passes these names from its options to timesteps()
SPACING_OPTIONS = ("rho", "steps_offset", "beta_dist_alpha", "beta_dist_beta", "laplace_mu", "laplace_beta",
                   "threshold_noise", "linear_steps", "ays_model")
AYS_MODELS = ("sd15", "sdxl", "svd")
MAX_STEPS = 100_000  # longest grid accepted, named or custom: a guard against runaway sizes

_DISCRETE_SPACINGS = ("leading", "trailing", "linspace", "ddim_uniform")
_ALIASES = {"normal": "uniform"}
# spacings with steps + 1 points from t_max to t_min whose last is replaced by the clean point for final="zero"
_DROP_LAST = ("sgm_uniform", "simple", "beta", "linear_quadratic", "ays", "gits")

# Align Your Steps, Sabour, Fidler and Kreis 2024 (arXiv:2404.14507): the 10-step sigma schedules NVIDIA published
# for Stable Diffusion 1.5, SDXL and Stable Video Diffusion.
_AYS_SIGMAS = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

# GITS, Chen et al. 2024 (arXiv:2405.11326): Stable Diffusion sigma schedules for 2..20 steps with coefficient
# 1.20 (the authors' tables as ComfyUI ships them; row k has k + 2 steps).
_GITS_SIGMAS_120 = (
    (14.61464119, 0.803307, 0.02916753),
    (14.61464119, 1.56271636, 0.52423614, 0.02916753),
    (14.61464119, 2.36326075, 0.92192322, 0.36617002, 0.02916753),
    (14.61464119, 2.84484982, 1.24153244, 0.59516323, 0.25053367, 0.02916753),
    (14.61464119, 5.85520077, 2.05039096, 0.95350921, 0.45573691, 0.17026083, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.24153244, 0.64427125, 0.29807833, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.36964464, 0.803307, 0.45573691, 0.25053367, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.61558151, 0.95350921, 0.59516323, 0.36617002, 0.19894916, 0.09824532,
     0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823, 0.19894916,
     0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.95596409, 1.84880662, 1.24153244, 0.83188516, 0.59516323, 0.41087446, 0.27464288,
     0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 3.07277966, 1.98035145, 1.36964464, 0.95350921, 0.69515091, 0.50118381, 0.36617002,
     0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.36326075, 1.56271636, 1.08895338, 0.803307, 0.59516323, 0.45573691,
     0.34370604, 0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.45070267, 1.61558151, 1.162866, 0.86115354, 0.64427125, 0.50118381,
     0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.32104823, 0.25053367, 0.19894916, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.34370604, 0.27464288, 0.22545385, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.20157266, 0.92192322, 0.72133851,
     0.57119018, 0.45573691, 0.36617002, 0.29807833, 0.25053367, 0.19894916, 0.17026083, 0.13792117, 0.09824532,
     0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.4783645, 0.38853383, 0.32104823, 0.27464288, 0.22545385, 0.19894916, 0.17026083, 0.13792117,
     0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.50118381, 0.41087446, 0.34370604, 0.29807833, 0.25053367, 0.22545385, 0.19894916, 0.17026083,
     0.13792117, 0.09824532, 0.02916753),
)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------------------------


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer >= 1 (at most {MAX_STEPS}), got {steps!r}")
    return int(steps)


def _check_final(final):
    if final not in FINALS:
        raise unknown_name("final", final, FINALS)


def _option_real(name, value, lo=None):
    """A finite float option; with ``lo``: > lo."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"spacing option {name}={value!r} must be a finite number")
    if lo is not None and value <= lo:
        raise ValueError(f"spacing option {name}={value!r} must be > {lo}")
    return float(value)


def _option_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"spacing option {name}={value!r} must be an integer {rng}")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------
# Named spacings
# ---------------------------------------------------------------------------------------------------------------


def timesteps(schedule: Schedule, steps: int, spacing: str | None = None, *, final: str = "zero",
              rho: float | None = None, steps_offset: int = 0, beta_dist_alpha: float = 0.6,
              beta_dist_beta: float = 0.6, laplace_mu: float = 0.0, laplace_beta: float = 0.5,
              threshold_noise: float = 0.025, linear_steps: int | None = None,
              ays_model: str = "sd15") -> np.ndarray:
    """Descending step boundaries (float64, shape ``[steps + 1]``) in the schedule's time unit.

    Parameters
    ----------
    schedule : Schedule
    steps : int
        Number of solver steps, in [1, ``MAX_STEPS``].
    spacing : str, optional
        One of ``SPACINGS`` (see the module docstring); defaults to ``schedule.default_spacing``.
    final : {"zero", "t_min"}
        Where the last step ends (see the module docstring).
    rho : float, optional
        Exponent of "karras" (default 7) and "polyexponential" (default 1); > 0.
    steps_offset : int
        diffusers' ``steps_offset`` for "leading", >= 0.
    beta_dist_alpha, beta_dist_beta : float
        The Beta distribution's parameters for "beta", > 0.
    laplace_mu, laplace_beta : float
        Location and scale (> 0) in log sigma for "laplace".
    threshold_noise : float
        Where the linear part of "linear_quadratic" ends, in (0, 1).
    linear_steps : int, optional
        Steps in the linear part of "linear_quadratic", in [1, steps - 1]; ``steps // 2`` when omitted.
    ays_model : {"sd15", "sdxl", "svd"}
        Which Align Your Steps table "ays" uses.

    Options that the chosen spacing does not read are checked but have no effect.
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a fastdiff.schedules.Schedule, got {type(schedule).__name__}")
    steps = _check_steps(steps)
    _check_final(final)
    spacing = schedule.default_spacing if spacing is None else spacing
    if not isinstance(spacing, str) or spacing not in SPACINGS:
        raise unknown_name("spacing", spacing, SPACINGS)
    spacing = _ALIASES.get(spacing, spacing)
    if rho is not None:
        _option_real("rho", rho, 0.0)
    steps_offset = _option_int("steps_offset", steps_offset, 0)
    beta_dist_alpha = _option_real("beta_dist_alpha", beta_dist_alpha, 0.0)
    beta_dist_beta = _option_real("beta_dist_beta", beta_dist_beta, 0.0)
    laplace_mu = _option_real("laplace_mu", laplace_mu)
    laplace_beta = _option_real("laplace_beta", laplace_beta, 0.0)
    threshold_noise = _option_real("threshold_noise", threshold_noise, 0.0)
    if threshold_noise >= 1.0:
        raise ValueError(f"spacing option threshold_noise={threshold_noise!r} must be in (0, 1)")
    if linear_steps is not None:
        linear_steps = _option_int("linear_steps", linear_steps, 1, max(1, steps - 1))
    if not isinstance(ays_model, str) or ays_model not in AYS_MODELS:
        raise unknown_name("ays_model", ays_model, AYS_MODELS)

    if spacing in _DISCRETE_SPACINGS or (spacing == "simple" and isinstance(schedule, DiscreteVP)):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"spacing {spacing!r} places integer training timesteps and needs a DiscreteVP "
                             f"schedule, not {schedule!r}; use 'uniform', 'sgm_uniform', 'logsnr' or 'karras'")
        calls = _discrete_spacing(schedule.num_train_timesteps, steps, spacing, steps_offset)
        return np.append(calls, schedule.t_zero if final == "zero" else float(schedule.t_min))

    if spacing in _DROP_LAST:
        n = steps + 1
    else:
        n = steps if final == "zero" else steps + 1
    t = _continuous_spacing(schedule, spacing, n, steps, rho=rho, beta_dist=(beta_dist_alpha, beta_dist_beta),
                            laplace=(laplace_mu, laplace_beta), threshold_noise=threshold_noise,
                            linear_steps=linear_steps, ays_model=ays_model, final=final)
    t = np.clip(np.asarray(t, dtype=np.float64), float(schedule.t_min), float(schedule.t_max))
    if isinstance(schedule, RectifiedFlow) and spacing not in ("ays", "gits"):
        t = np.asarray(schedule.warp(t), dtype=np.float64)
    if spacing in _DROP_LAST and final == "zero":
        t = t[:-1]
    if np.any(np.diff(t) >= 0):
        raise ValueError(f"spacing {spacing!r} gives repeated times for steps={steps} on {schedule!r} (a step of "
                         f"length zero): {t.tolist()}; use fewer steps or other spacing options")
    return np.append(t, schedule.t_zero) if final == "zero" else t


def _sigma(schedule, t):
    """k-diffusion's sigma = sigma / alpha at time ``t``."""
    return float(np.exp(-schedule.lambda_(t)))


def _finite_sigma_range(schedule, spacing):
    s_max, s_min = _sigma(schedule, schedule.t_max), _sigma(schedule, schedule.t_min)
    if not np.isfinite(s_max):
        raise ValueError(f"{spacing!r} spacing needs a finite sigma/alpha at t_max; {schedule!r} has alpha = 0 "
                         "there: use 'uniform', 'kl_optimal' or lower t_max")
    if not s_min > 0:
        raise ValueError(f"{spacing!r} spacing needs sigma > 0 at t_min; {schedule!r} has sigma = 0 there")
    return s_min, s_max


def _continuous_spacing(schedule, spacing, n, steps, *, rho, beta_dist, laplace, threshold_noise, linear_steps,
                        ays_model, final):
    """``n`` descending times on [t_min, t_max] (before any flow shift)."""
    t_max, t_min = float(schedule.t_max), float(schedule.t_min)
    u = np.linspace(0.0, 1.0, n)  # 0 at t_max, 1 at t_min
    exact_ends = True  # formulas that hit t_max and t_min exactly get them without a round trip through sigma
    if spacing in ("uniform", "sgm_uniform", "simple"):
        t = t_max + (t_min - t_max) * u
    elif spacing == "quadratic":
        t = t_min + (t_max - t_min) * (1.0 - u) ** 2
    elif spacing == "beta":
        t = t_min + (t_max - t_min) * beta_ppf(1.0 - u, *beta_dist)
    elif spacing == "linear_quadratic":
        t = t_min + (t_max - t_min) * (1.0 - _linear_quadratic_fractions(steps, threshold_noise, linear_steps))
    elif spacing in ("logsnr", "exponential"):
        lam_max, lam_min = schedule.lambda_(t_max), schedule.lambda_(t_min)
        if not (np.isfinite(lam_max) and np.isfinite(lam_min)):
            raise ValueError(f"{spacing!r} spacing needs a finite log-SNR on [t_min, t_max]; {schedule!r} has "
                             "alpha = 0 or sigma = 0 at an end: use 'uniform' or lower t_max")
        t = schedule.t_from_lambda(lam_max + (lam_min - lam_max) * u)
    elif spacing == "karras":
        s_min, s_max = _finite_sigma_range(schedule, spacing)
        r = 7.0 if rho is None else rho
        t = schedule.t_from_sigma_ratio((s_max ** (1 / r) + u * (s_min ** (1 / r) - s_max ** (1 / r))) ** r)
    elif spacing == "polyexponential":
        s_min, s_max = _finite_sigma_range(schedule, spacing)
        r = 1.0 if rho is None else rho
        t = schedule.t_from_sigma_ratio(np.exp(math.log(s_min) + (1.0 - u) ** r * math.log(s_max / s_min)))
    elif spacing == "kl_optimal":  # s_max may be inf (zero terminal SNR, flows at t = 1): atan(inf) = pi / 2
        s_max, s_min = _sigma(schedule, t_max), _sigma(schedule, t_min)
        t = schedule.t_from_sigma_ratio(np.tan(u * math.atan(s_min) + (1.0 - u) * math.atan(s_max)))
    elif spacing == "laplace":
        mu, beta = laplace
        s_max, s_min = _sigma(schedule, t_max), _sigma(schedule, t_min)
        log_s = mu - beta * np.sign(0.5 - u) * np.log(1.0 - 2.0 * np.abs(0.5 - u) + 1e-5)
        t = schedule.t_from_sigma_ratio(np.clip(np.exp(log_s), s_min, s_max))
        exact_ends = False
    else:  # "ays", "gits": published sigma tables
        t = schedule.t_from_sigma_ratio(_table_sigmas(schedule, spacing, steps, ays_model, final))
        exact_ends = False
    t = np.array(t, dtype=np.float64)
    if exact_ends:
        t[0], t[-1] = t_max, (t_min if n > 1 else t_max)
    return t


def _linear_quadratic_fractions(steps, threshold_noise, linear_steps):
    """Movie Gen / Mochi: ``steps + 1`` increasing fractions from 0 to 1, linear up to ``threshold_noise`` over
    ``linear_steps`` steps, then the quadratic through that point that reaches 1 at ``steps``."""
    if steps == 1:
        return np.array([0.0, 1.0])
    k = steps // 2 if linear_steps is None else linear_steps
    i = np.arange(steps + 1, dtype=np.float64)
    q = steps - k
    excess = k - threshold_noise * steps
    quad = excess / (k * q**2)
    lin = threshold_noise / k - 2.0 * excess / q**2
    x = np.where(i < k, i * threshold_noise / k, quad * i**2 + lin * i + quad * k**2)
    x[-1] = 1.0
    return x


def _loglinear_interp(sigmas, n):
    """``n`` values interpolating the descending ``sigmas`` linearly in log sigma over an even grid (Align Your
    Steps' ``loglinear_interp``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if n == sigmas.size:
        return sigmas.copy()
    xs = np.linspace(0.0, 1.0, sigmas.size)
    return np.exp(np.interp(np.linspace(0.0, 1.0, n), xs, np.log(sigmas[::-1])))[::-1].copy()


def _table_sigmas(schedule, spacing, steps, ays_model, final):
    if spacing == "ays":
        table, label = _AYS_SIGMAS[ays_model], f"ays_model={ays_model!r}"
    else:
        table = _GITS_SIGMAS_120[steps - 2] if 2 <= steps <= len(_GITS_SIGMAS_120) + 1 else _GITS_SIGMAS_120[-1]
        label = "'gits'"
    sig = _loglinear_interp(table, steps + 1)
    used = sig[:-1] if final == "zero" else sig
    s_max, s_min = _sigma(schedule, schedule.t_max), _sigma(schedule, schedule.t_min)
    tol = 1e-6
    if used.max() > s_max * (1 + tol) or used.min() < s_min * (1 - tol):
        raise ValueError(f"{label} noise levels span sigma in [{used.min():g}, {used.max():g}] but {schedule!r} "
                         f"covers [{s_min:g}, {s_max:g}]: use a schedule that covers them (the SD tables fit "
                         "DiscreteVP.scaled_linear(), 'svd' fits EDM(sigma_max=700))")
    return np.clip(sig, s_min, s_max)


def _discrete_spacing(num_train: int, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """``steps`` integer model times on a DiscreteVP's [0, N - 1]: diffusers' ``timestep_spacing`` options (Lin et
    al. 2023, Table 2) and ComfyUI's "simple" and "ddim_uniform"."""
    if steps > num_train:
        raise ValueError(f"steps={steps} exceeds the schedule's num_train_timesteps={num_train}")
    if spacing == "linspace":
        return np.linspace(0.0, num_train - 1.0, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        calls = (np.arange(steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
        if calls[0] > num_train - 1:
            raise ValueError(f"steps_offset={steps_offset} moves the first 'leading' timestep to {calls[0]:g}, "
                             f"beyond the schedule's last timestep {num_train - 1}: use steps_offset <= "
                             f"{num_train - 1 - (steps - 1) * ratio}")
        return calls
    if spacing == "simple":  # ComfyUI: sigmas[-(1 + int(i * N / steps))] of the N training sigmas
        return (num_train - 1.0) - np.floor(np.arange(steps) * (num_train / steps))
    if spacing == "ddim_uniform":  # ComfyUI: timesteps 1, 1 + N // steps, ... below N
        if steps > num_train - 1:
            raise ValueError(f"'ddim_uniform' needs steps <= num_train_timesteps - 1 = {num_train - 1}, got {steps}")
        return (1.0 + (num_train // steps) * np.arange(steps))[::-1].copy()
    ratio = num_train / steps  # trailing
    return np.round(np.arange(num_train, 0, -ratio)).astype(np.float64) - 1.0


# ---------------------------------------------------------------------------------------------------------------
# The Beta distribution's quantile function (for the "beta" spacing; no scipy at run time)
# ---------------------------------------------------------------------------------------------------------------


def _betainc_cf(a, b, x):
    """Continued fraction of the regularized incomplete beta function (modified Lentz), converging fast for
    x < (a + 1) / (a + b + 2); elementwise on the array ``x``."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            d = 1.0 / d
            delta = d * c
            h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def beta_cdf(x, a: float, b: float) -> np.ndarray:
    """Regularized incomplete beta function I_x(a, b): the Beta(a, b) distribution function, float64."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    out = np.zeros_like(x)
    inner = (x > 0) & (x < 1)
    xi = x[inner]
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) + a * np.log(xi) + b * np.log1p(-xi)
    direct = xi < (a + 1.0) / (a + b + 2.0)
    xd = np.where(direct, xi, 1.0 - xi)  # I_x(a, b) = 1 - I_{1-x}(b, a) on the far side
    cf_direct = _betainc_cf(a, b, np.where(direct, xd, 0.0))
    cf_mirror = _betainc_cf(b, a, np.where(direct, 0.0, xd))
    front = np.exp(log_front)
    out[inner] = np.where(direct, front * cf_direct / a, 1.0 - front * cf_mirror / b)
    out[x >= 1] = 1.0
    return out


def beta_ppf(p, a: float, b: float) -> np.ndarray:
    """Quantile function of Beta(a, b) (the inverse of ``beta_cdf`` in x), float64; p in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    out = np.where(p >= 1, 1.0, 0.0)
    lower = (p > 0) & (p <= 0.5)
    upper = (p > 0.5) & (p < 1)
    out[lower] = _beta_lower_quantile(p[lower], a, b)
    out[upper] = 1.0 - _beta_lower_quantile(1.0 - p[upper], b, a)  # X ~ Beta(a, b) <=> 1 - X ~ Beta(b, a)
    return out


def _beta_lower_quantile(q, a, b):
    """Beta(a, b) quantiles for q in (0, 1/2]: Newton's method on the distribution function from its power law
    near 0, I_x ~ x^a / (a B(a, b)), kept inside a bisection bracket."""
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi = np.zeros_like(q), np.ones_like(q)
    with np.errstate(under="ignore"):
        x = np.clip(np.exp((np.log(q) + math.log(a) + log_norm) / a), 1e-300, 0.5)
    for _ in range(200):
        f = beta_cdf(x, a, b) - q
        lo, hi = np.where(f < 0, x, lo), np.where(f < 0, hi, x)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            density = np.exp((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_norm)
            step = x - f / density
        step = np.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        done = np.abs(step - x) <= 4e-16 * x
        x = step
        if np.all(done):
            break
    return x


# ---------------------------------------------------------------------------------------------------------------
# Custom grids
# ---------------------------------------------------------------------------------------------------------------


def _custom_sequence(name, values, min_len):
    try:
        seq = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}= must be a sequence of numbers, got {values!r}") from None
    if seq.ndim != 1 or not min_len <= seq.size <= MAX_STEPS + 1:
        raise ValueError(f"{name}= must be a 1-D sequence of {min_len} to {MAX_STEPS + 1} values, got shape "
                         f"{seq.shape}")
    if not np.all(np.isfinite(seq)):
        raise ValueError(f"{name}= contains NaN or inf at index {int(np.flatnonzero(~np.isfinite(seq))[0])}: "
                         f"{_brief(seq)}")
    if np.any(np.diff(seq) >= 0):
        i = int(np.flatnonzero(np.diff(seq) >= 0)[0])
        raise ValueError(f"{name}= must be strictly decreasing (from noise to data), but entry {i + 1} "
                         f"({float(seq[i + 1])!r}) is not below entry {i} ({float(seq[i])!r})")
    return seq


def _brief(seq, k=8):
    """A sequence for an error message, shortened past ``2 k`` entries."""
    if seq.size <= 2 * k:
        return str(seq.tolist())
    return f"[{', '.join(map(str, seq[:k].tolist()))}, ..., {', '.join(map(str, seq[-k:].tolist()))}]"


def custom_times(schedule: Schedule, *, timesteps=None, sigmas=None, boundaries=None,
                 final: str = "zero") -> np.ndarray:
    """Boundaries from a user's sequence (each at most ``MAX_STEPS + 1`` values, strictly decreasing, finite).

    ``timesteps``: model-call times in [t_min, t_max] of the schedule's unit; the final point is appended per
    ``final``.
    ``sigmas``: k-diffusion sigmas (sigma / alpha) including the end, as k-diffusion samplers take them; a last
    value of 0 is the clean point.  (A DiscreteVP clamps sigmas beyond its table to the table's ends.)
    ``boundaries``: the step boundaries themselves (times including the end; ``schedule.t_zero`` is the clean
    point), e.g. one step between two arbitrary DiscreteVP timesteps.
    """
    _check_final(final)
    if sum(v is not None for v in (timesteps, sigmas, boundaries)) != 1:
        raise ValueError("give exactly one of timesteps=, sigmas= and boundaries=")
    t_min, t_max = float(schedule.t_min), float(schedule.t_max)
    if boundaries is not None:
        seq = _custom_sequence("boundaries", boundaries, 2)
        inner = seq[:-1] if seq[-1] == schedule.t_zero else seq
        if inner[0] > t_max or inner[-1] < t_min:
            raise ValueError(f"boundaries= must lie in [{t_min}, {t_max}] (the last may be the clean point "
                             f"{schedule.t_zero}), got {_brief(seq)}")
        return seq
    if sigmas is not None:
        seq = _custom_sequence("sigmas", sigmas, 2)
        if seq[-1] < 0:
            raise ValueError(f"sigmas= must be >= 0, got last value {float(seq[-1])!r}")
        return np.asarray(schedule.t_from_sigma_ratio(seq), dtype=np.float64)
    seq = _custom_sequence("timesteps", timesteps, 1)
    if seq[0] > t_max or seq[-1] < t_min:
        raise ValueError(f"timesteps= must lie in the schedule's [t_min, t_max] = [{t_min}, {t_max}], got "
                         f"{_brief(seq)}")
    end = schedule.t_zero if final == "zero" else t_min
    if seq[-1] <= end:
        raise ValueError(f"timesteps= must stay above the final point {end} (final={final!r}); got {_brief(seq)}")
    return np.append(seq, end)
