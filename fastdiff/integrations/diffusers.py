"""diffusers drop-in schedulers whose ``step`` is a fastdiff plan row in the fused step kernel.

Each class subclasses the diffusers scheduler of the same name, so configuration (``from_config``, ``save_config``,
``config``), ``set_timesteps`` (timesteps and noise levels exactly as diffusers computes them, every spacing and
sigma option included), ``init_noise_sigma``, ``order`` and the output classes are diffusers' own and pipelines
accept the scheduler unchanged.  What is replaced is the arithmetic:

- ``set_timesteps`` compiles diffusers' noise levels into a fastdiff ``Plan`` (the solver math lives in
  ``fastdiff.solvers``, once) and moves its coefficient rows to the device;
- ``step`` executes one row with ``fastdiff.ops.step``: one memory pass, coefficients read from device memory, no
  host sync (usable inside CUDA-graph capture), per-sample timesteps in one call (``timestep`` a [B] tensor, or
  ``step_index=`` a [B] tensor), Philox noise per sample (``seeds=``) unless a ``generator`` or ``variance_noise``
  is given, in which case the noise is drawn exactly as diffusers draws it;
- ``scale_model_input`` and ``add_noise`` / ``scale_noise`` gather their factors on the device.

Stateless use (threads): ``state = scheduler.new_state()`` after ``set_timesteps``; ``step(..., state=state)`` then
reads and writes only ``state`` (its counter and history), never the scheduler, so one scheduler serves many
concurrent sampling runs.

Euler-type schedulers (Euler, Euler ancestral, Heun) work on diffusers' ``x / alpha``; the rows fold that scaling
in (``_Program``), so the kernel still makes one pass.  Clipping and Imagen thresholding of the predicted x0
(``clip_sample``, ``thresholding``) need the x0 of the whole sample first: that path computes it with torch ops
and hands it to the kernel as the model output of an x0-row.

Differences to diffusers, each a diffusers bug that fastdiff does not copy (pinned in the tests): DDPM with
``variance_type="fixed_large"`` adds noise on its final step; DPM-Solver++ SDE order 3 has a sign error in its D2
coefficient; UniPC bh1 returns NaN with ``final_sigmas_type="zero"``.  Options fastdiff does not implement raise
``NotImplementedError`` from ``set_timesteps`` naming the option.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

try:
    import diffusers as _d
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as e:  # pragma: no cover - diffusers is a test dependency
    raise ImportError("fastdiff.integrations.diffusers needs diffusers: pip install diffusers") from e

from .. import ops, rng
from ..backends import resolve
from ..plan import plan as make_plan
from ..schedules import DiscreteVP, RectifiedFlow

__all__ = ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
           "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
           "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "LCMScheduler", "StepState"]

PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def _unsupported(what: str):
    raise NotImplementedError(f"fastdiff's drop-in scheduler does not implement {what}; use diffusers' own scheduler "
                              "for it")


def _f64(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().to("cpu", torch.float64).numpy(), dtype=np.float64)


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
                 alpha_next=None, extra=None):
        rows = np.array(rows, dtype=np.float64)
        S, K = rows.shape[0], num_slots
        a_in = np.ones(S) if a_in is None else np.asarray(a_in, dtype=np.float64)
        a_out = np.ones(S) if a_out is None else np.asarray(a_out, dtype=np.float64)
        M = rows[:, ops.ROW_HEAD:].reshape(S, 1 + K, 2 + K)
        rows[:, 0] *= a_in  # D = cx x + co out with x = a_in y
        M[:, :, 0] *= a_in[:, None]
        M[:, 0, :] /= a_out[:, None]  # y' = x' / a_out
        rows[:, 2] /= a_out
        rows[:, ops.ROW_HEAD:] = M.reshape(S, -1)
        self.rows64 = rows
        x0_rows = rows.copy()
        x0_rows[:, 0], x0_rows[:, 1] = 0.0, 1.0  # D = out: the model output replaced by a clipped x0
        self.x0_rows64 = x0_rows
        self.flags = tuple(flags)
        self.union = (int(np.bitwise_or.reduce([f[0] for f in flags])), int(np.bitwise_or.reduce([f[1] for f in flags])),
                      True, any(f[3] for f in flags), False)
        self.draws = np.asarray(draws, dtype=np.int64)
        self.num_slots = K
        self.num_stages = S
        self.timesteps = np.asarray(timesteps, dtype=np.float64)
        self.timesteps_unique = len(np.unique(self.timesteps)) == len(self.timesteps)  # a timestep names a step
        self.in_scale = a_in
        self.peer_draws = tuple(bool(v) for v in (peer_draws if peer_draws is not None else [False] * S))
        self.alpha_next = None if alpha_next is None else np.asarray(alpha_next, dtype=np.float64)
        self.extra = extra or {}
        self._device = {}

    def on(self, device, dtype):
        """Device tensors (rows, x0 rows, draws, noise gain, input scale, timesteps, alpha_next), cached."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        key = (str(device), cdt)
        hit = self._device.get(key)
        if hit is None:
            def t(a, dt=cdt):
                return torch.tensor(np.ascontiguousarray(a), dtype=dt, device=device)

            hit = dict(rows=t(self.rows64), x0_rows=t(self.x0_rows64), draws=t(self.draws, torch.int64),
                       gain=t(self.rows64[:, 2]), in_scale=t(self.in_scale), timesteps=t(self.timesteps, torch.float64),
                       alpha_next=None if self.alpha_next is None else t(self.alpha_next))
            hit.update({k: t(v) for k, v in self.extra.items()})
            hit["no_draw"] = torch.full((1,), -1, dtype=torch.int64, device=device)
            hit["no_guidance"] = torch.zeros(1, dtype=torch.float32, device=device)
            self._device[key] = hit
        return hit


def _identity_row(num_slots):
    row = np.zeros(ops.row_length(num_slots))
    row[ops.ROW_HEAD] = 1.0  # x' = x
    return row


def _stacked(plans_or_none, num_slots=0):
    """Rows / flags / draws of one-stage plans laid end to end (None: a step that does nothing)."""
    rows, flags, draws = [], [], []
    for k, p in enumerate(plans_or_none):
        if p is None:
            rows.append(_identity_row(num_slots))
            flags.append((0, 0, True, False, False))
            draws.append(-1)
            continue
        assert p.num_stages == 1 and p.num_slots == num_slots
        rows.append(p.shared_rows()[0])
        flags.append(p.stage_flags[0])
        draws.append(k + 1 if p.stage_flags[0][3] else -1)
    return rows, flags, draws


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
    backend = "auto"  # fastdiff backend for step: "auto", "cpu", "cuda", "triton" or "torch"

    # -- what each scheduler provides --------------------------------------------------------------------------

    def _fd_build(self, begin: int, eta) -> _Program:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fd_check_config(self):
        pass

    def _fd_output(self, prev, x0):
        return _d.schedulers.scheduling_utils.SchedulerOutput(prev_sample=prev)

    def _fd_tuple(self, prev, x0):
        return (prev,)

    def _fd_extra(self, prog, dev, k, B, x, model_output, x0):
        return None

    # -- set_timesteps ------------------------------------------------------------------------------------------

    def set_timesteps(self, *args, **kwargs):
        self._fd_check_config()
        super().set_timesteps(*args, **kwargs)
        # host copies, taken once here, so that no later step copies from the device (a sync)
        self._fd_ts_host = _f64(self.timesteps)
        self._fd_sig_host = _f64(self.sigmas) if hasattr(self, "sigmas") else np.zeros(0)
        self._fd_programs = {}  # (begin index, eta) -> _Program, built on first use
        self._fd_slots_own = None
        self._fd_begin = 0

    def _fd_schedule(self) -> DiscreteVP:
        """The scheduler's own alpha_bar table (float64 of diffusers' float32 values) as a DiscreteVP."""
        if getattr(self, "_fd_schedule_cache", None) is None:
            ab = _f64(self.alphas_cumprod)
            betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
            self._fd_schedule_cache = DiscreteVP(betas=tuple(np.clip(betas, 1e-300, 1.0)))
        return self._fd_schedule_cache

    def _fd_program(self, begin: int, eta=None) -> _Program:
        programs = getattr(self, "_fd_programs", None)
        if programs is None:
            raise ValueError("call set_timesteps(...) before step(...)")
        key = (begin if self._stateful else 0, eta)
        prog = programs.get(key)
        if prog is None:
            # the same configuration and timesteps give the same program: shared across set_timesteps calls
            gkey = (type(self).__name__, tuple(sorted((k, repr(v)) for k, v in self.config.items())), key,
                    self._fd_ts_host.tobytes(), self._fd_sig_host.tobytes())
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

    def new_state(self, begin_index: int = 0) -> StepState:
        """A fresh per-run state for ``step(..., state=...)`` (thread-safe sampling with one scheduler)."""
        return StepState(self, begin_index)

    # -- which step: an int (host) or ("device", timesteps) / ("index", indices) resolved on the device ----------

    def _fd_host_index(self, timestep):
        """Index of a host timestep in ``self.timesteps``, or None when it lives on an accelerator."""
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                return None
            timestep = timestep.reshape(-1)[0].item()
        ts = self._fd_ts_host
        hit = np.flatnonzero(ts == float(timestep))
        if hit.size == 0:
            raise ValueError(f"timestep {timestep} is not one of this scheduler's timesteps (set_timesteps gave "
                             f"{ts[:4].tolist()}...)")
        return int(hit[0])

    def _fd_where(self, timestep, step_index, state, eta=None):
        """(program, k) with k the stage of the program: int, or a device-side selector for per-sample steps."""
        if getattr(self, "_fd_programs", None) is None:
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
            return self._fd_program(0, eta), (("device", timestep) if host is None else host)
        if state is not None:
            k, begin = state.step_index, state.begin_index
        else:
            k, begin = self._fd_counter(timestep), self._fd_begin
        prog = self._fd_program(begin, eta)
        return prog, k - (begin if self._stateful else 0)

    def _fd_counter(self, timestep):
        """diffusers' step counter: set on the first call from the begin index, else from the timestep (a host
        lookup; on an accelerator the run is taken to start at step 0, as pipelines that start later call
        set_begin_index)."""
        if self._step_index is None:
            start = self._begin_index
            if start is None:
                start = self._fd_host_index(timestep) or 0
            self._step_index = self._fd_begin = int(start)
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
        prog, k = self._fd_where(timestep, step_index, state)
        if isinstance(k, int):  # a host constant: no gather
            return sample * float(prog.in_scale[k])
        dev = prog.on(sample.device, sample.dtype)
        scale = self._fd_gather(prog, dev, "in_scale", k, sample.shape[0])
        return (sample * scale.reshape((-1,) + (1,) * (sample.dim() - 1))).to(sample.dtype)

    def _fd_step(self, model_output, timestep, sample, *, generator=None, variance_noise=None, seeds=None,
                 step_index=None, state=None, return_dict=True, eta=None, raw_eps=False):
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
        per_sample = not isinstance(k, int)
        if not per_sample and not 0 <= k < prog.num_stages:
            raise ValueError(f"step {k} is outside the {prog.num_stages} steps of this run: call set_timesteps "
                             "again (or set_begin_index) before a new sampling run")
        dev = prog.on(sample.device, sample.dtype)
        reads, writes, use_out, noise, langevin = prog.union if per_sample else prog.flags[k]
        rows = self._fd_gather(prog, dev, "rows", k, B)
        x = sample.contiguous()
        out = model_output.to(x.dtype).contiguous()
        bshape = (-1,) + (1,) * (x.dim() - 1)
        x0 = D_raw = None
        transform = self._fd_x0_transform()
        if transform is not None:
            # the predicted x0 of the whole sample, clipped / thresholded, is the model output of an x0-row
            cdt = rows.dtype
            D_raw = rows[:, 0].reshape(bshape) * x.to(cdt) + rows[:, 1].reshape(bshape) * out.to(cdt)
            x0 = transform(D_raw)
            if not raw_eps:
                rows = self._fd_gather(prog, dev, "x0_rows", k, B)
                out = x0.to(x.dtype).contiguous()
        # noise: diffusers' own draw when a generator or variance_noise is given, else Philox per sample
        external = variance_noise
        if external is None and generator is not None and (per_sample or prog.peer_draws[k]):
            ndt = torch.float32 if self._noise_fp32 else model_output.dtype
            external = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=ndt)
        if external is not None or not noise:
            seeds_t = self._fd_seeds(None, B, x.device)  # not read: no stage draws
            draws = dev["no_draw"]
            noise = False
        else:
            seeds_t = self._fd_seeds(seeds, B, x.device)
            draws = self._fd_gather(prog, dev, "draws", k, B)
        prev = ops.step(x, out, self._fd_slots(state, prog, x), rows, seeds_t, draws, dev["no_guidance"],
                        slot_reads=reads, slot_writes=writes,
                        use_out=use_out, cfg=False, noise=noise, langevin=langevin, kernel=self._fd_kernel(x))
        if external is not None:
            gain = self._fd_gather(prog, dev, "gain", k, B).reshape(bshape)
            prev = (prev + gain * external.to(device=x.device, dtype=gain.dtype)).to(x.dtype)
        if transform is not None and raw_eps:
            # DDIM without use_clipped_model_output keeps the raw eps: x' = row(x, D_raw) + alpha' (x0 - D_raw)
            a = self._fd_gather(prog, dev, "alpha_next", k, B).reshape(bshape)
            prev = (prev.to(a.dtype) + a * (x0 - D_raw)).to(x.dtype)
        self._fd_advance(state, per_sample or step_index is not None)
        extra = self._fd_extra(prog, dev, k, B, x, model_output, x0)
        x0_out = extra if extra is not None else (None if x0 is None else x0.to(x.dtype))
        return self._fd_output(prev, x0_out) if return_dict else self._fd_tuple(prev, x0_out)

    def _fd_x0_transform(self):
        cfg = self.config
        if getattr(cfg, "thresholding", False):
            ratio, max_value = float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)
            return lambda D: _threshold(D, ratio, max_value)
        if getattr(cfg, "clip_sample", False):
            r = float(cfg.clip_sample_range)
            return lambda D: D.clamp(-r, r)
        return None

    def _fd_kernel(self, x):
        if x.dtype == torch.float64 and self.backend == "auto":
            return "torch"
        key = (self.backend, x.device.type)
        kernel = _KERNELS.get(key)
        if kernel is None:
            kernel = _KERNELS[key] = resolve(self.backend, x.device.type)
        return kernel

    def _fd_slots(self, state, prog, x):
        holder, attr = (state, "slots") if state is not None else (self, "_fd_slots_own")
        slots = getattr(holder, attr, None)
        shape = (prog.num_slots,) + tuple(x.shape)
        if slots is None or tuple(slots.shape) != shape or slots.dtype != x.dtype or slots.device != x.device:
            slots = torch.zeros(shape, dtype=x.dtype, device=x.device)
            setattr(holder, attr, slots)
        return slots

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
            key = (batch, str(device))
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


def _threshold(D: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022): per sample s = clamp(quantile(|D|, ratio), 1, max_value),
    D = clamp(D, -s, s) / s, computed in float32 (or float64)."""
    B = D.shape[0]
    flat = D.reshape(B, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]
    return (flat.clamp(-s, s) / s).reshape(D.shape)


# ---------------------------------------------------------------------------------------------------------------
# Timestep-indexed VP schedulers: DDIM, DDPM, LCM (diffusers finds the step from the timestep's value)
# ---------------------------------------------------------------------------------------------------------------


class DDIMScheduler(_FastdiffStep, _d.DDIMScheduler):
    """diffusers' DDIM (eta via ``step(eta=...)``) on fastdiff's ``ddim`` rows; each step goes from t to
    t - num_train_timesteps // num_inference_steps, as diffusers' does."""

    _index_by = "timestep"

    def _fd_build(self, begin, eta):
        sched = self._fd_schedule()
        ts = self._fd_ts_host
        stride = self.config.num_train_timesteps // self.num_inference_steps
        end = -1.0 if self.config.set_alpha_to_one else 0.0  # final_alpha_cumprod: 1 or alpha_bar[0]
        plans, alpha_next = [], []
        for t in ts:
            prev = t - stride if t - stride >= 0 else end
            alpha_next.append(1.0 if prev == -1.0 else math.sqrt(float(sched.alphas_cumprod[int(prev)])))
            plans.append(None if prev >= t else make_plan(
                "ddim", sched, prediction=PREDICTION[self.config.prediction_type], boundaries=[t, prev], eta=eta))
        rows, flags, draws = _stacked(plans)
        return _Program(rows, flags, draws, 0, ts, peer_draws=[eta > 0] * len(ts), alpha_next=alpha_next)

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        """diffusers' DDIM step; with eta > 0 and neither ``generator`` nor ``variance_noise`` the noise is
        fastdiff's Philox draw of ``seeds`` ([B] ints, default 0..B-1); ``timestep`` may be a [B] tensor."""
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        return self._fd_step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                             seeds=seeds, step_index=step_index, state=state, return_dict=return_dict, eta=eta,
                             raw_eps=not use_clipped_model_output)

    def _fd_output(self, prev, x0):
        return _d.schedulers.scheduling_ddim.DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _fd_tuple(self, prev, x0):
        return (prev, x0)


class DDPMScheduler(_FastdiffStep, _d.DDPMScheduler):
    """diffusers' DDPM (variance_type fixed_small / fixed_large) on fastdiff's ``ddpm`` rows."""

    _index_by = "timestep"

    def _fd_check_config(self):
        v = self.config.variance_type
        if v in ("learned", "learned_range"):
            _unsupported(f"variance_type={v!r} (a model that predicts its variance)")
        if v == "fixed_large_log":
            _unsupported("variance_type='fixed_large_log'")

    def _fd_build(self, begin, eta):
        ts = self._fd_ts_host
        variance = "fixed_large" if self.config.variance_type == "fixed_large" else "fixed_small"
        p = make_plan("ddpm", self._fd_schedule(), prediction=PREDICTION[self.config.prediction_type],
                      boundaries=list(ts) + [-1.0], variance=variance)
        return _Program(p.shared_rows(), p.stage_flags, p.draw, 0, ts, peer_draws=ts > 0)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)

    def _fd_output(self, prev, x0):
        return _d.schedulers.scheduling_ddpm.DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _fd_tuple(self, prev, x0):
        return (prev, x0)


class LCMScheduler(_FastdiffStep, _d.LCMScheduler):
    """diffusers' LCM multistep consistency sampling on fastdiff's ``lcm`` rows; returns ``denoised`` too."""

    _index_by = "timestep"

    def _fd_build(self, begin, eta):
        from ..solvers.consistency import boundary_scalings

        ts = self._fd_ts_host
        scaling = float(self.config.timestep_scaling)
        p = make_plan("lcm", self._fd_schedule(), prediction=PREDICTION[self.config.prediction_type],
                      boundaries=list(ts) + [-1.0], timestep_scaling=scaling)
        c = np.array([boundary_scalings(float(t), scaling) for t in ts]).reshape(-1, 2)
        return _Program(p.shared_rows(), p.stage_flags, p.draw, 0, ts, peer_draws=np.arange(len(ts)) != len(ts) - 1,
                        extra={"c_skip": c[:, 0], "c_out": c[:, 1]})

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)

    def _fd_extra(self, prog, dev, k, B, x, model_output, x0):
        # denoised = c_skip x + c_out x0: what the LCM pipeline returns after its last step
        bshape = (-1,) + (1,) * (x.dim() - 1)
        rows = self._fd_gather(prog, dev, "rows", k, B)
        cdt = rows.dtype
        if x0 is None:
            x0 = rows[:, 0].reshape(bshape) * x.to(cdt) + rows[:, 1].reshape(bshape) * model_output.to(cdt)
        c_skip = self._fd_gather(prog, dev, "c_skip", k, B).reshape(bshape)
        c_out = self._fd_gather(prog, dev, "c_out", k, B).reshape(bshape)
        return (c_skip * x.to(cdt) + c_out * x0).to(x.dtype)

    def _fd_output(self, prev, denoised):
        return _d.schedulers.scheduling_lcm.LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    def _fd_tuple(self, prev, denoised):
        return (prev, denoised)


# ---------------------------------------------------------------------------------------------------------------
# Sigma-indexed schedulers: the plan runs on diffusers' own noise levels ``self.sigmas`` (sigma / alpha)
# ---------------------------------------------------------------------------------------------------------------


class _SigmaScheduler(_FastdiffStep):
    _stateful = True

    def _fd_solver(self, begin):  # -> (solver name, options)  # pragma: no cover - abstract
        raise NotImplementedError

    def _fd_grid(self, begin):
        """The plan's k-diffusion sigmas from step ``begin`` on (with the final value)."""
        return self._fd_sig_host[begin:]

    def _fd_build(self, begin, eta):
        grid = self._fd_grid(begin)
        solver, opts = self._fd_solver(begin)
        p = make_plan(solver, self._fd_schedule(), prediction=PREDICTION[self.config.prediction_type],
                      sigmas=list(grid), **opts)
        ts = self._fd_ts_host[begin:]
        if p.num_stages != len(ts) or not all(p.calls_model):  # one model call per diffusers step
            raise AssertionError(f"{solver} plan has {p.num_stages} stages for {len(ts)} timesteps")
        return _Program(p.shared_rows(), p.stage_flags, p.draw, p.num_slots, ts, peer_draws=self._fd_peer_draws(len(ts)),
                        **self._fd_fold(begin))

    def _fd_peer_draws(self, n):
        return [False] * n

    def _fd_fold(self, begin):
        return {}

    def _fd_levels_for(self, timesteps, device):
        """(alpha, sigma) at the sigmas of ``timesteps``, indexed as diffusers' add_noise does (by timestep before
        set_begin_index, else at the current step / the begin index)."""
        sig = self._fd_table("sigmas", lambda: self._fd_sig_host, device)
        ts = self._fd_table("timesteps", lambda: self._fd_ts_host, device)
        t = torch.as_tensor(timesteps, device=device).to(torch.float64).reshape(-1)
        if self.begin_index is None:
            idx = (ts[None, :] == t[:, None]).to(torch.int8).argmax(dim=1)
        else:
            at = self.step_index if self.step_index is not None else self.begin_index
            idx = torch.full(t.shape, at, dtype=torch.long, device=device)
        return self._fd_alpha_sigma(sig[idx])

    def _fd_alpha_sigma(self, s):
        a = 1.0 / torch.sqrt(1.0 + s * s)
        return a, s * a


class _EulerFamily(_SigmaScheduler):
    """Samples in y = x / alpha (k-diffusion's space): scale_model_input multiplies by alpha, the rows are folded."""

    _scales_input = True

    def _fd_fold(self, begin):
        sig = self._fd_sig_host[begin:]  # stage k reads sigmas[k] and lands on sigmas[k + 1] (Heun's repeat too)
        a = 1.0 / np.sqrt(1.0 + sig * sig)
        return {"a_in": a[:-1], "a_out": a[1:]}

    def _fd_alpha_sigma(self, s):
        return torch.ones_like(s), s  # add_noise in y: x0 + sigma noise


class EulerDiscreteScheduler(_EulerFamily, _d.EulerDiscreteScheduler):
    """diffusers' Euler (Karras et al. 2022, Algorithm 1 in y) on fastdiff's ``euler`` rows."""

    _stateful = False

    def _fd_solver(self, begin):
        return "euler", {}

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, return_dict: bool = True, *,
             seeds=None, step_index=None, state=None):
        if s_churn != 0.0:
            _unsupported("EulerDiscreteScheduler.step(s_churn > 0) (diffusers applies the model output of sigma "
                         "at sigma_hat); fastdiff's euler / heun plans take s_churn with Karras' Algorithm 2")
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)

    def _fd_output(self, prev, x0):
        return _d.schedulers.scheduling_euler_discrete.EulerDiscreteSchedulerOutput(prev_sample=prev,
                                                                                    pred_original_sample=x0)

    def _fd_tuple(self, prev, x0):
        return (prev, x0)


class EulerAncestralDiscreteScheduler(_EulerFamily, _d.EulerAncestralDiscreteScheduler):
    """diffusers' Euler ancestral on fastdiff's ``euler_ancestral`` rows (eta = 1)."""

    _stateful = False

    def _fd_solver(self, begin):
        return "euler_ancestral", {"eta": 1.0}

    def _fd_peer_draws(self, n):
        return [True] * n

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)

    def _fd_output(self, prev, x0):
        from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput

        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _fd_tuple(self, prev, x0):
        return (prev, x0)


class HeunDiscreteScheduler(_EulerFamily, _d.HeunDiscreteScheduler):
    """diffusers' Heun (Karras et al. 2022, Algorithm 1) on fastdiff's ``heun`` rows; its timesteps repeat (two
    model calls per step), so per-sample steps take ``step_index=``."""

    def _fd_grid(self, begin):
        if begin % 2:
            raise ValueError("HeunDiscreteScheduler: begin_index must be even (the first call of a step)")
        sig = self._fd_sig_host[begin:]  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        return np.concatenate([sig[0:-1:2], sig[-1:]])

    def _fd_solver(self, begin):
        return "heun", {}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


class DPMSolverMultistepScheduler(_SigmaScheduler, _d.DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ multistep (orders 1-3, midpoint / heun, ODE and SDE) on fastdiff's dpmpp rows."""

    _noise_fp32 = True

    def _fd_check_config(self):
        c = self.config
        if c.variance_type in ("learned", "learned_range"):
            _unsupported(f"variance_type={c.variance_type!r}")
        if c.use_flow_sigmas:
            _unsupported("use_flow_sigmas=True")
        if c.algorithm_type == "sde-dpmsolver" and c.solver_order == 3:
            _unsupported("algorithm_type='sde-dpmsolver' with solver_order=3 (diffusers has no such update)")

    def _fd_solver(self, begin):
        c = self.config
        opts = {"solver_type": c.solver_type, "lower_order_final": bool(c.lower_order_final),
                "euler_at_final": bool(c.euler_at_final)}
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver"):  # noise prediction
            return "dpm_solver_multistep", dict(opts, order=int(c.solver_order), algorithm=c.algorithm_type)
        if c.solver_order == 1:  # the first-order update of dpmsolver++ / sde-dpmsolver++
            return "dpm_solver_singlestep", {"order": 1, "algorithm": c.algorithm_type}
        sde = c.algorithm_type == "sde-dpmsolver++"
        if sde:
            opts["eta"] = 1.0
        return {(2, False): "dpmpp_2m", (3, False): "dpmpp_3m", (2, True): "dpmpp_2m_sde",
                (3, True): "dpmpp_3m_sde"}[(int(c.solver_order), sde)], opts

    def _fd_peer_draws(self, n):
        return [self.config.algorithm_type.startswith("sde")] * n

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True,
             *, seeds=None, step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                             seeds=seeds, step_index=step_index, state=state, return_dict=return_dict)


class DPMSolverSinglestepScheduler(_SigmaScheduler, _d.DPMSolverSinglestepScheduler):
    """diffusers' singlestep DPM-Solver(++) on fastdiff's ``dpm_solver_singlestep`` rows with diffusers' order list."""

    def _fd_check_config(self):
        c = self.config
        if c.variance_type in ("learned", "learned_range"):
            _unsupported(f"variance_type={c.variance_type!r}")
        if getattr(c, "use_flow_sigmas", False):
            _unsupported("use_flow_sigmas=True")

    def _fd_solver(self, begin):
        c = self.config
        sub = [int(o) for o in self.order_list][begin:]
        orders = tuple(min(o, j + 1) for j, o in enumerate(sub))  # diffusers lowers the first orders of a late start
        return "dpm_solver_singlestep", {"order": int(c.solver_order), "algorithm": c.algorithm_type,
                                         "solver_type": c.solver_type, "orders": orders}

    def _fd_peer_draws(self, n):
        return [self.config.algorithm_type == "sde-dpmsolver++"] * n

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, *, seeds=None,
             step_index=None, state=None):
        return self._fd_step(model_output, timestep, sample, generator=generator, seeds=seeds,
                             step_index=step_index, state=state, return_dict=return_dict)


class UniPCMultistepScheduler(_SigmaScheduler, _d.UniPCMultistepScheduler):
    """diffusers' UniPC (data prediction, bh1 / bh2, orders 1-3, corrector) on fastdiff's ``unipc`` rows."""

    def _fd_check_config(self):
        c = self.config
        if not c.predict_x0:
            _unsupported("predict_x0=False (UniPC with noise prediction)")
        if c.solver_p is not None:
            _unsupported("solver_p (an external predictor)")
        if getattr(c, "use_flow_sigmas", False):
            _unsupported("use_flow_sigmas=True")

    def _fd_solver(self, begin):
        c = self.config
        disabled = tuple(int(s) - begin for s in (c.disable_corrector or []) if int(s) >= begin)
        return "unipc", {"order": int(c.solver_order), "solver_type": c.solver_type,
                         "lower_order_final": bool(c.lower_order_final), "disable_corrector": disabled}

    def step(self, model_output, timestep, sample, return_dict: bool = True, *, seeds=None, step_index=None,
             state=None):
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)


class FlowMatchEulerDiscreteScheduler(_SigmaScheduler, _d.FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler (shift, dynamic shifting, Karras / exponential / beta sigmas) on fastdiff's
    ``flow_euler`` rows on a rectified flow x_t = (1 - t) x0 + t noise, t = diffusers' sigma."""

    _stateful = False

    def _fd_check_config(self):
        c = self.config
        for name in ("stochastic_sampling", "invert_sigmas"):
            if getattr(c, name, False):
                _unsupported(f"{name}=True")

    def _fd_build(self, begin, eta):
        sig = self._fd_sig_host
        # t_min below diffusers' smallest sigma (shifted or Karras sigmas go below 1 / num_train_timesteps)
        flow = RectifiedFlow(t_min=min(1e-3, float(sig[sig > 0].min())), t_max=max(1.0, float(sig.max())))
        p = make_plan("flow_euler", flow, prediction="flow", boundaries=list(sig))
        return _Program(p.shared_rows(), p.stage_flags, p.draw, 0, self._fd_ts_host)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, per_token_timesteps=None,
             return_dict: bool = True, *, seeds=None, step_index=None, state=None):
        if per_token_timesteps is not None:
            _unsupported("per_token_timesteps")
        return self._fd_step(model_output, timestep, sample, seeds=seeds, step_index=step_index, state=state,
                             return_dict=return_dict)

    def _fd_alpha_sigma(self, s):
        return 1.0 - s, s

    def scale_noise(self, sample, timestep, noise=None):
        """x_t = (1 - sigma) x0 + sigma noise at the sigmas of ``timestep`` (per sample, on the device)."""
        return self.add_noise(sample, noise, timestep)

    def _fd_output(self, prev, x0):
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
