"""Triton kernels for ``fastdiff::step``, ``fastdiff::add_noise`` and ``fastdiff::randn``.

Framework-free layer: ``@triton.jit`` kernels plus launchers that take torch tensors and pick a launch
configuration.  The semantics are exactly ``fastdiff.ops.step_reference`` (see fastdiff/ops.py for the contract,
fastdiff/plan.py for the row format, fastdiff/rng.py for the Philox layout).

Layout of one program: sample ``b = program_id(1)``, elements ``[pid * BLOCK_SIZE, (pid + 1) * BLOCK_SIZE)`` of
that sample, viewed as a tile ``[BLOCK_SIZE // 4, 4]``: row ``i`` of the tile is Philox block ``blk`` (elements
``4 blk .. 4 blk + 3``), so each Philox call (4 words -> 4 normals) is made once and its four normals land in the
four lanes of its row without any shuffle.  Offsets are int64 (tensors over 2^31 elements).

Math is fp32 whatever the storage (fp32 / fp16 / bf16), in the reference's operation order; launchers compile
with ``enable_fp_fusion=False`` (no FMA contraction), square roots and divisions are IEEE (``sqrt_rn``,
``div_rn``), and ``tl.log`` / ``tl.cos`` / ``tl.sin`` lower to libdevice's accurate ``__nv_logf`` etc. on NVIDIA
(not the ``.approx`` instructions; checked in the sm_90 PTX of triton 3.9), so results match the torch reference
to the last bit except where libm's log/sin/cos differ by an ulp.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before triton is imported:
``tl.philox`` is decorated at import time).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Philox words -> uniforms: Triton's uint_to_uniform_float scale, float32 2*pi and the Box-Muller floor of u1.
_UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)
_TWO_PI = tl.constexpr(6.2831855)
_U1_FLOOR = tl.constexpr(1e-7)
_ROW_HEAD = tl.constexpr(7)  # cx, co, g, snr, r, lsx, lsD

# Launch configurations the tuner tries (BLOCK_SIZE, num_warps), the fixed block of the interpreter and the fixed
# block of the Langevin reduction (fixed so the partial sums, hence the result, never depend on tuning).
CONFIGS = tuple((bs, nw) for bs in (256, 512, 1024, 2048, 4096) for nw in (4, 8))
INTERPRET_BLOCK = 1024
REDUCE_BLOCK = 2048


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _uniform(w):
    """uint32 word -> float32 in [0, 1): int32 bitcast, negatives complemented, times 4.6566127342e-10."""
    i = w.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, ~i, i)  # ~i == -i - 1 without overflow at -2^31
    return i.to(tl.float32) * _UNIFORM_SCALE


@triton.jit
def _box_muller(ua, ub):
    """(r cos(theta), r sin(theta)) with r = sqrt(-2 log max(ua, 1e-7)), theta = 2 pi ub, all float32."""
    u1 = tl.maximum(ua, _U1_FLOOR)
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    theta = _TWO_PI * ub
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _to_storage(v, ptr):  # _SOFT_BF16 is defined below the kernels: globals are read when a kernel compiles / runs
    """fp32 values -> the element type of ``ptr``, rounding to nearest even (as torch's ``.to``)."""
    dt: tl.constexpr = ptr.dtype.element_ty
    if _SOFT_BF16 and dt == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + (((u >> 16) & 1) + 0x7FFF)
        h = tl.where(v != v, 0x7FC0, u >> 16)  # noqa: PLR0124 (v != v: NaN stays NaN)
        return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dt)


@triton.jit
def _philox_words(seed, draw, blk):
    """Philox4x32-10 words of blocks ``blk`` (int64 [R]) for key = 64-bit ``seed`` (lo, hi), counter =
    (blk lo, blk hi, draw, stream 0); returns 4 uint32 [R] tensors."""
    lo = blk.to(tl.uint32)  # truncation: the low word
    hi = (blk >> 32).to(tl.uint32)
    zero = lo * 0
    # tl.philox(seed, c0..c3): key = (seed & 0xffffffff, seed >> 32) for 32-bit counters, Random123 round order.
    return tl.philox(seed, lo, hi, zero + draw.to(tl.uint32), zero)


@triton.jit
def _normals_tile(seed, draw, blk, lane):
    """Float32 normals for the tile [R, 4]: row i = Philox block blk[i], column = lane (element % 4)."""
    w0, w1, w2, w3 = _philox_words(seed, draw, blk)
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1))
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3))
    lane = lane[None, :]
    return tl.where(lane == 0, n0[:, None], tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None],
                                                                                      n3[:, None])))


@triton.jit
def _tile(pid, N, BLOCK_SIZE: tl.constexpr):
    """Philox blocks, lanes, element offsets (int64 [R, 4]) and mask of program ``pid`` of a sample of N."""
    R: tl.constexpr = BLOCK_SIZE // 4
    blk = pid.to(tl.int64) * R + tl.arange(0, R)
    lane = tl.arange(0, 4)
    e = blk[:, None] * 4 + lane[None, :]
    return blk, lane, e, e < N


@triton.jit
def _sample_noise(seeds_ptr, draws_ptr, b, draw_stride, blk, lane):
    """The sample's normals on the tile, zeroed (as z * 0) when its draw index is negative."""
    seed = tl.load(seeds_ptr + b).to(tl.uint64, bitcast=True)  # int64 bit pattern -> the 64-bit seed
    draw = tl.load(draws_ptr + b * draw_stride)
    z = _normals_tile(seed, tl.maximum(draw, 0), blk, lane)
    return z * (draw >= 0).to(tl.float32)


@triton.jit
def _threshold(d, thr_ptr, b):
    """Dynamic thresholding of D: clamp(D, -s_b, s_b) / s_b with compares (NaN stays NaN) and an IEEE division."""
    s = tl.load(thr_ptr + b)
    d = tl.where(d > s, s, tl.where(d < -s, -s, d))
    return tl.div_rn(d, s)


@triton.jit
def _model_out(out_ptr, guid_ptr, resc_ptr, b, B, N, e, mask, guid_stride, CFG: tl.constexpr,
               RESCALE: tl.constexpr):
    """The model output of sample b in fp32; with CFG out_u + w (out_c - out_u) from rows b and B + b, times
    guidance_rescale's factor m_b with RESCALE.  Also returns out_u (CFG++'s U is formed from it)."""
    o = tl.load(out_ptr + b.to(tl.int64) * N + e, mask=mask, other=0.0).to(tl.float32)
    ou = o
    if CFG:
        w = tl.load(guid_ptr + b * guid_stride).to(tl.float32)
        oc = tl.load(out_ptr + (b.to(tl.int64) + B) * N + e, mask=mask, other=0.0).to(tl.float32)
        o = o + w * (oc - o)
        if RESCALE:
            o = tl.load(resc_ptr + b).to(tl.float32) * o
    return o, ou


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _step_kernel(x_ptr, out_ptr, slots_ptr, rows_ptr, seeds_ptr, draws_ptr, guid_ptr, eps_ptr, thr_ptr, x_out_ptr,
                 flag_ptr, resc_ptr, B, N, row_stride, draw_stride, guid_stride,
                 K: tl.constexpr, SLOT_READS: tl.constexpr, SLOT_WRITES: tl.constexpr, USE_OUT: tl.constexpr,
                 CFG: tl.constexpr, NOISE: tl.constexpr, LANGEVIN: tl.constexpr, THRESHOLD: tl.constexpr,
                 FLAG: tl.constexpr, RESCALE: tl.constexpr, UNCOND: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One stage for BLOCK_SIZE elements of sample b: D = cx x + co out (thresholded with THRESHOLD; the guided
    output times m_b with RESCALE); x' = M[0].[x, D, S] + g z (+ Langevin); S_i = M[1+i].[x, D, S] for the slots
    in SLOT_WRITES; with UNCOND (CFG++ rows) M's columns are [x, D, U, S] with U = cx x + co out_u.  Every load
    precedes every store (in-place safe).  With FLAG, 1 is OR-ed into flag_ptr[b] when a stored x' value is NaN /
    Inf (v - v is 0 only for finite v)."""
    b = tl.program_id(1)
    blk, lane, e, mask = _tile(tl.program_id(0), N, BLOCK_SIZE)
    base = b.to(tl.int64) * N
    row = rows_ptr + b * row_stride  # row_stride 0: one row for the whole batch
    SB: tl.constexpr = 3 if UNCOND else 2  # column of slot 0
    C: tl.constexpr = SB + K  # columns of M: x, D, (U,) S_0 .. S_{K-1}

    xv = tl.load(x_ptr + base + e, mask=mask, other=0.0).to(tl.float32)
    d = xv  # placeholder, only used when USE_OUT
    u = xv  # placeholder, only used when USE_OUT and UNCOND
    if USE_OUT:
        o, ou = _model_out(out_ptr, guid_ptr, resc_ptr, b, B, N, e, mask, guid_stride, CFG, RESCALE)
        d = tl.load(row + 0).to(tl.float32) * xv + tl.load(row + 1).to(tl.float32) * o
        if THRESHOLD:
            d = _threshold(d, thr_ptr, b)
        u = d
        if UNCOND and CFG:
            u = tl.load(row + 0).to(tl.float32) * xv + tl.load(row + 1).to(tl.float32) * ou
            if THRESHOLD:
                u = _threshold(u, thr_ptr, b)
    svals = ()
    for i in tl.static_range(K):
        if (SLOT_READS >> i) & 1:
            svals = svals + (tl.load(slots_ptr + (b.to(tl.int64) + i * B) * N + e, mask=mask,
                                     other=0.0).to(tl.float32),)
        else:
            svals = svals + (xv,)  # never used: keeps the tuple indexable by slot

    # x' = M[0] . [x, D, S] in the reference's order (x, D, then slots by index)
    acc = tl.load(row + _ROW_HEAD).to(tl.float32) * xv
    if USE_OUT:
        acc = acc + tl.load(row + _ROW_HEAD + 1).to(tl.float32) * d
        if UNCOND:
            acc = acc + tl.load(row + _ROW_HEAD + 2).to(tl.float32) * u
    for i in tl.static_range(K):
        if (SLOT_READS >> i) & 1:
            acc = acc + tl.load(row + _ROW_HEAD + SB + i).to(tl.float32) * svals[i]

    if NOISE or LANGEVIN:
        z = _sample_noise(seeds_ptr, draws_ptr, b, draw_stride, blk, lane)
        acc = acc + tl.load(row + 2).to(tl.float32) * z
        if LANGEVIN:
            # eps = 2 r (snr ||z|| / ||s||)^2 from the reduction pass; s = lsx x + lsD D (the score)
            eps = tl.load(eps_ptr + b)
            if USE_OUT:
                s = tl.load(row + 5).to(tl.float32) * xv + tl.load(row + 6).to(tl.float32) * d
            else:
                s = tl.load(row + 5).to(tl.float32) * xv + tl.load(row + 6).to(tl.float32) * 0.0
            acc = acc + eps * s + tl.sqrt_rn(2.0 * eps) * z

    # slot writes: every value from before the stage, all computed before any store
    news = ()
    for j in tl.static_range(K):
        if (SLOT_WRITES >> j) & 1:
            m_row = row + _ROW_HEAD + (1 + j) * C
            nv = tl.load(m_row).to(tl.float32) * xv
            if USE_OUT:
                nv = nv + tl.load(m_row + 1).to(tl.float32) * d
                if UNCOND:
                    nv = nv + tl.load(m_row + 2).to(tl.float32) * u
            for i in tl.static_range(K):
                if (SLOT_READS >> i) & 1:
                    nv = nv + tl.load(m_row + SB + i).to(tl.float32) * svals[i]
            news = news + (nv,)
        else:
            news = news + (xv,)
    for j in tl.static_range(K):
        if (SLOT_WRITES >> j) & 1:
            sp = slots_ptr + (b.to(tl.int64) + j * B) * N + e
            tl.store(sp, _to_storage(news[j], slots_ptr), mask=mask)
    xs = _to_storage(acc, x_out_ptr)
    tl.store(x_out_ptr + base + e, xs, mask=mask)
    if FLAG:
        xf = xs.to(tl.float32)
        bad = tl.max(tl.ravel(tl.where(mask & ((xf - xf) != 0.0), 1, 0)), axis=0)  # a [BLOCK/4, 4] tile
        tl.atomic_or(flag_ptr + b, bad.to(tl.int32))


@triton.jit
def _langevin_partials_kernel(x_ptr, out_ptr, rows_ptr, seeds_ptr, draws_ptr, guid_ptr, thr_ptr, resc_ptr, part_ptr,
                              B, N, P, row_stride, draw_stride, guid_stride,
                              USE_OUT: tl.constexpr, CFG: tl.constexpr, THRESHOLD: tl.constexpr,
                              RESCALE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per (sample, block) partial sums [sum z^2, sum s^2] (fp32) into part[b, pid, :]; s = lsx x + lsD D."""
    b = tl.program_id(1)
    pid = tl.program_id(0)
    blk, lane, e, mask = _tile(pid, N, BLOCK_SIZE)
    row = rows_ptr + b * row_stride
    xv = tl.load(x_ptr + b.to(tl.int64) * N + e, mask=mask, other=0.0).to(tl.float32)
    lsx = tl.load(row + 5).to(tl.float32)
    lsd = tl.load(row + 6).to(tl.float32)
    if USE_OUT:
        o, _ = _model_out(out_ptr, guid_ptr, resc_ptr, b, B, N, e, mask, guid_stride, CFG, RESCALE)
        d = tl.load(row + 0).to(tl.float32) * xv + tl.load(row + 1).to(tl.float32) * o
        if THRESHOLD:
            d = _threshold(d, thr_ptr, b)
        s = lsx * xv + lsd * d
    else:
        s = lsx * xv + lsd * 0.0
    z = tl.where(mask, _sample_noise(seeds_ptr, draws_ptr, b, draw_stride, blk, lane), 0.0)
    s = tl.where(mask, s, 0.0)
    dst = part_ptr + (b.to(tl.int64) * P + pid) * 2
    tl.store(dst, tl.sum(z * z))
    tl.store(dst + 1, tl.sum(s * s))


@triton.jit
def _langevin_eps_kernel(part_ptr, rows_ptr, eps_ptr, P, row_stride, FBLOCK: tl.constexpr):
    """Per sample, in a fixed order: ||z||^2, ||s||^2 from the partials; eps = 2 r (snr ||z||/||s||)^2 (0 if snr=0)."""
    b = tl.program_id(0)
    src = part_ptr + b.to(tl.int64) * P * 2
    acc_z = tl.zeros([FBLOCK], tl.float32)
    acc_s = tl.zeros([FBLOCK], tl.float32)
    for start in range(0, P, FBLOCK):
        j = start + tl.arange(0, FBLOCK)
        acc_z += tl.load(src + 2 * j, mask=j < P, other=0.0)
        acc_s += tl.load(src + 2 * j + 1, mask=j < P, other=0.0)
    row = rows_ptr + b * row_stride
    snr = tl.load(row + 3).to(tl.float32)
    r = tl.load(row + 4).to(tl.float32)
    ss = tl.where(snr != 0.0, tl.sum(acc_s), 1.0)  # snr = 0: no corrector term, do not divide by ||s|| = 0
    ratio = tl.div_rn(tl.sqrt_rn(tl.sum(acc_z)), tl.sqrt_rn(ss))
    q = snr * ratio
    eps = tl.where(snr != 0.0, 2.0 * r * (q * q), 0.0)
    tl.store(eps_ptr + b, eps)


@triton.jit
def _add_noise_kernel(x0_ptr, alpha_ptr, sigma_ptr, seeds_ptr, draws_ptr, y_ptr, N, a_stride, s_stride, draw_stride,
                      BLOCK_SIZE: tl.constexpr):
    """Forward process y = alpha_b x0 + sigma_b z (fp32 math, stored in x0's dtype)."""
    b = tl.program_id(1)
    blk, lane, e, mask = _tile(tl.program_id(0), N, BLOCK_SIZE)
    base = b.to(tl.int64) * N
    seed = tl.load(seeds_ptr + b).to(tl.uint64, bitcast=True)
    z = _normals_tile(seed, tl.load(draws_ptr + b * draw_stride), blk, lane)
    a = tl.load(alpha_ptr + b * a_stride).to(tl.float32)
    s = tl.load(sigma_ptr + b * s_stride).to(tl.float32)
    x0 = tl.load(x0_ptr + base + e, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base + e, _to_storage(a * x0 + s * z, y_ptr), mask=mask)


@triton.jit
def _randn_kernel(seeds_ptr, draws_ptr, y_ptr, N, draw_stride, BLOCK_SIZE: tl.constexpr):
    """Philox normals of sample b (float32, cast once to y's dtype)."""
    b = tl.program_id(1)
    blk, lane, e, mask = _tile(tl.program_id(0), N, BLOCK_SIZE)
    seed = tl.load(seeds_ptr + b).to(tl.uint64, bitcast=True)
    z = _normals_tile(seed, tl.load(draws_ptr + b * draw_stride), blk, lane)
    tl.store(y_ptr + b.to(tl.int64) * N + e, _to_storage(z, y_ptr), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration: a small autotuner keyed on the per-sample numel (and the stage's structure)
# ---------------------------------------------------------------------------------------------------------------

_TUNED: dict = {}


def interpreting() -> bool:
    """True when these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_step_kernel, triton.runtime.JITFunction)


# The interpreter converts fp32 -> bf16 by truncation; there the kernels round to nearest even by hand (GPUs use
# cvt.rn.bf16x2.f32, as torch does).
_SOFT_BF16 = tl.constexpr(interpreting())


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def heuristic_config(numel: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) without measuring: 1024 elements / 4 warps, smaller for small samples."""
    bs = min(1024, max(128, _next_pow2(numel)))
    return bs, 4


def _may_tune() -> bool:
    if os.environ.get("FASTDIFF_TRITON_AUTOTUNE", "1") == "0":
        return False
    # Benchmarking synchronizes: never while a CUDA graph is being captured or host syncs are being policed.
    return not (torch.cuda.is_current_stream_capturing() or torch.cuda.get_sync_debug_mode() != 0)


def _config(key, numel: int, make_run) -> tuple[int, int]:
    """Pick (BLOCK_SIZE, num_warps): measured once per key with the launcher ``make_run()`` returns, which must
    write to scratch outputs (never to the caller's tensors).

    Results do not depend on the choice (the kernels are elementwise; the Langevin reduction has its own fixed
    block), so tuning changes speed only.  While a graph is captured (or tuning is off, or the sample is small)
    the heuristic is used and nothing is cached.
    """
    if interpreting():
        return INTERPRET_BLOCK, 1
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if numel < (1 << 16) or not _may_tune():
        return heuristic_config(numel)
    from triton.testing import do_bench

    run = make_run()
    cands = [c for c in CONFIGS if c[0] <= max(256, _next_pow2(numel))]
    times = {c: do_bench(lambda c=c: run(*c), warmup=5, rep=20, return_mode="median") for c in cands}
    cfg = _TUNED[key] = min(times, key=times.get)
    return cfg


def _grid(numel: int, block: int, batch: int):
    return (triton.cdiv(numel, block), batch)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (torch tensors in, tensors out; the glue in fastdiff/backends/triton.py checks the inputs)
# ---------------------------------------------------------------------------------------------------------------


def _stride0(t: torch.Tensor) -> int:
    """Per-sample stride of a [B | 1] (or [B | 1, R]) tensor: 0 when it has one row (broadcast)."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def langevin_eps(x, out, rows, seeds, draws, guidance, use_out: bool, cfg: bool, thresholds=None,
                 cfg_rescale=None) -> torch.Tensor:
    """Per-sample Langevin step size eps [B] (fp32) on device: partial sums pass + fixed-order finalize pass."""
    B, N = x.shape[0], x[0].numel()
    block = INTERPRET_BLOCK if interpreting() else REDUCE_BLOCK
    P = triton.cdiv(N, block)
    part = torch.empty((B, P, 2), dtype=torch.float32, device=x.device)
    eps = torch.empty((B,), dtype=torch.float32, device=x.device)
    thr = thresholds if thresholds is not None else rows  # not dereferenced without THRESHOLD
    resc = cfg_rescale if cfg_rescale is not None else rows  # not dereferenced without RESCALE
    _langevin_partials_kernel[_grid(N, block, B)](
        x, out, rows, seeds, draws, guidance, thr, resc, part, B, N, P, _stride0(rows), _stride0(draws),
        _stride0(guidance), USE_OUT=use_out, CFG=cfg, THRESHOLD=thresholds is not None and use_out,
        RESCALE=cfg_rescale is not None and cfg and use_out, BLOCK_SIZE=block, num_warps=8, enable_fp_fusion=False)
    fblock = min(1024, _next_pow2(P))
    _langevin_eps_kernel[(B,)](part, rows, eps, P, _stride0(rows), FBLOCK=fblock, num_warps=4,
                               enable_fp_fusion=False)
    return eps


def step_forward(x, out, slots, rows, seeds, draws, guidance, slot_reads: int, slot_writes: int, use_out: bool,
                 cfg: bool, noise: bool, langevin: bool, x_out=None, *, thresholds=None, nonfinite=None,
                 cfg_rescale=None, uncond=False, block_size=None, num_warps=None):
    """Launch one stage (see ``fastdiff.ops.step_reference``); writes ``x_out`` (default: a new tensor; may be
    ``x`` itself) and the slots in ``slot_writes``.  One launch, or three with ``langevin``.  ``thresholds``:
    float32 [B] dynamic thresholds applied to D, or None; ``nonfinite``: int32 [B] flags set to 1 for a sample
    whose stored x' has NaN / Inf, or None; ``cfg_rescale``: float32 [B] guidance_rescale factors (with cfg), or
    None; ``uncond``: CFG++ rows (M's columns [x, D, U, S])."""
    if x_out is None:
        x_out = torch.empty_like(x)
    B = x.shape[0]
    N = x[0].numel() if B else 0
    K = slots.shape[0]
    full = (1 << K) - 1
    reads, writes = int(slot_reads) & full, int(slot_writes) & full
    if B == 0 or N == 0:
        return x_out
    out_t = out if use_out else x  # not dereferenced without use_out
    slots_t = slots if K else x
    eps = (langevin_eps(x, out_t, rows, seeds, draws, guidance, use_out, cfg, thresholds, cfg_rescale)
           if langevin else rows)
    thr = thresholds if thresholds is not None else rows  # not dereferenced without THRESHOLD
    resc = cfg_rescale if cfg_rescale is not None else rows  # not dereferenced without RESCALE
    meta = dict(K=K, SLOT_READS=reads, SLOT_WRITES=writes, USE_OUT=bool(use_out), CFG=bool(cfg), NOISE=bool(noise),
                LANGEVIN=bool(langevin), THRESHOLD=thresholds is not None and bool(use_out),
                RESCALE=cfg_rescale is not None and bool(cfg) and bool(use_out), UNCOND=bool(uncond))
    strides = (_stride0(rows), _stride0(draws), _stride0(guidance))
    flag = nonfinite is not None

    def run(block, warps, x_dst=x_out, s_dst=slots_t, f_dst=nonfinite if flag else seeds):
        _step_kernel[_grid(N, block, B)](x, out_t, s_dst, rows, seeds, draws, guidance, eps, thr, x_dst, f_dst, resc,
                                         B, N, *strides, **meta, FLAG=flag, BLOCK_SIZE=block, num_warps=warps,
                                         enable_fp_fusion=False)

    if block_size is None:
        def make_run():  # tuning writes to scratch copies, never to the caller's tensors
            x_dst, s_dst = torch.empty_like(x), (slots_t.clone() if writes else slots_t)
            f_dst = nonfinite.clone() if flag else seeds
            return lambda block, warps: run(block, warps, x_dst, s_dst, f_dst)

        block, warps = _config(("step", N, x.dtype, tuple(sorted(meta.items()))), N, make_run)
    else:
        block, warps = block_size, (num_warps or 4)
    run(block, warps)
    return x_out


def add_noise_forward(x0, alpha, sigma, seeds, draws, *, block_size=None, num_warps=None) -> torch.Tensor:
    """alpha_b x0 + sigma_b z with Philox z (draw per sample); returns a new tensor in x0's dtype."""
    y = torch.empty_like(x0)
    B = x0.shape[0]
    N = x0[0].numel() if B else 0
    if B == 0 or N == 0:
        return y

    def run(block, warps, dst=y):
        _add_noise_kernel[_grid(N, block, B)](x0, alpha, sigma, seeds, draws, dst, N, _stride0(alpha),
                                              _stride0(sigma), _stride0(draws), BLOCK_SIZE=block, num_warps=warps,
                                              enable_fp_fusion=False)

    if block_size is None:
        block, warps = _config(("add_noise", N, x0.dtype), N, lambda: lambda bs, nw: run(bs, nw, torch.empty_like(y)))
    else:
        block, warps = block_size, (num_warps or 4)
    run(block, warps)
    return y


def randn_forward(seeds, draws, shape, dtype, *, block_size=None, num_warps=None) -> torch.Tensor:
    """Philox normals of ``shape`` (batch first) in ``dtype``, one seed per sample; a new contiguous tensor."""
    y = torch.empty(tuple(shape), dtype=dtype, device=seeds.device)
    B = y.shape[0]
    N = y[0].numel() if B else 0
    if B == 0 or N == 0:
        return y

    def run(block, warps, dst=y):
        _randn_kernel[_grid(N, block, B)](seeds, draws, dst, N, _stride0(draws), BLOCK_SIZE=block, num_warps=warps,
                                          enable_fp_fusion=False)

    if block_size is None:
        block, warps = _config(("randn", N, dtype), N, lambda: lambda bs, nw: run(bs, nw, torch.empty_like(y)))
    else:
        block, warps = block_size, (num_warps or 4)
    run(block, warps)
    return y
