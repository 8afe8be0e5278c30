"""Gaussian mixture in R^d: a pretrained model whose output is exact, and whose tilts are known.

``model.parameterization=eps`` (default): the pretrained model is the exact ε of the VP process started from the
mixture p(x) = Σ_k w_k N(m_k, s_k² I): at diffusion time t the marginal is
p_t = Σ_k w_k N(√ᾱ_t m_k, (ᾱ_t s_k² + 1 − ᾱ_t) I) and ε#(x, t) = −√(1 − ᾱ_t) ∇ log p_t(x).
``model.parameterization=flow``: the exact velocity E[ε − x₀ | x_σ = x] of the linear interpolant
x_σ = (1 − σ) x₀ + σ ε (``GaussianMixture.velocity``), at model time t = 1000 σ.
The finetuned model adds a time-conditioned residual network whose output
layer starts at zero, so finetuned = pretrained at initialisation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..mdp.parameterization import EpsilonParameterization, FlowParameterization, Parameterization
from ..mdp.schedules import NoiseSchedule
from ..mixture import GaussianMixture
from .base import Backend
from .nets import TimeConditionedMLP


def _ring(modes: int = 8, radius: float = 3.0) -> list[list[float]]:
    return [
        [round(radius * math.cos(2 * math.pi * k / modes), 6), round(radius * math.sin(2 * math.pi * k / modes), 6)]
        for k in range(modes)
    ]


class ScheduleConfig(StrictConfig):
    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)


class GMMModelConfig(StrictConfig):
    """Gaussian mixture in R^d with the exact pretrained ε or velocity (default: 8-mode ring, radius 3, std 0.3)."""

    kind: Literal["gmm"] = "gmm"
    parameterization: Literal["eps", "flow"] = Field(
        "eps", description="eps: the exact ε of the VP process (model.schedule); flow: the exact velocity of the "
        "linear interpolant (1 − σ) x₀ + σ ε, sampled by sampler.kind=flow_sde"
    )
    means: list[list[float]] = Field(default_factory=_ring)
    stds: list[float] = Field(default_factory=lambda: [0.3] * 8)
    weights: list[float] | None = None  # None: equal weights
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    hidden: int = Field(128, ge=1)
    layers: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> "GMMModelConfig":
        if not self.means:
            raise ValueError("model.means: at least one mean is needed")
        dim = len(self.means[0])
        if dim == 0 or any(len(m) != dim for m in self.means):
            raise ValueError("model.means: every mean must have the same, non-zero, length")
        if len(self.stds) != len(self.means):
            raise ValueError(f"model.stds: expected {len(self.means)} values (one per mean), got {len(self.stds)}")
        if any(s <= 0 for s in self.stds):
            raise ValueError("model.stds: every std must be > 0")
        limit = 1e6  # float32 states overflow far beyond it
        if any(abs(v) > limit for mean in self.means for v in mean) or any(not 1e-6 <= s <= limit for s in self.stds):
            raise ValueError(f"model.means: every value must be within ±{limit:g}, and model.stds in [1e-6, {limit:g}]")
        if self.weights is not None:
            if len(self.weights) != len(self.means):
                raise ValueError(f"model.weights: expected {len(self.means)} values, got {len(self.weights)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("model.weights: weights must be ≥ 0 with a positive sum")
        return self

    @property
    def dim(self) -> int:
        return len(self.means[0])


class GaussianMixtureBackend(Backend):
    """Exact pretrained ε (or velocity) of a Gaussian mixture + a zero-initialised residual MLP (the adapter).

    ``schedule``: the VP schedule of an ε-model; None makes it a flow model (the exact velocity).
    """

    config_class = GMMModelConfig

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule | None, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self._parameterization = FlowParameterization() if schedule is None else EpsilonParameterization(schedule)
        self.sample_shape = (mixture.dim,)
        self.residual = TimeConditionedMLP(mixture.dim, hidden, layers)
        self._hidden, self._layers = hidden, layers

    @classmethod
    def from_config(cls, config) -> "GaussianMixtureBackend":
        mixture = GaussianMixture(config.means, config.stds, config.weights or [1.0] * len(config.means))
        if config.parameterization == "flow":
            return cls(mixture, None, config.hidden, config.layers)
        schedule = NoiseSchedule.make(
            config.schedule.kind,
            config.schedule.num_train_timesteps,
            config.schedule.beta_start,
            config.schedule.beta_end,
        )
        return cls(mixture, schedule, config.hidden, config.layers)

    @classmethod
    def from_mixture(cls, means: list[list[float]], stds: list[float], weights: list[float] | None = None,
                     **model_keys) -> "GaussianMixtureBackend":
        """The mixture Σ_k w_k N(m_k, s_k² I) as a model (what ``model.kind=gmm`` builds, so a run records it and can
        be rebuilt); ``model_keys``: the other ``model`` keys (``hidden``, ``layers``, ``schedule``,
        ``parameterization``)."""
        from . import build_backend

        return build_backend(GMMModelConfig(means=means, stds=stds, weights=weights, **model_keys))

    def describe(self):
        """The mixture and the residual network's size (the schedule is not recorded: the run is handed over)."""
        return GMMModelConfig(
            means=self.mixture.means.tolist(), stds=self.mixture.stds.tolist(), weights=self.mixture.weights.tolist(),
            hidden=self._hidden, layers=self._layers, parameterization=self._parameterization.kind,
        )

    @property
    def parameterization(self) -> Parameterization:
        return self._parameterization

    def pretrained_eps(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The pretrained model's output: ε, or the velocity for a flow model."""
        if self.schedule is None:
            sigma = self._parameterization.sigma(timestep.cpu())
            return self.mixture.velocity(x.cpu(), sigma).to(device=x.device, dtype=x.dtype)
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
