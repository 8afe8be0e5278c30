"""HPSv2 reward: a tiny random-weight checkpoint in the real HPS format (open_clip keys, torch.save) and a tiny
CLIP tokenizer directory, loaded through build_reward and checked against a plain-torch open_clip forward pass."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from nablagfn.config_loading import load_config
from nablagfn.errors import ConfigError
from nablagfn.rewards import build_reward
from nablagfn.rewards.hpsv2 import HPSv2Reward, clip_config_from_open_clip, convert_open_clip_state_dict

# tiny open_clip ViT: heads follow ViT-H-14's head widths (80 vision, 64 text) → 2 heads each
VISION_WIDTH, VISION_LAYERS, PATCH, IMAGE = 160, 2, 8, 32
TEXT_WIDTH, TEXT_LAYERS, CONTEXT = 128, 2, 77
PROJECTION = 48
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) uses for the bytes 0–255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def _vocab() -> list[str]:
    """As open_clip's: bytes, bytes + </w>, merges, then <start_of_text>, <end_of_text> (the two largest ids)."""
    chars = _byte_alphabet()
    merged = ["".join(merge.split()) for merge in MERGES]
    return chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]


VOCAB = {token: i for i, token in enumerate(_vocab())}
SOT, EOT = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]


def _open_clip_shapes(vision: tuple[int, int, int, int], text: tuple[int, int, int, int], projection: int):
    """Key → shape of open_clip's CLIP (ViT): vision = (width, layers, patch, image), text = (width, layers, vocab, context)."""
    vision_width, vision_layers, patch, image = vision
    text_width, text_layers, vocab, context = text

    def layer_norm(name: str, width: int) -> dict:
        return {f"{name}.weight": (width,), f"{name}.bias": (width,)}

    def blocks(prefix: str, width: int, layers: int) -> dict:
        shapes = {}
        for i in range(layers):
            block = f"{prefix}transformer.resblocks.{i}."
            shapes |= layer_norm(block + "ln_1", width) | layer_norm(block + "ln_2", width)
            shapes |= {block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,)}
            shapes |= {block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,)}
            shapes |= {block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,)}
            shapes |= {block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,)}
        return shapes

    return {
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": ((image // patch) ** 2 + 1, vision_width),
        **layer_norm("visual.ln_pre", vision_width),
        **blocks("visual.", vision_width, vision_layers),
        **layer_norm("visual.ln_post", vision_width),
        "visual.proj": (vision_width, projection),
        "token_embedding.weight": (vocab, text_width),
        "positional_embedding": (context, text_width),
        **blocks("", text_width, text_layers),
        **layer_norm("ln_final", text_width),
        "text_projection": (text_width, projection),
        "logit_scale": (),
    }


def _random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values at scales that keep activations of order one (and make every tensor distinct)."""
    noise = torch.randn(shape, generator=generator)
    if name == "logit_scale":
        return torch.tensor(math.log(1 / 0.07))
    if re.search(r"ln_\w+\.weight$", name):
        return 1 + 0.2 * noise
    if name.endswith("bias"):
        return 0.2 * noise if "ln_" in name else 0.1 * noise
    if "embedding" in name:
        return 0.5 * noise
    if name == "visual.conv1.weight":
        return 0.05 * noise
    fan_in = shape[0] if name in ("visual.proj", "text_projection") else shape[-1]  # open_clip computes x @ proj
    return noise * fan_in**-0.5


def _open_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's random weights with open_clip's key names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = _open_clip_shapes(
        (VISION_WIDTH, VISION_LAYERS, PATCH, IMAGE), (TEXT_WIDTH, TEXT_LAYERS, len(VOCAB), CONTEXT), PROJECTION
    )
    return {name: _random_weight(name, shape, generator) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return _open_clip_state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory, state_dict):
    """The HPS checkpoint (open_clip weights under 'state_dict'), the same weights at the top level, a tokenizer dir."""
    root = tmp_path_factory.mktemp("hpsv2")
    torch.save({"state_dict": state_dict}, root / "HPS_v2.1_compressed.pt")
    torch.save(state_dict, root / "top_level.pt")
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text(json.dumps(VOCAB))
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return root


def _build(checkpoint, tokenizer) -> HPSv2Reward:
    config = load_config(
        None,
        ["model.kind=digits", "reward.kind=hpsv2", f"reward.checkpoint={checkpoint}", f"reward.tokenizer={tokenizer}"],
    )
    return build_reward(config.reward)


@pytest.fixture(scope="module")
def reward(files) -> HPSv2Reward:
    reward = _build(files / "HPS_v2.1_compressed.pt", files / "tokenizer")
    reward.set_prompts(["a cat", "a dog", "cat dog cat"])
    return reward


# ---- an independent open_clip forward pass in plain torch, on the raw open_clip state dict ----


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def _residual_block(x, state, prefix, heads, mask=None):
    batch, length, width = x.shape
    qkv = (
        _layer_norm(x, state, prefix + "ln_1") @ state[prefix + "attn.in_proj_weight"].T
        + state[prefix + "attn.in_proj_bias"]
    )
    q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ state[prefix + "attn.out_proj.weight"].T + state[prefix + "attn.out_proj.bias"]
    hidden = (
        _layer_norm(x, state, prefix + "ln_2") @ state[prefix + "mlp.c_fc.weight"].T + state[prefix + "mlp.c_fc.bias"]
    )
    return x + F.gelu(hidden) @ state[prefix + "mlp.c_proj.weight"].T + state[prefix + "mlp.c_proj.bias"]


def reference_image_features(state, pixels):
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = _layer_norm(x + state["visual.positional_embedding"], state, "visual.ln_pre")
    for i in range(VISION_LAYERS):
        x = _residual_block(x, state, f"visual.transformer.resblocks.{i}.", heads=VISION_WIDTH // 80)
    return F.normalize(_layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"], dim=-1)


def reference_text_features(state, ids):
    x = state["token_embedding.weight"][ids] + state["positional_embedding"]
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for i in range(TEXT_LAYERS):
        x = _residual_block(x, state, f"transformer.resblocks.{i}.", heads=TEXT_WIDTH // 64, mask=causal)
    x = _layer_norm(x, state, "ln_final")
    return F.normalize(x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"], dim=-1)


def open_clip_ids(*tokens: list[str]) -> torch.Tensor:
    """open_clip's tokenizer output: <start> tokens <end>, zero-padded to the context length."""
    ids = torch.zeros(len(tokens), CONTEXT, dtype=torch.long)
    for row, words in zip(ids, tokens):
        sequence = [SOT, *(VOCAB[word] for word in words), EOT]
        row[: len(sequence)] = torch.tensor(sequence)
    return ids


# ---- tests ----


def test_loads_the_hps_checkpoint_format_with_sizes_from_the_tensors(reward, state_dict):
    assert isinstance(reward, HPSv2Reward) and reward.uses_prompts and reward.differentiable
    vision, text = reward.model.config.vision_config, reward.model.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        VISION_WIDTH,
        VISION_LAYERS,
        2,
    )
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (PATCH, IMAGE, 4 * VISION_WIDTH)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (TEXT_WIDTH, TEXT_LAYERS, 2)
    assert (text.vocab_size, text.max_position_embeddings) == (len(VOCAB), CONTEXT)
    assert reward.model.config.projection_dim == PROJECTION
    assert not any(p.requires_grad for p in reward.parameters())
    # q/k/v are the thirds of open_clip's fused in_proj; projections are transposed
    attention = reward.model.vision_model.encoder.layers[1].self_attn
    q, k, v = state_dict["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(attention.q_proj.weight, q) and torch.equal(attention.k_proj.weight, k)
    assert torch.equal(attention.v_proj.weight, v)
    assert torch.equal(reward.model.text_projection.weight, state_dict["text_projection"].T)


def test_vit_h_14_layout_gives_the_vit_h_14_config_and_every_clip_model_weight():
    """The real HPS checkpoint's shapes (on the meta device: no memory) → open_clip's ViT-H-14 sizes, all keys mapped."""
    shapes = _open_clip_shapes((1280, 32, 14, 224), (1024, 24, 49408, 77), 1024)
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    config = clip_config_from_open_clip(state)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (
        1280,
        32,
        16,
        5120,
    )
    assert (vision.patch_size, vision.image_size) == (14, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert (text.vocab_size, text.max_position_embeddings, config.projection_dim) == (49408, 77, 1024)
    assert vision.hidden_act == text.hidden_act == "gelu" and vision.layer_norm_eps == text.layer_norm_eps == 1e-5
    with torch.device("meta"):
        expected = CLIPModel(config).state_dict()
    converted = convert_open_clip_state_dict(state)
    assert converted.keys() == expected.keys()
    assert all(converted[name].shape == expected[name].shape for name in expected)
    assert sum(t.numel() for t in converted.values()) == pytest.approx(986.1e6, rel=1e-3)  # ViT-H-14's 986M parameters


def test_state_dict_at_the_top_level_loads_the_same(files, reward):
    top_level = _build(files / "top_level.pt", files / "tokenizer")
    top_level.set_prompts(reward.prompts)
    y, cond = torch.rand(2, 3, IMAGE, IMAGE), torch.tensor([0, 1])
    assert torch.equal(top_level.log_reward(y, cond), reward.log_reward(y, cond))


def test_log_reward_is_finite_with_a_nonzero_gradient(reward):
    y = torch.rand(3, 3, 40, 48, requires_grad=True)
    scores = reward.log_reward(y, torch.tensor([0, 1, 2]))
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 1 + 1e-6).all()
    (grad,) = torch.autograd.grad(scores.sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    gray = reward.log_reward(torch.rand(2, 1, IMAGE, IMAGE), torch.tensor([0, 1]))
    assert gray.shape == (2,) and torch.isfinite(gray).all()


def test_preprocessing_matches_the_clip_image_processor(reward):
    """open_clip's ViT-H-14 evaluation transform = CLIP's: bicubic resize of the shorter side, centre crop, normalise."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    cases = []  # smooth images (as decoded samples are): bicubic differences between PIL and torch stay small
    for height, width in ((64, 64), (48, 72)):
        cases.append((np.array(base.resize((width, height), Image.BILINEAR)), 0.03))
    cases.append((cases[-1][0][8 : 8 + IMAGE, 20 : 20 + IMAGE].copy(), 1e-5))  # model size: no resize, exact
    for array, tolerance in cases:
        expected = torch.from_numpy(processor(Image.fromarray(array), return_tensors="np")["pixel_values"])
        ours = reward.preprocess(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)
        assert ours.shape == expected.shape == (1, 3, IMAGE, IMAGE)
        assert (ours - expected).abs().max() < tolerance


def test_tokens_are_open_clip_s(reward):
    assert torch.equal(reward.tokenize(["a cat", "A  Dog"]), open_clip_ids(["a</w>", "cat</w>"], ["a</w>", "dog</w>"]))
    long = reward.tokenize(["cat " * 100])[0]
    assert long.shape == (CONTEXT,) and long[0] == SOT and long[-1] == EOT and (long[1:-1] == VOCAB["cat</w>"]).all()


def test_score_equals_an_open_clip_forward_pass(reward, state_dict):
    """HPS score = normalised image features · normalised text features, computed on open_clip's raw weights."""
    y = torch.rand(3, 3, IMAGE, IMAGE)  # at the model's size preprocessing only normalises
    expected = (
        reference_image_features(state_dict, (y - MEAN) / STD)
        * reference_text_features(
            state_dict, open_clip_ids(["a</w>", "cat</w>"], ["a</w>", "dog</w>"], ["a</w>", "cat</w>"])
        )
    ).sum(-1)
    assert torch.allclose(reward.log_reward(y, torch.tensor([0, 1, 0])), expected, atol=1e-5)


def test_tokens_after_the_end_of_text_do_not_change_text_features(reward, state_dict):
    """open_clip pads with 0 and applies only a causal mask: anything after <end> is invisible to its features."""
    ids = open_clip_ids(["a</w>", "cat</w>"], ["cat</w>", "dog</w>", "cat</w>"])
    noisy = ids.clone()
    after_end = torch.arange(CONTEXT) > ids.argmax(dim=-1, keepdim=True)
    noisy[after_end] = torch.randint(0, EOT, (int(after_end.sum()),), generator=torch.Generator().manual_seed(1))
    features = reward.text_features_of_ids(ids)
    assert torch.allclose(reward.text_features_of_ids(noisy), features, atol=1e-6)
    assert torch.allclose(features, reference_text_features(state_dict, noisy), atol=1e-5)


def test_each_sample_is_scored_with_its_own_prompt(reward):
    y = torch.rand(2, 3, IMAGE, IMAGE)
    together = reward.log_reward(y, torch.tensor([0, 1]))
    alone = torch.cat([reward.log_reward(y[:1], torch.tensor([0])), reward.log_reward(y[1:], torch.tensor([1]))])
    assert torch.allclose(together, alone, atol=1e-6)
    assert not torch.allclose(together, reward.log_reward(y, torch.tensor([1, 0])), atol=1e-4)


def test_text_features_are_computed_once_per_prompt(files, monkeypatch):
    reward = _build(files / "HPS_v2.1_compressed.pt", files / "tokenizer")
    reward.set_prompts(["a cat", "a dog"])
    encoded: list[int] = []
    encode = reward.text_features_of_ids
    monkeypatch.setattr(reward, "text_features_of_ids", lambda ids: encoded.append(len(ids)) or encode(ids))
    y = torch.rand(3, 3, IMAGE, IMAGE)
    first = reward.log_reward(y, torch.tensor([0, 1, 0]))
    second = reward.log_reward(y, torch.tensor([0, 1, 1]))
    assert encoded == [2] and torch.equal(first[:2], second[:2])


def test_missing_files_raise_config_errors_naming_the_file_and_key(files, tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.checkpoint.*absent\.pt"):
        _build(tmp_path / "absent.pt", files / "tokenizer")
    # the default is the version's file on the hub, unreachable offline (HF_HUB_OFFLINE=1 in conftest)
    config = load_config(None, ["model.kind=digits", "reward.kind=hpsv2", "reward.version=v2.0"])
    with pytest.raises(ConfigError, match=r"HPS_v2_compressed\.pt.*xswu/HPSv2.*reward\.checkpoint"):
        build_reward(config.reward)
    with pytest.raises(ConfigError, match=r"reward\.tokenizer"):
        _build(files / "HPS_v2.1_compressed.pt", tmp_path / "no_tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"reward\.tokenizer.*vocab\.json"):
        _build(files / "HPS_v2.1_compressed.pt", tmp_path / "empty")
    torch.save({"state_dict": {"weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"reward\.checkpoint.*other\.pt"):
        _build(tmp_path / "other.pt", files / "tokenizer")


def test_checkpoint_holding_pickled_code_is_refused(files, tmp_path):
    """torch.load(weights_only=True) refuses the pickled call; the error names the key and the file."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    torch.save({"visual.proj": Payload()}, tmp_path / "trap.pt")
    with pytest.raises(ConfigError, match=r"reward\.checkpoint.*trap\.pt.*UnpicklingError"):
        _build(tmp_path / "trap.pt", files / "tokenizer")
    assert not marker.exists()
