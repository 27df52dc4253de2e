"""Counter-based Gaussian noise: Philox4x32-10 + Box-Muller, the bit-level oracle.

Every backend (this module, the C++ CPU kernels, Triton, CUDA) must produce the
same uint32 stream bit for bit and the same normals to within a few ulp (libm
differences in log/sin/cos only).  This file is the reference; kernels copy the
layout below.

Layout
------
Philox4x32-10 exactly as in Random123: 10 rounds, multipliers
``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``, Weyl key increments
``W0 = 0x9E3779B9``, ``W1 = 0xBB67AE85``.  One round maps counter (c0..c3) and
key (k0, k1) to::

    hi0:lo0 = M0 * c0            (32x32 -> 64 bit product)
    hi1:lo1 = M1 * c2
    c' = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)

and the key is bumped by (W0, W1) (mod 2^32) between rounds (9 bumps).

For sample ``b`` with 64-bit seed ``s = seeds[b]``::

    key     = (s & 0xFFFFFFFF, s >> 32)                  # (lo, hi)
    counter = (blk & 0xFFFFFFFF, blk >> 32, draw, stream)

where ``blk`` is the Philox *block* index.  One Philox call yields four words
``(w0, w1, w2, w3)`` and hence FOUR consecutive normals, so element ``e`` of a
sample (flattened in C order over ``shape[1:]``, counted from 0 per sample)
uses::

    blk = e // 4          lane = e % 4

Words to uniforms (Triton's ``uint_to_uniform_float``, all float32)::

    x = bitcast<int32>(w);  if x < 0: x = -x - 1   (== ~x, no overflow)
    u = float32(x) * 4.6566127342e-10f             # u in [0, 1), never 1

Uniforms to normals (Box-Muller, float32, same formula as ``tl.randn``)::

    (u_a, u_b) = (u(w0), u(w1)) for lanes 0, 1;  (u(w2), u(w3)) for lanes 2, 3
    u1    = max(u_a, 1e-7f)
    r     = sqrt(-2.0f * log(u1))
    theta = 6.2831855f * u_b                        # float32(2*pi)
    lane 0 / 2 = r * cos(theta);   lane 1 / 3 = r * sin(theta)

Noise is computed in float32 and cast once to the requested dtype.  Because the
counter depends only on (seed, draw, stream, element index) a seed gives the
same sample whatever the batch size, its position in the batch, the backend or
the number of devices.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "UNIFORM_SCALE",
    "TWO_PI_F32",
    "U1_FLOOR",
    "philox4x32_10",
    "philox_uint32_torch",
    "uint_to_uniform_float",
    "uint_to_uniform_float_torch",
    "box_muller",
    "box_muller_torch",
    "randn",
    "randn_numpy",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# float32 constants, written out so every backend uses the same bits.
UNIFORM_SCALE = np.float32(4.6566127342e-10)  # largest scale with (2^31-1)*scale < 1 in fp32
TWO_PI_F32 = np.float32(6.283185307179586)  # == 6.2831855f
U1_FLOOR = np.float32(1e-7)

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF

SeedsLike = Union[Sequence[int], np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------
# numpy Philox (the oracle)
# ---------------------------------------------------------------------------


def _as_uint32_array(a, name: str, last: int) -> np.ndarray:
    """Convert to a uint32 array with trailing dim ``last``, rejecting out-of-range values."""
    arr = np.asarray(a)
    if arr.ndim == 0 or arr.shape[-1] != last:
        raise ValueError(f"{name} must have a trailing dimension of size {last}, got shape {arr.shape}")
    if arr.dtype == np.uint32:
        return arr
    if arr.dtype.kind not in "iu" and arr.dtype != object:
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.dtype != object else (min(arr.flat), max(arr.flat))
        if lo < 0 or hi > _MASK32:
            raise ValueError(f"{name} words must lie in [0, 2**32), got values in [{lo}, {hi}]")
    return arr.astype(np.uint32)


def philox4x32_10(counter, key) -> np.ndarray:
    """Random123 Philox4x32-10, vectorized over leading dims.

    ``counter``: [..., 4] uint32, ``key``: [..., 2] uint32 (leading dims broadcast).
    Returns uint32 [..., 4].
    """
    ctr = _as_uint32_array(counter, "counter", 4).astype(np.uint64)
    k = _as_uint32_array(key, "key", 2).astype(np.uint64)
    lead = np.broadcast_shapes(ctr.shape[:-1], k.shape[:-1])
    c0, c1, c2, c3 = (np.broadcast_to(ctr[..., i], lead) for i in range(4))
    k0, k1 = (np.broadcast_to(k[..., i], lead) for i in range(2))
    m0, m1, mask = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(_MASK32)
    w0, w1, sh = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1), np.uint64(32)
    for rnd in range(PHILOX_ROUNDS):
        if rnd:
            k0 = (k0 + w0) & mask
            k1 = (k1 + w1) & mask
        # A 32x32 product fits in uint64 exactly.
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> sh) ^ c1 ^ k0, p1 & mask, (p0 >> sh) ^ c3 ^ k1, p0 & mask
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def uint_to_uniform_float(words) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for uint32 words: float32 in [0, 1)."""
    x = np.asarray(words).astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)  # ~x == -x - 1 without int32 overflow at -2^31
    return x.astype(np.float32) * UNIFORM_SCALE


def box_muller(u_a: np.ndarray, u_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 Box-Muller: returns (r*cos(theta), r*sin(theta))."""
    u1 = np.maximum(u_a.astype(np.float32), U1_FLOOR)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = TWO_PI_F32 * u_b.astype(np.float32)
    return r * np.cos(theta), r * np.sin(theta)


# ---------------------------------------------------------------------------
# torch Philox (int64 tensors holding uint32 values)
# ---------------------------------------------------------------------------


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (hi, lo) 32-bit halves of ``a * m`` for a in [0, 2^32), m a 32-bit constant.

    The full product can reach 2^64 and overflow signed int64, so split ``a``
    into 16-bit halves: a*m = ah*m*2^16 + al*m, each partial product < 2^48.
    """
    al = a & _MASK16
    ah = a >> 16
    p_lo = al * m  # < 2^48
    p_hi = ah * m  # < 2^48, weight 2^16
    t = p_lo + ((p_hi & _MASK16) << 16)  # < 2^48 + 2^32: low 32 bits plus carry
    lo = t & _MASK32
    hi = (p_hi >> 16) + (t >> 32)  # true high word, < 2^32
    return hi, lo


def philox_uint32_torch(counter_lo, counter_hi, draw, stream, key_lo, key_hi) -> torch.Tensor:
    """Pure-torch Philox4x32-10 on int64 tensors holding uint32 values.

    Arguments are int64 tensors or Python ints in [0, 2^32), broadcastable
    against each other.  Returns an int64 tensor [..., 4] with values in
    [0, 2^32), bit-identical to :func:`philox4x32_10` with
    counter = (counter_lo, counter_hi, draw, stream), key = (key_lo, key_hi).
    """
    args = [counter_lo, counter_hi, draw, stream, key_lo, key_hi]
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    args = [torch.as_tensor(a, dtype=torch.int64, device=device) for a in args]
    c0, c1, c2, c3, k0, k1 = (a & _MASK32 for a in torch.broadcast_tensors(*args))
    for rnd in range(PHILOX_ROUNDS):
        if rnd:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uint_to_uniform_float_torch(words: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`uint_to_uniform_float`; ``words`` int64 in [0, 2^32)."""
    # int32 bitcast then complement negatives: for w >= 2^31 that is ~(w - 2^32) == 2^32 - 1 - w.
    x = torch.where(words >= 0x80000000, _MASK32 - words, words)
    return x.to(torch.float32) * torch.tensor(float(UNIFORM_SCALE), dtype=torch.float32, device=words.device)


def box_muller_torch(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`box_muller`: float32 in and out, the transcendental part in float64.

    torch's vectorized float32 log / cos / sin take different code paths depending on buffer alignment, so the
    same inputs gave results differing by several ulp from one process to the next.  In float64 and rounded once,
    the result is the correctly rounded value of the same formula (almost always), identical in every process and
    within an ulp or two of any float32 implementation (the kernels').
    """
    u1 = torch.clamp_min(u_a, float(U1_FLOOR)).double()
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (float(TWO_PI_F32) * u_b).double()  # the fp32 product, as the kernels form it
    return (r * torch.cos(theta)).float(), (r * torch.sin(theta)).float()


# ---------------------------------------------------------------------------
# Gaussian noise
# ---------------------------------------------------------------------------


def _check_u32(value, name: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if not 0 <= v <= _MASK32:
        raise ValueError(f"{name} must lie in [0, 2**32), got {v}")
    return v


def _normalize_seeds(seeds: SeedsLike, batch: Optional[int]) -> list[int]:
    """Seeds as Python ints in [0, 2^64); accepts ints, numpy (u)int64, 1-D int tensors.  ``batch``: the number of
    seeds expected (None: any)."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise ValueError(f"seeds tensor must be 1-D with an integer dtype, got {seeds.dtype} {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    elif isinstance(seeds, np.ndarray):
        if seeds.ndim != 1 or seeds.dtype.kind not in "iuO":
            raise ValueError(f"seeds array must be 1-D with an integer dtype, got {seeds.dtype} {seeds.shape}")
        seeds = seeds.tolist()
    elif isinstance(seeds, (int, np.integer)):
        raise ValueError("seeds must be a sequence with one seed per sample (shape[0] of them), not a single int")
    try:
        seeds = list(seeds)
    except TypeError:
        raise ValueError(f"seeds must be a sequence of integers (one per sample), got {type(seeds).__name__}") from None
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} (shape[0]); pass exactly one seed per sample")
    return [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]


def check_seed(seed, name: str = "seed") -> int:
    """One seed as a Python int in [0, 2**64), else a ValueError naming ``name`` and the valid range."""
    if isinstance(seed, (bool, np.bool_)):
        raise ValueError(f"{name} is a bool; seeds must be integers in [0, 2**64)")
    try:
        v = operator.index(seed)
    except TypeError:
        raise ValueError(f"{name} = {seed!r} is not an integer; seeds must be integers in [0, 2**64)") from None
    if v < 0:
        raise ValueError(f"{name} = {v} is negative; seeds must lie in [0, 2**64)")
    if v >> 64:
        raise ValueError(f"{name} = {v} does not fit in 64 bits; seeds must lie in [0, 2**64)")
    return v


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(operator.index(d) for d in shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension (the batch, shape[0])")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape


def _prepare(shape, seeds, draw, stream):
    shape = _check_shape(shape)
    seeds = _normalize_seeds(seeds, shape[0])
    draw = _check_u32(draw, "draw")
    stream = _check_u32(stream, "stream")
    numel = 1
    for d in shape[1:]:
        numel *= d
    nblocks = -(-numel // 4)  # ceil: each Philox block gives 4 normals
    return shape, seeds, draw, stream, numel, nblocks


def randn(
    shape,
    seeds: SeedsLike,
    draw: int = 0,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (shape[0] = batch), one seed per sample.

    Sample b depends only on (seeds[b], draw, stream, element index); see the
    module docstring for the layout.  Computed in float32, cast once to dtype.
    """
    shape, seeds, draw, stream, numel, nblocks = _prepare(shape, seeds, draw, stream)
    batch = shape[0]
    if batch == 0 or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    device = torch.device(device)
    key_lo = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64, device=device)[:, None]
    key_hi = torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device)[:, None]
    blk = torch.arange(nblocks, dtype=torch.int64, device=device)[None, :]
    words = philox_uint32_torch(blk & _MASK32, blk >> 32, draw, stream, key_lo, key_hi)  # [B, nblocks, 4]
    u = uint_to_uniform_float_torch(words)
    n0, n1 = box_muller_torch(u[..., 0], u[..., 1])
    n2, n3 = box_muller_torch(u[..., 2], u[..., 3])
    noise = torch.stack([n0, n1, n2, n3], dim=-1).reshape(batch, nblocks * 4)[:, :numel]
    return noise.reshape(shape).to(dtype)


def randn_numpy(shape, seeds: SeedsLike, draw: int = 0, stream: int = 0) -> np.ndarray:
    """numpy oracle for :func:`randn`; returns float32 (same uint32 stream, normals within a few ulp)."""
    shape, seeds, draw, stream, numel, nblocks = _prepare(shape, seeds, draw, stream)
    batch = shape[0]
    if batch == 0 or numel == 0:
        return np.zeros(shape, dtype=np.float32)
    blk = np.arange(nblocks, dtype=np.uint64)
    counter = np.empty((1, nblocks, 4), dtype=np.uint32)
    counter[0, :, 0] = blk & np.uint64(_MASK32)
    counter[0, :, 1] = blk >> np.uint64(32)
    counter[0, :, 2] = draw
    counter[0, :, 3] = stream
    key = np.array([[s & _MASK32, s >> 32] for s in seeds], dtype=np.uint32)[:, None, :]
    words = philox4x32_10(counter, key)  # [B, nblocks, 4]
    u = uint_to_uniform_float(words)
    n0, n1 = box_muller(u[..., 0], u[..., 1])
    n2, n3 = box_muller(u[..., 2], u[..., 3])
    noise = np.stack([n0, n1, n2, n3], axis=-1).reshape(batch, nblocks * 4)[:, :numel]
    return np.ascontiguousarray(noise.reshape(shape), dtype=np.float32)


def normals_per_sample(seeds: torch.Tensor, draws: torch.Tensor, numel: int, stream: int = 0) -> torch.Tensor:
    """float32 normals [B, numel] on the seeds' device, with a draw index per sample.

    ``seeds``: int64 [B] holding each 64-bit seed's bit pattern (negative values are seeds >= 2^63);
    ``draws``: int64 [B] or [1].  Same stream as :func:`randn` (which has one draw for the whole batch):
    ``normals_per_sample(s, d, n)[b] == randn((1, n), [seed_b], draw=d_b)[0]``.  The kernels' oracle.
    """
    device = seeds.device
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    draws = draws.to(torch.int64).reshape(-1, 1)
    nblocks = (numel + 3) // 4
    blk = torch.arange(nblocks, dtype=torch.int64, device=device)[None, :]
    words = philox_uint32_torch(blk & _MASK32, blk >> 32, draws, stream, seeds & _MASK32, (seeds >> 32) & _MASK32)
    u = uint_to_uniform_float_torch(words)
    n0, n1 = box_muller_torch(u[..., 0], u[..., 1])
    n2, n3 = box_muller_torch(u[..., 2], u[..., 3])
    return torch.stack([n0, n1, n2, n3], dim=-1).reshape(seeds.shape[0], nblocks * 4)[:, :numel]


def seeds_tensor(seeds, device="cpu") -> torch.Tensor:
    """Seeds (Python ints in [0, 2^64) and friends) as an int64 [B] tensor of their bit patterns."""
    vals = _normalize_seeds(seeds, None)
    return torch.tensor([v - (1 << 64) if v >= (1 << 63) else v for v in vals], dtype=torch.int64, device=device)
