"""HPSv2 / HPSv2.1 (Human Preference Score v2): an OpenCLIP ViT-H-14 finetuned on human preference pairs.

The checkpoints are on the Hugging Face hub in ``xswu/HPSv2``: ``HPS_v2_compressed.pt`` (v2.0) and
``HPS_v2.1_compressed.pt`` (v2.1), each a ``torch.save``-d dict whose ``'state_dict'`` holds the weights of an
open_clip ``CLIP`` model (ViT-H-14). open_clip is not a dependency: the state dict is converted to a
transformers ``CLIPModel`` whose sizes are read from the tensor shapes. The score is what the official
``hpsv2.score`` reports, cosine(image features, text features) without the logit scale (about 0.2–0.35 for
real images), and is used as log R. Images are preprocessed as open_clip's ViT-H-14 evaluation transform
(bicubic resize of the shorter side, centre crop, OpenAI CLIP mean/std), in torch so gradients reach them.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from ..config_base import StrictConfig
from ..errors import ConfigError
from ..loading import TOKENIZER_FILES, resolve_dir, resolve_file
from .base import Reward
from .preprocess import clip_preprocess


class HPSv2RewardConfig(StrictConfig):
    """HPSv2 / HPSv2.1: OpenCLIP ViT-H-14 with the HPS checkpoint; score = image–text cosine (as hpsv2.score)."""

    kind: Literal["hpsv2"] = "hpsv2"
    version: Literal["v2.0", "v2.1"] = "v2.1"
    checkpoint: str | None = Field(
        None,
        description="HPS .pt file: a local path or owner/repo:filename; None: xswu/HPSv2's "
        "HPS_v2_compressed.pt (v2.0) or HPS_v2.1_compressed.pt (v2.1)",
    )
    tokenizer: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", description="CLIP tokenizer directory (vocab.json, merges.txt) or hub id"
    )


HUB_REPO = "xswu/HPSv2"
#: reward.version → checkpoint file in HUB_REPO (as in the official package's ``hps_version_map``)
CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
#: attention head widths of open_clip's ViT-H-14 (vision 1280 / 16 heads, text 1024 / 16 heads)
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
#: open_clip's layer norms (torch defaults) and activation (nn.GELU, exact; HPS does not force QuickGELU)
LAYER_NORM_EPS = 1e-5
HIDDEN_ACT = "gelu"

_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
#: open_clip applies these as ``x @ P`` (width × projection); transformers' Linear stores Pᵀ
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def load_open_clip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The open_clip state dict in an HPS checkpoint (under ``'state_dict'``, or the file's top level), in fp32."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or "visual.proj" not in state_dict:
        raise ValueError("no open_clip ViT state dict (no 'visual.proj') at the top level or under 'state_dict'")
    return {key: value.float() for key, value in state_dict.items()}


def _num_blocks(state_dict: dict[str, Tensor], tower: str) -> int:
    return len({int(match[2]) for key in state_dict if (match := _BLOCK_KEY.match(key)) and (match[1] or "") == tower})


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise ValueError(f"{tower} width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def clip_config_from_open_clip(state_dict: dict[str, Tensor]) -> CLIPConfig:
    """The transformers config of an open_clip ViT CLIP: sizes read from its tensors, heads = width / head width."""
    from transformers import CLIPConfig

    patch_weight = state_dict["visual.conv1.weight"]  # (width, 3, patch, patch)
    vision_width, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    num_patches = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"visual.positional_embedding has {num_patches} patch positions, not a square grid")
    vocab_size, text_width = state_dict["token_embedding.weight"].shape
    projection_dim = state_dict["text_projection"].shape[1]
    if state_dict["visual.proj"].shape != (vision_width, projection_dim):
        raise ValueError(
            f"visual.proj has shape {tuple(state_dict['visual.proj'].shape)}, expected ({vision_width}, {projection_dim})"
        )
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _num_blocks(state_dict, "visual."),
        "num_attention_heads": _heads(vision_width, VISION_HEAD_WIDTH, "vision"),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": HIDDEN_ACT,
        "layer_norm_eps": LAYER_NORM_EPS,
    }
    text_config = {
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _num_blocks(state_dict, ""),
        "num_attention_heads": _heads(text_width, TEXT_HEAD_WIDTH, "text"),
        "vocab_size": vocab_size,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "hidden_act": HIDDEN_ACT,
        "layer_norm_eps": LAYER_NORM_EPS,
        # open_clip's vocabulary ends with <start_of_text>, <end_of_text>; it pads with 0
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def convert_open_clip_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP (ViT) keys → transformers ``CLIPModel`` keys; fused in_proj split into q/k/v."""
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _RENAMES:
            converted[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.T.contiguous()
        elif match := _BLOCK_KEY.match(key):
            tower = "vision_model" if match[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match[2]}.", match[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    converted[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, leaf = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                raise ValueError(f"unexpected open_clip key {key!r}")
            converted[f"{prefix}{_BLOCK_RENAMES[module]}.{leaf}"] = value
        else:
            raise ValueError(f"unexpected open_clip key {key!r}")
    return converted


def clip_model_from_open_clip(state_dict: dict[str, Tensor]) -> CLIPModel:
    """A transformers ``CLIPModel`` (fp32, eval) carrying exactly the weights of an open_clip ViT CLIP state dict."""
    from transformers import CLIPModel

    config = clip_config_from_open_clip(state_dict)
    model, info = CLIPModel.from_pretrained(
        None,
        config=config,
        state_dict=convert_open_clip_state_dict(state_dict),
        dtype=torch.float32,
        output_loading_info=True,
    )
    problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise ValueError(f"open_clip state dict does not fit CLIPModel: {problems or info['error_msgs']}")
    return model.eval()


class HPSv2Reward(Reward):
    """log R(y | prompt) = HPSv2 score: cosine of the OpenCLIP ViT-H-14 (HPS-finetuned) image and prompt features."""

    config_class = HPSv2RewardConfig

    uses_prompts = True

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer):
        super().__init__()
        vocab_size = model.config.text_config.vocab_size
        if len(tokenizer) != vocab_size or tokenizer.eos_token_id != vocab_size - 1:
            raise ConfigError(
                f"reward.tokenizer: a tokenizer with {len(tokenizer)} tokens (end of text = {tokenizer.eos_token_id}) does "
                f"not fit the checkpoint's text tower ({vocab_size} tokens, end of text = {vocab_size - 1}); "
                "point reward.tokenizer at the OpenCLIP ViT-H-14 tokenizer"
            )
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.image_size = model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, config) -> HPSv2Reward:
        source = config.checkpoint or f"{HUB_REPO}:{CHECKPOINT_FILES[config.version]}"
        path = resolve_file(source, "reward.checkpoint")
        tokenizer_dir = resolve_dir(
            config.tokenizer, "reward.tokenizer", required=("vocab.json", "merges.txt"), allow_patterns=TOKENIZER_FILES
        )
        try:
            model = clip_model_from_open_clip(load_open_clip_state_dict(path))
        except (KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            # torch.load(weights_only=True) refuses pickled objects other than tensors and containers
            # (pickle.UnpicklingError) and fails on truncated or foreign files (RuntimeError, EOFError)
            detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
            raise ConfigError(
                f"reward.checkpoint: {str(path)!r} is not an HPS (open_clip ViT) checkpoint "
                f"({type(error).__name__}: {detail})"
            ) from None
        from transformers import CLIPTokenizer

        return cls(model, CLIPTokenizer.from_pretrained(tokenizer_dir))

    def tokenize(self, prompts: list[str]) -> Tensor:
        """open_clip's token ids: <start> text <end>, truncated to the context length, padded with 0."""
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.context_length)["input_ids"]
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        for row, tokens in zip(ids, encoded):
            row[: len(tokens)] = torch.tensor(tokens)
        return ids

    def text_features_of_ids(self, ids: Tensor) -> Tensor:
        """L2-normalised text features, pooled at the end-of-text token (the largest id, as open_clip's argmax).

        Only the causal mask is applied, as in open_clip: tokens after the end of text cannot change its features."""
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # after the final layer norm
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> Tensor:
        """Features of each prompt, computed once per distinct prompt and cached."""
        device = self.model.logit_scale.device
        missing = sorted(set(prompts) - self._text_cache.keys())
        if missing:
            features = self.text_features_of_ids(self.tokenize(missing).to(device))
            self._text_cache.update(zip(missing, features))
        return torch.stack([self._text_cache[prompt].to(device) for prompt in prompts])

    def preprocess(self, y: Tensor) -> Tensor:
        """[0, 1] images → the normalised input of the vision tower (differentiable)."""
        return clip_preprocess(y, size=self.image_size)

    def image_features(self, y: Tensor) -> Tensor:
        pooled = self.model.vision_model(pixel_values=self.preprocess(y)).pooler_output  # post layer norm of CLS
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def log_reward(self, y: Tensor, cond: Tensor) -> Tensor:
        text = self.text_features(self.prompts_of(cond))
        return (self.image_features(y) * text).sum(dim=-1)
