"""LoRA adapters through peft on any torch module, switchable on and off.

The pretrained model is the same network with its adapters disabled (no copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> nn.Module:
    """Inject LoRA (B = 0 at start, so the model is unchanged) into ``targets`` (default: every conv and linear layer)."""
    from peft import LoraConfig, inject_adapter_in_model

    if targets is None:
        targets = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    return inject_adapter_in_model(config, model)


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The pretrained model inside the block; adapters come back on even if the block raises."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params
