"""A small class-conditional UNet for 8x8 images (the digits demo), in fastdiff's calling convention:
``model(x [B, 1, 8, 8], t [B] model time, label [B] long) -> out`` (v-prediction as trained).  Label
``num_classes`` is the null label (classifier-free guidance is trained with label dropout)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]  # time + label, added after the first convolution
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """Two resolutions (8x8, 4x4), one skip level; about 0.4 M parameters with ``ch=32``."""

    def __init__(self, ch: int = 32, num_classes: int = 10, emb: int = 128):
        super().__init__()
        self.num_classes, self.ch, self.emb_dim = num_classes, ch, emb
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(num_classes + 1, emb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, emb)
        self.downsample = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * ch, 2 * ch, emb)
        self.mid = ResBlock(2 * ch, 2 * ch, emb)
        self.up2 = ResBlock(4 * ch, 2 * ch, emb)
        self.upsample = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.up1 = ResBlock(2 * ch, ch, emb)
        self.out_norm = nn.GroupNorm(8, ch)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if label is None:
            label = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        dtype = x.dtype
        x = x.to(self.inp.weight.dtype)
        e = self.time(timestep_embedding(t, self.ch).to(x.dtype)) + self.label(label.long())
        h1 = self.down1(self.inp(x), e)
        h2 = self.down2(self.downsample(h1), e)
        h = self.mid(h2, e)
        h = self.up2(torch.cat([h, h2], 1), e)
        h = self.upsample(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up1(torch.cat([h, h1], 1), e)
        return self.out(F.silu(self.out_norm(h))).to(dtype)


class DigitsClassifier(nn.Module):
    """A small CNN for 8x8 digits; ``features`` (128-d) feed the Frechet distance of the demo."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64 * 16, 128)
        self.fc2 = nn.Linear(128, 10)

    def features(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))
