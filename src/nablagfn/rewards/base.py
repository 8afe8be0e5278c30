"""The reward interface: log R of what the backend decodes, differentiable where possible."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Reward(nn.Module, ABC):
    """log R(y | cond) for a batch of decoded samples y; shape (B,)."""

    #: whether ∇_y log R is meaningful (gradient-based methods refuse rewards without it)
    differentiable: bool = True

    @abstractmethod
    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor: ...

    def forward(self, y: Tensor, cond: Tensor) -> Tensor:
        return self.log_reward(y, cond)
