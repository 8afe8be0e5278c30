"""Whether a sampler is *memoryless*: its pretrained chain is the time reversal of the model's own noising process,
so its flow E[R(x_K) | x_k] is the noised-data flow E[R(x₀) | x_t]. Adjoint Matching and residual ∇-DB's
``tilted_score`` policy target assume it."""

from __future__ import annotations

import torch

from .flow import FlowDDPMKernel, FlowMatchKernel
from .gaussian import GaussianKernel


def memoryless_problem(kernel: GaussianKernel) -> str | None:
    """Why the kernel is not a memoryless sampler, or None if it is: for an ε-model, the DDPM posterior step
    q(x_prev | x_t, x̂0) on its own timesteps; for a flow model, its analogue ``flow_ddpm``. (The Flow-SDE has the
    reversal's diffusion g² = 2σ/(1 − σ) at noise level √2 only in the continuous limit: its first step, with σ = 1
    replaced in the denominator, then has twice the variance it should.)"""
    if isinstance(kernel, FlowDDPMKernel):
        return None
    if isinstance(kernel, FlowMatchKernel):
        return f"sampler.kind={kernel.name} is not the time reversal of the interpolant's noising (flow_ddpm is)"
    signal, noise = kernel.state_signal.to(torch.float64), kernel.state_noise.to(torch.float64)
    abar_t, abar_prev = signal[:-1] ** 2, signal[1:] ** 2
    variance = noise[1:] ** 2 / noise[:-1] ** 2 * (1 - abar_t / abar_prev)
    x_coef = (abar_prev / abar_t).sqrt()
    eps_coef = (noise[1:] ** 2 - variance).clamp(min=0).sqrt() - (abar_prev / abar_t).sqrt() * noise[:-1]
    checks = {"std": (kernel.std, variance.sqrt()), "x_coef": (kernel.x_coef, x_coef),
              "eps_coef": (kernel.eps_coef, eps_coef)}
    for name, (actual, ddpm) in checks.items():
        if not torch.allclose(actual.to(torch.float64), ddpm, rtol=1e-6, atol=1e-9):
            return f"its step {name} differs from DDPM's"
    return None
