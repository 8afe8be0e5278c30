"""Backends: the models being finetuned, behind one interface (``Backend``), built from ``model.kind``.

Heavy backends are imported only when used.
"""

from __future__ import annotations

from importlib import import_module

from .base import Backend
from .gmm import GaussianMixture, GaussianMixtureBackend

#: model.kind → "module:Class"; each class builds itself with ``from_config(config)``
BACKENDS: dict[str, str] = {
    "gmm": "gmm:GaussianMixtureBackend",
    "digits": "digits:DigitsBackend",
    "stable_diffusion": "stable_diffusion:StableDiffusionBackend",
}


def build_backend(config) -> Backend:
    if config.kind not in BACKENDS:
        raise ValueError(f"unknown model.kind {config.kind!r}")
    module_name, class_name = BACKENDS[config.kind].split(":")
    backend_class = getattr(import_module(f".{module_name}", __name__), class_name)
    return backend_class.from_config(config)


__all__ = ["BACKENDS", "Backend", "GaussianMixture", "GaussianMixtureBackend", "build_backend"]
