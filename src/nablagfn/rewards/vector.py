"""Rewards on vectors, each with the exact tilt of a Gaussian mixture p(x)·R(x)^β."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config_base import StrictConfig
from ..mixture import GaussianMixture
from .base import Reward

#: the largest magnitude of a vector reward's and a mixture's numbers: beyond it float32 states overflow
VECTOR_LIMIT = 1e6


class GaussianRewardConfig(StrictConfig):
    """log R(x) = −|x − center|² / (2 · scale²)."""

    kind: Literal["gaussian"] = "gaussian"
    center: list[Annotated[float, Field(ge=-VECTOR_LIMIT, le=VECTOR_LIMIT)]] = Field(default_factory=lambda: [3.0, 0.5])
    scale: float = Field(1.0, ge=1e-6, le=VECTOR_LIMIT, description="in [1e-6, 1e6]: a square that stays a float")


class LinearRewardConfig(StrictConfig):
    """log R(x) = direction · x."""

    kind: Literal["linear"] = "linear"
    direction: list[Annotated[float, Field(ge=-VECTOR_LIMIT, le=VECTOR_LIMIT)]] = Field(
        default_factory=lambda: [1.0, 0.0]
    )


class GaussianReward(Reward):
    """log R(x) = −|x − c|² / (2 · scale²)."""

    config_class = GaussianRewardConfig

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

    config_class = LinearRewardConfig

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


class GridDensity:
    """An unnormalised 2-D density tabulated on a fine grid, sampled exactly up to the grid's resolution:
    a cell drawn ∝ its density at the centre, then a uniform point in the cell. For targets without a
    closed form (R^β · p^η with 0 < η < 1); ``sample`` matches ``GaussianMixture.sample``."""

    def __init__(self, log_density, low: float, high: float, cells: int = 1200):
        self.width = (high - low) / cells
        centres = low + self.width * (torch.arange(cells, dtype=torch.float64) + 0.5)
        grid_x, grid_y = torch.meshgrid(centres, centres, indexing="ij")
        self.centres = torch.stack([grid_x.flatten(), grid_y.flatten()], 1)
        log_weights = log_density(self.centres)
        self.weights = torch.softmax(log_weights - log_weights.max(), 0)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        cells = torch.multinomial(self.weights.float(), num, replacement=True, generator=generator)
        jitter = (torch.rand((num, 2), generator=generator, dtype=torch.float64) - 0.5) * self.width
        return (self.centres[cells] + jitter).float()


def exact_target(
    prior: GaussianMixture, reward: Reward, beta: float, prior_strength: float
) -> GaussianMixture | GridDensity | None:
    """The exact target ∝ R^β · p^η: a mixture in closed form (η = 1, or η = 0 with a Gaussian reward, whose
    R^β alone is N(c, scale²/β)); for other η ∈ (0, 1) on a 2-D mixture, tabulated on a grid over the prior's
    support (± 5 stds of p^η's components, plus the shift of a linear tilt); None otherwise."""
    if prior_strength == 1 and isinstance(reward, (GaussianReward, LinearReward)):
        return reward.tilt(prior, beta)
    if prior_strength == 0 and isinstance(reward, GaussianReward):
        center = reward.center.to(torch.float64)[None]
        return GaussianMixture(center, torch.tensor([reward.scale / beta**0.5]), torch.ones(1))
    if 0 < prior_strength < 1 and prior.dim == 2 and isinstance(reward, (GaussianReward, LinearReward)):
        std = prior.stds.max().item() / prior_strength**0.5  # p^η's components are η^(−1/2) times wider
        shift = beta * std**2 * reward.direction.norm().item() if isinstance(reward, LinearReward) else 0.0
        margin = 5 * std + shift
        low, high = prior.means.min().item() - margin, prior.means.max().item() + margin

        def log_density(x: Tensor) -> Tensor:
            cond = torch.zeros(x.shape[0], dtype=torch.long)
            return prior_strength * prior.log_prob(x) + beta * reward.log_reward(x, cond).to(torch.float64)

        return GridDensity(log_density, low, high)
    return None


class ExactFlowScore:
    """The exact residual flow score ∇ log F̃_t of a Gaussian mixture tilted by a Gaussian or linear reward (η = 1).

    Under the pretrained diffusion, x_0 | x_t is known in closed form, and the residual flow is
    F̃_t(x) = E[R(x_0)^β | x_t = x] = Z · p̃_t(x) / p_t(x), with p̃ = p·R^β (again a mixture, ``reward.tilt``) and
    p_t, p̃_t both noised to the model's level at t, x_t = α_t x_0 + s_t ε (``mdp.parameterization``: √ᾱ_t, √(1 − ᾱ_t)
    for a diffusion model, 1 − σ, σ for a flow model). So ∇ log F̃_t = ∇ log p̃_t − ∇ log p_t, two closed-form mixture scores.
    It is the flow of the continuous-time process; a K-step sampler's own flow differs from it by the
    discretisation. The optimal residual of eq. 15 is then g*(x_k) = ∇ log F̃(x_k) − β γ_k ∇ log R(x̂(x_k)).

    Args:
        prior: the pretrained mixture p.
        reward: a ``GaussianReward`` or ``LinearReward``.
        beta: the tilt's exponent β.
        parameterization: the model's (α_t, s_t) per model time t (``Backend.parameterization``).
    """

    def __init__(self, prior: GaussianMixture, reward: Reward, beta: float, parameterization):
        if not isinstance(reward, (GaussianReward, LinearReward)):
            raise ValueError(f"the exact flow score needs a gaussian or linear reward, not {type(reward).__name__}")
        self.prior = prior
        self.tilted = reward.tilt(prior, beta)
        self.parameterization = parameterization

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        """∇_x log F̃_t(x) at each sample's model time t ((B,)) → the shape and dtype of x."""
        signal, noise = self.parameterization.marginal(timestep.cpu())
        x64 = x.detach().cpu().double()
        score = self.tilted.score_at(x64, signal, noise) - self.prior.score_at(x64, signal, noise)
        return score.to(device=x.device, dtype=x.dtype)
