"""ImageReward: a tiny random checkpoint in the official key layout, checked against transformers' BLIP towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.rewards import build_reward
from nablagfn.rewards.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardArch,
    ImageRewardModel,
    load_blip_tokenizer,
)
from nablagfn.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "on"]
VOCAB += ["the", "grass", "##s"]
# vision width 192 (3 heads) differs from text width 128 (2 heads): cross-attention keys/values read 192 features
TINY = {
    "image": 32,
    "patch": 8,
    "vision_width": 192,
    "vision_depth": 2,
    "text_width": 128,
    "text_depth": 2,
    "intermediate": 256,
    "vocab": len(VOCAB) + 2,
    "positions": 40,
    "head": (128, 64, 32, 16, 8, 1),
}
OFFICIAL = {
    "image": 224,
    "patch": 16,
    "vision_width": 1024,
    "vision_depth": 24,
    "text_width": 768,
    "text_depth": 12,
    "intermediate": 3072,
    "vocab": 30524,
    "positions": 512,
    "head": (768, 1024, 128, 64, 16, 1),
}
PROMPTS = ["a photo of a cat", "a red car on the grass", "dogs"]


def official_state_dict(sizes: dict, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the keys of THUDM's ImageReward.pt (``ImageReward`` = BLIP_Pretrain + MLP head)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.08, mean: float = 0.0) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return mean + std * torch.randn(shape, generator=generator)

    def linear(name: str, n_out: int, n_in: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = rand(n_out, n_in, std=n_in**-0.5), rand(n_out, std=0.02)

    def layer_norm(name: str, width: int) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = rand(width, std=0.1, mean=1.0), rand(width, std=0.05)

    state: dict[str, torch.Tensor] = {}
    v, t, p = sizes["vision_width"], sizes["text_width"], sizes["patch"]
    vis = "blip.visual_encoder"
    state[f"{vis}.cls_token"] = rand(1, 1, v, std=0.5)
    state[f"{vis}.pos_embed"] = rand(1, (sizes["image"] // p) ** 2 + 1, v, std=0.5)
    state[f"{vis}.patch_embed.proj.weight"], state[f"{vis}.patch_embed.proj.bias"] = rand(v, 3, p, p, std=0.05), rand(v)
    for i in range(sizes["vision_depth"]):
        block = f"{vis}.blocks.{i}"
        layer_norm(f"{block}.norm1", v)
        linear(f"{block}.attn.qkv", 3 * v, v)
        linear(f"{block}.attn.proj", v, v)
        layer_norm(f"{block}.norm2", v)
        linear(f"{block}.mlp.fc1", 4 * v, v)
        linear(f"{block}.mlp.fc2", v, 4 * v)
    layer_norm(f"{vis}.norm", v)
    text = "blip.text_encoder"
    state[f"{text}.embeddings.position_ids"] = torch.arange(sizes["positions"]).expand(1, -1).to(device)
    state[f"{text}.embeddings.word_embeddings.weight"] = rand(sizes["vocab"], t, std=0.5)
    state[f"{text}.embeddings.position_embeddings.weight"] = rand(sizes["positions"], t, std=0.5)
    layer_norm(f"{text}.embeddings.LayerNorm", t)
    for i in range(sizes["text_depth"]):
        layer = f"{text}.encoder.layer.{i}"
        for attention, context in (("attention", t), ("crossattention", v)):
            linear(f"{layer}.{attention}.self.query", t, t)
            linear(f"{layer}.{attention}.self.key", t, context)
            linear(f"{layer}.{attention}.self.value", t, context)
            linear(f"{layer}.{attention}.output.dense", t, t)
            layer_norm(f"{layer}.{attention}.output.LayerNorm", t)
        linear(f"{layer}.intermediate.dense", sizes["intermediate"], t)
        linear(f"{layer}.output.dense", t, sizes["intermediate"])
        layer_norm(f"{layer}.output.LayerNorm", t)
    linear("blip.vision_proj", 256, v)
    linear("blip.text_proj", 256, t)
    head = sizes["head"]
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), head[:-1], head[1:]):
        linear(f"mlp.layers.{index}", n_out, n_in)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    state = official_state_dict(TINY)
    torch.save(state, root / "ImageReward.pt")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root, state


def reward_config(checkpoint, tokenizer):
    overrides = ["model.kind=digits", "reward.kind=imagereward"]
    overrides += [f"reward.checkpoint={checkpoint}", f"reward.tokenizer={tokenizer}"]
    return load_config(None, overrides).reward


@pytest.fixture(scope="module")
def reward(files) -> ImageRewardModel:
    root, _ = files
    model = build_reward(reward_config(root / "ImageReward.pt", root / "tokenizer"))
    model.set_prompts(PROMPTS)
    return model


def random_images(batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, list[Image.Image]]:
    """uint8 RGB images as [0, 1] tensors and as PIL images (the same pixels)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)
    y = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return y, [Image.fromarray(image) for image in pixels]


def processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def reference_scores(state: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """transformers' BlipVisionModel and BlipTextModel (weights renamed from the official keys) + the head by hand."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    v, t = TINY["vision_width"], TINY["text_width"]
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=v,
            intermediate_size=4 * v,
            num_hidden_layers=TINY["vision_depth"],
            num_attention_heads=v // 64,
            image_size=TINY["image"],
            patch_size=TINY["patch"],
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    )
    renames = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj": "embeddings.patch_embedding",
        "blocks.": "encoder.layers.",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
    }
    vision_state = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for old, new in renames.items():
                name = name.replace(old, new)
            vision_state["post_layernorm." + name[5:] if name.startswith("norm.") else name] = value
    vision.load_state_dict(vision_state, strict=True)
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=TINY["vocab"],
            hidden_size=t,
            encoder_hidden_size=v,
            intermediate_size=TINY["intermediate"],
            num_hidden_layers=TINY["text_depth"],
            num_attention_heads=t // 64,
            max_position_embeddings=TINY["positions"],
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            is_decoder=True,
        ),
        add_pooling_layer=False,
    )
    text_state = {
        key.removeprefix("blip.text_encoder."): value
        for key, value in state.items()
        if key.startswith("blip.text_encoder.") and not key.endswith("position_ids")
    }
    text.load_state_dict(text_state, strict=True)
    with torch.no_grad():
        image_tokens = vision(pixel_values=pixels).last_hidden_state
        states = text(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
    features = states[:, 0]
    for index in (0, 2, 4, 6, 7):
        features = F.linear(features, state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"])
    return (features.squeeze(-1) - REWARD_MEAN) / REWARD_STD


def test_architecture_read_from_checkpoint_shapes():
    tiny = ImageRewardArch.from_state_dict(official_state_dict(TINY))
    assert (tiny.image_size, tiny.patch_size, tiny.vision_width, tiny.vision_depth, tiny.vision_heads) == (
        32,
        8,
        192,
        2,
        3,
    )
    assert (tiny.text_width, tiny.text_depth, tiny.text_heads, tiny.vocab_size) == (128, 2, 2, len(VOCAB) + 2)
    official = ImageRewardArch.from_state_dict(official_state_dict(OFFICIAL, device="meta"))
    assert (official.image_size, official.patch_size, official.vision_width, official.vision_depth) == (
        224,
        16,
        1024,
        24,
    )
    assert (official.vision_heads, official.vision_mlp, official.text_heads, official.text_depth) == (16, 4096, 12, 12)
    assert official.head_sizes == (768, 1024, 128, 64, 16, 1) and official.vocab_size == 30524


def test_loads_real_format_and_tokenizes_like_blip(reward, files):
    assert isinstance(reward, ImageRewardModel) and reward.uses_prompts and reward.differentiable
    assert reward.arch.image_size == 32 and reward.arch.text_heads == 2
    assert all(not parameter.requires_grad for parameter in reward.parameters())
    tokenizer = reward.tokenizer
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    ids, mask = reward.prompt_tokens(["A photo of cats", "unknown words"], torch.device("cpu"))
    assert ids.shape == mask.shape == (2, 35)
    cls, sep = VOCAB.index("[CLS]"), VOCAB.index("[SEP]")
    expected = [cls] + [VOCAB.index(word) for word in ("a", "photo", "of", "cat", "##s")] + [sep]
    assert ids[0, :7].tolist() == expected and ids[0, 7:].eq(0).all() and mask[0].sum() == 7
    assert ids[1, :4].tolist() == [cls, 1, 1, sep]


def test_log_reward_finite_with_image_gradient(reward):
    y, _ = random_images(3, 40, 48, seed=1)
    y.requires_grad_(True)
    scores = reward.log_reward(y, torch.tensor([0, 1, 2]))
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    (gradient,) = torch.autograd.grad(scores.sum(), y)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    grey = reward.log_reward(y[:, :1].detach(), torch.tensor([0, 1, 2]))
    assert grey.shape == (3,) and torch.isfinite(grey).all()


def test_preprocessing_matches_clip_image_processor(reward):
    size = reward.arch.image_size
    y, images = random_images(2, size, size, seed=2)
    reference = processor(size)(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(clip_preprocess(y, size), reference, atol=1e-5, rtol=1e-5)  # no resize: exact
    y, images = random_images(2, 96, 80, seed=3)  # smooth it so bicubic resampling differences stay small
    y = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
    images = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in y]
    y = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in images])
    reference = processor(size)(images, return_tensors="pt")["pixel_values"]
    difference = (clip_preprocess(y, size) - reference).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.15


def test_score_matches_transformers_blip_reference(reward, files):
    _, state = files
    size = reward.arch.image_size
    y, images = random_images(3, size, size, seed=4)
    cond = torch.tensor([2, 0, 1])
    ids, mask = reward.prompt_tokens([PROMPTS[i] for i in cond], torch.device("cpu"))
    pixels = processor(size)(images, return_tensors="pt")["pixel_values"]
    expected = reference_scores(state, pixels, ids, mask)
    with torch.no_grad():
        actual = reward.log_reward(y, cond)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 1e-3  # the scores are not degenerate


def test_each_sample_uses_its_own_prompt(reward):
    y, _ = random_images(2, 32, 32, seed=5)
    with torch.no_grad():
        together = reward.log_reward(y, torch.tensor([0, 1]))
        alone = torch.cat([reward.log_reward(y[:1], torch.tensor([0])), reward.log_reward(y[1:], torch.tensor([1]))])
        swapped = reward.log_reward(y, torch.tensor([1, 0]))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert (together - swapped).abs().min() > 1e-4


def test_prompts_are_tokenized_once(reward, monkeypatch):
    calls = []
    tokenizer = reward.tokenizer

    def counting(*args, **kwargs):
        calls.append(args)
        return tokenizer(*args, **kwargs)

    monkeypatch.setattr(reward, "tokenizer", counting)
    y, _ = random_images(3, 32, 32, seed=6)
    with torch.no_grad():
        reward.log_reward(y, torch.tensor([0, 1, 2]))
        reward.log_reward(y, torch.tensor([2, 2, 1]))
    assert calls == []


def test_missing_weights_name_the_file_and_key(files, tmp_path):
    root, state = files
    with pytest.raises(ConfigError, match=r"reward\.checkpoint.*ImageReward\.pt"):
        build_reward(reward_config(tmp_path / "ImageReward.pt", root / "tokenizer"))
    with pytest.raises(ConfigError, match=r"ImageReward\.pt.*reward\.checkpoint"):
        build_reward(reward_config("nobody/no-such-repo:ImageReward.pt", root / "tokenizer"))
    with pytest.raises(ConfigError, match=r"reward\.tokenizer"):
        build_reward(reward_config(root / "ImageReward.pt", tmp_path / "no-tokenizer"))
    with pytest.raises(ConfigError, match=r"reward\.tokenizer.*vocab\.txt"):
        build_reward(reward_config(root / "ImageReward.pt", tmp_path))
    with pytest.raises(ConfigError, match=r"reward\.tokenizer.*vocab\.txt"):
        load_blip_tokenizer("nobody/no-such-tokenizer")
    torch.save({**state, "blip.itm_head.weight": torch.zeros(2, 128)}, tmp_path / "extra.pt")
    with pytest.raises(ConfigError, match=r"(?s)reward\.checkpoint.*itm_head"):
        build_reward(reward_config(tmp_path / "extra.pt", root / "tokenizer"))
