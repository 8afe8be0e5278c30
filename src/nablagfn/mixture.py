"""Isotropic Gaussian mixtures in closed form: log-density, score and samples of the mixture noised to any ᾱ, and the
density and exact velocity of its flow-matching interpolant (1 − σ) x₀ + σ ε.

Shared by the Gaussian-mixture model (``backends/gmm.py``), the exact rewards and targets (``rewards/vector.py``) and
the ground-truth metrics (``eval/gmm.py``); it depends on torch alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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

    def noised_at(self, signal: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Means (B, M, d) and variances (B, M) of the components of α x₀ + s ε for per-sample α, s (B,)."""
        signal, noise = signal.to(torch.float64), noise.to(torch.float64)
        means = signal[:, None, None] * self.means[None]
        variances = signal[:, None] ** 2 * self.stds[None] ** 2 + noise[:, None] ** 2
        return means, variances

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
        return self._score(x, *self.noised(abar))

    def score_at(self, x: Tensor, signal: Tensor, noise: Tensor) -> Tensor:
        """∇_x log of the density of α x₀ + s ε (per-sample α, s), in closed form."""
        return self._score(x, *self.noised_at(signal, noise))

    def _score(self, x: Tensor, means: Tensor, variances: Tensor) -> Tensor:
        x64 = x.to(torch.float64)
        responsibilities = torch.softmax(self._component_log_probs(x64, means, variances), dim=1)
        component_scores = -(x64[:, None, :] - means) / variances[..., None]
        return (responsibilities[..., None] * component_scores).sum(1).to(x.dtype)

    # -- the flow-matching (linear-interpolant) noising x_σ = (1 − σ) x₀ + σ ε ---------------------------------------
    @staticmethod
    def _per_sample_sigma(sigma: Tensor | float, num: int) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma.expand(num) if sigma.dim() == 0 else sigma.to(torch.float64)

    def noised_flow(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Means (B, M, d) and variances (B, M) of the components of x_σ = (1 − σ) x₀ + σ ε for per-sample σ (B,):
        x_σ | k ~ N((1 − σ) m_k, ((1 − σ)² s_k² + σ²) I)."""
        sigma = sigma.to(torch.float64)
        return self.noised_at(1 - sigma, sigma)

    def log_prob_flow(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """log p_σ(x) of the linear interpolant x_σ = (1 − σ) x₀ + σ ε (σ a float or per-sample (B,))."""
        x64 = x.to(torch.float64)
        means, variances = self.noised_flow(self._per_sample_sigma(sigma, x.shape[0]))
        return torch.logsumexp(self._component_log_probs(x64, means, variances), dim=1).to(x.dtype)

    def velocity(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact flow-matching velocity E[ε − x₀ | x_σ = x] (σ a float or per-sample (B,)), in float64 inside.

        Per component k, with V_k = (1 − σ)² s_k² + σ² and r = x − (1 − σ) m_k:
        E[x₀ | x, k] = m_k + (1 − σ) s_k² r / V_k and E[ε | x, k] = σ r / V_k; these are averaged with the posterior
        responsibilities of the components at x.
        """
        x64 = x.to(torch.float64)
        sigma = self._per_sample_sigma(sigma, x.shape[0])
        means, variances = self.noised_flow(sigma)
        responsibilities = torch.softmax(self._component_log_probs(x64, means, variances), dim=1)  # (B, M)
        scaled_residual = (x64[:, None, :] - means) / variances[..., None]  # (B, M, d)
        eps_mean = sigma[:, None, None] * scaled_residual
        data_mean = self.means[None] + ((1 - sigma[:, None]) * self.stds[None] ** 2)[..., None] * scaled_residual
        return (responsibilities[..., None] * (eps_mean - data_mean)).sum(1).to(x.dtype)

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        components = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        noise = torch.randn((num, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[components] + self.stds[components, None] * noise).float()

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the nearest component mean for each point (for mode-weight histograms)."""
        return torch.cdist(x.to(torch.float64), self.means).argmin(1)
