"""The backend interface: what the MDP, the methods and the trainer need from a model.

A backend owns the pretrained model, the finetuning adapter (its trainable
parameters), the conditioning (ids into its own table of prompts or classes),
guidance, and the map from a final state to what the reward sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from ..mdp.parameterization import EpsilonParameterization, Parameterization
from ..mdp.schedules import NoiseSchedule


class Backend(nn.Module, ABC):
    """A diffusion (ε-prediction) or flow (velocity) model with a switchable finetuning adapter.

    ``eps`` is the model's output whichever it predicts: ε for ``parameterization.kind == "eps"``, the velocity for
    ``"flow"`` (``mdp.parameterization``); the sampler kernels and methods read it through ``parameterization``.
    """

    #: the ε-model's noise schedule (None for flow models)
    schedule: NoiseSchedule | None
    sample_shape: tuple[int, ...]
    #: conditioning id i means prompts[i] (text backends); empty when there is no text
    prompts: list[str] = []
    #: most trajectories sampled (or samples decoded and rewarded) in one batch
    sample_batch_size: int = 4096
    #: most clean states decoded and rewarded at once with their gradient (the look-ahead ∇ log R of the ∇-DB
    #: methods); the decoder's activations kept for the backward pass scale with it
    reward_grad_batch_size: int = 4096
    #: the model config this backend was built from (``build_backend``), which rebuilds it; None: made in Python
    config = None

    def describe(self):
        """A model config describing this backend as far as one can (for a run's ``config.yaml`` when the backend
        was made in Python rather than from a config)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no config: build it with build_backend(config), or give it a describe() "
            "returning its model config"
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.trainable_parameters())).device

    @property
    def parameterization(self) -> Parameterization:
        """What ``eps`` returns and how the state is noised at each model time: ε-prediction under ``schedule``
        unless the backend is a flow model."""
        return EpsilonParameterization(self.schedule)

    @abstractmethod
    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        """Guided model output at (x, t | cond) — ε, or the velocity of a flow model: the finetuned model, or the
        pretrained one with the adapter off."""

    @abstractmethod
    def sample_conditions(self, num: int, generator: torch.Generator, split: str = "train") -> Tensor:
        """Conditioning ids (long, shape (num,), on the CPU) for ``num`` new trajectories, drawn from the
        ``train`` or held-out ``eval`` conditions (backends without a held-out split use one set for both)."""

    @abstractmethod
    def decode(self, x: Tensor) -> Tensor:
        """Map a (predicted) clean state to the reward's input space, differentiably."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The finetuning adapter's parameters (the policy θ)."""

    @abstractmethod
    def make_flow_score_net(self) -> nn.Module:
        """A network g_φ(x, t, cond) with the state's shape as output that starts at exactly zero.

        ``cond`` are conditioning ids; a text backend's net maps them to embeddings itself."""

    def predict_clean(self, x: Tensor, timestep: Tensor, eps: Tensor) -> Tensor:
        """One-step clean prediction x̂(x_t) from the model output (eq. 2's x_θ): (x_t − √(1−ᾱ_t) ε)/√ᾱ_t for an
        ε-model, x_t − σ v for a flow model."""
        return self.parameterization.predict_clean(x, timestep, eps)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable parameters by name (what a checkpoint stores for the policy)."""
        trainable = {id(p) for p in self.trainable_parameters()}
        return {name: p.detach() for name, p in self.named_parameters() if id(p) in trainable}
