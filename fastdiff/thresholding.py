"""Dynamic thresholding of data estimates (Saharia et al. 2022, Imagen; diffusers' ``thresholding=True``).

Per sample b, ``s_b = clamp(quantile(|D_b|, ratio), 1, max_value)`` and ``D_b <- clamp(D_b, -s_b, s_b) / s_b``.
It is done as a reduction pass (``dynamic_threshold`` / ``threshold_of``: plain torch ops, no host sync, so it is
captured in a CUDA graph) plus the affine step, whose kernels apply ``apply_threshold`` right after forming D.
"""

from __future__ import annotations

import math
import numbers

import torch

from .estimate import data_estimate


def threshold_options(ratio, max_value) -> tuple[float, float]:
    """Check dynamic thresholding's options: (ratio in [0, 1], max_value >= 1) as floats, else ValueError."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"dynamic thresholding takes the quantile ratio (a number in [0, 1], Imagen: 0.995), got "
                         f"{ratio!r}")
    if isinstance(max_value, bool) or not isinstance(max_value, numbers.Real):
        raise ValueError(f"sample_max_value must be a number >= 1 (the largest threshold), got {max_value!r}")
    ratio, max_value = float(ratio), float(max_value)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the dynamic thresholding ratio is a quantile in [0, 1], got {ratio}")
    if not max_value >= 1.0:  # also rejects NaN
        raise ValueError(f"sample_max_value must be >= 1 (thresholds are clamped to [1, max]), got {max_value}")
    return ratio, max_value


def threshold_of(D: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Per-sample dynamic thresholds of a data estimate (diffusers' ``_threshold_sample`` computes the same).

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


def apply_threshold(D: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Imagen's dynamic thresholding of a data estimate D [B, ...] with per-sample thresholds s [B]:
    clamp(D, -s, s) / s (NaN stays NaN), as every kernel applies it.  Computed in D's dtype."""
    s = thresholds.to(D.dtype).reshape((-1,) + (1,) * (D.dim() - 1))
    return torch.clamp(D, -s, s) / s


def dynamic_threshold(x, out, rows, guidance=None, cfg=False, ratio=0.995, max_value=1.0,
                      cfg_rescale=None) -> torch.Tensor:
    """The reduction pass of dynamic thresholding: the thresholds ``ops.step(..., thresholds=)`` takes for a stage.

    Forms D = cx x + co out exactly as the step does (``fastdiff.ops.data_estimate``: with ``cfg``,
    out = out_u + w (out_c - out_u)), in float32 (float64 for float64 x), then ``threshold_of(D, ratio,
    max_value)``.  Plain torch ops, no host sync.

    Parameters
    ----------
    x : Tensor [B, *S]
    out : Tensor [B, *S] or [2B, *S] (with ``cfg``: [uncond; cond])
    rows : Tensor [B or 1, R] (columns 0 and 1: cx, co)
    guidance : Tensor [B or 1], optional (the cfg weight w)
    cfg : bool
    ratio : float, the quantile of |D| (Imagen: 0.995);  max_value : float >= 1, the largest threshold
    cfg_rescale : Tensor [B], optional, guidance_rescale's factors (the step's ``cfg_rescale``)

    Returns
    -------
    Tensor [B]: float32 (float64 for float64 x), each >= 1
    """
    return threshold_of(data_estimate(x, out, rows, guidance, cfg, cfg_rescale if cfg else None), ratio, max_value)
