"""Gaussian mixture in R^d: a pretrained model whose ε is exact, and whose tilts are known.

The pretrained model is the exact ε of the VP process started from the mixture
p(x) = Σ_k w_k N(m_k, s_k² I): at diffusion time t the marginal is
p_t = Σ_k w_k N(√ᾱ_t m_k, (ᾱ_t s_k² + 1 − ᾱ_t) I) and ε#(x, t) = −√(1 − ᾱ_t) ∇ log p_t(x).
The finetuned model adds a time-conditioned residual network whose output
layer starts at zero, so finetuned = pretrained at initialisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..mdp.schedules import NoiseSchedule
from ..mixture import GaussianMixture
from .base import Backend
from .nets import TimeConditionedMLP


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
