"""Weights that ship inside the package (``nablagfn/data``), and loading them or a user's rebuild."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn

from .errors import ConfigError


def shipped_weights(filename: str) -> Path:
    """Path of a weights file that ships inside the package."""
    return Path(str(resources.files("nablagfn") / "data" / filename))


def load_weights_into(module: nn.Module, weights: str | None, shipped: str, key: str, rebuild: str) -> nn.Module:
    """Load a safetensors file (``weights``; None: the shipped ``shipped`` file) into ``module``.

    Errors name the config ``key`` and how to make the file (the ``rebuild`` command)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights).expanduser() if weights else shipped_weights(shipped)
    if not path.is_file():
        hint = f"run `{rebuild}` and set {key}" if weights else "reinstall nablagfn"
        raise ConfigError(f"{key}: weights file {str(path)!r} not found ({hint})")
    try:
        module.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError, SafetensorError, ValueError) as error:  # wrong keys or shapes, not safetensors
        detail = " ".join(str(error).split())[:300] or type(error).__name__
        raise ConfigError(f"{key}: {str(path)!r} does not hold {type(module).__name__} weights ({detail})") from None
    return module
