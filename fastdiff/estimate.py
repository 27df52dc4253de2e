"""The data estimate a stage forms, D = cx x + co out (out guided with classifier-free guidance): the one Python
copy of the formula every kernel implements.  A leaf module (no fastdiff imports), used by ``fastdiff.ops`` (the
torch step and its checked ``data_estimate``) and ``fastdiff.thresholding`` (the reduction pass); no checks here.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in for data of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_column(col: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B|1] -> [B|1, 1, ...] for broadcasting against [B, *S]."""
    return col.reshape((-1,) + (1,) * (ndim - 1))


def guided_output(out: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on a [uncond; cond] batch [2B, ...]: out_u + w (out_c - out_u), in out's dtype."""
    B = out.shape[0] // 2
    return out[:B] + broadcast_column(guidance.to(out.dtype), out.dim()) * (out[B:] - out[:B])


def data_estimate(x, out, rows, guidance, cfg: bool, cfg_rescale=None) -> torch.Tensor:
    """D = cx x + co out in the compute dtype, with rows [B|1, R] (columns 0, 1: cx, co); x [B, *S]; out [B, *S]
    or [2B, *S] with ``cfg`` (combined with guidance [B|1], then multiplied by the per-sample ``cfg_rescale`` [B]
    when given: guidance_rescale's factor)."""
    cdt = compute_dtype(x.dtype)
    c = rows.to(cdt)
    o = out.to(cdt)
    if cfg:
        o = guided_output(o, guidance)
        if cfg_rescale is not None:
            o = broadcast_column(cfg_rescale.to(cdt), x.dim()) * o
    return broadcast_column(c[:, 0], x.dim()) * x.to(cdt) + broadcast_column(c[:, 1], x.dim()) * o


def uncond_estimate(x, out, rows, cfg: bool) -> torch.Tensor:
    """U = cx x + co out_u, the data estimate of the unconditional output (CFG++ renoises with it), in the compute
    dtype; without ``cfg`` out is the only output and U = D."""
    cdt = compute_dtype(x.dtype)
    c = rows.to(cdt)
    o = out[: x.shape[0]].to(cdt) if cfg else out.to(cdt)
    return broadcast_column(c[:, 0], x.dim()) * x.to(cdt) + broadcast_column(c[:, 1], x.dim()) * o
