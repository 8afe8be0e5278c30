"""The digits classifier reward: log p(y = k | x) under a small CNN trained on scikit-learn's digits.

With β = 1 and η = 1 the tilted target p(x) p(k | x) is the class-conditional
p(x | y = k), so real digits of class k are the ground truth to compare with.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..shipped import load_weights_into
from .base import Reward


class ClassifierRewardConfig(StrictConfig):
    """log p(y = digit | x) under the shipped digits classifier (digits model only)."""

    kind: Literal["classifier"] = "classifier"
    digit: int = Field(3, ge=0, le=9)
    weights: str | None = Field(None, description="safetensors file from `nablagfn pretrain classifier`; None: shipped")


SHIPPED_CLASSIFIER = "digits_classifier.safetensors"


class DigitClassifier(nn.Module):
    """8×8 images in [0, 1] → logits over the 10 digits; ``features`` is the 64-d penultimate layer."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def load_digit_classifier(weights: str | None, key: str = "reward.weights") -> DigitClassifier:
    """The classifier from ``weights`` (safetensors; None: the one shipped with the package), frozen, eval mode."""
    classifier = DigitClassifier()
    load_weights_into(classifier, weights, SHIPPED_CLASSIFIER, key, "nablagfn pretrain classifier")
    return classifier.eval().requires_grad_(False)


class ClassifierReward(Reward):
    """log R(x) = log p(y = digit | x) (log-softmax of the classifier's logits)."""

    config_class = ClassifierRewardConfig

    def __init__(self, classifier: DigitClassifier, digit: int):
        super().__init__()
        self.classifier = classifier
        self.digit = digit

    @classmethod
    def from_config(cls, config) -> "ClassifierReward":
        return cls(load_digit_classifier(config.weights), config.digit)

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        return torch.log_softmax(self.classifier(y.float()), dim=1)[:, self.digit]
