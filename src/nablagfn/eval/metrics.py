"""Sample metrics on image features: diversity and Fréchet distance, per prompt and averaged over prompts.

As in the ∇-GFlowNet paper's evaluation: diversity is the mean pairwise distance between the
features of the images generated for one prompt, and prior preservation the FID between the
finetuned model's and the pretrained model's samples of one prompt; each is averaged over prompts.
Features come from an ``eval.features`` extractor (``nablagfn.eval.features``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Distance = Literal["cosine", "euclidean"]


class _Precomputed(nn.Module):
    """torchmetrics' FID "feature extractor" for features computed beforehand: the identity, with their width."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}) of two feature sets (N, D), in float64.

    Computed by torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor (the
    identity on features the caller extracted once, so they also serve the diversity)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # computed on one process (the main one evaluates): no gathering across processes, which would wait forever for
    # the others
    metric = FrechetInceptionDistance(feature=_Precomputed(features_a.shape[1]), sync_on_compute=False)
    metric.update(features_a.detach().double().cpu(), real=True)
    metric.update(features_b.detach().double().cpu(), real=False)
    return metric.compute().item()


def mean_pairwise_distance(features: Tensor, distance: Distance = "euclidean", max_samples: int = 2000) -> float:
    """Mean distance between distinct pairs of the first ``max_samples`` rows of ``features`` (N, D), N ≥ 2:
    Euclidean, or cosine distance 1 − cos(a, b)."""
    flat = features[:max_samples].flatten(1).double()
    n = flat.shape[0]
    if distance == "cosine":
        unit = F.normalize(flat, dim=1)
        distances = 1 - unit @ unit.T
        distances.fill_diagonal_(0)
    else:
        distances = torch.cdist(flat, flat)
    return (distances.sum() / (n * (n - 1))).item()


def _mean(values: list[float]) -> float:
    """The mean, or NaN when there are no values (a metric with no group large enough is undefined, not 0)."""
    return sum(values) / len(values) if values else math.nan


def diversity(features: Tensor, groups: Tensor, distance: Distance) -> float:
    """Mean over prompts (``groups``: a condition id per sample) of the mean pairwise distance between the
    features of that prompt's samples; prompts with fewer than two samples are left out (NaN if all are)."""
    groups = groups.cpu()
    values = [
        mean_pairwise_distance(features[groups == group], distance)
        for group in groups.unique()
        if (groups == group).sum() >= 2
    ]
    return _mean(values)


def grouped_frechet_distance(features: Tensor, groups: Tensor, reference: Tensor, reference_groups: Tensor) -> float:
    """Mean over prompts of the Fréchet distance between ``features`` and ``reference`` features of that prompt
    (prior preservation: reference = pretrained samples); prompts with fewer than two samples on either side
    are left out (NaN if all are). Per-prompt sets are small, so the value carries a finite-sample bias:
    compare runs at equal sample counts, with the pretrained model's own value as the floor."""
    groups, reference_groups = groups.cpu(), reference_groups.cpu()
    values = []
    for group in groups.unique():
        ours, theirs = features[groups == group], reference[reference_groups == group]
        if len(ours) >= 2 and len(theirs) >= 2:
            values.append(frechet_distance(theirs, ours))
    return _mean(values)
