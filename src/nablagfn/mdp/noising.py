"""The noising kernel over a sampler's stride, P_B(x_k | x_{k+1}) = N(c_k x_{k+1}, v_k I).

With the states' marginals x_k = α_k x₀ + s_k ε (the kernel's ``state_signal`` / ``state_noise``), the forward
process run from the later state x_{k+1} (less noise) back to x_k (more noise) has

    c_k = α_k / α_{k+1},   v_k = s_k² − c_k² s_{k+1}²

(for a VP schedule, c_k = √r_k and v_k = 1 − r_k with r_k = ᾱ(t_k)/ᾱ(t_{k+1}); for a flow grid,
c_k = (1 − σ_k)/(1 − σ_{k+1}) and v_k = σ_k² − c_k² σ_{k+1}²). It is the backward policy of DAG-DB and ∇-DB, the
(1 − η) share of the residual methods' balance at η ≠ 1, and how DRaFT-LV re-noises a sample to the last step's level.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussian import GaussianKernel
from .shapes import per_sample


class NoisingKernel:
    """P_B of ``kernel``'s steps; ``step`` k means the transition x_k → x_{k+1}."""

    def __init__(self, kernel: GaussianKernel):
        self.kernel = kernel
        signal, noise = kernel.state_signal.to(torch.float64), kernel.state_noise.to(torch.float64)
        self._coef = signal[:-1] / signal[1:]
        self._variance = noise[:-1] ** 2 - self._coef**2 * noise[1:] ** 2

    def coef(self, step: Tensor) -> Tensor:
        """c_k per sample, float64 (shape of ``step``)."""
        return self._coef.to(step.device)[step]

    def variance(self, step: Tensor) -> Tensor:
        """v_k per sample, float64 (shape of ``step``)."""
        return self._variance.to(step.device)[step]

    def coef_like(self, step: Tensor, like: Tensor) -> Tensor:
        return per_sample(self.coef(step).to(like.dtype), like)

    def variance_like(self, step: Tensor, like: Tensor) -> Tensor:
        return per_sample(self.variance(step).to(like.dtype), like)

    def sample(self, x_next: Tensor, step: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw x_k ~ P_B(· | x_{k+1})."""
        noise = torch.randn(x_next.shape, generator=generator, dtype=x_next.dtype).to(x_next.device)
        return self.coef_like(step, x_next) * x_next + self.variance_like(step, x_next).sqrt() * noise

    def log_density(self, x: Tensor, x_next: Tensor, step: Tensor) -> Tensor:
        """log P_B(x_k | x_{k+1}) summed over non-batch dimensions, without the normalising constant → (B,)."""
        coef, variance = self.coef_like(step, x), self.variance_like(step, x)
        return (-0.5 * (x - coef * x_next) ** 2 / variance).flatten(1).sum(1)

    def scores(self, x: Tensor, x_next: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """(∇_{x_{k+1}}, ∇_{x_k}) of log P_B(x_k | x_{k+1})."""
        coef, variance = self.coef_like(step, x), self.variance_like(step, x)
        scaled_residual = (x - coef * x_next) / variance
        return coef * scaled_residual, -scaled_residual
