"""DDIM with stochasticity η (Song et al. 2021); η = 1 is the paper's "DDPM" sampler (50 steps).

    x̂0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t
    σ²  = η² (1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)
    μ   = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε

Timesteps follow diffusers' ``DDIMScheduler`` with Stable Diffusion's settings
("leading" spacing, offset 1: 981, 961, …, 1 for 50 steps); the last step goes
to ᾱ at t = 0 (``set_alpha_to_one=False``).
"""

from __future__ import annotations

import torch

from .gaussian import GaussianKernel
from .schedules import NoiseSchedule


class DDIMKernel(GaussianKernel):
    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, eta: float = 1.0):
        from diffusers import DDIMScheduler

        if not 1 <= num_steps < schedule.num_train_timesteps:  # "leading" spacing + offset 1 needs one spare
            raise ValueError(f"sampler.steps must be in [1, {schedule.num_train_timesteps - 1}], got {num_steps}")
        if eta < 0:
            raise ValueError(f"DDIM eta must be ≥ 0, got {eta}")
        scheduler = DDIMScheduler(
            num_train_timesteps=schedule.num_train_timesteps, steps_offset=1, set_alpha_to_one=False
        )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long()
        self.state_timesteps = torch.cat([timesteps, torch.zeros(1, dtype=torch.long)])
        self.state_signal = schedule.alphas_cumprod[self.state_timesteps].sqrt()
        self.state_noise = (1 - schedule.alphas_cumprod[self.state_timesteps]).sqrt()
        self.eta = eta

        abar = schedule.alphas_cumprod
        abar_t = abar[self.state_timesteps[:-1]]
        abar_prev = abar[self.state_timesteps[1:]]
        variance = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        self.std = variance.sqrt()
        self.x_coef = (abar_prev / abar_t).sqrt()
        self.eps_coef = (1 - abar_prev - variance).clamp(min=0).sqrt() - (abar_prev * (1 - abar_t) / abar_t).sqrt()
