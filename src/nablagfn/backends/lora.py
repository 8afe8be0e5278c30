"""LoRA adapters through peft on any torch module, switchable on and off.

The pretrained model is the same network with its adapters disabled (no copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import ConfigError


def add_diffusers_lora(
    denoiser: nn.Module, frozen: list[nn.Module], rank: int, alpha: float | None, targets: list[str], what: str
) -> list[nn.Parameter]:
    """Freezes ``frozen`` (the pipeline's modules, in eval mode) and adds a peft LoRA on ``targets`` to ``denoiser``
    (a diffusers UNet or transformer, one of them) through its ``add_adapter``; returns the adapter's parameters, in
    fp32. ``what`` names the denoiser in the error raised when no layer matches."""
    from peft import LoraConfig

    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the finetuned model starts as the pretrained one
        target_modules=list(targets),
    )
    try:
        denoiser.add_adapter(lora)
    except ValueError as error:  # peft: no module matched
        raise ConfigError(f"model.lora_targets: {list(targets)} matched no layer of the {what} ({error})") from None
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


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
