"""Run configuration: pydantic models validated at load time.

A config is YAML (or defaults) plus dotted ``key=value`` overrides; unknown keys,
wrong types and out-of-range values are rejected with the offending key named.
Every field is documented in docs/config.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from .config_base import StrictConfig as _Strict
from .errors import ConfigError
from .rewards.python import PythonRewardConfig


def _ring(modes: int = 8, radius: float = 3.0) -> list[list[float]]:
    return [
        [round(radius * math.cos(2 * math.pi * k / modes), 6), round(radius * math.sin(2 * math.pi * k / modes), 6)]
        for k in range(modes)
    ]


class ScheduleConfig(_Strict):
    kind: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)


class GMMModelConfig(_Strict):
    """Gaussian mixture in R^d with the exact pretrained ε (default: 8-mode ring, radius 3, std 0.3)."""

    kind: Literal["gmm"] = "gmm"
    means: list[list[float]] = Field(default_factory=_ring)
    stds: list[float] = Field(default_factory=lambda: [0.3] * 8)
    weights: list[float] | None = None  # None: equal weights
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    hidden: int = Field(128, ge=1)
    layers: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> "GMMModelConfig":
        if not self.means:
            raise ValueError("model.means: at least one mean is needed")
        dim = len(self.means[0])
        if dim == 0 or any(len(m) != dim for m in self.means):
            raise ValueError("model.means: every mean must have the same, non-zero, length")
        if len(self.stds) != len(self.means):
            raise ValueError(f"model.stds: expected {len(self.means)} values (one per mean), got {len(self.stds)}")
        if any(s <= 0 for s in self.stds):
            raise ValueError("model.stds: every std must be > 0")
        if self.weights is not None:
            if len(self.weights) != len(self.means):
                raise ValueError(f"model.weights: expected {len(self.means)} values, got {len(self.weights)}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("model.weights: weights must be ≥ 0 with a positive sum")
        return self

    @property
    def dim(self) -> int:
        return len(self.means[0])


class GaussianRewardConfig(_Strict):
    """log R(x) = −|x − center|² / (2 · scale²)."""

    kind: Literal["gaussian"] = "gaussian"
    center: list[float] = Field(default_factory=lambda: [3.0, 0.5])
    scale: float = Field(1.0, gt=0)


class LinearRewardConfig(_Strict):
    """log R(x) = direction · x."""

    kind: Literal["linear"] = "linear"
    direction: list[float] = Field(default_factory=lambda: [1.0, 0.0])


class DigitsModelConfig(_Strict):
    """The built-in 8×8 digits diffusion model (pretrained on scikit-learn's digits), finetuned with LoRA."""

    kind: Literal["digits"] = "digits"
    weights: str | None = Field(None, description="safetensors file from `nablagfn pretrain digits`; None: shipped")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None: equal to lora_rank")


class PromptsConfig(_Strict):
    """Where prompts come from: ``animals`` (45 built-in names) or a file (.txt one per line, .json list, .csv)."""

    source: str | list[str] = Field("animals", description="animals, a prompt file, or the prompts themselves (a list)")
    column: str = Field("prompt", description="CSV column holding the prompt")
    held_out: float = Field(0.0, ge=0, lt=1, description="fraction of prompts kept for evaluation only")
    seed: int = Field(0, description="seed of the held-out split")


class StableDiffusionModelConfig(_Strict):
    """A diffusers Stable Diffusion pipeline (local directory or hub id) finetuned with peft LoRA."""

    kind: Literal["stable_diffusion"] = "stable_diffusion"
    path: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="diffusers pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/) or hub id",
    )
    revision: str | None = Field(None, description="hub revision (hub ids only)")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="base weights; trainable ones are fp32")
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

    @model_validator(mode="after")
    def _flow_widths(self) -> "StableDiffusionModelConfig":
        if any(width < 8 or width % 8 for width in self.flow_channels):
            raise ValueError(f"model.flow_channels: every width must be a multiple of 8, got {self.flow_channels}")
        return self


class ClassifierRewardConfig(_Strict):
    """log p(y = digit | x) under the shipped digits classifier (digits model only)."""

    kind: Literal["classifier"] = "classifier"
    digit: int = Field(3, ge=0, le=9)
    weights: str | None = Field(None, description="safetensors file from `nablagfn pretrain classifier`; None: shipped")


class BrightnessRewardConfig(_Strict):
    """Mean pixel intensity in [0, 1] (weight-free, differentiable; for demos and tests)."""

    kind: Literal["brightness"] = "brightness"


class AestheticRewardConfig(_Strict):
    """LAION aesthetic predictor: CLIP ViT-L/14 image features (L2-normalised) → MLP."""

    kind: Literal["aesthetic"] = "aesthetic"
    clip_model: str = Field("openai/clip-vit-large-patch14", description="transformers CLIP directory or hub id")
    head: str = Field(
        "camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth",
        description="the MLP's .pth file: a local path or owner/repo:filename",
    )


class HPSv2RewardConfig(_Strict):
    """HPSv2 / HPSv2.1: OpenCLIP ViT-H-14 with the HPS checkpoint; score = image–text cosine (as hpsv2.score)."""

    kind: Literal["hpsv2"] = "hpsv2"
    version: Literal["v2.0", "v2.1"] = "v2.1"
    checkpoint: str | None = Field(
        None,
        description="HPS .pt file: a local path or owner/repo:filename; None: xswu/HPSv2's "
        "HPS_v2_compressed.pt (v2.0) or HPS_v2.1_compressed.pt (v2.1)",
    )
    tokenizer: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", description="CLIP tokenizer directory (vocab.json, merges.txt) or hub id"
    )


class ImageRewardConfig(_Strict):
    """ImageReward (BLIP ViT-L + BERT cross-attention + MLP), forward pass rebuilt differentiably."""

    kind: Literal["imagereward"] = "imagereward"
    checkpoint: str = Field(
        "THUDM/ImageReward:ImageReward.pt", description="the official state dict: local path or owner/repo:filename"
    )
    tokenizer: str = Field(
        "google-bert/bert-base-uncased",
        description="BERT-base-uncased vocabulary: a directory holding vocab.txt, the file itself, or a hub id",
    )


class PickScoreRewardConfig(_Strict):
    """PickScore: a CLIP ViT-H-14 finetuned on Pick-a-Pic; score = logit scale × image–text cosine."""

    kind: Literal["pickscore"] = "pickscore"
    model: str = Field("yuvalkirstain/PickScore_v1", description="transformers CLIP directory or hub id")
    tokenizer: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="processor directory or hub id: CLIP tokenizer (vocab.json, merges.txt) and preprocessor_config.json",
    )


class ClipScoreRewardConfig(_Strict):
    """CLIP score: image–text cosine similarity (× 100) of a transformers CLIP model."""

    kind: Literal["clip"] = "clip"
    model: str = Field(
        "openai/clip-vit-large-patch14", description="transformers CLIP directory (with its tokenizer) or hub id"
    )


class JpegRewardConfig(_Strict):
    """JPEG file size in kB at ``quality`` (not differentiable: only for gradient-free methods)."""

    kind: Literal["jpeg_compressibility", "jpeg_incompressibility"] = "jpeg_compressibility"
    quality: int = Field(95, ge=1, le=100)


class SamplerConfig(_Strict):
    """``ddpm``: DDIM with η (1 = the paper's DDPM, 50 steps); ``dpm_solver``: first-order SDE-DPM-Solver++."""

    kind: Literal["ddpm", "ddim", "dpm_solver"] = "ddpm"
    steps: int = Field(50, ge=1, le=1000)
    eta: float = Field(1.0, gt=0, description="DDIM η; > 0, since η = 0 is deterministic and has no log-probs")


class SubsampleConfig(_Strict):
    """Which transitions of each trajectory are trained on (the last one always is)."""

    kind: Literal["stratified", "uniform", "all"] = "stratified"
    fraction: float = Field(0.1, gt=0, le=1)


class RewardSmoothingConfig(_Strict):
    """∇ log R averaged over ``samples`` draws of N(0, noise²) added in reward space (§4.3, c = noise)."""

    noise: float = Field(0.0, ge=0)
    samples: int = Field(1, ge=1)


class _GradientFlowConfig(_Strict):
    """Keys shared by the ∇-DB family: look-ahead flow score (eq. 15), loss weights, subsampling, smoothing."""

    beta: float = Field(0.5, gt=0)
    gamma: Literal["alpha_bar", "sqrt_alpha_bar", "one"] = "sqrt_alpha_bar"
    lookahead: Literal["pretrained", "finetuned"] = "pretrained"
    weight_forward: float = Field(1.0, ge=0)
    weight_reverse: float = Field(1.0, ge=0)
    weight_terminal: float = Field(1.0, ge=0)
    output_reg: float = Field(0.0, ge=0)
    subsample: SubsampleConfig = Field(default_factory=SubsampleConfig)
    reward_smoothing: RewardSmoothingConfig = Field(default_factory=RewardSmoothingConfig)


class ResidualNablaDBConfig(_GradientFlowConfig):
    """Residual ∇-DB with forward-looking flow (eq. 16–19). See docs/methods.md."""

    name: Literal["residual_nabla_db"] = "residual_nabla_db"
    prior_strength: float = Field(1.0, ge=0, description="η: target ∝ R^β · p_pretrained^η")
    forward_weighting: Literal["eps", "score"] = "eps"
    reverse_weighting: Literal["score", "variance"] = "score"
    reverse_target: Literal["propagated", "expected", "sampled"] = "propagated"
    detach_flow_in_forward: bool = True
    second_order: bool = False
    policy_target: Literal["tilted_score", "detailed_balance"] = Field(
        "tilted_score", description="tilted_score: ε_θ(x_k) → η ε#(x_k) − √(1 − ᾱ_k) ∇ log F̃(x_k); detailed_balance: "
        "eq. 16 (the paper)"
    )
    flow_oracle: bool = Field(
        False, description="diagnostic: the forward loss uses the exact flow score ∇ log F̃ instead of the learned "
        "one (model.kind=gmm with a gaussian or linear reward and prior_strength 1)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ResidualNablaDBConfig":
        if self.second_order and self.reverse_target != "sampled":
            raise ValueError(
                "method.second_order: needs method.reverse_target=sampled (the other targets have no policy term)"
            )
        return self


class NablaDBConfig(_GradientFlowConfig):
    """∇-DB without a prior (eq. 7–9): target ∝ R^β, backward policy = the noising kernel."""

    name: Literal["nabla_db"] = "nabla_db"
    reverse_target: Literal["expected", "sampled"] = "expected"
    # without the prior the targets carry 1/(1 − r) times the policy's error: these weightings keep it stable
    forward_weighting: Literal["eps", "score"] = "score"
    reverse_weighting: Literal["score", "variance"] = "variance"


class _DetailedBalanceConfig(_Strict):
    """Keys shared by the scalar-flow DB methods (DAG-DB, residual DB). See docs/methods.md."""

    beta: float = Field(
        0.5, gt=0, description="β of the target (R^β for DAG-DB, p_pretrained·R^β for residual DB), in the exact "
        "(summed log-density) convention whatever log_prob_reduction is",
    )
    beta_ramp: float = Field(
        0.5, ge=0, le=1,
        description="β rises linearly from 0 over this fraction of the updates (DAG reference: the first half); 0: none",
    )
    output_reg: float = Field(1.0, ge=0, description="λ of λ‖ε_θ − ε_behaviour‖² (element mean; reference: 1)")
    log_prob_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="mean: the DB residual per state element (the reference averages log-probs over latent elements), "
        "sum: in nats; both have the target R^β (the reference's β equals beta / number of elements)",
    )
    subsample: SubsampleConfig = Field(default_factory=SubsampleConfig)


class ResidualDBConfig(_DetailedBalanceConfig):
    """Residual detailed balance (eq. 20): DB in log-densities against the pretrained model, scalar residual flow."""

    name: Literal["residual_db"] = "residual_db"
    lookahead: Literal["finetuned", "pretrained"] = Field(
        "pretrained", description="model whose one-step prediction x̂(x_k) gives the forward-looking log R (paper: "
        "finetuned, which diverged on the Gaussian mixture)",
    )
    prior_strength: float = Field(
        1.0, ge=0, description="η: target ∝ R^β · p_pretrained^η (η ≠ 1 adds (1 − η) log P_B to the balance)"
    )


class DAGDBConfig(_DetailedBalanceConfig):
    """DAG-DB: GFlowNet detailed balance with a scalar flow network, forward-looking with the predicted reward."""

    name: Literal["dag_db"] = "dag_db"
    lookahead: Literal["finetuned", "pretrained"] = Field(
        "finetuned", description="model whose one-step prediction x̂(x_k) gives the forward-looking log R (reference: "
        "finetuned)",
    )


class DDPOConfig(_Strict):
    """DDPO: PPO-clipped policy gradient on the kernel log-probs, per-prompt advantage normalisation.

    On-policy in the reference: set ``train.on_policy=true`` (off-policy data is stale by an epoch of
    updates, so most ratios leave the tiny clip range and stop contributing). Defaults are the reference's."""

    name: Literal["ddpo"] = "ddpo"
    clip_range: float = Field(1e-4, gt=0, description="PPO clip ε: ratios outside 1 ± ε stop contributing")
    advantage_clip: float = Field(5.0, gt=0, description="advantages are clipped to ± this")
    per_prompt: bool = Field(
        True, description="normalise rewards per prompt with its recent rewards (else by minibatch statistics)"
    )
    buffer_size: int = Field(16, ge=2, description="recent rewards kept per prompt for the normalisation")
    min_count: int = Field(16, ge=2, description="rewards a prompt needs before its own statistics are used")
    subsample: SubsampleConfig = Field(
        default_factory=lambda: SubsampleConfig(kind="all", fraction=1.0),
        description="which steps of each trajectory are trained on (the reference: all)",
    )


def _check_fraction_range(value: tuple[float, float], key: str) -> None:
    low, high = value
    if not 0 <= low <= high <= 1:
        raise ValueError(f"method.{key}: need 0 ≤ low ≤ high ≤ 1, got {list(value)}")


class _BackpropConfig(_Strict):
    """Keys shared by the reward maximisers that backpropagate through sampling (no prior, no target
    distribution): loss = reward_weight · mean(shaped(−log R)) of freshly sampled chains."""

    reward_weight: float = Field(
        1.0, gt=0, description="scale of the loss −log R (ReFL's code: grad_scale 1e-3 with lr 1e-5); with Adam it "
        "matters mainly through gradient clipping"
    )
    shaping: Literal["none", "hinge", "relu"] = Field(
        "none", description="none: −log R; hinge: ReLU(margin − log R) (ReFL's code, margin 2); relu: −ReLU(log R) "
        "(the ∇-GFlowNet paper's ReFL/DRaFT baselines)"
    )
    hinge_margin: float = Field(2.0, description="the margin of shaping=hinge")
    checkpoint_steps: bool = Field(
        False, description="recompute each sampler step with gradient in the backward pass (torch.utils.checkpoint): "
        "memory of one step instead of all of them, about one more forward pass of time"
    )


class ReFLConfig(_BackpropConfig):
    """ReFL: stop at a random late step, one step with gradient to x̂, maximise the reward of its decoding."""

    name: Literal["refl"] = "refl"
    stop_range: tuple[float, float] = Field(
        (0.7, 1.0), description="the stop state s is drawn uniformly from round(low·K) … round(high·K) − 1 (one per "
        "minibatch); the default gives states 35–49 of 50 (the ∇-GFlowNet paper), (0.75, 1.0) gives ReFL's 30–39 of 40"
    )

    @model_validator(mode="after")
    def _range(self) -> "ReFLConfig":
        _check_fraction_range(self.stop_range, "stop_range")
        return self


class DRaFTConfig(_BackpropConfig):
    """DRaFT-K: backpropagate the final reward through the last K sampler steps."""

    name: Literal["draft"] = "draft"
    backprop_steps: int = Field(1, ge=1, description="K: gradient through the last K steps only (DRaFT-1 is typical)")


class DRaFTLVConfig(_BackpropConfig):
    """DRaFT-LV: DRaFT-1 with extra noise-then-denoise steps on the final sample (lower-variance gradient)."""

    name: Literal["draft_lv"] = "draft_lv"
    copies: int = Field(2, ge=1, description="n: noise-then-denoise copies of each final sample (DRaFT: n = 2)")
    include_sampled_step: bool = Field(
        False, description="also backpropagate through the chain's own last step (average over 1 + n copies); "
        "DRaFT's algorithm detaches the sample and uses the n copies only"
    )


class AlignPropConfig(_BackpropConfig):
    """AlignProp: backpropagate through the whole chain (gradient checkpointing, random truncation)."""

    name: Literal["alignprop"] = "alignprop"
    truncation: tuple[float, float] = Field(
        (0.1, 0.3), description="gradient through the last T steps, T drawn uniformly from round(low·K) … "
        "round(high·K) (at least 1) per minibatch; AlignProp's default: the last 5–15 of 50; (1, 1): the whole chain"
    )
    checkpoint_steps: bool = Field(True, description="per-step gradient checkpointing (on by default for AlignProp)")

    @model_validator(mode="after")
    def _range(self) -> "AlignPropConfig":
        _check_fraction_range(self.truncation, "truncation")
        return self


class GRAFTConfig(_Strict):
    """GRAFT: rejection-sampling finetuning (top-K, threshold, or exact rejection sampling of the tilt).

    With ``selection=rejection`` and ``proposal=pretrained`` the accepted samples follow p·R^β exactly
    (β = 1/α, the acceptance temperature's inverse), so the target is R^β · p_pretrained (η = 1)."""

    name: Literal["graft"] = "graft"
    beta: float = Field(0.5, gt=0, description="β = 1/α: rejection sampling accepts with exp(β (log R − max))")
    selection: Literal["rejection", "top_k", "threshold"] = Field(
        "rejection", description="rejection: accept w.p. exp(β(log R − max)); top_k: the best; threshold: log R ≥"
    )
    top_k_fraction: float = Field(0.25, gt=0, le=1, description="top_k: K/M, the share of each group kept")
    threshold: float | None = Field(None, description="threshold: accept log R ≥ this (required for it)")
    log_reward_max: float | None = Field(
        None, description="rejection: a known upper bound of log R; None: each group's maximum (approximate)"
    )
    group: Literal["batch", "prompt"] = Field(
        "batch", description="top_k and the rejection maximum compare within the minibatch, or per prompt in it"
    )
    proposal: Literal["pretrained", "current"] = Field(
        "pretrained",
        description="pretrained: fresh pretrained samples each minibatch (exact tilt of p); current: the trainer's "
        "samples of the finetuned model (iterated, RAFT-style: the tilt compounds every round)",
    )
    timesteps: Literal["sampler", "uniform"] = Field(
        "sampler", description="denoising-loss timesteps: those of the steps the finetuned model takes, or uniform"
    )

    @property
    def prior_strength(self) -> float:
        """η = 1, fixed: rejection sampling from the pretrained model keeps it as the prior."""
        return 1.0

    @model_validator(mode="after")
    def _threshold_given(self) -> "GRAFTConfig":
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("method.threshold: selection=threshold needs a log-reward threshold")
        return self


class PGRAFTConfig(GRAFTConfig):
    """P-GRAFT: GRAFT on the intermediate states at noise level t_I; pretrained model below t_I."""

    name: Literal["pgraft"] = "pgraft"
    intermediate_fraction: float = Field(
        0.5, gt=0, le=1,
        description="share of sampler steps the finetuned model takes: k_I = round(fraction·K) (t_I = its timestep)",
    )


class AdjointMatchingConfig(_Strict):
    """Adjoint Matching (Domingo-Enrich et al. 2024): lean adjoint through the pretrained model, control
    regression; target ∝ p_pretrained · exp(β log R). Needs a memoryless sampler (DDPM: DDIM η = 1, or
    first-order SDE-DPM-Solver++). Best with ``train.on_policy=true`` (the paper's setting)."""

    name: Literal["adjoint_matching"] = "adjoint_matching"
    beta: float = Field(
        0.5, gt=0, description="the paper's reward multiplier λ: target ∝ p_pretrained · R^β; lean adjoint "
        "ã_K = −β ∇ log R(x_K)"
    )
    prior_strength: Literal[1.0] = Field(
        1.0, description="fixed at 1: Adjoint Matching keeps the pretrained model with exponent 1 (the target is "
        "p_pretrained · R^β)"
    )
    subsample: SubsampleConfig = Field(
        default_factory=SubsampleConfig,
        description="steps of each trajectory the loss is evaluated on (the last one always); the lean adjoint is "
        "propagated through every step regardless",
    )
    reward_smoothing: RewardSmoothingConfig = Field(default_factory=RewardSmoothingConfig)


class OptimizerConfig(_Strict):
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(_Strict):
    """Algorithm 1's loop. Updates per epoch = trajectories_per_epoch / (batch_size · accumulation)."""

    updates: int = Field(1500, ge=1)
    trajectories_per_epoch: int = Field(256, ge=1)
    batch_size: int = Field(256, ge=1, description="trajectories per gradient computation")
    accumulation: int = Field(1, ge=1)
    on_policy: bool = Field(False, description="train on this epoch's trajectories instead of the previous epoch's")
    seed: int = 0
    policy_optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    flow_optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_min_ratio: float = Field(0.05, ge=0, le=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(250, ge=1)
    eval_samples: int = Field(4000, ge=2)
    device: str = Field("cpu", description="cpu, cuda or cuda:N; under `accelerate launch`, cuda gives each "
                        "process its own GPU")
    data_shards: int | None = Field(
        None, ge=1, description="each epoch is sampled in this many shards, shard k from its own seeded generator "
        "(train.seed + k·2³²) and spread over the training processes; the run does not depend on how many "
        "processes share the shards. None: the number of processes at the start of the run (then saved)"
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="experiment trackers (through accelerate) besides metrics.jsonl, which "
        "is always written; wandb honours WANDB_MODE=offline"
    )
    project: str = Field("nablagfn", min_length=1, description="the trackers' project name")
    max_nonfinite_updates: int = Field(
        10, ge=1, description="updates in a row with a NaN or inf in the rewards, loss or gradients (each skipped, "
        "the weights untouched) after which the run stops"
    )

    @model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        per_update = self.batch_size * self.accumulation
        if self.trajectories_per_epoch % per_update:
            raise ValueError(
                f"train.trajectories_per_epoch ({self.trajectories_per_epoch}) must be a multiple of "
                f"train.batch_size × train.accumulation ({per_update})"
            )
        if self.data_shards is not None and self.batch_size % self.data_shards:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.data_shards ({self.data_shards}): "
                "every shard contributes the same number of trajectories to each gradient"
            )
        return self


class EvalConfig(_Strict):
    """Sample metrics of each evaluation beyond the reward: diversity and FID to the pretrained model, per prompt."""

    features: Literal["auto", "classifier", "clip", "dreamsim", "inception", "pixels"] = Field(
        "auto", description="feature extractor of the diversity and FID; auto: classifier for digits, clip for "
        "Stable Diffusion when a CLIP is at hand (eval.features_path or the reward's), else none"
    )
    features_path: str | None = Field(
        None, description="its weights: classifier safetensors, CLIP directory or hub id, DreamSim cache directory, "
        "FID Inception .pth; None: the shipped classifier / the reward's CLIP or openai/clip-vit-large-patch14"
    )
    prior_fid: bool = Field(True, description="report fid_to_pretrained (pretrained samples drawn once per run)")
    batch_size: int = Field(32, ge=1, description="images per feature-extractor batch")


ModelConfig = Annotated[
    Union[GMMModelConfig, DigitsModelConfig, StableDiffusionModelConfig], Field(discriminator="kind")
]
RewardConfig = Annotated[
    Union[
        GaussianRewardConfig,
        LinearRewardConfig,
        ClassifierRewardConfig,
        BrightnessRewardConfig,
        AestheticRewardConfig,
        HPSv2RewardConfig,
        ImageRewardConfig,
        PickScoreRewardConfig,
        ClipScoreRewardConfig,
        JpegRewardConfig,
        PythonRewardConfig,
    ],
    Field(discriminator="kind"),
]
MethodConfig = Annotated[
    Union[
        ResidualNablaDBConfig,
        NablaDBConfig,
        ResidualDBConfig,
        DAGDBConfig,
        DDPOConfig,
        ReFLConfig,
        DRaFTConfig,
        DRaFTLVConfig,
        AlignPropConfig,
        GRAFTConfig,
        PGRAFTConfig,
        AdjointMatchingConfig,
    ],
    Field(discriminator="name"),
]


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=DigitsModelConfig)
    handed_over: list[Literal["model", "reward"]] = Field(
        default_factory=list, description="parts given to the trainer in Python that this config describes only as "
        "far as it can (a pipeline in memory, a reward defined in a script): loading the run again needs them"
    )
    reward: RewardConfig = Field(default_factory=ClassifierRewardConfig)
    method: MethodConfig = Field(default_factory=ResidualNablaDBConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _compatible(self) -> "RunConfig":
        model, reward = self.model.kind, self.reward.kind
        if reward in VECTOR_REWARDS:
            if model != "gmm":
                raise ValueError(f"reward.kind: {reward!r} is a reward on vectors; model.kind={model!r} makes images")
            vector = self.reward.center if reward == "gaussian" else self.reward.direction
            if len(vector) != self.model.dim:
                key = "reward.center" if reward == "gaussian" else "reward.direction"
                raise ValueError(f"{key}: has {len(vector)} entries but the model's states have {self.model.dim}")
        elif model == "gmm" and reward != "python":
            raise ValueError(f"reward.kind: {reward!r} is an image reward; model.kind=gmm needs gaussian or linear")
        if reward == "classifier" and model != "digits":
            raise ValueError("reward.kind: 'classifier' is the digits classifier; it needs model.kind=digits")
        features = self.eval.features
        if model == "gmm" and features != "auto":
            raise ValueError("eval.features: the Gaussian mixture is measured against its exact target; leave it auto")
        if features in ("classifier", "pixels") and model != "digits":
            raise ValueError(f"eval.features: {features!r} is for the 8×8 digits; it needs model.kind=digits")
        if features in ("dreamsim", "inception") and self.eval.features_path is None:
            raise ValueError(f"eval.features_path: eval.features={features} needs its local weights (docs/config.md)")
        problem = _reward_gradient_problem(self.method.name, self.reward)
        if problem:
            raise ValueError(problem)
        return self


VECTOR_REWARDS = ("gaussian", "linear")


def _reward_gradient_problem(method: str, reward) -> str | None:
    """Why ``method`` cannot use the reward of config ``reward`` (it needs ∇ log R and the reward has none), or
    None. Read from the classes without building anything, so the error comes before any model is loaded."""
    from importlib import import_module

    from .methods import METHODS, method_class
    from .rewards import REWARDS

    if method not in METHODS or reward.kind not in REWARDS or not method_class(method).needs_reward_gradient:
        return None
    differentiable = getattr(reward, "differentiable", None)  # rewards that say so in their config
    if differentiable is None:
        module, name = REWARDS[reward.kind].split(":")
        differentiable = getattr(import_module(f".rewards.{module}", __package__), name).differentiable
    if differentiable:
        return None
    free = [m for m in METHODS if not method_class(m).needs_reward_gradient]
    return (f"method.name: {method} needs reward gradients, but reward.kind={reward.kind} is not differentiable; "
            f"choose a method without reward gradients ({', '.join(free)}) or a differentiable reward")


def _tag_values(union: Any) -> set[str]:
    """All discriminator values of an annotated union (pydantic puts them in error locations)."""
    values: set[str] = set()
    for member in union.__origin__.__args__:
        for name in ("kind", "name"):
            field = member.model_fields.get(name)
            if field is not None:
                values.update(field.annotation.__args__)
    return values


_TAG_VALUES = _tag_values(ModelConfig) | _tag_values(RewardConfig) | _tag_values(MethodConfig)


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-after"))
        # drop the discriminator tag pydantic inserts (e.g. model.gmm.means → model.means)
        parts = [p for p in key.split(".") if p not in _TAG_VALUES]
        key = ".".join(parts)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_invalid":
            tag = item["ctx"]["discriminator"].strip("'")
            key = f"{key}.{tag}"
            message = f"unknown value {item['ctx']['tag']!r}; choose one of {item['ctx']['expected_tags']}"
        if item["type"] == "extra_forbidden":
            message = "unknown key (see docs/config.md for the valid ones)"
        if re.match(r"^[a-z_]+(\.[a-z_]+)+:", message):
            lines.append(f"  {message}")  # our own validators already name the key
        else:
            lines.append(f"  {key or '<root>'}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. method.beta=2.0)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: str | Path, label: str, expected: str) -> dict:
    """A YAML file holding a mapping (empty file: {}), or a ConfigError naming ``label`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{label} {path} is not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{label} {path} must {expected}")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults ← YAML file ← dotted overrides, validated as one tree."""
    expected = "hold a mapping of sections (model, reward, method, …)"
    tree = {} if path is None else read_yaml_mapping(path, "config file", expected)
    for override in overrides:
        key, value = parse_override(override)
        _set(tree, key, value)
    return validate_config(tree)


#: the model of a config that names none: the built-in digits model
DEFAULT_MODEL = "digits"
#: the reward used when a config names a model but no reward kind
DEFAULT_REWARD = {"gmm": "gaussian", "digits": "classifier", "stable_diffusion": "aesthetic"}


#: defaults that depend on model.kind, applied beneath the user's own values (listed in docs/config.md)
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gmm": {},
    "digits": {
        "method": {"beta": 1.0},
        "train": {
            "updates": 200,
            "flow_optimizer": {"lr": 1e-2},
            "trajectories_per_epoch": 32,
            "batch_size": 16,
            "checkpoint_every": 50,
            "eval_every": 50,
            "eval_samples": 300,
        },
    },
    "stable_diffusion": {},
}


def _with_defaults(defaults: dict, tree: dict) -> dict:
    """``defaults`` deep-merged beneath ``tree`` (the user's values win)."""
    merged = dict(defaults)
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _with_defaults(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_preset(tree: dict, model_kind: str) -> dict:
    preset = MODEL_PRESETS.get(model_kind, {})
    method = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    method_class = {cls.model_fields["name"].default: cls for cls in MethodConfig.__origin__.__args__}.get(
        method.get("name", "residual_nabla_db")
    )
    for section, values in preset.items():
        if section == "method":  # only the keys the chosen method has
            values = {k: v for k, v in values.items() if method_class is not None and k in method_class.model_fields}
        if values and (section not in tree or isinstance(tree[section], dict)):
            tree[section] = _with_defaults(values, tree.get(section) or {})
    return tree


def validate_config(tree: dict) -> RunConfig:
    tree = dict(tree)
    model = tree.get("model")
    model_kind = model.get("kind", DEFAULT_MODEL) if isinstance(model, dict) else DEFAULT_MODEL
    tree = _apply_preset(tree, model_kind)
    defaults = {"model": ("kind", DEFAULT_MODEL), "method": ("name", "residual_nabla_db")}
    defaults["reward"] = ("kind", DEFAULT_REWARD.get(model_kind, "gaussian"))
    tree.setdefault("reward", {})
    for section, (tag, default) in defaults.items():
        if isinstance(tree.get(section), dict):
            tree[section] = {tag: default, **tree[section]}
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (a dumped config) → flat dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat
