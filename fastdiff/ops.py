"""fastdiff's custom ops: ``fastdiff::step``, ``fastdiff::add_noise``, ``fastdiff::randn``.

Declared once with ``torch.library.custom_op`` (fake implementations included, so they compose with
``torch.compile(fullgraph=True)`` and CUDA-graph capture); the ``backend`` argument (old name: ``kernel``) names
the implementation: ``"torch"`` (``step_reference`` below, any device, float64 too), ``"cpu"`` (C++/OpenMP,
csrc/cpu), ``"triton"`` (kernels/), ``"cuda"`` (CUDA C++, csrc/cuda).  Every kernel implements exactly
``step_reference``.  The public wrappers ``step`` / ``add_noise`` / ``randn`` check every argument; the backends
check only their own limits (dtypes, devices they support).

The step contract (one memory pass; all coefficient reads from device memory, no host sync):

    x       [B, *S]        state (fp32 / fp16 / bf16; fp64 on the torch kernel); math in fp32 (fp64 for fp64)
    out     [B | 2B, *S]   model output; with ``cfg`` rows [0, B) are unconditional, [B, 2B) conditional
    slots   [K, B, *S]     history registers, updated in place where ``slot_writes`` has bit i set
    rows    [B | 1, R]     float32 (or float64) coefficient rows, R = 7 + (1+K)(2+K):
                           [cx, co, g, snr, r, lsx, lsD, M (1+K) x (2+K) row-major] (see fastdiff.plan)
    seeds   [B]            int64 bit patterns of the samples' 64-bit seeds
    draws   [B | 1]        int64 Philox draw index per sample; < 0: no noise for that sample
    guidance [B | 1]       float32 guidance weight w (used with ``cfg``): out = out_u + w (out_c - out_u)
    slot_reads, slot_writes  int bitmasks (host constants of the plan): which slots are loaded / stored
    use_out   bool         the stage called the model (else D = 0 and ``out`` is not read)
    noise     bool         some sample draws noise (draws >= 0); host constant, so no sync to find out
    langevin  bool         some sample has snr != 0: a per-sample reduction pass computes ||z||, ||s|| first
    thresholds [B], optional  Imagen dynamic thresholding (see ``dynamic_threshold``, the reduction pass that
                           computes them): D = clamp(D, -s_b, s_b) / s_b right after D is formed, before anything
                           uses it; float32 (float64 with float64 x)
    z [B, *S], optional    unit noise used in place of the Philox draw (torch backend only: an external noise
                           source such as k-diffusion's ``noise_sampler``)
    cfg_rescale [B], optional  guidance_rescale's per-sample factor m_b (see ``fastdiff.guidance.rescale_factors``,
                           its reduction pass), with ``cfg`` only: out = m_b (out_u + w (out_c - out_u)); float32
                           (float64 with float64 x)
    uncond    bool         CFG++ rows (host constant of the plan): M has a column for U = cx x + co out_u, the data
                           estimate of the unconditional output (thresholded as D; U = D without ``cfg``), so
                           M is (1+K) x (3+K) over [x, D, U, S] and R = 7 + (1+K)(3+K)

    D  = cx x + co out ;  x' = M[0].[x, D, S] + g z (+ Langevin term) ;  S_i = M[1+i].[x, D, S] for written i
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from . import rng
from ._names import unknown_name
from .backends import BACKENDS
from .estimate import broadcast_column as _bcast
from .estimate import compute_dtype, guided_output  # noqa: F401 (public here too)
from .estimate import data_estimate as _data_estimate
from .estimate import uncond_estimate as _uncond_estimate
from .thresholding import apply_threshold, threshold_of, threshold_options  # noqa: F401 (re-exported)
from .thresholding import dynamic_threshold as _dynamic_threshold

KERNELS = BACKENDS  # old name of the backend list
ROW_HEAD = 7  # cx, co, g, snr, r, lsx, lsD
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def row_length(num_slots: int, uncond: bool = False) -> int:
    """Length of a flat coefficient row for ``num_slots`` history slots: 7 + (1+K)(2+K), or 7 + (1+K)(3+K) with the
    U column of CFG++ rows (``uncond``)."""
    return ROW_HEAD + (1 + num_slots) * (2 + bool(uncond) + num_slots)


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """||t_b|| over all non-batch dims: [B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).norm(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# The contract in plain torch (the torch backend, and the oracle every kernel is tested against)
# ---------------------------------------------------------------------------------------------------------------


def _check_estimate_args(x, out, rows, guidance, cfg):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor [B, ...], got {_describe(x)}")
    B = x.shape[0]
    _check_tensor_arg("out", out, (2 * B if cfg else B,) + tuple(x.shape[1:]), x.device, floating=True,
                      what="[uncond; cond]" if cfg else "x's shape")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] not in (1, B) or rows.shape[1] < 2:
        raise ValueError(f"rows must be [B or 1, R] coefficient rows, got {_describe(rows)}")
    _same_device_as_x("rows", rows, x)
    if cfg:
        if not isinstance(guidance, torch.Tensor) or guidance.dim() != 1 or guidance.shape[0] not in (1, B):
            raise ValueError(f"with cfg, guidance must be a [B or 1] tensor of guidance weights, got "
                             f"{_describe(guidance)}")
        _same_device_as_x("guidance", guidance, x)


def data_estimate(x, out, rows, guidance=None, cfg: bool = False, cfg_rescale=None) -> torch.Tensor:
    """The data estimate D = cx x + co out a stage forms from the model output, as every kernel forms it.

    Parameters
    ----------
    x : Tensor [B, *S]
    out : Tensor [B, *S] or [2B, *S] (with ``cfg``: [uncond; cond], combined as out_u + w (out_c - out_u))
    rows : Tensor [B or 1, R] (columns 0 and 1: cx, co)
    guidance : Tensor [B or 1], the cfg weight w (needed with ``cfg``)
    cfg_rescale : Tensor [B], optional, guidance_rescale's factors (with ``cfg``)

    Returns
    -------
    Tensor [B, *S] in float32 (float64 for float64 x)
    """
    _check_estimate_args(x, out, rows, guidance, cfg)
    return _data_estimate(x, out, rows, guidance, cfg, cfg_rescale if cfg else None)


def dynamic_threshold(x, out, rows, guidance=None, cfg: bool = False, ratio=0.995, max_value=1.0,
                      cfg_rescale=None) -> torch.Tensor:
    """``fastdiff.thresholding.dynamic_threshold`` with its arguments checked (as ``data_estimate`` checks them):
    the per-sample thresholds [B] that ``step(..., thresholds=)`` takes for this stage."""
    _check_estimate_args(x, out, rows, guidance, cfg)
    return _dynamic_threshold(x, out, rows, guidance, cfg, ratio, max_value, cfg_rescale)


def step_reference(x, out, slots, rows, seeds, draws, guidance, slot_reads: int, slot_writes: int, use_out: bool,
                   cfg: bool, noise: bool, langevin: bool, thresholds=None, z=None, x_out=None,
                   nonfinite=None, cfg_rescale=None, uncond: bool = False) -> torch.Tensor:
    """The step contract in plain torch, in float32 (float64 for float64 x): the torch backend and the oracle every
    kernel is tested against.  Mutates ``slots``; ``z`` (unit noise [B, *S]) replaces the Philox draw; ``x_out``
    receives x' (it may be x); ``nonfinite`` (int32 [B]) gets 1 OR-ed in for every sample whose stored x' has NaN /
    Inf; ``cfg_rescale`` [B] multiplies the guided output; ``uncond``: CFG++ rows with the U column.  This oracle
    allocates freely: only the kernels promise a step without temporaries."""
    B, K = x.shape[0], slots.shape[0]
    cdt = compute_dtype(x.dtype)
    nd = x.dim()
    c = rows.to(cdt)

    def coef(j):
        return _bcast(c[:, j], nd)

    xf = x.to(cdt)
    D = U = None
    if use_out:
        D = _data_estimate(x, out, rows, guidance, cfg, cfg_rescale if cfg else None)
        if uncond and cfg:
            U = _uncond_estimate(x, out, rows, cfg)
        if thresholds is not None:
            D = apply_threshold(D, thresholds)
            U = None if U is None else apply_threshold(U, thresholds)
        if uncond and not cfg:  # one model output: U is D
            U = D
    regs = [xf, D] + ([U] if uncond else []) + [slots[i].to(cdt) if (slot_reads >> i) & 1 else None
                                                for i in range(K)]
    W = len(regs)  # columns of M: x, D, (U,) S_0 .. S_{K-1}

    def combo(r):
        acc = torch.zeros_like(xf)
        for j, reg in enumerate(regs):
            if reg is not None:
                acc = acc + coef(ROW_HEAD + r * W + j) * reg
        return acc

    x_new = combo(0)
    if noise or langevin:
        if z is None:
            z = rng.normals_per_sample(seeds, draws.clamp(min=0).expand(B), xf[0].numel()).reshape(xf.shape)
        z = z.to(cdt) * _bcast((draws >= 0).expand(B).to(cdt), nd)
        x_new = x_new + coef(2) * z
        if langevin:
            # Song et al. 2021, Algorithm 4 per sample: eps = 2 r (snr ||z|| / ||s||)^2 with the score s
            s = coef(5) * xf + coef(6) * (D if D is not None else torch.zeros_like(xf))
            snr, r = c[:, 3].expand(B), c[:, 4].expand(B)
            ratio = per_sample_norm(z) / per_sample_norm(s)
            eps = _bcast(torch.where(snr != 0, 2.0 * r * (snr * ratio) ** 2, torch.zeros_like(ratio)), nd)
            x_new = x_new + eps * s + torch.sqrt(2.0 * eps) * z
    new = {i: combo(1 + i) for i in range(K) if (slot_writes >> i) & 1}
    for i, v in new.items():
        slots[i].copy_(v.to(slots.dtype))
    x_new = x_new.to(x.dtype)
    if nonfinite is not None:
        nonfinite.bitwise_or_((~torch.isfinite(x_new).reshape(B, -1).all(1)).to(nonfinite.dtype))
    if x_out is not None:
        return x_out.copy_(x_new)
    return x_new


def add_noise_reference(x0, alpha, sigma, seeds, draws) -> torch.Tensor:
    """Forward process x_t = alpha x0 + sigma z with per-sample alpha, sigma [B] and Philox z (math in fp32+)."""
    cdt = compute_dtype(x0.dtype)
    nd = x0.dim()
    z = rng.normals_per_sample(seeds, draws.expand(x0.shape[0]), x0[0].numel()).to(cdt).reshape(x0.shape)
    x = _bcast(alpha.to(cdt), nd) * x0.to(cdt) + _bcast(sigma.to(cdt), nd) * z
    return x.to(x0.dtype)


def _randn_reference(seeds, draws, shape, dtype):
    n = 1
    for s in shape[1:]:
        n *= s
    z = rng.normals_per_sample(seeds, draws.expand(shape[0]), n)
    return z.reshape(shape).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Backend lookup: the kernel backends register their implementations lazily (building C++ / compiling CUDA on
# first use)
# ---------------------------------------------------------------------------------------------------------------


_IMPLS: dict = {}  # (backend, op) -> function, once its backend loaded (an eager step must not pay for the lookup)
_REFERENCE = {"step": step_reference, "add_noise": add_noise_reference, "randn": _randn_reference}


def _impl(backend: str, op: str):
    fn = _IMPLS.get((backend, op))
    if fn is not None:
        return fn
    if backend == "torch":
        fn = _REFERENCE[op]
    elif backend not in BACKENDS:
        raise _unknown_backend(backend)
    else:
        from . import backends

        fn = backends.load(backend).OPS[op]  # raises (and caches nothing) where the backend cannot load
    _IMPLS[(backend, op)] = fn
    return fn


def _unknown_backend(name) -> ValueError:
    if name == "auto":
        return ValueError("ops take a concrete backend, not 'auto': pick one with "
                          "fastdiff.backends.resolve('auto', device_type) (one of: " + ", ".join(BACKENDS) + ")")
    return unknown_name("backend", name, BACKENDS)


def _backend_arg(backend, kernel) -> str:
    """The backend named by ``backend=`` or by its old name ``kernel=`` (not both, unless they agree)."""
    if kernel is not None:
        if backend not in ("torch", kernel):
            raise ValueError(f"got backend={backend!r} and kernel={kernel!r}: kernel= is the old name of backend=, "
                             "give only backend=")
        backend = kernel
    if backend not in BACKENDS:
        raise _unknown_backend(backend)
    return backend


def _call_step(backend, args, thresholds, z, x_out=None, nonfinite=None, cfg_rescale=None, uncond=False):
    """The backend's step on the contract's 13 arguments; thresholds, z, x_out, nonfinite, cfg_rescale and uncond as
    keywords, only when given (only the torch backend takes z)."""
    extra = {}
    if cfg_rescale is not None:
        extra["cfg_rescale"] = cfg_rescale
    if uncond:
        extra["uncond"] = True
    if thresholds is not None:
        extra["thresholds"] = thresholds
    if z is not None:
        extra["z"] = z
    if x_out is not None:
        extra["x_out"] = x_out
    if nonfinite is not None:
        extra["nonfinite"] = nonfinite
    return _impl(backend, "step")(*args, **extra)


@torch.library.custom_op("fastdiff::step", mutates_args=("slots",))
def _step_op(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor,
             draws: torch.Tensor, guidance: torch.Tensor, slot_reads: int, slot_writes: int, use_out: bool,
             cfg: bool, noise: bool, langevin: bool, backend: str,
             thresholds: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
             cfg_rescale: Optional[torch.Tensor] = None, uncond: bool = False) -> torch.Tensor:
    return _call_step(backend, (x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg,
                                noise, langevin), thresholds, z, cfg_rescale=cfg_rescale, uncond=uncond)


@_step_op.register_fake
def _(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin, backend,
      thresholds=None, z=None, cfg_rescale=None, uncond=False):
    return torch.empty_like(x)


@torch.library.custom_op("fastdiff::add_noise", mutates_args=())
def _add_noise_op(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, seeds: torch.Tensor,
                  draws: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(backend, "add_noise")(x0, alpha, sigma, seeds, draws)


@_add_noise_op.register_fake
def _(x0, alpha, sigma, seeds, draws, backend):
    return torch.empty_like(x0)


@torch.library.custom_op("fastdiff::randn", mutates_args=())
def _randn_op(seeds: torch.Tensor, draws: torch.Tensor, shape: list[int], dtype: torch.dtype,
              backend: str) -> torch.Tensor:
    return _impl(backend, "randn")(seeds, draws, shape, dtype)


@_randn_op.register_fake
def _(seeds, draws, shape, dtype, backend):
    return seeds.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks (all of them live here; a backend checks only its own limits)
# ---------------------------------------------------------------------------------------------------------------


def _describe(v) -> str:
    """A short description of a bad argument for error messages."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    return f"{type(v).__name__} {v!r}" if isinstance(v, (numbers.Number, str)) else type(v).__name__


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device, where a missing index ("cuda") matches any index of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _same_device_as_x(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: put every input on one device (.to())")


def _check_tensor_arg(name, t, shape, device, *, floating=False, dtype=None, what=""):
    """t must be a tensor of ``shape`` (a tuple, or None for any) on ``device``, floating or of ``dtype``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor{' of shape ' + str(shape) if shape else ''}, got {_describe(t)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}{' (' + what + ')' if what else ''}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: put every input on one device (.to())")


def _check_column(name, t, B, device, *, kind, dtype=None):
    """t must be a 1-D tensor [B or 1] (of ``dtype``, or floating) on ``device``."""
    ok = (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] in (1, B)
          and (t.dtype == dtype if dtype is not None else t.is_floating_point()))
    if not ok:
        raise ValueError(f"{name} must be {kind} tensor [B or 1] = [{B} or 1], got {_describe(t)}")
    _check_tensor_arg(name, t, None, device)


def _check_seeds_tensor(seeds, B, device):
    if (not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1
            or seeds.shape[0] != B):
        raise ValueError(f"seeds must be an int64 tensor with one entry per sample ([{B}], e.g. from "
                         f"fastdiff.rng.seeds_tensor), got {_describe(seeds)}")
    _check_tensor_arg("seeds", seeds, None, device)


def _check_x(name, x):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name} must be a floating-point tensor [B, ...], got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} is {x.dtype}; fastdiff's ops take float32, float16, bfloat16 or float64 (torch "
                         f"backend) data: convert it with .float()")


def _check_per_sample(name, t, x, dev, what, source):
    """A per-sample [B] tensor in x's compute dtype on x's device (thresholds, cfg_rescale)."""
    B, want = x.shape[0], compute_dtype(x.dtype)
    if not isinstance(t, torch.Tensor) or t.dtype != want or tuple(t.shape) != (B,):
        raise ValueError(f"{name} must be a {want} tensor with {what} per sample ([{B}]) for {x.dtype} x "
                         f"(from {source}), got {_describe(t)}")
    _check_tensor_arg(name, t, None, dev)


def _check_step_args(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, thresholds,
                     z, backend, x_out=None, nonfinite=None, cfg_rescale=None, uncond=False):
    _check_x("x", x)
    B, dev = x.shape[0], x.device
    if not isinstance(slots, torch.Tensor) or slots.dim() != x.dim() + 1 or tuple(slots.shape[1:]) != tuple(x.shape):
        raise ValueError(f"slots must be a tensor [K, *x.shape] = [K, {', '.join(map(str, x.shape))}] (K = 0 "
                         f"without history), got {_describe(slots)}")
    K = slots.shape[0]
    if K and slots.dtype != x.dtype:
        raise ValueError(f"slots are {slots.dtype} but x is {x.dtype}: keep the history slots in x's dtype")
    _check_tensor_arg("slots", slots, None, dev)
    if use_out:
        _check_tensor_arg("out", out, (2 * B if cfg else B,) + tuple(x.shape[1:]), dev,
                          what="[uncond; cond] with cfg" if cfg else "x's shape")
        if out.dtype != x.dtype:
            raise ValueError(f"out is {out.dtype} but x is {x.dtype}: cast the model output to x's dtype")
    elif not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a tensor (any, e.g. x, when use_out=False), got {_describe(out)}")
    R = row_length(K, uncond)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] not in (1, B) or rows.shape[1] != R:
        what = " and the U column of CFG++ rows (uncond=True)" if uncond else ""
        raise ValueError(f"rows must be a tensor [B or 1, {R}] for K={K} slots{what}, got {_describe(rows)}")
    _check_tensor_arg("rows", rows, None, dev, floating=True)
    _check_seeds_tensor(seeds, B, dev)
    _check_column("draws", draws, B, dev, kind="an int64 (Philox draw index)", dtype=torch.int64)
    _check_column("guidance", guidance, B, dev, kind="a floating-point (guidance weight)")
    for name, mask in (("slot_reads", slot_reads), ("slot_writes", slot_writes)):
        if not 0 <= mask < (1 << K):
            raise ValueError(f"{name} is the bitmask {mask} but there are {K} slots: use bits 0..{K - 1} only")
    if cfg and not use_out:
        raise ValueError("cfg=True needs use_out=True: guidance combines the model outputs of a stage that calls it")
    if thresholds is not None:
        if not use_out:
            raise ValueError("thresholds are given for a stage without model output (use_out=False): drop them")
        _check_per_sample("thresholds", thresholds, x, dev, "one entry", "fastdiff.thresholding.dynamic_threshold")
    if cfg_rescale is not None:
        if not cfg:
            raise ValueError("cfg_rescale (guidance_rescale's factors) is given for a stage without guidance "
                             "(cfg=False): drop it, it rescales the guided output")
        _check_per_sample("cfg_rescale", cfg_rescale, x, dev, "one factor", "fastdiff.guidance.rescale_factors")
    if z is not None:
        if backend != "torch":
            raise ValueError(f"z= (external unit noise) is taken by the torch backend only; the {backend!r} kernel "
                             "draws its Philox noise itself: use backend='torch' or drop z")
        _check_tensor_arg("z", z, tuple(x.shape), dev, floating=True, what="unit noise of x's shape")
    if not x.is_contiguous() or (use_out and not out.is_contiguous()):
        raise ValueError("x and out must be contiguous (call .contiguous() first): kernels stream them linearly")
    if x_out is not None:
        _check_tensor_arg("x_out", x_out, tuple(x.shape), dev, what="x's shape")
        if x_out.dtype != x.dtype or not x_out.is_contiguous():
            raise ValueError(f"x_out must be a contiguous {x.dtype} tensor of x's shape (it receives x'), got "
                             f"{_describe(x_out)}")
        _check_x_out_aliasing(x, out, slots, use_out, x_out)
    if nonfinite is not None:
        if (not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.int32
                or tuple(nonfinite.shape) != (B,) or not nonfinite.is_contiguous()):
            raise ValueError(f"nonfinite must be a contiguous int32 tensor with one flag per sample ([{B}], e.g. "
                             f"torch.zeros({B}, dtype=torch.int32)), got {_describe(nonfinite)}")
        _check_tensor_arg("nonfinite", nonfinite, None, dev)


def _check_x_out_aliasing(x, out, slots, use_out, x_out):
    if (x_out.data_ptr() != x.data_ptr() and _overlap(x_out, x)) or _overlap(x_out, slots) or (
            use_out and _overlap(x_out, out)):
        raise ValueError("x_out must be x itself (an in-place step) or memory of its own: it overlaps x, out or "
                         "slots")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storage spans of two tensors intersect (a conservative test)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---------------------------------------------------------------------------------------------------------------
# Public wrappers: check the arguments, then call the backend (the registered op when traced)
# ---------------------------------------------------------------------------------------------------------------


def _traced(*tensors) -> bool:
    """True under torch.compile or with tensor subclasses (fake tensors, functionalization): use the registered op.

    In eager code the backends are called directly: ``torch.library.custom_op``'s Python dispatch costs more than a
    whole CPU step on a latent.
    """
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors if t is not None)


_CPU_NO_GUIDANCE = torch.zeros(1)  # the default guidance weight on CPU (read only when cfg; never written)
# Layouts of ops.step arguments that passed every check: (shape, dtype, device) of each tensor, contiguity of x and
# out, the flags the checks depend on.  A repeated layout (every later stage of a loop) skips the checks, whose
# outcome depends on nothing else; bounded, so a stream of new shapes cannot grow it.
_CHECKED_LAYOUTS: set = set()


def step(x, out, slots, rows, seeds, draws, guidance=None, *, slot_reads=None, slot_writes=0, use_out=True,
         cfg=False, noise=True, langevin=False, backend="torch", thresholds=None, z=None, x_out=None, nonfinite=None,
         kernel=None, cfg_rescale=None, uncond=False) -> torch.Tensor:
    """Execute one stage for a batch: returns x' and updates ``slots`` in place (see the module docstring).

    Parameters
    ----------
    x : Tensor [B, *S]
    out : Tensor [B, *S] or [2B, *S] (with ``cfg``)
    slots : Tensor [K, B, *S]
    rows : Tensor [B or 1, 7 + (1+K)(2+K)]  (7 + (1+K)(3+K) with ``uncond``)
    seeds : int64 Tensor [B];  draws : int64 Tensor [B or 1];  guidance : Tensor [B or 1] (cfg weight)
    slot_reads, slot_writes : int bitmasks (default: read every slot, write none)
    use_out, cfg, noise, langevin : bool, structural flags of the stage (host constants)
    backend : {"torch", "cpu", "triton", "cuda"} (``kernel=`` is its old name)
    thresholds : Tensor [B], optional
        Dynamic thresholding: D = clamp(D, -s_b, s_b) / s_b before D is used; float32 (float64 with float64 x),
        e.g. from ``dynamic_threshold`` on the same x, out, rows and guidance.
    z : Tensor [B, *S], optional
        Unit noise used in place of the Philox draw (torch backend only; the kernels draw their own noise).
    x_out : Tensor [B, *S], optional
        Receives x' and is returned (x itself for an in-place step, or a buffer of its own): no allocation.
    nonfinite : int32 Tensor [B], optional
        Per-sample flags: the step ORs in 1 for every sample whose stored x' has a NaN or Inf, as it writes (no
        extra pass, no host sync; read them when convenient, e.g. once after a loop).
    cfg_rescale : Tensor [B], optional
        guidance_rescale (with ``cfg``): the guided output is multiplied by m_b; float32 (float64 with float64 x),
        from ``fastdiff.guidance.rescale_factors`` on the same out and guidance.
    uncond : bool
        CFG++ rows: M's columns are [x, D, U, S_0 ..] with U = cx x + co out_u (U = D without ``cfg``).
    """
    backend = _backend_arg(backend, kernel)
    if not isinstance(x, torch.Tensor) or not isinstance(slots, torch.Tensor):
        _check_step_args(x, out, slots, rows, seeds, draws, guidance, 0, 0, use_out, cfg, thresholds, z, backend,
                         cfg_rescale=cfg_rescale, uncond=uncond)
    if guidance is None:
        plain_cpu = x.is_cpu and type(x) is torch.Tensor and not torch.compiler.is_compiling()
        guidance = _CPU_NO_GUIDANCE if plain_cpu else torch.zeros(1, dtype=torch.float32, device=x.device)
    if slot_reads is None:
        slot_reads = (1 << slots.shape[0]) - 1
    args = (x, out, slots, rows, seeds, draws, guidance, int(slot_reads), int(slot_writes), bool(use_out), bool(cfg),
            bool(noise), bool(langevin))
    uncond = bool(uncond)
    tensors = (x, out, slots, rows, seeds, draws, guidance, thresholds, z, x_out, nonfinite, cfg_rescale)
    if torch.compiler.is_compiling() or any([type(t) is not torch.Tensor for t in tensors if t is not None]):
        # fake / functional tensors, compile (and non-tensor arguments, which the checks name)
        _check_step_args(*args[:11], thresholds, z, backend, x_out, nonfinite, cfg_rescale, uncond)
        x_new = _step_op(*args, backend, thresholds, z, cfg_rescale, uncond)
        if nonfinite is not None:
            nonfinite.bitwise_or_((~torch.isfinite(x_new).reshape(x.shape[0], -1).all(1)).to(nonfinite.dtype))
        return x_new if x_out is None else x_out.copy_(x_new)
    layout = (backend, args[7], args[8], args[9], args[10], uncond, *[
        None if t is None else (t.shape, t.dtype, t.device, t.is_contiguous()) for t in tensors])
    if layout not in _CHECKED_LAYOUTS:
        _check_step_args(*args[:11], thresholds, z, backend, x_out, nonfinite, cfg_rescale, uncond)
        if len(_CHECKED_LAYOUTS) >= 256:
            _CHECKED_LAYOUTS.clear()
        _CHECKED_LAYOUTS.add(layout)
    elif x_out is not None and x_out is not x:  # aliasing depends on addresses, not on the layout
        _check_x_out_aliasing(x, out, slots, use_out, x_out)
    return _call_step(backend, args, thresholds, z, x_out, nonfinite, cfg_rescale, uncond)


# ---------------------------------------------------------------------------------------------------------------
# The lean path: loops that checked their argument layout once (the Sampler's workspaces, the diffusers drop-ins'
# programs, the batcher) call the backend's step directly, without ``step``'s checks and dispatch
# ---------------------------------------------------------------------------------------------------------------


def _reference_kernel(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise,
                      langevin, x_out=None, thresholds=None, nonfinite=None, cfg_rescale=None, uncond=False):
    """``step_reference`` in the kernels' argument order (x_out, thresholds, nonfinite, cfg_rescale, uncond last; no
    external noise)."""
    return step_reference(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise,
                          langevin, thresholds, None, x_out, nonfinite, cfg_rescale, uncond)


def _step_kernel(backend: str):
    """The backend's step function itself, no checks: ``fn(x, out, slots, rows, seeds, draws, guidance, slot_reads,
    slot_writes, use_out, cfg, noise, langevin, x_out, thresholds, nonfinite, cfg_rescale, uncond)`` (the last five
    optional) with Python ints / bools for the flags, returning x' (``x_out`` when given).

    Only for callers whose arguments passed ``_check_step_args`` once for their layout (shapes, dtypes, devices,
    contiguity, flags) and who keep that layout: plain tensors (no compile, no tensor subclasses), a model output
    checked per call, ``x_out`` not overlapping x, out or slots.  The cpu backend's is the C++ extension's function
    (a pybind call, no Python frame in between); the torch backend's is ``step_reference``.
    """
    fn = _IMPLS.get((backend, "kernel"))
    if fn is None:
        if backend == "torch":
            fn = _reference_kernel
        elif backend not in BACKENDS:
            raise _unknown_backend(backend)
        else:
            from . import backends

            module = backends.load(backend)
            fn = module.step_kernel() if hasattr(module, "step_kernel") else module.OPS["step"]
        _IMPLS[(backend, "kernel")] = fn
    return fn


def _seeds_arg(seeds, B, device) -> torch.Tensor:
    """Seeds as an int64 tensor [B] on ``device``: an int64 tensor as is, else a sequence of B integers in
    [0, 2**64) (checked by ``fastdiff.rng.seeds_tensor``)."""
    if isinstance(seeds, torch.Tensor) and seeds.dtype == torch.int64:
        _check_seeds_tensor(seeds, B, device)
        return seeds
    if isinstance(seeds, numbers.Integral):
        raise ValueError(f"seeds must hold one integer per sample (a list of {B}), got the single int {seeds}: "
                         f"write seeds=[{seeds}] for one sample")
    t = rng.seeds_tensor(seeds, device=device)
    if t.shape[0] != B:
        raise ValueError(f"seeds has {t.shape[0]} entries but the batch has {B} samples: give one seed per sample")
    return t


def _draws_arg(draws, B, device) -> torch.Tensor:
    """A Philox draw index: an int in [0, 2**32) or an int64 tensor [B or 1]."""
    if draws is None:
        draws = 0
    if isinstance(draws, torch.Tensor):
        _check_column("draws", draws, B, device, kind="an int64 (Philox draw index)", dtype=torch.int64)
        return draws
    return torch.tensor([rng._check_u32(draws, "draw")], dtype=torch.int64, device=device)


def _per_sample_arg(name, v, B, x0) -> torch.Tensor:
    """A per-sample coefficient: a number, a 0-d tensor or a 1-D tensor [B or 1] on x0's device."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return torch.tensor([float(v)], dtype=compute_dtype(x0.dtype), device=x0.device)
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        v = v.reshape(1)
    _check_column(name, v, B, x0.device, kind="a number or a floating-point")
    return v


def add_noise(x0, alpha, sigma, seeds, draws=None, *, backend="torch", kernel=None) -> torch.Tensor:
    """Forward process ``alpha x0 + sigma z`` with per-sample alpha, sigma and Philox noise (img2img, training).

    Parameters
    ----------
    x0 : Tensor [B, *S] (float32 / float16 / bfloat16; float64 on the torch backend)
    alpha, sigma : number or Tensor [B or 1]
    seeds : int64 Tensor [B] (seed bit patterns) or a sequence of B integers in [0, 2**64)
    draws : int in [0, 2**32) or int64 Tensor [B or 1] (default: draw 0, the prior's)
    backend : {"torch", "cpu", "triton", "cuda"} (``kernel=`` is its old name)

    Returns
    -------
    Tensor [B, *S] in x0's dtype
    """
    backend = _backend_arg(backend, kernel)
    _check_x("x0", x0)
    B = x0.shape[0]
    alpha = _per_sample_arg("alpha", alpha, B, x0)
    sigma = _per_sample_arg("sigma", sigma, B, x0)
    seeds = _seeds_arg(seeds, B, x0.device)
    draws = _draws_arg(draws, B, x0.device)
    x0 = x0.contiguous()
    if _traced(x0, alpha, sigma, seeds, draws):
        return _add_noise_op(x0, alpha, sigma, seeds, draws, backend)
    return _impl(backend, "add_noise")(x0, alpha, sigma, seeds, draws)


def randn(shape, seeds, draw=0, *, dtype=torch.float32, device=None, backend="torch", out=None,
          kernel=None) -> torch.Tensor:
    """Philox normals of ``shape`` (batch first), one seed per sample, bitwise batch-invariant.

    Parameters
    ----------
    shape : sequence of ints, batch first (each >= 1)
    seeds : int64 Tensor [B] (seed bit patterns) or a sequence of B integers in [0, 2**64)
    draw : int in [0, 2**32) or int64 Tensor [B or 1], the Philox draw index (0: the prior)
    dtype : float32, float16, bfloat16 (float64 on the torch backend)
    device : the output's device (default: the seeds tensor's, else CPU)
    backend : {"torch", "cpu", "triton", "cuda"} (``kernel=`` is its old name)
    out : Tensor ``shape`` of ``dtype``, contiguous, optional
        Receives the normals and is returned (the cpu kernel draws straight into it; other backends copy).

    Returns
    -------
    Tensor ``shape`` of ``dtype``
    """
    backend = _backend_arg(backend, kernel)
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) < 1:
        raise ValueError(f"shape must be a sequence of sizes with the batch first, e.g. (4, 3, 64, 64), got "
                         f"{_describe(shape)}")
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"shape must hold positive integer sizes, got {tuple(shape)}")
    shape = [int(s) for s in shape]
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
    if device is not None:
        device = torch.device(device)
    if isinstance(seeds, torch.Tensor):
        if device is not None and not _same_device(seeds.device, device):
            raise ValueError(f"seeds is on {seeds.device} but device={device}: move seeds or drop device=")
        device = seeds.device
    device = device if device is not None else torch.device("cpu")
    seeds = _seeds_arg(seeds, shape[0], device)
    draws = _draws_arg(draw, shape[0], seeds.device)
    if out is not None:
        if (not isinstance(out, torch.Tensor) or list(out.shape) != shape or out.dtype != dtype
                or not out.is_contiguous() or not _same_device(out.device, seeds.device)):
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {seeds.device}, "
                             f"got {_describe(out)}")
        if backend == "cpu" and not _traced(seeds, draws, out):
            return _impl(backend, "randn")(seeds, draws, shape, dtype, out=out)
        return out.copy_(randn(shape, seeds, draws, dtype=dtype, backend=backend))
    if _traced(seeds, draws):
        return _randn_op(seeds, draws, shape, dtype, backend)
    return _impl(backend, "randn")(seeds, draws, shape, dtype)
