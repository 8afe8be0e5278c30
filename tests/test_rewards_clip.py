"""CLIP rewards (aesthetic, PickScore, CLIP score) on tiny random CLIP models saved in the real formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.rewards import build_reward
from nablagfn.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

SIZE = 32  # the tiny vision tower's image_size
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.3, 0.2)  # not CLIP's, to see they are read from the directory
VOCAB = sorted(ByteLevel.alphabet())  # byte-level BPE with no merges: one token per byte
BOS, EOS = 2 * len(VOCAB), 2 * len(VOCAB) + 1
HEAD_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def _save_clip(directory: Path, projection_dim: int, seed: int) -> CLIPModel:
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = dict(tower, vocab_size=EOS + 1, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS)
    vision = dict(tower, image_size=SIZE, patch_size=8)
    config = CLIPConfig(
        text_config=dict(text, projection_dim=projection_dim),
        vision_config=dict(vision, projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    return model


def _save_tokenizer(directory: Path) -> None:
    vocab = {char: i for i, char in enumerate(VOCAB)}
    vocab.update({char + "</w>": len(VOCAB) + i for i, char in enumerate(VOCAB)})
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")


def _save_preprocessor(directory: Path) -> None:
    settings = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": SIZE},
        "crop_size": {"height": SIZE, "width": SIZE},
        "resample": 3,
        "image_mean": list(MEAN),
        "image_std": list(STD),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(settings))


class _Head(nn.Module):
    """The published aesthetic MLP's layout, written independently of the code under test."""

    def __init__(self) -> None:
        super().__init__()
        dropout = nn.Dropout(0.1)
        dims = [768, 1024, 128, 64, 16]
        self.layers = nn.Sequential(
            nn.Linear(dims[0], dims[1]), dropout, nn.Linear(dims[1], dims[2]), dropout,
            nn.Linear(dims[2], dims[3]), dropout, nn.Linear(dims[3], dims[4]), nn.Linear(dims[4], 1),
        )  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clip")
    aesthetic_model = _save_clip(root / "vit768", 768, seed=1)
    _save_preprocessor(root / "vit768")
    torch.manual_seed(2)
    head = _Head().eval()
    torch.save(head.state_dict(), root / "head.pth")
    clip_model = _save_clip(root / "clip16", 16, seed=3)
    _save_tokenizer(root / "clip16")
    _save_preprocessor(root / "clip16")
    _save_tokenizer(root / "processor")  # PickScore's processor directory: tokenizer + preprocessor, no model
    _save_preprocessor(root / "processor")
    return {"root": root, "aesthetic_model": aesthetic_model, "head": head, "clip_model": clip_model}


def _reward(kind: str, *settings: str):
    return build_reward(load_config(None, ["model.kind=digits", f"reward.kind={kind}", *settings]).reward)


def _aesthetic(assets: dict):
    return _reward(
        "aesthetic", f"reward.clip_model={assets['root'] / 'vit768'}", f"reward.head={assets['root'] / 'head.pth'}"
    )


def _text_reward(kind: str, assets: dict):
    root = assets["root"]
    if kind == "pickscore":
        return _reward("pickscore", f"reward.model={root / 'clip16'}", f"reward.tokenizer={root / 'processor'}")
    return _reward("clip", f"reward.model={root / 'clip16'}")


def _images(generator: torch.Generator, batch: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """Smooth random images in [0, 1], exactly representable as uint8 (so PIL sees the same pixels)."""
    coarse = torch.rand(batch, 3, 5, 5, generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth * 255).round() / 255


def _pil_pixels(y: torch.Tensor) -> torch.Tensor:
    """The reference preprocessing: transformers' CLIP image processor (PIL backend) on uint8 images."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD
    )
    images = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in y]
    return torch.as_tensor(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))


def _features(output) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


def test_aesthetic_loads_real_layout_and_matches_reference(assets):
    assert sorted(assets["head"].state_dict()) == sorted(HEAD_KEYS)  # the published file's keys
    reward = _aesthetic(assets)
    y = _images(torch.Generator().manual_seed(0), 3)
    with torch.no_grad():
        pixels = _pil_pixels(y)
        # no resize at the model's size: the torch preprocessing equals the processor's output
        torch.testing.assert_close(clip_preprocess(y, SIZE, MEAN, STD), pixels, atol=1e-5, rtol=0)
        embedding = F.normalize(_features(assets["aesthetic_model"].get_image_features(pixel_values=pixels)), dim=-1)
        expected = assets["head"].layers(embedding).squeeze(-1)
        actual = reward.log_reward(y, torch.zeros(3, dtype=torch.long))
    assert actual.shape == (3,)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_preprocessing_of_larger_image_matches_pil_bicubic():
    y = _images(torch.Generator().manual_seed(1), 2, height=40, width=50)  # resized to 32×40, cropped to 32×32
    ours = clip_preprocess(y, SIZE, MEAN, STD)
    reference = _pil_pixels(y)
    assert ours.shape == reference.shape == (2, 3, SIZE, SIZE)
    # both are antialiased bicubic; PIL rounds to uint8 (0.03 here is 1.5 uint8 levels at std 0.2)
    assert (ours - reference).abs().max() < 0.03
    assert (ours - reference).abs().mean() < 0.008


@pytest.mark.parametrize("kind", ["aesthetic", "pickscore", "clip"])
def test_gradient_finite_nonzero_and_weights_frozen(kind, assets):
    reward = _aesthetic(assets) if kind == "aesthetic" else _text_reward(kind, assets)
    reward.set_prompts(["a cat", "a dog"])
    reward.train()  # stays in eval mode
    assert not reward.training and not any(module.training for module in reward.modules())
    assert all(not parameter.requires_grad for parameter in reward.parameters())
    assert all(parameter.dtype == torch.float32 for parameter in reward.parameters())
    y = _images(torch.Generator().manual_seed(2), 2, height=48, width=48).requires_grad_(True)
    log_r = reward.log_reward(y, torch.tensor([0, 1]))
    assert log_r.shape == (2,) and torch.isfinite(log_r).all()
    (gradient,) = torch.autograd.grad(log_r.sum(), y)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    gray = y.detach()[:, :1]
    assert torch.isfinite(reward.log_reward(gray, torch.tensor([0, 1]))).all()  # one channel is repeated to three


@pytest.mark.parametrize("kind", ["pickscore", "clip"])
def test_text_rewards_match_clip_reference(kind, assets):
    reward = _text_reward(kind, assets)
    assert reward.uses_prompts
    assert (reward.encoder.mean, reward.encoder.std) == (MEAN, STD)
    prompts = ["a photo of a red cat", "an oil painting of a blue dog on a hill"]
    reward.set_prompts(prompts)
    y = _images(torch.Generator().manual_seed(3), 2)
    model = assets["clip_model"]
    tokenizer = CLIPTokenizer.from_pretrained(assets["root"] / "processor")
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        text = F.normalize(_features(model.get_text_features(**tokens)), dim=-1)
        image = F.normalize(_features(model.get_image_features(pixel_values=_pil_pixels(y))), dim=-1)
        scale = model.logit_scale.exp() if kind == "pickscore" else 100.0
        expected = scale * (image * text).sum(-1)
        actual = reward.log_reward(y, torch.tensor([0, 1]))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pickscore", "clip"])
def test_each_sample_uses_its_own_prompt_and_text_is_cached(kind, assets):
    reward = _text_reward(kind, assets)
    reward.set_prompts(["a red cat", "a blue dog on a hill"])
    calls = []
    reward.text_model.register_forward_hook(lambda *args: calls.append(1))
    image = _images(torch.Generator().manual_seed(4), 1)
    y = image.expand(2, -1, -1, -1)
    with torch.no_grad():
        together = reward.log_reward(y, torch.tensor([0, 1]))
        alone = torch.cat([reward.log_reward(image, torch.tensor([i])) for i in (0, 1)])
        swapped = reward.log_reward(y, torch.tensor([1, 0]))
    assert len(calls) == 1  # both prompts embedded once, then served from the cache
    assert not torch.allclose(together[0], together[1])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swapped, together.flip(0))


def test_normalisation_defaults_to_clip_without_preprocessor_config(assets, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(assets["root"] / "clip16", bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    reward = _reward("clip", f"reward.model={bare}")
    encoder = reward.encoder
    assert (encoder.mean, encoder.std, encoder.image_size) == (CLIP_MEAN, CLIP_STD, SIZE)


def test_missing_or_wrong_weights_raise_config_error(assets, tmp_path):
    root = assets["root"]
    with pytest.raises(ConfigError, match=r"reward\.head.*missing\.pth"):
        _reward("aesthetic", f"reward.clip_model={root / 'vit768'}", f"reward.head={tmp_path / 'missing.pth'}")
    with pytest.raises(ConfigError, match=r"reward\.head.*sac\+logos\+ava1-l14-linearMSE\.pth"):
        _reward("aesthetic", f"reward.clip_model={root / 'vit768'}")  # the default hub file, offline
    with pytest.raises(ConfigError, match=r"reward\.clip_model.*config\.json"):
        _reward("aesthetic", f"reward.clip_model={tmp_path}", f"reward.head={root / 'head.pth'}")
    with pytest.raises(ConfigError, match=r"reward\.model.*nowhere"):
        _reward("clip", f"reward.model={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"reward\.tokenizer.*vocab\.json"):
        _reward("pickscore", f"reward.model={root / 'clip16'}", f"reward.tokenizer={tmp_path}")
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "not_a_head.pth")
    with pytest.raises(ConfigError, match=r"reward\.head.*not_a_head\.pth"):
        _reward("aesthetic", f"reward.clip_model={root / 'vit768'}", f"reward.head={tmp_path / 'not_a_head.pth'}")
    with pytest.raises(ConfigError, match=r"reward\.head.*768"):  # head for ViT-L/14, CLIP with 16-dim embeddings
        _reward("aesthetic", f"reward.clip_model={root / 'clip16'}", f"reward.head={root / 'head.pth'}")


def test_clip_weights_are_read_from_safetensors_only(assets, tmp_path):
    """A CLIP directory holding only a pickled pytorch_model.bin is refused, not unpickled."""
    directory = tmp_path / "vit768_bin"
    shutil.copytree(assets["root"] / "vit768", directory)
    state = CLIPModel.from_pretrained(directory).state_dict()
    for weights in directory.glob("*.safetensors"):
        weights.unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"reward\.clip_model: could not load a CLIP model from .*vit768_bin"):
        _reward("aesthetic", f"reward.clip_model={directory}", f"reward.head={assets['root'] / 'head.pth'}")
