"""EDM preconditioning (Karras et al. 2022, Table 1 and eq. 7) as a model wrapper, so the sampler loop never
needs to know about c_in / c_skip / c_out / c_noise.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),  c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),           c_noise = ln(sigma) / 4

The wrapped model follows fastdiff's convention on an EDM schedule: ``model(x, sigma [B], **cond) -> D`` (use
``prediction="x0"``).
"""

from __future__ import annotations

import torch
from torch import nn


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for a [B] tensor of sigmas."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1.0 / torch.sqrt(s2 + d2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Wrap a raw network ``F(x_in, c_noise, **cond)`` into an EDM denoiser ``D(x, sigma, **cond)``."""

    def __init__(self, net, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        view = (-1,) + (1,) * (x.dim() - 1)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.to(torch.float32 if x.dtype != torch.float64 else x.dtype),
                                                    self.sigma_data)
        f = self.net(c_in.reshape(view).to(x.dtype) * x, c_noise, **cond)
        return c_skip.reshape(view).to(x.dtype) * x + c_out.reshape(view).to(x.dtype) * f

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The raw network's regression target (EDM eq. 8): (x0 - c_skip (x0 + sigma n)) / c_out."""
        view = (-1,) + (1,) * (x0.dim() - 1)
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        return (x0 - c_skip.reshape(view) * (x0 + sigma.reshape(view) * noise)) / c_out.reshape(view)
