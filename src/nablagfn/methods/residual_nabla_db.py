"""Residual ∇-DB with the forward-looking flow score (eq. 15–19); target ∝ R(x)^β · p_pretrained(x)^η.

Per transition x_k → x_{k+1} of the finetuned policy P_F = N(μ_θ, σ²), the pretrained policy
P# = N(μ#, σ²) and the noising kernel over the sampler's stride P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I),
r = ᾱ(t_k)/ᾱ(t_{k+1}), the residual policy is log P̃ = log P_F − η log P# − (1 − η) log P_B:

  residual policy score, forward (eq. 11):  ∇_{x_{k+1}} log P̃ = [−(x_{k+1} − μ_θ) + η (x_{k+1} − μ#)] / σ²
                                                               − (1 − η) √r (x_k − √r x_{k+1}) / (1 − r)
  residual flow score (eq. 15):             ∇ log F̃(x_k) = β γ_k ∇_{x_k} log R(x̂_θ(x_k)) + g_φ(x_k)
  forward loss (eq. 16):   ‖∇_{x_{k+1}} log P̃ − ∇ log F̃(x_{k+1})‖²      (at x_K: ∇ log F̃ = β ∇ log R exactly)
  reverse loss (eq. 17):   ‖∇_{x_k} log P̃ + ∇ log F̃(x_k)‖²
  terminal loss (eq. 18):  ‖g_φ(x_K)‖²
  output regularisation:   λ ‖ε_θ(x_k) − ε_behaviour(x_k)‖²

The P_B term vanishes at η = 1, the paper's setting. Eq. 11 drops it for every η ("both models share
P_B"), but dividing the finetuned chain's balance by the η-th power of the pretrained one's leaves P_B^(1−η):
without it the fixed point is not R^β·p^η for η ≠ 1 (on the ring, η = 0.5 over-concentrated: mean log R
−0.64 against the target's −1.16). At η = 0 this is ∇-DB (eq. 7–9, ``NablaDB``).

Choices beyond the paper (each switchable; the reasons and figures are in docs/methods.md):
* ``policy_target``: what the policy learns from. ``detailed_balance`` is eq. 16; ``tilted_score`` (default) makes
  the finetuned ε the tilted model's with the same learned flow score at the current state,
  ‖ε_θ(x_k) − η ε#(x_k) + √(1 − ᾱ_k) ∇ log F̃(x_k)‖² (∇ log q_t = η ∇ log p_t + ∇ log F̃_t for the target q noised
  to t). Eq. 16's optimum is each step's mean-matched Gaussian approximation of the optimal kernel, which stops
  short of the target at 50 steps even with the exact flow score; this one is the tilted process discretised as
  the pretrained sampler discretises p's.
* ``reverse_target``: the estimator of eq. 17's target. ``sampled`` is the paper's; ``expected`` is its
  conditional expectation over x_{k+1} ~ P_F(·|x_k), −η J_{μ#}(x_k)ᵀ(μ_θ − μ#)/σ²; ``propagated``
  (default) substitutes eq. 16's optimum into it, giving −J_{μ#}(x_k)ᵀ ∇ log F̃(x_{k+1}) at η = 1.
* ``lookahead``: x̂ in eq. 15 from the pretrained model (default) or the finetuned one (paper).
* ``forward_weighting="eps"`` (eq. 16 only): the forward loss × σ⁴/b² (b the ε coefficient of the step mean), i.e.
  measured in ε units, so the low-noise steps do not dominate; ``reverse_weighting="variance"``: × σ².
* ``detach_flow_in_forward``: g_φ learns from the reverse and terminal losses only.
* the reverse term is first order (it trains g_φ only) unless ``second_order``.

Ground truth: where the run knows the exact flow score (``exact_flow_score``: Gaussian mixtures with a Gaussian
or linear reward, η = 1), each loss logs the relative error of the learned ∇ log F̃(x_k) and of the flow score
the policy implies against it per band of steps (``flow_error/kLO-HI``, ``policy_error/kLO-HI``), and
``flow_oracle`` trains the policy against the exact flow instead of the learned one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..mdp.flow import FlowMatchKernel
from ..mdp.memoryless import memoryless_problem
from ..mdp.rollout import Trajectories
from ..mdp.shapes import per_sample
from .base import (
    TRANSITIONS_PER_BACKWARD,
    Method,
    RewardSmoothingConfig,
    SubsampleConfig,
    TransitionBatch,
    batch_mean,
)


class _GradientFlowConfig(StrictConfig):
    """Keys shared by the ∇-DB family: look-ahead flow score (eq. 15), loss weights, subsampling, smoothing."""

    beta: float = Field(0.5, gt=0)
    gamma: Literal["alpha_bar", "sqrt_alpha_bar", "one"] = Field(
        "sqrt_alpha_bar", description="look-ahead scale γ_k: α_k², α_k or 1 (α_k the state's signal coefficient); "
        "a run config on a flow model makes it `one` unless given"
    )
    lookahead: Literal["pretrained", "finetuned"] = "pretrained"
    weight_forward: float = Field(1.0, ge=0)
    weight_reverse: float = Field(1.0, ge=0)
    weight_terminal: float = Field(1.0, ge=0)
    output_reg: float = Field(0.0, ge=0)
    subsample: SubsampleConfig = Field(default_factory=SubsampleConfig)
    reward_smoothing: RewardSmoothingConfig = Field(default_factory=RewardSmoothingConfig)
    transitions_per_backward: int | None = TRANSITIONS_PER_BACKWARD


class ResidualNablaDBConfig(_GradientFlowConfig):
    """Residual ∇-DB with forward-looking flow (eq. 16–19). See docs/methods.md."""

    name: Literal["residual_nabla_db"] = "residual_nabla_db"
    prior_strength: float = Field(1.0, ge=0, description="η: target ∝ R^β · p_pretrained^η")
    forward_weighting: Literal["eps", "score"] = "eps"
    reverse_weighting: Literal["score", "variance"] = "score"
    reverse_target: Literal["propagated", "expected", "sampled"] = "propagated"
    detach_flow_in_forward: bool = True
    second_order: bool = False
    policy_target: Literal["tilted_score", "detailed_balance"] = Field(
        "tilted_score", description="tilted_score: ε_θ(x_k) → η ε#(x_k) − √(1 − ᾱ_k) ∇ log F̃(x_k); detailed_balance: "
        "eq. 16 (the paper)"
    )
    flow_oracle: bool = Field(
        False, description="diagnostic: the forward loss uses the exact flow score ∇ log F̃ instead of the learned "
        "one (model.kind=gmm with a gaussian or linear reward and prior_strength 1)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ResidualNablaDBConfig":
        if self.second_order and self.reverse_target != "sampled":
            raise ValueError(
                "method.second_order: needs method.reverse_target=sampled (the other targets have no policy term)"
            )
        return self


#: bands of sampler steps over which the errors against the exact flow score are logged
ERROR_BANDS = 5


class PretrainedEps:
    """ε#(x_k), evaluated once per loss, and what the loss reads from it: its ``value``, the pretrained step mean
    μ#(x_k), and, through the graph kept from a leaf copy of x_k (``with_graph``), the vector–Jacobian product
    J_{μ#}(x_k)ᵀ v and the score ∇_{x_k} log P#(x_{k+1} | x_k), without evaluating ε# again."""

    def __init__(self, backend, kernel, x: Tensor, step: Tensor, cond: Tensor, with_graph: bool):
        self.kernel, self.step = kernel, step
        timestep = kernel.timestep_of_state(step)
        self.leaf: Tensor | None = None  # x_k, detached and requiring grad, when the graph is kept
        self.graph: Tensor | None = None  # ε#(leaf) with its graph
        if with_graph:
            with torch.enable_grad():
                self.leaf = x.detach().requires_grad_(True)
                self.graph = backend.eps(self.leaf, timestep, cond, finetuned=False)
            self.value = self.graph.detach()
        else:
            with torch.no_grad():
                self.value = backend.eps(x, timestep, cond, finetuned=False)
        self.mean = kernel.mean(x, self.value, step)

    @property
    def leaf_and_graph(self) -> tuple[Tensor, Tensor] | None:
        """(x_k leaf, ε#) for ``predicted_log_reward_grad``'s pretrained look-ahead (which frees the graph), or None."""
        return None if self.graph is None else (self.leaf, self.graph)

    def _gradient(self, output: Tensor, grad_output: Tensor | None = None) -> Tensor:
        if self.graph is None:
            raise RuntimeError("ε#(x_k) was evaluated without its graph; nothing can be differentiated through it")
        (gradient,) = torch.autograd.grad(output, self.leaf, grad_outputs=grad_output, retain_graph=True)
        return gradient

    def mean_vjp(self, vector: Tensor) -> Tensor:
        """J_{μ#}(x_k)ᵀ v (detached)."""
        with torch.enable_grad():
            return self._gradient(self.kernel.mean(self.leaf, self.graph, self.step), vector.detach())

    def reverse_score(self, x_next: Tensor) -> Tensor:
        """∇_{x_k} log P#(x_{k+1} | x_k) at fixed x_{k+1} (detached)."""
        with torch.enable_grad():
            mean = self.kernel.mean(self.leaf, self.graph, self.step)
            return self._gradient(self.kernel.log_prob(x_next.detach(), mean, self.step).sum())


class ResidualNablaDB(Method):
    config_class = ResidualNablaDBConfig

    #: ∇ log F̃ in closed form, ``(x, timestep) → score`` (``rewards.vector.ExactFlowScore``), set by the run when
    #: it knows it; None otherwise
    exact_flow_score: Callable[[Tensor, Tensor], Tensor] | None = None

    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        if getattr(config, "policy_target", None) == "tilted_score" and isinstance(kernel, FlowMatchKernel):
            problem = memoryless_problem(kernel)
            if problem is not None:
                raise ValueError(
                    f"method.policy_target: tilted_score needs a memoryless sampler on a flow model ({problem}); "
                    "set sampler.kind=flow_ddpm, or method.policy_target=detailed_balance for this sampler"
                )
        self.networks["flow_score"] = backend.make_flow_score_net().to(backend.device)  # g_φ, zero at start

    @property
    def prior_strength(self) -> float:
        """η of the target R^β · p_pretrained^η."""
        return self.config.prior_strength

    @property
    def detach_flow_in_forward(self) -> bool:
        return self.config.detach_flow_in_forward

    @property
    def second_order(self) -> bool:
        return self.config.second_order

    @property
    def flow_score_net(self) -> nn.Module:
        return self.networks["flow_score"]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"policy": self.backend.trainable_parameters(), "flow": list(self.flow_score_net.parameters())}

    def gamma(self, state_index: Tensor) -> Tensor:
        """Forward-looking scale γ_k (γ = 1 at the final state): α_k² (``alpha_bar``), α_k (``sqrt_alpha_bar``) or 1,
        α_k the signal coefficient of state k (√ᾱ for a diffusion model, 1 − σ for a flow model)."""
        signal = self.kernel.state_signal.to(state_index.device)[state_index]
        gamma = {"alpha_bar": signal**2, "sqrt_alpha_bar": signal, "one": torch.ones_like(signal)}[self.config.gamma]
        return torch.where(state_index == self.kernel.num_steps, torch.ones_like(gamma), gamma)

    def forward_looking_score(
        self, x: Tensor, state_index: Tensor, cond: Tensor, generator, pretrained: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """β γ_k ∇ log R(x̂(x_k)), the look-ahead part of eq. 15 (detached; x̂ per ``method.lookahead``;
        ``pretrained``: ε# at x_k already evaluated with its graph, as ``predicted_log_reward_grad`` takes it)."""
        grad = self.predicted_log_reward_grad(x, state_index, cond, generator, pretrained)
        scale = self.config.beta * self.gamma(state_index).to(x.dtype)
        return per_sample(scale, x) * grad

    def pretrained_eps(self, x: Tensor, step: Tensor, cond: Tensor) -> PretrainedEps:
        """ε#(x_k), with its graph when the loss differentiates it (``differentiates_pretrained_eps``)."""
        return PretrainedEps(self.backend, self.kernel, x, step, cond, self.differentiates_pretrained_eps())

    def differentiates_pretrained_eps(self) -> bool:
        """Whether the loss differentiates ε# at x_k: the reverse target (``propagated``; ``expected`` and
        ``sampled`` for η ≠ 0) or the ``pretrained`` look-ahead x̂#(x_k)."""
        cfg = self.config
        return cfg.reverse_target == "propagated" or self.prior_strength != 0 or cfg.lookahead == "pretrained"

    def flow_score(self, x: Tensor, state_index: Tensor, cond: Tensor) -> Tensor:
        """g_φ(x_k), the learned part of eq. 15; eq. 18 drives it to zero at final states, and the forward
        loss of the last transition uses β ∇ log R(x_K) alone."""
        return self.flow_score_net(x, self.kernel.timestep_of_state(state_index), cond)

    def loss_pieces(self, trajectories: Trajectories,
                    generator: torch.Generator) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """Eq. 19 over pieces of ``transitions_per_backward`` transitions (each piece's terminal loss over the
        minibatch's final states, weighted by its share). With pieces the ``flow_error``/``policy_error``
        diagnostics, ratios over bands of steps that pieces cannot add up, are not logged."""
        size = self.config.transitions_per_backward
        for loss, metrics in self.transition_loss_pieces(trajectories, generator, size):
            yield loss, metrics if size is None else {
                key: value for key, value in metrics.items() if not key.startswith(("flow_error/", "policy_error/"))
            }

    def loss(self, batch: TransitionBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, kernel, backend = self.config, self.kernel, self.backend
        x, x_next, step, cond = batch.state, batch.next_state, batch.step, batch.cond
        eta = self.prior_strength
        timestep = kernel.timestep_of_state(step)
        next_index = step + 1
        is_last = per_sample(next_index == kernel.num_steps, x)
        variance = kernel.variance_like(x, step)
        eps_coef = per_sample(kernel.eps_coef.to(x)[step], x)

        eps_policy = backend.eps(x, timestep, cond, finetuned=True)
        mean_policy = kernel.mean(x, eps_policy, step)
        # eq. 15 at x_{k+1}: ∇ log F̃(x_{k+1}) = β γ ∇ log R(x̂) + g_φ (g_φ = 0 at x_K); first, so that its look-ahead
        # graph is freed before ε#(x_k)'s is built
        next_flow_score = self.forward_looking_score(x_next, next_index, cond, generator)
        with torch.no_grad() if self.detach_flow_in_forward else nullcontext():  # no graph for a detached value
            g_next = torch.where(is_last, 0.0, self.flow_score(x_next, next_index, cond))
        flow_target = next_flow_score + g_next
        if getattr(cfg, "flow_oracle", False):  # ∇ log F̃(x_K) = β ∇ log R(x_K) exactly, as in eq. 15
            exact_next = self.exact_flow_score(x_next, kernel.timestep_of_state(next_index))
            flow_target = torch.where(is_last, next_flow_score, exact_next)
        pretrained = self.pretrained_eps(x, step, cond)

        # eq. 17: reverse residual ∇-DB, ‖∇_{x_k} log P̃ + ∇ log F̃(x_k)‖²
        reverse_policy_score = self.reverse_residual_policy_score(
            x, x_next, step, cond, mean_policy, pretrained, (next_flow_score + g_next).detach()
        )
        flow_here = (self.forward_looking_score(x, step, cond, generator, pretrained.leaf_and_graph)
                     + self.flow_score(x, step, cond))
        reverse_weight = variance if cfg.reverse_weighting == "variance" else torch.ones_like(variance)
        reverse_loss = batch_mean(reverse_weight * (reverse_policy_score + flow_here) ** 2)

        if getattr(cfg, "policy_target", "detailed_balance") == "tilted_score":
            forward_loss = self.tilted_score_loss(x, step, eps_policy, pretrained.value, flow_here.detach())
        else:  # eq. 16: forward residual ∇-DB, ‖∇_{x_{k+1}} log P̃ − ∇ log F̃(x_{k+1})‖²
            residual_policy_score = (-(x_next - mean_policy) + eta * (x_next - pretrained.mean)) / variance
            if eta != 1:
                residual_policy_score = residual_policy_score - (1 - eta) * self.noising.scores(x, x_next, step)[0]
            forward_weight = variance**2 / eps_coef**2 if cfg.forward_weighting == "eps" else torch.ones_like(variance)
            forward_loss = batch_mean(forward_weight * (residual_policy_score - flow_target) ** 2)

        loss, metrics = self.total_loss(forward_loss, reverse_loss, batch, eps_policy)
        if self.exact_flow_score is not None:
            metrics.update(self.errors_against_exact_flow(
                x, step, cond, generator, flow_here.detach(), eps_policy.detach(), pretrained.value,
                mean_policy.detach()
            ))
        return loss, metrics

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

    def tilted_score_loss(
        self, x: Tensor, step: Tensor, eps_policy: Tensor, eps_pretrained: Tensor, flow_here: Tensor
    ) -> Tensor:
        """‖ε̂_θ(x_k) − η ε̂#(x_k) + s_k ∇ log F̃(x_k)‖²: the finetuned model is the tilted one, whose score is
        ∇ log p_t^η + ∇ log F̃ (F̃ = q_t / p_t^η for the target q noised to t), with ε̂ = −s_k ∇ log p the models'
        ε-predictions (a flow model's velocity converted, ``mdp.parameterization``) and s_k the noise scale of x_k."""
        timestep = self.kernel.timestep_of_state(step)
        if getattr(self.config, "flow_oracle", False):
            flow_here = self.exact_flow_score(x, timestep)
        to_eps = self.backend.parameterization.to_eps
        eps_policy, eps_pretrained = to_eps(x, timestep, eps_policy), to_eps(x, timestep, eps_pretrained)
        scale = self.noise_scale(x, step)
        return batch_mean((eps_policy - self.prior_strength * eps_pretrained + scale * flow_here) ** 2)

    def noise_scale(self, x: Tensor, step: Tensor) -> Tensor:
        """s_k, the noise scale of state k (√(1 − ᾱ) or σ), per sample, shaped to broadcast against x."""
        return per_sample(self.kernel.state_noise.to(x.device)[step].to(x.dtype), x)

    def errors_against_exact_flow(
        self, x: Tensor, step: Tensor, cond: Tensor, generator, flow_here: Tensor, eps_policy: Tensor,
        eps_pretrained: Tensor, mean_policy: Tensor,
    ) -> dict[str, float]:
        """Relative squared errors per band of steps, Σ‖estimate − exact‖² / Σ‖exact‖² over the band's transitions:
        ``flow_error``, the learned ∇ log F̃(x_k) (look-ahead + g_φ) against the exact one; ``policy_error``, the flow
        score the policy implies against the exact one where ``policy_target`` puts it: −(ε̂_θ − ε̂#)/s_k
        at x_k (``tilted_score``), or the drift (μ_θ − μ#)/σ² at μ_θ (``detailed_balance``: eq. 16's optimum to
        first order; at the last step the exact value is β ∇ log R(μ_θ))."""
        kernel = self.kernel
        timestep = kernel.timestep_of_state(step)
        exact_here = self.exact_flow_score(x, timestep)
        if getattr(self.config, "policy_target", "detailed_balance") == "tilted_score":
            to_eps = self.backend.parameterization.to_eps
            eps_difference = to_eps(x, timestep, eps_policy) - to_eps(x, timestep, eps_pretrained)
            implied, exact_policy = -eps_difference / self.noise_scale(x, step), exact_here
        else:
            next_index = step + 1
            is_last = per_sample(next_index == kernel.num_steps, x)
            final = torch.full_like(step, kernel.num_steps)
            implied = (mean_policy - kernel.mean(x, eps_pretrained, step)) / kernel.variance_like(x, step)
            exact_policy = torch.where(
                is_last, self.forward_looking_score(mean_policy, final, cond, generator),
                self.exact_flow_score(mean_policy, kernel.timestep_of_state(next_index)),
            )
        band = step * ERROR_BANDS // kernel.num_steps
        metrics = {}
        for index in range(ERROR_BANDS):
            rows = band == index
            if not bool(rows.any()):
                continue
            low = -(-index * kernel.num_steps // ERROR_BANDS)
            high = -(-(index + 1) * kernel.num_steps // ERROR_BANDS) - 1
            for name, estimate, exact in (("flow_error", flow_here, exact_here), ("policy_error", implied, exact_policy)):
                error = ((estimate[rows] - exact[rows]) ** 2).sum() / (exact[rows] ** 2).sum().clamp(min=1e-12)
                metrics[f"{name}/k{low:02d}-{high:02d}"] = error.item()
        return metrics

    def reverse_residual_policy_score(
        self,
        x: Tensor,
        x_next: Tensor,
        step: Tensor,
        cond: Tensor,
        mean_policy: Tensor,
        pretrained: PretrainedEps,
        next_flow_score: Tensor,
    ) -> Tensor:
        """∇_{x_k} log P̃(x_{k+1}|x_k) as ``method.reverse_target`` estimates it. With v = (x_k − √r μ_θ)/(1 − r)
        (the P_B part, 0 at η = 1):
          sampled:     ∇_{x_k} log P_F − η ∇_{x_k} log P# − (1 − η) ∇_{x_k} log P_B at the recorded x_{k+1}
          expected:    −η J#ᵀ(μ_θ − μ#)/σ² + (1 − η) v                     (its mean over x_{k+1} ~ P_F)
          propagated:  −J#ᵀ(∇ log F̃(x_{k+1}) + (1 − η) √r v) + (1 − η) v   (eq. 16's optimum substituted:
                       η(μ_θ − μ#)/σ² − (1 − η)√r v = E[∇ log F̃(x_{k+1})])
        In expectation J_θᵀ(x_{k+1} − μ_θ)/σ² vanishes, J#ᵀ(x_{k+1} − μ#)/σ² is J#ᵀ(μ_θ − μ#)/σ², and P_B's score,
        linear in x_{k+1}, is its value at μ_θ."""
        kernel, eta = self.kernel, self.prior_strength
        target = self.config.reverse_target
        if target == "sampled":
            timestep = kernel.timestep_of_state(step)

            def policy_eps(inp: Tensor) -> Tensor:
                return self.backend.eps(inp, timestep, cond, finetuned=True)

            score = kernel.reverse_score(x, x_next, step, policy_eps, create_graph=self.second_order)
            if eta != 0:
                score = score - eta * pretrained.reverse_score(x_next)
            if eta != 1:
                score = score - (1 - eta) * self.noising.scores(x, x_next, step)[1]
            return score
        mean_policy = mean_policy.detach()
        backward_next, backward_here = self.noising.scores(x, mean_policy, step)
        if target == "propagated":
            score = -pretrained.mean_vjp(next_flow_score + (1 - eta) * backward_next)
        elif eta != 0:  # expected
            score = -pretrained.mean_vjp(eta * (mean_policy - pretrained.mean) / kernel.variance_like(x, step))
        else:
            score = torch.zeros_like(x)
        return score - (1 - eta) * backward_here
