"""The sampler loop: run a Plan's stages with a model.

Model calling convention (DESIGN §4): ``model(x, t, **cond) -> out`` with ``x`` the unscaled state [B, ...] and
``t`` a [B] tensor of model times; ``out`` has x's shape, in the plan's prediction parameterization.
"""

from __future__ import annotations

import math

import torch

from . import ops, rng
from .backends import BACKENDS, resolve
from .backends.torch_eager import combine_guidance, run_stage
from .plan import Plan


def _check_seeds(seeds, batch):
    if seeds is None:
        return None
    n = len(seeds) if not isinstance(seeds, torch.Tensor) else seeds.numel()
    if n != batch:
        raise ValueError(f"seeds has {n} entries but the batch has {batch} samples: give one seed per sample")
    return seeds


def _initial_state(plan, x_T, shape, noise, seeds, dtype, device):
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise ValueError("x_T must be a floating-point torch.Tensor [B, ...]")
        if x_T.dim() < 1 or x_T.shape[0] < 1:
            raise ValueError(f"x_T must have a batch dimension, got shape {tuple(x_T.shape)}")
        return x_T
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise ValueError("noise must be a floating-point torch.Tensor [B, ...]")
        return plan.init_scale * noise
    if shape is None:
        raise ValueError("give x_T=, noise= or shape= (with seeds=) so the sampler knows where to start")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a tuple of positive sizes with the batch first, got {shape}")
    if seeds is None:
        raise ValueError(f"seeds= is needed to draw x_T for shape {shape}: give one integer seed per sample")
    _check_seeds(seeds, shape[0])
    return plan.init_scale * rng.randn(shape, seeds, draw=0, dtype=dtype or torch.float32, device=device or "cpu")


def _model_time(plan, k, batch, x):
    t = float(plan.schedule.model_time(plan.stage_times[k]))
    tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((batch,), t, dtype=tdtype, device=x.device)


def _batched_cond(cond, uncond, guided):
    cond = dict(cond or {})
    if not guided:
        return cond
    uncond = dict(uncond or {})
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys for guidance, got {sorted(cond)} and "
                         f"{sorted(uncond)}")
    return {k: torch.cat([uncond[k], cond[k]]) for k in cond}


def sample(model, plan: Plan, x_T=None, shape=None, noise=None, seeds=None, backend: str = "auto",
           guidance_scale=None, cond=None, uncond=None, callback=None, check_finite: str = "end") -> torch.Tensor:
    """Sample with ``model`` along ``plan``.

    Parameters
    ----------
    model : callable
        ``model(x [B, ...], t [B], **cond) -> out [B, ...]``.
    plan : Plan
        From ``fastdiff.plan``.
    x_T : Tensor [B, ...], optional
        Start state, used as is (its dtype and device are kept; float64 works on the torch backend).
    shape : tuple, optional
        Batch-first shape when x_T is drawn: ``x_T = plan.init_scale * randn(shape, seeds, draw=0)``.
    noise : Tensor [B, ...], optional
        Unit prior noise instead of the Philox draw: ``x_T = plan.init_scale * noise``.
    seeds : sequence of int, optional
        One 64-bit seed per sample; drives every noise draw through Philox (batch-invariant).
        Required for stochastic plans and when x_T is drawn.
    backend : str
        "auto" or a name from ``fastdiff.backends.available()``.
    guidance_scale : float, optional
        Classifier-free guidance weight w: the model runs once per stage on [uncond; cond] and
        ``out = out_u + w (out_c - out_u)``.
    cond, uncond : dict of Tensor, optional
        Keyword arguments for the model (each tensor batch-first).
    callback : callable, optional
        ``callback(stage, x, D)`` after every stage that called the model.
    check_finite : {"end", "step", "off"}
        Raise FloatingPointError on NaN / Inf at the end (default) or after every stage.

    Returns
    -------
    Tensor [B, ...]: the sample, in x_T's dtype.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a fastdiff Plan (from fastdiff.plan(...)), got {type(plan).__name__}")
    if check_finite not in ("end", "step", "off"):
        raise ValueError(f"check_finite must be 'end', 'step' or 'off', got {check_finite!r}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    x = _initial_state(plan, x_T, shape, noise, seeds, None, None)
    batch = x.shape[0]
    # float64 runs on the torch backend only (the kernels compute in fp32)
    kind = "torch" if backend == "auto" and x.dtype == torch.float64 else resolve(backend, x.device.type)
    _check_seeds(seeds, batch)
    if seeds is None and plan.num_draws > 1:
        raise ValueError(f"solver {plan.solver!r} draws noise: pass seeds= (one integer per sample)")
    guided = guidance_scale is not None
    if guided and not math.isfinite(float(guidance_scale)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    kwargs = _batched_cond(cond, uncond, guided)
    for key, v in kwargs.items():
        if not isinstance(v, torch.Tensor) or v.shape[0] != batch * (2 if guided else 1):
            raise ValueError(f"conditioning {key!r} must be a tensor with {batch} rows (one per sample)")
        if v.device != x.device:
            raise ValueError(f"conditioning {key!r} is on {v.device} but x is on {x.device}: move it with .to()")

    if kind != "torch":
        return _sample_kernel(model, plan, x, seeds, kind, guidance_scale if guided else None, kwargs, callback,
                              check_finite)
    slots = [None] * plan.num_slots
    for k in range(plan.num_stages):
        out = None
        if plan.calls_model[k]:
            out = _call_model(model, plan, k, x, batch, guided, kwargs)
            if guided:
                out = combine_guidance(out, guidance_scale)
        z = None
        if plan.draw[k] >= 0:
            z = rng.randn(tuple(x.shape), seeds, draw=int(plan.draw[k]), dtype=x.dtype, device=x.device)
        x_prev = x
        x = run_stage(plan, k, x, out, slots, z)
        if callback is not None and out is not None:
            cx, co = plan.conv[k]
            callback(k, x, cx * x_prev + co * out)
        if check_finite == "step" and not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values after stage {k} (t={plan.stage_times[k]:g}) of "
                                     f"{plan.solver!r}: check the model output and the prediction type")
    _check_end(x, plan, check_finite)
    return x


def _check_end(x, plan, check_finite):
    if check_finite != "off" and not torch.isfinite(x).all():
        raise FloatingPointError(f"the sample has NaN or Inf ({plan.solver!r}, {plan.nfe} model calls): rerun with "
                                 "check_finite='step' to find the stage, and check the model and prediction type")


def _call_model(model, plan, k, x, batch, guided, kwargs):
    t = _model_time(plan, k, batch, x)
    if guided:
        out = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs)
    else:
        out = model(x, t, **kwargs)
    expect = (2 * batch if guided else batch,) + tuple(x.shape[1:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model returned {got}, expected a tensor of shape {expect}")
    return out.to(x.dtype)


_ROWS_CACHE: dict = {}


def device_rows(plan, device) -> tuple:
    """(rows float32 [S, R], draws int64 [S]) of a plan on a device, cached (plans are immutable)."""
    key = (plan, str(device))
    hit = _ROWS_CACHE.get(key)
    if hit is None:
        if len(_ROWS_CACHE) > 64:
            _ROWS_CACHE.clear()
        hit = (torch.as_tensor(plan.rows(), dtype=torch.float32, device=device),
               torch.as_tensor(plan.draw, dtype=torch.int64, device=device))
        _ROWS_CACHE[key] = hit
    return hit


def _sample_kernel(model, plan, x, seeds, kernel, guidance_scale, kwargs, callback, check_finite):
    """The loop on a fused kernel: one ``fastdiff::step`` launch per stage, guidance combined inside it."""
    batch, dev = x.shape[0], x.device
    rows, draws = device_rows(plan, dev)
    seeds_t = rng.seeds_tensor(seeds, device=dev) if seeds is not None else torch.zeros(batch, dtype=torch.int64,
                                                                                         device=dev)
    guided = guidance_scale is not None
    w = torch.full((1,), float(guidance_scale) if guided else 0.0, dtype=torch.float32, device=dev)
    slots = torch.zeros((plan.num_slots,) + tuple(x.shape), dtype=x.dtype, device=dev)
    x = x.contiguous()
    for k in range(plan.num_stages):
        reads, writes, use_out, noise, langevin = plan.stage_flags[k]
        out = _call_model(model, plan, k, x, batch, guided, kwargs).contiguous() if use_out else x
        x_prev = x
        x = ops.step(x, out, slots, rows[k : k + 1], seeds_t, draws[k : k + 1], w, slot_reads=reads,
                     slot_writes=writes, use_out=use_out, cfg=guided and use_out, noise=noise, langevin=langevin,
                     kernel=kernel)
        if callback is not None and use_out:
            o = combine_guidance(out, guidance_scale) if guided else out
            cx, co = plan.conv[k]
            callback(k, x, cx * x_prev + co * o)
        if check_finite == "step" and not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite values after stage {k} (t={plan.stage_times[k]:g}) of "
                                     f"{plan.solver!r}: check the model output and the prediction type")
    _check_end(x, plan, check_finite)
    return x


class Sampler:
    """A model bound to a plan and sampling options; stateless between calls, so safe to share across threads.

    ``Sampler(model, plan, backend="auto", guidance_scale=None).sample(shape or x_T or noise, seeds=..., cond=...)``
    """

    def __init__(self, model, plan: Plan, backend: str = "auto", guidance_scale=None):
        if not isinstance(plan, Plan):
            raise ValueError("plan must be a fastdiff Plan (from fastdiff.plan(...))")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        self.model, self.plan, self.backend, self.guidance_scale = model, plan, backend, guidance_scale

    def sample(self, shape_or_x=None, *, x_T=None, shape=None, noise=None, seeds=None, cond=None, uncond=None,
               callback=None, check_finite="end"):
        if isinstance(shape_or_x, torch.Tensor):
            x_T = shape_or_x
        elif shape_or_x is not None:
            shape = shape_or_x
        return sample(self.model, self.plan, x_T=x_T, shape=shape, noise=noise, seeds=seeds, backend=self.backend,
                      guidance_scale=self.guidance_scale, cond=cond, uncond=uncond, callback=callback,
                      check_finite=check_finite)
