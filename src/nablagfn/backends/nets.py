"""Small time-conditioned networks for vector-valued states."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of diffusion timesteps (integer, or a flow model's float 1000·σ), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeConditionedMLP(nn.Module):
    """x, t ↦ vector of x's size. The output layer starts at exactly zero."""

    def __init__(self, dim: int, hidden: int = 128, layers: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        blocks: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        features = torch.cat([x, timestep_embedding(timestep, self.time_dim).to(x.dtype)], dim=1)
        return self.out(self.body(features))
