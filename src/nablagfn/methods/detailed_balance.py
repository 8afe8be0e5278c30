"""Detailed balance with a scalar log-flow: DAG-DB and the paper's residual DB baseline (eq. 4–5, 20).

Per transition x_k → x_{k+1} of the finetuned policy P_F^θ = N(μ_θ(x_k), σ_k² I), the pretrained
policy P# = N(μ#(x_k), σ_k² I) and the fixed noising kernel over the sampler's stride
P_B(x_k | x_{k+1}) = N(√r x_{k+1}, (1 − r) I), r = ᾱ(t_k)/ᾱ(t_{k+1}), the DB residual is

  Δ = log F̃(x_k) + log P_F^θ(x_{k+1}|x_k) − η log P#(x_{k+1}|x_k) − (1 − η) log P_B(x_k|x_{k+1}) − log F̃(x_{k+1})

and the loss is Δ² + λ ‖ε_θ(x_k) − ε_behaviour(x_k)‖² (element mean; the ε stored at sampling time).

* ``dag_db`` (DAG, seed 002): η = 0, eq. 4–5 with P_B the noising kernel; target ∝ R^β.
* ``residual_db`` (eq. 20 and Remark 5): η = 1, the same condition written for F̃ = F/F#, so P_B
  cancels; target ∝ p_pretrained · R^β. Other η: since both the finetuned (F, P_F^θ) and the pretrained
  (F#, P#) chains balance against the same P_B, F̃ = F/F#^η balances P_F^θ against P#^η P_B^(1−η), and
  the target is ∝ p_pretrained^η · R^β (the paper uses η = 1 only).

Forward-looking flow (FL, as eq. 15 for scores and the DAG reference for values):
  log F̃(x_k) = log F_φ(x_k) + β log R(decode(x̂(x_k)))   for k < K (no gradient through the reward),
  log F̃(x_K) = β log R(x_K)                               (the final reward stored at sampling time),
with x̂ the one-step clean prediction of the ``lookahead`` model (DAG-DB default: the finetuned one, as
the reference; residual DB default: the pretrained one, as this package's residual ∇-DB, since the
finetuned look-ahead diverged on the Gaussian mixture) and β ramped linearly from 0 over the first
``beta_ramp`` fraction of the updates (the reference: half).

Choices (docs/methods.md):
* log-probs are exact Gaussian log-densities **without their normalising constants**: those depend on
  the step only, so dropping them shifts log F_k by a per-step constant and leaves every optimum and the
  target unchanged; F_φ then need not represent d·log σ_k-sized offsets.
* ``log_prob_reduction="mean"`` divides Δ by the number of state elements d (the reference averages its
  log-probs over latent elements). The reward term is divided too, so β keeps its exact meaning (target
  R^β, what ``Run.exact_target`` uses); the reference's β is this β / d. ``sum``: Δ in nats.
* log F_φ(x, k) = d_unit · (s · mean(h_φ(x, t_k, c)) + b_k): the backend's flow-score network h_φ (zero
  output at start; text-conditioned for Stable Diffusion), reduced to a scalar by its mean over the
  state's elements, with a learned scale s (starts at 1) and a learned offset b_k per state index (starts
  at 0), d_unit = d for ``mean`` and 1 for ``sum``. The DAG reference uses the encoder half of a UNet +
  pooling + linear; this keeps the decoder half, which costs more compute but needs nothing new from a
  backend.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from .base import Method, SubsampleConfig, TransitionBatch, batch_mean, make_transitions, subsample_steps


class _DetailedBalanceConfig(StrictConfig):
    """Keys shared by the scalar-flow DB methods (DAG-DB, residual DB). See docs/methods.md."""

    beta: float = Field(
        0.5, gt=0, description="β of the target (R^β for DAG-DB, p_pretrained·R^β for residual DB), in the exact "
        "(summed log-density) convention whatever log_prob_reduction is",
    )
    beta_ramp: float = Field(
        0.5, ge=0, le=1,
        description="β rises linearly from 0 over this fraction of the updates (DAG reference: the first half); 0: none",
    )
    output_reg: float = Field(1.0, ge=0, description="λ of λ‖ε_θ − ε_behaviour‖² (element mean; reference: 1)")
    log_prob_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="mean: the DB residual per state element (the reference averages log-probs over latent elements), "
        "sum: in nats; both have the target R^β (the reference's β equals beta / number of elements)",
    )
    subsample: SubsampleConfig = Field(default_factory=SubsampleConfig)


class ResidualDBConfig(_DetailedBalanceConfig):
    """Residual detailed balance (eq. 20): DB in log-densities against the pretrained model, scalar residual flow."""

    name: Literal["residual_db"] = "residual_db"
    lookahead: Literal["finetuned", "pretrained"] = Field(
        "pretrained", description="model whose one-step prediction x̂(x_k) gives the forward-looking log R (paper: "
        "finetuned, which diverged on the Gaussian mixture)",
    )
    prior_strength: float = Field(
        1.0, ge=0, description="η: target ∝ R^β · p_pretrained^η (η ≠ 1 adds (1 − η) log P_B to the balance)"
    )


class DAGDBConfig(_DetailedBalanceConfig):
    """DAG-DB: GFlowNet detailed balance with a scalar flow network, forward-looking with the predicted reward."""

    name: Literal["dag_db"] = "dag_db"
    lookahead: Literal["finetuned", "pretrained"] = Field(
        "finetuned", description="model whose one-step prediction x̂(x_k) gives the forward-looking log R (reference: "
        "finetuned)",
    )


def gaussian_log_density(x: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """log N(x; mean, variance I) summed over non-batch dimensions, without the normalising constant."""
    return (-0.5 * (x - mean) ** 2 / variance).flatten(1).sum(1)


class ScalarFlow(nn.Module):
    """log F_φ(x_k) (in per-element units): s · mean(h_φ(x_k, t_k, cond)) + b_k; exactly 0 at initialisation."""

    def __init__(self, net: nn.Module, num_states: int):
        super().__init__()
        self.net = net
        self.scale = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(num_states))

    def forward(self, x: Tensor, timestep: Tensor, state_index: Tensor, cond: Tensor) -> Tensor:
        features = self.net(x, timestep, cond).flatten(1).mean(1)
        return self.scale * features + self.offset[state_index]


class ResidualDB(Method):
    """Residual DB (η = ``prior_strength``, 1 by default); ``DAGDB`` is the η = 0 case."""

    config_class = ResidualDBConfig

    #: the balance uses the reward's value only (works with JPEG compressibility)
    needs_reward_gradient = False

    def __init__(self, config, backend, reward, kernel):
        super().__init__(config, backend, reward, kernel)
        self.networks["flow"] = ScalarFlow(backend.make_flow_score_net(), kernel.num_steps + 1).to(backend.device)
        self.elements = math.prod(backend.sample_shape)

    @property
    def prior_strength(self) -> float:
        return self.config.prior_strength

    @property
    def unit(self) -> float:
        """Δ is divided by this: the number of state elements (``mean``) or 1 (``sum``)."""
        return float(self.elements) if self.config.log_prob_reduction == "mean" else 1.0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"policy": self.backend.trainable_parameters(), "flow": list(self.networks["flow"].parameters())}

    def beta_now(self) -> float:
        """β ramped linearly from 0 over the first ``beta_ramp`` fraction of the updates."""
        ramp = self.config.beta_ramp * self.total_updates
        return self.config.beta * (min(1.0, self.update / ramp) if ramp > 0 else 1.0)

    # -- the flow --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def lookahead_log_reward(self, x: Tensor, state_index: Tensor, cond: Tensor) -> Tensor:
        """log R(decode(x̂(x_k))) with x̂ from the ``lookahead`` model (no gradient)."""
        timestep = self.kernel.timestep_of_state(state_index)
        eps = self.backend.eps(x, timestep, cond, finetuned=self.config.lookahead == "finetuned")
        clean = self.backend.predict_clean(x, timestep, eps)
        return self.reward.log_reward(self.backend.decode(clean).float(), cond).to(x.dtype)

    def log_flow(self, x: Tensor, state_index: Tensor, cond: Tensor, final_log_reward: Tensor | None = None) -> Tensor:
        """log F̃(x_k) in nats: log F_φ(x_k) + β log R(x̂(x_k)) for k < K; β log R(x_K) at final states
        (``final_log_reward`` where given, else computed)."""
        beta = self.beta_now()
        final = state_index == self.kernel.num_steps
        values = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        inner = (~final).nonzero().squeeze(1)
        if len(inner):
            xi, ki, ci = x[inner], state_index[inner], cond[inner]
            learned = self.unit * self.networks["flow"](xi, self.kernel.timestep_of_state(ki), ki, ci)
            values = values.index_put((inner,), learned + beta * self.lookahead_log_reward(xi, ki, ci))
        last = final.nonzero().squeeze(1)
        if len(last):
            if final_log_reward is None:
                with torch.no_grad():
                    reward = self.reward.log_reward(self.backend.decode(x[last]).float(), cond[last]).to(x.dtype)
            else:
                reward = final_log_reward[last].to(x.dtype)
            values = values.index_put((last,), beta * reward)
        return values

    # -- the loss --------------------------------------------------------------------------------------------
    def trajectory_loss(self, trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        subsample = self.config.subsample
        rows, steps = subsample_steps(len(trajectories), self.kernel.num_steps, subsample.kind, subsample.fraction,
                                      generator)
        final_log_reward = None
        if trajectories.log_reward is not None:  # log R(x_K) per transition, for those that end the trajectory
            final_log_reward = trajectories.log_reward[rows].to(trajectories.states.device)
        return self.loss(make_transitions(trajectories, rows, steps), generator, final_log_reward)

    def balance_log_ratio(self, x: Tensor, x_next: Tensor, step: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(log P_F^θ − η log P# − (1 − η) log P_B, ε_θ(x_k)): the policy side of Δ, summed over elements."""
        kernel, backend, eta = self.kernel, self.backend, self.prior_strength
        timestep = kernel.timestep_of_state(step)
        variance = kernel.variance_like(x, step)
        eps_policy = backend.eps(x, timestep, cond, finetuned=True)
        log_ratio = gaussian_log_density(x_next, kernel.mean(x, eps_policy, step), variance)
        if eta != 0:
            with torch.no_grad():
                mean_pretrained = kernel.mean(x, backend.eps(x, timestep, cond, finetuned=False), step)
            log_ratio = log_ratio - eta * gaussian_log_density(x_next, mean_pretrained, variance)
        if eta != 1:
            log_ratio = log_ratio - (1 - eta) * self.noising.log_density(x, x_next, step)
        return log_ratio, eps_policy

    def loss(
        self, batch: TransitionBatch, generator: torch.Generator, final_log_reward: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        x, x_next, step, cond = batch.state, batch.next_state, batch.step, batch.cond
        log_ratio, eps_policy = self.balance_log_ratio(x, x_next, step, cond)
        flow_here = self.log_flow(x, step, cond)
        flow_next = self.log_flow(x_next, step + 1, cond, final_log_reward)
        residual = (flow_here + log_ratio - flow_next) / self.unit
        db_loss = residual**2
        output_reg = batch_mean((eps_policy - batch.behaviour_eps) ** 2)
        loss = db_loss.mean() + self.config.output_reg * output_reg.mean()
        metrics = {
            "loss/db": db_loss.mean().item(),
            "loss/output_reg": output_reg.mean().item(),
            "db/residual_abs": residual.detach().abs().mean().item(),
            "db/beta": self.beta_now(),
        }
        return loss, metrics


class DAGDB(ResidualDB):
    """DAG-DB: η = 0, the backward policy is the noising kernel; target ∝ R^β."""

    config_class = DAGDBConfig

    @property
    def prior_strength(self) -> float:
        return 0.0
