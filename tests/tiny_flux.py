"""A tiny random-weight FLUX.1 pipeline, saved in the diffusers layout (offline, < 1 s).

Same components and file layout as ``FLUX.1-dev``: a FluxTransformer2DModel (one double-stream and one single-stream
block, the guidance embedding on or off), an AutoencoderKL with a scaling and a shift factor, CLIP-L as a
CLIPTextModel (its pooled output) and T5 as a T5EncoderModel, and FLUX.1-dev's scheduler config (dynamic shifting).
Sizes follow diffusers' own FLUX pipeline tests; the tokenizers are ``tiny_sd``'s and ``tiny_sd3``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_sd import byte_level_tokenizer, tiny_vae
from tiny_sd3 import t5_tokenizer

#: latent channels (FLUX: 16), the T5 / joint attention width, the CLIP width
LATENT_CHANNELS = 4
JOINT_DIM = 32
CLIP_DIM = 32
#: the image side the tests use: 2×2-packed latents of side 8 (the tiny VAE downsamples ×2)
RESOLUTION = 16
#: FLUX.1-dev's scheduler config
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def save_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a random-weight FLUX pipeline directory to ``path`` and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )
    vae = tiny_vae(LATENT_CHANNELS, RESOLUTION // 2, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=1.5035, shift_factor=0.0609)
    tokenizer = byte_level_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=37, projection_dim=CLIP_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, hidden_act="gelu",
    ))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=JOINT_DIM, d_kv=8, d_ff=37,
                                             num_layers=1, num_heads=4, pad_token_id=0, eos_token_id=1,
                                             decoder_start_token_id=0))
    pipeline = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                            tokenizer_2=tokenizer_2)
    path = Path(path)
    pipeline.save_pretrained(path)
    return path
