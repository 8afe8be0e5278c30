"""What every method shares: transition batches, time-step subsampling, reward gradients."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..backends.base import Backend
from ..config_base import StrictConfig
from ..mdp.gaussian import GaussianKernel
from ..mdp.noising import NoisingKernel
from ..mdp.rollout import Trajectories
from ..mdp.shapes import per_sample
from ..rewards.base import Reward


class SubsampleConfig(StrictConfig):
    """Which transitions of each trajectory are trained on (the last one always is)."""

    kind: Literal["stratified", "uniform", "all"] = "stratified"
    fraction: float = Field(0.1, gt=0, le=1)


class RewardSmoothingConfig(StrictConfig):
    """∇ log R averaged over ``samples`` draws of N(0, noise²) added in reward space (§4.3, c = noise)."""

    noise: float = Field(0.0, ge=0)
    samples: int = Field(1, ge=1)


@dataclass
class TransitionBatch:
    """Transitions (x_k → x_{k+1}) drawn from recorded trajectories, plus each trajectory's final state."""

    state: Tensor  # x_k
    next_state: Tensor  # x_{k+1}
    step: Tensor  # k (long)
    cond: Tensor
    behaviour_eps: Tensor  # ε of the policy that sampled the step
    final_state: Tensor  # x_K of the trajectory each transition came from (for eq. 18)
    final_cond: Tensor

    @property
    def size(self) -> int:
        return self.state.shape[0]


def subsample_steps(
    num_trajectories: int, num_steps: int, kind: str, fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(trajectory index, step index) pairs to train on; each trajectory gets its own draw.

    ``all``: every step. ``stratified``: split steps 0 … K−2 into n = round(fraction·K)
    equal strata and draw one step from each. ``uniform``: n distinct steps drawn uniformly.
    The last step (into the sample) is always included.
    """
    if kind == "all" or num_steps == 1:
        steps = torch.arange(num_steps).expand(num_trajectories, -1)
    else:
        inner = num_steps - 1  # steps other than the last one
        count = min(inner, max(1, round(fraction * num_steps)))
        if kind == "stratified":
            edges = torch.linspace(0, inner, count + 1)
            low, width = edges[:-1].floor(), (edges[1:].floor() - edges[:-1].floor()).clamp(min=1)
            offsets = (torch.rand((num_trajectories, count), generator=generator) * width).floor()
            chosen = (low + offsets).long().clamp(max=inner - 1)
        elif kind == "uniform":
            chosen = torch.rand((num_trajectories, inner), generator=generator).argsort(1)[:, :count]
        else:
            raise ValueError(f"unknown subsample kind {kind!r}")
        last = torch.full((num_trajectories, 1), num_steps - 1, dtype=torch.long)
        steps = torch.cat([chosen, last], 1)
    rows = torch.arange(num_trajectories)[:, None].expand_as(steps)
    return rows.reshape(-1), steps.reshape(-1)


def make_transitions(trajectories: Trajectories, rows: Tensor, steps: Tensor) -> TransitionBatch:
    return TransitionBatch(
        state=trajectories.states[rows, steps],
        next_state=trajectories.states[rows, steps + 1],
        step=steps.to(trajectories.states.device),
        cond=trajectories.cond[rows],
        behaviour_eps=trajectories.eps[rows, steps],
        final_state=trajectories.final,
        final_cond=trajectories.cond,
    )


#: the key of the methods whose loss is a mean over transitions, for backpropagating a minibatch in pieces
TRANSITIONS_PER_BACKWARD = Field(
    None, ge=1,
    description="backpropagate the minibatch's trained transitions in pieces of this many (the same gradient; only "
                "one piece's graph is alive at once, so the update's memory stops growing with the batch); "
                "default: all at once",
)


def transition_pieces(count: int, size: int | None) -> list[slice]:
    """``count`` transitions in consecutive pieces of at most ``size`` (None: one piece)."""
    size = count if size is None else size
    return [slice(start, min(start + size, count)) for start in range(0, count, max(size, 1))]


def summed_pieces(pieces: Iterable[tuple[Tensor, dict[str, float]]]) -> tuple[Tensor, dict[str, float]]:
    """The loss and metrics of ``Method.loss_pieces`` added up (one graph: for tests and callers that want it whole)."""
    total, metrics = None, {}
    for loss, piece_metrics in pieces:
        total = loss if total is None else total + loss
        for key, value in piece_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    return total, metrics


def batch_mean(values: Tensor) -> Tensor:
    """Element-wise mean over non-batch dimensions → (B,) (the paper's ‖·‖² convention)."""
    return values.flatten(1).mean(1)


class Method:
    """A loss over transition batches. Its own networks (e.g. g_φ) live in ``self.networks``;
    the backend and reward are shared, not owned."""

    #: whether the method needs ∇ log R (refuses non-differentiable rewards)
    needs_reward_gradient: bool = True
    #: whether the loss draws its own chains from the minibatch's conditions; the trainer then samples only
    #: conditions for it (``EpochConditions``), not whole trajectories it would not use
    draws_own_chains: bool = False

    def __init__(self, config, backend: Backend, reward: Reward, kernel: GaussianKernel):
        if self.needs_reward_gradient and not reward.differentiable:
            raise ValueError(
                f"method.name: {config.name} needs reward gradients, but the reward ({type(reward).__name__}) is "
                "not differentiable; choose a gradient-free method or a differentiable reward"
            )
        self.config = config
        self.backend = backend
        self.reward = reward
        self.kernel = kernel
        self.noising = NoisingKernel(kernel)  # P_B over the sampler's stride
        self.networks = nn.ModuleDict()
        self.update, self.total_updates = 0, 1

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups, each with its own optimiser settings: ``policy`` and (if any) ``flow``."""
        return {"policy": self.backend.trainable_parameters()}

    def epoch_conditions(self, num: int, generator: torch.Generator) -> Tensor:
        """The conditioning ids of an epoch's ``num`` trajectories (default: the backend's draw; Flow-GRPO: groups)."""
        return self.backend.sample_conditions(num, generator)

    def prepare_epoch(self, trajectories: Trajectories) -> Trajectories:
        """Called by the trainer on each freshly sampled epoch (with its log-rewards), before any minibatch is drawn
        from it: per-epoch statistics such as group advantages go here. Default: unchanged."""
        return trajectories

    def trajectory_loss(self, trajectories: Trajectories, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The loss of a minibatch of recorded trajectories (with their final ``log_reward``).

        Default: each trajectory's own draw of subsampled transitions (``config.subsample``) → ``loss``.
        Methods that sample their own chains (ReFL, DRaFT, …) or use whole trajectories override this."""
        return summed_pieces(self.transition_loss_pieces(trajectories, generator, None))

    def transition_loss_pieces(self, trajectories: Trajectories, generator: torch.Generator,
                               size: int | None) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """``loss`` on consecutive pieces of at most ``size`` of the minibatch's subsampled transitions, each loss and
        metric weighted by the piece's share of them: ``loss_pieces`` for a loss that is a mean over transitions."""
        subsample = self.config.subsample
        rows, steps = subsample_steps(len(trajectories), self.kernel.num_steps, subsample.kind, subsample.fraction,
                                      generator)
        for piece in transition_pieces(len(rows), size):
            share = (piece.stop - piece.start) / len(rows)
            loss, metrics = self.loss(make_transitions(trajectories, rows[piece], steps[piece]), generator)
            yield share * loss, {key: share * value for key, value in metrics.items()}

    def loss_pieces(self, trajectories: Trajectories,
                    generator: torch.Generator) -> Iterator[tuple[Tensor, dict[str, float]]]:
        """The minibatch's loss in pieces that sum to ``trajectory_loss`` (losses and metrics alike), which the trainer
        backpropagates one at a time, so that only one piece's graph is alive. Default: one piece."""
        yield self.trajectory_loss(trajectories, generator)

    def loss(self, batch: TransitionBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def set_progress(self, update: int, total_updates: int) -> None:
        """Called by the trainer before each update (for schedules such as a β ramp)."""
        self.update, self.total_updates = update, total_updates

    def sampling_policy(self, step: int) -> bool:
        """Whether the finetuned model (else the pretrained one) takes sampler step ``step`` when this
        method's model is sampled (training rollouts, evaluation, ``nablagfn sample``)."""
        return True

    # -- shared helpers ------------------------------------------------------
    def smoothed_log_reward(self, clean: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """log R(decode(clean) + c·z) averaged over the smoothing draws z (§4.3); differentiable in ``clean``."""
        smoothing = self.config.reward_smoothing
        decoded = self.backend.decode(clean)
        total = 0.0
        for _ in range(smoothing.samples):
            noisy = decoded
            if smoothing.noise > 0:
                noisy = decoded + smoothing.noise * torch.randn(decoded.shape, generator=generator).to(decoded)
            total = total + self.reward.log_reward(noisy.float(), cond)
        return total / smoothing.samples

    def predicted_log_reward_grad(
        self, x: Tensor, state_index: Tensor, cond: Tensor, generator: torch.Generator,
        pretrained: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """∇_x log R(x̂(x)) through a one-step clean prediction (detached).

        x̂ comes from the finetuned model (the paper's x̂_θ) or, with ``lookahead="pretrained"``,
        from the frozen pretrained model. For final states (state_index = K) it is the state itself.
        ``pretrained``: (x_in, ε#(x_in)) already evaluated with its graph from the leaf x_in (x detached, requiring
        grad); with ``lookahead="pretrained"`` it is differentiated instead of evaluating ε# again (the graph is
        freed).
        """
        kernel, backend = self.kernel, self.backend
        is_final = state_index == kernel.num_steps
        finetuned = getattr(self.config, "lookahead", "finetuned") == "finetuned"
        with torch.enable_grad():
            x_in, eps = (None, None) if pretrained is None or finetuned else pretrained
            if x_in is None:
                x_in = x.detach().requires_grad_(True)
            timestep = kernel.timestep_of_state(state_index)
            clean = x_in
            if not bool(is_final.all()):
                if eps is None:
                    eps = backend.eps(x_in, timestep, cond, finetuned=finetuned)
                predicted = backend.predict_clean(x_in, timestep, eps)
                mask = per_sample(is_final, x)
                clean = torch.where(mask, x_in, predicted)
            clean_grad = self.log_reward_grad(clean, cond, generator)
            if clean is x_in:
                return clean_grad
            (grad,) = torch.autograd.grad(clean, x_in, grad_outputs=clean_grad)
        return grad.detach()

    def log_reward_grad(self, clean: Tensor, cond: Tensor, generator: torch.Generator) -> Tensor:
        """∇ of the smoothed log R(decode(clean)) w.r.t. each clean state (detached), decoding
        ``backend.reward_grad_batch_size`` states at a time: each sample's log R depends on its own state only, so
        the chunks' gradients are the whole batch's, and only one chunk's decoder activations are alive at once."""
        size = self.backend.reward_grad_batch_size
        grads = []
        for part, part_cond in zip(clean.detach().split(size), cond.split(size)):
            with torch.enable_grad():
                leaf = part.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.smoothed_log_reward(leaf, part_cond, generator).sum(), leaf)
            grads.append(grad)
        return torch.cat(grads)
