"""Stable Diffusion 3 medium's architecture with random weights, written as a diffusers pipeline directory, offline.

As ``sd15_architecture.py`` for SD 1.5: compute, memory and key layouts do not depend on weight values. The configs
are those published with ``stabilityai/stable-diffusion-3-medium-diffusers`` (transformer/, vae/, text_encoder/,
text_encoder_2/ and scheduler/), written out here; T5-XXL (text_encoder_3/, 4.8 B parameters, ≈ 9.5 GB in bf16) is
left out, as diffusers allows (``text_encoder_3=None``: zeros in place of its 256 token embeddings, so the
transformer's work is unchanged); the tokenizers are the tests' byte-level CLIP tokenizer (the embedding tables keep
CLIP's 49,408 rows).

    python benchmarks/sd3_architecture.py OUT_DIR [--latent-size 128] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: transformer/config.json of stable-diffusion-3-medium-diffusers (sample_size: the latent side, 128 for 1024 px)
TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
#: vae/config.json (16 latent channels, SD3's scaling and shift factors, no quant convs)
VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
#: text_encoder/ (CLIP ViT-L/14's text tower) and text_encoder_2/ (OpenCLIP bigG's), both with projection
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
#: scheduler/scheduler_config.json
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def save_sd3(path: str | Path, latent_size: int = 128, dtype: str = "fp16", seed: int = 0) -> Path:
    """Write SD3-medium's transformer, VAE and two CLIP text encoders with random weights (built directly in
    ``dtype``, which they are saved in) to ``path``, without T5."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import byte_level_tokenizer

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    try:  # built in the target dtype: the 2 B-parameter transformer never exists in fp32
        transformer = SD3Transformer2DModel(**{**TRANSFORMER, "sample_size": latent_size})
        vae = AutoencoderKL(**{**VAE, "sample_size": 8 * latent_size})
        text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1,
                                                                    pad_token_id=1)) for config in (CLIP_L, CLIP_G)]
    finally:
        torch.set_default_dtype(previous)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoders[0], tokenizer=byte_level_tokenizer(), text_encoder_2=text_encoders[1],
        tokenizer_2=byte_level_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--latent-size", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = parser.parse_args()
    path = save_sd3(args.out, args.latent_size, args.dtype)
    from safetensors import safe_open

    counts = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        counts[name] = 0
        for file in (path / name).glob("*.safetensors"):
            with safe_open(file, "pt") as weights:
                counts[name] += sum(torch.Size(weights.get_slice(key).get_shape()).numel() for key in weights.keys())
    print(f"wrote {path}: " + ", ".join(f"{name} {count / 1e6:.0f} M parameters" for name, count in counts.items()))


if __name__ == "__main__":
    main()
