"""Stable Diffusion 1.5's exact architecture with random weights, written as a diffusers pipeline directory, offline.

Compute, memory and key layouts do not depend on weight values, so this answers "does the paper's setting fit, and
how long does it take" without downloading the weights. The configs are those published with
``stable-diffusion-v1-5/stable-diffusion-v1-5`` (unet/, vae/, text_encoder/ and scheduler/ config files), written
out here; the tokenizer is the tests' byte-level CLIP tokenizer (its vocabulary is smaller than CLIP's 49,408, which
changes no size: the embedding table keeps CLIP's rows).

    python benchmarks/sd15_architecture.py OUT_DIR [--latent-size 64] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: unet/config.json of stable-diffusion-v1-5 (sample_size: the latent side, 64 for 512×512 images)
UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
#: vae/config.json of stable-diffusion-v1-5
VAE = dict(
    act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
#: text_encoder/config.json of stable-diffusion-v1-5 (CLIP ViT-L/14's text tower)
TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=1, pad_token_id=1,
)
#: scheduler/scheduler_config.json of stable-diffusion-v1-5
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def save_sd15(path: str | Path, latent_size: int = 64, dtype: str = "fp16", seed: int = 0) -> Path:
    """Write SD 1.5's UNet, VAE and text encoder with random weights (``dtype`` on disk) to ``path``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_sd import byte_level_tokenizer

    torch.manual_seed(seed)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    unet = UNet2DConditionModel(**{**UNET, "sample_size": latent_size}).to(torch_dtype)
    vae = AutoencoderKL(**{**VAE, "sample_size": 8 * latent_size}).to(torch_dtype)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT)).to(torch_dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=byte_level_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    args = parser.parse_args()
    path = save_sd15(args.out, args.latent_size, args.dtype)
    parameters = {name: sum(p.numel() for p in getattr(__import__("diffusers"), cls).from_pretrained(
        path, subfolder=name).parameters()) for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"))}
    print(f"wrote {path}: " + ", ".join(f"{name} {count / 1e6:.0f} M parameters" for name, count in parameters.items()))


if __name__ == "__main__":
    main()
