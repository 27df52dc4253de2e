"""Plan: a sampler compiled to per-stage coefficient rows (float64), built once and cached.

A sampler run is a sequence of *stages*.  A stage optionally calls the model once at a time ``t_k``, converts the
output to the data estimate ``D`` affinely, and then updates the registers affinely:

    D      = cx * x + co * out                              (out: the model output, guidance already combined)
    x'     = M[0] . [x, D, S_0 .. S_{K-1}] + g * z          (z: fresh Philox noise, draw index ``draw[k]``)
    S_i'   = M[1+i] . [x, D, S_0 .. S_{K-1}]                (only rows marked in ``writes[k]``; others keep S_i)

``S_i`` are K history slots (earlier D's, a saved x, an accumulator); every right-hand side reads the values from
before the stage, so one pass over memory executes it.  Langevin corrector stages add a term whose step size
needs a per-sample reduction first (Song et al. 2021, Algorithm 4):

    s = lsx * x + lsD * D  (the score),  eps = 2 * r * (snr * ||z|| / ||s||)^2,  x' += eps * s + sqrt(2 eps) z

(fastdiff's Langevin stages put the score itself in the D register, lsx = 0, lsD = 1: x and alpha D cancel in the
score with coefficients ~ 1 / sigma^2, which float32 cannot do at small sigma, so it is done on the coefficients.)

CFG++ plans (``Plan.uncond_column``) give M one more column, for U = cx x + co out_u, the data estimate of the
unconditional output: M . [x, D, U, S_0 .. S_{K-1}] (U = D without guidance).

The flat row for a kernel (``Plan.rows``) is ``[cx, co, g, snr, r, lsx, lsD, M (row-major)]``.  All numbers exist
before the loop starts: no value-dependent branching, no host syncs, nothing a CUDA graph could go stale on.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from ._names import unknown_name
from .schedules import Schedule
from .solvers import GUIDANCE_MODES, MAX_STAGES, SOLVERS, build, cfgpp_solvers
from .solvers.builder import PREDICTIONS, Builder, Lin, conversion  # noqa: F401  (the solver language; old home)
from .solvers.registry import alpha_zero_error
from .timesteps import SPACING_OPTIONS, custom_times, timesteps
ROW_HEADER = ("cx", "co", "g", "snr", "r", "lsx", "lsD")


class StageFlags(NamedTuple):
    """Structural flags of a stage, host constants for the kernels (they decide what is loaded, not values).

    ``slot_reads`` / ``slot_writes``: bitmasks of the history slots read / written (bit i: slot i); ``use_out``: the
    stage calls the model; ``noise``: it draws noise; ``langevin``: it has a Langevin corrector term.  A stage that
    only copies x is ``StageFlags(0, 0, False, False, False)``.
    """

    slot_reads: int
    slot_writes: int
    use_out: bool
    noise: bool
    langevin: bool

    def union(self, *others: "StageFlags") -> "StageFlags":
        """Flags of one launch that runs rows of all these stages: OR of the masks, any() of the booleans."""
        every = (self, *others)
        return StageFlags(
            int(functools.reduce(lambda a, f: a | int(f[0]), every, 0)),
            int(functools.reduce(lambda a, f: a | int(f[1]), every, 0)),
            any(bool(f[2]) for f in every), any(bool(f[3]) for f in every), any(bool(f[4]) for f in every))


def row_length(num_slots: int, uncond: bool = False) -> int:
    """Length of a flat row with ``num_slots`` history slots: 7 + (1 + K)(2 + K); 7 + (1 + K)(3 + K) with CFG++'s
    U column (``uncond``)."""
    return len(ROW_HEADER) + (1 + num_slots) * (2 + bool(uncond) + num_slots)


def identity_row(num_slots: int, uncond: bool = False) -> np.ndarray:
    """The flat row [R] of a stage that changes nothing: x' = x, S_i' = S_i, no model output, no noise."""
    K, c0 = int(num_slots), 2 + bool(uncond)
    M = np.zeros((1 + K, c0 + K))
    M[0, 0] = 1.0
    for i in range(K):
        M[1 + i, c0 + i] = 1.0
    return np.concatenate([np.zeros(len(ROW_HEADER)), M.ravel()])


def _row_matrices(rows: np.ndarray, num_slots: int, uncond: bool = False) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    K = int(num_slots)
    R = row_length(K, uncond)
    if rows.ndim != 2 or rows.shape[1] != R:
        raise ValueError(f"rows must be [S, {R}] for num_slots={K}, got shape {tuple(rows.shape)}")
    return rows


def fold_rows(rows, num_slots: int, a_in, a_out, uncond: bool = False) -> np.ndarray:
    """Flat rows [S, R] re-expressed for a sample space y with x = a_in * y on input and y' = x' / a_out on output.

    ``a_in``, ``a_out``: [S] (or scalars).  The x columns (and the D conversion's cx, the score's lsx) are scaled by
    a_in; the x' row and the noise gain are divided by a_out; slot rows keep their units.  Still one pass per stage.
    Langevin stages only fold with a_out = 1 (their noise is not a row coefficient).
    """
    K = int(num_slots)
    out = _row_matrices(rows, K, uncond).copy()
    S = out.shape[0]
    a_in = np.broadcast_to(np.asarray(a_in, dtype=np.float64), (S,))
    a_out = np.broadcast_to(np.asarray(a_out, dtype=np.float64), (S,))
    if not (np.all(np.isfinite(a_in)) and np.all(np.isfinite(a_out)) and np.all(a_out != 0)):
        raise ValueError("fold_rows: a_in must be finite and a_out finite and non-zero")
    if np.any((out[:, 3] != 0) & (a_out != 1.0)):
        raise ValueError("fold_rows: a Langevin stage (snr != 0) cannot be folded with a_out != 1")
    H = len(ROW_HEADER)
    M = out[:, H:].reshape(S, 1 + K, 2 + bool(uncond) + K)
    out[:, 0] *= a_in  # D = cx x + co out with x = a_in y
    out[:, 5] *= a_in  # the Langevin score's x coefficient
    M[:, :, 0] *= a_in[:, None]
    M[:, 0, :] /= a_out[:, None]  # y' = x' / a_out
    out[:, 2] /= a_out
    out[:, H:] = M.reshape(S, -1)
    return out


def x0_input_rows(rows) -> np.ndarray:
    """A copy of flat rows [S, R] with cx = 0, co = 1: the stage takes an x0 estimate (clipped, thresholded) in place
    of the model output."""
    out = np.array(rows, dtype=np.float64, copy=True)
    out[..., 0], out[..., 1] = 0.0, 1.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# The Plan
# ---------------------------------------------------------------------------------------------------------------


class Plan:
    """An immutable, hashable sampler program: per-stage coefficient rows over float64 numbers.

    Attributes
    ----------
    solver, schedule, steps, prediction, spacing, final, options
        What was asked for (``options``: a sorted tuple of (name, value)).
    times, alphas, sigmas : ndarray, float64 [steps + 1]
        Step boundaries from start to end; with ``final="zero"`` the last is the clean point (alpha 1, sigma 0).
    init_scale : float
        Std of the prior noise x_T = init_scale * n at the plan's first time (``prior_std``).
    nfe : int
        Model evaluations (one batched call each, also with guidance).
    model_times : ndarray [nfe]
        The time each model call receives (the schedule's ``model_time`` of the stage time).
    num_slots : int
        History slots K the stages use.
    stage_times : ndarray [S]
        Schedule time of each stage (NaN for a stage without model call).
    stage_step : ndarray int64 [S]
        The solver step (grid interval i: times[i] -> times[i+1]) each stage belongs to.
    calls_model : ndarray bool [S]
    data_coefs : ndarray [S, 2]      (cx, co) of the D register D = cx x + co out  (old name: ``conv``); on
                                     Langevin stages the register holds the score, formed in float64 (see below)
    denoised_coefs : ndarray [S, 2]  (cx, co) of the data estimate at every stage (what callbacks report and
                                     thresholding clamps; equal to ``data_coefs`` except on Langevin stages)
    transitions : ndarray [S, 1+K, 2+K]  rows (x', S_0'..), columns (x, D, S_0..)  (old name: ``update``);
                                     [S, 1+K, 3+K] with columns (x, D, U, S_0..) in CFG++ plans
    uncond_column : bool             CFG++ plan (``guidance="cfg++"``): M has the U column
    noise_gain : ndarray [S]
    langevin : ndarray [S, 4]        (snr, r, lsx, lsD); snr = 0 means no corrector term
    writes : ndarray bool [S, K]     slot rows that are written
    draw : ndarray int64 [S]         Philox draw index of the stage's noise (-1: none); draw 0 is the prior
    num_draws : int                  largest draw index + 1
    stage_flags : tuple of StageFlags  per stage (slot_reads, slot_writes, use_out, noise, langevin)
    """

    def __init__(self, *, key, solver, schedule, steps, prediction, spacing, final, options, times, stages,
                 num_slots, uncond_column=False):
        self._key = key
        self.solver, self.schedule, self.steps = solver, schedule, steps
        self.prediction, self.spacing, self.final, self.options = prediction, spacing, final, options
        self.times = _ro(times)
        alphas = np.asarray(schedule.alpha(times), dtype=np.float64).copy()
        sigmas = np.asarray(schedule.sigma(times), dtype=np.float64).copy()
        if final == "zero":
            alphas[-1], sigmas[-1] = 1.0, 0.0
        self.alphas, self.sigmas = _ro(alphas), _ro(sigmas)
        self.init_scale = prior_std(schedule, float(times[0]))
        self.num_slots = K = int(num_slots)
        self.uncond_column = u = bool(uncond_column)

        S = len(stages)
        self.stage_times = _ro(np.array([st.t for st in stages], dtype=np.float64))
        self.stage_step = _ro(np.array([st.step for st in stages], dtype=np.int64))
        self.calls_model = _ro(~np.isnan(self.stage_times))
        self.data_coefs = _ro(np.array([[st.cx, st.co] for st in stages], dtype=np.float64).reshape(S, 2))
        self.denoised_coefs = _ro(np.array([st.denoised or (st.cx, st.co) for st in stages],
                                           dtype=np.float64).reshape(S, 2))
        upd = np.zeros((S, 1 + K, 2 + u + K))
        writes = np.zeros((S, K), dtype=bool)
        cols = {"x": 0, "D": 1, **({"U": 2} if u else {}), **{i: 2 + u + i for i in range(K)}}
        for k, st in enumerate(stages):
            for reg, v in st.x.c.items():
                upd[k, 0, cols[reg]] += v
            for i, lin in st.slots.items():
                writes[k, i] = True
                for reg, v in lin.c.items():
                    upd[k, 1 + i, cols[reg]] += v
        _drop_dead_writes(upd, writes, 2 + u)
        self.transitions = _ro(upd)
        self.writes = _ro(writes)
        self.noise_gain = _ro(np.array([st.g for st in stages], dtype=np.float64))
        self.langevin = _ro(np.array([st.langevin for st in stages], dtype=np.float64).reshape(S, 4))
        noisy = (self.noise_gain != 0) | (self.langevin[:, 0] != 0)
        draw = np.full(S, -1, dtype=np.int64)
        draw[noisy] = 1 + np.arange(int(noisy.sum()))  # draw 0 is reserved for the prior x_T
        self.draw = _ro(draw)
        self.num_draws = int(draw.max() + 1) if noisy.any() else 1
        self.nfe = int(self.calls_model.sum())
        self.model_times = _ro(np.asarray(schedule.model_time(self.stage_times[self.calls_model]), dtype=np.float64))
        self.stage_flags = tuple(
            StageFlags(self.slot_reads(k), self.slot_writes(k), bool(self.calls_model[k]), bool(self.draw[k] >= 0),
             bool(self.langevin[k, 0] != 0))
            for k in range(S)
        )
        self._rows = self._flat_rows()
        self._shared = {}  # num_slots -> shared_rows(num_slots), filled on first use
        self._check_finite()

    # hashable by what was asked for; equal plans are the same program
    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Plan) and other._key == self._key

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError("Plan is immutable; build another with fastdiff.plan(...)")
        object.__setattr__(self, name, value)

    def __repr__(self):
        return (f"Plan({self.solver!r}, {self.schedule!r}, steps={self.steps}, prediction={self.prediction!r}, "
                f"nfe={self.nfe}, stages={self.num_stages}, slots={self.num_slots})")

    @property
    def conv(self) -> np.ndarray:
        """Old name of ``data_coefs``."""
        return self.data_coefs

    @property
    def update(self) -> np.ndarray:
        """Old name of ``transitions``."""
        return self.transitions

    @property
    def num_stages(self) -> int:
        return len(self.stage_times)

    def slot_reads(self, k: int) -> int:
        """Bitmask of the history slots stage k reads (bit i: slot i); lets kernels skip dead loads."""
        cols = np.any(self.transitions[k, :, 2 + self.uncond_column:] != 0, axis=0)
        return int(sum(1 << i for i in range(self.num_slots) if cols[i]))

    def slot_writes(self, k: int) -> int:
        """Bitmask of the history slots stage k writes."""
        return int(sum(1 << i for i in range(self.num_slots) if self.writes[k, i]))

    def rows(self) -> np.ndarray:
        """Flat float64 coefficient rows [S, 7 + (1+K)(2+K)]: ``[cx, co, g, snr, r, lsx, lsD, M row-major]``."""
        return self._rows

    def shared_rows(self, num_slots: int | None = None) -> np.ndarray:
        """``rows()`` re-laid for ``num_slots`` >= K slots, with the identity S_i' = S_i on every slot a stage does
        not write: rows of different stages (or plans) then share one launch with the union of their slot masks
        (continuous batching, per-sample steps). Read-only, cached per ``num_slots``."""
        K0, u = self.num_slots, int(self.uncond_column)
        K = K0 if num_slots is None else int(num_slots)
        if K < K0:
            raise ValueError(f"num_slots={K} is below the plan's {K0} history slots")
        hit = self._shared.get(K)
        if hit is None:
            S = self.num_stages
            M = np.zeros((S, 1 + K, 2 + u + K))
            M[:, : 1 + K0, : 2 + u + K0] = self.transitions
            for k in range(S):
                for i in range(K):
                    if i >= K0 or not self.writes[k, i]:
                        M[k, 1 + i, :] = 0.0
                        M[k, 1 + i, 2 + u + i] = 1.0
            head = self._rows[:, : len(ROW_HEADER)]
            hit = self._shared[K] = _ro(np.concatenate([head, M.reshape(S, -1)], axis=1))
        return hit

    def folded_rows(self, a_in, a_out, num_slots: int | None = None) -> np.ndarray:
        """``fold_rows(self.shared_rows(num_slots), ...)``: rows for a sample y with x = a_in y, y' = x' / a_out."""
        K = self.num_slots if num_slots is None else int(num_slots)
        return fold_rows(self.shared_rows(K), K, a_in, a_out, self.uncond_column)

    def _flat_rows(self):
        S = self.num_stages
        return _ro(np.concatenate([self.data_coefs, self.noise_gain[:, None], self.langevin,
                                   self.transitions.reshape(S, -1)], axis=1))

    def _check_finite(self):
        for name in ("data_coefs", "transitions", "noise_gain", "langevin"):
            arr = getattr(self, name)
            if not np.all(np.isfinite(arr)):
                k = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1)))[0, 0])
                raise alpha_zero_error(self.solver, self.schedule, self.times,
                                       f"non-finite coefficient at stage {k}, t={self.stage_times[k]:g}")
        object.__setattr__(self, "_frozen", True)


def prior_std(schedule: Schedule, t: float) -> float:
    """Std of the prior x ~ N(0, std^2) a plan starting at time ``t`` draws from: the schedule's ``init_scale``
    convention evaluated at t.  VE / EDM: sigma(t) (k-diffusion's sigmas[0]; the data variance is neglected next to
    sigma^2); VP: 1 (alpha^2 + sigma^2 = 1 for unit-variance data); flows: sqrt(alpha^2 + sigma^2), 1 at t_max."""
    if schedule.kind == "ve":
        return float(schedule.sigma(t))
    if schedule.kind == "flow":
        return float(math.hypot(schedule.alpha(t), schedule.sigma(t)))
    return float(schedule.init_scale)


def _drop_dead_writes(upd, writes, c0=2):
    """Remove slot writes that no later stage reads before overwriting them (saves a store per element); ``c0``:
    the column of slot 0."""
    S, K = writes.shape
    live = np.zeros(K, dtype=bool)  # slot read later (before being overwritten)
    for k in range(S - 1, -1, -1):
        for i in range(K):
            if writes[k, i] and not live[i]:
                writes[k, i] = False
                upd[k, 1 + i, :] = 0.0
        reads = np.any(upd[k, :, c0:] != 0, axis=0)
        # slots written here are dead before this stage unless this stage reads them
        live = (live & ~writes[k]) | reads


def _ro(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------------------------------
# fastdiff.plan(...)
# ---------------------------------------------------------------------------------------------------------------


MAX_STEPS = MAX_STAGES  # a plan has at least one stage per step
MAX_CACHED_PLANS = 256
MAX_CACHE_BYTES = 256 << 20  # the cached plans' arrays together
FINALS = ("zero", "t_min")
_SPACING_OPTIONS = SPACING_OPTIONS  # options of the spacing, not of the solver


def _freeze_grid(name, v):
    """A custom grid as a hashable tuple of floats; ValueError naming ``name`` for anything else."""
    if v is None:
        return None
    if isinstance(v, (str, bytes)):
        raise ValueError(f"{name}= must be a sequence of numbers, got the string {v!r}")
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}= must be a sequence of numbers, got {v!r}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}= must be a 1-D sequence of numbers, got shape {arr.shape}")
    if len(arr) > MAX_STEPS + 1:
        raise ValueError(f"{name}= has {len(arr)} entries; a plan takes at most {MAX_STEPS} steps")
    return tuple(float(x) for x in arr)


def _freeze_option(name, v):
    """An option value as a hashable key: sequences become tuples (of floats when numeric); ValueError otherwise."""
    if isinstance(v, (list, tuple, np.ndarray)):
        try:
            return tuple(float(x) for x in np.asarray(v, dtype=np.float64).ravel())
        except (TypeError, ValueError):
            raise ValueError(f"option {name}={v!r}: a sequence option must hold numbers") from None
    if isinstance(v, np.generic):
        return v.item()
    try:
        hash(v)
    except TypeError:
        raise ValueError(f"option {name}={v!r}: solver options must be numbers, strings, booleans or sequences of "
                         "numbers") from None
    return v


def _check_count(name, v, cap):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {v!r} ({type(v).__name__})")
    if not 1 <= v <= cap:
        raise ValueError(f"{name} must be an integer >= 1 and <= {cap} (the cap on one plan), got {v!r}")
    return int(v)


def plan(solver: str, schedule: Schedule, steps: int | None = None, prediction: str = "epsilon",
         spacing: str | None = None, final: str = "zero", *, timesteps=None, sigmas=None, boundaries=None,
         **options) -> Plan:
    """Build (or fetch from the cache) the Plan of ``solver`` on ``schedule``.

    Parameters
    ----------
    solver : str
        One of ``fastdiff.SOLVERS``.
    schedule : Schedule
    steps : int
        Solver steps (1 .. ``MAX_STEPS``). Implied by ``timesteps`` / ``sigmas`` when those are given.
    prediction : {"epsilon", "x0", "v", "score", "flow"}
        What the model outputs.
    spacing : str, optional
        A spacing of ``fastdiff.timesteps``; the schedule's default when omitted.
    final : {"zero", "t_min"}
        End on the clean point (sigma = 0) or on the schedule's smallest time.
    timesteps, sigmas, boundaries : sequence of float, optional
        A custom descending grid (see ``fastdiff.timesteps.custom_times``); ``boundaries`` are the step boundaries
        themselves, ending on ``schedule.t_zero`` (the clean point) or a time >= t_min.
    **options
        Solver options (``eta``, ``s_churn``, ``order``, ...); ``fastdiff.solver_options(name)`` lists them.
        ``guidance="cfg++"`` (default ``"cfg"``) builds the solver's CFG++ variant (Chung et al. 2024: the
        renoising direction uses the unconditional data estimate; ``cfgpp_solvers()`` lists the solvers that have
        one); its rows carry the U column (``Plan.uncond_column``).  Run it with the guidance scale of CFG++'s
        lambda (typically 0.5 - 2, not CFG's 7.5): D = U + w (C - U) as with CFG.

    Every bad argument raises a ValueError that names it.  A plan has at most ``MAX_STAGES`` stages.
    """
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise unknown_name("solver", solver, SOLVERS)
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a fastdiff.schedules.Schedule, got {type(schedule).__name__}")
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise unknown_name("prediction", prediction, PREDICTIONS)
    if not isinstance(final, str) or final not in FINALS:
        raise unknown_name("final", final, FINALS)
    if spacing is not None and not isinstance(spacing, str):
        raise ValueError(f"spacing must be a string (one of fastdiff.SPACINGS) or None, got {spacing!r}")
    if steps is not None:
        steps = _check_count("steps", steps, MAX_STEPS)
    grids = {n: _freeze_grid(n, v) for n, v in (("timesteps", timesteps), ("sigmas", sigmas),
                                                ("boundaries", boundaries))}
    key = (solver, schedule, steps, prediction, spacing, final, grids["timesteps"], grids["sigmas"],
           grids["boundaries"], tuple(sorted((k, _freeze_option(k, v)) for k, v in options.items())))
    return _cached_plan(key)


_CACHE: OrderedDict = OrderedDict()  # key -> Plan, least recently used first
_CACHE_LOCK = threading.Lock()


def _plan_bytes(p: Plan) -> int:
    return sum(v.nbytes for v in vars(p).values() if isinstance(v, np.ndarray))


def _cached_plan(key) -> Plan:
    """The plan of ``key`` from the LRU cache (at most MAX_CACHED_PLANS plans and MAX_CACHE_BYTES of arrays)."""
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    p = _build_plan(key)
    with _CACHE_LOCK:
        _CACHE[key] = p
        total = sum(_plan_bytes(q) for q in _CACHE.values())
        while len(_CACHE) > 1 and (len(_CACHE) > MAX_CACHED_PLANS or total > MAX_CACHE_BYTES):
            _, old = _CACHE.popitem(last=False)
            total -= _plan_bytes(old)
    return p


def cache_clear():
    """Empty the plan cache."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _check_spacing_options(schedule, opts):
    rho = opts.get("rho", 7.0)
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho (the karras spacing's exponent) must be a finite number > 0, got {rho!r}")
    off = opts.get("steps_offset", 0)
    n = getattr(schedule, "num_train_timesteps", None)
    if isinstance(off, bool) or not isinstance(off, int) or off < 0 or (n is not None and off >= n):
        raise ValueError(f"steps_offset must be an integer >= 0{f' and < {n}' if n else ''}, got {off!r}")


def _build_plan(key) -> Plan:
    solver, schedule, steps, prediction, spacing, final, ts, sg, bd, options = key
    spacing_opts = {}
    opts = dict(options)
    for name in _SPACING_OPTIONS:
        if name in opts:
            spacing_opts[name] = opts.pop(name)
    if ts is not None or sg is not None or bd is not None:
        if spacing is not None:
            raise ValueError("give either spacing= or a custom timesteps= / sigmas= / boundaries=, not both")
        if spacing_opts:
            raise ValueError(f"{', '.join(spacing_opts)} shape a spacing; a custom timesteps= / sigmas= / "
                             "boundaries= grid takes none")
        times = custom_times(schedule, timesteps=ts, sigmas=sg, boundaries=bd, final=final)
        if steps is not None and steps != len(times) - 1:
            raise ValueError(f"steps={steps} disagrees with the {len(times) - 1} steps of the custom sequence")
        steps = len(times) - 1
        if sg is not None:
            final = "zero" if sg[-1] == 0 else "t_min"
        if bd is not None:
            final = "zero" if bd[-1] == schedule.t_zero else "t_min"
    else:
        if steps is None:
            raise ValueError("plan() needs steps= (or a custom timesteps= / sigmas= / boundaries=)")
        _check_spacing_options(schedule, spacing_opts)
        times = timesteps(schedule, steps, spacing, final=final, **spacing_opts)
        if "steps_offset" in spacing_opts and times[0] > schedule.t_max:
            raise ValueError(f"steps_offset={spacing_opts['steps_offset']} moves the first timestep to "
                             f"{times[0]:g}, above the schedule's t_max={schedule.t_max:g}")
    guidance = opts.pop("guidance", "cfg")
    if not isinstance(guidance, str) or guidance not in GUIDANCE_MODES:
        raise unknown_name("guidance", guidance, GUIDANCE_MODES)
    cfgpp = guidance == "cfg++"
    if cfgpp and not SOLVERS[solver].cfgpp:
        raise ValueError(f"solver {solver!r} has no CFG++ variant; guidance='cfg++' works with "
                         f"{', '.join(cfgpp_solvers())}")
    stages, num_slots, opts_used = build(solver, schedule, prediction, times, final, opts, cfgpp=cfgpp)
    if cfgpp:
        opts_used = {**opts_used, "guidance": guidance}
    return Plan(key=key, solver=solver, schedule=schedule, steps=int(steps), prediction=prediction,
                spacing=spacing or (None if ts is not None or sg is not None or bd is not None
                                    else schedule.default_spacing),
                final=final, options=tuple(sorted(opts_used.items())), times=times, stages=stages,
                num_slots=num_slots, uncond_column=cfgpp)
