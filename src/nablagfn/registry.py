"""Registries: a config's ``kind`` → the class that builds itself from it, imported only when used."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def build_from_registry(registry: dict[str, str], package: str, key: str, config: Any) -> Any:
    """``registry`` maps kind → "module:Class" (modules relative to ``package``); calls ``Class.from_config(config)``
    and records ``config`` on the result as ``.config``."""
    if config.kind not in registry:
        raise ValueError(f"unknown {key} {config.kind!r}")
    module_name, class_name = registry[config.kind].split(":")
    built = getattr(import_module(f".{module_name}", package), class_name).from_config(config)
    built.config = config  # what rebuilds it (recorded in a run's config.yaml)
    return built


def config_classes(registry: dict[str, str], package: str) -> tuple[type, ...]:
    """The ``config_class`` of every registered implementation, in registry order, each once (for a config union)."""
    classes: list[type] = []
    for entry in registry.values():
        module_name, class_name = entry.split(":")
        config_class = getattr(import_module(f".{module_name}", package), class_name).config_class
        if config_class not in classes:
            classes.append(config_class)
    return tuple(classes)
