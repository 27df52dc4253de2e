"""The torch backend: executes Plan stages with plain torch ops, in the dtype of the input.

Readable on purpose: it is the oracle the fused kernels are tested against, and it runs in float64.
"""

from __future__ import annotations

import torch

from ..ops import apply_threshold


def combine_guidance(out: torch.Tensor, guidance_scale) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch: out_u + w (out_c - out_u)."""
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """||t|| over all non-batch dims, shaped [B, 1, ...] for broadcasting; fp32 at least."""
    acc = t if t.dtype == torch.float64 else t.float()
    n = acc.reshape(acc.shape[0], -1).norm(dim=1)
    return n.reshape((-1,) + (1,) * (t.dim() - 1))


def run_stage(plan, k: int, x: torch.Tensor, out, slots: list, z=None, thresholds=None) -> torch.Tensor:
    """Execute stage ``k`` of ``plan``: returns x' and updates ``slots`` (a list of K tensors) in place.

    Parameters
    ----------
    x : Tensor [B, ...]
        The state.
    out : Tensor [B, ...] or None
        The model output (guidance already combined); None for a stage without model call.
    slots : list of Tensor [B, ...] or None
        History registers; entries are created on first write.
    z : Tensor [B, ...] or None
        The stage's noise (float32 Philox normals cast to x's dtype), when ``plan.draw[k] >= 0``.
    thresholds : Tensor [B] or None
        Dynamic thresholds (``fastdiff.ops.threshold_of`` of this stage's D): D = clamp(D, -s, s) / s.
    """
    cx, co = plan.conv[k]
    M = plan.update[k]
    D = cx * x + co * out if plan.calls_model[k] else None
    if D is not None and thresholds is not None:
        D = apply_threshold(D, thresholds.to(D.dtype))
    regs = [x, D] + list(slots)

    def combo(row):
        acc = None
        for c, r in zip(row, regs):
            if c != 0.0:
                term = float(c) * r
                acc = term if acc is None else acc + term
        return torch.zeros_like(x) if acc is None else acc

    x_new = combo(M[0])
    g = float(plan.noise_gain[k])
    if g != 0.0:
        x_new = x_new + g * z
    snr, r, lsx, lsD = (float(v) for v in plan.langevin[k])
    if snr != 0.0:
        # Song et al. 2021, Algorithm 4: eps = 2 r (snr ||z|| / ||s||)^2, per sample.
        score = lsx * x + lsD * D
        eps = 2.0 * r * (snr * _per_sample_norm(z) / _per_sample_norm(score)) ** 2
        eps = eps.to(x.dtype)
        x_new = x_new + eps * score + torch.sqrt(2.0 * eps) * z
    new_slots = {i: combo(M[1 + i]) for i in range(plan.num_slots) if plan.writes[k, i]}
    for i, v in new_slots.items():
        slots[i] = v
    return x_new
