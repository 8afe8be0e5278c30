"""FLUX.1 (a rectified flow, diffusers) finetuned with a peft LoRA adapter on its transformer.

The model is a diffusers FLUX pipeline directory (``model_index.json`` with ``transformer/``, ``vae/``,
``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (T5), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), local or on
the Hugging Face hub (default ``black-forest-labs/FLUX.1-dev``). What differs from SD3 (``stable_diffusion_3.py``, whose
backend this one extends):

* the transformer takes *packed* latents — 2×2 patches of the latent as a token sequence (B, H/2·W/2, 4C) with RoPE
  position ids for image and text tokens — so ``eps`` packs the state and unpacks the velocity around the call
  (FluxPipeline's ``_pack_latents`` / ``_unpack_latents``), while states stay (C, H, W);
* FLUX.1-dev is guidance-distilled: the guidance scale is an input embedding (``guidance=``) of one transformer call,
  with no negative prompt (a model without the embedding, schnell, takes none);
* the text conditioning is T5's token embeddings with CLIP-L's pooled embedding (``FluxPipeline.encode_prompt``);
* the scheduler shifts dynamically: μ from the image's token count (``calculate_shift``), the σ grid FluxPipeline's
  (``FlowParameterization.mu``; a scheduler without dynamic shifting: μ = log shift, the same grid);
* the latent side comes from ``model.resolution`` (FluxPipeline's rule: 2·⌊resolution / (2·VAE factor)⌋).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..errors import ConfigError
from ..loading import resolve_dir
from ..mdp.parameterization import FlowParameterization
from .prompts import PromptsConfig, PromptTable, build_prompt_table
from .stable_diffusion import (
    DTYPES,
    StableDiffusionModelConfig,
    _is_hub_id,
    adapter_and_sampling_keywords,
    pipeline_load_error,
    resolve_dtype,
)
from .stable_diffusion_3 import LORA_TARGETS, StableDiffusion3Backend

#: what a pipeline directory must hold
PIPELINE_ENTRIES = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                    "tokenizer_2", "scheduler")


class FluxModelConfig(StableDiffusionModelConfig):
    """A diffusers FLUX.1 pipeline (local directory or hub id) finetuned with peft LoRA on its transformer."""

    kind: Literal["flux"] = "flux"
    parameterization: Literal["flow"] = Field(
        "flow", description="FLUX predicts the velocity of a rectified flow (fixed; sampler.kind: a flow sampler)"
    )
    path: str = Field(
        "black-forest-labs/FLUX.1-dev",
        description="diffusers FLUX pipeline directory (model_index.json, transformer/, vae/, text_encoder/, "
        "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) or hub id",
    )
    resolution: int = Field(1024, ge=16, description="image side in pixels (FluxPipeline's default 1024)")
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 tokens per prompt (FluxPipeline's default)")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    guidance_scale: float = Field(
        3.5, ge=0, description="the guidance embedding of a guidance-distilled model (FLUX.1-dev; FluxPipeline's "
        "default 3.5); models without one (schnell) ignore it"
    )
    sample_batch_size: int = Field(4, ge=1, description="trajectories per sampling batch and images per decode")

    @model_validator(mode="after")
    def _no_negative_prompt(self) -> "FluxModelConfig":
        if self.negative_prompt:
            raise ValueError("model.negative_prompt: FLUX is guidance-distilled and takes no negative prompt; "
                             "leave it empty and set model.guidance_scale")
        return self


def load_pipeline(path: str, revision: str | None, dtype: torch.dtype):
    """The ``FluxPipeline`` at ``path`` (a directory or hub id) in ``dtype``, safetensors only; ConfigError naming
    ``model.path`` if it cannot be loaded."""
    from diffusers import FluxPipeline

    hub = _is_hub_id(path)
    root = path if hub else resolve_dir(path, "model.path", required=PIPELINE_ENTRIES)
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype, which older ones lack
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            return FluxPipeline.from_pretrained(root, revision=revision if hub else None, torch_dtype=dtype,
                                                use_safetensors=True)
    except (OSError, ValueError) as error:  # missing files or weights, offline, unknown hub repo or revision
        raise pipeline_load_error("FLUX", path, hub, error) from None


class FluxBackend(StableDiffusion3Backend):
    """FLUX's transformer (frozen, ``model.dtype``) + an fp32 LoRA adapter; the velocity of packed latents with the
    guidance embedding; VAE decoding; cached prompt embeddings. ``eps`` is the velocity."""

    config_class = FluxModelConfig

    def __init__(self, pipeline, prompt_table: PromptTable, resolution: int = 1024, max_sequence_length: int = 512,
                 guidance_scale: float = 3.5, **settings):
        self.resolution = resolution  # read by _latent_shape during the base class's construction
        super().__init__(pipeline, prompt_table, guidance_scale=guidance_scale,
                         max_sequence_length=max_sequence_length, **settings)

    @classmethod
    def from_config(cls, config) -> FluxBackend:
        prompt_table = build_prompt_table(config.prompts)  # first: a bad prompt file fails in milliseconds
        pipeline = load_pipeline(config.path, config.revision, DTYPES[resolve_dtype(config.dtype, "cpu")])
        return cls._from_parts(pipeline, config, prompt_table)

    @classmethod
    def from_pipeline(cls, pipe, prompts: list[str] | str = "animals", **settings) -> FluxBackend:
        """A backend on a ``FluxPipeline`` already in memory; the LoRA adapter is added to ``pipe.transformer`` itself.

        Args:
            pipe: the pipeline (its transformer, VAE, text encoders, tokenizers and scheduler config are used).
            prompts: the prompts to train on (a list), or a source as ``model.prompts.source`` takes it.
            settings: other keys of ``model`` (``lora_rank``, ``resolution``, ``guidance_scale`` …).
        """
        missing = [name for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                     "tokenizer_2", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise ConfigError(f"from_pipeline: the pipeline has no {', '.join(missing)} (a FLUX pipeline is needed)")
        dtype = {value: key for key, value in DTYPES.items()}.get(pipe.transformer.dtype, "fp32")
        path = str(getattr(pipe, "name_or_path", None) or FluxModelConfig.model_fields["path"].default)
        config = FluxModelConfig(path=path, dtype=dtype, prompts=PromptsConfig(source=prompts), **settings)
        backend = cls._from_parts(pipe, config)
        backend._description = config
        return backend

    @classmethod
    def _from_parts(cls, pipeline, config, prompt_table: PromptTable | None = None) -> FluxBackend:
        settings = adapter_and_sampling_keywords(config)
        settings.pop("negative_prompt")
        return cls(pipeline, prompt_table or build_prompt_table(config.prompts), resolution=config.resolution,
                   max_sequence_length=config.max_sequence_length, **settings)

    def _latent_shape(self, pipeline) -> tuple[int, int, int]:
        """(C, side, side): C = the transformer's in_channels / 4 (packed 2×2), side = 2·⌊resolution / (2·f)⌋ with f the
        VAE's downsampling factor, as FluxPipeline computes it."""
        factor = pipeline.vae_scale_factor
        if self.resolution % (2 * factor):
            raise ConfigError(f"model.resolution: {self.resolution} is not a multiple of {2 * factor} (twice the VAE's "
                              "downsampling factor, for the 2×2 packing); choose one that is")
        side = 2 * (self.resolution // (2 * factor))
        return (pipeline.transformer.config.in_channels // 4, side, side)

    def _pipeline_parameterization(self, pipeline) -> FlowParameterization:
        """μ as FluxPipeline computes it for this image's token count, or log shift without dynamic shifting."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = dict(pipeline.scheduler.config)
        tokens = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        if config.get("use_dynamic_shifting", False):
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        else:
            mu = math.log(config.get("shift", 1.0))
        return FlowParameterization(config.get("num_train_timesteps", 1000), mu=mu)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(T5 token embeddings (B, tokens, dim), pooled CLIP-L embeddings (B, dim)), as the pipeline encodes them."""
        embeddings, pooled, _ = self.pipeline.encode_prompt(texts, None, device=self.text_encoder.device,
                                                            max_sequence_length=self.max_sequence_length)
        return embeddings, pooled

    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        """The velocity in fp32 from one transformer call on the packed state, with the guidance embedding where the
        model has one; ``timestep`` is the model time σ·T (the transformer takes it / 1000, as FluxPipeline)."""
        from diffusers import FluxPipeline

        batch, channels, height, width = x.shape
        dtype, device = self.transformer.dtype, x.device
        embeddings, pooled = self.text_embeddings(cond)
        packed = FluxPipeline._pack_latents(x.to(dtype), batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(embeddings.shape[1], 3, device=device, dtype=dtype)
        guidance = (torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        with self.adapter(finetuned):
            velocity = self.transformer(hidden_states=packed, timestep=timestep.to(device).expand(batch) / 1000,
                                        guidance=guidance, pooled_projections=pooled,
                                        encoder_hidden_states=embeddings, txt_ids=text_ids, img_ids=image_ids,
                                        return_dict=False)[0]
        factor = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * factor, width * factor, factor).float()
