"""The reward interface: log R of what the backend decodes, differentiable where possible.

Image rewards take ``y`` of shape (B, C, H, W) with values in [0, 1] (C = 3, or 1 for
grayscale, which they repeat to 3 channels) and compute in fp32. Conditioning ids
index the backend's prompt table, handed over once with ``set_prompts``; each
sample's reward uses its own prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Reward(nn.Module, ABC):
    """log R(y | cond) for a batch of decoded samples y; shape (B,)."""

    #: whether ∇_y log R is meaningful (gradient-based methods refuse rewards without it)
    differentiable: bool = True
    #: whether the reward reads the prompt of each sample (text-image rewards)
    uses_prompts: bool = False
    #: the reward config this reward was built from (``build_reward``), which rebuilds it; None: made in Python
    config = None

    def describe(self):
        """A reward config describing this reward as far as one can (a reward made in Python: a ``python`` reward
        without an import path, recorded as handed over)."""
        from .python import PythonRewardConfig

        return PythonRewardConfig(function="", differentiable=self.differentiable)

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    @abstractmethod
    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor: ...

    def forward(self, y: Tensor, cond: Tensor) -> Tensor:
        return self.log_reward(y, cond)

    def set_prompts(self, prompts: list[str]) -> None:
        """The backend's prompt table: ``cond`` id i means ``prompts[i]``."""
        self.prompts = list(prompts)

    def prompts_of(self, cond: Tensor) -> list[str]:
        """Each sample's own prompt."""
        if self.uses_prompts and not self.prompts:
            raise ValueError(f"{type(self).__name__} needs prompts, but the backend has none (model.kind has no text)")
        return [self.prompts[i] for i in cond.tolist()]
