"""Residual ∇-DB with the forward-looking flow score (eq. 15–19); target ∝ R(x)^β · p_pretrained(x)^η.

Per transition x_k → x_{k+1} of the finetuned policy P_F = N(μ_θ, σ²) and the
pretrained policy P# = N(μ#, σ²):

  residual policy score, forward (eq. 11):  ∇_{x_{k+1}} log P̃ = [−(x_{k+1} − μ_θ) + η (x_{k+1} − μ#)] / σ²
  residual flow score (eq. 15):             ∇ log F̃(x_k) = β γ_k ∇_{x_k} log R(x̂_θ(x_k)) + g_φ(x_k)
  forward loss (eq. 16):   ‖∇_{x_{k+1}} log P̃ − ∇ log F̃(x_{k+1})‖²      (at x_K: ∇ log F̃ = β ∇ log R exactly)
  reverse loss (eq. 17):   ‖∇_{x_k} log P̃ + ∇ log F̃(x_k)‖²
  terminal loss (eq. 18):  ‖g_φ(x_K)‖²
  output regularisation:   λ ‖ε_θ(x_k) − ε_behaviour(x_k)‖²

Choices beyond the paper (each switchable; the reasons and figures are in docs/methods.md):
* ``reverse_target``: the estimator of eq. 17's target. ``sampled`` is the paper's; ``expected`` is its
  conditional expectation over x_{k+1} ~ P_F(·|x_k), −η J_{μ#}(x_k)ᵀ(μ_θ − μ#)/σ²; ``propagated``
  (default) substitutes eq. 16's optimum into it, giving −J_{μ#}(x_k)ᵀ ∇ log F̃(x_{k+1}).
* ``lookahead``: x̂ in eq. 15 from the pretrained model (default) or the finetuned one (paper).
* ``forward_weighting="eps"``: the forward loss × σ⁴/b² (b the ε coefficient of the step mean), i.e.
  measured in ε units, so the low-noise steps do not dominate; ``reverse_weighting="variance"``: × σ².
* ``detach_flow_in_forward``: g_φ learns from the reverse and terminal losses only.
* the reverse term is first order (it trains g_φ only) unless ``second_order``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Method, TransitionBatch, batch_mean


class ResidualNablaDB(Method):
    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        self.networks["flow_score"] = backend.make_flow_score_net().to(backend.device)  # g_φ, zero at start

    @property
    def flow_score_net(self) -> nn.Module:
        return self.networks["flow_score"]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"policy": self.backend.trainable_parameters(), "flow": list(self.flow_score_net.parameters())}

    def gamma(self, state_index: Tensor) -> Tensor:
        """Forward-looking scale γ_k (γ = 1 at the final state)."""
        abar = self.backend.schedule.alphas_cumprod.to(state_index.device)[self.kernel.timestep_of_state(state_index)]
        gamma = {"alpha_bar": abar, "sqrt_alpha_bar": abar.sqrt(), "one": torch.ones_like(abar)}[self.config.gamma]
        return torch.where(state_index == self.kernel.num_steps, torch.ones_like(gamma), gamma)

    def forward_looking_score(self, x: Tensor, state_index: Tensor, cond: Tensor, generator) -> Tensor:
        """β γ_k ∇ log R(x̂(x_k)), the look-ahead part of eq. 15 (detached; x̂ per ``method.lookahead``)."""
        grad = self.predicted_log_reward_grad(x, state_index, cond, generator)
        scale = self.config.beta * self.gamma(state_index).to(x.dtype)
        return scale.reshape(-1, *([1] * (x.dim() - 1))) * grad

    def flow_score(self, x: Tensor, state_index: Tensor, cond: Tensor) -> Tensor:
        """g_φ(x_k), the learned part of eq. 15; eq. 18 drives it to zero at final states, and the forward
        loss of the last transition uses β ∇ log R(x_K) alone."""
        return self.flow_score_net(x, self.kernel.timestep_of_state(state_index), cond)

    def loss(self, batch: TransitionBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, kernel, backend = self.config, self.kernel, self.backend
        x, x_next, step, cond = batch.state, batch.next_state, batch.step, batch.cond
        eta = cfg.prior_strength
        timestep = kernel.timestep_of_state(step)
        next_index = step + 1
        is_last = next_index == kernel.num_steps
        variance = kernel.variance_like(x, step)
        eps_coef = kernel.eps_coef.to(x)[step].reshape(variance.shape)

        eps_policy = backend.eps(x, timestep, cond, finetuned=True)
        with torch.no_grad():
            eps_pretrained = backend.eps(x, timestep, cond, finetuned=False)
        mean_policy = kernel.mean(x, eps_policy, step)
        mean_pretrained = kernel.mean(x, eps_pretrained, step)

        # eq. 16: forward residual ∇-DB
        residual_policy_score = (-(x_next - mean_policy) + eta * (x_next - mean_pretrained)) / variance
        next_flow_score = self.forward_looking_score(x_next, next_index, cond, generator)
        g_next = self.flow_score(x_next, next_index, cond)
        if cfg.detach_flow_in_forward:
            g_next = g_next.detach()
        g_next = torch.where(is_last.reshape(-1, *([1] * (x.dim() - 1))), torch.zeros_like(g_next), g_next)
        forward_residual = residual_policy_score - (next_flow_score + g_next)
        forward_weight = variance**2 / eps_coef**2 if cfg.forward_weighting == "eps" else torch.ones_like(variance)
        forward_loss = batch_mean(forward_weight * forward_residual**2)

        # eq. 17: reverse residual ∇-DB
        reverse_policy_score = self.reverse_residual_policy_score(
            x, x_next, step, cond, mean_policy, mean_pretrained, (next_flow_score + g_next).detach()
        )
        flow_here = self.forward_looking_score(x, step, cond, generator) + self.flow_score(x, step, cond)
        reverse_residual = reverse_policy_score + flow_here
        reverse_weight = variance if cfg.reverse_weighting == "variance" else torch.ones_like(variance)
        reverse_loss = batch_mean(reverse_weight * reverse_residual**2)

        return self.total_loss(forward_loss, reverse_loss, batch, eps_policy)

    def total_loss(
        self, forward_loss: Tensor, reverse_loss: Tensor, batch: TransitionBatch, eps_policy: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """eq. 19: w_F·forward + w_B·reverse + terminal loss (eq. 18, on each trajectory's final state)
        + λ‖ε_θ − ε_behaviour‖² (output regularisation against the ε stored at sampling time)."""
        cfg = self.config
        final_index = torch.full_like(batch.final_cond, self.kernel.num_steps)
        terminal_loss = batch_mean(self.flow_score(batch.final_state, final_index, batch.final_cond) ** 2)
        output_reg = batch_mean((eps_policy - batch.behaviour_eps) ** 2)
        loss = (
            cfg.weight_forward * forward_loss.mean()
            + cfg.weight_reverse * reverse_loss.mean()
            + cfg.weight_terminal * terminal_loss.mean()
            + cfg.output_reg * output_reg.mean()
        )
        metrics = {
            "loss/forward": forward_loss.mean().item(),
            "loss/reverse": reverse_loss.mean().item(),
            "loss/terminal": terminal_loss.mean().item(),
            "loss/output_reg": output_reg.mean().item(),
        }
        return loss, metrics

    def reverse_residual_policy_score(
        self,
        x: Tensor,
        x_next: Tensor,
        step: Tensor,
        cond: Tensor,
        mean_policy: Tensor,
        mean_pretrained: Tensor,
        next_flow_score: Tensor,
    ) -> Tensor:
        """∇_{x_k} [log P_F(x_{k+1}|x_k) − η log P#(x_{k+1}|x_k)] as ``method.reverse_target`` estimates it:
        ``sampled`` at the recorded x_{k+1}; ``expected`` over x_{k+1} ~ P_F; ``propagated`` with eq. 16's
        optimum η(μ_θ − μ#)/σ² = ∇ log F̃(x_{k+1}) substituted into the expectation."""
        kernel, backend, eta = self.kernel, self.backend, self.config.prior_strength
        timestep = kernel.timestep_of_state(step)

        def pretrained_eps(inp: Tensor) -> Tensor:
            return backend.eps(inp, timestep, cond, finetuned=False)

        if self.config.reverse_target == "propagated":
            return -kernel.mean_vjp(x, next_flow_score, step, pretrained_eps)
        if self.config.reverse_target == "expected":
            # E_{x_{k+1} ~ P_F}[J_θᵀ(x_{k+1} − μ_θ)/σ²] = 0 and E[J#ᵀ(x_{k+1} − μ#)/σ²] = J#ᵀ(μ_θ − μ#)/σ²
            vector = eta * (mean_policy - mean_pretrained).detach() / kernel.variance_like(x, step)
            return -kernel.mean_vjp(x, vector, step, pretrained_eps)

        def policy_eps(inp: Tensor) -> Tensor:
            return backend.eps(inp, timestep, cond, finetuned=True)

        policy_score = kernel.reverse_score(x, x_next, step, policy_eps, create_graph=self.config.second_order)
        pretrained_score = kernel.reverse_score(x, x_next, step, pretrained_eps)
        return policy_score - eta * pretrained_score
