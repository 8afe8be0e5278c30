"""∇-DB without a prior (eq. 6–9); target ∝ R(x)^β.

The backward policy is the pretrained noising kernel over the sampler's stride,
P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I) with r = ᾱ(t_k)/ᾱ(t_{k+1}), and the flow score
uses the same forward-looking form as eq. 15: ∇ log F(x_k) = β γ_k ∇ log R(x̂_θ(x_k)) + g_φ(x_k).

  forward (eq. 7):   ‖∇_{x_{k+1}} log P_F − ∇_{x_{k+1}} log P_B − ∇ log F(x_{k+1})‖²
  reverse (eq. 9):   ‖∇_{x_k} log P_F − ∇_{x_k} log P_B + ∇ log F(x_k)‖²
  terminal (eq. 8):  ‖g_φ(x_K)‖²   (∇ log F(x_K) = β ∇ log R(x_K) exactly)

The reverse term is first order (trains g_φ only). ``reverse_target="expected"`` replaces the sampled
x_{k+1} in it by its mean under the policy (closed form here: P_B is linear-Gaussian).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TransitionBatch, batch_mean
from .residual_nabla_db import ResidualNablaDB


class NablaDB(ResidualNablaDB):
    """Shares g_φ, γ_k and the forward-looking score with residual ∇-DB; only the balance differs."""

    def noising_ratio(self, step: Tensor, like: Tensor) -> Tensor:
        abar = self.backend.schedule.alphas_cumprod.to(like.device)
        ratio = abar[self.kernel.timestep_of_state(step)] / abar[self.kernel.timestep_of_state(step + 1)]
        return ratio.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def loss(self, batch: TransitionBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, kernel, backend = self.config, self.kernel, self.backend
        x, x_next, step, cond = batch.state, batch.next_state, batch.step, batch.cond
        broadcast = (-1, *([1] * (x.dim() - 1)))
        next_index = step + 1
        is_last = (next_index == kernel.num_steps).reshape(broadcast)
        variance = kernel.variance_like(x, step)
        eps_coef = kernel.eps_coef.to(x)[step].reshape(variance.shape)
        ratio = self.noising_ratio(step, x)

        eps_policy = backend.eps(x, kernel.timestep_of_state(step), cond, finetuned=True)
        mean_policy = kernel.mean(x, eps_policy, step)

        # eq. 7: forward ∇-DB
        policy_score = -(x_next - mean_policy) / variance
        backward_score_next = ratio.sqrt() * (x - ratio.sqrt() * x_next) / (1 - ratio)
        g_next = torch.where(is_last, torch.zeros_like(x_next), self.flow_score(x_next, next_index, cond).detach())
        next_flow_score = self.forward_looking_score(x_next, next_index, cond, generator) + g_next
        forward_residual = policy_score - backward_score_next - next_flow_score
        forward_weight = variance**2 / eps_coef**2 if cfg.forward_weighting == "eps" else torch.ones_like(variance)
        forward_loss = batch_mean(forward_weight * forward_residual**2)

        # eq. 9: reverse ∇-DB (first order: the policy's own reverse score is detached; its mean is 0)
        target_next = mean_policy.detach() if cfg.reverse_target == "expected" else x_next
        backward_score_here = -(x - ratio.sqrt() * target_next) / (1 - ratio)
        if cfg.reverse_target == "expected":
            policy_reverse_score = torch.zeros_like(x)
        else:
            policy_reverse_score = kernel.reverse_score(
                x, x_next, step, lambda inp: backend.eps(inp, kernel.timestep_of_state(step), cond)
            )
        flow_here = self.forward_looking_score(x, step, cond, generator) + self.flow_score(x, step, cond)
        reverse_residual = policy_reverse_score - backward_score_here + flow_here
        reverse_weight = variance if cfg.reverse_weighting == "variance" else torch.ones_like(variance)
        reverse_loss = batch_mean(reverse_weight * reverse_residual**2)

        return self.total_loss(forward_loss, reverse_loss, batch, eps_policy)
