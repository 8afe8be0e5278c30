"""The built-in digits models: 8×8 image diffusion and flow models pretrained on scikit-learn's digits.

The data are the 1,797 real 8×8 handwritten digits that ship with scikit-learn
(``load_digits``), scaled to [−1, 1]. The pretrained network is a small UNet
(8×8 → 4×4 → 8×8) whose weights ship with the package: an ε-prediction DDPM
(``model.parameterization=eps``, ``nablagfn pretrain digits`` reproduces them) or a
rectified flow predicting the velocity ε − x₀ of x_σ = (1 − σ) x₀ + σ ε at model time
1000·σ (``model.parameterization=flow``, ``nablagfn pretrain digits-flow``). Finetuning
adds peft LoRA adapters to its convolutions and linear layers, so the pretrained model
is the same network with the adapters off.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..mdp.parameterization import EpsilonParameterization, FlowParameterization, Parameterization
from ..mdp.schedules import NoiseSchedule
from ..shipped import load_weights_into
from .base import Backend
from .lora import adapters_disabled, add_lora, lora_parameters
from .nets import timestep_embedding


class DigitsModelConfig(StrictConfig):
    """The built-in 8×8 digits diffusion or flow model (pretrained on scikit-learn's digits), finetuned with LoRA."""

    kind: Literal["digits"] = "digits"
    parameterization: Literal["eps", "flow"] = Field(
        "eps", description="eps: the ε-prediction DDPM (sampler.kind=ddpm); flow: the rectified flow (velocity), "
        "sampled by sampler.kind=flow_sde"
    )
    weights: str | None = Field(
        None, description="safetensors file from `nablagfn pretrain digits` (eps) or `nablagfn pretrain digits-flow` "
        "(flow); None: the shipped one"
    )
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to lora_rank")


DIGITS_SHAPE = (1, 8, 8)
SHIPPED_UNET = "digits_unet.safetensors"
SHIPPED_FLOW_UNET = "digits_flow_unet.safetensors"


def load_digits_dataset() -> tuple[Tensor, Tensor]:
    """The 1,797 scikit-learn digits as images in [0, 1], shape (N, 1, 8, 8), and their labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


def digits_split(num: int, seed: int = 0, held_out: float = 0.2) -> tuple[Tensor, Tensor]:
    """A fixed (train, held-out) index split of the data set."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    cut = int(round(num * (1 - held_out)))
    return order[:cut], order[cut:]


def digits_schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear", 1000, 1e-4, 0.02)


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with the time embedding added in between."""

    def __init__(self, channels_in: int, channels_out: int, time_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.time = nn.Linear(time_dim, channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitsUNet(nn.Module):
    """A small UNet on 8×8 images, x, t ↦ an image of x's shape (ε or the velocity, or g_φ's score when
    ``zero_output``); t may be an integer timestep or a float flow time 1000·σ.

    ``zero_output`` starts the output convolution at exactly zero (the flow-score network g_φ).
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), time_dim: int = 64, zero_output: bool = False):
        super().__init__()
        wide, deep = channels
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), nn.SiLU(), nn.Linear(2 * time_dim, 2 * time_dim))
        temb = 2 * time_dim
        self.conv_in = nn.Conv2d(1, wide, 3, padding=1)
        self.down = ResidualBlock(wide, wide, temb)
        self.downsample = nn.Conv2d(wide, deep, 3, stride=2, padding=1)
        self.middle1 = ResidualBlock(deep, deep, temb)
        self.middle2 = ResidualBlock(deep, deep, temb)
        self.upsample = nn.Conv2d(deep, wide, 3, padding=1)
        self.up = ResidualBlock(2 * wide, wide, temb)
        self.norm_out = nn.GroupNorm(8, wide)
        self.conv_out = nn.Conv2d(wide, 1, 3, padding=1)
        if zero_output:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        temb = self.time_mlp(timestep_embedding(timestep, self.time_dim).to(x.dtype))
        skip = self.down(self.conv_in(x), temb)
        h = self.middle2(self.middle1(self.downsample(skip), temb), temb)
        h = self.upsample(nn.functional.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up(torch.cat([h, skip], 1), temb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))


def load_digits_unet(weights: str | None, parameterization: str = "eps") -> DigitsUNet:
    """The pretrained digits network of ``parameterization`` (``eps``: the ε-network, ``flow``: the velocity
    network) from ``weights`` (a safetensors file; None: the shipped one)."""
    if parameterization == "flow":
        return load_weights_into(DigitsUNet(), weights, SHIPPED_FLOW_UNET, "model.weights",
                                 "nablagfn pretrain digits-flow")
    return load_weights_into(DigitsUNet(), weights, SHIPPED_UNET, "model.weights", "nablagfn pretrain digits")


class DigitsBackend(Backend):
    """The pretrained digits UNet with LoRA adapters; unconditional (one condition, id 0).

    ``parameterization``: ``eps`` (the UNet predicts ε under ``digits_schedule``) or ``flow`` (it predicts the
    velocity at model time 1000·σ; ``schedule`` is None).
    """

    config_class = DigitsModelConfig

    def __init__(self, unet: DigitsUNet, lora_rank: int = 8, lora_alpha: float | None = None,
                 parameterization: Literal["eps", "flow"] = "eps"):
        super().__init__()
        self._lora = (lora_rank, lora_alpha)
        self.schedule = None if parameterization == "flow" else digits_schedule()
        self._parameterization = FlowParameterization() if self.schedule is None else EpsilonParameterization(
            self.schedule)
        self.sample_shape = DIGITS_SHAPE
        unet.requires_grad_(False)
        self.unet = add_lora(unet, lora_rank, lora_alpha or lora_rank)

    @classmethod
    def from_config(cls, config) -> "DigitsBackend":
        unet = load_digits_unet(config.weights, config.parameterization)
        return cls(unet, config.lora_rank, config.lora_alpha, config.parameterization)

    @classmethod
    def pretrained(cls, lora_rank: int = 8, lora_alpha: float | None = None,
                   parameterization: Literal["eps", "flow"] = "eps") -> "DigitsBackend":
        """A shipped digits model (the DDPM, or the rectified flow) with a fresh LoRA adapter (what
        ``model.kind=digits`` builds)."""
        from . import build_backend

        return build_backend(
            DigitsModelConfig(lora_rank=lora_rank, lora_alpha=lora_alpha, parameterization=parameterization))

    def describe(self):
        """The parameterization and the LoRA settings (the UNet's weights are not recorded: the run is handed
        over)."""
        return DigitsModelConfig(lora_rank=self._lora[0], lora_alpha=self._lora[1],
                                 parameterization=self._parameterization.kind)

    @property
    def parameterization(self) -> Parameterization:
        return self._parameterization

    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        """The UNet's output: ε, or the velocity of the flow model."""
        if finetuned:
            return self.unet(x, timestep)
        with adapters_disabled(self.unet):
            return self.unet(x, timestep)

    def sample_conditions(self, num: int, generator: torch.Generator, split: str = "train") -> Tensor:
        return torch.zeros(num, dtype=torch.long)

    def decode(self, x: Tensor) -> Tensor:
        """[−1, 1] model space → [0, 1] pixel intensities."""
        return ((x + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.unet)

    def make_flow_score_net(self) -> nn.Module:
        return DigitsUNet(zero_output=True)
