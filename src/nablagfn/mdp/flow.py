"""Flow-matching samplers as Gaussian MDP kernels: Flow-GRPO's SDE, its "CPS" variant, and the flow noising kernel.

Notation (as in diffusers' ``FlowMatchEulerDiscreteScheduler``; σ here is the flow time, *not* a kernel std):

==================  ===========================================================================================
x₀                  data (σ = 0)
ε                   Gaussian noise N(0, I) (σ = 1)
x_σ                 the linear interpolant (1 − σ) x₀ + σ ε
v(x, σ)             the model output: the velocity, trained towards ε − x₀ (exact: E[ε − x₀ | x_σ = x])
σ_k                 ``state_sigmas[k]``, k = 0 … K: diffusers' sigmas, 1 = σ_0 > σ_1 > … > σ_{K-1} > σ_K = 0
t_k                 ``state_timesteps[k]``: what the model takes, diffusers' timesteps σ_k · num_train_timesteps
                    (float), with t_K = 0 appended
dt                  σ_{k+1} − σ_k < 0 (step k goes from state k to state k + 1, i.e. from noise towards data)
a                   ``noise_level`` (Flow-GRPO's default 0.7)
==================  ===========================================================================================

The grid (sigmas and timesteps, including the ``shift`` σ ↦ shift·σ/(1 + (shift − 1)·σ); SD3 uses 3) is taken from
diffusers' scheduler after ``set_timesteps(num_steps)``, not re-derived. A model with dynamic shifting (FLUX) gives
``mu`` instead: the grid is then FluxPipeline's, ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=mu)`` (the
exponential time shift, i.e. the shift above with shift = e^μ, on that grid).

**Flow-SDE** (Flow-GRPO; same marginals as the probability-flow ODE dx = v dσ, first-order Euler–Maruyama)::

    g    = a · √(σ / (1 − σ'))       σ' = σ, except σ' = σ_1 (the next grid value) where σ = 1
    μ    = x · (1 + g² dt / (2σ)) + v · (1 + g² (1 − σ) / (2σ)) · dt
    x'   = μ + g · √(−dt) · z

(the drift is v − (g²/2)·∇log p_σ with the score written through the velocity, ∇log p_σ(x) = −(x + (1 − σ) v)/σ).
With a = 0 it is the Euler ODE step x' = x + v dt; its steps are then deterministic (sampling only, no log-probs).

**Flow-DDPM** (the flow analogue of the paper's DDPM sampler): the exact posterior of the interpolant's own Markov
noising process, q(x_σ' | x_σ, x₀ = x̂₀). That process goes from σ' to σ > σ' by x_σ = c x_σ' + √w z with
c = (1 − σ)/(1 − σ'), w = σ² − c² σ'², and its posterior is::

    std² = σ'² w / σ²,      μ = (1 − σ') x̂₀ + √(σ'² − std²) ε̂,      x̂₀ = x − σ v,  ε̂ = x + (1 − σ) v

(DDIM with η = 1 in the interpolant's coefficients). Its pretrained chain is the time reversal of the noising
process, so its flow E[R(x_K) | x_k] is the noised-data flow E[R(x₀) | x_σ] — what residual ∇-DB's default policy
target and Adjoint Matching assume (for ε-models the DDPM sampler has this property; the Flow-SDE has it only in the
continuous limit at a = √2). The last step (σ' = 0) would be deterministic; it keeps the Flow-SDE's tiny std at
a = √2, σ_{K−1}·√(2/(1 − σ_{K−1})), so it has a log-probability.

**Flow-CPS** (coefficients-preserving sampling, Flow-GRPO's later variant; a DDIM-like step)::

    s    = σ_next · sin(aπ/2)
    x̂₀   = x − σ v,      x̂₁ = x + (1 − σ) v
    μ    = (1 − σ_next) · x̂₀ + √(σ_next² − s²) · x̂₁
    x'   = μ + s · z

Both are linear in x and v, so each is a table of per-step coefficients μ = a_k·x + b_k·v and std σ_k of
:class:`GaussianKernel`, whose means, log-probs, scores and vector–Jacobian products apply unchanged. **For these
kernels the model-output slot (``eps`` in :class:`GaussianKernel`'s method signatures, ``eps_coef``) holds the
velocity v, not ε.**

The last Flow-SDE step (σ_{K-1} → 0) keeps a tiny but non-zero std g·√σ_{K-1} (g uses the *current* σ), like the
package's ε-samplers. The last Flow-CPS step has s = σ_K · sin(aπ/2) = 0: it is deterministic (μ = x̂₀) and has no
finite log-probability; :meth:`FlowMatchKernel.log_prob` raises on steps with zero std instead of returning NaN/∞.

The states' marginals are x_k = (1 − σ_k) x₀ + σ_k ε (``state_signal``, ``state_noise``), from which
:class:`~nablagfn.mdp.noising.NoisingKernel` builds the flow's noising kernel P_B(x_k | x_{k+1}) =
N((1 − σ_k)/(1 − σ_{k+1}) · x_{k+1}, (σ_k² − c_k² σ_{k+1}²) I).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .gaussian import GaussianKernel


class FlowMatchKernel(GaussianKernel):
    """The grid of a flow-matching sampler: diffusers' ``FlowMatchEulerDiscreteScheduler`` sigmas and timesteps.

    Subclasses fill the per-step tables ``x_coef`` (a), ``eps_coef`` (b, the coefficient of the *velocity*) and
    ``std`` from ``state_sigmas``.
    """

    parameterization = "flow"
    state_sigmas: Tensor  # float64, (K + 1,), state_sigmas[0] = 1, state_sigmas[-1] = 0
    state_timesteps: Tensor  # float32, (K + 1,), diffusers' timesteps (σ · num_train_timesteps) and a final 0

    def __init__(self, num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000, mu: float | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"sampler.steps must be ≥ 1, got {num_steps}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if mu is None:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
            scheduler.set_timesteps(num_steps)
        else:  # dynamic shifting, as FluxPipeline sets its scheduler
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                        use_dynamic_shifting=True)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        sigmas = scheduler.sigmas.to(torch.float64)
        if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0 or not bool((sigmas.diff() < 0).all()):
            raise ValueError(f"unexpected sigma grid from diffusers for {num_steps} steps: {sigmas.tolist()}")
        self.shift, self.mu = float(shift), mu
        self.num_train_timesteps = num_train_timesteps
        self.state_sigmas = sigmas
        self.state_signal, self.state_noise = 1 - sigmas, sigmas
        self.state_timesteps = torch.cat([scheduler.timesteps, torch.zeros(1, dtype=scheduler.timesteps.dtype)])

    @property
    def sigma(self) -> Tensor:
        """σ at the start of each step, (K,)."""
        return self.state_sigmas[:-1]

    @property
    def sigma_next(self) -> Tensor:
        """σ at the end of each step, (K,)."""
        return self.state_sigmas[1:]

    def sigma_of_state(self, state_index: Tensor) -> Tensor:
        """σ of state k (float64; k = 0 is noise at σ = 1, k = K the sample at σ = 0)."""
        return self.state_sigmas.to(state_index.device)[state_index]

    # -- deterministic steps have no density ------------------------------------------------------------------
    def _check_finite_std(self, step: Tensor) -> None:
        if bool((self.std == 0).any()) and bool((self.std.to(step.device)[step] == 0).any()):
            raise ValueError(
                f"{self.name}: some of these steps are deterministic (std 0), so they have no log-probability"
            )

    def log_prob(self, x_next: Tensor, mean: Tensor, step: Tensor) -> Tensor:
        self._check_finite_std(step)
        return super().log_prob(x_next, mean, step)

    def forward_score(self, x_next: Tensor, mean: Tensor, step: Tensor) -> Tensor:
        self._check_finite_std(step)
        return super().forward_score(x_next, mean, step)


class FlowSDEKernel(FlowMatchKernel):
    """Flow-GRPO's SDE step (see the module docstring); ``noise_level`` a ≥ 0, a = 0 is the Euler ODE (sampling only).

    ``diffusion`` holds g per step (Flow-GRPO's ``std_dev_t``); ``std`` = g·√(−dt) is the step's Gaussian std.
    """

    name = "flow_sde"

    def __init__(
        self, num_steps: int = 10, noise_level: float = 0.7, shift: float = 1.0, num_train_timesteps: int = 1000,
        mu: float | None = None,
    ):
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be ≥ 0, got {noise_level}")
        super().__init__(num_steps, shift, num_train_timesteps, mu)
        self.noise_level = float(noise_level)
        sigma, sigma_next = self.sigma, self.sigma_next
        dt = sigma_next - sigma
        sigma_denominator = torch.where(sigma == 1, self.state_sigmas[1], sigma)
        diffusion = noise_level * (sigma / (1 - sigma_denominator)).sqrt()
        self.diffusion = diffusion
        self.x_coef = 1 + diffusion**2 * dt / (2 * sigma)
        self.eps_coef = (1 + diffusion**2 * (1 - sigma) / (2 * sigma)) * dt
        self.std = diffusion * (-dt).sqrt()


class FlowDDPMKernel(FlowMatchKernel):
    """The interpolant's posterior step (see the module docstring): memoryless, the flow analogue of DDPM."""

    name = "flow_ddpm"

    def __init__(self, num_steps: int = 50, shift: float = 1.0, num_train_timesteps: int = 1000,
                 mu: float | None = None):
        super().__init__(num_steps, shift, num_train_timesteps, mu)
        sigma, sigma_next = self.sigma, self.sigma_next
        coef = (1 - sigma) / (1 - sigma_next)
        variance = sigma_next**2 * (sigma**2 - coef**2 * sigma_next**2) / sigma**2
        last = sigma_next == 0
        variance = torch.where(last, 2 * sigma**2 / (1 - sigma), variance)
        noise_coef = (sigma_next**2 - variance).clamp(min=0).sqrt()  # of ε̂; 0 at the last step
        # μ = (1 − σ')(x − σ v) + n (x + (1 − σ) v)
        self.x_coef = (1 - sigma_next) + noise_coef
        self.eps_coef = -sigma * (1 - sigma_next) + noise_coef * (1 - sigma)
        self.std = variance.sqrt()


class FlowCPSKernel(FlowMatchKernel):
    """Coefficients-preserving sampling (see the module docstring); ``noise_level`` a ∈ [0, 1].

    The last step (σ_next = 0) is deterministic, so it has no log-probability.
    """

    name = "flow_cps"

    def __init__(
        self, num_steps: int = 10, noise_level: float = 0.7, shift: float = 1.0, num_train_timesteps: int = 1000,
        mu: float | None = None,
    ):
        if not 0 <= noise_level <= 1:
            raise ValueError(f"noise_level must be in [0, 1], got {noise_level}")
        super().__init__(num_steps, shift, num_train_timesteps, mu)
        self.noise_level = float(noise_level)
        sigma, sigma_next = self.sigma, self.sigma_next
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        noise_coef = (sigma_next**2 - std**2).clamp(min=0).sqrt()  # coefficient of x̂₁
        # μ = (1 − σ_n)(x − σ v) + c (x + (1 − σ) v)
        self.x_coef = (1 - sigma_next) + noise_coef
        self.eps_coef = -sigma * (1 - sigma_next) + noise_coef * (1 - sigma)
        self.std = std
