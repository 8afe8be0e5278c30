"""Adjoint Matching (Domingo-Enrich et al. 2024, arXiv 2409.08861); target ∝ p_pretrained(x) · R(x)^β.

Reward finetuning as stochastic optimal control. In continuous time the finetuned SDE is
dX = (b(X, t) + σ(t) u(X, t)) dt + σ(t) dB, the cost E[∫ ½‖u‖² dt − β log R(X_1)], and with a
*memoryless* noise schedule (X_1 independent of X_0 under the base process) its optimum samples
p_base · exp(β log R). Adjoint Matching regresses u onto the lean adjoint ã, which runs backward
through the *pretrained* drift only:

    dã/dt = −(∇_x b(X_t, t))ᵀ ã,   ã(1) = −β ∇ log R(X_1),   loss = ∫ ‖u(X_t, t) + σ(t)ᵀ ã(t)‖² dt.

Discrete form used here (each sampler step x_{k+1} ~ N(μ(x_k), σ_k² I), ``nablagfn.mdp.gaussian``),
with the control as the mean shift Δ_k(x) = μ_θ(x) − μ#(x) = b_k (ε_θ(x) − ε#(x)):

    ã_K = −β ∇_{x_K} log R(decode(x_K))
    ã_k = J_{μ#}(x_k)ᵀ ã_{k+1}                         (one VJP through the pretrained step mean)
    loss_k = ‖Δ_k(x_k)/σ_k + σ_k ã_{k+1}‖²             (element-wise mean over state dimensions)

Why this is the exact discrete analogue: the path KL to the pretrained chain is Σ_k ½‖Δ_k/σ_k‖²
(so Δ/σ is u·√h and σ_k is σ(t)·√h), the tilted path measure's kernels are
P*(x'|x) ∝ P#(x'|x) h_{k+1}(x') with h_k(x) = E#[R(x_K)^β | x_k = x], and for a Gaussian P# their mean
is μ# + σ_k² E*[∇ log h_{k+1}(x_{k+1}) | x_k] (Stein's lemma). Reparameterising x_{j+1} = μ#(x_j) + σ_j z_j
gives ∇ log h_k(x_k) = −E*[ã_k | x_k]. So the regression's minimiser Δ_k = −σ_k² E[ã_{k+1} | x_k] is the
optimal kernel's mean, and on a linear-Gaussian problem (where ã is deterministic) the loss is exactly
zero there. The paper's DDPM form (its appendix) pairs the control at x_k with ã_k instead of ã_{k+1};
the two agree to first order in the step size.

Memorylessness: DDPM (DDIM with η = 1) is memoryless, and the first-order SDE-DPM-Solver++ step *is* the
DDPM posterior step on its timesteps, so both are accepted (checked numerically from the kernel's
tables); DDIM with η ≠ 1 is refused — its final sample keeps a dependence on the initial noise, so the
fixed point would be biased by the value function at x_0.

Trajectories: the paper regresses on fresh detached trajectories of the current finetuned model
(``train.on_policy=true``); with the trainer's default (one epoch old) the fixed point is the same but
the targets lag one epoch behind the policy. The loss is evaluated on ``method.subsample`` steps of
each trajectory (the last one always); the lean adjoint needs a VJP through the pretrained model at every
step from the earliest chosen one to the end.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config_base import StrictConfig
from ..mdp.flow import FlowMatchKernel
from ..mdp.memoryless import memoryless_problem
from ..mdp.rollout import Trajectories
from .base import Method, RewardSmoothingConfig, SubsampleConfig, batch_mean, subsample_steps


class AdjointMatchingConfig(StrictConfig):
    """Adjoint Matching (Domingo-Enrich et al. 2024): lean adjoint through the pretrained model, control
    regression; target ∝ p_pretrained · exp(β log R). Needs a memoryless sampler (DDPM: DDIM η = 1, or
    first-order SDE-DPM-Solver++). Best with ``train.on_policy=true`` (the paper's setting)."""

    name: Literal["adjoint_matching"] = "adjoint_matching"
    beta: float = Field(
        0.5, gt=0, description="the paper's reward multiplier λ: target ∝ p_pretrained · R^β; lean adjoint "
        "ã_K = −β ∇ log R(x_K)"
    )
    prior_strength: Literal[1.0] = Field(
        1.0, description="fixed at 1: Adjoint Matching keeps the pretrained model with exponent 1 (the target is "
        "p_pretrained · R^β)"
    )
    subsample: SubsampleConfig = Field(
        default_factory=SubsampleConfig,
        description="steps of each trajectory the loss is evaluated on (the last one always); the lean adjoint is "
        "propagated through every step regardless",
    )
    reward_smoothing: RewardSmoothingConfig = Field(default_factory=RewardSmoothingConfig)


class AdjointMatching(Method):
    config_class = AdjointMatchingConfig

    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        problem = memoryless_problem(kernel)
        if problem is not None:
            eta = getattr(kernel, "eta", None)
            setting = f"sampler.kind={kernel.name}" + (f" with sampler.eta={eta:g}" if eta is not None else "")
            memoryless = ("sampler.kind=flow_ddpm"
                          if isinstance(kernel, FlowMatchKernel) else
                          "sampler.kind=ddpm or ddim with sampler.eta=1, or sampler.kind=dpm_solver")
            raise ValueError(
                f"method.name: adjoint_matching needs a memoryless sampler ({memoryless}), got {setting} "
                f"({problem}): without it the final sample depends on the initial noise and the fine-tuned model does "
                "not converge to p·R^β"
            )

    def lean_adjoint(self, trajectories: Trajectories, first_state: int, generator: torch.Generator) -> Tensor:
        """ã_k for states k = first_state … K (entries below first_state are zero), detached:
        ã_K = −β ∇ log R(x_K), ã_k = J_{μ#}(x_k)ᵀ ã_{k+1}."""
        kernel, backend = self.kernel, self.backend
        states, cond = trajectories.states, trajectories.cond
        num, final = len(trajectories), kernel.num_steps
        adjoint = torch.zeros_like(states)
        final_index = torch.full((num,), final, dtype=torch.long, device=states.device)
        adjoint[:, final] = -self.config.beta * self.predicted_log_reward_grad(
            states[:, final], final_index, cond, generator
        )
        for k in range(final - 1, first_state - 1, -1):
            step = torch.full((num,), k, dtype=torch.long, device=states.device)
            timestep = kernel.timestep_of_state(step)

            def pretrained_eps(x: Tensor, timestep=timestep) -> Tensor:
                return backend.eps(x, timestep, cond, finetuned=False)

            adjoint[:, k] = kernel.mean_vjp(states[:, k], adjoint[:, k + 1], step, pretrained_eps)
        return adjoint

    def trajectory_loss(self, trajectories: Trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, kernel, backend = self.config, self.kernel, self.backend
        rows, steps = subsample_steps(len(trajectories), kernel.num_steps, cfg.subsample.kind,
                                      cfg.subsample.fraction, generator)
        device = trajectories.states.device
        rows, steps = rows.to(device), steps.to(device)
        adjoint = self.lean_adjoint(trajectories, int(steps.min()) + 1, generator)

        x = trajectories.states[rows, steps]
        cond = trajectories.cond[rows]
        timestep = kernel.timestep_of_state(steps)
        eps_policy = backend.eps(x, timestep, cond, finetuned=True)
        with torch.no_grad():
            eps_pretrained = backend.eps(x, timestep, cond, finetuned=False)
        std = kernel.std_like(x, steps)
        eps_coef = kernel.eps_coef.to(x)[steps].reshape(std.shape)
        control = eps_coef * (eps_policy - eps_pretrained)  # Δ_k = μ_θ − μ# = b_k (ε_θ − ε#)
        residual = control / std + std * adjoint[rows, steps + 1]
        loss = batch_mean(residual**2).mean()
        metrics = {
            "loss/adjoint_matching": loss.item(),
            "control/mean_square": batch_mean((control / std).detach() ** 2).mean().item(),
            "adjoint/terminal_norm": batch_mean(adjoint[:, -1] ** 2).mean().sqrt().item(),
        }
        return loss, metrics
