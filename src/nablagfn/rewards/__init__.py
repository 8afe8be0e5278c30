"""Rewards: log R behind one interface (``Reward``), built from ``reward.kind``.

Heavy reward models are imported only when used.
"""

from __future__ import annotations

from importlib import import_module

from .base import Reward
from .vector import GaussianReward, LinearReward

#: reward.kind → "module:Class"; each class builds itself with ``from_config(config)``
REWARDS: dict[str, str] = {
    "gaussian": "vector:GaussianReward",
    "linear": "vector:LinearReward",
    "classifier": "classifier:ClassifierReward",
    "brightness": "simple:BrightnessReward",
    "jpeg_compressibility": "simple:JpegReward",
    "jpeg_incompressibility": "simple:JpegReward",
    "aesthetic": "clip_rewards:AestheticReward",
    "pickscore": "clip_rewards:PickScoreReward",
    "clip": "clip_rewards:ClipScoreReward",
    "hpsv2": "hpsv2:HPSv2Reward",
    "imagereward": "imagereward:ImageRewardModel",
}


def build_reward(config) -> Reward:
    if config.kind not in REWARDS:
        raise ValueError(f"unknown reward.kind {config.kind!r}")
    module_name, class_name = REWARDS[config.kind].split(":")
    reward_class = getattr(import_module(f".{module_name}", __name__), class_name)
    return reward_class.from_config(config)


__all__ = ["REWARDS", "GaussianReward", "LinearReward", "Reward", "build_reward"]
