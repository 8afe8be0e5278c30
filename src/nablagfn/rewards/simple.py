"""Weight-free image rewards: brightness (differentiable) and JPEG (in)compressibility (not differentiable)."""

from __future__ import annotations

import io
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..config_base import StrictConfig
from .base import Reward


class BrightnessRewardConfig(StrictConfig):
    """Mean pixel intensity in [0, 1] (weight-free, differentiable; for demos and tests)."""

    kind: Literal["brightness"] = "brightness"


class JpegRewardConfig(StrictConfig):
    """JPEG file size in kB at ``quality`` (not differentiable: only for gradient-free methods)."""

    #: whether ∇ log R exists (every reward config says so; the default, True, where it does not)
    differentiable: ClassVar[bool] = False
    kind: Literal["jpeg_compressibility", "jpeg_incompressibility"] = "jpeg_compressibility"
    quality: int = Field(95, ge=1, le=100)


class BrightnessReward(Reward):
    """log R(y) = mean pixel intensity of y ∈ [0, 1] (for demos and tests)."""

    config_class = BrightnessRewardConfig

    @classmethod
    def from_config(cls, config) -> "BrightnessReward":
        return cls()

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        return y.float().flatten(1).mean(1)


class JpegReward(Reward):
    """JPEG file size in kB at ``quality``: log R = −size (compressibility) or +size (incompressibility), as in DDPO.

    Not differentiable: gradient-based methods refuse it.
    """

    config_class = JpegRewardConfig

    differentiable = JpegRewardConfig.differentiable

    def __init__(self, quality: int = 95, incompressible: bool = False):
        super().__init__()
        self.quality = quality
        self.sign = 1.0 if incompressible else -1.0

    @classmethod
    def from_config(cls, config) -> "JpegReward":
        return cls(config.quality, incompressible=config.kind == "jpeg_incompressibility")

    @torch.no_grad()
    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        from PIL import Image

        pixels = (y.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        sizes = []
        for image in pixels:
            array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return self.sign * torch.tensor(sizes, device=y.device)
