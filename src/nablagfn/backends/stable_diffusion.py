"""Stable Diffusion (latent diffusion, diffusers) finetuned with a peft LoRA adapter on its UNet.

The model is a diffusers pipeline directory (``model_index.json`` with ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), local or on the Hugging Face hub
(default ``stable-diffusion-v1-5/stable-diffusion-v1-5``). States are latents (fp32); ε uses
classifier-free guidance against the negative prompt; the pretrained model is the same UNet with
its adapter disabled; ``decode`` maps latents through the VAE to images in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import torch
import torch.utils.checkpoint
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config_base import StrictConfig
from ..errors import ConfigError
from ..loading import offline_hint, resolve_dir
from ..mdp.schedules import NoiseSchedule
from .base import Backend
from .lora import add_diffusers_lora
from .prompts import PromptsConfig, PromptTable, build_prompt_table


class StableDiffusionModelConfig(StrictConfig):
    """A diffusers Stable Diffusion pipeline (local directory or hub id) finetuned with peft LoRA."""

    kind: Literal["stable_diffusion"] = "stable_diffusion"
    path: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="diffusers pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/) or hub id",
    )
    revision: str | None = Field(None, description="hub revision (hub ids only)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="frozen base weights (trainable ones are fp32); auto: fp32 on a CPU, bf16 on a GPU that has "
        "it, else fp16 (resolved when the config is validated, and recorded)"
    )
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to lora_rank")
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    guidance_scale: float = Field(5.0, ge=1, description="classifier-free guidance (1 = none)")
    negative_prompt: str = ""
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    flow_channels: list[int] = Field(
        default_factory=lambda: [64, 128, 256, 256],
        min_length=1,
        description="g_φ's UNet widths, one block each; every width a multiple of 8",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute UNet, VAE and flow-network activations in backward (less memory, slower)"
    )
    sample_batch_size: int = Field(8, ge=1, description="trajectories per sampling batch and images per decode")
    reward_grad_batch_size: int = Field(
        1, ge=1, description="images decoded and rewarded at once with their gradient (the ∇-DB methods' look-ahead "
        "∇ log R); the VAE decoder's activations for backward scale with it, ≈ 1 GB per 512×512 image in bf16"
    )

    @model_validator(mode="after")
    def _flow_widths(self) -> "StableDiffusionModelConfig":
        if any(width < 8 or width % 8 for width in self.flow_channels):
            raise ValueError(f"model.flow_channels: every width must be a multiple of 8, got {self.flow_channels}")
        return self


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str) -> str:
    """``model.dtype`` with ``auto`` resolved for ``device``: fp32 off CUDA (CPUs have no fast half precision), bf16
    on a GPU that supports it, else fp16."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
#: what a pipeline directory must hold
PIPELINE_ENTRIES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: prompts encoded per text-encoder call when filling the embedding cache
ENCODE_BATCH = 64


def pipeline_load_error(name: str, path: str, hub: bool, error: Exception) -> ConfigError:
    """The one-line error, naming ``model.path``, for a ``name`` pipeline at ``path`` (a hub id if ``hub``) that could
    not be loaded because of ``error``."""
    where = f"is not available locally and {offline_hint()}" if hub else "could not be read"
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
    return ConfigError(f"model.path: {name} pipeline {path!r} {where} ({type(error).__name__}: {detail}). Download "
                       f"it (e.g. `hf download {path}`) and set model.path=/path/to/its/directory")


def _is_hub_id(path: str) -> bool:
    return not Path(path).expanduser().exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def load_noise_schedule(root: str, revision: str | None = None) -> NoiseSchedule:
    """ᾱ_t from the pipeline's scheduler config (beta schedule, trained betas, zero-SNR rescaling)."""
    from diffusers import DDPMScheduler

    return noise_schedule_of(DDPMScheduler.load_config(root, subfolder="scheduler", revision=revision), root)


def noise_schedule_of(config: dict, where: str) -> NoiseSchedule:
    """ᾱ_t of a diffusers scheduler config (any scheduler class: only the training betas are read)."""
    from diffusers import DDPMScheduler

    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ConfigError(f"model.path: {where!r} predicts {prediction!r}; only ε-prediction models are supported")
    scheduler = DDPMScheduler(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 0.0001),
        beta_end=config.get("beta_end", 0.02),
        beta_schedule=config.get("beta_schedule", "linear"),
        trained_betas=config.get("trained_betas"),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
    )
    return NoiseSchedule(scheduler.alphas_cumprod.to(torch.float64))


class _AdaptersAs:
    """A context (re-enterable: a graph kept for two backward passes is recomputed twice) with each peft LoRA layer
    enabled (True) or disabled as in ``states``; as before after it."""

    def __init__(self, states: list[tuple[nn.Module, bool]]):
        self.states = states
        self.changed: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.changed = [(layer, enabled) for layer, enabled in self.states if layer.disable_adapters == enabled]
        for layer, enabled in self.changed:
            layer.enable_adapters(enabled)

    def __exit__(self, *exc) -> None:
        for layer, enabled in self.changed:
            layer.enable_adapters(not enabled)


def checkpoint_with_adapter_state(block: nn.Module, *args):
    """diffusers' per-block gradient checkpointing (non-reentrant), recomputed in the backward pass with each LoRA
    layer of the block enabled or disabled as it was in the forward pass.

    The finetuned and the pretrained ε are one UNet with its adapter switched on or off, and a loss backpropagates
    through both after the switch is back (residual ∇-DB's look-ahead differentiates ε#): recomputing a block in
    the adapter's current state would give other activations (torch raises ``CheckpointError``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    states = [(layer, not layer.disable_adapters) for layer in block.modules() if isinstance(layer, BaseTunerLayer)]
    return torch.utils.checkpoint.checkpoint(
        block.__call__, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _AdaptersAs(states))
    )


def decode_latents(vae: nn.Module, x: Tensor) -> Tensor:
    """Latents → images in [0, 1] (B, 3, H, W), fp32, differentiable: the VAE decode of x / scaling_factor
    (+ shift_factor, SD3's), as diffusers' pipelines decode."""
    vae_config = vae.config
    latents = x / vae_config.scaling_factor
    if getattr(vae_config, "shift_factor", None):
        latents = latents + vae_config.shift_factor
    image = vae.decode(latents.to(vae.dtype)).sample
    return ((image.float() + 1) / 2).clamp(0, 1)


def flow_score_unet(sample_shape: tuple[int, ...], channels: tuple[int, ...], cross_attention_dim: int,
                    gradient_checkpointing: bool = False) -> nn.Module:
    """g_φ's network: a UNet2DConditionModel on latents of ``sample_shape`` with widths ``channels`` (one layer per
    block, cross-attention to text embeddings of width ``cross_attention_dim`` in all but the last), fp32."""
    from diffusers import UNet2DConditionModel

    blocks = len(channels)
    unet = UNet2DConditionModel(
        sample_size=sample_shape[1:],
        in_channels=sample_shape[0],
        out_channels=sample_shape[0],
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (blocks - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # diffusers' legacy name: the number of heads
        norm_num_groups=math.gcd(32, *channels),
    )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


class FlowScoreUNet(nn.Module):
    """g_φ(x, t, cond): a small text-conditioned UNet with the latent's shape as output, exactly zero at start.

    Prompt embeddings come from the backend's cache through ``embed`` (a plain attribute, so the backend
    is not a submodule and this module's state dict holds only its own weights).
    """

    def __init__(self, unet: nn.Module, embed: Callable[[Tensor], Tensor]):
        super().__init__()
        self.unet = unet
        self.embed = embed
        nn.init.zeros_(unet.conv_out.weight)
        nn.init.zeros_(unet.conv_out.bias)

    def forward(self, x: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        context = self.embed(cond).to(self.unet.dtype)
        return self.unet(x.to(self.unet.dtype), timestep, encoder_hidden_states=context).sample.to(x.dtype)


def adapter_and_sampling_keywords(config) -> dict:
    """The constructor keywords that the SD 1.5 and SD3 backends read from their ``model`` config alike: LoRA,
    guidance, flow network, checkpointing and batch sizes."""
    return {
        "lora_rank": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_targets": tuple(config.lora_targets),
        "guidance_scale": config.guidance_scale,
        "negative_prompt": config.negative_prompt,
        "flow_channels": tuple(config.flow_channels),
        "gradient_checkpointing": config.gradient_checkpointing,
        "sample_batch_size": config.sample_batch_size,
        "reward_grad_batch_size": config.reward_grad_batch_size,
    }


class PipelineBackend(Backend):
    """What the diffusers pipeline backends share: prompts drawn from ``prompt_table``, images decoded by ``vae``,
    the LoRA's parameters ``_trainable``, and the model config ``from_pipeline`` made them with
    (``_description``)."""

    _description = None

    def describe(self):
        """The settings it was made with, the pipeline's name or path as ``model.path``."""
        if self._description is None:
            return super().describe()
        return self._description

    def decode(self, x: Tensor) -> Tensor:
        """Latents → images in [0, 1] (B, 3, H, W), fp32, differentiable: the VAE's decoding of the latents undone
        by its scaling factor (and shift, where the VAE has one: ``decode_latents``)."""
        return decode_latents(self.vae, x)

    def sample_conditions(self, num: int, generator: torch.Generator, split: str = "train") -> Tensor:
        return self.prompt_table.draw(num, generator, split)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._trainable)


class StableDiffusionBackend(PipelineBackend):
    """SD's UNet (frozen, ``model.dtype``) + an fp32 LoRA adapter; guided ε; VAE decoding; cached prompt embeddings."""

    config_class = StableDiffusionModelConfig

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        schedule: NoiseSchedule,
        prompt_table: PromptTable,
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        flow_channels: tuple[int, ...] = (64, 128, 256, 256),
        gradient_checkpointing: bool = False,
        sample_batch_size: int = 8,
        reward_grad_batch_size: int = 1,
    ):
        super().__init__()
        self._trainable = add_diffusers_lora(unet, [unet, vae, text_encoder], lora_rank, lora_alpha, lora_targets, "UNet")
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing(checkpoint_with_adapter_state)
            vae.enable_gradient_checkpointing()
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule = schedule
        self.prompt_table = prompt_table
        self.prompts = list(prompt_table.prompts)
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.flow_channels = tuple(flow_channels)
        self.gradient_checkpointing = gradient_checkpointing
        self.sample_batch_size = sample_batch_size
        self.reward_grad_batch_size = reward_grad_batch_size
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, height, width)
        self._embedding_cache: dict[int, Tensor] = {}  # prompt id → (tokens, dim); id −1 is the negative prompt
        self._adapter_enabled = True

    @classmethod
    def from_config(cls, config) -> StableDiffusionBackend:
        prompt_table = build_prompt_table(config.prompts)  # first: a bad prompt file fails in milliseconds
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        dtype = DTYPES[resolve_dtype(config.dtype, "cpu")]  # a RunConfig has resolved auto for its device already
        hub = _is_hub_id(config.path)
        if hub:
            root, revision = config.path, config.revision  # each component fetches only the files it needs
        else:
            root, revision = resolve_dir(config.path, "model.path", required=PIPELINE_ENTRIES), None
        try:
            schedule = load_noise_schedule(root, revision)
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", revision=revision, torch_dtype=dtype,
                                                        use_safetensors=True)
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", revision=revision, torch_dtype=dtype,
                                                use_safetensors=True)
            text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", revision=revision,
                                                         use_safetensors=True).to(dtype)
            tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", revision=revision)
        except OSError as error:  # missing files, offline, unknown hub repo or revision
            raise pipeline_load_error("Stable Diffusion", config.path, hub, error) from None
        return cls._from_parts(unet, vae, text_encoder, tokenizer, schedule, config, prompt_table)

    @classmethod
    def from_pipeline(cls, pipe, prompts: list[str] | str = "animals", **settings) -> StableDiffusionBackend:
        """A backend on a ``StableDiffusionPipeline`` already in memory (any UNet, VAE and CLIP text encoder of the
        SD 1.x/2.x shapes). The LoRA adapter is added to ``pipe.unet`` itself, so after training ``pipe(…)``
        generates with it.

        Args:
            pipe: the pipeline (its ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` are used).
            prompts: the prompts to train on (a list), or a source as ``model.prompts.source`` takes it.
            settings: other keys of ``model`` (``lora_rank``, ``guidance_scale``, ``sample_batch_size`` …).

        Returns:
            The backend; a run made with it records the pipeline's name or path and lists the model as handed over.
        """
        missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if getattr(pipe, name, None) is None]
        if missing:
            raise ConfigError(f"from_pipeline: the pipeline has no {', '.join(missing)} (a Stable Diffusion 1.x/2.x "
                              "pipeline is needed)")
        dtype = {value: key for key, value in DTYPES.items()}.get(pipe.unet.dtype, "fp32")
        path = str(getattr(pipe, "name_or_path", None) or StableDiffusionModelConfig.model_fields["path"].default)
        config = StableDiffusionModelConfig(path=path, dtype=dtype, prompts=PromptsConfig(source=prompts), **settings)
        backend = cls._from_parts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                  noise_schedule_of(dict(pipe.scheduler.config), path), config)
        backend._description = config
        return backend

    @classmethod
    def _from_parts(cls, unet, vae, text_encoder, tokenizer, schedule: NoiseSchedule, config,
                    prompt_table: PromptTable | None = None) -> StableDiffusionBackend:
        return cls(
            unet,
            vae,
            text_encoder,
            tokenizer,
            schedule,
            prompt_table or build_prompt_table(config.prompts),
            **adapter_and_sampling_keywords(config),
        )

    # -- text ------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = (
            tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        )
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def text_embeddings(self, cond: Tensor) -> Tensor:
        """Embeddings (B, tokens, dim) of each id's prompt (−1: the negative prompt), in the UNet's dtype on its
        device. Each prompt goes through the text encoder once; later calls read the cache."""
        ids = cond.tolist()
        missing = sorted({i for i in ids if i not in self._embedding_cache})
        for start in range(0, len(missing), ENCODE_BATCH):
            chunk = missing[start : start + ENCODE_BATCH]
            texts = [self.negative_prompt if i == -1 else self.prompts[i] for i in chunk]
            for i, embedding in zip(chunk, self._encode(texts)):
                self._embedding_cache[i] = embedding
        device, dtype = self.unet.device, self.unet.dtype
        for i in set(ids):  # after a move to another device, move each cached embedding once
            if self._embedding_cache[i].device != device or self._embedding_cache[i].dtype != dtype:
                self._embedding_cache[i] = self._embedding_cache[i].to(device, dtype)
        return torch.stack([self._embedding_cache[i] for i in ids])

    # -- the model -------------------------------------------------------------------
    @contextmanager
    def adapter(self, enabled: bool) -> Iterator[None]:
        """The finetuned (``enabled``) or the pretrained UNet inside the block; the previous state comes back
        on exit, also when the block raises."""
        previous = self._adapter_enabled
        if enabled != previous:
            (self.unet.enable_adapters if enabled else self.unet.disable_adapters)()
            self._adapter_enabled = enabled
        try:
            yield
        finally:
            if enabled != previous:
                (self.unet.enable_adapters if previous else self.unet.disable_adapters)()
                self._adapter_enabled = previous

    def eps(self, x: Tensor, timestep: Tensor, cond: Tensor, finetuned: bool = True) -> Tensor:
        """Guided ε = ε(∅) + w (ε(c) − ε(∅)) in fp32, from one UNet call on [negative; prompt] (w = 1: prompt only)."""
        batch = x.shape[0]
        x_in = x.to(self.unet.dtype)
        timestep = timestep.to(x.device).expand(batch)
        context = self.text_embeddings(cond)
        with self.adapter(finetuned):
            if self.guidance_scale == 1:
                return self.unet(x_in, timestep, encoder_hidden_states=context).sample.float()
            negative = self.text_embeddings(torch.full((1,), -1)).expand(batch, -1, -1)
            both = self.unet(
                torch.cat([x_in, x_in]),
                torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat([negative, context]),
            ).sample.float()
        unconditional, conditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def make_flow_score_net(self) -> nn.Module:
        """A UNet2DConditionModel with widths ``flow_channels`` (one layer per block, cross-attention to the
        prompt embeddings), fp32, its output layer zeroed."""
        unet = flow_score_unet(self.sample_shape, self.flow_channels, self.text_encoder.config.hidden_size,
                               self.gradient_checkpointing)
        return FlowScoreUNet(unet, self.text_embeddings)
