"""Backends: the models being finetuned, behind one interface (``Backend``), built from ``model.kind``.

Heavy backends are imported only when used.
"""

from __future__ import annotations

from ..mixture import GaussianMixture
from ..registry import build_from_registry
from .base import Backend
from .gmm import GaussianMixtureBackend

#: model.kind → "module:Class"; each class builds itself with ``from_config(config)``
BACKENDS: dict[str, str] = {
    "gmm": "gmm:GaussianMixtureBackend",
    "digits": "digits:DigitsBackend",
    "stable_diffusion": "stable_diffusion:StableDiffusionBackend",
    "stable_diffusion_3": "stable_diffusion_3:StableDiffusion3Backend",
    "flux": "flux:FluxBackend",
}


def build_backend(config) -> Backend:
    return build_from_registry(BACKENDS, __name__, "model.kind", config)


__all__ = ["BACKENDS", "Backend", "GaussianMixture", "GaussianMixtureBackend", "build_backend"]
