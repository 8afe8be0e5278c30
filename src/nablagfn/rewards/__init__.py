"""Rewards: log R behind one interface (``Reward``), built from ``reward.kind``.

Heavy reward models are imported only when used.
"""

from __future__ import annotations

from ..registry import build_from_registry
from .base import Reward
from .python import CallableReward, PythonRewardConfig
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
    "python": "python:CallableReward",
}


def build_reward(config) -> Reward:
    return build_from_registry(REWARDS, __name__, "reward.kind", config)


__all__ = ["REWARDS", "CallableReward", "GaussianReward", "PythonRewardConfig", "LinearReward", "Reward", "build_reward"]
