"""The sampler loop: run a Plan's stages with a model.

Model calling convention: ``model(x, t, **cond) -> out`` with ``x`` the unscaled state [B, ...] and ``t`` a [B]
tensor of model times; ``out`` has x's shape, in the plan's prediction parameterization.  A model may also return
an object with a ``.sample`` tensor (diffusers' ``UNet2DOutput``, ``Transformer2DModelOutput``) or a tuple / list
whose first element is the output, so diffusers models are passed as they are.

Every stage is one ``fastdiff.ops.step`` on the chosen backend (``torch`` runs ``ops.step_reference``: plain
torch ops, float64 too; ``cpu`` / ``triton`` / ``cuda`` are fused kernels), over device-resident coefficient rows,
guidance combined inside the step, Philox noise drawn inside the step from a seeds tensor.  One stage loop
(``_loop``) runs either eagerly or, on CUDA kernel backends, captured whole (prior draw included) in one CUDA graph
per (plan, shape, dtype, device, guidance on/off, conditioning shapes) and replayed; new seeds, x_T, guidance
weight or conditioning values are copied into static buffers, so they need no re-capture.

The eager loop allocates nothing per step: each thread keeps a few workspaces (``_Workspace``: the state buffer
the steps update in place, the history slots, the [uncond; cond] input, the model-time tensors and coefficient row
views of every stage) keyed by (plan, shape, dtype, device, guidance), and only the result is a new tensor.  The
kernels raise a per-sample flag when they store a NaN / Inf, so ``check_finite`` costs no extra pass.  The model
must not keep its input x after it returns (the next stage overwrites it); callbacks get tensors of their own.
"""

from __future__ import annotations

import collections
import math
import numbers
import sys
import threading
from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch

from . import ops, rng
from ._names import unknown_name
from .backends import BACKENDS, resolve
from .plan import Plan
from .ops import _describe
from .guidance import rescale_factors, rescale_option
from .thresholding import apply_threshold, dynamic_threshold, threshold_options

# ---------------------------------------------------------------------------------------------------------------
# Input checks: every argument of Sampler / sample / img2img is checked here, before anything runs
# ---------------------------------------------------------------------------------------------------------------

_DTYPES = "torch.float32, torch.float16, torch.bfloat16 or torch.float64"


def _check_plan(plan):
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a fastdiff Plan (from fastdiff.plan(...)), got {_describe(plan)}")


def _check_guidance_scale(value) -> Optional[float]:
    """None, or the guidance weight as a finite float (a number or a 0-d tensor)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"guidance_scale must be a finite number (e.g. 7.5), got {_describe(value)}")
    return float(value)


def _check_options(plan, backend, guidance_scale, max_graphs, dynamic_threshold, sample_max_value,
                   guidance_rescale=0.0):
    """Sampler's construction options: (guidance weight or None, thresholding (ratio, max_value) or None)."""
    rescale_option(guidance_rescale)
    _check_plan(plan)
    if backend != "auto" and backend not in BACKENDS:
        raise unknown_name("backend", backend, ("auto",) + BACKENDS)
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, numbers.Integral) or max_graphs < 1:
        raise ValueError(f"max_graphs must be an integer >= 1 (the number of CUDA graphs kept), got {max_graphs!r}")
    threshold = None if dynamic_threshold is None else threshold_options(dynamic_threshold, sample_max_value)
    return _check_guidance_scale(guidance_scale), threshold


def _check_state(t, name):
    """A start state / init image / noise: a floating-point tensor [B, ...] with B >= 1."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor [B, ...] ({_DTYPES}), got {_describe(t)}")
    if t.dtype not in ops.FLOAT_DTYPES:
        raise ValueError(f"{name} is {t.dtype}; fastdiff samples in {_DTYPES}: convert it with .float()")
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension with at least one sample, got shape {tuple(t.shape)}")
    return t


def _check_shape(shape) -> tuple:
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise ValueError(f"shape must be a tuple of sizes with the batch first, e.g. (4, 3, 64, 64); got "
                         f"{_describe(shape)}" + (f" (for {shape} samples of one value write ({shape}, 1))"
                                                  if isinstance(shape, int) else ""))
    if len(shape) < 1 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"shape must be a tuple of integer sizes with the batch first, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if shape[0] < 1:
        raise ValueError(f"shape {shape} has a batch of {shape[0]} samples: shape[0] must be at least 1")
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must hold positive sizes, got {shape}")
    return shape


def _check_dtype(dtype):
    if dtype is not None and dtype not in ops.FLOAT_DTYPES:
        raise ValueError(f"dtype must be {_DTYPES}, got {dtype!r}")
    return dtype


def _check_device(device) -> Optional[torch.device]:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here (torch.cuda.is_available() is "
                         "False): use device='cpu'")
    return device


def _check_seeds(seeds, batch) -> Optional[list]:
    """None, or the seeds as a list of Python ints: one integer in [0, 2**64) per sample."""
    if seeds is None:
        return None
    if isinstance(seeds, numbers.Integral) or (isinstance(seeds, torch.Tensor) and seeds.dim() == 0):
        raise ValueError(f"seeds must be a list with one integer per sample ({batch} here), got the single int "
                         f"{int(seeds)}: write seeds=[{int(seeds)}] for one sample")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise ValueError(f"seeds must be a list with one integer per sample, got {_describe(seeds)}")
    n = seeds.numel() if isinstance(seeds, torch.Tensor) else len(seeds)
    if n != batch:
        raise ValueError(f"seeds has {n} entries but the batch has {batch} samples: give one seed per sample")
    return rng._normalize_seeds(seeds, None)  # checks each seed (the count is checked above): in [0, 2**64)


def _check_mapping(name, value):
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of keyword arguments for the model (model(x, t, **{name})), e.g. "
                         f"{name}={{'class_labels': labels}}; got {_describe(value)}")
    return dict(value or {})


def _batched_cond(cond, uncond, guided, batch, device):
    """The model's keyword arguments: cond, or [uncond; cond] stacked per key with guidance."""
    cond, uncond_d = _check_mapping("cond", cond), _check_mapping("uncond", uncond)
    if guided and uncond is None:
        raise ValueError("guidance_scale needs uncond= (the unconditional inputs, a dict with the same keys as cond, "
                         "e.g. the empty prompt's embeddings): the model runs on [uncond; cond]")
    if not guided and uncond is not None:
        raise ValueError("uncond= is only used with classifier-free guidance: give guidance_scale= too, or drop "
                         "uncond")
    for name, d in (("cond", cond), ("uncond", uncond_d)):
        for key, v in d.items():
            if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[0] != batch:
                raise ValueError(f"{name}[{key!r}] must be a tensor with {batch} rows (one per sample), got "
                                 f"{_describe(v)}")
            if v.device != device:
                raise ValueError(f"{name}[{key!r}] is on {v.device} but x is on {device}: move it with .to()")
    if guided:
        if set(cond) != set(uncond_d):
            raise ValueError(f"cond and uncond must have the same keys for guidance, got {sorted(cond)} and "
                             f"{sorted(uncond_d)}")
        cond = {k: torch.cat([uncond_d[k], cond[k]]) for k in cond}
    return cond


class _Request(NamedTuple):
    """One sampling call, checked: where it starts, its noise, guidance, conditioning and backend."""

    x_T: Optional[torch.Tensor]  # the start state; None: draw the prior from the seeds (draw 0)
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    seeds: torch.Tensor  # int64 [B] seed bit patterns (zeros for a deterministic plan without seeds)
    guidance: Optional[torch.Tensor]  # [1] guidance weight, None without guidance
    cond: dict  # the model's keyword arguments ([uncond; cond] with guidance)
    backend: str  # a concrete backend
    noise_fn: object


def _request(sampler, shape_or_x, x_T, shape, noise, seeds, cond, uncond, guidance_scale, dtype, device, callback,
             check_finite, noise_fn) -> _Request:
    """Check one call of ``Sampler.sample`` and resolve its defaults."""
    plan = sampler.plan
    if check_finite not in ("end", "step", "off"):
        raise ValueError(f"check_finite must be 'end', 'step' or 'off', got {check_finite!r}")
    for name, fn in (("callback", callback), ("noise_fn", noise_fn)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a function or None, got {_describe(fn)}")
    if isinstance(shape_or_x, torch.Tensor):
        if x_T is not None:
            raise ValueError("the start state is given twice (positionally and as x_T=): give it once")
        x_T = shape_or_x
    elif shape_or_x is not None:
        if shape is not None:
            raise ValueError("shape is given twice (positionally and as shape=): give it once")
        shape = shape_or_x
    dtype, device = _check_dtype(dtype), _check_device(device)
    if x_T is not None and noise is not None:
        raise ValueError("give x_T= (the start state) or noise= (unit noise scaled by the plan), not both")
    start = None
    if x_T is not None or noise is not None:
        name, t = ("x_T", x_T) if x_T is not None else ("noise", noise)
        _check_state(t, name)
        if shape is not None and _check_shape(shape) != tuple(t.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but shape={tuple(shape)}: give only one of them")
        if dtype is not None and dtype != t.dtype:
            raise ValueError(f"dtype={dtype} but {name} is {t.dtype}: cast {name} with .to({dtype}) or drop dtype=")
        if device is not None and not ops._same_device(device, t.device):
            raise ValueError(f"device={device} but {name} is on {t.device}: move {name} with .to() or drop device=")
        start = t if x_T is not None else plan.init_scale * t
        shape, dtype, device = tuple(t.shape), t.dtype, t.device
    elif shape is None:
        raise ValueError("give x_T=, noise= or shape= (with seeds=) so the sampler knows where to start")
    else:
        shape = _check_shape(shape)
        dtype, device = dtype or torch.float32, device or torch.device("cpu")
    batch = shape[0]
    seeds = _check_seeds(seeds, batch)
    if seeds is None and start is None:
        raise ValueError(f"seeds= is needed to draw x_T for shape {shape}: give one integer seed per sample")
    if seeds is None and plan.num_draws > 1:
        raise ValueError(f"solver {plan.solver!r} draws noise: pass seeds= (one integer per sample)")
    w = sampler.guidance_scale if guidance_scale is None else _check_guidance_scale(guidance_scale)
    if sampler.guidance_rescale and w is None:
        raise ValueError(f"guidance_rescale={sampler.guidance_rescale} rescales classifier-free guidance: give "
                         "guidance_scale= (and uncond=) too, or drop guidance_rescale")
    kwargs = _batched_cond(cond, uncond, w is not None, batch, device)
    # float64 and external noise run on the torch backend only (the kernels compute in fp32 and draw their own noise)
    torch_only = dtype == torch.float64 or noise_fn is not None
    backend = "torch" if sampler.backend == "auto" and torch_only else resolve(sampler.backend, device.type)
    if noise_fn is not None and backend != "torch":
        raise ValueError(f"noise_fn needs backend='torch' (the {backend!r} kernel draws its own noise)")
    seeds_t = (rng.seeds_tensor(seeds, device=device) if seeds is not None
               else torch.zeros(batch, dtype=torch.int64, device=device))
    w_t = None if w is None else torch.full((1,), w, dtype=ops.compute_dtype(dtype), device=device)
    return _Request(start, shape, dtype, device, seeds_t, w_t, kwargs, backend, noise_fn)


def _check_strengths(strength, batch) -> list:
    """img2img's strength: one number (a Python / numpy number or a 0-d tensor) or one per sample, each in [0, 1]."""
    if isinstance(strength, torch.Tensor):
        strength = strength.item() if strength.dim() == 0 else strength.tolist()
    if isinstance(strength, numbers.Real) and not isinstance(strength, bool):
        values = [float(strength)] * batch
    elif hasattr(strength, "__len__") and not isinstance(strength, (str, bytes)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in strength):
        values = [float(v) for v in strength]
    else:
        raise ValueError(f"strength must be one number or {batch} numbers in [0, 1], got {_describe(strength)}")
    if len(values) != batch or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"strength must be one number or {batch} numbers in [0, 1], got {strength!r}")
    return values


# ---------------------------------------------------------------------------------------------------------------
# The stage loop
# ---------------------------------------------------------------------------------------------------------------


def _output_tensor(out):
    """The output tensor of a model call: a tensor as is, the ``.sample`` tensor of an output object (diffusers'
    ``UNet2DOutput``, ``Transformer2DModelOutput``), the first element of a tuple / list; else ``out`` unchanged."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and len(out) > 0 and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def _model_error(e: TypeError, kwargs) -> ValueError:
    """The error for a model that raised TypeError at its first call: say how fastdiff calls it."""
    keys = f" and keyword arguments {', '.join(map(repr, kwargs))} (from cond)" if kwargs else ""
    return ValueError(f"the model raised TypeError at its first call: {e}.  fastdiff calls model(x, t, **cond) with "
                      f"x [B, ...], t [B] the model times{keys}: give a model that takes these (wrap another "
                      "signature, e.g. lambda x, t, **cond: net(x, t.long(), **cond))")


def _model_output(out, x, expect, guided):
    """A model's return value as the stage's output: a tensor of shape ``expect`` in x's dtype on x's device,
    contiguous (the loop's inline check sends here only what is not that already), else ValueError."""
    out = _output_tensor(out)
    if not isinstance(out, torch.Tensor) or out.shape != expect:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model returned {got}, expected a tensor of shape {tuple(expect)}"
                         + (" ([uncond; cond] outputs for the [uncond; cond] batch)" if guided else ""))
    if not out.is_floating_point():
        raise ValueError(f"the model returned a {out.dtype} tensor: its output must be floating-point")
    if out.device != x.device:
        raise ValueError(f"the model returned its output on {out.device} but x is on {x.device}: return it on "
                         "x's device")
    return out.to(x.dtype).contiguous()


def _unit_noise(noise_fn, k, x):
    z = noise_fn(k)
    if not isinstance(z, torch.Tensor) or tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"noise_fn({k}) returned {_describe(z)}, expected unit noise of x's shape {tuple(x.shape)}")
    return z


_ROWS_CACHE: dict = {}
_ROWS_LOCK = threading.Lock()


def device_rows(plan, device, dtype=torch.float32) -> tuple:
    """(rows [S, R] of ``dtype``, draws int64 [S]) of a plan on a device, cached (plans are immutable)."""
    key = (plan, str(device), dtype)
    with _ROWS_LOCK:
        hit = _ROWS_CACHE.get(key)
        if hit is None:
            if len(_ROWS_CACHE) > 64:
                _ROWS_CACHE.clear()
            hit = (torch.tensor(plan.rows(), dtype=dtype, device=device),
                   torch.tensor(plan.draw, dtype=torch.int64, device=device))
            _ROWS_CACHE[key] = hit
    return hit


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def _check_stage(x, out, plan, k, w, samples=None):
    """After stage k (check_finite="step"): raise FloatingPointError naming what made NaN / Inf (``samples``: the
    indices of the samples flagged, when known)."""
    if samples is None and torch.isfinite(x).all():
        return
    which = f" in sample{'s' if len(samples) > 1 else ''} {', '.join(map(str, samples))}" if samples else ""
    where = f"non-finite values{which} after stage {k} (t={plan.stage_times[k]:g}) of {plan.solver!r}"
    if out is not None and not torch.isfinite(out).all():
        raise FloatingPointError(f"{where}: the model output has NaN or Inf (check the model and its inputs)")
    if out is not None and w is not None:
        guided = ops.guided_output(out.to(ops.compute_dtype(out.dtype)), w)
        if not torch.isfinite(guided).all():
            raise FloatingPointError(f"{where}: both halves of the model output are finite, but the guided "
                                     f"combination out_u + w (out_c - out_u) with w = {float(w[0]):g} overflows; "
                                     "lower guidance_scale or bound the model output")
    raise FloatingPointError(f"{where}: the model output is finite, so the step overflowed: check the plan's "
                             "prediction type and the scale of the model output for this schedule")


def _denoised_row(plan, k, row):
    """``row`` with its (cx, co) replaced by the stage's data-estimate coefficients where they differ (Langevin
    stages carry the score in their D register; callbacks report the data estimate)."""
    if not plan.stage_flags[k].langevin:
        return row
    r = row.clone()
    r[:, :2] = torch.as_tensor(plan.denoised_coefs[k], dtype=row.dtype, device=row.device)
    return r


class _Stage(NamedTuple):
    """What one stage needs that does not depend on the data, precomputed once per workspace: the kernel's
    arguments in its order (Python ints and bools for the flags)."""

    k: int
    row: torch.Tensor  # [1, R] coefficient row (compute dtype, on the device)
    draw: torch.Tensor  # int64 [1] Philox draw index
    reads: int
    writes: int
    use_out: bool
    cfg: bool  # guided and use_out
    noise: bool
    langevin: bool
    t: Optional[torch.Tensor]  # model times [B] ([2B] with guidance), None without a model call
    last: bool  # the last stage: it writes the result, a fresh tensor


class _Workspace:
    """The buffers and per-stage constants of one loop shape: (plan, shape, dtype, device, guided).

    ``state`` holds x between stages (the steps update it in place), ``slots`` the solver's history, ``x2`` the
    [uncond; cond] model input with guidance, ``nonfinite`` int32 [B] flags raised by the kernels.  Reused across
    calls of one thread (``_workspace``), so a loop allocates nothing per step; only the slots that a stage reads
    before any stage wrote them are zeroed per call.  Every stage's kernel arguments are checked here, once
    (``ops._check_step_args``): the loop then calls the backend's kernel directly (``ops._step_kernel``), checking
    per step only the model output.
    """

    def __init__(self, plan, shape, dtype, device, guided):
        cdt = ops.compute_dtype(dtype)
        batch = shape[0]
        rows, draws = device_rows(plan, device, cdt)
        self.state = torch.empty(shape, dtype=dtype, device=device)
        self.slots = torch.empty((plan.num_slots,) + tuple(shape), dtype=dtype, device=device)
        self.x2 = torch.empty((2 * batch,) + tuple(shape[1:]), dtype=dtype, device=device) if guided else None
        self.out_shape = torch.Size((2 * batch if guided else batch,) + tuple(shape[1:]))
        self.nonfinite = torch.zeros(batch, dtype=torch.int32, device=device)
        self.no_guidance = torch.zeros(1, dtype=cdt, device=device)  # the step's guidance argument without cfg
        self.busy = False
        # the bytes of state, so that the loop sees a model output that aliases it without asking torch
        start = self.state.data_ptr()
        self.state_span = (start, start + self.state.numel() * self.state.element_size())
        stages, written, unset = [], 0, 0
        for k in range(plan.num_stages):
            reads, writes, use_out, noise, langevin = plan.stage_flags[k]
            unset |= reads & ~written
            written |= writes
            t = None
            if use_out:  # a host constant: no sync, graph-safe
                t = torch.full((2 * batch if guided else batch,), float(plan.schedule.model_time(plan.stage_times[k])),
                               dtype=cdt, device=device)
            stages.append(_Stage(k, rows[k : k + 1], draws[k : k + 1], int(reads), int(writes), bool(use_out),
                                 bool(guided and use_out), bool(noise), bool(langevin), t, k == plan.num_stages - 1))
        self.stages = tuple(stages)
        self.unset_slots = [i for i in range(plan.num_slots) if (unset >> i) & 1]
        self.uncond = bool(plan.uncond_column)  # CFG++ rows: the U column
        self._check_stages(guided)

    def _check_stages(self, guided):
        """The step contract's checks of every stage's arguments, once: the loop's tensors keep these layouts (the
        seeds [B] int64 and the guidance weight [1] that ``_request`` makes; the model output is checked per call)."""
        seeds = torch.zeros(self.state.shape[0], dtype=torch.int64, device=self.state.device)
        out = self.x2 if guided else self.state  # the layout of a model output, as the loop checks it
        for st in self.stages:
            ops._check_step_args(self.state, out, self.slots, st.row, seeds, st.draw, self.no_guidance, st.reads,
                                 st.writes, st.use_out, st.cfg, None, None, "torch", None, self.nonfinite,
                                 uncond=self.uncond)

    def begin(self, check_finite):
        """Reset what a call must find clean; returns the flags tensor to pass to the steps (None: no checks)."""
        for i in self.unset_slots:
            self.slots[i].zero_()
        if check_finite == "off":
            return None
        self.nonfinite.zero_()
        return self.nonfinite


_WORKSPACES = threading.local()  # per thread: OrderedDict key -> _Workspace (the thread-safety guarantee)
_MAX_WORKSPACES = 4  # per thread: a bound on the memory kept between calls


def _workspace(plan, shape, dtype, device, guided) -> _Workspace:
    """This thread's workspace for a loop shape (a private one while the cached one is in use: a callback or model
    that samples again)."""
    cache = getattr(_WORKSPACES, "cache", None)
    if cache is None:
        cache = _WORKSPACES.cache = collections.OrderedDict()
    key = (plan, tuple(shape), dtype, str(device), guided)
    ws = cache.get(key)
    if ws is None:
        ws = _Workspace(plan, shape, dtype, device, guided)
        cache[key] = ws
        while len(cache) > _MAX_WORKSPACES:
            cache.popitem(last=False)
    elif ws.busy:
        return _Workspace(plan, shape, dtype, device, guided)
    cache.move_to_end(key)
    return ws


def _loop(model, plan, x, seeds_t, backend, w, kwargs, ws: _Workspace, callback=None, check_finite="off", bar=None,
          noise_fn=None, threshold=None, rescale=0.0):
    """Run every stage's step. ``x``: the start state (the caller's, or ``ws.state`` holding the prior); ``w``:
    guidance tensor [1] or None; ``threshold``: (ratio, max_value) of dynamic thresholding or None; ``rescale``:
    guidance_rescale's phi (0: off); ``ws``: the loop's buffers and checked per-stage arguments; returns the sample,
    a new tensor (x itself without stages).

    Every stage but the last writes x' into ``ws.state`` in place; the last writes a fresh tensor, the result.  With
    a callback every x' is a fresh tensor (a callback may keep what it is given).  The kernels raise per-sample
    non-finite flags as they write: ``check_finite="step"`` reads them after every stage, ``"end"`` once, here.
    With ``check_finite="off"`` and no callback this does no host sync, so it can be captured in a CUDA graph
    (dynamic thresholding included: its reduction pass is device-side torch ops).

    The steps call the backend's kernel directly (``ops._step_kernel``; ``ws`` checked their arguments once); a
    model output that is a tensor subclass, external noise (``noise_fn``) and torch.compile take ``ops.step``.
    """
    guided = w is not None
    slots, flags = ws.slots, ws.begin(check_finite)
    w_t = w if guided else ws.no_guidance
    x = x.contiguous()
    kernel = None if noise_fn is not None or torch.compiler.is_compiling() or type(x) is not torch.Tensor \
        else ops._step_kernel(backend)
    state, (s0, s1), expect, x2 = ws.state, ws.state_span, ws.out_shape, ws.x2
    dtype, device = x.dtype, x.device
    out_bytes = expect.numel() * state.element_size()
    fresh = callback is not None  # every x' a tensor of its own
    uncond = bool(plan.uncond_column)  # CFG++ rows
    first_call = True
    for k, row, draw, reads, writes, use_out, cfg, noise, langevin, t, last in ws.stages:
        out, dst = x, state  # (out is not read by a stage without a model call)
        if use_out:
            try:
                out = model(torch.cat([x, x], out=x2), t, **kwargs) if guided else model(x, t, **kwargs)
            except TypeError as e:
                if first_call:
                    raise _model_error(e, kwargs) from e
                raise
            first_call = False
            # the checks of every model output, inline: a loop step costs a few microseconds of Python in all
            if (type(out) is not torch.Tensor or out.shape != expect or out.dtype is not dtype
                    or out.device != device or not out.is_contiguous()):
                out = _model_output(out, x, expect, guided)
            o0 = out.data_ptr()
            if o0 < s1 and s0 < o0 + out_bytes:  # the model returned (a view of) x: keep it intact
                dst = None
        if last or fresh or dst is None:
            dst = torch.empty_like(x)  # the result; or kept by a callback; or the model output lives in state
        # guidance_rescale: a per-sample factor on the guided output, from a reduction pass (as thresholding)
        m = rescale_factors(out, w_t, rescale) if rescale and cfg else None
        # thresholding clamps the data estimate; a Langevin stage's D register is the score, not a data estimate
        thr = (dynamic_threshold(x, out, row, w_t, cfg, *threshold, cfg_rescale=m)
               if threshold is not None and use_out and not langevin else None)
        if kernel is not None and type(out) is torch.Tensor:
            x_new = kernel(x, out, slots, row, seeds_t, draw, w_t, reads, writes, use_out, cfg, noise, langevin, dst,
                           thr, flags, m, uncond)
        else:
            z = _unit_noise(noise_fn, k, x) if noise_fn is not None and (noise or langevin) else None
            x_new = ops.step(x, out, slots, row, seeds_t, draw, w_t, slot_reads=reads, slot_writes=writes,
                             use_out=use_out, cfg=cfg, noise=noise, langevin=langevin, backend=backend,
                             thresholds=thr, z=z, x_out=dst, nonfinite=flags, cfg_rescale=m, uncond=uncond)
        if callback is not None and use_out:
            D = ops.data_estimate(x, out, _denoised_row(plan, k, row), w_t, cfg, cfg_rescale=m)
            callback(k, x_new, (D if thr is None else apply_threshold(D, thr)).to(x.dtype))
        if check_finite == "step" and bool(flags.any()):
            _check_stage(x_new, out if use_out else None, plan, k, w if cfg else None, _flagged(flags))
        if bar is not None:
            bar.update(1)
        x = x_new
    if check_finite == "end" and ws.stages and bool(flags.any()):
        raise FloatingPointError(f"the sample has NaN or Inf in {_samples_text(_flagged(flags))} ({plan.solver!r}, "
                                 f"{plan.nfe} model calls): rerun with check_finite='step' to find the stage and "
                                 "whether the model output, the guidance combination or the step made them")
    return x


def _flagged(flags) -> list:
    return flags.nonzero().flatten().tolist()


def _samples_text(samples) -> str:
    return f"sample{'s' if len(samples) > 1 else ''} {', '.join(map(str, samples))}"


def _prior(plan, x_T, ws, seeds_t, backend):
    """The start state: the caller's x_T, or the prior drawn straight into ``ws.state``."""
    if x_T is not None:
        return x_T
    x = ops.randn(tuple(ws.state.shape), seeds_t, 0, dtype=ws.state.dtype, device=ws.state.device, backend=backend,
                  out=ws.state)
    return x.mul_(plan.init_scale)


def _check_end(x, plan, check_finite):
    """The end check of a plan without stages (the loop's flags cover every stage's output)."""
    if check_finite != "off" and not torch.isfinite(x).all():
        raise FloatingPointError(f"the sample has NaN or Inf ({plan.solver!r}, {plan.nfe} model calls): rerun with "
                                 "check_finite='step' to find the stage and whether the model output, the guidance "
                                 "combination or the step made them")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


class Sampler:
    """A model bound to a plan and sampling options; safe to share across threads.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]`` in ``plan.prediction`` (or an object with a
        ``.sample`` tensor, or a tuple whose first element is ``out``: diffusers models work as they are).
    plan : Plan
    backend : str
        "auto" (fastest for the data's device and dtype) or one of ``fastdiff.backends.BACKENDS``.
    compile : bool, optional
        ``torch.compile`` the model (default: on CUDA only; inductor CPU compile is optional).
    cuda_graph : bool
        Capture the whole loop in one CUDA graph on CUDA kernel backends (default True).
    guidance_scale : float, optional
        Classifier-free guidance weight; the model then runs once per stage on [uncond; cond] (``sample`` needs
        ``uncond=``).
    progress : bool, optional
        tqdm bar over stages; default: on for long eager runs when stderr is a terminal, never inside graphs.
    max_graphs : int
        Size of the LRU cache of captured graphs.
    dynamic_threshold : float, optional
        Imagen's dynamic thresholding (Saharia et al. 2022; diffusers' ``thresholding=True``) with this quantile
        ratio (Imagen: 0.995): at every model call, per sample, s = clamp(quantile(|D|, ratio), 1,
        sample_max_value) and D = clamp(D, -s, s) / s before the update uses it.  For data scaled to [-1, 1].
    sample_max_value : float
        The largest threshold (diffusers' ``sample_max_value``; default 1.0).
    guidance_rescale : float in [0, 1]
        diffusers' ``guidance_rescale`` (Lin et al. 2023, for zero-terminal-SNR models; they use 0.7): the guided
        output out_g is rescaled per sample to phi out_g std(out_c) / std(out_g) + (1 - phi) out_g.  0 (default)
        is off; needs guidance.
    """

    def __init__(self, model, plan: Plan, backend: str = "auto", compile=None, cuda_graph: bool = True,
                 guidance_scale=None, progress=None, max_graphs: int = 8, dynamic_threshold=None,
                 sample_max_value: float = 1.0, guidance_rescale: float = 0.0):
        w, self._threshold = _check_options(plan, backend, guidance_scale, max_graphs, dynamic_threshold,
                                            sample_max_value, guidance_rescale)
        self.guidance_rescale = float(guidance_rescale)
        self.model, self.plan, self.backend = model, plan, backend
        self.compile, self.cuda_graph, self.guidance_scale = compile, cuda_graph, w
        self.progress, self.max_graphs = progress, max_graphs
        self.dynamic_threshold, self.sample_max_value = dynamic_threshold, sample_max_value
        self._compiled = None
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _model_for(self, device):
        use = self.compile if self.compile is not None else device.type == "cuda"
        if not use:
            return self.model
        with self._lock:
            if self._compiled is None:
                # the whole loop is graphed by us: the compiled backbone must not add CUDA graphs of its own
                self._compiled = torch.compile(self.model, mode="max-autotune-no-cudagraphs" if device.type == "cuda"
                                               else "default")
        return self._compiled

    def sample(self, shape_or_x=None, *, x_T=None, shape=None, noise=None, seeds=None, cond=None, uncond=None,
               guidance_scale=None, dtype=None, device=None, callback=None, check_finite: str = "end", noise_fn=None):
        """Sample a batch (see ``fastdiff.sample`` for the arguments); returns [B, ...] in x_T's or ``dtype``.

        ``noise_fn(stage) -> Tensor`` supplies each noisy stage's unit noise from outside (k-diffusion's
        ``noise_sampler``); it runs on the torch backend, since the kernels draw their noise themselves.
        """
        req = _request(self, shape_or_x, x_T, shape, noise, seeds, cond, uncond, guidance_scale, dtype, device,
                       callback, check_finite, noise_fn)
        plan = self.plan
        model = self._model_for(req.device)
        graphable = (self.cuda_graph and req.device.type == "cuda" and req.backend in ("cuda", "triton")
                     and callback is None and check_finite != "step")
        if graphable:
            x = self._replay(model, req)
        else:
            show = self.progress if self.progress is not None else (
                req.device.type == "cpu" and plan.num_stages * req.shape[0] >= 200 and sys.stderr.isatty())
            bar = _progress(plan.num_stages, show)
            ws = _workspace(plan, req.shape, req.dtype, req.device, req.guidance is not None)
            ws.busy = True
            try:
                x = _prior(plan, req.x_T, ws, req.seeds, req.backend)
                x = _loop(model, plan, x, req.seeds, req.backend, req.guidance, req.cond, ws, callback, check_finite,
                          bar, req.noise_fn, self._threshold, self.guidance_rescale)
                if x is ws.state:  # a plan without stages: the drawn prior is the sample
                    x = x.clone()
            finally:
                ws.busy = False
                if bar is not None:
                    bar.close()
        if plan.num_stages == 0:
            _check_end(x, plan, check_finite)
        return x

    # -- img2img -------------------------------------------------------------------------------------------------
    def img2img(self, init: torch.Tensor, strength, seeds, cond=None, uncond=None, guidance_scale=None,
                check_finite: str = "end") -> torch.Tensor:
        """Start each sample from ``init`` noised to its own ``strength`` and run the rest of the plan.

        As diffusers' img2img: sample b skips the first ``steps - int(steps * strength_b)`` steps and starts at
        the next boundary t from ``alpha_t init_b + sigma_t z`` (Philox draw 0 of its seed); strength 0 returns
        ``init_b``, strength 1 runs the whole plan from the noised image.  Samples sharing a start run as one batch;
        each result equals sampling that image alone with the same seed.

        Parameters
        ----------
        init : Tensor [B, ...]
        strength : number (Python, numpy or a 0-d tensor) or B numbers, each in [0, 1]
        seeds : sequence of B ints
        """
        from . import plan as make_plan

        x0 = _check_state(init, "init")
        B, p = x0.shape[0], self.plan
        strengths = _check_strengths(strength, B)
        if seeds is None:
            raise ValueError("img2img needs seeds= (one integer per sample) for the noise it adds")
        seeds = _check_seeds(seeds, B)
        cond, uncond = _check_mapping("cond", cond), None if uncond is None else _check_mapping("uncond", uncond)
        out = x0.clone()
        starts = [p.steps - int(p.steps * v) for v in strengths]
        opts = dict(p.options)
        for start in sorted(set(starts)):
            idx = [b for b in range(B) if starts[b] == start]
            if start >= p.steps:
                continue  # strength 0: nothing to do
            sub = make_plan(p.solver, p.schedule, prediction=p.prediction, final=p.final,
                            timesteps=list(p.times[start:-1]), **opts)
            seeds_b = [seeds[b] for b in idx]
            x_start = ops.add_noise(x0[idx], float(sub.alphas[0]), float(sub.sigmas[0]),
                                    rng.seeds_tensor(seeds_b, device=x0.device))
            pick = {k: v[idx] for k, v in cond.items()}
            pick_u = None if uncond is None else {k: v[idx] for k, v in uncond.items()}
            runner = Sampler(self.model, sub, backend=self.backend, compile=self.compile, cuda_graph=self.cuda_graph,
                             guidance_scale=self.guidance_scale, progress=self.progress,
                             dynamic_threshold=self.dynamic_threshold, sample_max_value=self.sample_max_value,
                             guidance_rescale=self.guidance_rescale)
            out[idx] = runner.sample(x_T=x_start, seeds=seeds_b, cond=pick or None, uncond=pick_u,
                                     guidance_scale=guidance_scale, check_finite=check_finite)
        return out

    # -- CUDA graph path ----------------------------------------------------------------------------------------
    def _replay(self, model, req: _Request):
        key = (req.backend, req.shape, req.dtype, str(req.device), req.x_T is None, req.guidance is not None,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(req.cond.items())))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = _GraphEntry(model, self.plan, req, self._threshold, self.guidance_rescale)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
        return entry.replay(req)


class _GraphEntry:
    """One captured loop with its static input buffers; replays are serialized by a lock."""

    def __init__(self, model, plan, req: _Request, threshold=None, rescale=0.0):
        self.plan, self.backend, self.model, self.threshold = plan, req.backend, model, threshold
        self.rescale = rescale
        self.x = None if req.x_T is None else torch.empty_like(req.x_T)
        self.shape, self.dtype, self.device = req.shape, req.dtype, req.device
        self.seeds = torch.empty_like(req.seeds)
        self.w = None if req.guidance is None else torch.empty_like(req.guidance)
        self.cond = {k: torch.empty_like(v) for k, v in req.cond.items()}
        self.lock = threading.Lock()
        self.ws = _Workspace(plan, req.shape, req.dtype, req.device, req.guidance is not None)  # this graph's own
        self._fill(req)
        device = req.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compile, autotune, allocate outside the capture
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    def _fill(self, req: _Request):
        if self.x is not None:
            self.x.copy_(req.x_T)
        self.seeds.copy_(req.seeds)
        if self.w is not None:
            self.w.copy_(req.guidance)
        for k, v in req.cond.items():
            self.cond[k].copy_(v)

    def _run(self):
        x = _prior(self.plan, self.x, self.ws, self.seeds, self.backend)
        return _loop(self.model, self.plan, x, self.seeds, self.backend, self.w, self.cond, self.ws,
                     threshold=self.threshold, rescale=self.rescale)

    def replay(self, req: _Request):
        with self.lock:
            self._fill(req)
            self.graph.replay()
            return self.out.clone()


def sample(model, plan: Plan, x_T=None, shape=None, noise=None, seeds=None, backend: str = "auto",
           guidance_scale=None, cond=None, uncond=None, callback=None, check_finite: str = "end", dtype=None,
           device=None, compile=False, cuda_graph: bool = False, progress=None, dynamic_threshold=None,
           sample_max_value: float = 1.0, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Sample with ``model`` along ``plan`` (the one-call form of ``Sampler``).

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]`` (or an object with a ``.sample`` tensor, or a tuple
        whose first element is ``out``: a diffusers ``UNet2DModel`` is passed as it is).
    plan : Plan
        From ``fastdiff.plan``.
    x_T : Tensor [B, ...], optional
        Start state, used as is (its dtype and device are kept; float64 works on the torch backend).
    shape : tuple, optional
        Batch-first shape when x_T is drawn: ``x_T = plan.init_scale * randn(shape, seeds, draw=0)``, in ``dtype``
        (default float32) on ``device`` (default CPU).
    noise : Tensor [B, ...], optional
        Unit prior noise instead of the Philox draw: ``x_T = plan.init_scale * noise``.
    seeds : sequence of int, optional
        One 64-bit seed per sample (integers in [0, 2**64)); drives every noise draw through Philox
        (batch-invariant).  Required for stochastic plans and when x_T is drawn.
    backend : str
        "auto" or a name from ``fastdiff.backends.available()``.
    guidance_scale : float, optional
        Classifier-free guidance weight w: the model runs once per stage on [uncond; cond] and
        ``out = out_u + w (out_c - out_u)`` inside the step.  Needs ``uncond``.
    cond, uncond : dict of Tensor, optional
        Keyword arguments for the model (each tensor batch-first); ``uncond`` only with ``guidance_scale``.
    callback : callable, optional
        ``callback(stage, x, D)`` after every stage that called the model.
    check_finite : {"end", "step", "off"}
        Raise FloatingPointError on NaN / Inf at the end (default) or after every stage (naming the model output,
        the guidance combination or the step as the cause).
    compile, cuda_graph, progress
        As for ``Sampler`` (off by default in this one-call form, which keeps no cache between calls).
    dynamic_threshold : float, optional;  sample_max_value : float
        Imagen's dynamic thresholding of every data estimate (quantile ratio, largest threshold); see ``Sampler``.
    guidance_rescale : float in [0, 1]
        diffusers' guidance_rescale phi (0: off; needs guidance_scale); see ``Sampler``.

    Returns
    -------
    Tensor [B, ...]: the sample.
    """
    s = Sampler(model, plan, backend=backend, compile=compile, cuda_graph=cuda_graph, guidance_scale=guidance_scale,
                progress=progress, dynamic_threshold=dynamic_threshold, sample_max_value=sample_max_value,
                guidance_rescale=guidance_rescale)
    return s.sample(x_T=x_T, shape=shape, noise=noise, seeds=seeds, cond=cond, uncond=uncond, dtype=dtype,
                    device=device, callback=callback, check_finite=check_finite)
