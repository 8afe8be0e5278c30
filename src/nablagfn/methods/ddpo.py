"""DDPO (Black et al., "Training diffusion models with reinforcement learning"): PPO on the sampler's steps.

Each recorded step x_k → x_{k+1} is an action with Gaussian policy P_θ(x_{k+1} | x_k) (the kernel's step
with the finetuned ε). With A the trajectory's advantage and

  r = exp(ℓ_θ − ℓ_old),   ℓ = log P(x_{k+1} | x_k) / d   (the log-density averaged over the d state elements),

the loss is the PPO clipped surrogate, averaged over the trained steps:

  L = mean( max(−A·r, −A·clip(r, 1 − ε, 1 + ε)) ).

ℓ_old is the behaviour policy's log-prob recorded at sampling time (``Trajectories.log_probs``), so the
ratio is the correct importance weight whether the trainer is on- or off-policy.

Choices (following the reference implementation):
* log-probs are averaged over elements, not summed as ``GaussianKernel.log_prob`` returns them: the reference
  does so, and its clip range ε = 1e-4 is calibrated for that scale (a summed log-prob is d times larger,
  so the same parameter change moves the ratio d times further in log space);
* advantages: the final log-reward normalised by the mean and std of its prompt's recent rewards (a buffer
  of ``buffer_size`` per prompt, here never fewer than the prompt's rewards in the current minibatch), or
  by the minibatch's statistics while the prompt has fewer than ``min_count``; then clipped to ±5;
* every step of each trajectory is trained on (``subsample.kind=all``, the reference's timestep fraction 1);
* logged: approx_kl = ½ mean((ℓ_θ − ℓ_old)²) and the fraction of ratios outside the clip range.

The per-prompt buffers are module buffers in ``self.networks`` so they are checkpointed and resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..mdp.rollout import Trajectories
from .base import TRANSITIONS_PER_BACKWARD, Method, SubsampleConfig, subsample_steps, summed_pieces, transition_pieces


class DDPOConfig(StrictConfig):
    """DDPO: PPO-clipped policy gradient on the kernel log-probs, per-prompt advantage normalisation.

    On-policy in the reference: set ``train.on_policy=true`` (off-policy data is stale by an epoch of
    updates, so most ratios leave the tiny clip range and stop contributing). Defaults are the reference's."""

    name: Literal["ddpo"] = "ddpo"
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε: ratios outside 1 ± ε stop contributing")
    advantage_clip: float = Field(5.0, gt=0, description="advantages are clipped to ± this")
    per_prompt: bool = Field(
        True, description="normalise rewards per prompt with its recent rewards (else by minibatch statistics)"
    )
    buffer_size: int = Field(16, ge=2, description="recent rewards kept per prompt for the normalisation")
    min_count: int = Field(16, ge=2, description="rewards a prompt needs before its own statistics are used")
    subsample: SubsampleConfig = Field(
        default_factory=lambda: SubsampleConfig(kind="all", fraction=1.0),
        description="which steps of each trajectory are trained on (the reference: all)",
    )
    transitions_per_backward: int | None = TRANSITIONS_PER_BACKWARD


class PromptRewardBuffer(nn.Module):
    """The most recent ``size`` log-rewards of each conditioning id (a ring buffer per id)."""

    def __init__(self, num_conditions: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("values", torch.zeros(num_conditions, size, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_conditions, dtype=torch.long))  # rewards seen so far

    def add(self, cond: Tensor, rewards: Tensor) -> None:
        for c, r in zip(cond.tolist(), rewards.detach().to(torch.float64).tolist()):
            self.values[c, self.count[c] % self.size] = r
            self.count[c] += 1

    def recent(self, cond_id: int) -> Tensor:
        """The id's stored rewards (at most ``size``; order does not matter for the statistics)."""
        return self.values[cond_id, : min(int(self.count[cond_id]), self.size)]


def normalised_advantages(
    rewards: Tensor, cond: Tensor, buffer: PromptRewardBuffer | None, min_count: int, clip: float
) -> Tensor:
    """Per-prompt normalised, clipped advantages; adds ``rewards`` to ``buffer`` first (as the reference does).

    A prompt's statistics are those of its most recent max(buffer size, its rewards in this batch) rewards
    once it has ``min_count``; before that, and without a buffer, the batch's (population std, + 1e-6)."""
    rewards64 = rewards.detach().to(torch.float64)
    batch_mean, batch_std = rewards64.mean(), rewards64.std(unbiased=False) + 1e-6
    advantages = (rewards64 - batch_mean) / batch_std
    if buffer is not None:
        buffer.add(cond, rewards64)
        for c in cond.unique().tolist():
            rows = cond == c
            if int(buffer.count[c]) < min_count:
                continue
            own = rewards64[rows]
            history = own if own.numel() > buffer.size else buffer.recent(c).to(rewards64.device)
            advantages[rows] = (own - history.mean()) / (history.std(unbiased=False) + 1e-6)
    return advantages.clamp(-clip, clip).to(rewards.dtype)


def sampled_transitions(
    trajectories: Trajectories, num_steps: int, subsample: SubsampleConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A subsample of the recorded transitions, on the states' device: (rows, steps k, x_k, x_{k+1}, conditions)."""
    rows, steps = subsample_steps(len(trajectories), num_steps, subsample.kind, subsample.fraction, generator)
    device = trajectories.states.device
    rows, steps = rows.to(device), steps.to(device)
    return rows, steps, trajectories.states[rows, steps], trajectories.states[rows, steps + 1], trajectories.cond[rows]


def ppo_clipped_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, float]]:
    """mean(max(−A·r, −A·clip(r, 1 ± ε))) with r = exp(log_prob − old_log_prob); + approx_kl, clip fraction."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "ppo/approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().item(),
            "ppo/clip_fraction": ((ratio - 1).abs() > clip_range).float().mean().item(),
            "ppo/ratio_mean": ratio.mean().item(),
        }
    return loss, metrics


class DDPO(Method):
    config_class = DDPOConfig

    needs_reward_gradient = False

    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        num_conditions = max(1, len(backend.prompts))
        self.networks["reward_buffer"] = PromptRewardBuffer(num_conditions, config.buffer_size).to(backend.device)

    def trajectory_loss(self, trajectories: Trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return summed_pieces(self.loss_pieces(trajectories, generator))

    def loss_pieces(self, trajectories: Trajectories,
                    generator: torch.Generator) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """The PPO loss over pieces of ``transitions_per_backward`` transitions, each weighted by its share."""
        cfg, kernel, backend = self.config, self.kernel, self.backend
        buffer = self.networks["reward_buffer"] if cfg.per_prompt else None
        advantages = normalised_advantages(
            trajectories.log_reward, trajectories.cond, buffer, cfg.min_count, cfg.advantage_clip
        )
        rows, steps, x, x_next, cond = sampled_transitions(trajectories, kernel.num_steps, cfg.subsample, generator)
        elements = x[0].numel()
        trajectory_metrics = {"ppo/advantage_abs": advantages.abs().mean().item(),
                              "ppo/log_reward_mean": trajectories.log_reward.mean().item()}
        for piece in transition_pieces(len(rows), cfg.transitions_per_backward):
            share = (piece.stop - piece.start) / len(rows)
            eps = backend.eps(x[piece], kernel.timestep_of_state(steps[piece]), cond[piece], finetuned=True)
            log_prob = kernel.log_prob(x_next[piece], kernel.mean(x[piece], eps, steps[piece]), steps[piece]) / elements
            old_log_prob = trajectories.log_probs[rows[piece], steps[piece]] / elements
            loss, metrics = ppo_clipped_loss(log_prob, old_log_prob, advantages[rows[piece]], cfg.clip_range)
            metrics.update({"loss/ppo": loss.item(), **trajectory_metrics})
            yield share * loss, {key: share * value for key, value in metrics.items()}
