"""Image features for the sample metrics (diversity, FID to the pretrained model), chosen by ``eval.features``.

An extractor maps images in [0, 1] (B, C, H, W) to features (B, D) on the CPU, without gradients,
``eval.batch_size`` images at a time, and names the distance the diversity uses: cosine distance
for the unit-norm CLIP and DreamSim embeddings (DreamSim's own perceptual distance), Euclidean for
the others. Weights come from local files (``eval.features_path``); when they are missing the error
names that key and the fallback, ``eval.features=auto``.
"""

from __future__ import annotations

import importlib.util
import pickle
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..errors import ConfigError
from ..loading import resolve_file
from ..rewards.classifier import ClassifierReward, DigitClassifier, load_digit_classifier
from ..rewards.clip_rewards import ClipImageEncoder
from ..rewards.preprocess import to_rgb
from .metrics import Distance


class EvalConfig(StrictConfig):
    """Sample metrics of each evaluation beyond the reward: diversity and FID to the pretrained model, per prompt."""

    features: Literal["auto", "classifier", "clip", "dreamsim", "inception", "pixels"] = Field(
        "auto", description="feature extractor of the diversity and FID; auto: classifier for digits, clip for "
        "Stable Diffusion when a CLIP is at hand (eval.features_path or the reward's), else none"
    )
    features_path: str | None = Field(
        None, description="its weights: classifier safetensors, CLIP directory or hub id, DreamSim cache directory, "
        "FID Inception .pth; None: the shipped classifier / the reward's CLIP or openai/clip-vit-large-patch14"
    )
    prior_fid: bool = Field(True, description="report fid_to_pretrained (pretrained samples drawn once per run)")
    batch_size: int = Field(32, ge=1, description="images per feature-extractor batch")


KEY = "eval.features_path"
#: what the errors about missing weights or packages suggest instead
FALLBACK = (
    "or use eval.features=auto (the digits classifier for digits; for Stable Diffusion the reward's own CLIP, "
    "else no diversity or fid_to_pretrained)"
)
#: what DreamSim's ensemble (dreamsim.dreamsim(dreamsim_type="ensemble")) reads from its cache directory
DREAMSIM_FILES = (
    "dino_vitb16_pretrain.pth",
    "dino_vitb16_lora",
    "open_clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_lora",
    "clip_vitb16_pretrain.pth.tar",
    "clip_vitb16_lora",
)
#: DreamSim's input size (its preprocessing resizes to it, bicubic)
DREAMSIM_SIZE = 224


class FeatureExtractor(nn.Module, ABC):
    """Images in [0, 1] (B, C, H, W) → features (B, D) (float32, CPU), in batches, without gradients."""

    #: the distance between features that the diversity averages
    distance: Distance = "euclidean"

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    @abstractmethod
    def embed(self, images: Tensor) -> Tensor:
        """Features of one batch of images."""

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return torch.cat([self.embed(part).float().cpu() for part in images.split(self.batch_size)])


class PixelFeatures(FeatureExtractor):
    """The pixels themselves, flattened (the mean pairwise pixel distance of the digits results)."""

    def embed(self, images: Tensor) -> Tensor:
        return images.flatten(1)


class ClassifierFeatures(FeatureExtractor):
    """The digits classifier's 64-d penultimate features (``DigitClassifier.features``); 8×8 grayscale images."""

    def __init__(self, classifier: DigitClassifier, batch_size: int) -> None:
        super().__init__(batch_size)
        self.classifier = classifier

    def embed(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float().to(self.classifier.head.weight.device))


class ClipFeatures(FeatureExtractor):
    """Unit-norm CLIP image embeddings (a transformers CLIPModel's vision tower and projection)."""

    distance = "cosine"

    def __init__(self, encoder: ClipImageEncoder, batch_size: int) -> None:
        super().__init__(batch_size)
        self.encoder = encoder

    def embed(self, images: Tensor) -> Tensor:
        return self.encoder(images)


class DreamSimFeatures(FeatureExtractor):
    """DreamSim (Fu et al. 2023) ensemble embeddings; their cosine distance is DreamSim's perceptual distance,
    the paper's diversity measure. Images are resized to 224×224 (bicubic), as DreamSim's preprocessing does."""

    distance = "cosine"

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        super().__init__(batch_size)
        self.model = model

    def embed(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        pixels = F.interpolate(to_rgb(images), size=(DREAMSIM_SIZE, DREAMSIM_SIZE), mode="bicubic", antialias=True)
        return self.model.embed(pixels.clamp(0, 1).to(device)).reshape(len(images), -1)  # embed squeezes B = 1


class InceptionFeatures(FeatureExtractor):
    """The 2048-d pool features of the FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, which resizes
    to 299×299 itself), on images quantised to uint8 as torchmetrics' FID does."""

    def __init__(self, network: nn.Module, batch_size: int) -> None:
        super().__init__(batch_size)
        self.network = network

    def embed(self, images: Tensor) -> Tensor:
        device = next(self.network.parameters()).device
        return self.network((to_rgb(images).clamp(0, 1) * 255).byte().to(device))


def _load_dreamsim(path: str, device: str) -> nn.Module:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):  # the dreamsim package calls torch.load without weights_only
        raise ConfigError(f"eval.features=dreamsim needs torch ≥ 2.6 (this is {torch.__version__}): the dreamsim "
                          "package loads its files with a plain torch.load, which only from 2.6 on refuses to run "
                          "pickled code; upgrade torch or choose another eval.features")
    directory = Path(path).expanduser()
    missing = [name for name in DREAMSIM_FILES if not (directory / name).exists()]
    if missing:
        raise ConfigError(
            f"{KEY}: eval.features=dreamsim needs DreamSim's ensemble weights in a local directory; "
            f"{str(directory)!r} lacks {', '.join(missing)}. On a machine with network, "
            f"`python -c 'import dreamsim; dreamsim.dreamsim(cache_dir=\"DIR\")'` downloads them into DIR; "
            f"copy DIR and set {KEY}=DIR"
        )
    try:
        from dreamsim import dreamsim
    except ImportError as error:
        raise ConfigError(
            f"eval.features=dreamsim needs the dreamsim package ({error}): `pip install dreamsim` (it needs "
            "torchvision built for your torch)"
        ) from None
    model, _ = dreamsim(pretrained=True, device=device, cache_dir=str(directory))
    return model.requires_grad_(False).eval()


def _has_torch_fidelity() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _load_inception(path: str) -> nn.Module:
    weights = resolve_file(path, KEY)
    if not _has_torch_fidelity():
        raise ConfigError(
            "eval.features=inception needs torch-fidelity (No module named 'torch_fidelity'): "
            "`pip install torch-fidelity` (it needs torchvision built for your torch)"
        )
    # torch-fidelity reads the file with a plain torch.load (a full unpickle before torch 2.6): first make sure it
    # holds nothing but tensors and containers, which weights_only=True enforces
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ConfigError(
            f"{KEY}: {str(weights)!r} is not a torch-saved state dict of tensors, as torch-fidelity's FID Inception "
            f"weights (pt_inception-2015-12-05-6726825d.pth) are ({type(error).__name__})"
        ) from None
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"eval.features=inception needs torch-fidelity ({error}): `pip install torch-fidelity` (it needs "
            "torchvision built for your torch)"
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ConfigError(
            f"{KEY}: {str(weights)!r} is not torch-fidelity's FID Inception weights "
            f"(pt_inception-2015-12-05-6726825d.pth): {type(error).__name__}"
        ) from None


def _reward_clip(reward: nn.Module | None) -> ClipImageEncoder | None:
    """The CLIP image encoder of a CLIP-based reward (aesthetic, PickScore, CLIP score), if it is one."""
    encoder = getattr(reward, "encoder", None)
    return encoder if isinstance(encoder, ClipImageEncoder) else None


def _clip_encoder(path: str | None, reward: nn.Module | None) -> ClipImageEncoder:
    """The CLIP at ``path``; without one, the reward's own CLIP encoder, else openai/clip-vit-large-patch14."""
    own = _reward_clip(reward)
    if path is None and own is not None:
        return own
    return ClipImageEncoder.load(path or "openai/clip-vit-large-patch14", KEY)


def _auto_kind(config, reward: nn.Module | None) -> str | None:
    """``eval.features=auto``: the digits classifier for digits; for Stable Diffusion CLIP when one is at hand
    (``eval.features_path``, or the reward's own), else None."""
    if config.model.kind == "digits":
        return "classifier"
    if config.eval.features_path is not None or _reward_clip(reward) is not None:
        return "clip"
    warnings.warn(
        "eval.features=auto: no CLIP at hand (set eval.features_path to a CLIP directory, or use a CLIP-based "
        "reward), so evaluations report no diversity or fid_to_pretrained",
        stacklevel=2,
    )
    return None


def build_features(config, reward: nn.Module | None) -> FeatureExtractor | None:
    """The extractor ``config.eval`` names (None: no sample metrics: the Gaussian mixture, or ``auto`` with no
    CLIP at hand), on ``train.device``."""
    if config.model.kind == "gmm":  # evaluated against its exact target instead
        return None
    kind = _auto_kind(config, reward) if config.eval.features == "auto" else config.eval.features
    if kind is None:
        return None
    try:
        return _build(kind, config.eval.features_path, config.eval.batch_size, config.train.device, reward)
    except ConfigError as error:  # missing or unusable weights, a missing package
        raise ConfigError(f"{error}; {FALLBACK}") from None


def _build(kind: str, path: str | None, batch_size: int, device: str, reward: nn.Module | None) -> FeatureExtractor:
    if kind == "pixels":
        return PixelFeatures(batch_size)
    if kind == "classifier":
        if path is None and isinstance(reward, ClassifierReward):
            return ClassifierFeatures(reward.classifier, batch_size)
        return ClassifierFeatures(load_digit_classifier(path, KEY), batch_size).to(device)
    if kind == "clip":
        return ClipFeatures(_clip_encoder(path, reward), batch_size).to(device)
    if kind == "dreamsim":
        return DreamSimFeatures(_load_dreamsim(path, device), batch_size)
    return InceptionFeatures(_load_inception(path), batch_size).to(device)
