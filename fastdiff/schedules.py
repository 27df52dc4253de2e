"""Noise schedules: the Gaussian perturbation ``x_t = alpha(t) * x0 + sigma(t) * n``.

Every schedule is an immutable, hashable object in its own time unit ``t`` (the unit the model is called
with, see docs/architecture.md): DiscreteVP the timestep index in [0, N-1], ContinuousVP / SubVP / VE /
RectifiedFlow t in (0, 1], EDM t = sigma.  Each gives, in float64 numpy:

- ``alpha(t)``, ``sigma(t)``: the perturbation coefficients;
- ``lambda_(t) = log(alpha / sigma)``: half the log-SNR, +inf at the clean point, -inf where alpha = 0;
- ``t_from_lambda(l)``: the inverse of ``lambda_`` (schedules are monotone in t);
- ``dalpha(t)``, ``dsigma(t)``: d/dt, for the SDE and flow solvers;
- ``model_time(t)`` and ``model_time_rate`` (d model_time / dt): the time the network is called with;
- ``t_min``, ``t_max``: the sampling interval; ``t_zero``: the time label of the clean point
  (alpha = 1, sigma = 0) that plans with ``final="zero"`` end on;
- ``init_scale``: the std of the prior noise, ``sigma(t_max)`` for VE / EDM (k-diffusion's convention) and 1.0
  for VP-type and flow schedules (diffusers' convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._names import unknown_name

__all__ = ["Schedule", "DiscreteVP", "ContinuousVP", "SubVP", "VE", "EDM", "RectifiedFlow", "flux_shift"]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")


def _f64(t):
    return np.asarray(t, dtype=np.float64)


def _out(x, like):
    """Return a Python float for scalar input, an array otherwise."""
    return float(x) if np.ndim(like) == 0 else x


def _log_ratio(alpha, sigma):
    """log(alpha / sigma) with the limits +inf (sigma = 0) and -inf (alpha = 0), no warnings."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def _real(owner: str, name: str, value) -> float:
    """``value`` as a float; a ValueError naming ``owner(name=...)`` for non-numbers, NaN and inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be finite")
    return value


def _check_range(owner: str, name: str, value, lo=None, hi=None, lo_open=True, hi_open=False) -> float:
    """Check ``lo < value <= hi`` (bounds open / closed as asked); the error names the parameter and the range."""
    v = _real(owner, name, value)
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{owner}({name}={value!r}): {name} must be in {rng}")
    return v


def _check_interval(owner: str, lo_name: str, lo, hi_name: str, hi):
    if not lo < hi:
        raise ValueError(f"{owner}({lo_name}={lo!r}, {hi_name}={hi!r}): {lo_name} must be smaller than {hi_name}")


def _check_flag(owner: str, name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be True or False")


class Schedule:
    """Base class; subclasses define ``_alpha``, ``_sigma``, ``_dalpha``, ``_dsigma``, ``_t_from_lambda``."""

    kind = "vp"  # "vp" | "ve" | "flow": selects the prior scale and which solvers make sense
    default_spacing = "uniform"
    t_zero = 0.0
    model_time_rate = 1.0

    # -- public API ------------------------------------------------------------------------------------------
    def alpha(self, t):
        return _out(self._alpha(_f64(t)), t)

    def sigma(self, t):
        return _out(self._sigma(_f64(t)), t)

    def lambda_(self, t):
        t = _f64(t)
        return _out(_log_ratio(self._alpha(t), self._sigma(t)), t)

    def t_from_lambda(self, lam):
        return _out(self._t_from_lambda(_f64(lam)), lam)

    def dalpha(self, t):
        return _out(self._dalpha(_f64(t)), t)

    def dsigma(self, t):
        return _out(self._dsigma(_f64(t)), t)

    def model_time(self, t):
        return t

    def t_from_model_time(self, tau):
        """Inverse of ``model_time``."""
        return tau

    @property
    def init_scale(self) -> float:
        return float(self.sigma(self.t_max)) if self.kind == "ve" else 1.0

    def t_from_sigma_ratio(self, s):
        """Time at which sigma/alpha (k-diffusion's sigma) equals ``s``; s = 0 maps to ``t_zero``."""
        s = _f64(s)
        with np.errstate(divide="ignore"):
            t = self._t_from_lambda(-np.log(s))
        return _out(np.where(s == 0, self.t_zero, t), s)

    def __repr__(self):  # dataclass repr of DiscreteVP would print 1000 betas
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self):
        return ""


# ---------------------------------------------------------------------------------------------------------------
# Discrete-time VP (DDPM / Stable Diffusion)
# ---------------------------------------------------------------------------------------------------------------


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretize alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (Nichol & Dhariwal 2021, eq. 17)."""

    def alpha_bar(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has SNR 0, first unchanged."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True, repr=False)
class DiscreteVP(Schedule):
    """DDPM's discrete variance-preserving schedule, ``alpha_bar_k = prod_{i<=k} (1 - beta_i)``, k in [0, N-1].

    Between integer timesteps log(sigma/alpha) is interpolated linearly in t (as k-diffusion's DiscreteSchedule
    and diffusers' ``_sigma_to_t``), so fractional model times from Karras or logSNR spacings are well defined.
    ``t = -1`` is the clean point (alpha_bar = 1, diffusers' ``set_alpha_to_one``). Times beyond [0, N-1] that a
    custom sigma sequence asks for are clamped to the table's ends, as diffusers does.

    Parameters
    ----------
    betas : sequence of float, optional
        Explicit betas (length N); overrides ``beta_schedule``.
    beta_schedule : {"linear", "scaled_linear", "cosine", "squaredcos_cap_v2"}
    beta_start, beta_end : float
        The first and last beta of "linear" / "scaled_linear": beta_start in (0, 1), beta_end in (0, 1] (1 is
        zero terminal SNR).
    num_train_timesteps : int
        N >= 2.
    rescale_betas_zero_snr : bool
        Rescale to zero terminal SNR (Lin et al. 2023); the last timestep then has alpha = 0 and needs an x0, v or
        flow prediction.
    """

    betas: tuple = None
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    rescale_betas_zero_snr: bool = False
    _lam: np.ndarray = field(init=False, compare=False, hash=False)

    default_spacing = "trailing"
    t_zero = -1.0

    def __post_init__(self):
        _check_flag("DiscreteVP", "rescale_betas_zero_snr", self.rescale_betas_zero_snr)
        if self.betas is not None:
            betas = self._checked_betas(self.betas)
            object.__setattr__(self, "betas", tuple(float(b) for b in betas))
            object.__setattr__(self, "num_train_timesteps", betas.size)
        else:
            betas = self._named_betas()
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alpha_bar = np.cumprod(1.0 - betas)
        # lambda_k = 0.5 * log(alpha_bar / (1 - alpha_bar)); -inf at zero terminal SNR.
        with np.errstate(divide="ignore"):
            lam = 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))
        object.__setattr__(self, "_lam", lam)

    @staticmethod
    def _checked_betas(values) -> np.ndarray:
        try:
            betas = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"DiscreteVP(betas=...): betas must be a sequence of numbers, got {values!r}") from None
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"DiscreteVP(betas=...): betas must be a 1-D sequence of at least 2 values, got shape "
                             f"{betas.shape}")
        # a last beta of 1 is zero terminal SNR given explicitly (alpha_bar = 0 at t = N - 1)
        bad = ~((betas > 0) & (betas < 1))
        bad[-1] = not (0 < betas[-1] <= 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"DiscreteVP(betas=...): betas[{i}] = {float(betas[i])!r} is outside (0, 1) (only the "
                             "last beta may be 1: zero terminal SNR)")
        return betas

    def _named_betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(f"DiscreteVP(num_train_timesteps={n!r}): num_train_timesteps must be an integer >= 2")
        object.__setattr__(self, "num_train_timesteps", int(n))
        if self.beta_schedule not in BETA_SCHEDULES:
            raise unknown_name("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        if self.beta_schedule in ("cosine", "squaredcos_cap_v2"):
            return _betas_for_alpha_bar(int(n))
        lo = _check_range("DiscreteVP", "beta_start", self.beta_start, 0.0, 1.0, hi_open=True)
        hi = _check_range("DiscreteVP", "beta_end", self.beta_end, 0.0, 1.0)
        if self.beta_schedule == "linear":
            return np.linspace(lo, hi, int(n), dtype=np.float64)
        return np.linspace(lo**0.5, hi**0.5, int(n), dtype=np.float64) ** 2  # scaled_linear

    @classmethod
    def linear(cls, beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000, **kw):
        """DDPM's linear betas (Ho et al. 2020; diffusers' ``beta_schedule="linear"``)."""
        return cls(beta_schedule="linear", beta_start=beta_start, beta_end=beta_end,
                   num_train_timesteps=num_train_timesteps, **kw)

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, **kw):
        """Stable Diffusion's schedule."""
        return cls(beta_schedule="scaled_linear", beta_start=beta_start, beta_end=beta_end,
                   num_train_timesteps=num_train_timesteps, **kw)

    @classmethod
    def cosine(cls, num_train_timesteps=1000, **kw):
        """Improved DDPM's cosine schedule (diffusers' squaredcos_cap_v2)."""
        return cls(beta_schedule="cosine", num_train_timesteps=num_train_timesteps, **kw)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-2.0 * self._lam))

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def _describe(self):
        return (f"beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"N={self.num_train_timesteps}, zero_snr={self.rescale_betas_zero_snr}")

    # lambda(t): piecewise linear in t on [0, N-1]; +inf at t <= -1 (clean point).
    def _lambda(self, t):
        lam_tab = self._lam
        n = lam_tab.size
        bad = np.isnan(t)
        tc = np.where(bad, 0.0, np.clip(t, 0.0, n - 1.0))
        lo = np.minimum(np.floor(tc).astype(np.int64), n - 2)
        w = tc - lo
        a, b = lam_tab[lo], lam_tab[lo + 1]
        with np.errstate(invalid="ignore"):
            lam = np.where(w == 0, a, np.where(w == 1, b, (1 - w) * a + w * b))
        return np.where(bad, np.nan, np.where(t <= -1.0, np.inf, lam))

    def _dlambda(self, t):
        lam_tab = self._lam
        n = lam_tab.size
        bad = np.isnan(t)
        lo = np.clip(np.floor(np.where(bad, 0.0, t)).astype(np.int64), 0, n - 2)
        with np.errstate(invalid="ignore"):
            return np.where(bad, np.nan, lam_tab[lo + 1] - lam_tab[lo])

    def _alpha(self, t):
        lam = self._lambda(t)
        with np.errstate(over="ignore"):
            return np.sqrt(1.0 / (1.0 + np.exp(-2.0 * lam)))

    def _sigma(self, t):
        lam = self._lambda(t)
        with np.errstate(over="ignore"):
            return np.sqrt(1.0 / (1.0 + np.exp(2.0 * lam)))

    # For VP: d alpha / d lambda = alpha * sigma^2, d sigma / d lambda = -sigma * alpha^2.
    def _dalpha(self, t):
        a, s = self._alpha(t), self._sigma(t)
        return a * s * s * self._dlambda(t)

    def _dsigma(self, t):
        a, s = self._alpha(t), self._sigma(t)
        return -s * a * a * self._dlambda(t)

    def _t_from_lambda(self, lam):
        lam_tab = self._lam
        n = lam_tab.size
        finite = np.isfinite(lam_tab)
        # lambda decreases in t: interpolate on the reversed (increasing) table of finite entries.
        idx = np.arange(n, dtype=np.float64)[finite]
        t = np.interp(lam, lam_tab[finite][::-1], idx[::-1])
        t = np.where(lam == np.inf, -1.0, t)
        if not finite[-1]:  # zero terminal SNR: lambda = -inf only at the last index
            t = np.where(lam == -np.inf, n - 1.0, t)
        return t


# ---------------------------------------------------------------------------------------------------------------
# Continuous-time schedules of Song et al. 2021 (score SDEs)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ContinuousVP(Schedule):
    """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11), t in [1e-3, 1].

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, sigma = sqrt(1 - alpha^2).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        owner = type(self).__name__
        _check_range(owner, "beta_min", self.beta_min, 0.0, None, lo_open=False)
        _check_range(owner, "beta_max", self.beta_max, 0.0, None)
        _check_interval(owner, "beta_min", self.beta_min, "beta_max", self.beta_max)
        _check_range(owner, "t_min", self.t_min, 0.0, 1.0, hi_open=True)
        _check_range(owner, "t_max", self.t_max, 0.0, 1.0)
        _check_interval(owner, "t_min", self.t_min, "t_max", self.t_max)

    def _describe(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"

    def _log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _alpha(self, t):
        return np.exp(self._log_alpha(t))

    def _sigma(self, t):
        return np.sqrt(-np.expm1(2.0 * self._log_alpha(t)))

    def _dalpha(self, t):
        return -0.5 * self._beta(t) * self._alpha(t)

    def _dsigma(self, t):
        a, s = self._alpha(t), self._sigma(t)
        with np.errstate(divide="ignore", invalid="ignore"):
            return 0.5 * self._beta(t) * a * a / s

    def _t_from_lambda(self, lam):
        # DPM-Solver (Lu et al. 2022), Appendix: closed-form inverse of lambda for the linear VP schedule.
        db = self.beta_max - self.beta_min
        log_term = np.logaddexp(0.0, -2.0 * lam)  # = -2 log alpha
        return 2.0 * log_term / (np.sqrt(self.beta_min**2 + 2.0 * db * log_term) + self.beta_min)


@dataclass(frozen=True, repr=False)
class SubVP(ContinuousVP):
    """Sub-VP SDE (Song et al. 2021, eq. 12): the VP mean with sigma(t) = 1 - alpha(t)^2."""

    def _sigma(self, t):
        return -np.expm1(2.0 * self._log_alpha(t))

    def _dsigma(self, t):
        a = self._alpha(t)
        return self._beta(t) * a * a  # d/dt (1 - alpha^2) = -2 alpha alpha' = beta alpha^2

    def _t_from_lambda(self, lam):
        # alpha / (1 - alpha^2) = e^lam  ->  alpha = 2 e^lam / (1 + sqrt(1 + 4 e^{2 lam})); then invert log alpha.
        e = np.exp(np.minimum(lam, 300.0))
        alpha = 2.0 * e / (1.0 + np.sqrt(1.0 + 4.0 * e * e))
        with np.errstate(divide="ignore"):
            neg_log_alpha = -np.log(alpha)
        # t^2 db / 4 + t beta_min / 2 = -log alpha, solved without cancellation
        db = self.beta_max - self.beta_min
        return 4.0 * neg_log_alpha / (np.sqrt(self.beta_min**2 + 4.0 * db * neg_log_alpha) + self.beta_min)


@dataclass(frozen=True, repr=False)
class VE(Schedule):
    """VE SDE (SMLD / NCSN): alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [1e-5, 1]."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    kind = "ve"

    def __post_init__(self):
        _check_range("VE", "sigma_min", self.sigma_min, 0.0, None)
        _check_range("VE", "sigma_max", self.sigma_max, 0.0, None)
        _check_interval("VE", "sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        _check_range("VE", "t_min", self.t_min, 0.0, 1.0, lo_open=False, hi_open=True)
        _check_range("VE", "t_max", self.t_max, 0.0, 1.0)
        _check_interval("VE", "t_min", self.t_min, "t_max", self.t_max)

    def _describe(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def _alpha(self, t):
        return np.ones_like(t)

    def _sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def _dalpha(self, t):
        return np.zeros_like(t)

    def _dsigma(self, t):
        return self._sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def _t_from_lambda(self, lam):
        return (-lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@dataclass(frozen=True, repr=False)
class EDM(Schedule):
    """Karras et al. 2022: alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max]; Karras spacing by default.

    ``sigma_data`` is used only by the preconditioning wrapper in ``fastdiff.models``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    kind = "ve"
    default_spacing = "karras"

    def __post_init__(self):
        _check_range("EDM", "sigma_min", self.sigma_min, 0.0, None)
        _check_range("EDM", "sigma_max", self.sigma_max, 0.0, None)
        _check_interval("EDM", "sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        _check_range("EDM", "sigma_data", self.sigma_data, 0.0, None)

    def _describe(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data}"

    @property
    def t_min(self) -> float:
        return float(self.sigma_min)

    @property
    def t_max(self) -> float:
        return float(self.sigma_max)

    def _alpha(self, t):
        return np.ones_like(t)

    def _sigma(self, t):
        return t.copy()

    def _dalpha(self, t):
        return np.zeros_like(t)

    def _dsigma(self, t):
        return np.ones_like(t)

    def _t_from_lambda(self, lam):
        return np.exp(-lam)


# ---------------------------------------------------------------------------------------------------------------
# Flow matching
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class RectifiedFlow(Schedule):
    """Linear interpolation path: alpha = 1 - t, sigma = sigma_min + (1 - sigma_min) t, t in [1e-3, 1].

    With ``sigma_min = 0`` this is rectified flow / SD3's schedule (diffusers' FlowMatchEuler, model time t).
    ``shift`` warps every spacing's times as ``shift t / (1 + (shift - 1) t)`` (SD3's timestep shift); custom
    ``timesteps=`` are not warped.  ``RectifiedFlow.lipman(sigma_min)`` is the optimal-transport path of Lipman et
    al. 2023: their time runs from noise (0) to data (1), so the model is called with
    ``1 - t`` and predicts the velocity in that direction (``model_time_rate = -1``).
    ``RectifiedFlow.for_resolution(image_seq_len)`` sets Flux's resolution-dependent shift (``flux_shift``).
    """

    shift: float = 1.0
    sigma_min: float = 0.0
    lipman_time: bool = False
    t_min: float = 1e-3
    t_max: float = 1.0

    kind = "flow"

    def __post_init__(self):
        _check_range("RectifiedFlow", "shift", self.shift, 0.0, None)
        _check_range("RectifiedFlow", "sigma_min", self.sigma_min, 0.0, 1.0, lo_open=False, hi_open=True)
        _check_flag("RectifiedFlow", "lipman_time", self.lipman_time)
        _check_range("RectifiedFlow", "t_min", self.t_min, 0.0, 1.0, hi_open=True)
        _check_range("RectifiedFlow", "t_max", self.t_max, 0.0, 1.0)
        _check_interval("RectifiedFlow", "t_min", self.t_min, "t_max", self.t_max)

    @classmethod
    def for_resolution(cls, image_seq_len, *, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15,
                       **kw):
        """Flux's schedule for an image of ``image_seq_len`` latent tokens: ``shift = flux_shift(...)``."""
        return cls(shift=flux_shift(image_seq_len, base_seq_len=base_seq_len, max_seq_len=max_seq_len,
                                    base_shift=base_shift, max_shift=max_shift), **kw)

    @classmethod
    def lipman(cls, sigma_min=1e-4, **kw):
        """Lipman et al. 2023 OT path: mu_t = t x1, sigma_t = 1 - (1 - sigma_min) t in their time."""
        return cls(sigma_min=sigma_min, lipman_time=True, **kw)

    def _describe(self):
        return f"shift={self.shift}, sigma_min={self.sigma_min}, lipman_time={self.lipman_time}"

    @property
    def model_time_rate(self) -> float:
        return -1.0 if self.lipman_time else 1.0

    def model_time(self, t):
        return 1.0 - t if self.lipman_time else t

    def t_from_model_time(self, tau):
        return 1.0 - tau if self.lipman_time else tau

    def warp(self, t):
        """SD3's timestep shift ``shift t / (1 + (shift - 1) t)``; identity for shift = 1.

        Written as ``t / (t + (1 - t) / shift)``, which maps 0 and 1 to exactly 0 and 1 (the other form rounds 1 to
        1 + 2^-52 for some shifts: alpha = 1 - t turns negative, or a tiny non-zero alpha where it is exactly 0).
        """
        t = _f64(t)
        return t if self.shift == 1.0 else t / (t + (1.0 - t) / self.shift)

    def _alpha(self, t):
        return 1.0 - t

    def _sigma(self, t):
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def _dalpha(self, t):
        return -np.ones_like(t)

    def _dsigma(self, t):
        return np.full_like(t, 1.0 - self.sigma_min)

    def _t_from_lambda(self, lam):
        # (1 - t) / (smin + (1 - smin) t) = e^lam  ->  t = (1 - smin e^lam) / (1 + (1 - smin) e^lam)
        e = np.exp(np.minimum(lam, 700.0))
        with np.errstate(invalid="ignore"):
            t = (1.0 - self.sigma_min * e) / (1.0 + (1.0 - self.sigma_min) * e)
        return np.where(lam == np.inf, self.t_zero, t)


def flux_shift(image_seq_len, *, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """Flux's resolution-dependent time shift for ``RectifiedFlow(shift=...)``.

    ``mu`` interpolates linearly between ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at
    ``max_seq_len`` tokens (extrapolating beyond them), and the shift is ``exp(mu)``: diffusers' FluxPipeline
    ``calculate_shift`` with FlowMatchEulerDiscreteScheduler's exponential time shift
    ``e^mu t / (e^mu t + 1 - t)``, which is ``RectifiedFlow.warp`` with ``shift = e^mu``.
    ``image_seq_len`` is the number of latent patches, ``(height // 16) * (width // 16)`` for Flux.
    """
    n = _check_range("flux_shift", "image_seq_len", image_seq_len, 0.0, None)
    lo = _check_range("flux_shift", "base_seq_len", base_seq_len, 0.0, None)
    hi = _check_range("flux_shift", "max_seq_len", max_seq_len, 0.0, None)
    _check_interval("flux_shift", "base_seq_len", base_seq_len, "max_seq_len", max_seq_len)
    b = _real("flux_shift", "base_shift", base_shift)
    m = _real("flux_shift", "max_shift", max_shift)
    mu = b + (m - b) * (n - lo) / (hi - lo)
    if mu > 700.0:
        raise ValueError(f"flux_shift(image_seq_len={image_seq_len!r}): mu = {mu} overflows exp(mu); the sequence "
                         "length is far beyond what the interpolation was fit on")
    return math.exp(mu)
