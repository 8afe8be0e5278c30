"""Rewards built on transformers' ``CLIPModel``: LAION aesthetic score, PickScore and CLIP score.

Images are preprocessed in torch (``clip_preprocess``) at the loaded model's input size
(``vision_config.image_size``) with the mean/std of its ``preprocessor_config.json`` (CLIP's
defaults when there is none), so log R is differentiable w.r.t. the image. Every weight is
frozen, fp32 and in eval mode.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..errors import ConfigError
from ..loading import MODEL_FILES, resolve_dir, resolve_file
from ..loading import TOKENIZER_FILES as TOKENIZER_PATTERNS
from .base import Reward
from .preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess


class AestheticRewardConfig(StrictConfig):
    """LAION aesthetic predictor: CLIP ViT-L/14 image features (L2-normalised) → MLP."""

    kind: Literal["aesthetic"] = "aesthetic"
    clip_model: str = Field("openai/clip-vit-large-patch14", description="transformers CLIP directory or hub id")
    head: str = Field(
        "camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth",
        description="the MLP's .pth file: a local path or owner/repo:filename",
    )


class PickScoreRewardConfig(StrictConfig):
    """PickScore: a CLIP ViT-H-14 finetuned on Pick-a-Pic; score = logit scale × image–text cosine."""

    kind: Literal["pickscore"] = "pickscore"
    model: str = Field("yuvalkirstain/PickScore_v1", description="transformers CLIP directory or hub id")
    tokenizer: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="processor directory or hub id: CLIP tokenizer (vocab.json, merges.txt) and preprocessor_config.json",
    )


class ClipScoreRewardConfig(StrictConfig):
    """CLIP score: image–text cosine similarity (× 100) of a transformers CLIP model."""

    kind: Literal["clip"] = "clip"
    model: str = Field(
        "openai/clip-vit-large-patch14", description="transformers CLIP directory (with its tokenizer) or hub id"
    )


#: CLIP's text context length
MAX_TOKENS = 77
#: the files of a CLIP tokenizer (byte-level BPE)
TOKENIZER_FILES = ("vocab.json", "merges.txt")

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


def _load_clip(source: str, key: str, required: tuple[str, ...] = ("config.json",)):
    """A frozen fp32 ``CLIPModel`` and the directory it came from."""
    directory = resolve_dir(source, key, required, allow_patterns=MODEL_FILES)  # before the slow import
    from transformers import CLIPModel

    try:
        # safetensors only: a directory holding only a pickled pytorch_model.bin is refused, not unpickled
        clip = CLIPModel.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: could not load a CLIP model from {directory!r}: {error}") from None
    return clip.requires_grad_(False).eval(), directory


def _load_tokenizer(directory: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(directory)


def _normalisation(*directories: str) -> Normalisation:
    """image_mean/std of the first ``preprocessor_config.json`` among ``directories``; CLIP's otherwise."""
    for directory in directories:
        path = Path(directory) / "preprocessor_config.json"
        if path.is_file():
            settings = json.loads(path.read_text())
            return tuple(settings.get("image_mean", CLIP_MEAN)), tuple(settings.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


class ClipImageEncoder(nn.Module):
    """The vision tower of a loaded CLIPModel: [0, 1] images → unit-norm image embeddings (rewards, eval features)."""

    def __init__(self, clip: nn.Module, normalisation: Normalisation) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size: int = clip.config.vision_config.image_size
        self.mean, self.std = normalisation

    @classmethod
    def load(cls, source: str, key: str) -> ClipImageEncoder:
        """The encoder of the CLIP model at ``source`` (directory or hub id), normalised as its directory says."""
        clip, directory = _load_clip(source, key)
        return cls(clip, _normalisation(directory))

    def forward(self, y: Tensor) -> Tensor:
        """[0, 1] images (B, C, H, W) → unit-norm CLIP image embeddings (B, D), differentiable w.r.t. y."""
        pixels = clip_preprocess(y, self.image_size, self.mean, self.std).to(self.visual_projection.weight.device)
        features = self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)
        return F.normalize(features, dim=-1)


class _ClipImageReward(Reward):
    """A reward on the L2-normalised image embedding of a CLIP vision tower (taken from a loaded CLIPModel)."""

    def __init__(self, clip: nn.Module, normalisation: Normalisation) -> None:
        super().__init__()
        self.encoder = ClipImageEncoder(clip, normalisation)

    def train(self, mode: bool = True) -> _ClipImageReward:
        """Reward models stay in eval mode (no dropout), whatever the module holding them does."""
        return super().train(False)

    def image_embeddings(self, y: Tensor) -> Tensor:
        """[0, 1] images (B, C, H, W) → unit-norm CLIP image embeddings (B, D), differentiable w.r.t. y."""
        return self.encoder(y)


class AestheticHead(nn.Module):
    """LAION's "improved aesthetic predictor" MLP: 768→1024→128→64→16→1 with dropout and no activations.

    Module positions follow the published state dict (``layers.0/2/4/6/7``, Linear/Dropout interleaved).
    """

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding).squeeze(-1)

    @classmethod
    def load(cls, path: Path, key: str) -> AestheticHead:
        """The head from a torch-saved state dict (e.g. ``sac+logos+ava1-l14-linearMSE.pth``)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise ConfigError(
                f"{key}: {str(path)!r} is not a torch-saved state dict ({type(error).__name__})"
            ) from None
        first = state.get("layers.0.weight") if isinstance(state, dict) else None
        if not isinstance(first, Tensor) or first.dim() != 2:
            raise ConfigError(f"{key}: {str(path)!r} is not an aesthetic-predictor state dict (no layers.0.weight)")
        head = cls(first.shape[1])
        try:
            head.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError(f"{key}: {str(path)!r} does not fit the aesthetic MLP: {error}") from None
        return head


class AestheticReward(_ClipImageReward):
    """LAION aesthetic score: log R = MLP(normalised CLIP ViT-L/14 image embedding), the raw predicted rating.

    CLIP from ``clip_model`` (transformers directory or hub id); the MLP from ``head``
    (``sac+logos+ava1-l14-linearMSE.pth`` of christophschuhmann/improved-aesthetic-predictor).
    Only the vision tower of the CLIP model is kept.
    """

    config_class = AestheticRewardConfig

    def __init__(self, clip: nn.Module, head: AestheticHead, normalisation: Normalisation) -> None:
        super().__init__(clip, normalisation)
        width = self.encoder.visual_projection.out_features
        if head.layers[0].in_features != width:
            raise ConfigError(
                f"reward.head: the MLP takes {head.layers[0].in_features}-dim embeddings but reward.clip_model "
                f"gives {width}-dim ones (the published head belongs to CLIP ViT-L/14, 768)"
            )
        self.head = head
        self.requires_grad_(False).eval()

    @classmethod
    def from_config(cls, config) -> AestheticReward:
        clip, directory = _load_clip(config.clip_model, "reward.clip_model")
        head = AestheticHead.load(resolve_file(config.head, "reward.head"), "reward.head")
        return cls(clip, head, _normalisation(directory))

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.image_embeddings(y))


class _PromptAlignmentReward(_ClipImageReward):
    """log R = scale × cosine(CLIP image embedding, CLIP embedding of the sample's prompt).

    Prompt embeddings are computed once per prompt string and cached.
    """

    uses_prompts = True

    def __init__(self, clip: nn.Module, tokenizer, normalisation: Normalisation, scale: float) -> None:
        super().__init__(clip, normalisation)
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.tokenizer = tokenizer
        self.scale = scale
        self._text_cache: dict[str, Tensor] = {}
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Unit-norm text embeddings (B, D), embedding only the prompts not seen before."""
        missing = sorted(set(prompts) - self._text_cache.keys())
        if missing:
            tokens = self.tokenizer(
                missing, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
            ).to(self.text_projection.weight.device)
            output = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            self._text_cache.update(zip(missing, F.normalize(self.text_projection(output.pooler_output), dim=-1)))
        return torch.stack([self._text_cache[prompt] for prompt in prompts])

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        image = self.image_embeddings(y)
        text = self.text_embeddings(self.prompts_of(cond)).to(image.device)
        return self.scale * (image * text).sum(dim=-1)


class PickScoreReward(_PromptAlignmentReward):
    """PickScore: CLIP ViT-H-14 finetuned on Pick-a-Pic; log R = logit_scale.exp() × image–prompt cosine.

    Model from ``model`` (hub yuvalkirstain/PickScore_v1, a transformers CLIPModel); tokenizer and image
    normalisation from ``tokenizer`` (the processor directory laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    """

    config_class = PickScoreRewardConfig

    @classmethod
    def from_config(cls, config) -> PickScoreReward:
        clip, model_dir = _load_clip(config.model, "reward.model")
        processor_dir = resolve_dir(
            config.tokenizer, "reward.tokenizer", required=TOKENIZER_FILES, allow_patterns=TOKENIZER_PATTERNS
        )
        scale = clip.logit_scale.exp().item()
        return cls(clip, _load_tokenizer(processor_dir), _normalisation(processor_dir, model_dir), scale)


class ClipScoreReward(_PromptAlignmentReward):
    """CLIP score: log R = 100 × cosine(image, prompt) of a transformers CLIP model (tokenizer in the same directory).

    Unlike the evaluation metric, the cosine is not clipped at 0, so the gradient never vanishes.
    """

    config_class = ClipScoreRewardConfig

    @classmethod
    def from_config(cls, config) -> ClipScoreReward:
        clip, directory = _load_clip(config.model, "reward.model", required=("config.json", *TOKENIZER_FILES))
        return cls(clip, _load_tokenizer(directory), _normalisation(directory), 100.0)
