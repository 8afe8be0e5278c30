"""Rollouts: run a sampler and record the trajectory the trainer learns from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .gaussian import GaussianKernel


@dataclass
class Trajectories:
    """A batch of B recorded trajectories of K steps.

    ``states[:, k]`` is state k (k = 0 noise, k = K sample) at diffusion timestep
    ``timesteps[:, k]``; ``eps[:, i]`` the behaviour policy's (guided) ε at step i;
    ``log_probs[:, i]`` its log P_F of the step actually taken; ``cond`` one
    conditioning id per trajectory; ``advantage`` a method's per-trajectory advantage, set once per epoch
    (``Method.prepare_epoch``; Flow-GRPO's group-normalised rewards).
    """

    states: Tensor  # (B, K + 1, *shape)
    timesteps: Tensor  # (B, K + 1) long
    eps: Tensor  # (B, K, *shape)
    log_probs: Tensor  # (B, K)
    cond: Tensor  # (B,) long
    log_reward: Tensor | None = None  # (B,) log R of the final states, filled by the run that sampled them
    advantage: Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def final(self) -> Tensor:
        return self.states[:, -1]

    def select(self, index: Tensor) -> Trajectories:
        return Trajectories(**{name: value[index] for name, value in self._tensors().items()})

    def to(self, device: torch.device | str) -> Trajectories:
        return Trajectories(**{name: value.to(device) for name, value in self._tensors().items()})

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + name: value.contiguous() for name, value in self._tensors().items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], prefix: str = "") -> Trajectories:
        return cls(**{f.name: tensors[prefix + f.name] for f in fields(cls) if prefix + f.name in tensors})

    @classmethod
    def concatenate(cls, parts: list[Trajectories]) -> Trajectories:
        names = parts[0]._tensors()
        return cls(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


@dataclass
class EpochConditions:
    """An epoch's conditions alone, for methods that draw their own chains (nothing is rolled out).
    Behaves as ``Trajectories`` where the trainer needs it: length, selection, checkpointing."""

    cond: Tensor  # (B,) long
    log_reward: None = None

    def __len__(self) -> int:
        return self.cond.shape[0]

    def select(self, index: Tensor) -> EpochConditions:
        return EpochConditions(self.cond[index])

    def to(self, device: torch.device | str) -> EpochConditions:
        return EpochConditions(self.cond.to(device))

    def to_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return {prefix + "cond": self.cond.contiguous()}

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], prefix: str = "") -> EpochConditions:
        return cls(tensors[prefix + "cond"])


@torch.no_grad()
def rollout(
    backend,
    kernel: GaussianKernel,
    cond: Tensor,
    generator: torch.Generator,
    finetuned: bool | Callable[[int], bool] = True,
    record: bool = True,
) -> Trajectories | Tensor:
    """Sample len(cond) trajectories; return them (``record``) or only the final states.

    ``finetuned``: the finetuned (True) or pretrained (False) policy, or a function of the step index
    choosing per step (e.g. P-GRAFT's finetuned-above-t_I rule)."""
    batch = cond.shape[0]
    # noise drawn on the CPU from the CPU generator, so runs reproduce across devices
    x = torch.randn((batch, *backend.sample_shape), generator=generator).to(backend.device)
    cond = cond.to(backend.device)
    states, eps_list, log_probs = [x], [], []
    for i in range(kernel.num_steps):
        step = torch.full((batch,), i, dtype=torch.long, device=x.device)
        t = kernel.timestep_of_state(step)
        eps = backend.eps(x, t, cond, finetuned=finetuned(i) if callable(finetuned) else finetuned)
        x, mean = kernel.step(x, eps, step, generator)
        if record:
            states.append(x)
            eps_list.append(eps)
            log_probs.append(kernel.log_prob(x, mean, step))
    if not record:
        return x
    return Trajectories(
        states=torch.stack(states, 1),
        timesteps=kernel.state_timesteps.to(x.device).expand(batch, -1).clone(),
        eps=torch.stack(eps_list, 1),
        log_probs=torch.stack(log_probs, 1),
        cond=cond,
    )
