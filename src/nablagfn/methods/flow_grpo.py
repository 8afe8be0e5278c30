"""Flow-GRPO (Liu et al. 2025, "Flow-GRPO: training flow matching models via online RL"): GRPO on the sampler's steps.

Each epoch draws its conditions in groups: G trajectories per condition (``group_size``), sampled by the current
policy. A trajectory's advantage is its log-reward normalised within its group,

    A = (log R − mean_group) / (std_group + 1e-4),   clipped to ± ``advantage_clip``,

computed once per epoch over whole groups (``prepare_epoch``; the trainer's minibatches take random subsets of them).
Each recorded step x_k → x_{k+1} is an action with the Gaussian policy P_θ(x_{k+1} | x_k) of the kernel; with
ℓ = log P / d (averaged over the d state elements) and r = exp(ℓ_θ − ℓ_old), the loss per trained step is the PPO
clipped surrogate plus a KL to the pretrained policy P_ref (the adapter off), in closed form for two Gaussians of
one std σ_k:

    L = max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) + β_KL · mean_elements((μ_θ − μ_ref)²) / (2 σ_k²).

It works on any Gaussian kernel: the flow SDE (``sampler.kind=flow_sde``, the paper's) and the DDPM-family samplers.
Defaults follow the reference (clip 1e-4, β_KL 0.04, advantage clip 5, every step trained on); it is a reward
maximiser: nothing in the loss targets R^β·p^η, and on a mixture with a known target it concentrates.

On-policy (``train.on_policy=true``, as the reference) the first minibatch of an epoch has r = 1 up to floating point:
ℓ_old is the log-prob the sampler recorded with the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config_base import StrictConfig
from ..mdp.rollout import Trajectories
from ..mdp.shapes import per_sample
from .base import TRANSITIONS_PER_BACKWARD, Method, SubsampleConfig, batch_mean, summed_pieces, transition_pieces
from .ddpo import ppo_clipped_loss, sampled_transitions


class FlowGRPOConfig(StrictConfig):
    """Flow-GRPO: group-normalised advantages, PPO clip, KL to the pretrained policy. Set ``train.on_policy=true``
    (the reference is on-policy) and ``train.trajectories_per_epoch`` a multiple of ``group_size``."""

    name: Literal["flow_grpo"] = "flow_grpo"
    group_size: int = Field(8, ge=2, description="G: trajectories sampled per condition in an epoch")
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε: ratios outside 1 ± ε stop contributing")
    kl_weight: float = Field(0.04, ge=0, description="β_KL of the KL to the pretrained policy (0: none)")
    advantage_clip: float = Field(5.0, gt=0, description="advantages are clipped to ± this")
    subsample: SubsampleConfig = Field(
        default_factory=lambda: SubsampleConfig(kind="all", fraction=1.0),
        description="which steps of each trajectory are trained on (the reference: all)",
    )
    transitions_per_backward: int | None = TRANSITIONS_PER_BACKWARD


def group_advantages(log_reward: Tensor, group: Tensor, clip: float) -> Tensor:
    """(log R − group mean)/(group std + 1e-4) per trajectory (population std, as the reference), clipped."""
    rewards = log_reward.detach().to(torch.float64)
    advantages = torch.empty_like(rewards)
    for index in group.unique().tolist():
        rows = group == index
        own = rewards[rows]
        advantages[rows] = (own - own.mean()) / (own.std(unbiased=False) + 1e-4)
    return advantages.clamp(-clip, clip).to(log_reward.dtype)


class FlowGRPO(Method):
    config_class = FlowGRPOConfig

    needs_reward_gradient = False

    def epoch_conditions(self, num: int, generator: torch.Generator) -> Tensor:
        """``num`` / G conditions, each repeated G times in a row (one group each)."""
        group_size = self.config.group_size
        if num % group_size:
            raise ValueError(
                f"train.trajectories_per_epoch: {num} trajectories per shard is not a multiple of "
                f"method.group_size={group_size}; make it one"
            )
        return self.backend.sample_conditions(num // group_size, generator).repeat_interleave(group_size)

    def prepare_epoch(self, trajectories: Trajectories) -> Trajectories:
        """Fills ``trajectories.advantage`` from whole groups (consecutive runs of G, as ``epoch_conditions`` drew)."""
        group = torch.arange(len(trajectories), device=trajectories.log_reward.device) // self.config.group_size
        trajectories.advantage = group_advantages(trajectories.log_reward, group, self.config.advantage_clip)
        return trajectories

    def trajectory_loss(self, trajectories: Trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return summed_pieces(self.loss_pieces(trajectories, generator))

    def loss_pieces(self, trajectories: Trajectories,
                    generator: torch.Generator) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """The clipped surrogate + KL over pieces of ``transitions_per_backward`` transitions, weighted by share."""
        cfg, kernel, backend = self.config, self.kernel, self.backend
        if trajectories.advantage is None:
            raise RuntimeError("flow_grpo: the trajectories have no advantages; the trainer calls prepare_epoch")
        rows, steps, x, x_next, cond = sampled_transitions(trajectories, kernel.num_steps, cfg.subsample, generator)
        elements = x[0].numel()
        trajectory_metrics = {"grpo/advantage_abs": trajectories.advantage[rows].abs().mean().item(),
                              "grpo/log_reward_mean": trajectories.log_reward.mean().item()}
        for piece in transition_pieces(len(rows), cfg.transitions_per_backward):
            share = (piece.stop - piece.start) / len(rows)
            x_piece, steps_piece, cond_piece = x[piece], steps[piece], cond[piece]
            timestep = kernel.timestep_of_state(steps_piece)
            mean_policy = kernel.mean(x_piece, backend.eps(x_piece, timestep, cond_piece, finetuned=True), steps_piece)
            log_prob = kernel.log_prob(x_next[piece], mean_policy, steps_piece) / elements
            old_log_prob = trajectories.log_probs[rows[piece], steps_piece] / elements
            loss, metrics = ppo_clipped_loss(log_prob, old_log_prob, trajectories.advantage[rows[piece]],
                                             cfg.clip_range)
            if cfg.kl_weight > 0:
                with torch.no_grad():
                    eps_reference = backend.eps(x_piece, timestep, cond_piece, finetuned=False)
                    mean_reference = kernel.mean(x_piece, eps_reference, steps_piece)
                variance = per_sample(kernel.std.to(x_piece)[steps_piece] ** 2, x_piece)
                kl = batch_mean((mean_policy - mean_reference) ** 2 / (2 * variance)).mean()
                loss = loss + cfg.kl_weight * kl
                metrics["grpo/kl"] = kl.item()
            metrics.update({"loss/grpo": loss.item(), **trajectory_metrics})
            yield share * loss, {key: share * value for key, value in metrics.items()}
