"""Stable Diffusion 3 (a rectified flow, diffusers) finetuned with a peft LoRA adapter on its transformer.

The model is a diffusers SD3 pipeline directory (``model_index.json`` with ``transformer/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``, and T5's
``text_encoder_3/`` and ``tokenizer_3/`` if it has them), local or on the Hugging Face hub (default
``stabilityai/stable-diffusion-3-medium-diffusers``). The transformer predicts the velocity v ≈ ε − x₀ of
x_σ = (1 − σ) x₀ + σ ε at model time t = σ·T (``FlowParameterization``; its ``shift``, read from the pipeline's
scheduler config, sets the samplers' σ grid). ``eps`` returns that velocity, guided against the negative prompt.
Prompts go through the pipeline's own ``encode_prompt`` (CLIP-L and CLIP-G, and T5 or zeros in its place as diffusers
does without it), once each. The pretrained model is the same transformer with its adapter disabled; ``decode`` maps
latents through the VAE (SD3's scaling and shift factors) to images in [0, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError
from ..loading import resolve_dir
from ..mdp.parameterization import FlowParameterization, Parameterization
from .lora import add_diffusers_lora
from .prompts import PromptsConfig, PromptTable, build_prompt_table
from .stable_diffusion import (
    DTYPES,
    ENCODE_BATCH,
    FlowScoreUNet,
    PipelineBackend,
    StableDiffusionModelConfig,
    _is_hub_id,
    adapter_and_sampling_keywords,
    checkpoint_with_adapter_state,
    flow_score_unet,
    pipeline_load_error,
    resolve_dtype,
)

#: the attention projections of the joint (image + text) attention that get LoRA, as diffusers' SD3 LoRA script
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
#: what a pipeline directory must hold (T5's text_encoder_3/ and tokenizer_3/ are optional)
PIPELINE_ENTRIES = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                    "tokenizer_2", "scheduler")
#: FlowMatchEulerDiscreteScheduler options that change its σ grid, at the values the flow samplers assume
GRID_DEFAULTS = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}


class StableDiffusion3ModelConfig(StableDiffusionModelConfig):
    """A diffusers Stable Diffusion 3 pipeline (local directory or hub id) finetuned with peft LoRA: the keys of
    ``model.kind=stable_diffusion``, with the transformer in place of the UNet."""

    kind: Literal["stable_diffusion_3"] = "stable_diffusion_3"
    parameterization: Literal["flow"] = Field(
        "flow", description="SD3 predicts the velocity of a rectified flow (fixed; sampler.kind: a flow sampler)"
    )
    path: str = Field(
        "stabilityai/stable-diffusion-3-medium-diffusers",
        description="diffusers SD3 pipeline directory (model_index.json, transformer/, vae/, text_encoder/, "
        "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, optionally text_encoder_3/ and tokenizer_3/) or hub id",
    )
    t5: bool = Field(
        True, description="use the pipeline's T5 text encoder; false (or a pipeline without one): zeros in its place, "
        "as diffusers with text_encoder_3=None (T5-XXL is ≈ 9.5 GB in bf16)"
    )
    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 tokens per prompt (diffusers' default)")
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    guidance_scale: float = Field(7.0, ge=1, description="classifier-free guidance (1: none; diffusers' SD3 default)")
    sample_batch_size: int = Field(
        4, ge=1, description="trajectories per sampling batch and images per decode (sampling 4 at 1024 px in bf16 "
        "peaks at ≈ 14.6 GB with the weights, estimated; the decode is most of it)"
    )


def flow_parameterization_of(config: dict, where: str) -> FlowParameterization:
    """The velocity parameterization of a ``FlowMatchEulerDiscreteScheduler`` config (its T and shift); ConfigError
    for options that give another σ grid than the flow samplers' (``mdp.flow``)."""
    changed = {key: config[key] for key, default in GRID_DEFAULTS.items() if config.get(key, default) != default}
    if changed:
        settings = ", ".join(f"{key}={value}" for key, value in changed.items())
        raise ConfigError(f"model.path: the scheduler of {where!r} sets {settings}; the flow samplers use "
                          "FlowMatchEulerDiscreteScheduler's σ grid with a fixed shift only: this model is unsupported")
    return FlowParameterization(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))


def load_pipeline(path: str, revision: str | None, dtype: torch.dtype, t5: bool = True):
    """The ``StableDiffusion3Pipeline`` at ``path`` (a directory or hub id) in ``dtype``, safetensors only; without
    T5 when ``t5`` is false or the pipeline has none (diffusers needs ``text_encoder_3=None`` said explicitly then).
    ConfigError naming ``model.path`` if it cannot be loaded."""
    from diffusers import StableDiffusion3Pipeline

    hub = _is_hub_id(path)
    root = path if hub else resolve_dir(path, "model.path", required=PIPELINE_ENTRIES)
    revision = revision if hub else None
    try:
        index = StableDiffusion3Pipeline.load_config(root, revision=revision)  # model_index.json alone
        has_t5 = (index.get("text_encoder_3") or [None])[-1] is not None
        without_t5 = {} if t5 and has_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype to dtype, which older ones lack
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            return StableDiffusion3Pipeline.from_pretrained(root, revision=revision, torch_dtype=dtype,
                                                            use_safetensors=True, **without_t5)
    except (OSError, ValueError) as error:  # missing files or weights, offline, unknown hub repo or revision
        raise pipeline_load_error("Stable Diffusion 3", path, hub, error) from None


class StableDiffusion3Backend(PipelineBackend):
    """SD3's transformer (frozen, ``model.dtype``) + an fp32 LoRA adapter; guided velocity; VAE decoding; cached
    prompt embeddings. ``eps`` is the velocity (``parameterization.kind == "flow"``)."""

    config_class = StableDiffusion3ModelConfig
    schedule = None

    def __init__(
        self,
        pipeline,
        prompt_table: PromptTable,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        guidance_scale: float = 7.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        flow_channels: tuple[int, ...] = (64, 128, 256, 256),
        gradient_checkpointing: bool = False,
        sample_batch_size: int = 4,
        reward_grad_batch_size: int = 1,
    ):
        super().__init__()
        transformer, vae = pipeline.transformer, pipeline.vae
        encoders = (pipeline.text_encoder, pipeline.text_encoder_2, getattr(pipeline, "text_encoder_3", None))
        self._trainable = add_diffusers_lora(transformer, [transformer, vae, *(e for e in encoders if e is not None)],
                                             lora_rank, lora_alpha, lora_targets, "transformer")
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing(checkpoint_with_adapter_state)
            vae.enable_gradient_checkpointing()
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = encoders  # submodules: they move with .to()
        self.pipeline = pipeline  # not a module: its encode_prompt, on the same encoders
        self.sample_shape = self._latent_shape(pipeline)
        self._parameterization = self._pipeline_parameterization(pipeline)
        self.prompt_table = prompt_table
        self.prompts = list(prompt_table.prompts)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.flow_channels = tuple(flow_channels)
        self.gradient_checkpointing = gradient_checkpointing
        self.sample_batch_size = sample_batch_size
        self.reward_grad_batch_size = reward_grad_batch_size
        self._embedding_cache: dict[int, tuple[Tensor, Tensor]] = {}  # id → (tokens, dim), (pooled,); −1: negative
        self._adapter_enabled = True

    @classmethod
    def from_config(cls, config) -> StableDiffusion3Backend:
        prompt_table = build_prompt_table(config.prompts)  # first: a bad prompt file fails in milliseconds
        dtype = DTYPES[resolve_dtype(config.dtype, "cpu")]  # a RunConfig has resolved auto for its device already
        pipeline = load_pipeline(config.path, config.revision, dtype, config.t5)
        return cls._from_parts(pipeline, config, prompt_table)

    @classmethod
    def from_pipeline(cls, pipe, prompts: list[str] | str = "animals", **settings) -> StableDiffusion3Backend:
        """A backend on a ``StableDiffusion3Pipeline`` already in memory. The LoRA adapter is added to
        ``pipe.transformer`` itself, so after training ``pipe(…)`` generates with it.

        Args:
            pipe: the pipeline (its transformer, VAE, text encoders, tokenizers and scheduler config are used).
            prompts: the prompts to train on (a list), or a source as ``model.prompts.source`` takes it.
            settings: other keys of ``model`` (``lora_rank``, ``guidance_scale``, ``t5`` …).

        Returns:
            The backend; a run made with it records the pipeline's name or path and lists the model as handed over.
        """
        missing = [name for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                     "tokenizer_2", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise ConfigError(f"from_pipeline: the pipeline has no {', '.join(missing)} (a Stable Diffusion 3 "
                              "pipeline is needed)")
        dtype = {value: key for key, value in DTYPES.items()}.get(pipe.transformer.dtype, "fp32")
        path = str(getattr(pipe, "name_or_path", None) or StableDiffusion3ModelConfig.model_fields["path"].default)
        config = StableDiffusion3ModelConfig(path=path, dtype=dtype, prompts=PromptsConfig(source=prompts), **settings)
        if not config.t5 and pipe.text_encoder_3 is not None:  # the same components, T5 left out
            pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
        backend = cls._from_parts(pipe, config)
        backend._description = config
        return backend

    @classmethod
    def _from_parts(cls, pipeline, config, prompt_table: PromptTable | None = None) -> StableDiffusion3Backend:
        return cls(
            pipeline,
            prompt_table or build_prompt_table(config.prompts),
            max_sequence_length=config.max_sequence_length,
            **adapter_and_sampling_keywords(config),
        )

    @property
    def parameterization(self) -> Parameterization:
        """Velocity prediction, t = σ·T, with the pipeline scheduler's T and shift."""
        return self._parameterization

    def _latent_shape(self, pipeline) -> tuple[int, int, int]:
        """(channels, side, side) of the latents: the transformer's ``in_channels`` and ``sample_size``."""
        size = pipeline.transformer.config.sample_size
        return (pipeline.transformer.config.in_channels, size, size)

    def _pipeline_parameterization(self, pipeline) -> FlowParameterization:
        """The velocity parameterization of the pipeline's scheduler (``flow_parameterization_of``)."""
        where = str(getattr(pipeline, "name_or_path", None) or "the pipeline")
        return flow_parameterization_of(dict(pipeline.scheduler.config), where)

    # -- text ------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(prompt embeddings (B, 77 + T5 tokens, joint dim), pooled CLIP embeddings (B, pooled dim)), as the
        pipeline encodes prompts."""
        embeddings, _, pooled, _ = self.pipeline.encode_prompt(
            texts, None, None, device=self.text_encoder.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeddings, pooled

    def text_embeddings(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(embeddings (B, tokens, dim), pooled (B, dim)) of each id's prompt (−1: the negative prompt), in the
        transformer's dtype on its device. Each prompt is encoded once; later calls read the cache."""
        ids = cond.tolist()
        missing = sorted({i for i in ids if i not in self._embedding_cache})
        for start in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[start : start + ENCODE_BATCH]
            embeddings, pooled = self._encode([self.negative_prompt if i == -1 else self.prompts[i] for i in chunk])
            for i, embedding, pool in zip(chunk, embeddings, pooled):
                self._embedding_cache[i] = (embedding, pool)
        device, dtype = self.transformer.device, self.transformer.dtype
        for i in set(ids):  # after a move to another device, move each cached embedding once
            embedding, pool = self._embedding_cache[i]
            if embedding.device != device or embedding.dtype != dtype:
                self._embedding_cache[i] = (embedding.to(device, dtype), pool.to(device, dtype))
        return (torch.stack([self._embedding_cache[i][0] for i in ids]),
                torch.stack([self._embedding_cache[i][1] for i in ids]))

    def prompt_embeddings(self, cond: Tensor) -> Tensor:
        """The token embeddings of ``text_embeddings`` alone (what g_φ attends to)."""
        return self.text_embeddings(cond)[0]

    # -- the model -------------------------------------------------------------------
    @contextmanager
    def adapter(self, enabled: bool) -> Iterator[None]:
        """The finetuned (``enabled``) or the pretrained transformer inside the block; the previous state comes back
        on exit, also when the block raises."""
        previous = self._adapter_enabled
        if enabled != previous:
            (self.transformer.enable_adapters if enabled else self.transformer.disable_adapters)()
            self._adapter_enabled = enabled
        try:
            yield
        finally:
            if enabled != previous:
                (self.transformer.enable_adapters if previous else self.transformer.disable_adapters)()
                self._adapter_enabled = previous

    def _velocity(self, x: Tensor, timestep: Tensor, embeddings: Tensor, pooled: Tensor) -> Tensor:
        return self.transformer(hidden_states=x, encoder_hidden_states=embeddings, pooled_projections=pooled,
                                timestep=timestep, return_dict=False)[0].float()

    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        """Guided velocity v = v(∅) + w (v(c) − v(∅)) in fp32, from one transformer call on [negative; prompt]
        (w = 1: prompt only); ``timestep`` is the model time σ·T (float)."""
        batch = x.shape[0]
        x_in = x.to(self.transformer.dtype)
        timestep = timestep.to(x.device).expand(batch)
        embeddings, pooled = self.text_embeddings(cond)
        with self.adapter(finetuned):
            if self.guidance_scale == 1:
                return self._velocity(x_in, timestep, embeddings, pooled)
            negative, negative_pooled = self.text_embeddings(torch.full((1,), -1))
            both = self._velocity(
                torch.cat([x_in, x_in]),
                torch.cat([timestep, timestep]),
                torch.cat([negative.expand(batch, -1, -1), embeddings]),
                torch.cat([negative_pooled.expand(batch, -1), pooled]),
            )
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def make_flow_score_net(self) -> nn.Module:
        """A UNet2DConditionModel with widths ``flow_channels`` (one layer per block, cross-attention to the prompt
        token embeddings), fp32, its output layer zeroed."""
        unet = flow_score_unet(self.sample_shape, self.flow_channels, self.transformer.config.joint_attention_dim,
                               self.gradient_checkpointing)
        return FlowScoreUNet(unet, self.prompt_embeddings)
