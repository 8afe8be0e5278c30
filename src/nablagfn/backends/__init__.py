"""Backends: the models being finetuned, behind one interface (``Backend``)."""

from ..mdp.schedules import NoiseSchedule
from .base import Backend
from .gmm import GaussianMixture, GaussianMixtureBackend


def build_backend(config) -> Backend:
    if config.kind == "gmm":
        schedule = NoiseSchedule.make(
            config.schedule.kind,
            config.schedule.num_train_timesteps,
            config.schedule.beta_start,
            config.schedule.beta_end,
        )
        weights = config.weights or [1.0] * len(config.means)
        mixture = GaussianMixture(config.means, config.stds, weights)
        return GaussianMixtureBackend(mixture, schedule, config.hidden, config.layers)
    raise ValueError(f"unknown model.kind {config.kind!r}")


__all__ = ["Backend", "GaussianMixture", "GaussianMixtureBackend", "build_backend"]
