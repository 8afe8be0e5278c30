"""Broadcasting per-sample values against batches of states."""

from __future__ import annotations

from torch import Tensor


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Values of shape (B,) viewed as (B, 1, …, 1), to broadcast against ``like`` of shape (B, …)."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))
