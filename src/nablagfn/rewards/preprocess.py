"""Image preprocessing for reward models, in torch so gradients reach the image.

Matches CLIP-style preprocessing (resize the shorter side with bicubic
interpolation, centre crop, normalise by the channel mean/std) computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(y: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) → (B, 3, H, W) in fp32."""
    if y.dim() != 4 or y.shape[1] not in (1, 3):
        raise ValueError(f"image rewards need (B, 1 or 3, H, W) images in [0, 1], got shape {tuple(y.shape)}")
    y = y.float()
    return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y


def resize_shorter_side(y: Tensor, size: int) -> Tensor:
    height, width = y.shape[-2:]
    if min(height, width) == size:
        return y
    short = min(height, width)  # the long side is rounded down, as torchvision and transformers do
    new_size = (size, int(size * width / short)) if height == short else (int(size * height / short), size)
    return F.interpolate(y, size=new_size, mode="bicubic", align_corners=False, antialias=True)


def center_crop(y: Tensor, size: int) -> Tensor:
    height, width = y.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return y[..., top : top + size, left : left + size]


def clip_preprocess(
    y: Tensor, size: int = 224, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Tensor:
    """[0, 1] images → the normalised size×size input of a CLIP-style vision tower."""
    y = center_crop(resize_shorter_side(to_rgb(y), size), size)
    mean_t = torch.tensor(mean, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    return (y - mean_t) / std_t
