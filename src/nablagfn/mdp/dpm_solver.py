"""First-order SDE-DPM-Solver++ (Lu et al. 2022), the paper's second MDP (20 steps).

With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ) and h = λ_next − λ_now:

    x_next = (σ_next/σ_now) e^{−h} x + α_next (1 − e^{−2h}) x̂0 + σ_next √(1 − e^{−2h}) z

Timesteps follow diffusers' ``DPMSolverMultistepScheduler`` ("linspace" spacing:
999, 949, …, 50 for 20 steps). Its last step goes to σ = 0 in diffusers; here it
goes to ᾱ at t = 0 so the last transition keeps a (tiny) non-zero variance,
the same choice as for DDIM. (At first order this step is the DDPM posterior,
i.e. equal to DDIM with η = 1 on the same timesteps; a test checks it.)
"""

from __future__ import annotations

import torch

from .gaussian import GaussianKernel
from .schedules import NoiseSchedule


class SDEDPMSolverKernel(GaussianKernel):
    name = "dpm_solver"

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 20):
        from diffusers import DPMSolverMultistepScheduler

        if not 1 <= num_steps < schedule.num_train_timesteps:
            raise ValueError(f"sampler.steps must be in [1, {schedule.num_train_timesteps - 1}], got {num_steps}")
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.num_train_timesteps, algorithm_type="sde-dpmsolver++", solver_order=1
        )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.long()
        self.state_timesteps = torch.cat([timesteps, torch.zeros(1, dtype=torch.long)])
        self.state_signal = schedule.alphas_cumprod[self.state_timesteps].sqrt()
        self.state_noise = (1 - schedule.alphas_cumprod[self.state_timesteps]).sqrt()

        abar = schedule.alphas_cumprod
        abar_now = abar[self.state_timesteps[:-1]]
        abar_next = abar[self.state_timesteps[1:]]
        alpha_now, sigma_now = abar_now.sqrt(), (1 - abar_now).sqrt()
        alpha_next, sigma_next = abar_next.sqrt(), (1 - abar_next).sqrt()
        h = torch.log(alpha_next / sigma_next) - torch.log(alpha_now / sigma_now)
        decay = torch.exp(-h)
        # μ = (σ_n/σ_c) e^{−h} x + α_n (1 − e^{−2h}) (x − σ_c ε)/α_c
        data_coef = alpha_next * (1 - decay**2)
        self.x_coef = sigma_next / sigma_now * decay + data_coef / alpha_now
        self.eps_coef = -data_coef * sigma_now / alpha_now
        self.std = sigma_next * (1 - decay**2).sqrt()
