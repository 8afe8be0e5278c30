"""Ground-truth metrics on the Gaussian mixture: distance of samples to the exact tilted target."""

from __future__ import annotations

import torch
from torch import Tensor

from ..mixture import GaussianMixture


def mode_weights(samples: Tensor, prior: GaussianMixture) -> Tensor:
    """Fraction of samples nearest to each prior mean."""
    counts = torch.bincount(prior.nearest_mode(samples), minlength=prior.means.shape[0])
    return counts.double() / samples.shape[0]


def mode_weight_tv(samples: Tensor, target_samples: Tensor, prior: GaussianMixture) -> float:
    """Total-variation distance between the nearest-mode histograms of two sample sets."""
    return 0.5 * (mode_weights(samples, prior) - mode_weights(target_samples, prior)).abs().sum().item()


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E|X − Y| − E|X − X'| − E|Y − Y'| (V-statistic); zero iff the distributions agree."""
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def target_metrics(
    samples: Tensor, target: GaussianMixture, prior: GaussianMixture, generator: torch.Generator
) -> dict[str, float]:
    """TV of mode weights and energy distance to exact-target samples, with their two-sample floors."""
    n = samples.shape[0]
    reference = target.sample(200_000, generator)
    fresh_a, fresh_b = target.sample(n, generator), target.sample(n, generator)
    return {
        "mode_tv": mode_weight_tv(samples, reference, prior),
        "mode_tv_floor": mode_weight_tv(fresh_a, reference, prior),
        "energy_distance": energy_distance(samples, fresh_a),
        "energy_distance_floor": energy_distance(fresh_b, fresh_a),
    }
