"""Rewards: log R behind one interface (``Reward``)."""

from .base import Reward
from .vector import GaussianReward, LinearReward


def build_reward(config) -> Reward:
    if config.kind == "gaussian":
        return GaussianReward(config.center, config.scale)
    if config.kind == "linear":
        return LinearReward(config.direction)
    raise ValueError(f"unknown reward.kind {config.kind!r}")


__all__ = ["GaussianReward", "LinearReward", "Reward", "build_reward"]
