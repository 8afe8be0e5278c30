"""The noising kernel over a sampler's stride, P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I), r = ᾱ(t_k)/ᾱ(t_{k+1}).

It is the forward (noising) process run from the later state x_{k+1} (timestep t_{k+1}, less noise) back to x_k
(t_k, more noise): the backward policy of DAG-DB and ∇-DB, the (1 − η) share of the residual methods' balance at
η ≠ 1, and how DRaFT-LV re-noises a sample to the last step's level.
"""

from __future__ import annotations

from torch import Tensor

from .gaussian import GaussianKernel
from .schedules import NoiseSchedule
from .shapes import per_sample


class NoisingKernel:
    """P_B of ``kernel``'s steps under ``schedule``'s ᾱ; ``step`` k means the transition x_k → x_{k+1}."""

    def __init__(self, schedule: NoiseSchedule, kernel: GaussianKernel):
        self.schedule = schedule
        self.kernel = kernel

    def ratio(self, step: Tensor) -> Tensor:
        """r_k = ᾱ(t_k) / ᾱ(t_{k+1}) per sample, float64 (shape of ``step``)."""
        abar = self.schedule.alphas_cumprod.to(step.device)
        return abar[self.kernel.timestep_of_state(step)] / abar[self.kernel.timestep_of_state(step + 1)]

    def ratio_like(self, step: Tensor, like: Tensor) -> Tensor:
        """r_k in ``like``'s dtype, shaped to broadcast against it."""
        return per_sample(self.ratio(step).to(like.dtype), like)

    def log_density(self, x: Tensor, x_next: Tensor, step: Tensor) -> Tensor:
        """log P_B(x_k | x_{k+1}) summed over non-batch dimensions, without the normalising constant → (B,)."""
        ratio = self.ratio_like(step, x)
        return (-0.5 * (x - ratio.sqrt() * x_next) ** 2 / (1 - ratio)).flatten(1).sum(1)

    def scores(self, x: Tensor, x_next: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """(∇_{x_{k+1}}, ∇_{x_k}) of log P_B(x_k | x_{k+1})."""
        ratio = self.ratio_like(step, x)
        scaled_residual = (x - ratio.sqrt() * x_next) / (1 - ratio)
        return ratio.sqrt() * scaled_residual, -scaled_residual
