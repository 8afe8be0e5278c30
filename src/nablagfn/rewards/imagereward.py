"""ImageReward (Xu et al., 2023): a BLIP image–text model finetuned on human preference rankings.

The model is BLIP's ViT (ViT-L/16 at 224 px) feeding a BERT text encoder that
cross-attends to the image tokens in every layer; the text encoder's [CLS] state
goes through an MLP head (768→1024→128→64→16→1, no activations) and the result
is normalised with the constants of the official code: (mlp(cls) − mean) / std.
The ``image-reward`` package does not run with current transformers, so the
forward pass of its differentiable entry point (``ImageReward.score_gard``) is
rebuilt here from transformers' own BLIP towers (``BlipVisionModel``, ``BlipTextModel``)
and the MLP head, loaded from the official checkpoint ``ImageReward.pt`` (hub repo
``THUDM/ImageReward``, a ``torch.save``d state dict) through a key map. Prompts are tokenised with the BERT-base-uncased
tokenizer plus BLIP's extra [DEC] and [ENC] tokens, padded to 35 tokens; the
scoring path keeps [CLS] as the first token. Architecture sizes are read from
the checkpoint's tensor shapes, so any checkpoint in this key layout loads.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..errors import ConfigError
from ..loading import resolve_dir, resolve_file
from .base import Reward
from .preprocess import clip_preprocess


class ImageRewardConfig(StrictConfig):
    """ImageReward (BLIP ViT-L + BERT cross-attention + MLP), forward pass rebuilt differentiably."""

    kind: Literal["imagereward"] = "imagereward"
    checkpoint: str = Field(
        "THUDM/ImageReward:ImageReward.pt", description="the official state dict: local path or owner/repo:filename"
    )
    tokenizer: str = Field(
        "google-bert/bert-base-uncased",
        description="BERT-base-uncased vocabulary: a directory holding vocab.txt, the file itself, or a hub id",
    )


#: normalisation of the raw head output, from the official ImageReward code
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: prompts are padded/truncated to this many tokens (official scoring path)
MAX_TEXT_LENGTH = 35
#: attention head width of both towers (ViT-L: 1024 / 16 heads, BERT-base: 768 / 12 heads)
HEAD_DIM = 64
VISION_LAYER_NORM_EPS = 1e-6
TEXT_LAYER_NORM_EPS = 1e-12
#: positions of the Linear layers in the head's nn.Sequential (the others are dropouts)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_LENGTH = 8
#: checkpoint entries the scoring path does not use: BLIP's contrastive projections and a
#: saved buffer of position ids (positions are always 0..L−1)
UNUSED_KEYS = (
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)
VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."


@dataclass(frozen=True)
class ImageRewardArch:
    """Sizes of an ImageReward model (the official one: ViT-L/16 at 224 px, BERT-base, 768→…→1 head)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    vocab_size: int
    max_positions: int
    text_width: int
    text_depth: int
    text_heads: int
    text_intermediate: int
    head_sizes: tuple[int, ...]

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], head_dim: int = HEAD_DIM) -> ImageRewardArch:
        """Read the sizes off the checkpoint's tensor shapes (head counts: width / ``head_dim``)."""
        patch = state[VISION_PREFIX + "patch_embed.proj.weight"]
        vision_width, patch_size = patch.shape[0], patch.shape[-1]
        grid = round((state[VISION_PREFIX + "pos_embed"].shape[1] - 1) ** 0.5)
        words = state[TEXT_PREFIX + "embeddings.word_embeddings.weight"]
        text_width = words.shape[1]
        head_sizes = [state[f"mlp.layers.{HEAD_LINEAR_INDICES[0]}.weight"].shape[1]]
        head_sizes += [state[f"mlp.layers.{i}.weight"].shape[0] for i in HEAD_LINEAR_INDICES]
        for name, width in (("vision", vision_width), ("text", text_width)):
            if width % head_dim:
                raise ValueError(f"{name} width {width} is not a multiple of the attention head width {head_dim}")
        return cls(
            image_size=grid * patch_size,
            patch_size=patch_size,
            vision_width=vision_width,
            vision_depth=_count_layers(state, rf"{re.escape(VISION_PREFIX)}blocks\.(\d+)\."),
            vision_heads=vision_width // head_dim,
            vision_mlp=state[VISION_PREFIX + "blocks.0.mlp.fc1.weight"].shape[0],
            vocab_size=words.shape[0],
            max_positions=state[TEXT_PREFIX + "embeddings.position_embeddings.weight"].shape[0],
            text_width=text_width,
            text_depth=_count_layers(state, rf"{re.escape(TEXT_PREFIX)}encoder\.layer\.(\d+)\."),
            text_heads=text_width // head_dim,
            text_intermediate=state[TEXT_PREFIX + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            head_sizes=tuple(head_sizes),
        )


def _count_layers(state: dict[str, Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.match(pattern, key))}
    return max(indices) + 1 if indices else 0


#: official vision-tower key fragments → transformers' ``BlipVisionModel`` names, applied in order
VISION_RENAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.", "encoder.layers."),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
)


def official_to_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official ImageReward state dict (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.*``) in the
    names of ``ImageRewardModel``'s modules (``vision.*``: ``BlipVisionModel``; ``text.*``: ``BlipTextModel``;
    ``mlp.*``), without ``UNUSED_KEYS``."""
    mapped = {}
    for key, value in state.items():
        if key in UNUSED_KEYS:
            continue
        if key.startswith(VISION_PREFIX):
            name = key.removeprefix(VISION_PREFIX)
            for old, new in VISION_RENAMES:
                name = name.replace(old, new)
            name = "post_layernorm." + name.removeprefix("norm.") if name.startswith("norm.") else name
            mapped["vision." + name] = value
        elif key.startswith(TEXT_PREFIX):
            mapped["text." + key.removeprefix(TEXT_PREFIX)] = value
        else:
            mapped[key] = value
    return mapped


def blip_towers(arch: ImageRewardArch) -> tuple[nn.Module, nn.Module]:
    """transformers' BLIP vision transformer (pre-norm ViT, exact GELU, LayerNorm eps 1e-6) and BLIP text encoder
    (BERT with cross-attention to the image tokens in every layer, eps 1e-12), at ``arch``'s sizes."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=arch.vision_width, intermediate_size=arch.vision_mlp, num_hidden_layers=arch.vision_depth,
        num_attention_heads=arch.vision_heads, image_size=arch.image_size, patch_size=arch.patch_size,
        layer_norm_eps=VISION_LAYER_NORM_EPS, hidden_act="gelu",
    ))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.text_width, encoder_hidden_size=arch.vision_width,
        intermediate_size=arch.text_intermediate, num_hidden_layers=arch.text_depth,
        num_attention_heads=arch.text_heads, max_position_embeddings=arch.max_positions,
        layer_norm_eps=TEXT_LAYER_NORM_EPS, hidden_act="gelu",
        is_decoder=True,  # gives every layer its cross-attention; the scoring pass itself is bidirectional
    ), add_pooling_layer=False)
    return vision, text


class RewardHead(nn.Module):
    """Linear layers without activations; the official head's dropouts sit at the other indices (identity here)."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        modules: list[nn.Module] = [nn.Identity() for _ in range(HEAD_LENGTH)]
        for index, (n_in, n_out) in zip(HEAD_LINEAR_INDICES, pairwise(sizes)):
            modules[index] = nn.Linear(n_in, n_out)
        self.layers = nn.Sequential(*modules)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def _vocab_file(source: str, key: str) -> Path:
    """The BERT vocabulary: a vocab.txt file, a tokenizer directory holding one, or a hub id (only vocab.txt is fetched)."""
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return Path(resolve_dir(source, key, required=("vocab.txt",))) / "vocab.txt"
    return resolve_file(f"{source}:vocab.txt", key)


def load_blip_tokenizer(source: str, key: str = "reward.tokenizer"):
    """BERT-base-uncased WordPiece tokenizer with BLIP's extra tokens [DEC] (bos) and [ENC]."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=str(_vocab_file(source, key)), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardModel(Reward):
    """log R(y | prompt) = ImageReward score of image y for its prompt (normalised, roughly zero-mean unit-variance)."""

    config_class = ImageRewardConfig

    uses_prompts = True

    def __init__(self, arch: ImageRewardArch, tokenizer):
        super().__init__()
        if MAX_TEXT_LENGTH > arch.max_positions:
            raise ValueError(f"the text encoder has {arch.max_positions} positions, fewer than {MAX_TEXT_LENGTH}")
        if len(tokenizer) > arch.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the text encoder only {arch.vocab_size}")
        self.arch = arch
        self.tokenizer = tokenizer
        self.vision, self.text = blip_towers(arch)
        self.mlp = RewardHead(arch.head_sizes)
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_config(cls, config) -> ImageRewardModel:
        path = resolve_file(config.checkpoint, "reward.checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            arch = ImageRewardArch.from_state_dict(state)
        except (
            RuntimeError,
            pickle.UnpicklingError,
            EOFError,
            LookupError,
            ValueError,
            AttributeError,
            TypeError,
        ) as error:
            raise ConfigError(
                f"reward.checkpoint: {str(path)!r} is not an ImageReward checkpoint ({type(error).__name__}: {error})"
            ) from None
        tokenizer = load_blip_tokenizer(config.tokenizer, "reward.tokenizer")
        try:
            model = cls(arch, tokenizer)
        except ValueError as error:
            raise ConfigError(f"reward.tokenizer and reward.checkpoint do not fit together: {error}") from None
        model.load_checkpoint(state, path)
        return model

    def load_checkpoint(self, state: dict[str, Tensor], path: Path) -> None:
        """Load the official state dict exactly (all keys but ``UNUSED_KEYS`` must match, through the key map)."""
        try:
            self.load_state_dict(official_to_transformers(state), strict=True)
        except RuntimeError as error:
            raise ConfigError(
                f"reward.checkpoint: {str(path)!r} does not match the ImageReward layout: {error}"
            ) from None

    def set_prompts(self, prompts: list[str]) -> None:
        super().set_prompts(prompts)
        self._tokenize(prompts)

    def _tokenize(self, prompts: list[str]) -> None:
        new = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._tokens]
        if not new:
            return
        encoded = self.tokenizer(
            new, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        for i, prompt in enumerate(new):
            self._tokens[prompt] = (encoded["input_ids"][i], encoded["attention_mask"][i])

    def prompt_tokens(self, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids and padding mask (B, 35) of each prompt, tokenised once per prompt string."""
        self._tokenize(prompts)
        ids = torch.stack([self._tokens[prompt][0] for prompt in prompts]).to(device)
        mask = torch.stack([self._tokens[prompt][1] for prompt in prompts]).to(device)
        return ids, mask

    def score(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Normalised ImageReward of preprocessed images (B, 3, S, S) with their prompts' tokens; shape (B,)."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device),
            is_decoder=False,
        ).last_hidden_state
        raw = self.mlp(text[:, 0]).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        input_ids, attention_mask = self.prompt_tokens(self.prompts_of(cond), y.device)
        with torch.autocast(device_type=y.device.type, enabled=False):
            return self.score(clip_preprocess(y, self.arch.image_size), input_ids, attention_mask)
