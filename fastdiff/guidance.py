"""guidance_rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4;
diffusers' ``rescale_noise_cfg``): the guided output rescaled towards the conditional output's standard deviation,

    out_g = out_u + w (out_c - out_u),   out = phi out_g std(out_c) / std(out_g) + (1 - phi) out_g,

std per sample over all non-batch dims.  That is out_g times a per-sample factor m_b = phi std_c / std_g + 1 - phi,
so it is built like dynamic thresholding: a reduction pass (``rescale_factors``: plain torch ops, no host sync, so
it is captured in a CUDA graph) plus the affine step, whose kernels multiply the guided output by m_b
(``ops.step(..., cfg_rescale=m)``).
"""

from __future__ import annotations

import math
import numbers

import torch

from .estimate import broadcast_column, compute_dtype


def rescale_option(phi) -> float:
    """Check guidance_rescale's phi: a number in [0, 1] (0: off; Lin et al. use 0.7) as a float, else ValueError."""
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not math.isfinite(phi) or not 0 <= phi <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1] (0: off; Lin et al. 2023 use 0.7), got "
                         f"{phi!r}")
    return float(phi)


def rescale_factors(out: torch.Tensor, guidance: torch.Tensor, phi: float) -> torch.Tensor:
    """Per-sample factors m [B] with which guidance_rescale multiplies the guided output.

    ``m_b = phi * std(out_c[b]) / std(out_g[b]) + (1 - phi)``, out_g = out_u + w (out_c - out_u) formed as the step
    forms it (fp32; fp64 for fp64 out), std over all non-batch dims (Bessel-corrected, as diffusers'; the
    correction cancels in the ratio).  Plain torch ops, no host sync.

    Parameters
    ----------
    out : Tensor [2B, *S], [uncond; cond]
    guidance : Tensor [B or 1], the cfg weight w
    phi : float in [0, 1]

    Returns
    -------
    Tensor [B]: float32 (float64 for float64 out)
    """
    cdt = compute_dtype(out.dtype)
    o = out.to(cdt)
    B = o.shape[0] // 2
    u, c = o[:B], o[B:]
    g = u + broadcast_column(guidance.to(cdt), o.dim()) * (c - u)
    std_c = c.reshape(B, -1).std(dim=1)
    std_g = g.reshape(B, -1).std(dim=1)
    return phi * (std_c / std_g) + (1.0 - phi)
