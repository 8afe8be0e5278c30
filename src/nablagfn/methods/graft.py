"""GRAFT and P-GRAFT (Anil et al., "Fine-tuning diffusion models via intermediate distribution shaping").

GRAFT (generalised rejection-sampling finetuning): sample, keep some samples by their final log-reward
r = log R(x_K), and finetune on the kept ones with the ordinary denoising loss. Selections
(``method.selection``), within a group (the minibatch, or one prompt's samples in it):

* ``rejection``: accept with probability exp(β (r − r_max)), r_max a known bound of r (``log_reward_max``)
  or the group's maximum. Accepted samples of a proposal p follow p·exp(β r) = p·R^β (β = 1/α, the
  paper's temperature α), so with ``proposal=pretrained`` the target is R^β · p_pretrained (η = 1). With
  the group maximum as r_max the tilt is exact only where the maximum bounds r (it is an estimate);
* ``top_k``: the best round(K/M · M) of each group of M (Best-of-N / RAFT);
* ``threshold``: r ≥ a fixed threshold.

Finetuning (the diffusion pretraining loss on the accepted data y, ε-prediction, element-wise mean):

  x_t = √r_t · y + √(1 − r_t) · z,   r_t = ᾱ_t / ᾱ_data,
  L = ‖ √((1 − r_t)/(1 − ᾱ_t)) · ε_θ(x_t, t) − z ‖².

GRAFT: y = x_K, the final sample, taken as clean data (ᾱ_data = 1: the plain DDPM loss ‖ε_θ − z‖²).

P-GRAFT: accept on the final reward but keep the intermediate state y = x_{k_I} of the same trajectory,
at timestep t_I = timestep of state k_I (ᾱ_data = ᾱ_{t_I}). x_t given y is the forward noising from
t_I to t, so by denoising score matching the minimiser of L is ε_θ(x_t, t) = −√(1 − ᾱ_t) ∇ log q_t(x_t),
the ε of the shaped intermediate distribution q_{t_I} noised to t — exactly what the sampler's steps
above t_I need. (The factor rescales the partial process's noise z to the ε units of the model; it is 1
for GRAFT and for t ≫ t_I.) Only timesteps above t_I are trained, and at inference the finetuned model
takes the steps k < k_I, the pretrained model the rest (``sampling_policy``). Its output distribution is
p(x_K) · E[h(x_{k_I}) | x_K] with h(y) = E[R(x_K)^β | x_{k_I} = y]: the tilt is smoothed through level t_I
(the paper's bias–variance trade-off), so p·R^β is only a reference for it.

``proposal``: ``pretrained`` draws fresh pretrained trajectories for every minibatch (the trainer's own
samples are then used only for their conditions and the logged reward), which makes the accepted set an
exact sample of the tilt; ``current`` selects from the trainer's samples of the finetuned model — iterated
RAFT, whose tilt compounds every round (a reward maximiser without a fixed target).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..config_base import StrictConfig
from ..mdp.rollout import Trajectories, rollout
from .base import Method, batch_mean


class GRAFTConfig(StrictConfig):
    """GRAFT: rejection-sampling finetuning (top-K, threshold, or exact rejection sampling of the tilt).

    With ``selection=rejection`` and ``proposal=pretrained`` the accepted samples follow p·R^β exactly
    (β = 1/α, the acceptance temperature's inverse), so the target is R^β · p_pretrained (η = 1)."""

    name: Literal["graft"] = "graft"
    beta: float = Field(0.5, gt=0, description="β = 1/α: rejection sampling accepts with exp(β (log R − max))")
    selection: Literal["rejection", "top_k", "threshold"] = Field(
        "rejection", description="rejection: accept w.p. exp(β(log R − max)); top_k: the best; threshold: log R ≥"
    )
    top_k_fraction: float = Field(0.25, gt=0, le=1, description="top_k: K/M, the share of each group kept")
    threshold: float | None = Field(None, description="threshold: accept log R ≥ this (required for it)")
    log_reward_max: float | None = Field(
        None, description="rejection: a known upper bound of log R; None: each group's maximum (approximate)"
    )
    group: Literal["batch", "prompt"] = Field(
        "batch", description="top_k and the rejection maximum compare within the minibatch, or per prompt in it"
    )
    proposal: Literal["pretrained", "current"] = Field(
        "pretrained",
        description="pretrained: fresh pretrained samples each minibatch (exact tilt of p); current: the trainer's "
        "samples of the finetuned model (iterated, RAFT-style: the tilt compounds every round)",
    )
    timesteps: Literal["sampler", "uniform"] = Field(
        "sampler", description="denoising-loss timesteps: those of the steps the finetuned model takes, or uniform"
    )

    @property
    def prior_strength(self) -> float:
        """η = 1, fixed: rejection sampling from the pretrained model keeps it as the prior."""
        return 1.0

    @model_validator(mode="after")
    def _threshold_given(self) -> "GRAFTConfig":
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("method.threshold: selection=threshold needs a log-reward threshold")
        return self


class PGRAFTConfig(GRAFTConfig):
    """P-GRAFT: GRAFT on the intermediate states at noise level t_I; pretrained model below t_I."""

    name: Literal["pgraft"] = "pgraft"
    intermediate_fraction: float = Field(
        0.5, gt=0, le=1,
        description="share of sampler steps the finetuned model takes: k_I = round(fraction·K) (t_I = its timestep)",
    )


def group_ids(cond: Tensor, by_prompt: bool) -> Tensor:
    """Group index per sample: one group, or one per conditioning id."""
    return cond.unique(return_inverse=True)[1] if by_prompt else torch.zeros_like(cond)


def group_max(values: Tensor, groups: Tensor) -> Tensor:
    """Each sample's group maximum."""
    maxima = torch.full((int(groups.max()) + 1,), -math.inf, dtype=values.dtype, device=values.device)
    return maxima.scatter_reduce(0, groups, values, reduce="amax")[groups]


def rejection_acceptance(log_reward: Tensor, beta: float, log_reward_max: Tensor | float) -> Tensor:
    """Acceptance probability exp(β (r − r_max)), at most 1."""
    return torch.exp(beta * (log_reward - log_reward_max)).clamp(max=1.0)


def top_k_mask(log_reward: Tensor, groups: Tensor, fraction: float) -> Tensor:
    """The best max(1, round(fraction·M)) samples of each group of M (ties broken by order)."""
    accept = torch.zeros_like(log_reward, dtype=torch.bool)
    for g in groups.unique():
        members = (groups == g).nonzero().squeeze(1)
        keep = max(1, round(fraction * members.numel()))
        accept[members[log_reward[members].argsort(descending=True, stable=True)[:keep]]] = True
    return accept


def partial_noising(
    data: Tensor, noise: Tensor, marginal: tuple[Tensor, Tensor], data_marginal: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """x_t = c·y + √v·z from data y at the level x = α_I x₀ + s_I ε (``data_marginal``) to the level (α_t, s_t) of
    ``marginal`` (per sample): c = α_t/α_I, v = s_t² − c² s_I² (the forward process between the two levels; for a VP
    schedule c = √r, v = 1 − r with r = ᾱ_t/ᾱ_I). Also returns the scale √v / s_t that turns the model's
    ε-prediction into the units of z (per sample, broadcastable)."""
    shape = (-1, *([1] * (data.dim() - 1)))
    (signal, noise_std), (data_signal, data_noise) = marginal, data_marginal
    coef = (signal / data_signal).reshape(shape)
    variance = noise_std.reshape(shape) ** 2 - coef**2 * data_noise**2
    scale = variance.sqrt() / noise_std.reshape(shape)
    coef, variance, scale = coef.to(data), variance.to(data), scale.to(data)
    return coef * data + variance.sqrt() * noise, scale


class GRAFT(Method):
    config_class = GRAFTConfig

    needs_reward_gradient = False

    @property
    def draws_own_chains(self) -> bool:
        """``proposal=pretrained`` draws fresh pretrained chains per minibatch: the trainer's epochs are then
        conditions only (its finetuned samples would go unused)."""
        return self.config.proposal == "pretrained"

    #: state index of the kept samples (K: the final sample)
    @property
    def data_state(self) -> int:
        return self.kernel.num_steps

    def data_level(self) -> tuple[float, float]:
        """(α, s) of the kept samples' level x = α x₀ + s ε: (1, 0), clean data, for GRAFT."""
        return 1.0, 0.0

    def sampling_policy(self, step: int) -> bool:
        return step < self.data_state

    # -- selection -------------------------------------------------------------------------------------------
    def accept(self, log_reward: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """Boolean mask of the accepted trajectories (``method.selection``)."""
        cfg = self.config
        groups = group_ids(cond, cfg.group == "prompt")
        if cfg.selection == "threshold":
            return log_reward >= cfg.threshold
        if cfg.selection == "top_k":
            return top_k_mask(log_reward, groups, cfg.top_k_fraction)
        bound = cfg.log_reward_max if cfg.log_reward_max is not None else group_max(log_reward, groups)
        probability = rejection_acceptance(log_reward, cfg.beta, bound)
        return torch.rand(log_reward.shape, generator=generator).to(log_reward.device) < probability

    def proposals(self, trajectories: Trajectories, generator: torch.Generator) -> Trajectories:
        """The trajectories to select from: the trainer's, or fresh pretrained ones for the same conditions."""
        if self.config.proposal == "current":
            return trajectories
        fresh = rollout(self.backend, self.kernel, trajectories.cond, generator, finetuned=False)
        with torch.no_grad():
            fresh.log_reward = torch.cat([
                self.reward.log_reward(self.backend.decode(part).float(), cond)
                for part, cond in zip(fresh.final.split(self.backend.sample_batch_size),
                                      fresh.cond.split(self.backend.sample_batch_size))
            ])
        return fresh

    # -- denoising loss --------------------------------------------------------------------------------------
    def training_timesteps(self, num: int, generator: torch.Generator) -> Tensor:
        """Timesteps above the data level: those of the sampler steps the finetuned model takes, or uniform."""
        if self.config.timesteps == "sampler":
            steps = torch.randint(self.data_state, (num,), generator=generator)
            return self.kernel.state_timesteps[steps]
        parameterization = self.backend.parameterization
        low = float(self.kernel.state_timesteps[self.data_state])
        if parameterization.kind == "eps" and self.data_level() != (1.0, 0.0):
            low += 1  # strictly above the data's own timestep
        return parameterization.random_timesteps(num, generator, low)

    def denoising_loss(self, data: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """(B,) ‖scale·ε̂_θ(x_t, t) − z‖² at random timesteps t above the data level, scale = √v_t / s_t
        (``partial_noising``; 1 for clean data), ε̂_θ the model's ε-prediction (its velocity converted, for a flow
        model)."""
        parameterization = self.backend.parameterization
        timestep = self.training_timesteps(data.shape[0], generator).to(data.device)
        noise = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
        noisy, scale = partial_noising(data, noise, parameterization.marginal(timestep), self.data_level())
        output = self.backend.eps(noisy, timestep, cond, finetuned=True)
        return batch_mean((scale * parameterization.to_eps(noisy, timestep, output) - noise) ** 2)

    def trajectory_loss(self, trajectories: Trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        candidates = self.proposals(trajectories, generator)
        accepted = self.accept(candidates.log_reward, candidates.cond, generator)
        metrics = {
            "graft/accept_rate": accepted.float().mean().item(),
            "graft/proposal_log_reward": candidates.log_reward.mean().item(),
        }
        if not bool(accepted.any()):  # nothing to learn from: a zero loss with no parameter gradients
            metrics["loss/denoising"] = 0.0
            return torch.zeros((), device=candidates.states.device, requires_grad=True), metrics
        data = candidates.states[accepted, self.data_state]
        loss = self.denoising_loss(data, candidates.cond[accepted], generator).mean()
        metrics.update({
            "loss/denoising": loss.item(),
            "graft/accepted_log_reward": candidates.log_reward[accepted].mean().item(),
        })
        return loss, metrics


class PGRAFT(GRAFT):
    """GRAFT with the kept sample x_{k_I} at an intermediate level; the finetuned model takes steps k < k_I."""

    config_class = PGRAFTConfig

    @property
    def data_state(self) -> int:
        """k_I = round(intermediate_fraction · K), at least 1."""
        return min(self.kernel.num_steps, max(1, round(self.config.intermediate_fraction * self.kernel.num_steps)))

    def data_level(self) -> tuple[float, float]:
        """(α, s) of state k_I."""
        return float(self.kernel.state_signal[self.data_state]), float(self.kernel.state_noise[self.data_state])
