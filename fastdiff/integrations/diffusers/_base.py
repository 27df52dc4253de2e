"""The shared machinery of fastdiff's diffusers drop-in schedulers: the compiled program of one ``set_timesteps``
call (``_Program``), the per-run state (``StepState``) and the step / scale_model_input / add_noise mixin
(``_FastdiffStep``) that each scheduler class puts before diffusers' class in its bases."""

from __future__ import annotations

import functools
import importlib
import threading
from typing import NamedTuple

import numpy as np
import torch

try:
    import diffusers as _d
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - diffusers is a test dependency
    raise ImportError("fastdiff.integrations.diffusers needs diffusers: pip install diffusers") from e

from ... import ops, rng, thresholding
from ...backends import resolve
from ...plan import ROW_HEADER, StageFlags, fold_rows, row_length, x0_input_rows
from ...schedules import DiscreteVP

PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def _unsupported(what: str):
    raise NotImplementedError(f"fastdiff's drop-in scheduler does not implement {what}; use diffusers' own scheduler "
                              "for it")


def _f64(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


CX, CO, GAIN = (ROW_HEADER.index(name) for name in ("cx", "co", "g"))  # columns of a flat row


def data_estimate(rows, x, out):
    """D = cx x + co out [B, ...] of gathered rows [B|1, R], in the rows' dtype (torch ops: one pass)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return rows[:, CX].reshape(shape) * x.to(rows.dtype) + rows[:, CO].reshape(shape) * out.to(rows.dtype)


# A step the plan refuses (a noise prediction has no data estimate where alpha_bar <= 0, e.g. betas above 1; Euler's
# sigmas that rise): a NaN row, and stepping it raises the plan's error (diffusers' own step returns inf / NaN there).
_REFUSED_ROW = np.full(row_length(0), np.nan)
_REFUSED_ROW[GAIN:len(ROW_HEADER)] = 0.0  # no noise, no Langevin term: only D and x' are NaN
_REFUSED_FLAGS = StageFlags(0, 0, True, False, False)


@functools.lru_cache(maxsize=None)
def _output_class(path: str):
    """The diffusers class ``module.class`` under diffusers.schedulers (looked up once per name, not per step)."""
    module, name = path.split(".")
    return getattr(importlib.import_module(f"diffusers.schedulers.{module}"), name)


def _numbered_draws(flags):
    """Noise draw of each stage: 1, 2, ... in order over the stages that draw, -1 for the others."""
    noise = np.array([f.noise for f in flags], dtype=bool)
    return np.where(noise, np.cumsum(noise), -1)


def _stagewise(plan_of, num_stages):
    """(rows, flags, draws, refused) of one-step schedulers as one one-stage plan per step, ``plan_of(k)``; a step
    whose plan is refused gets a NaN row, and its error in ``refused`` [stage -> message]."""
    rows, flags, refused = [], [], {}
    for k in range(num_stages):
        try:
            p = plan_of(k)
            rows.append(p.shared_rows()[0])
            flags.append(p.stage_flags[0])
        except ValueError as e:
            rows.append(_REFUSED_ROW)
            flags.append(_REFUSED_FLAGS)
            refused[k] = str(e)
    return rows, flags, _numbered_draws(flags), refused


# ---------------------------------------------------------------------------------------------------------------
# The compiled program of one set_timesteps call
# ---------------------------------------------------------------------------------------------------------------


class _Program:
    """Rows of every diffusers ``step`` call (stage k = the k-th call), folded for the scheduler's sample space.

    The plan computes in x = alpha y; a scheduler whose sample is y (``a_in`` / ``a_out`` != 1) gets rows with the
    x columns scaled by ``a_in`` and the output row divided by ``a_out``.  ``rows`` are ``Plan.shared_rows()``
    (identity on unwritten slots), so per-sample rows of different stages run with the union of the slot masks.
    """

    def __init__(self, rows, flags, draws, num_slots, timesteps, a_in=None, a_out=None, peer_draws=None,
                 alpha_next=None, extra=None, refused=None):
        rows = np.asarray(rows, dtype=np.float64)
        S = rows.shape[0]
        self.rows64 = fold_rows(rows, num_slots, 1.0 if a_in is None else a_in, 1.0 if a_out is None else a_out)
        self.x0_rows64 = x0_input_rows(self.rows64)  # the model output replaced by a clipped / thresholded x0
        self.flags = tuple(StageFlags(*f) for f in flags)
        self.union = StageFlags.union(*self.flags)  # per-sample rows of different stages in one launch
        self.draws = np.asarray(draws, dtype=np.int64)
        self.num_slots = num_slots
        self.num_stages = S
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.timesteps_unique = len(np.unique(self.timesteps)) == len(self.timesteps)  # a timestep names a step
        self.in_scale = np.ones(S) if a_in is None else np.asarray(a_in, dtype=np.float64)
        self.peer_draws = tuple(bool(v) for v in (peer_draws if peer_draws is not None else [False] * S))
        self.alpha_next = None if alpha_next is None else np.asarray(alpha_next, dtype=np.float64)
        self.extra = extra or {}
        self.refused = dict(refused or {})  # stage -> why the plan has no row for it (stepping it raises that)
        self._device = {}

    def on(self, device, dtype):
        """Device tensors (rows, x0 rows, draws, noise gain, input scale, timesteps, alpha_next), cached; ``stages``
        holds each stage's kernel arguments (``_StageArgs``: row and draw views, Python flags), made once."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, cdt)
        hit = self._device.get(key)
        if hit is None:
            def t(a, dt=cdt):
                return torch.tensor(np.ascontiguousarray(a), dtype=dt, device=device)

            hit = dict(rows=t(self.rows64), x0_rows=t(self.x0_rows64), draws=t(self.draws, torch.int64),
                       gain=t(self.rows64[:, GAIN]), in_scale=t(self.in_scale),
                       timesteps=t(self.timesteps, torch.float64),
                       alpha_next=None if self.alpha_next is None else t(self.alpha_next))
            hit.update({k: t(v) for k, v in self.extra.items()})
            hit["no_draw"] = torch.full((1,), -1, dtype=torch.int64, device=device)
            hit["no_guidance"] = torch.zeros(1, dtype=torch.float32, device=device)
            host = self.rows64.astype(np.float32) if cdt == torch.float32 else self.rows64  # the device rows' values
            hit["stages"] = tuple(
                _StageArgs(hit["rows"][k : k + 1], hit["x0_rows"][k : k + 1], hit["draws"][k : k + 1],
                           int(f.slot_reads), int(f.slot_writes), bool(f.use_out), bool(f.noise), bool(f.langevin),
                           float(host[k, CX]), float(host[k, CO]), float(host[k, GAIN]))
                for k, f in enumerate(self.flags))
            self._device[key] = hit
        return hit


class _StageArgs(NamedTuple):
    """One stage's kernel arguments on a device: [1, R] row views (the plan's and the x0-input one), the draw [1],
    and the flags as Python ints / bools (what ``ops._step_kernel`` takes)."""

    rows: torch.Tensor
    x0_rows: torch.Tensor
    draws: torch.Tensor
    reads: int
    writes: int
    use_out: bool
    noise: bool
    langevin: bool
    cx: float  # the row's cx, co and noise gain as host numbers (exactly the device row's values): torch ops of x
    co: float  # in the rows' dtype with these scalars round as with the row's [1] columns, without gathers
    gain: float


class _Hot(NamedTuple):
    """What the common step repeats (the scheduler's own counter or a host timestep, no state / step_index / seeds /
    eta / x0 transform, the layout of the last step): recorded by a checked step, valid until set_timesteps or a
    new run start (``_fd_counter``) clears it; ``_fd_step_hot`` then skips the per-call resolution."""

    programs: dict  # the set_timesteps this belongs to
    begin: int  # the program's begin index (counter-indexed schedulers: stage = step counter - begin)
    num_stages: int
    stages: tuple  # _StageArgs per stage, None for a refused one (the slow path raises its error)
    peer_draws: tuple
    in_scale: tuple  # scale_model_input's factor per stage (host floats)
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    slots: torch.Tensor
    seeds: torch.Tensor
    no_draw: torch.Tensor
    no_guidance: torch.Tensor
    kernel: object
    backend: str  # the scheduler's backend attribute when recorded
    eta: object  # the program key's second entry (step's eta / order / ...) it was recorded with
    prog: _Program
    dev: dict  # prog.on(device, dtype)


_PROGRAMS: dict = {}  # programs by (class, config, begin/eta, timesteps, sigmas), oldest first
_PROGRAMS_LOCK = threading.Lock()
_KERNELS: dict = {}


class StepState:
    """Per-run state of a scheduler: the step counter and the history slots (one per concurrent sampling run).

    ``scheduler.new_state(begin_index=0)`` binds one to the scheduler's current ``set_timesteps``; ``step(...,
    state=s)`` then touches nothing else, so runs on different threads do not interfere.
    """

    def __init__(self, scheduler, begin_index: int = 0):
        if getattr(scheduler, "_fd_programs", None) is None:
            raise ValueError("call set_timesteps(...) before new_state()")
        self.scheduler_programs = scheduler._fd_programs
        self.step_index = int(begin_index)
        self.begin_index = int(begin_index)
        self.slots = None


# ---------------------------------------------------------------------------------------------------------------
# The shared step machinery
# ---------------------------------------------------------------------------------------------------------------


class _FastdiffStep:
    """Mixed into each diffusers scheduler class (before it in the MRO)."""

    _stateful = False  # multistep / multistage: history slots carry between calls, programs start at a begin index
    _index_by = "counter"  # "counter": diffusers' step counter names the step; "timestep": the timestep value does
    _scales_input = False  # Euler-type: scale_model_input divides by sqrt(sigma^2 + 1)
    _noise_fp32 = False  # diffusers draws its generator noise in float32 (else in the model output's dtype)
    _returns_x0 = False  # diffusers' output has pred_original_sample (the stage's data estimate D)
    _output = "scheduling_utils.SchedulerOutput"  # step's output class: module.class in diffusers.schedulers
    _ready_at_init = False  # diffusers' __init__ holds the training schedule and its step may run on it
    _unknown_timestep_is_last = False  # diffusers treats a timestep off the schedule as the last step
    backend = "auto"  # fastdiff backend for step: "auto", "cpu", "cuda", "triton" or "torch"
    # set per instance; class defaults so that a lookup before then never reaches diffusers' slow __getattr__
    _fd_programs = None
    _fd_slots_own = None
    _fd_hot = None  # _Hot of the common step, or None
    _fd_hot_ok = False  # set per class: the step resolution hooks are the mixin's own, so _fd_step_hot applies
    _fd_has_extra = False  # set per class: it overrides _fd_extra

    # -- what each scheduler provides --------------------------------------------------------------------------

    def _fd_build(self, begin: int, eta) -> _Program:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fd_check_config(self):
        pass

    def _fd_output(self, prev, x0):
        """diffusers' output of step: ``_output`` (module.class under diffusers.schedulers) with prev_sample, and
        pred_original_sample where the scheduler ``_returns_x0``."""
        output = _output_class(self._output)
        return output(prev_sample=prev, pred_original_sample=x0) if self._returns_x0 else output(prev_sample=prev)

    def _fd_tuple(self, prev, x0):
        """step's output with return_dict=False."""
        return (prev, x0) if self._returns_x0 else (prev,)

    def _fd_off_schedule(self, timestep, eta):
        """(program, stage) for a host timestep that is not on the schedule; by default an error."""
        ts = self._fd_ts_host
        raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps (set_timesteps gave "
                         f"{ts[:4].tolist()}...)")

    def _fd_extra(self, prog, dev, k, B, x, model_output, x0):
        return None

    # -- set_timesteps ------------------------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fd_hot_ok = all(getattr(cls, h) is getattr(_FastdiffStep, h) for h in _HOT_HOOKS)
        cls._fd_has_extra = cls._fd_extra is not _FastdiffStep._fd_extra
        stock = next((b for b in cls.__mro__ if b.__module__.startswith("diffusers.")), None)
        if stock is None or "set_timesteps" in cls.__dict__ or not cls.__module__.startswith(__package__):
            return  # an intermediate mixin, or a class that defines its own

        try:
            stock_set_timesteps = stock.set_timesteps
        except ImportError:  # diffusers' placeholder for a class whose optional dependency (torchsde) is missing:
            return  # instantiating it raises diffusers' own ImportError, which says what to install

        # diffusers' own signature (timesteps= / sigmas= / mu= ...): its retrieve_timesteps inspects it
        @functools.wraps(stock_set_timesteps)
        def set_timesteps(self, *args, **kwargs):
            self._fd_check_config()
            stock_set_timesteps(self, *args, **kwargs)
            self._fd_take_schedule()

        cls.set_timesteps = set_timesteps

    def _fd_take_schedule(self):
        """Host copies of the timesteps and noise levels, taken once per schedule, so that no later step copies
        from the device (a sync); programs are built from them on first use."""
        self._fd_ts_host = _f64(self.timesteps)
        # timestep value -> its step as diffusers' index_for_timestep picks it: the second of a repeated one
        ts = self._fd_ts_host.tolist()
        self._fd_ts_index = {t: i for i, t in enumerate(ts)}  # the last occurrence
        if len(self._fd_ts_index) < len(ts):  # repeats: the second occurrence
            seen = {}
            for i, t in enumerate(ts):
                seen[t] = seen.get(t, 0) + 1
                if seen[t] == 2:
                    self._fd_ts_index[t] = i
        self._fd_sig_host = _f64(self.sigmas) if hasattr(self, "sigmas") else np.zeros(0)
        self._fd_programs = {}  # (begin index, eta) -> _Program, built on first use
        self._fd_hot = None
        slots = getattr(self, "_fd_slots_own", None)
        if slots is not None and slots.numel():  # a new run starts from clean history (kept: its layout is checked)
            slots.zero_()
        self._fd_begin = 0
        self._fd_transform = self._fd_x0_transform()  # diffusers' config is frozen: decided once, not per step

    def _fd_programs_or_init(self):
        programs = getattr(self, "_fd_programs", None)
        if programs is None and self._ready_at_init:
            self._fd_check_config()
            self._fd_take_schedule()  # the training schedule diffusers' __init__ set up
            programs = self._fd_programs
        return programs

    def _fd_schedule(self) -> DiscreteVP:
        """The scheduler's own alpha_bar table (float64 of diffusers' float32 values) as a DiscreteVP."""
        if getattr(self, "_fd_schedule_cache", None) is None:
            if len(self.alphas_cumprod) < 2:
                _unsupported(f"num_train_timesteps={len(self.alphas_cumprod)} (a DiscreteVP has at least 2 steps)")
            self._fd_schedule_cache = DiscreteVP(betas=tuple(_betas_of(_f64(self.alphas_cumprod), _f64(self.betas))))
        return self._fd_schedule_cache

    def _fd_program(self, begin: int, eta=None) -> _Program:
        programs = self._fd_programs_or_init()
        if programs is None:
            raise ValueError("call set_timesteps(...) before step(...)")
        key = (begin if self._stateful else 0, eta)
        prog = programs.get(key)
        if prog is None:
            # the same configuration and timesteps give the same program: shared across set_timesteps calls
            gkey = (type(self).__name__, self._fd_config_key(), key, self._fd_ts_host.tobytes(),
                    self._fd_sig_host.tobytes())
            with _PROGRAMS_LOCK:
                prog = _PROGRAMS.get(gkey)
            if prog is None:
                prog = self._fd_build(key[0], eta)
                with _PROGRAMS_LOCK:
                    if len(_PROGRAMS) >= 128:
                        _PROGRAMS.pop(next(iter(_PROGRAMS)))
                    _PROGRAMS[gkey] = prog
            programs[key] = prog
        return prog

    def _fd_config_key(self):
        """The configuration as a hashable key, made once (diffusers' config is frozen after __init__)."""
        key = self.__dict__.get("_fd_config_key_cache")
        if key is None:
            key = self._fd_config_key_cache = tuple(sorted((k, repr(v)) for k, v in self.config.items()))
        return key

    def new_state(self, begin_index: int = 0) -> StepState:
        """A fresh per-run state for ``step(..., state=...)`` (thread-safe sampling with one scheduler)."""
        return StepState(self, begin_index)

    # -- which step: an int (host) or ("device", timesteps) / ("index", indices) resolved on the device ----------

    def _fd_host_index(self, timestep):
        """Index of a host timestep in ``self.timesteps`` as diffusers' ``index_for_timestep`` picks it (the second
        of a repeated timestep: Heun's first call of a step; off the schedule: the last step where diffusers says
        so, else None), or the string "device" when the timestep lives on an accelerator."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                return "device"
            timestep = timestep.reshape(-1)[0].item() if timestep.dim() else timestep.item()
        hit = self._fd_ts_index.get(float(timestep))
        if hit is None:
            return len(self._fd_ts_host) - 1 if self._unknown_timestep_is_last else None
        return hit

    def _fd_where(self, timestep, step_index, state, eta=None):
        """(program, k) with k the stage of the program: int, or a device-side selector for per-sample steps."""
        if self._fd_programs_or_init() is None:
            raise ValueError("call set_timesteps(...) before step(...) / scale_model_input(...)")
        if state is not None and state.scheduler_programs is not getattr(self, "_fd_programs", None):
            raise ValueError("this state belongs to an earlier set_timesteps call: make a new one with new_state()")
        if step_index is not None:
            prog = self._fd_program(0, eta)
            return prog, (("index", step_index) if isinstance(step_index, torch.Tensor) else int(step_index))
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            return self._fd_program(0, eta), ("device", timestep)
        if self._index_by == "timestep":
            host = self._fd_host_index(timestep)
            if host is None:
                return self._fd_off_schedule(timestep, eta)
            return self._fd_program(0, eta), (("device", timestep) if host == "device" else host)
        if state is not None:
            k, begin = state.step_index, state.begin_index
        else:
            k, begin = self._fd_counter(timestep), self._fd_begin
        if not self._stateful:
            begin = 0
        prog = self._fd_programs.get((begin, eta)) or self._fd_program(begin, eta)
        return prog, k - begin

    def _fd_counter(self, timestep):
        """diffusers' step counter: set on the first call from the begin index, else from the timestep (a host
        lookup; on an accelerator the run is taken to start at step 0, as pipelines that start later call
        set_begin_index)."""
        if self._step_index is None:
            start = self._begin_index
            if start is None:
                start = self._fd_host_index(timestep)
                if start is None:
                    self._fd_off_schedule(timestep, None)
                start = 0 if start == "device" else start
            self._step_index = self._fd_begin = int(start)
            self._fd_hot = None  # a new run start: its begin may differ
        return self._step_index

    def _fd_gather(self, prog, dev, name, k, batch):
        if isinstance(k, int):
            return dev[name][k : k + 1]
        kind, v = k
        if kind == "device":
            if not prog.timesteps_unique:
                raise ValueError(f"{type(self).__name__} repeats timesteps, so a timestep does not name a step: "
                                 "pass step_index= (an int or a [B] tensor)")
            t = torch.as_tensor(v, device=dev["timesteps"].device).to(torch.float64).reshape(-1)
            idx = (dev["timesteps"][None, :] == t[:, None]).to(torch.int8).argmax(dim=1)
            idx = idx.expand(batch) if idx.numel() == 1 else idx
        else:
            idx = v.to(dev[name].device).long().reshape(-1)
        if idx.numel() != batch:
            raise ValueError(f"per-sample timesteps / step_index must have one entry per sample ({batch}), got "
                             f"{idx.numel()}")
        return dev[name][idx]

    # -- scale_model_input / step -------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, step_index=None, state=None, **kwargs):
        """``sample`` times 1/sqrt(sigma^2 + 1) for Euler-type schedulers (gathered on the device), else as is."""
        if not self._scales_input:
            return sample
        self.is_scale_input_called = True
        hot = self._fd_hot
        if (hot is not None and step_index is None and state is None and self._index_by == "counter"
                and self._step_index is not None and hot.programs is self._fd_programs
                and not (type(timestep) is torch.Tensor and timestep.numel() > 1)):
            k = self._step_index - hot.begin
            if 0 <= k < hot.num_stages:
                return sample * hot.in_scale[k]
        prog, k = self._fd_where(timestep, step_index, state)
        if isinstance(k, int):  # a host constant: no gather
            return sample * float(prog.in_scale[k])
        dev = prog.on(sample.device, sample.dtype)
        scale = self._fd_gather(prog, dev, "in_scale", k, sample.shape[0])
        return (sample * scale.reshape((-1,) + (1,) * (sample.dim() - 1))).to(sample.dtype)

    def _fd_step(self, model_output, timestep, sample, *, generator=None, variance_noise=None, seeds=None,
                 step_index=None, state=None, return_dict=True, eta=None, raw_eps=False):
        hot = self._fd_hot
        if (hot is not None and state is None and step_index is None and seeds is None and variance_noise is None
                and eta == hot.eta and type(sample) is torch.Tensor and type(model_output) is torch.Tensor):
            done = self._fd_step_hot(hot, model_output, timestep, sample, generator, return_dict)
            if done is not None:
                return done
        if type(sample) is not torch.Tensor or type(model_output) is not torch.Tensor:
            if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
                raise ValueError("model_output and sample must be tensors")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has "
                             f"{tuple(sample.shape)}: the model must predict one value per sample element (learned "
                             "variance outputs are not supported)")
        if model_output.device != sample.device:
            raise ValueError(f"model_output is on {model_output.device} but sample on {sample.device}")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        B = sample.shape[0]
        prog, k = self._fd_where(timestep, step_index, state, eta)
        per_sample = type(k) is not int
        if not per_sample and not 0 <= k < prog.num_stages:
            raise ValueError(f"step {k} is outside the {prog.num_stages} steps of this run: call set_timesteps "
                             "again (or set_begin_index) before a new sampling run")
        if not per_sample and k in prog.refused:
            raise ValueError(f"{type(self).__name__} cannot step from timestep {prog.timesteps[k]:g}: "
                             f"{prog.refused[k]}")
        x = sample if sample.is_contiguous() else sample.contiguous()
        out = model_output if model_output.dtype is x.dtype else model_output.to(x.dtype)
        out = out if out.is_contiguous() else out.contiguous()
        dev = prog.on(x.device, x.dtype)
        if per_sample:  # rows of different stages gathered per sample, run with the union of their flags
            st = None
            f = prog.union
            reads, writes, use_out, noise, langevin = (int(f.slot_reads), int(f.slot_writes), bool(f.use_out),
                                                       bool(f.noise), bool(f.langevin))
            rows = self._fd_gather(prog, dev, "rows", k, B)
        else:  # a stage's precomputed arguments
            st = dev["stages"][k]
            rows, reads, writes, use_out, noise, langevin = st.rows, st.reads, st.writes, st.use_out, st.noise, \
                st.langevin
        x0 = D_raw = None
        transform = self._fd_transform
        host = st is not None and x.dtype is st.rows.dtype  # the row's host scalars apply to x as they are
        if transform is not None or self._returns_x0:
            # the stage's data estimate (pred_original_sample) with torch ops: one more pass over x and out
            x0 = D_raw = x * st.cx + out * st.co if host else data_estimate(rows, x, out)
        if transform is not None:
            # the predicted x0 of the whole sample, clipped / thresholded, is the model output of an x0-row
            x0 = transform(D_raw)
            if not raw_eps:
                rows = self._fd_gather(prog, dev, "x0_rows", k, B) if st is None else st.x0_rows
                out = x0.to(x.dtype).contiguous()
        # noise: diffusers' own draw when a generator or variance_noise is given, else Philox per sample
        external, own = variance_noise, False
        if external is None and generator is not None and (per_sample or prog.peer_draws[k]):
            ndt = torch.float32 if self._noise_fp32 else model_output.dtype
            external = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=ndt)
            own = True  # a fresh tensor of ours: may be scaled in place
        if external is not None or not noise:
            seeds_t = self._fd_seeds(None, B, x.device)  # not read: no stage draws
            draws = dev["no_draw"]
            noise = False
        else:
            seeds_t = self._fd_seeds(seeds, B, x.device)
            draws = self._fd_gather(prog, dev, "draws", k, B) if st is None else st.draws
        slots = self._fd_slots(state, prog, x)
        backend, kernel = self._fd_kernel(x)
        new_slots = False
        if slots is not None and type(x) is torch.Tensor and type(out) is torch.Tensor \
                and not torch.compiler.is_compiling():
            # the layout whose arguments passed ops.step's checks when these slots were made (x and out: above)
            prev = kernel(x, out, slots, rows, seeds_t, draws, dev["no_guidance"], reads, writes, use_out, False, noise,
                          langevin, None, None, None)
        else:  # a new layout of x (the slots follow its shape, dtype, device), a tensor subclass or compile
            new_slots = slots is None
            if new_slots:
                slots = torch.zeros((prog.num_slots,) + tuple(x.shape), dtype=x.dtype, device=x.device)
            prev = ops.step(x, out, slots, rows, seeds_t, draws, dev["no_guidance"], slot_reads=reads,
                            slot_writes=writes, use_out=use_out, cfg=False, noise=noise, langevin=langevin,
                            backend=backend)
            if new_slots:  # kept only once ops.step accepted them
                self._fd_keep_slots(state, slots)
        bshape = (-1,) + (1,) * (x.dim() - 1)
        if external is not None and host and external.dtype is x.dtype and external.device == x.device:
            prev += external.mul_(st.gain) if own else external * st.gain  # (prev is the kernel's new tensor)
        elif external is not None:
            gain = self._fd_gather(prog, dev, "gain", k, B).reshape(bshape)
            prev = (prev + gain * external.to(device=x.device, dtype=gain.dtype)).to(x.dtype)
        if transform is not None and raw_eps:
            # DDIM without use_clipped_model_output keeps the raw eps: x' = row(x, D_raw) + alpha' (x0 - D_raw)
            a = self._fd_gather(prog, dev, "alpha_next", k, B).reshape(bshape)
            prev = (prev.to(a.dtype) + a * (x0 - D_raw)).to(x.dtype)
        self._fd_advance(state, per_sample or step_index is not None)
        if (self._fd_hot_ok and host and state is None and step_index is None and seeds is None
                and variance_noise is None and transform is None and slots is self._fd_slots_own and slots is not None):
            self._fd_record_hot(prog, dev, x, out, slots, seeds_t, kernel, eta)
        extra = self._fd_extra(prog, dev, k, B, x, model_output, x0)
        if extra is not None:
            x0_out = extra
        elif x0 is None or not self._returns_x0:
            x0_out = None
        else:
            x0_out = x0 if x0.dtype is x.dtype else x0.to(x.dtype)
        return self._fd_output(prev, x0_out) if return_dict else self._fd_tuple(prev, x0_out)

    def _fd_record_hot(self, prog, dev, x, out, slots, seeds_t, kernel, eta):
        """Keep what a step of this layout repeats (``_Hot``) once a checked step ran with plain tensors."""
        if type(x) is not torch.Tensor or type(out) is not torch.Tensor or torch.compiler.is_compiling():
            return
        begin = self._fd_begin if self._stateful and self._index_by == "counter" else 0
        host = dev.get("hot")  # made once per program and device
        if host is None:
            host = dev["hot"] = (tuple(None if k in prog.refused else st for k, st in enumerate(dev["stages"])),
                                 tuple(float(v) for v in prog.in_scale))
        self._fd_hot = _Hot(self._fd_programs, begin, prog.num_stages, host[0], prog.peer_draws, host[1], x.shape,
                            x.dtype, x.device, slots, seeds_t, dev["no_draw"], dev["no_guidance"], kernel,
                            self.backend, eta, prog, dev)

    def _fd_step_hot(self, hot, model_output, timestep, sample, generator, return_dict):
        """The common step on a recorded layout (``_Hot``): the same arguments and results as the checked path
        below, without resolving them again; None where the call is not the common case (the caller then takes the
        checked path)."""
        if hot.programs is not self._fd_programs or self.backend != hot.backend:
            return None
        if type(timestep) is torch.Tensor and timestep.numel() > 1:
            return None  # per-sample timesteps
        counter = self._index_by == "counter"
        if counter:
            if self._step_index is None:
                return None
            k = self._step_index - hot.begin
        else:
            k = self._fd_host_index(timestep)
            if type(k) is not int:
                return None
        if not 0 <= k < hot.num_stages:
            return None
        st = hot.stages[k]
        x, out = sample, model_output
        if (st is None or x.shape != hot.shape or out.shape != hot.shape or x.dtype is not hot.dtype
                or out.dtype is not hot.dtype or x.device != hot.device or out.device != hot.device
                or not x.is_contiguous() or not out.is_contiguous() or self._fd_slots_own is not hot.slots
                or torch.compiler.is_compiling()):
            return None
        noise = st.noise
        external = None
        if generator is not None and hot.peer_draws[k]:
            ndt = torch.float32 if self._noise_fp32 else out.dtype
            if ndt is not x.dtype:
                return None
            external = randn_tensor(out.shape, generator=generator, device=out.device, dtype=ndt)
            noise = False
        x0 = (x * st.cx).add_(out * st.co) if self._returns_x0 else None  # x cx + out co, one temporary less
        prev = hot.kernel(x, out, hot.slots, st.rows, hot.seeds, st.draws if noise else hot.no_draw,
                          hot.no_guidance, st.reads, st.writes, st.use_out, False, noise, st.langevin, None, None,
                          None)
        if external is not None:  # our own draw and the kernel's new tensor: both scaled / added in place
            prev += external.mul_(st.gain)
        if counter:
            self._step_index += 1
        if self._fd_has_extra:
            x0 = self._fd_extra(hot.prog, hot.dev, k, x.shape[0], x, out, x0)
        return self._fd_output(prev, x0) if return_dict else self._fd_tuple(prev, x0)

    def _fd_x0_transform(self):
        cfg = self.config
        if getattr(cfg, "thresholding", False):
            ratio, max_value = float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)
            if max_value < 1.0:  # diffusers' clamp(s, min=1, max=max_value) is max_value whatever the quantile
                return lambda D: D.clamp(-max_value, max_value) / max_value
            return lambda D: thresholding.apply_threshold(D, thresholding.threshold_of(D, ratio, max_value))
        if getattr(cfg, "clip_sample", False):
            r = float(cfg.clip_sample_range)
            return lambda D: D.clamp(-r, r)
        return None

    def _fd_kernel(self, x):
        """(backend name, its kernel function ``ops._step_kernel``) for x, resolved once per (backend, device type)."""
        if x.dtype == torch.float64 and self.backend == "auto":
            return "torch", ops._step_kernel("torch")
        key = (self.backend, x.device.type)
        hit = _KERNELS.get(key)
        if hit is None:
            name = resolve(self.backend, x.device.type)
            hit = _KERNELS[key] = (name, ops._step_kernel(name))
        return hit

    def _fd_slots(self, state, prog, x):
        """The run's history slots [K, *x.shape] (``state``'s, else the scheduler's own), or None where x has a new
        layout (shape, dtype, device): then ``_fd_step`` makes new ones and checks every argument once."""
        slots = state.slots if state is not None else getattr(self, "_fd_slots_own", None)
        if (slots is None or slots.shape[0] != prog.num_slots or slots.shape[1:] != x.shape or slots.dtype != x.dtype
                or slots.device != x.device):
            return None
        return slots

    def _fd_keep_slots(self, state, slots):
        if state is not None:
            state.slots = slots
        else:
            self._fd_slots_own = slots

    def _fd_advance(self, state, explicit):
        if explicit or self._index_by == "timestep":
            return
        if state is not None:
            state.step_index += 1
        else:
            self._step_index += 1

    _ARANGE: dict = {}

    def _fd_seeds(self, seeds, batch, device):
        if seeds is None:  # default seeds 0 .. B-1 (cached: a step allocates nothing it need not)
            key = (batch, device)
            hit = self._ARANGE.get(key)
            if hit is None:
                hit = self._ARANGE[key] = torch.arange(batch, dtype=torch.int64, device=device)
            return hit
        if isinstance(seeds, torch.Tensor):
            if seeds.shape != (batch,):
                raise ValueError(f"seeds must have one entry per sample ({batch}), got shape {tuple(seeds.shape)}")
            return seeds.to(device=device, dtype=torch.int64)
        seeds = list(seeds)
        if len(seeds) != batch:
            raise ValueError(f"seeds must have one entry per sample ({batch}), got {len(seeds)}")
        return rng.seeds_tensor(seeds, device=device)

    # -- forward process --------------------------------------------------------------------------------------------

    def _fd_levels_for(self, timesteps, device):
        """(alpha, sigma) [B] of the forward process at integer ``timesteps`` (overridden for sigma schedulers)."""
        ab = self._fd_table("alphas_cumprod", lambda: _f64(self.alphas_cumprod), device)
        idx = torch.as_tensor(timesteps, device=device).long().reshape(-1)
        a = ab[idx]
        return a.sqrt(), (1.0 - a).sqrt()

    def _fd_table(self, name, host, device):
        """A float64 table on ``device``, copied once per set_timesteps (add_noise copies nothing per call)."""
        cache = self.__dict__.setdefault("_fd_tables", {})
        key = (name, str(device), id(getattr(self, "_fd_programs", None)))
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 16:
                cache.clear()
            hit = cache[key] = torch.as_tensor(host(), dtype=torch.float64, device=device)
        return hit

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise with per-sample timesteps, gathered on the device (no host sync)."""
        a, s = self._fd_levels_for(timesteps, original_samples.device)
        B = original_samples.shape[0]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = a.expand(B) if a.numel() == 1 else a
        s = s.expand(B) if s.numel() == 1 else s
        cdt = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
        x = a.to(cdt).reshape(shape) * original_samples.to(cdt) + s.to(cdt).reshape(shape) * noise.to(cdt)
        return x.to(original_samples.dtype)


# hooks that resolve a step; a class that overrides one keeps the checked path of _fd_step for every call
_HOT_HOOKS = ("_fd_where", "_fd_counter", "_fd_advance", "_fd_host_index", "_fd_program", "_fd_slots",
              "_fd_seeds", "_fd_kernel")


def _betas_of(alphas_cumprod: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Betas [N] whose cumulative product is diffusers' float32 alpha_bar table, in float64.

    Where that table has underflowed to 0 (or went negative for betas > 1), the ratio of neighbours is 0/0 or out of
    (0, 1): there the configured betas stand in, clipped into (0, 1) (diffusers' own step gives inf / NaN there).
    A last beta of 1 (zero terminal SNR) is kept.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 - alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
    out = np.where(out <= 0.0, 1e-300, out)  # float32 ties: alpha_bar did not move
    ok = out < 1.0  # False for NaN
    ok[-1] |= out[-1] == 1.0
    out[~ok] = np.clip(betas[~ok], 1e-300, 1.0 - 2.0**-52)
    return out
