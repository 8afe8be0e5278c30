"""Noise schedules: the pretrained model's ᾱ_t (cumulative product of 1 − β_t).

The constants come from diffusers' own definitions (``DDPMScheduler``), so a
schedule named here is bit-for-bit the one a diffusers pipeline uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]

# Our names → diffusers' ``beta_schedule`` names.
_DIFFUSERS_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … num_train_timesteps − 1 (diffusion-literature time: t = 0 is data)."""

    alphas_cumprod: torch.Tensor  # float64, shape (num_train_timesteps,)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def make(
        cls,
        kind: ScheduleKind = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> "NoiseSchedule":
        """Build a schedule; ``scaled_linear`` with (0.00085, 0.012) is Stable Diffusion's."""
        from diffusers import DDPMScheduler  # imported lazily: diffusers is slow to import

        if kind not in _DIFFUSERS_NAMES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(_DIFFUSERS_NAMES)}")
        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=_DIFFUSERS_NAMES[kind],
        )
        return cls(scheduler.alphas_cumprod.to(torch.float64))
