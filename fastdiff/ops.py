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

    D  = cx x + co out ;  x' = M[0].[x, D, S] + g z (+ Langevin term) ;  S_i = M[1+i].[x, D, S] for written i
"""

from __future__ import annotations

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
                   cfg: bool, noise: bool, langevin: bool) -> torch.Tensor:
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


def _impl(kernel: str, op: str):
    if kernel == "torch":
        return {"step": step_reference, "add_noise": add_noise_reference, "randn": _randn_reference}[op]
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    from . import backends

    return backends.load(kernel).OPS[op]


def _randn_reference(seeds, draws, shape, dtype):
    n = 1
    for s in shape[1:]:
        n *= s
    z = rng.normals_per_sample(seeds, draws.expand(shape[0]), n)
    return z.reshape(shape).to(dtype).contiguous()


@torch.library.custom_op("fastdiff::step", mutates_args=("slots",))
def _step_op(x: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor,
             draws: torch.Tensor, guidance: torch.Tensor, slot_reads: int, slot_writes: int, use_out: bool,
             cfg: bool, noise: bool, langevin: bool, kernel: str) -> torch.Tensor:
    return _impl(kernel, "step")(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg,
                                 noise, langevin)


@_step_op.register_fake
def _(x, out, slots, rows, seeds, draws, guidance, slot_reads, slot_writes, use_out, cfg, noise, langevin, kernel):
    return torch.empty_like(x)


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


def step(x, out, slots, rows, seeds, draws, guidance=None, *, slot_reads=None, slot_writes=0, use_out=True,
         cfg=False, noise=True, langevin=False, kernel="torch") -> torch.Tensor:
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
    """
    if guidance is None:
        guidance = torch.zeros(1, dtype=torch.float32, device=x.device)
    if slot_reads is None:
        slot_reads = (1 << slots.shape[0]) - 1
    _check_step(x, out, slots, rows, seeds, draws, guidance, use_out, cfg)
    if not x.is_contiguous() or (use_out and not out.is_contiguous()):
        raise ValueError("x and out must be contiguous (call .contiguous() first): kernels stream them linearly")
    args = (x, out, slots, rows, seeds, draws, guidance, int(slot_reads), int(slot_writes), bool(use_out), bool(cfg),
            bool(noise), bool(langevin))
    if _traced(x, out, slots, rows):
        return _step_op(*args, kernel)
    return _impl(kernel, "step")(*args)


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
