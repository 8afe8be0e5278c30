"""Reward parity against the reference implementations (issue 15, item 2).

Per reward, two checks against the reference code, on random weights written in the real checkpoint format:

1. full size: the reference builds the real architecture (random weights) and saves it as the published file does;
   our loader (``build_reward`` on that file) must consume every tensor (matched by value: as is, transposed, or as
   the q/k/v thirds of a fused projection), miss none of its own, and leave over only tensors that the reference's
   own score never reads (their gradient is None in the reference, checked on the small model);
2. numbers: a smaller model with the same key structure, the same weights on both sides, the same images (given at
   the model's input size, values k/255) and prompts: our ``log_reward`` and its gradient w.r.t. the image against
   the reference's score and autograd through it. The reference is fed the [0, 1] pixel tensor normalised by its
   own Normalize step (its resize/crop is PIL-based); its own PIL preprocessing is also run, for the score alone.

References: HPSv2 — open_clip (``open_clip.create_model('ViT-H-14')``, tokens from open_clip's tokenizer);
ImageReward — the ``image-reward`` package's ``ImageReward`` class (BLIP med/vit code) with the old transformers,
timm and fairscale it needs; aesthetic — transformers' ``CLIPModel`` (openai/clip-vit-large-patch14 config) and
LAION's MLP; PickScore — transformers' ``CLIPModel`` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K config). The two
package references run in throw-away environments (not project dependencies); nothing downloads weights
(HF_HUB_OFFLINE=1; tokenizer files are made here, and both sides read the same ones).

    .venv/bin/python benchmarks/reward_parity.py --setup            # the throw-away envs under --envs (once)
    .venv/bin/python benchmarks/reward_parity.py --reward all       # or hpsv2 | imagereward | aesthetic | pickscore

Results: a table on stdout and benchmarks/results/reward_parity/<reward>.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reward_parity"
REWARDS = ("hpsv2", "imagereward", "aesthetic", "pickscore")
#: reward → throw-away environment (None: the project's venv, whose transformers is the reference)
ENV_OF = {"hpsv2": "open_clip", "imagereward": "imagereward", "aesthetic": None, "pickscore": None}
TORCH_PAIR = ["torch==2.14.1", "torchvision==0.29.1"]
#: environment → pip install steps (image-reward without its training-only deps: diffusers, datasets, accelerate)
ENV_INSTALLS = {
    "open_clip": [[*TORCH_PAIR, "open_clip_torch==3.3.0", "safetensors"]],
    "imagereward": [
        [*TORCH_PAIR, "setuptools", "wheel", "numpy<2", "safetensors"],
        ["timm==0.6.13", "transformers==4.27.4", "huggingface-hub<0.26"],
        ["--no-build-isolation", "fairscale==0.4.13"],
        ["--no-deps", "image-reward==1.5"],
    ],
}
REFERENCE_PACKAGES = ("torch", "torchvision", "open_clip_torch", "image-reward", "transformers", "timm", "fairscale")

PROMPTS = ["a cat", "a red dog on the grass", "cat dog cat"]
IMAGE_SIZE = 224
NOISE = 0.02  # added to every float tensor of the reference: distinct values (no all-ones layer norms), same scale

# ---- the published configs (architecture fields) ----
CLIP_L14 = {  # openai/clip-vit-large-patch14 config.json
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 224, "intermediate_size": 4096,
                      "layer_norm_eps": 1e-05, "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}  # fmt: skip
CLIP_H14 = {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json (PickScore_v1 has the same)
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 1024, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
                    "max_position_embeddings": 77, "num_attention_heads": 16, "num_hidden_layers": 24,
                    "projection_dim": 1024, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2,
                    "pad_token_id": 1},
    "vision_config": {"hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "intermediate_size": 5120,
                      "layer_norm_eps": 1e-05, "num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14,
                      "projection_dim": 1024},
}  # fmt: skip
MED_CONFIG = {  # ImageReward's med_config.json (BLIP's BERT-base with cross-attention)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}  # fmt: skip
#: the small models: the same key structure, fewer and narrower layers (head widths as the real ones)
SMALL_TOWER = {"num_hidden_layers": 2}
SMALL_CLIP_WIDTHS = {"text": (128, 256), "vision": (160, 320), "projection": 48}
SMALL_MED = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "max_position_embeddings": 64}  # fmt: skip
SMALL_VIT = {"embed_dim": 192, "depth": 2, "num_heads": 3}  # ImageReward's ViT: head width 64 as ViT-L/16
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "g r", "gr a"]
WORDPIECES = ["a", "cat", "red", "dog", "on", "the", "grass", "##s", "photo", "of"]


# ---------------------------------------------------------------- tokenizer files (both sides read them)


def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character map of byte-level BPE (GPT-2, CLIP, open_clip), in open_clip's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]))


def write_tokenizers(directory: Path) -> None:
    """A tiny CLIP BPE (vocab.json, merges.txt, open_clip's merges .txt.gz) in open_clip's vocabulary order, a
    preprocessor_config.json, and a tiny BERT vocab.txt (ImageReward)."""
    clip_dir, bert_dir = directory / "clip_tokenizer", directory / "bert_tokenizer"
    clip_dir.mkdir(parents=True, exist_ok=True)
    bert_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (clip_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    merges = "#version: 0.2\n" + "\n".join(MERGES) + "\n"
    (clip_dir / "merges.txt").write_text(merges)
    with gzip.open(clip_dir / "bpe_simple_vocab.txt.gz", "wt") as file:
        file.write(merges.rstrip("\n"))  # open_clip reads every line after the header, a trailing empty one too
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(processor))
    (bert_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDPIECES]) + "\n")
    # full-size vocabularies (CLIP's 49408 tokens: bytes, bytes + </w>, 48894 merges of byte pairs, 2 specials;
    # BERT's 30522), for the full-size models' embedding tables and our loaders' vocabulary checks
    pairs = [(a, b) for a in chars for b in chars][: 49408 - 2 * len(chars) - 2]
    full_clip = clip_dir / "full"
    full_clip.mkdir(exist_ok=True)
    full_vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    (full_clip / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(full_vocab)}))
    (full_clip / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in pairs) + "\n")
    # the full-size BERT vocabulary's length (30522), for the full-size model's embedding table
    filler = [f"[unused{i}]" for i in range(30522 - 5)]
    full = bert_dir / "full"
    full.mkdir(exist_ok=True)
    (full / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *filler]) + "\n")


def clip_vocab_size(directory: Path) -> int:
    return len(json.loads((directory / "clip_tokenizer" / "vocab.json").read_text()))


# ---------------------------------------------------------------- reference side (no nablagfn imports)


def _perturb(state: dict) -> None:
    """Add NOISE·N(0, 1) to every float tensor (in place: the module's own weights)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.add_(NOISE * torch.randn(tensor.shape, generator=generator))


def _unit_gain(head: torch.nn.Module) -> None:
    """Linear weights ~ N(0, 1/fan_in): the published heads' random inits shrink the output by ~1e-3 (ImageReward's
    std 1/(768+1)), which would leave the small model's scores nearly independent of the image."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features**0.5)


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in REFERENCE_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _images(work: Path) -> torch.Tensor:
    return torch.load(work / "inputs.pt")["images"]


def _pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(array) for array in arrays]


def _unused(model: torch.nn.Module, loss: torch.Tensor) -> list[str]:
    """State-dict keys the score does not read: buffers and parameters whose gradient stays None."""
    loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None}
    return sorted(key for key in model.state_dict() if key not in grads)


def _save_reference(work: Path, scores, scores_own, grad, tokens, unused, extra=None) -> None:
    torch.save({"scores": scores.detach(), "scores_own_preprocessing": scores_own.detach(), "grad": grad,
                "tokens": tokens, "unused": unused, "versions": _versions(), **(extra or {})},
               work / "reference.pt")  # fmt: skip


def _full_listing(work: Path, state: dict, extra=None) -> None:
    shapes = {key: list(value.shape) for key, value in state.items()}
    params = sum(value.numel() for value in state.values() if value.is_floating_point())
    listing = {"keys": shapes, "parameters": params, "versions": _versions(), **(extra or {})}
    (work / "full_keys.json").write_text(json.dumps(listing))


def reference_hpsv2(work: Path, stage: str) -> None:
    """open_clip: ViT-H-14 (full) or a small CLIP of the same structure; HPS file = {'state_dict': state dict}."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if stage == "full":
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14")
        state = model.state_dict()
        _perturb(state)
        torch.save({"state_dict": state}, work / "HPS_v2.1_compressed.pt")
        _full_listing(work, state, {"preprocess": repr(preprocess)})
        return
    vocab = clip_vocab_size(work)
    vision_width, text_width = SMALL_CLIP_WIDTHS["vision"][0], SMALL_CLIP_WIDTHS["text"][0]
    vision = CLIPVisionCfg(layers=2, width=vision_width, head_width=80, patch_size=14, image_size=IMAGE_SIZE)
    text = CLIPTextCfg(context_length=77, vocab_size=vocab, width=text_width, heads=text_width // 64, layers=2)
    model = CLIP(SMALL_CLIP_WIDTHS["projection"], vision, text).eval()
    state = model.state_dict()
    _perturb(state)
    torch.save({"state_dict": state}, work / "HPS_v2.1_compressed.pt")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(str(work / "clip_tokenizer" / "bpe_simple_vocab.txt.gz"))
    tokens = tokenizer(PROMPTS)
    preprocess = open_clip.image_transform(IMAGE_SIZE, is_train=False)  # ViT-H-14's: bicubic, OpenAI mean/std
    normalize = preprocess.transforms[-1]

    def score(pixels: torch.Tensor) -> torch.Tensor:  # hpsv2.score: diagonal of normalised image @ text features
        image = model.encode_image(pixels, normalize=True)
        return (image * model.encode_text(tokens, normalize=True)).sum(-1)

    images = _images(work)
    with torch.no_grad():
        own = score(torch.stack([preprocess(image) for image in _pil(images)]))
    x = images.clone().requires_grad_(True)
    scores = score(normalize(x))
    unused = _unused(model, scores.sum())
    _save_reference(work, scores, own, x.grad, tokens.tolist(), unused, {"normalize": repr(normalize)})


def _import_image_reward():
    """``ImageReward.ImageReward`` without the package's __init__ files, which import its training code (diffusers,
    datasets, accelerate) and the CLIP/BLIP/aesthetic baselines (openai ``clip``), none of which the score uses."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("ImageReward")
    root = spec.submodule_search_locations[0]
    for name, path in (("ImageReward", root), ("ImageReward.models", os.path.join(root, "models"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from ImageReward import ImageReward as module
    from ImageReward.models.BLIP import blip, blip_pretrain, vit

    return module, blip, blip_pretrain, vit


def reference_imagereward(work: Path, stage: str) -> None:
    """The image-reward package's ``ImageReward`` (BLIP_Pretrain ViT-L + BERT med + MLP); its tokenizer reads
    the local vocab.txt instead of downloading bert-base-uncased; the small model swaps in a small ViT."""
    module, blip, blip_pretrain, vit = _import_image_reward()
    from transformers import BertTokenizer

    vocab_dir = work / "bert_tokenizer" / ("full" if stage == "full" else "")

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return BertTokenizer.from_pretrained(str(vocab_dir), *args, **kwargs)

    blip.BertTokenizer = LocalBertTokenizer
    med = dict(MED_CONFIG)
    if stage != "full":
        vocab = len((vocab_dir / "vocab.txt").read_text().split())
        med |= SMALL_MED | {"vocab_size": vocab + 2}  # + [DEC], [ENC] as 30522 + 2

        def small_vit(*args, **kwargs):
            return vit.VisionTransformer(img_size=IMAGE_SIZE, patch_size=16, drop_path_rate=0.1, **SMALL_VIT), 192

        blip_pretrain.create_vit = small_vit
    (work / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    model = module.ImageReward(med_config=str(work / "med_config.json")).eval()
    if stage != "full":
        model.mlp = module.MLP(SMALL_MED["hidden_size"]).eval()  # ImageReward hard-codes MLP(768)
        _unit_gain(model.mlp)
    state = model.state_dict()
    _perturb(state)
    torch.save(state, work / "ImageReward.pt")
    if stage == "full":
        _full_listing(work, state)
        return
    text = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    model.preprocess = module._transform(IMAGE_SIZE)
    images = _images(work)
    with torch.no_grad():
        own = torch.tensor([model.score(prompt, image) for prompt, image in zip(PROMPTS, _pil(images))])
    normalize = model.preprocess.transforms[-1]
    x = images.clone().requires_grad_(True)
    scores = model.score_gard(text.input_ids, text.attention_mask, normalize(x)).squeeze(-1)
    unused = _unused(model, scores.sum())
    tokens = {"input_ids": text.input_ids.tolist(), "attention_mask": text.attention_mask.tolist()}
    _save_reference(work, scores, own, x.grad, tokens, unused, {"normalize": repr(normalize)})


class LaionAestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (simple_inference.py): layers.0/2/4/6/7 Linear, dropouts between."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _small_clip_config(published: dict, vocab: int) -> dict:
    config = json.loads(json.dumps(published))
    for tower in ("text", "vision"):
        width, intermediate = SMALL_CLIP_WIDTHS[tower]
        heads = width // (
            published[f"{tower}_config"]["hidden_size"] // published[f"{tower}_config"]["num_attention_heads"]
        )
        config[f"{tower}_config"] |= SMALL_TOWER | {
            "hidden_size": width,
            "intermediate_size": intermediate,
            "num_attention_heads": heads,
            "projection_dim": SMALL_CLIP_WIDTHS["projection"],
        }
    config["projection_dim"] = SMALL_CLIP_WIDTHS["projection"]
    config["text_config"] |= {
        "vocab_size": vocab,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": 0,
    }
    return config


def reference_clip(work: Path, stage: str, reward: str) -> None:
    """transformers' CLIPModel (+ LAION's MLP for the aesthetic score) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    published = CLIP_L14 if reward == "aesthetic" else CLIP_H14
    config = published if stage == "full" else _small_clip_config(published, clip_vocab_size(work))
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**config)).eval()
    head = LaionAestheticMLP(config["projection_dim"]).eval()
    if stage != "full":
        _unit_gain(head)
    state = model.state_dict()
    _perturb(state)
    _perturb(head.state_dict())
    model.save_pretrained(work / "clip")
    (work / "clip" / "config.json").write_text(json.dumps(config))  # as published (save_pretrained adds defaults)
    torch.save(head.state_dict(), work / "head.pth")
    if stage == "full":
        both = state | ({f"head.{k}": v for k, v in head.state_dict().items()} if reward == "aesthetic" else {})
        _full_listing(work, both)
        return
    processor = CLIPImageProcessorPil.from_pretrained(work / "clip_tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(work / "clip_tokenizer")
    text = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")

    def features(out) -> torch.Tensor:  # transformers ≥ 5 returns the model output, the projection as pooler_output
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        image = features(model.get_image_features(pixel_values=pixels))
        if reward == "aesthetic":  # simple_inference.py: normalized(encode_image) → MLP
            return head(image).squeeze(-1)
        text_features = features(model.get_text_features(**text))  # PickScore's README
        return model.logit_scale.exp() * (image * text_features).sum(-1)

    images = _images(work)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        own = score(torch.as_tensor(processor(_pil(images), return_tensors="pt")["pixel_values"]))
    x = images.clone().requires_grad_(True)
    scores = score((x - mean) / std)
    unused = _unused(model, scores.sum())
    if reward == "aesthetic":
        unused += [f"head.{k}" for k, p in head.named_parameters() if p.grad is None]
    tokens = text["input_ids"].tolist() if reward == "pickscore" else None  # the aesthetic score reads no text
    _save_reference(work, scores, own, x.grad, tokens, unused)


def reference_side(reward: str, work: Path, stage: str) -> None:
    torch.set_grad_enabled(True)
    if reward == "hpsv2":
        reference_hpsv2(work, stage)
    elif reward == "imagereward":
        reference_imagereward(work, stage)
    else:
        reference_clip(work, stage, reward)


# ---------------------------------------------------------------- our side (the project's venv)


def build_ours(reward: str, work: Path, full: bool):
    """Our Reward, built by build_reward from the files the reference wrote, as a user's config would."""
    from nablagfn.rewards import build_reward
    from nablagfn.rewards.clip_rewards import AestheticRewardConfig, PickScoreRewardConfig
    from nablagfn.rewards.hpsv2 import HPSv2RewardConfig
    from nablagfn.rewards.imagereward import ImageRewardConfig

    clip_tok = str(work / "clip_tokenizer" / ("full" if full else ""))
    if reward == "hpsv2":
        config = HPSv2RewardConfig(checkpoint=str(work / "HPS_v2.1_compressed.pt"), tokenizer=clip_tok)
    elif reward == "imagereward":
        vocab = work / "bert_tokenizer" / ("full" if full else "") / "vocab.txt"
        config = ImageRewardConfig(checkpoint=str(work / "ImageReward.pt"), tokenizer=str(vocab))
    elif reward == "aesthetic":
        config = AestheticRewardConfig(clip_model=str(work / "clip"), head=str(work / "head.pth"))
    else:
        config = PickScoreRewardConfig(model=str(work / "clip"), tokenizer=clip_tok)
    return build_reward(config)


def reference_tensors(reward: str, work: Path) -> dict[str, torch.Tensor]:
    """The reference's full-size file(s), as written."""
    if reward == "hpsv2":
        return torch.load(work / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    if reward == "imagereward":
        return torch.load(work / "ImageReward.pt", weights_only=True)
    from safetensors.torch import load_file

    state = load_file(work / "clip" / "model.safetensors")
    if reward == "aesthetic":
        state |= {f"head.{k}": v for k, v in torch.load(work / "head.pth", weights_only=True).items()}
    return state


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()


def key_check(reference: dict[str, torch.Tensor], ours: torch.nn.Module, scalars: dict[str, float]) -> dict:
    """Match every reference tensor by value to our module's tensors (as is, transposed, or fused q/k/v thirds).

    ``scalars``: reference keys our module keeps as Python floats (name → value), compared as exp(logit scale)."""
    our_state = ours.state_dict()
    index: dict[tuple[str, tuple[int, ...]], str] = {(_digest(v), tuple(v.shape)): k for k, v in our_state.items()}
    used: set[str] = set()
    consumed, left_over, how = [], [], {"as is": 0, "transposed": 0, "q/k/v split": 0, "scalar": 0}

    def find(tensor: torch.Tensor) -> str | None:
        return index.get((_digest(tensor), tuple(tensor.shape)))

    for key, tensor in reference.items():
        if key in scalars:
            if abs(scalars[key] - float(tensor.exp())) <= 1e-6 * abs(scalars[key]):
                consumed.append(key)
                how["scalar"] += 1
            else:
                left_over.append(key)
            continue
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        matches = [find(tensor)]
        kind = "as is"
        if matches[0] is None and tensor.dim() == 2:
            matches, kind = [find(tensor.T)], "transposed"
        if matches[0] is None and tensor.shape and tensor.shape[0] % 3 == 0:
            matches, kind = [find(part) for part in tensor.chunk(3, dim=0)], "q/k/v split"
        if all(match is not None for match in matches):
            consumed.append(key)
            used.update(matches)
            how[kind] += 1
        else:
            left_over.append(key)
    missing = sorted(set(our_state) - used)
    params = {key: reference[key].numel() for key in reference if reference[key].is_floating_point()}
    return {
        "reference_keys": len(reference),
        "reference_parameters": sum(params.values()),
        "consumed": len(consumed),
        "consumed_parameters": sum(params.get(key, 0) for key in consumed),
        "consumed_how": how,
        "missing": missing,
        "left_over": sorted(left_over),
        "our_tensors": len(our_state),
        "our_parameters": sum(v.numel() for v in our_state.values() if v.is_floating_point()),
    }


def _scalars(reward: str, ours) -> dict[str, float]:
    return {"logit_scale": ours.scale} if reward == "pickscore" else {}


def run_reference(reward: str, work: Path, stage: str, envs: Path) -> None:
    env = ENV_OF[reward]
    python = str(envs / env / "bin" / "python") if env else sys.executable
    if env and not Path(python).exists():
        raise SystemExit(f"no reference environment at {envs / env}: run with --setup first")
    command = [python, __file__, "--reference-side", reward, "--stage", stage, "--work", str(work)]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    subprocess.run(command, check=True, env=environment)


def _prefix_counts(keys: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:2]) if "." in key else key
        counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def our_tokens(reward: str, ours) -> object:
    if reward == "hpsv2":
        return ours.tokenize(PROMPTS).tolist()
    if reward == "imagereward":
        ids, mask = ours.prompt_tokens(PROMPTS, torch.device("cpu"))
        return {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    if reward == "pickscore":
        return ours.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77)["input_ids"]
    return None


def parity(reward: str, envs: Path, scratch: Path | None) -> dict:
    """Both checks for one reward; the JSON record."""
    import transformers

    torch.manual_seed(0)
    started = time.time()
    record: dict = {"reward": reward, "reference": ENV_OF[reward] or "transformers (project venv)"}
    with tempfile.TemporaryDirectory(prefix=f"parity_{reward}_", dir=scratch) as tmp:
        work = Path(tmp)
        write_tokenizers(work)
        # 1. full size: keys consumed / missing / left over
        run_reference(reward, work, "full", envs)
        listing = json.loads((work / "full_keys.json").read_text())
        ours = build_ours(reward, work, full=True)
        full = key_check(reference_tensors(reward, work), ours, _scalars(reward, ours))
        del ours
        for name in ("HPS_v2.1_compressed.pt", "ImageReward.pt", "head.pth"):
            (work / name).unlink(missing_ok=True)
        if (work / "clip").exists():
            for file in (work / "clip").iterdir():
                file.unlink()
        # 2. numbers on the small model
        images = torch.randint(
            0, 256, (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
        )
        torch.save({"images": images.float() / 255, "prompts": PROMPTS}, work / "inputs.pt")
        run_reference(reward, work, "small", envs)
        reference = torch.load(work / "reference.pt", weights_only=False)
        ours = build_ours(reward, work, full=False)
        small = key_check(reference_tensors(reward, work), ours, _scalars(reward, ours))
        ours.set_prompts(PROMPTS)
        x = (images.float() / 255).requires_grad_(True)
        scores = ours.log_reward(x, torch.arange(len(PROMPTS)))
        scores.sum().backward()
        ref_scores, ref_grad = reference["scores"].float(), reference["grad"].float()
        tokens_ours = our_tokens(reward, ours)
    unused = set(reference["unused"])
    score_error = ((scores.detach() - ref_scores).abs() / ref_scores.abs()).max().item()
    own_error = (
        ((scores.detach() - reference["scores_own_preprocessing"].float()).abs() / ref_scores.abs()).max().item()
    )
    grad_error = ((x.grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
    cosine = torch.nn.functional.cosine_similarity(x.grad.double().flatten(), ref_grad.double().flatten(), dim=0).item()
    record |= {
        "reference_versions": listing["versions"],
        "our_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "full_size": {
            **{k: v for k, v in full.items() if k not in ("missing", "left_over")},
            "missing": full["missing"],
            "left_over": len(full["left_over"]),
            "left_over_by_prefix": _prefix_counts(full["left_over"]),
            "left_over_unused_by_reference_score": {_layer_pattern(k) for k in full["left_over"]}
            <= {_layer_pattern(k) for k in unused},
        },
        "small_model": {
            "reference_keys": small["reference_keys"],
            "consumed": small["consumed"],
            "missing": small["missing"],
            "left_over": len(small["left_over"]),
            "left_over_by_prefix": _prefix_counts(small["left_over"]),
            "left_over_unused_by_reference_score": set(small["left_over"]) <= unused,
            "parameters": small["reference_parameters"],
        },
        "tokens_equal": tokens_ours == reference["tokens"],
        "scores_ours": scores.tolist(),
        "scores_reference": ref_scores.tolist(),
        "max_relative_score_error": score_error,
        "max_relative_score_error_vs_reference_own_preprocessing": own_error,
        "max_relative_gradient_error": grad_error,
        "gradient_cosine": cosine,
        "images": f"{len(PROMPTS)} × 3 × {IMAGE_SIZE} × {IMAGE_SIZE}, values k/255 (at the model's input size)",
        "prompts": PROMPTS,
        "fed_directly": FED_DIRECTLY[reward],
        "seconds": round(time.time() - started, 1),
    }
    if "preprocess" in listing:
        record["reference_preprocess"] = listing["preprocess"]
    return record


def _layer_pattern(key: str) -> str:
    """The key with layer indices replaced, so full-size keys compare with the small model's (fewer layers)."""
    return re.sub(r"\.\d+\.", ".N.", key)


FED_DIRECTLY = {
    "hpsv2": "reference fed Normalize(x) of open_clip's ViT-H-14 eval transform (its Resize/CenterCrop/ToTensor are "
    "PIL-based; run separately for the score); tokens from open_clip's SimpleTokenizer on the same merges",
    "imagereward": "reference fed Normalize(x) of ImageReward's _transform into score_gard (the package's "
    "differentiable entry); ImageReward.score (PIL path) run separately; init_tokenizer reads the local vocab.txt; "
    "package __init__ files stubbed (they import training code); small model: create_vit returns a small "
    "VisionTransformer of the package and the head is the package's MLP at the small text width",
    "aesthetic": "reference fed (x - mean) / std; CLIPImageProcessorPil run separately for the score",
    "pickscore": "reference fed (x - mean) / std; CLIPImageProcessorPil run separately for the score",
}


def setup(envs: Path) -> None:
    """The throw-away reference environments (python3 -m venv + pip)."""
    for env, installs in ENV_INSTALLS.items():
        python = envs / env / "bin" / "python"
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(envs / env)], check=True)
        for packages in installs:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)


def table(records: list[dict]) -> str:
    header = (
        "| reward | reference | full-size keys consumed / missing / left over | params consumed | "
        "max rel. score error | max rel. grad error | grad cosine | tokens equal |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        f = r["full_size"]
        versions = ", ".join(f"{k} {v}" for k, v in r["reference_versions"].items())
        lines.append(
            f"| {r['reward']} | {r['reference']} ({versions}) | {f['consumed']}/{f['reference_keys']} / "
            f"{len(f['missing'])} / {f['left_over']} | {f['consumed_parameters']:,}/{f['reference_parameters']:,} | "
            f"{r['max_relative_score_error']:.1e} | {r['max_relative_gradient_error']:.1e} | "
            f"{r['gradient_cosine']:.7f} | {'—' if r['reward'] == 'aesthetic' else r['tokens_equal']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", choices=[*REWARDS, "all"], default="all")
    parser.add_argument("--setup", action="store_true", help="create the throw-away reference environments")
    parser.add_argument("--envs", type=Path, default=Path("/tmp/parity_envs"))
    parser.add_argument("--scratch", type=Path, default=None, help="temp directory root (a few GB at full size)")
    parser.add_argument("--reference-side", choices=REWARDS, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=("full", "small"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.reference_side:
        reference_side(args.reference_side, args.work, args.stage)
        return
    if args.setup:
        setup(args.envs)
    records = []
    for reward in REWARDS if args.reward == "all" else (args.reward,):
        record = parity(reward, args.envs, args.scratch)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{reward}.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    print(table(records))


if __name__ == "__main__":
    main()
