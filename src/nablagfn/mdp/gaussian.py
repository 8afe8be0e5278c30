"""The Gaussian transition kernel shared by every sampler of this package.

Every sampler step here has the form (diffusion time t → t_next, i.e. the
paper's transition x_k → x_{k+1}, eq. 1)

    x_next ~ N(μ, σ² I),   μ = a · x + b · ε(x),

with a, b, σ depending on the step only. A sampler (DDIM, SDE-DPM-Solver++)
is a table of (a, b, σ) per step; this module turns it into means, log-probs
and scores.

Conventions (applied everywhere in the package):
* log-probabilities are **summed** over all non-batch dimensions (true log
  densities); losses built from scores use element-wise means instead.
* the last step goes to ᾱ at t = 0 rather than to ᾱ = 1, so its σ is tiny but
  non-zero and the last transition keeps a finite log-probability (as the
  reference implementation does).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .shapes import per_sample


def _per_sample(values: Tensor, step: Tensor, like: Tensor) -> Tensor:
    """Gather ``values[step]`` and shape it to broadcast against ``like`` (B, ...)."""
    out = values.to(like.device)[step].to(like.dtype)
    return per_sample(out, like)


class GaussianKernel:
    """A sampler as a table of Gaussian steps μ = a·x + b·ε, std σ.

    Subclasses fill ``state_timesteps`` (K + 1 diffusion timesteps, the last one 0), the marginal of each state,
    x_k = ``state_signal[k]``·x₀ + ``state_noise[k]``·ε (float64, K + 1), and the per-step tables ``x_coef``,
    ``eps_coef``, ``std`` (each of length K). Step ``i`` goes from the state at ``state_timesteps[i]`` to
    ``state_timesteps[i+1]``. ``parameterization`` says what the model output in the step mean is (``eps``: ε;
    ``flow``: the velocity, ``mdp.flow``).
    """

    name: str
    parameterization: str = "eps"
    state_timesteps: Tensor  # long (eps) or float (flow), (K + 1,)
    state_signal: Tensor  # float64, (K + 1,)
    state_noise: Tensor
    x_coef: Tensor  # float64, (K,)
    eps_coef: Tensor
    std: Tensor

    @property
    def num_steps(self) -> int:
        return self.x_coef.shape[0]

    # -- Gaussian step -----------------------------------------------------
    def mean(self, x: Tensor, eps: Tensor, step: Tensor) -> Tensor:
        """μ(x) = a·x + b·ε(x) for each sample's step index."""
        return _per_sample(self.x_coef, step, x) * x + _per_sample(self.eps_coef, step, x) * eps

    def std_like(self, x: Tensor, step: Tensor) -> Tensor:
        return _per_sample(self.std, step, x)

    def variance_like(self, x: Tensor, step: Tensor) -> Tensor:
        return self.std_like(x, step) ** 2

    def step(
        self, x: Tensor, eps: Tensor, step: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw x_next ~ N(μ, σ²); returns (x_next, μ)."""
        mean = self.mean(x, eps, step)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return mean + self.std_like(x, step) * noise, mean

    def log_prob(self, x_next: Tensor, mean: Tensor, step: Tensor) -> Tensor:
        """log N(x_next; μ, σ² I), summed over non-batch dimensions → shape (B,)."""
        std = self.std_like(x_next, step)
        z = (x_next - mean) / std
        elementwise = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return elementwise.flatten(1).sum(1)

    def forward_score(self, x_next: Tensor, mean: Tensor, step: Tensor) -> Tensor:
        """∇_{x_next} log P(x_next | x) = −(x_next − μ)/σ² (gradient reaches θ through μ)."""
        return -(x_next - mean) / self.variance_like(x_next, step)

    def reverse_score(
        self,
        x: Tensor,
        x_next: Tensor,
        step: Tensor,
        eps_fn: Callable[[Tensor], Tensor],
        create_graph: bool = False,
    ) -> Tensor:
        """∇_x log P(x_next | x), by autograd through ``eps_fn`` (the model) at fixed x_next.

        With ``create_graph`` the result stays differentiable w.r.t. the model's
        parameters (second-order terms); otherwise it is detached.
        """
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            mean = self.mean(x_in, eps_fn(x_in), step)
            log_prob = self.log_prob(x_next.detach(), mean, step)
            (score,) = torch.autograd.grad(log_prob.sum(), x_in, create_graph=create_graph)
        return score

    def mean_vjp(
        self,
        x: Tensor,
        vector: Tensor,
        step: Tensor,
        eps_fn: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """J_μ(x)ᵀ v: the vector–Jacobian product of the step mean w.r.t. the state (detached)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            mean = self.mean(x_in, eps_fn(x_in), step)
            (product,) = torch.autograd.grad(mean, x_in, grad_outputs=vector.detach())
        return product

    def timestep_of_state(self, state_index: Tensor) -> Tensor:
        """Diffusion timestep of state k (k = 0 is noise, k = K is the final sample)."""
        return self.state_timesteps.to(state_index.device)[state_index]
