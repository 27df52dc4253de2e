"""fastdiff's custom ops: ``fastdiff::step``, ``fastdiff::add_noise``, ``fastdiff::randn``.

Declared once with ``torch.library.custom_op`` (fake implementations included, so they compose with
``torch.compile(fullgraph=True)`` and CUDA-graph capture); the ``kernel`` argument names the implementation:
``"torch"`` (the reference below, any device, float64 too), ``"cpu"`` (C++/OpenMP, csrc/cpu), ``"triton"``
(kernels/), ``"cuda"`` (CUDA C++, csrc/cuda).  Every kernel implements exactly ``step_reference``.

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

    D  = cx x + co out ;  x' = M[0].[x, D, S] + g z (+ Langevin term) ;  S_i = M[1+i].[x, D, S] for written i
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import rng

KERNELS = ("torch", "cpu", "triton", "cuda")
ROW_HEAD = 7  # cx, co, g, snr, r, lsx, lsD


def row_length(num_slots: int) -> int:
    return ROW_HEAD + (1 + num_slots) * (2 + num_slots)


def _bcast(col: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B|1] -> [B|1, 1, ...] for broadcasting against [B, *S]."""
    return col.reshape((-1,) + (1,) * (ndim - 1))


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def step_reference(x, out, slots, rows, seeds, draws, guidance, slot_reads: int, slot_writes: int, use_out: bool,
                   cfg: bool, noise: bool, langevin: bool, thresholds=None) -> torch.Tensor:
    """The step contract in plain torch (the oracle every kernel is tested against). Mutates ``slots``."""
    B, K = x.shape[0], slots.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    nd = x.dim()
    c = rows.to(cdt)

    def coef(j):
        return _bcast(c[:, j], nd)

    xf = x.to(cdt)
    regs = [xf, None] + [None] * K
    if use_out:
        o = out.to(cdt)
        if cfg:
            w = _bcast(guidance.to(cdt), nd)
            o = o[:B] + w * (o[B:] - o[:B])
        regs[1] = coef(0) * xf + coef(1) * o
        if thresholds is not None:
            regs[1] = apply_threshold(regs[1], thresholds.to(cdt))
    for i in range(K):
        if (slot_reads >> i) & 1:
            regs[2 + i] = slots[i].to(cdt)

    def combo(r):
        acc = torch.zeros_like(xf)
        for j, reg in enumerate(regs):
            if reg is not None:
                acc = acc + coef(ROW_HEAD + r * (2 + K) + j) * reg
        return acc

    x_new = combo(0)
    if noise or langevin:
        noisy = draws >= 0
        z = rng.normals_per_sample(seeds, draws.clamp(min=0).expand(B), xf[0].numel()).to(cdt).reshape(xf.shape)
        z = z * _bcast(noisy.expand(B).to(cdt), nd)
        x_new = x_new + coef(2) * z
        if langevin:
            D = regs[1] if regs[1] is not None else torch.zeros_like(xf)
            s = coef(5) * xf + coef(6) * D
            snr, r = c[:, 3].expand(B), c[:, 4].expand(B)
            ratio = per_sample_norm(z) / per_sample_norm(s)
            eps = torch.where(snr != 0, 2.0 * r * (snr * ratio) ** 2, torch.zeros_like(ratio))
            eps = _bcast(eps, nd)
            x_new = x_new + eps * s + torch.sqrt(2.0 * eps) * z
    new = {i: combo(1 + i) for i in range(K) if (slot_writes >> i) & 1}
    for i, v in new.items():
        slots[i].copy_(v.to(slots.dtype))
    return x_new.to(x.dtype)


def apply_threshold(D: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Imagen's dynamic thresholding of a data estimate D [B, ...] with per-sample thresholds s [B]:
    clamp(D, -s, s) / s (NaN stays NaN), as every kernel applies it."""
    s = _bcast(thresholds, D.dim())
    return torch.clamp(D, -s, s) / s


def add_noise_reference(x0, alpha, sigma, seeds, draws) -> torch.Tensor:
    """Forward process x_t = alpha x0 + sigma z with per-sample alpha, sigma [B] and Philox z (math in fp32+)."""
    cdt = torch.float64 if x0.dtype == torch.float64 else torch.float32
    nd = x0.dim()
    z = rng.normals_per_sample(seeds, draws.expand(x0.shape[0]), x0[0].numel()).to(cdt).reshape(x0.shape)
    x = _bcast(alpha.to(cdt), nd) * x0.to(cdt) + _bcast(sigma.to(cdt), nd) * z
    return x.to(x0.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Kernel lookup: the backends register their implementations lazily (building C++ / compiling CUDA on first use)
# ---------------------------------------------------------------------------------------------------------------


_IMPLS: dict = {}  # (kernel, op) -> function, once its backend loaded (an eager step must not pay for the lookup)


def _impl(kernel: str, op: str):
    fn = _IMPLS.get((kernel, op))
    if fn is not None:
        return fn
    if kernel == "torch":
        fn = {"step": step_reference, "add_noise": add_noise_reference, "randn": _randn_reference}[op]
    elif kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    else:
        from . import backends

        fn = backends.load(kernel).OPS[op]  # raises (and caches nothing) where the backend cannot load
    _IMPLS[(kernel, op)] = fn
    return fn


def _randn_reference(seeds, draws, shape, dtype):
    n = 1
    for s in shape[1:]:
        n *= s
    z = rng.normals_per_sample(seeds, draws.expand(shape[0]), n)
    return z.reshape(shape).to(dtype).contiguous()


@torch.library.custom_op("fastdiff::step", mutates_args=("slots",))
def _step_op(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor,
             draws: torch.Tensor, guidance: torch.Tensor, slot_reads: int, slot_writes: int, use_out: bool,
             cfg: bool, noise: bool, langevin: bool, kernel: str,
             thresholds: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _call_step(kernel, (x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg,
                               noise, langevin), thresholds)


@_step_op.register_fake
def _(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin, kernel,
      thresholds=None):
    return torch.empty_like(x)


def _call_step(kernel, args, thresholds):
    """The kernel's step on the contract's 13 arguments; thresholds only when given (keyword, every kernel)."""
    if thresholds is None:
        return _impl(kernel, "step")(*args)
    return _impl(kernel, "step")(*args, thresholds=thresholds)


@torch.library.custom_op("fastdiff::add_noise", mutates_args=())
def _add_noise_op(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, seeds: torch.Tensor,
                  draws: torch.Tensor, kernel: str) -> torch.Tensor:
    return _impl(kernel, "add_noise")(x0, alpha, sigma, seeds, draws)


@_add_noise_op.register_fake
def _(x0, alpha, sigma, seeds, draws, kernel):
    return torch.empty_like(x0)


@torch.library.custom_op("fastdiff::randn", mutates_args=())
def _randn_op(seeds: torch.Tensor, draws: torch.Tensor, shape: list[int], dtype: torch.dtype,
              kernel: str) -> torch.Tensor:
    return _impl(kernel, "randn")(seeds, draws, shape, dtype)


@_randn_op.register_fake
def _(seeds, draws, shape, dtype, kernel):
    return seeds.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Public wrappers: check shapes / devices / dtypes, then call the op
# ---------------------------------------------------------------------------------------------------------------


def _traced(*tensors) -> bool:
    """True under torch.compile or with tensor subclasses (fake tensors, functionalization): use the registered op.

    In eager code the kernels are called directly: ``torch.library.custom_op``'s Python dispatch costs ~100 us per
    call, more than a whole CPU step on a latent.
    """
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


_CPU_NO_GUIDANCE = torch.zeros(1)  # the default guidance weight on CPU (read only when cfg; never written)
# Layouts of ops.step arguments that passed every check: (shape, dtype, device) of each tensor, contiguity of x and
# out, the flags the checks depend on.  A repeated layout (every later stage of a loop) skips the checks, whose
# outcome depends on nothing else; bounded, so a stream of new shapes cannot grow it.
_CHECKED_LAYOUTS: set = set()


def _check_step(x, out, slots, rows, seeds, draws, guidance, use_out, cfg):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating-point tensor [B, ...]")
    B = x.shape[0]
    dev = x.device
    K = slots.shape[0]
    for name, t in (("out", out), ("slots", slots), ("rows", rows), ("seeds", seeds), ("draws", draws),
                    ("guidance", guidance)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but x is on {dev}: put every step input on one device")
    if use_out:
        want = (2 * B if cfg else B,) + tuple(x.shape[1:])
        if tuple(out.shape) != want:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {want} ({'[uncond; cond]' if cfg else 'x'})")
        if out.dtype != x.dtype:
            raise ValueError(f"out is {out.dtype} but x is {x.dtype}: cast the model output to x's dtype")
    if tuple(slots.shape[1:]) != tuple(x.shape) or (K and slots.dtype != x.dtype):
        raise ValueError(f"slots must be [K, *x.shape] = [K, {', '.join(map(str, x.shape))}] in x's dtype, "
                         f"got {tuple(slots.shape)} {slots.dtype}")
    if rows.dim() != 2 or rows.shape[0] not in (1, B) or rows.shape[1] != row_length(K):
        raise ValueError(f"rows must be [B or 1, {row_length(K)}] for K={K} slots, got {tuple(rows.shape)}")
    if seeds.dtype != torch.int64 or tuple(seeds.shape) != (B,):
        raise ValueError(f"seeds must be an int64 tensor with one entry per sample ({B}), got "
                         f"{tuple(seeds.shape)} {seeds.dtype}")
    if draws.dtype != torch.int64 or draws.dim() != 1 or draws.shape[0] not in (1, B):
        raise ValueError(f"draws must be int64 [B or 1], got {tuple(draws.shape)} {draws.dtype}")
    if guidance.dim() != 1 or guidance.shape[0] not in (1, B):
        raise ValueError(f"guidance must be [B or 1], got {tuple(guidance.shape)}")


def _check_thresholds(x, thresholds):
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(thresholds, torch.Tensor):
        raise ValueError(f"thresholds must be a {want} tensor [B] (from fastdiff.ops.dynamic_threshold), got "
                         f"{type(thresholds).__name__}")
    if thresholds.device != x.device:
        raise ValueError(f"thresholds is on {thresholds.device} but x is on {x.device}: put every step input on one "
                         "device")
    if thresholds.dtype != want or tuple(thresholds.shape) != (x.shape[0],):
        raise ValueError(f"thresholds must be a {want} tensor with one entry per sample ([{x.shape[0]}]) for {x.dtype} "
                         f"x, got {tuple(thresholds.shape)} {thresholds.dtype}")


def step(x, out, slots, rows, seeds, draws, guidance=None, *, slot_reads=None, slot_writes=0, use_out=True,
         cfg=False, noise=True, langevin=False, kernel="torch", thresholds=None) -> torch.Tensor:
    """Execute one stage for a batch: returns x' and updates ``slots`` in place (see the module docstring).

    Parameters
    ----------
    x : Tensor [B, *S]
    out : Tensor [B, *S] or [2B, *S] (with ``cfg``)
    slots : Tensor [K, B, *S]
    rows : Tensor [B or 1, 7 + (1+K)(2+K)]
    seeds : int64 Tensor [B];  draws : int64 Tensor [B or 1];  guidance : Tensor [B or 1] (cfg weight)
    slot_reads, slot_writes : int bitmasks (default: read every slot, write none)
    use_out, cfg, noise, langevin : bool, structural flags of the stage (host constants)
    kernel : {"torch", "cpu", "triton", "cuda"}
    thresholds : Tensor [B], optional
        Dynamic thresholding: D = clamp(D, -s_b, s_b) / s_b before D is used; float32 (float64 with float64 x),
        e.g. from ``dynamic_threshold`` on the same x, out, rows and guidance.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError("x must be a floating-point tensor [B, ...]")
    T = torch.Tensor
    plain = (type(x) is T and type(out) is T and type(slots) is T and type(rows) is T and type(seeds) is T
             and type(draws) is T and (guidance is None or type(guidance) is T)
             and (thresholds is None or type(thresholds) is T))
    if guidance is None:
        guidance = _CPU_NO_GUIDANCE if plain and x.is_cpu else torch.zeros(1, dtype=torch.float32, device=x.device)
    if slot_reads is None:
        slot_reads = (1 << slots.shape[0]) - 1
    args = (x, out, slots, rows, seeds, draws, guidance, int(slot_reads), int(slot_writes), bool(use_out), bool(cfg),
            bool(noise), bool(langevin))
    if not plain or torch.compiler.is_compiling():  # fake / functional tensors, torch.compile: the registered op
        _check_step_args(x, out, slots, rows, seeds, draws, guidance, use_out, cfg, thresholds)
        return _step_op(*args, kernel, thresholds)
    layout = (x.shape, x.dtype, x.device, x.is_contiguous(), out.shape, out.dtype, out.device, out.is_contiguous(),
              slots.shape, slots.dtype, slots.device, rows.shape, rows.device, seeds.shape, seeds.dtype,
              seeds.device, draws.shape, draws.dtype, draws.device, guidance.shape, guidance.device, args[9],
              args[10], None if thresholds is None else (thresholds.shape, thresholds.dtype, thresholds.device))
    if layout not in _CHECKED_LAYOUTS:
        _check_step_args(x, out, slots, rows, seeds, draws, guidance, use_out, cfg, thresholds)
        if len(_CHECKED_LAYOUTS) >= 256:
            _CHECKED_LAYOUTS.clear()
        _CHECKED_LAYOUTS.add(layout)
    fn = _impl(kernel, "step")
    return fn(*args) if thresholds is None else fn(*args, thresholds=thresholds)


def _check_step_args(x, out, slots, rows, seeds, draws, guidance, use_out, cfg, thresholds):
    _check_step(x, out, slots, rows, seeds, draws, guidance, use_out, cfg)
    if thresholds is not None:
        _check_thresholds(x, thresholds)
    if not x.is_contiguous() or (use_out and not out.is_contiguous()):
        raise ValueError("x and out must be contiguous (call .contiguous() first): kernels stream them linearly")


def threshold_of(D: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Per-sample dynamic thresholds of a data estimate (Saharia et al. 2022, Imagen; diffusers' ``_threshold_sample``).

    ``s_b = clamp(quantile(|D_b|, ratio), 1, max_value)`` over all elements of sample b, in float32 (float64 for
    float64 D).  Plain torch ops on D's device, no host sync (graph-capturable).

    Parameters
    ----------
    D : Tensor [B, *S]
    ratio : float in [0, 1];  max_value : float >= 1

    Returns
    -------
    Tensor [B], float32 (float64 for float64 D)
    """
    ratio, max_value = threshold_options(ratio, max_value)
    cdt = torch.float64 if D.dtype == torch.float64 else torch.float32
    a = D.to(cdt).reshape(D.shape[0], -1).abs()
    n = a.shape[1]
    if n == 0:
        return torch.ones(D.shape[0], dtype=cdt, device=D.device)
    # torch.quantile's linear interpolation, rank = ratio (n - 1) rounded in the compute dtype as torch does, with
    # the two order statistics from topk: torch.quantile sorts every row and refuses more than 2**24 elements.
    rnd = (lambda v: v) if cdt == torch.float64 else _round_f32
    rank = rnd(rnd(ratio) * (n - 1))
    lo, hi = math.floor(rank), math.ceil(rank)
    top = torch.topk(a, n - lo, dim=1).values  # descending: order statistic i (ascending) sits at n - 1 - i
    q = torch.lerp(top[:, n - 1 - lo], top[:, n - 1 - hi], rank - lo)
    return q.clamp(min=1.0, max=max_value)


def _round_f32(v: float) -> float:
    """v rounded to float32 (to nearest, ties to even) in plain Python, so torch.compile folds it as a constant."""
    if v == 0.0:
        return v
    m, e = math.frexp(v)  # v = m 2**e, 0.5 <= |m| < 1: 24 significant bits are round(m 2**24)
    return math.ldexp(round(m * 16777216.0) / 16777216.0, e)


def threshold_options(ratio, max_value) -> tuple[float, float]:
    """Check dynamic thresholding's options: (ratio in [0, 1], max_value >= 1) as floats, else ValueError."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"dynamic thresholding takes the quantile ratio (a number in [0, 1], Imagen: 0.995), got "
                         f"{ratio!r}")
    ratio, max_value = float(ratio), float(max_value)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the dynamic thresholding ratio is a quantile in [0, 1], got {ratio}")
    if not max_value >= 1.0:  # also rejects NaN
        raise ValueError(f"sample_max_value must be >= 1 (thresholds are clamped to [1, max]), got {max_value}")
    return ratio, max_value


def dynamic_threshold(x, out, rows, guidance=None, cfg=False, ratio=0.995, max_value=1.0) -> torch.Tensor:
    """The reduction pass of dynamic thresholding: the thresholds ``step(..., thresholds=)`` takes for this stage.

    Forms D = cx x + co out exactly as the step does (with ``cfg``: out = out_u + w (out_c - out_u)), in float32
    (float64 for float64 x), then ``threshold_of(D, ratio, max_value)``.  Plain torch ops, no host sync.

    Parameters
    ----------
    x : Tensor [B, *S]
    out : Tensor [B, *S] or [2B, *S] (with ``cfg``: [uncond; cond])
    rows : Tensor [B or 1, R] (columns 0 and 1: cx, co)
    guidance : Tensor [B or 1], optional (the cfg weight w)
    cfg : bool
    ratio : float, the quantile of |D| (Imagen: 0.995);  max_value : float >= 1, the largest threshold

    Returns
    -------
    Tensor [B]: float32 (float64 for float64 x), each >= 1
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating-point tensor [B, ...]")
    B = x.shape[0]
    want = (2 * B if cfg else B,) + tuple(x.shape[1:])
    if tuple(out.shape) != want:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {want} ({'[uncond; cond]' if cfg else 'x'})")
    if rows.dim() != 2 or rows.shape[0] not in (1, B) or rows.shape[1] < 2:
        raise ValueError(f"rows must be [B or 1, R] coefficient rows, got {tuple(rows.shape)}")
    if cfg and (not isinstance(guidance, torch.Tensor) or guidance.dim() != 1 or guidance.shape[0] not in (1, B)):
        raise ValueError("with cfg, guidance must be a [B or 1] tensor of guidance weights")
    for name, t in (("out", out), ("rows", rows)) + ((("guidance", guidance),) if cfg else ()):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: put every input on one device")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    nd = x.dim()
    c = rows.to(cdt)
    xf, o = x.to(cdt), out.to(cdt)
    if cfg:
        o = o[:B] + _bcast(guidance.to(cdt), nd) * (o[B:] - o[:B])
    D = _bcast(c[:, 0], nd) * xf + _bcast(c[:, 1], nd) * o
    return threshold_of(D, ratio, max_value)


def add_noise(x0, alpha, sigma, seeds, draws=None, *, kernel="torch") -> torch.Tensor:
    """Forward process ``alpha x0 + sigma z`` with per-sample alpha, sigma [B] and Philox noise (img2img, training).

    ``seeds``: int64 [B]; ``draws``: int64 [B or 1] (default draw 0).
    """
    B = x0.shape[0]
    if draws is None:
        draws = torch.zeros(1, dtype=torch.int64, device=x0.device)
    for name, t in (("alpha", alpha), ("sigma", sigma)):
        if t.dim() != 1 or t.shape[0] not in (1, B) or t.device != x0.device:
            raise ValueError(f"{name} must be a [B or 1] tensor on x0's device")
    if seeds.dtype != torch.int64 or tuple(seeds.shape) != (B,):
        raise ValueError(f"seeds must be an int64 tensor with one entry per sample ({B})")
    if _traced(x0, alpha, sigma, seeds):
        return _add_noise_op(x0.contiguous(), alpha, sigma, seeds, draws, kernel)
    return _impl(kernel, "add_noise")(x0.contiguous(), alpha, sigma, seeds, draws)


def randn(shape, seeds, draw=0, *, dtype=torch.float32, device="cpu", kernel="torch") -> torch.Tensor:
    """Philox normals of ``shape`` (batch first), one seed per sample, bitwise batch-invariant."""
    shape = [int(s) for s in shape]
    if not isinstance(seeds, torch.Tensor):
        seeds = rng.seeds_tensor(seeds, device=device)
    if seeds.numel() != shape[0]:
        raise ValueError(f"seeds has {seeds.numel()} entries but the batch has {shape[0]} samples")
    draws = torch.as_tensor([draw] if isinstance(draw, int) else draw, dtype=torch.int64, device=seeds.device)
    if _traced(seeds, draws):
        return _randn_op(seeds, draws, shape, dtype, kernel)
    return _impl(kernel, "randn")(seeds, draws, shape, dtype)
