"""A tiny random-weight Stable Diffusion pipeline, saved in the diffusers layout (offline, < 1 s).

Same components and file layout as ``stable-diffusion-v1-5``: a UNet2DConditionModel, an AutoencoderKL,
a CLIPTextModel with a CLIPTokenizer, and SD 1.5's scheduler config (PNDM, scaled-linear betas).
The tokenizer is byte-level BPE with no merges: every byte is a token, alone and word-final.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: latent channels, latent side, text width of the tiny pipeline
LATENT_CHANNELS = 4
LATENT_SIZE = 8
TEXT_DIM = 32


def byte_level_tokenizer():
    """CLIP's tokenizer over a 514-token vocabulary: the 256 byte symbols, each also with ``</w>``, + 2 specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_vae(latent_channels: int, latent_size: int, **settings):
    """A two-block random-weight ``AutoencoderKL`` (×2 downsampling); ``settings``: other config keys (SD3's
    scaling and shift)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=2 * latent_size,
        **settings,
    )


def save_tiny_sd(path: str | Path, seed: int = 0, latent_size: int = LATENT_SIZE) -> Path:
    """Write a random-weight pipeline directory to ``path`` and return it; ``latent_size`` is the latent side
    (images are twice as wide). The weights do not depend on it, only the sizes the pipeline declares."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = tiny_vae(LATENT_CHANNELS, latent_size)
    tokenizer = byte_level_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler(  # stable-diffusion-v1-5's scheduler config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = Path(path)
    pipeline.save_pretrained(path)
    return path
