"""Rewards on vectors, each with the exact tilt of a Gaussian mixture p(x)·R(x)^β."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.gmm import GaussianMixture
from .base import Reward


class GaussianReward(Reward):
    """log R(x) = −|x − c|² / (2 · scale²)."""

    def __init__(self, center: list[float], scale: float):
        super().__init__()
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))
        self.scale = scale

    @classmethod
    def from_config(cls, config) -> "GaussianReward":
        return cls(config.center, config.scale)

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        return -((y - self.center) ** 2).sum(-1) / (2 * self.scale**2)

    def tilt(self, mixture: GaussianMixture, beta: float) -> GaussianMixture:
        """p(x) R(x)^β for p = Σ w_k N(m_k, s_k²): component k becomes
        N((m_k/s_k² + βc/scale²)/prec_k, 1/prec_k) with prec_k = 1/s_k² + β/scale², and weight
        ∝ w_k N(m_k; c, (s_k² + scale²/β) I)."""
        center = self.center.to(torch.float64)
        tau = beta / self.scale**2
        precision = 1 / mixture.stds**2 + tau
        means = (mixture.means / mixture.stds[:, None] ** 2 + tau * center) / precision[:, None]
        spread = mixture.stds**2 + 1 / tau
        log_w = (
            torch.log(mixture.weights)
            - 0.5 * ((mixture.means - center) ** 2).sum(-1) / spread
            - 0.5 * mixture.dim * torch.log(spread)
        )
        return GaussianMixture(means, precision.rsqrt(), torch.softmax(log_w, 0))


class LinearReward(Reward):
    """log R(x) = a · x."""

    def __init__(self, direction: list[float]):
        super().__init__()
        self.register_buffer("direction", torch.tensor(direction, dtype=torch.float32))

    @classmethod
    def from_config(cls, config) -> "LinearReward":
        return cls(config.direction)

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        return y @ self.direction.to(y.dtype)

    def tilt(self, mixture: GaussianMixture, beta: float) -> GaussianMixture:
        """p(x) e^{β a·x}: component k moves to m_k + β s_k² a, weight ∝ w_k e^{β a·m_k + β² s_k² |a|²/2}."""
        a = self.direction.to(torch.float64)
        means = mixture.means + beta * mixture.stds[:, None] ** 2 * a
        log_w = torch.log(mixture.weights) + beta * mixture.means @ a + 0.5 * beta**2 * mixture.stds**2 * (a @ a)
        return GaussianMixture(means, mixture.stds.clone(), torch.softmax(log_w, 0))


def exact_target(prior: GaussianMixture, reward: Reward, beta: float, prior_strength: float) -> GaussianMixture | None:
    """The exact target ∝ R^β · p^η as a mixture, where it has a closed form (η = 1, or η = 0 with a
    Gaussian reward, whose R^β alone is N(c, scale²/β)); None otherwise."""
    if prior_strength == 1 and isinstance(reward, (GaussianReward, LinearReward)):
        return reward.tilt(prior, beta)
    if prior_strength == 0 and isinstance(reward, GaussianReward):
        center = reward.center.to(torch.float64)[None]
        return GaussianMixture(center, torch.tensor([reward.scale / beta**0.5]), torch.ones(1))
    return None
