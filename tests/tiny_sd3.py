"""A tiny random-weight Stable Diffusion 3 pipeline, saved in the diffusers layout (offline, < 1 s).

Same components and file layout as ``stable-diffusion-3-medium-diffusers``: an SD3Transformer2DModel, an
AutoencoderKL with SD3's ``scaling_factor`` and ``shift_factor``, two CLIPTextModelWithProjection (L and G, here of
different widths, so their concatenation is padded to the T5 width as in SD3), optionally a T5EncoderModel, and
SD3's scheduler config (FlowMatchEulerDiscreteScheduler, shift 3). Sizes follow diffusers' own SD3 pipeline tests
(4 heads of 8, patch 1), with two transformer layers: the first has the text stream's output projection
(``to_add_out``), the last, as in SD3, has none. The CLIP tokenizers are ``tiny_sd``'s byte-level one; the T5
tokenizer is a unigram model over the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_sd import byte_level_tokenizer, tiny_vae

#: latent channels (SD3's 16), latent side, the T5 / joint attention width, the two CLIP widths
LATENT_CHANNELS = 16
LATENT_SIZE = 8
JOINT_DIM = 64
CLIP_DIMS = (16, 32)
#: SD3's VAE latent scale and shift, and its sampling shift
SCALING_FACTOR, SHIFT_FACTOR, SHIFT = 1.5305, 0.0609, 3.0


def t5_tokenizer():
    """T5's tokenizer (unigram) over the 256 byte symbols and T5's three specials, with no sentinel tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(s, -1.0) for s in sorted(ByteLevel.alphabet())]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _clip(width: int, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=37,
            projection_dim=width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="gelu",
        )
    )


def save_tiny_sd3(path: str | Path, seed: int = 0, t5: bool = True) -> Path:
    """Write a random-weight SD3 pipeline directory to ``path`` (without T5 when ``t5`` is false, as diffusers'
    ``text_encoder_3=None``) and return it."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=sum(CLIP_DIMS),
    )
    vae = tiny_vae(LATENT_CHANNELS, LATENT_SIZE, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR)
    tokenizer = byte_level_tokenizer()
    text_encoder, text_encoder_2 = (_clip(width, len(tokenizer)) for width in CLIP_DIMS)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_3), d_model=JOINT_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),  # SD3's scheduler config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=byte_level_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    path = Path(path)
    pipeline.save_pretrained(path)
    return path
