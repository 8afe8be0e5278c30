"""Reward maximisation by backpropagation through sampling: ReFL, DRaFT-K, DRaFT-LV, AlignProp.

The ∇-GFlowNet paper's gradient-aware baselines (§4.1, "ReFL [60] and DRaFT [7]"; AlignProp as
the reference for DRaFT's settings, §4.3). None of them has a prior term or a target distribution:
each maximises E[log R] of the finetuned sampler (optionally shaped, × ``reward_weight``), so they
mode-seek by design. With Φ_k(x, z) = μ_θ(x, k) + σ_k z the kernel's step k (x_k → x_{k+1},
μ = a_k x + b_k ε_θ(x)), D the backend's decode and sg the stop-gradient:

  ReFL       s ~ U{⌊lo·K⌉ … ⌊hi·K⌉ − 1} per minibatch; x_s from noise without gradient;
             L = −log R(D(x̂_θ(sg(x_s))))   with x̂ the one-step clean prediction (eq. 2)
  DRaFT-K    x_{K−k} without gradient;  L = −log R(D(Φ_{K−1} ∘ … ∘ Φ_{K−k}(sg(x_{K−k}))))
  DRaFT-LV   x_K without gradient; n copies re-noised to the last step's level with the noising
             kernel q(x_{K−1} | x_K): x̃_i = √(ᾱ_{K−1}/ᾱ_K) sg(x_K) + √(1 − ᾱ_{K−1}/ᾱ_K) z_i;
             L = −(1/n) Σ_i log R(D(Φ_{K−1}(x̃_i)))   (DRaFT's Algorithm 1 with its sum as a mean)
  AlignProp  T ~ U{⌊lo·K⌉ … ⌊hi·K⌉} per minibatch; gradient through the last T steps, each step
             recomputed in the backward pass (torch.utils.checkpoint) so memory is one step's

Losses are means over the minibatch. The chains are fresh: x_0 and every step's noise come from the
trainer's generator (in the order a rollout draws them), and only ``trajectories.cond`` of the
trainer's minibatch is used, so the prompts match the trainer's sampling (``draws_own_chains``: the trainer
samples only conditions for these methods; their log has ``loss/log_reward_mean`` instead of the epoch's
``sample/log_reward_mean``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..config_base import StrictConfig
from ..mdp.rollout import EpochConditions
from .base import Method


def _check_fraction_range(value: tuple[float, float], key: str) -> None:
    low, high = value
    if not 0 <= low <= high <= 1:
        raise ValueError(f"method.{key}: need 0 ≤ low ≤ high ≤ 1, got {list(value)}")


class _BackpropConfig(StrictConfig):
    """Keys shared by the reward maximisers that backpropagate through sampling (no prior, no target
    distribution): loss = reward_weight · mean(shaped(−log R)) of freshly sampled chains."""

    reward_weight: float = Field(
        1.0, gt=0, description="scale of the loss −log R (ReFL's code: grad_scale 1e-3 with lr 1e-5); with Adam it "
        "matters mainly through gradient clipping"
    )
    shaping: Literal["none", "hinge", "relu"] = Field(
        "none", description="none: −log R; hinge: ReLU(margin − log R) (ReFL's code, margin 2); relu: −ReLU(log R) "
        "(the ∇-GFlowNet paper's ReFL/DRaFT baselines)"
    )
    hinge_margin: float = Field(2.0, description="the margin of shaping=hinge")
    checkpoint_steps: bool = Field(
        False, description="recompute each sampler step with gradient in the backward pass (torch.utils.checkpoint): "
        "memory of one step instead of all of them, about one more forward pass of time"
    )


class ReFLConfig(_BackpropConfig):
    """ReFL: stop at a random late step, one step with gradient to x̂, maximise the reward of its decoding."""

    name: Literal["refl"] = "refl"
    stop_range: tuple[float, float] = Field(
        (0.7, 1.0), description="the stop state s is drawn uniformly from round(low·K) … round(high·K) − 1 (one per "
        "minibatch); the default gives states 35–49 of 50 (the ∇-GFlowNet paper), (0.75, 1.0) gives ReFL's 30–39 of 40"
    )

    @model_validator(mode="after")
    def _range(self) -> "ReFLConfig":
        _check_fraction_range(self.stop_range, "stop_range")
        return self


class DRaFTConfig(_BackpropConfig):
    """DRaFT-K: backpropagate the final reward through the last K sampler steps."""

    name: Literal["draft"] = "draft"
    backprop_steps: int = Field(1, ge=1, description="K: gradient through the last K steps only (DRaFT-1 is typical)")


class DRaFTLVConfig(_BackpropConfig):
    """DRaFT-LV: DRaFT-1 with extra noise-then-denoise steps on the final sample (lower-variance gradient)."""

    name: Literal["draft_lv"] = "draft_lv"
    copies: int = Field(2, ge=1, description="n: noise-then-denoise copies of each final sample (DRaFT: n = 2)")
    include_sampled_step: bool = Field(
        False, description="also backpropagate through the chain's own last step (average over 1 + n copies); "
        "DRaFT's algorithm detaches the sample and uses the n copies only"
    )


class AlignPropConfig(_BackpropConfig):
    """AlignProp: backpropagate through the whole chain (gradient checkpointing, random truncation)."""

    name: Literal["alignprop"] = "alignprop"
    truncation: tuple[float, float] = Field(
        (0.1, 0.3), description="gradient through the last T steps, T drawn uniformly from round(low·K) … "
        "round(high·K) (at least 1) per minibatch; AlignProp's default: the last 5–15 of 50; (1, 1): the whole chain"
    )
    checkpoint_steps: bool = Field(True, description="per-step gradient checkpointing (on by default for AlignProp)")

    @model_validator(mode="after")
    def _range(self) -> "AlignPropConfig":
        _check_fraction_range(self.truncation, "truncation")
        return self


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def index_range(low: int, high: int, low_min: int, high_max: int) -> tuple[int, int]:
    """The inclusive integer range [low, high] clamped to [low_min, high_max] and made non-empty."""
    low = min(max(low, low_min), high_max)
    return low, min(max(high, low), high_max)


def draw_int(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform on {low, …, high}."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class BackpropThroughSampling(Method):
    """A differentiable sampler over the kernel's steps with the finetuned model, gradient only where asked,
    and the shaped reward objective shared by the methods of this module."""

    needs_reward_gradient = True
    draws_own_chains = True

    def trajectory_loss(self, trajectories: EpochConditions, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Fresh chains for the minibatch's conditions (the trainer samples nothing else for these methods)."""
        return self.chain_loss(trajectories.cond.to(self.backend.device), generator)

    def chain_loss(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- the differentiable sampler --------------------------------------------------------------
    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """N(0, I) drawn on the CPU from ``generator`` (as rollouts draw it), moved to the backend's device."""
        return torch.randn(shape, generator=generator).to(self.backend.device)

    def step(self, x: Tensor, cond: Tensor, index: int, noise: Tensor) -> Tensor:
        """Φ_k(x, z) = μ_θ(x, k) + σ_k z: kernel step ``index`` with the finetuned ε and given noise."""
        step = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        eps = self.backend.eps(x, self.kernel.timestep_of_state(step), cond, finetuned=True)
        return self.kernel.mean(x, eps, step) + self.kernel.std_like(x, step) * noise

    def sample_chain(
        self, cond: Tensor, generator: torch.Generator, stop: int | None = None, grad_from: int | None = None,
        x: Tensor | None = None, start: int = 0,
    ) -> Tensor:
        """States ``start`` → ``stop`` (default: x_0 ~ N(0, I) → x_K). Steps with index ≥ ``grad_from`` carry
        gradient (recomputed in backward with ``checkpoint_steps``); earlier ones run under no_grad."""
        stop = self.kernel.num_steps if stop is None else stop
        grad_from = stop if grad_from is None else grad_from
        if x is None:
            x = self.noise((cond.shape[0], *self.backend.sample_shape), generator)
        for index in range(start, stop):
            noise = self.noise(tuple(x.shape), generator)
            if index < grad_from:
                with torch.no_grad():
                    x = self.step(x, cond, index, noise)
            elif self.config.checkpoint_steps:
                x = checkpoint(self.step, x, cond, index, noise, use_reentrant=False)
            else:
                x = self.step(x, cond, index, noise)
        return x

    # -- the objective ----------------------------------------------------------------------------
    def log_reward(self, clean: Tensor, cond: Tensor) -> Tensor:
        """log R(D(x)), differentiable in x."""
        return self.reward.log_reward(self.backend.decode(clean).float(), cond)

    def objective(self, log_reward: Tensor, **metrics: float) -> tuple[Tensor, dict[str, float]]:
        """reward_weight · mean of −log R, or of its ``shaping``; metrics: the unshaped mean log-reward."""
        cfg = self.config
        if cfg.shaping == "hinge":
            per_sample = torch.relu(cfg.hinge_margin - log_reward)
        elif cfg.shaping == "relu":
            per_sample = -torch.relu(log_reward)
        else:
            per_sample = -log_reward
        return cfg.reward_weight * per_sample.mean(), {"loss/log_reward_mean": log_reward.mean().item(), **metrics}


class ReFL(BackpropThroughSampling):
    """ReFL (Xu et al. 2023): sample without gradient to a random late state s, then one ε call with
    gradient to the clean prediction x̂_θ(x_s) (eq. 2), decode, maximise its reward."""

    config_class = ReFLConfig

    def stop_range(self) -> tuple[int, int]:
        """The inclusive range of stop states, from ``method.stop_range`` (fractions of K)."""
        (low, high), num_steps = self.config.stop_range, self.kernel.num_steps
        return index_range(round_half_up(low * num_steps), round_half_up(high * num_steps) - 1, 0, num_steps - 1)

    def chain_loss(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        stop = draw_int(*self.stop_range(), generator)
        x = self.sample_chain(cond, generator, stop=stop)  # no gradient
        timestep = self.kernel.timestep_of_state(torch.full((x.shape[0],), stop, dtype=torch.long, device=x.device))
        eps = self.backend.eps(x, timestep, cond, finetuned=True)
        clean = self.backend.predict_clean(x, timestep, eps)
        return self.objective(self.log_reward(clean, cond), **{"refl/stop_state": float(stop)})


class DRaFT(BackpropThroughSampling):
    """DRaFT-K (Clark et al. 2024): the final log R backpropagated through the last K steps only."""

    config_class = DRaFTConfig

    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        if config.backprop_steps > kernel.num_steps:
            raise ValueError(
                f"method.backprop_steps: {config.backprop_steps} is more than the sampler's {kernel.num_steps} steps"
            )

    def chain_loss(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        final = self.sample_chain(cond, generator, grad_from=self.kernel.num_steps - self.config.backprop_steps)
        return self.objective(self.log_reward(final, cond))


class DRaFTLV(BackpropThroughSampling):
    """DRaFT-LV (Clark et al. 2024): the sample x_K is drawn without gradient; n copies are re-noised to
    the last step's noise level and denoised by the last step with gradient; their log-rewards are averaged.

    Re-noising uses the noising kernel from the final state's level (for DDPM ᾱ at t = 0, slightly below 1) to the
    last step's, so x̃ has the distribution the last step expects. With ``include_sampled_step`` the chain's own
    last step also carries gradient (DRaFT-1 plus the n copies, averaged over 1 + n)."""

    config_class = DRaFTLVConfig

    def renoise(self, final: Tensor, generator: torch.Generator) -> Tensor:
        """n copies of each x_K drawn from q(x_{K−1} | x_K), stacked copy-major → (n·B, …)."""
        copies = final.detach().repeat(self.config.copies, *([1] * (final.dim() - 1)))
        last = torch.tensor([self.kernel.num_steps - 1])
        coef, std = float(self.noising.coef(last)), math.sqrt(float(self.noising.variance(last)))
        return coef * copies + std * self.noise(tuple(copies.shape), generator)

    def chain_loss(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        num_steps = self.kernel.num_steps
        grad_from = num_steps - 1 if self.config.include_sampled_step else None
        final = self.sample_chain(cond, generator, grad_from=grad_from)
        copies = self.config.copies
        renoised = self.renoise(final, generator)
        denoised = self.sample_chain(cond.repeat(copies), generator, start=num_steps - 1, grad_from=num_steps - 1,
                                     x=renoised)
        if self.config.include_sampled_step:
            denoised = torch.cat([final, denoised])
            cond = cond.repeat(copies + 1)
        else:
            cond = cond.repeat(copies)
        return self.objective(self.log_reward(denoised, cond))


class AlignProp(BackpropThroughSampling):
    """AlignProp (Prabhudesai et al. 2023): gradient through the last T steps of the chain, T drawn per
    minibatch (randomised truncation), each step checkpointed (``checkpoint_steps``, on by default)."""

    config_class = AlignPropConfig

    def truncation_range(self) -> tuple[int, int]:
        """The inclusive range of T, from ``method.truncation`` (fractions of K)."""
        (low, high), num_steps = self.config.truncation, self.kernel.num_steps
        return index_range(round_half_up(low * num_steps), round_half_up(high * num_steps), 1, num_steps)

    def chain_loss(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        steps = draw_int(*self.truncation_range(), generator)
        final = self.sample_chain(cond, generator, grad_from=self.kernel.num_steps - steps)
        return self.objective(self.log_reward(final, cond), **{"alignprop/backprop_steps": float(steps)})
