"""The sampler loop: run a Plan's stages with a model.

Model calling convention (DESIGN §4): ``model(x, t, **cond) -> out`` with ``x`` the unscaled state [B, ...] and
``t`` a [B] tensor of model times; ``out`` has x's shape, in the plan's prediction parameterization.

Three paths share one stage loop:
- ``torch`` backend: readable torch ops per stage (float64 works); the oracle.
- kernel backends (``cpu``, ``triton``, ``cuda``): one ``fastdiff::step`` launch per stage over device-resident
  coefficient rows, guidance combined inside the kernel, Philox noise drawn inside the kernel from a seeds tensor.
- CUDA graph (kernel backends on CUDA): the whole loop, prior draw included, captured once per
  (plan, shape, dtype, device, guidance on/off, conditioning shapes) and replayed; new seeds, x_T, guidance weight
  or conditioning values are copied into static buffers, so they need no re-capture.
"""

from __future__ import annotations

import collections
import math
import sys
import threading

import torch

from . import ops, rng
from .backends import BACKENDS, resolve
from .backends.torch_eager import combine_guidance, run_stage
from .plan import Plan

# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _check_seeds(seeds, batch):
    if seeds is None:
        return None
    n = len(seeds) if not isinstance(seeds, torch.Tensor) else seeds.numel()
    if n != batch:
        raise ValueError(f"seeds has {n} entries but the batch has {batch} samples: give one seed per sample")
    return seeds


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor [B, ...]")
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(t.shape)}")
    return t


def _start(plan, x_T, shape, noise, seeds, dtype=None, device=None):
    """(x_T or None, shape, dtype, device): x_T None means 'draw the prior from seeds' (draw 0)."""
    if x_T is not None:
        x = _check_tensor(x_T, "x_T")
        return x, tuple(x.shape), x.dtype, x.device
    if noise is not None:
        n = _check_tensor(noise, "noise")
        return plan.init_scale * n, tuple(n.shape), n.dtype, n.device
    if shape is None:
        raise ValueError("give x_T=, noise= or shape= (with seeds=) so the sampler knows where to start")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive sizes with the batch first, got {shape}")
    if seeds is None:
        raise ValueError(f"seeds= is needed to draw x_T for shape {shape}: give one integer seed per sample")
    return None, shape, dtype or torch.float32, torch.device(device or "cpu")


def _batched_cond(cond, uncond, guided, batch, device):
    cond = dict(cond or {})
    if guided:
        uncond = dict(uncond or {})
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys for guidance, got {sorted(cond)} and "
                             f"{sorted(uncond)}")
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    for key, v in cond.items():
        if not isinstance(v, torch.Tensor) or v.shape[0] != batch * (2 if guided else 1):
            raise ValueError(f"conditioning {key!r} must be a tensor with {batch} rows (one per sample)")
        if v.device != device:
            raise ValueError(f"conditioning {key!r} is on {v.device} but x is on {device}: move it with .to()")
    return cond


# ---------------------------------------------------------------------------------------------------------------
# The stage loop
# ---------------------------------------------------------------------------------------------------------------


def _model_time(plan, k, batch, x):
    t = float(plan.schedule.model_time(plan.stage_times[k]))  # a host constant: no sync, graph-safe
    tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((batch,), t, dtype=tdtype, device=x.device)


def _call_model(model, plan, k, x, guided, kwargs):
    batch = x.shape[0]
    t = _model_time(plan, k, batch, x)
    out = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs) if guided else model(x, t, **kwargs)
    expect = (2 * batch if guided else batch,) + tuple(x.shape[1:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model returned {got}, expected a tensor of shape {expect}")
    return out.to(x.dtype)


_ROWS_CACHE: dict = {}
_ROWS_LOCK = threading.Lock()


def device_rows(plan, device) -> tuple:
    """(rows float32 [S, R], draws int64 [S]) of a plan on a device, cached (plans are immutable)."""
    key = (plan, str(device))
    with _ROWS_LOCK:
        hit = _ROWS_CACHE.get(key)
        if hit is None:
            if len(_ROWS_CACHE) > 64:
                _ROWS_CACHE.clear()
            hit = (torch.tensor(plan.rows(), dtype=torch.float32, device=device),
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


def _loop(model, plan, x, seeds_t, kernel, w, kwargs, callback=None, check_finite="off", bar=None, noise_fn=None,
          threshold=None):
    """Run every stage. ``x``: the start state; ``w``: guidance tensor [1] or None; ``threshold``: (ratio,
    max_value) of dynamic thresholding or None; returns the sample.

    With ``check_finite="off"`` and no callback this does no host sync, so it can be captured in a CUDA graph
    (dynamic thresholding included: its reduction pass is device-side torch ops).
    """
    guided = w is not None
    slots_list = [None] * plan.num_slots
    slots = None
    if kernel != "torch":
        rows, draws = device_rows(plan, x.device)
        slots = torch.zeros((plan.num_slots,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        w_t = w if guided else torch.zeros(1, dtype=torch.float32, device=x.device)
        x = x.contiguous()
    for k in range(plan.num_stages):
        reads, writes, use_out, noise, langevin = plan.stage_flags[k]
        out = _call_model(model, plan, k, x, guided, kwargs) if use_out else None
        x_prev = x
        thr = None
        if kernel == "torch":
            o = combine_guidance(out, w) if guided and use_out else out
            if threshold is not None and use_out and not langevin:  # Imagen: quantile of |D|, D = clamp(D) / s
                cx, co = plan.conv[k]
                thr = ops.threshold_of(cx * x + co * o, *threshold)
            z = None
            if (noise or langevin) and noise_fn is not None:
                z = noise_fn(k).to(x.dtype)  # external noise (k-diffusion's noise_sampler)
            elif noise or langevin:
                z = rng.normals_per_sample(seeds_t, torch.full_like(seeds_t, int(plan.draw[k])), x[0].numel())
                z = z.reshape(x.shape).to(x.dtype)
            x = run_stage(plan, k, x, o, slots_list, z, thr)
        else:
            out_c = out.contiguous() if use_out else x
            if threshold is not None and use_out and not langevin:  # the reduction pass; the kernel clamps D
                thr = ops.dynamic_threshold(x, out_c, rows[k : k + 1], w_t, guided, *threshold)
            x = ops.step(x, out_c, slots, rows[k : k + 1], seeds_t, draws[k : k + 1], w_t, slot_reads=reads,
                         slot_writes=writes, use_out=use_out, cfg=guided and use_out, noise=noise, langevin=langevin,
                         kernel=kernel, thresholds=thr)
        if callback is not None and use_out:
            o = combine_guidance(out, w) if guided else out
            cx, co = plan.denoised_coefs[k]  # the data estimate (a Langevin stage's D register is the score)
            D = cx * x_prev + co * o
            callback(k, x, D if thr is None else ops.apply_threshold(D, thr.to(D.dtype)))
        if check_finite == "step" and not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values after stage {k} (t={plan.stage_times[k]:g}) of "
                                     f"{plan.solver!r}: check the model output and the prediction type")
        if bar is not None:
            bar.update(1)
    return x


def _prior(plan, x_T, shape, dtype, device, seeds_t, kernel):
    if x_T is not None:
        return x_T
    return plan.init_scale * ops.randn(shape, seeds_t, 0, dtype=dtype, device=device, kernel=kernel)


def _check_end(x, plan, check_finite):
    if check_finite != "off" and not torch.isfinite(x).all():
        raise FloatingPointError(f"the sample has NaN or Inf ({plan.solver!r}, {plan.nfe} model calls): rerun with "
                                 "check_finite='step' to find the stage, and check the model and prediction type")


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


class Sampler:
    """A model bound to a plan and sampling options; safe to share across threads.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]`` in ``plan.prediction``.
    plan : Plan
    backend : str
        "auto" (fastest for the data's device and dtype) or one of ``fastdiff.backends.BACKENDS``.
    compile : bool, optional
        ``torch.compile`` the model (default: on CUDA only; inductor CPU compile is optional).
    cuda_graph : bool
        Capture the whole loop in one CUDA graph on CUDA kernel backends (default True).
    guidance_scale : float, optional
        Classifier-free guidance weight; the model then runs once per stage on [uncond; cond].
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
    """

    def __init__(self, model, plan: Plan, backend: str = "auto", compile=None, cuda_graph: bool = True,
                 guidance_scale=None, progress=None, max_graphs: int = 8, dynamic_threshold=None,
                 sample_max_value: float = 1.0):
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a fastdiff Plan (from fastdiff.plan(...)), got {type(plan).__name__}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        self.model, self.plan, self.backend = model, plan, backend
        self.compile, self.cuda_graph, self.guidance_scale = compile, cuda_graph, guidance_scale
        self.progress, self.max_graphs = progress, max_graphs
        self.dynamic_threshold, self.sample_max_value = dynamic_threshold, sample_max_value
        self._threshold = None if dynamic_threshold is None else ops.threshold_options(dynamic_threshold,
                                                                                         sample_max_value)
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
        if isinstance(shape_or_x, torch.Tensor):
            x_T = shape_or_x
        elif shape_or_x is not None:
            shape = shape_or_x
        if check_finite not in ("end", "step", "off"):
            raise ValueError(f"check_finite must be 'end', 'step' or 'off', got {check_finite!r}")
        plan = self.plan
        x0, shape, dtype, device = _start(plan, x_T, shape, noise, seeds, dtype, device)
        batch = shape[0]
        _check_seeds(seeds, batch)
        if seeds is None and plan.num_draws > 1:
            raise ValueError(f"solver {plan.solver!r} draws noise: pass seeds= (one integer per sample)")
        w_val = self.guidance_scale if guidance_scale is None else guidance_scale
        guided = w_val is not None
        if guided and not math.isfinite(float(w_val)):
            raise ValueError(f"guidance_scale must be finite, got {w_val}")
        kwargs = _batched_cond(cond, uncond, guided, batch, device)
        # float64 runs on the torch backend only (the kernels compute in fp32)
        torch_only = dtype == torch.float64 or noise_fn is not None
        kind = "torch" if self.backend == "auto" and torch_only else resolve(self.backend, device.type)
        if noise_fn is not None and kind != "torch":
            raise ValueError(f"noise_fn needs backend='torch' (the {kind!r} kernel draws its own noise)")
        seeds_t = (rng.seeds_tensor(seeds, device=device) if seeds is not None
                   else torch.zeros(batch, dtype=torch.int64, device=device))
        w = torch.full((1,), float(w_val), dtype=torch.float32 if dtype != torch.float64 else dtype,
                       device=device) if guided else None
        model = self._model_for(device)
        graphable = (self.cuda_graph and device.type == "cuda" and kind in ("cuda", "triton") and callback is None
                     and check_finite != "step")
        if graphable:
            x = self._replay(model, kind, x0, shape, dtype, device, seeds_t, w, kwargs)
        else:
            show = self.progress if self.progress is not None else (
                device.type == "cpu" and plan.num_stages * batch >= 200 and sys.stderr.isatty())
            bar = _progress(plan.num_stages, show)
            try:
                x = _prior(plan, x0, shape, dtype, device, seeds_t, kind)
                x = _loop(model, plan, x, seeds_t, kind, w, kwargs, callback, check_finite, bar, noise_fn,
                          self._threshold)
            finally:
                if bar is not None:
                    bar.close()
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
        strength : float or sequence of B floats in [0, 1]
        seeds : sequence of B ints
        """
        from . import plan as make_plan

        x0 = _check_tensor(init, "init")
        B, p = x0.shape[0], self.plan
        strengths = [float(strength)] * B if isinstance(strength, (int, float)) else [float(v) for v in strength]
        if len(strengths) != B or not all(0.0 <= v <= 1.0 for v in strengths):
            raise ValueError(f"strength must be one number or {B} numbers in [0, 1], got {strength!r}")
        _check_seeds(seeds, B)
        if seeds is None:
            raise ValueError("img2img needs seeds= (one integer per sample) for the noise it adds")
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
            st = rng.seeds_tensor(seeds_b, device=x0.device)
            a, s = float(sub.alphas[0]), float(sub.sigmas[0])
            x_start = ops.add_noise(x0[idx].contiguous(), torch.tensor([a], device=x0.device),
                                    torch.tensor([s], device=x0.device), st)
            pick = {k: v[idx] for k, v in (cond or {}).items()}, {k: v[idx] for k, v in (uncond or {}).items()}
            runner = Sampler(self.model, sub, backend=self.backend, compile=self.compile, cuda_graph=self.cuda_graph,
                             guidance_scale=self.guidance_scale, progress=self.progress,
                             dynamic_threshold=self.dynamic_threshold, sample_max_value=self.sample_max_value)
            out[idx] = runner.sample(x_T=x_start, seeds=seeds_b, cond=pick[0] or None, uncond=pick[1] or None,
                                     guidance_scale=guidance_scale, check_finite=check_finite)
        return out

    # -- CUDA graph path ----------------------------------------------------------------------------------------
    def _replay(self, model, kind, x0, shape, dtype, device, seeds_t, w, kwargs):
        key = (kind, shape, dtype, str(device), x0 is None, w is not None,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items())))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = _GraphEntry(model, self.plan, kind, x0, shape, dtype, device, seeds_t, w, kwargs,
                                    self._threshold)
                self._graphs[key] = entry
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
        return entry.replay(x0, seeds_t, w, kwargs)


class _GraphEntry:
    """One captured loop with its static input buffers; replays are serialized by a lock."""

    def __init__(self, model, plan, kind, x0, shape, dtype, device, seeds_t, w, kwargs, threshold=None):
        self.plan, self.kind, self.model, self.threshold = plan, kind, model, threshold
        self.x = None if x0 is None else torch.empty_like(x0)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.seeds = torch.empty_like(seeds_t)
        self.w = None if w is None else torch.empty_like(w)
        self.cond = {k: torch.empty_like(v) for k, v in kwargs.items()}
        self.lock = threading.Lock()
        self._fill(x0, seeds_t, w, kwargs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compile, autotune, allocate outside the capture
            for _ in range(2):
                self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()

    def _fill(self, x0, seeds_t, w, kwargs):
        if self.x is not None:
            self.x.copy_(x0)
        self.seeds.copy_(seeds_t)
        if self.w is not None:
            self.w.copy_(w)
        for k, v in kwargs.items():
            self.cond[k].copy_(v)

    def _run(self):
        x = _prior(self.plan, self.x, self.shape, self.dtype, self.device, self.seeds, self.kind)
        return _loop(self.model, self.plan, x, self.seeds, self.kind, self.w, self.cond, threshold=self.threshold)

    def replay(self, x0, seeds_t, w, kwargs):
        with self.lock:
            self._fill(x0, seeds_t, w, kwargs)
            self.graph.replay()
            return self.out.clone()


def sample(model, plan: Plan, x_T=None, shape=None, noise=None, seeds=None, backend: str = "auto",
           guidance_scale=None, cond=None, uncond=None, callback=None, check_finite: str = "end", dtype=None,
           device=None, compile=False, cuda_graph: bool = False, progress=None, dynamic_threshold=None,
           sample_max_value: float = 1.0) -> torch.Tensor:
    """Sample with ``model`` along ``plan`` (the one-call form of ``Sampler``).

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]``.
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
        One 64-bit seed per sample; drives every noise draw through Philox (batch-invariant).
        Required for stochastic plans and when x_T is drawn.
    backend : str
        "auto" or a name from ``fastdiff.backends.available()``.
    guidance_scale : float, optional
        Classifier-free guidance weight w: the model runs once per stage on [uncond; cond] and
        ``out = out_u + w (out_c - out_u)`` inside the step.
    cond, uncond : dict of Tensor, optional
        Keyword arguments for the model (each tensor batch-first).
    callback : callable, optional
        ``callback(stage, x, D)`` after every stage that called the model.
    check_finite : {"end", "step", "off"}
        Raise FloatingPointError on NaN / Inf at the end (default) or after every stage.
    compile, cuda_graph, progress
        As for ``Sampler`` (off by default in this one-call form, which keeps no cache between calls).
    dynamic_threshold : float, optional;  sample_max_value : float
        Imagen's dynamic thresholding of every data estimate (quantile ratio, largest threshold); see ``Sampler``.

    Returns
    -------
    Tensor [B, ...]: the sample.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a fastdiff Plan (from fastdiff.plan(...)), got {type(plan).__name__}")
    s = Sampler(model, plan, backend=backend, compile=compile, cuda_graph=cuda_graph, guidance_scale=guidance_scale,
                progress=progress, dynamic_threshold=dynamic_threshold, sample_max_value=sample_max_value)
    return s.sample(x_T=x_T, shape=shape, noise=noise, seeds=seeds, cond=cond, uncond=uncond, dtype=dtype,
                    device=device, callback=callback, check_finite=check_finite)
