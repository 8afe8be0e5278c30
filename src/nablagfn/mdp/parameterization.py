"""What a model's output means at a diffusion time: ε-prediction (the DDPM family) or velocity (rectified flows).

Both noise data the same way up to coefficients, x_t = α_t x₀ + s_t ε (ε ~ N(0, I)):

=============  ==============================  ==========================================  ============================
``kind``       α_t, s_t                        model output                                clean prediction x̂₀
=============  ==============================  ==========================================  ============================
``eps``        √ᾱ_t, √(1 − ᾱ_t)                ε̂ ≈ E[ε | x_t]                              (x − s_t ε̂)/α_t
``flow``       1 − σ, σ  (σ = t / T)           v̂ ≈ E[ε − x₀ | x_t]                         x − σ v̂
=============  ==============================  ==========================================  ============================

t is the model's own time input: an integer timestep in [0, T) for ``eps``, diffusers' float timestep σ·T for
``flow`` (T = ``num_train_timesteps``). Every output also gives an ε-prediction, ε̂ = E[ε | x_t] = −s_t ∇ log p_t
(Tweedie): for a velocity, ε̂ = x + (1 − σ) v̂. The methods reason in ε units through :meth:`to_eps`, so one loss
serves both kinds.

The sampler grid of a kernel is separate (``mdp.ddim``, ``mdp.flow``); this is the continuous-time relation the
pretraining and denoising losses (GRAFT) and the exact mixture scores use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

from .schedules import NoiseSchedule
from .shapes import per_sample

ParameterizationKind = Literal["eps", "flow"]


class Parameterization(ABC):
    """The noised marginal x_t = α_t x₀ + s_t ε at the model's time input, and its output's meaning."""

    kind: ParameterizationKind
    num_train_timesteps: int

    @abstractmethod
    def marginal(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, s_t), float64 with the shape of ``timestep`` (on its device)."""

    @abstractmethod
    def to_eps(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        """The ε-prediction of the model's ``output`` at (x, t)."""

    @abstractmethod
    def training_target(self, data: Tensor, noise: Tensor) -> Tensor:
        """What the output is trained towards when x_t = α_t·data + s_t·noise."""

    @abstractmethod
    def random_timesteps(self, num: int, generator: torch.Generator, low: float = 0.0) -> Tensor:
        """``num`` model times drawn uniformly from [low, T) (long for ``eps``, float for ``flow``)."""

    def marginal_like(self, timestep: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, s_t) in ``like``'s dtype, shaped to broadcast against it."""
        signal, noise = self.marginal(timestep.to(like.device))
        return per_sample(signal.to(like.dtype), like), per_sample(noise.to(like.dtype), like)

    def noise(self, data: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """x_t = α_t·data + s_t·noise."""
        signal, scale = self.marginal_like(timestep, data)
        return signal * data + scale * noise

    def predict_clean(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        """One-step clean prediction x̂₀ = (x − s_t ε̂)/α_t (eq. 2's x_θ)."""
        signal, scale = self.marginal_like(timestep, x)
        return (x - scale * self.to_eps(x, timestep, output)) / signal


class EpsilonParameterization(Parameterization):
    """ε-prediction under a VP schedule ᾱ_t (integer timesteps)."""

    kind = "eps"

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.num_train_timesteps = schedule.num_train_timesteps

    def marginal(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.schedule.alphas_cumprod.to(timestep.device)[timestep.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def to_eps(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        return output

    def training_target(self, data: Tensor, noise: Tensor) -> Tensor:
        return noise

    def random_timesteps(self, num: int, generator: torch.Generator, low: float = 0.0) -> Tensor:
        return torch.randint(int(low), self.num_train_timesteps, (num,), generator=generator)

    def predict_clean(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        signal, scale = self.marginal_like(timestep, x)
        return (x - scale * output) / signal


class FlowParameterization(Parameterization):
    """Velocity prediction for the linear interpolant x_σ = (1 − σ) x₀ + σ ε, model time t = σ·T (float).

    ``shift`` is the model's sampling shift (SD3: 3), or ``mu`` its dynamic shift for the image size (FLUX,
    ``diffusers.pipelines.flux.pipeline_flux.calculate_shift``), which the flow kernels take from here; neither changes
    the marginals.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.mu = mu

    def sigma(self, timestep: Tensor) -> Tensor:
        """σ = t / T, float64."""
        return timestep.to(torch.float64) / self.num_train_timesteps

    def marginal(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(timestep)
        return 1 - sigma, sigma

    def to_eps(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        signal, _ = self.marginal_like(timestep, x)
        return x + signal * output

    def training_target(self, data: Tensor, noise: Tensor) -> Tensor:
        return noise - data

    def random_timesteps(self, num: int, generator: torch.Generator, low: float = 0.0) -> Tensor:
        uniform = torch.rand(num, generator=generator, dtype=torch.float64)
        return (low + (self.num_train_timesteps - low) * uniform).float()

    def predict_clean(self, x: Tensor, timestep: Tensor, output: Tensor) -> Tensor:
        _, sigma = self.marginal_like(timestep, x)
        return x - sigma * output
