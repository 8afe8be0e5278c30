"""Gaussian mixture in R^d: a pretrained model whose ε is exact, and whose tilts are known.

The pretrained model is the exact ε of the VP process started from the mixture
p(x) = Σ_k w_k N(m_k, s_k² I): at diffusion time t the marginal is
p_t = Σ_k w_k N(√ᾱ_t m_k, (ᾱ_t s_k² + 1 − ᾱ_t) I) and ε#(x, t) = −√(1 − ᾱ_t) ∇ log p_t(x).
The finetuned model adds a time-conditioned residual network whose output
layer starts at zero, so finetuned = pretrained at initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..mdp.schedules import NoiseSchedule
from .base import Backend
from .nets import TimeConditionedMLP


@dataclass
class GaussianMixture:
    """Σ_k w_k N(m_k, s_k² I) with isotropic components."""

    means: Tensor  # (M, d)
    stds: Tensor  # (M,)
    weights: Tensor  # (M,), sums to 1

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64)
        weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.weights = weights / weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def noised(self, abar: Tensor) -> tuple[Tensor, Tensor]:
        """Means (B, M, d) and variances (B, M) of the components of p_t for per-sample ᾱ (B,)."""
        abar = abar.to(torch.float64)
        means = abar.sqrt()[:, None, None] * self.means[None]
        variances = abar[:, None] * self.stds[None] ** 2 + (1 - abar[:, None])
        return means, variances

    def _component_log_probs(self, x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
        squared = ((x[:, None, :] - means) ** 2).sum(-1)
        return (
            torch.log(self.weights)[None]
            - 0.5 * squared / variances
            - 0.5 * self.dim * torch.log(2 * math.pi * variances)
        )

    def log_prob(self, x: Tensor, abar: Tensor | None = None) -> Tensor:
        """log p_t(x) (log p(x) when ``abar`` is None)."""
        x64 = x.to(torch.float64)
        abar = torch.ones(x.shape[0], dtype=torch.float64) if abar is None else abar
        means, variances = self.noised(abar)
        return torch.logsumexp(self._component_log_probs(x64, means, variances), dim=1).to(x.dtype)

    def score(self, x: Tensor, abar: Tensor) -> Tensor:
        """∇_x log p_t(x) in closed form (responsibility-weighted component scores)."""
        x64 = x.to(torch.float64)
        means, variances = self.noised(abar)
        responsibilities = torch.softmax(self._component_log_probs(x64, means, variances), dim=1)
        component_scores = -(x64[:, None, :] - means) / variances[..., None]
        return (responsibilities[..., None] * component_scores).sum(1).to(x.dtype)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        components = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn((num, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[components] + self.stds[components, None] * noise).float()

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the nearest component mean for each point (for mode-weight histograms)."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(1)


class GaussianMixtureBackend(Backend):
    """Exact pretrained ε of a Gaussian mixture + a zero-initialised residual MLP (the adapter)."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.sample_shape = (mixture.dim,)
        self.residual = TimeConditionedMLP(mixture.dim, hidden, layers)
        self._hidden, self._layers = hidden, layers

    @classmethod
    def from_config(cls, config) -> "GaussianMixtureBackend":
        schedule = NoiseSchedule.make(
            config.schedule.kind,
            config.schedule.num_train_timesteps,
            config.schedule.beta_start,
            config.schedule.beta_end,
        )
        mixture = GaussianMixture(config.means, config.stds, config.weights or [1.0] * len(config.means))
        return cls(mixture, schedule, config.hidden, config.layers)

    def describe(self):
        """The mixture and the residual network's size (the schedule is not recorded: the run is handed over)."""
        from ..config import GMMModelConfig

        return GMMModelConfig(
            means=self.mixture.means.tolist(), stds=self.mixture.stds.tolist(), weights=self.mixture.weights.tolist(),
            hidden=self._hidden, layers=self._layers,
        )

    def pretrained_eps(self, x: Tensor, timestep: Tensor) -> Tensor:
        abar = self.schedule.alphas_cumprod[timestep.cpu()].to(torch.float64)
        eps = -(1 - abar).sqrt()[:, None].to(x.device) * self.mixture.score(x.cpu(), abar).to(x.device)
        return eps.to(x.dtype)

    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        eps = self.pretrained_eps(x, timestep)
        if finetuned:
            eps = eps + self.residual(x, timestep)
        return eps

    def sample_conditions(self, num: int, generator: torch.Generator, split: str = "train") -> Tensor:
        return torch.zeros(num, dtype=torch.long)

    def decode(self, x: Tensor) -> Tensor:
        return x

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.residual.parameters())

    def make_flow_score_net(self) -> nn.Module:
        return TimeConditionedMLP(self.mixture.dim, self._hidden, self._layers)
