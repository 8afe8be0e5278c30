"""Ground-truth metrics for the digits model with the classifier reward.

With β = 1 and η = 1 the target is p(x | y = k): samples are compared with the
real digits of class k by the shipped classifier's accuracy and the Fréchet distance
in its 64-d feature space; the real class's own diversity is the reference for the
samples' ``diversity``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.digits import load_digits_dataset
from ..rewards.classifier import DigitClassifier
from .features import FeatureExtractor
from .metrics import frechet_distance, mean_pairwise_distance


@torch.no_grad()
def digits_metrics(
    images: Tensor, digit: int, classifier: DigitClassifier, features: FeatureExtractor
) -> dict[str, float]:
    """Class accuracy and Fréchet distance to the real class-``digit`` digits, for images in [0, 1], and the
    diversity of those real digits measured as the samples' is (``features`` and its distance)."""
    data, labels = load_digits_dataset()
    device = next(classifier.parameters()).device
    real, images = data[labels == digit].to(device), images.float().to(device)
    return {
        "class_accuracy": (classifier(images).argmax(1) == digit).float().mean().item(),
        "fd_to_class": frechet_distance(classifier.features(images), classifier.features(real)),
        "diversity_real_class": mean_pairwise_distance(features(real), features.distance),
    }
