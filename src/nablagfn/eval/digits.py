"""Ground-truth metrics for the digits model with the classifier reward.

With β = 1 and η = 1 the target is p(x | y = k): samples are compared with the
real digits of class k by the shipped classifier's accuracy, the Fréchet distance
in its 64-d feature space, and the mean pairwise pixel distance (diversity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.digits import load_digits_dataset
from ..rewards.classifier import DigitClassifier


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}) of two feature sets, in float64."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(matrix: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    return ((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)).item()


def mean_pairwise_distance(images: Tensor, max_images: int = 2000) -> float:
    """Mean L2 distance between distinct pairs of images (pixel space, [0, 1]): a diversity figure."""
    flat = images[:max_images].flatten(1).double()
    distances = torch.cdist(flat, flat)
    n = flat.shape[0]
    return (distances.sum() / (n * (n - 1))).item()


@torch.no_grad()
def digits_metrics(images: Tensor, digit: int, classifier: DigitClassifier) -> dict[str, float]:
    """Class accuracy, Fréchet distance to the real class-``digit`` digits, and diversity, for images in [0, 1]."""
    data, labels = load_digits_dataset()
    device = next(classifier.parameters()).device
    real, images = data[labels == digit].to(device), images.float().to(device)
    return {
        "class_accuracy": (classifier(images).argmax(1) == digit).float().mean().item(),
        "fd_to_class": frechet_distance(classifier.features(images), classifier.features(real)),
        "diversity": mean_pairwise_distance(images),
        "diversity_real_class": mean_pairwise_distance(real),
    }
