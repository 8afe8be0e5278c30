"""Training settings: Algorithm 1's loop (`TrainConfig`) and each parameter group's optimiser (`OptimizerConfig`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..config_base import StrictConfig


class OptimizerConfig(StrictConfig):
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's (β₁, β₂), each in [0, 1)")
    grad_clip: float | None = Field(1.0, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"Adam's betas must each be in [0, 1), got {list(value)}")
        return value


class TrainConfig(StrictConfig):
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
    device: str = Field("cpu", description="cpu, cuda or cuda:N (or mps); under "
                        "`accelerate launch`, cuda gives each process its own GPU")
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
    max_relative_step: float | None = Field(
        10.0, gt=0, description="an update that moves a parameter group by more than this many times its own norm "
        "(‖Δθ‖ > c·‖θ‖: the learning rate or the gradients are far too large) stops the run at once, before any "
        "checkpoint holds the blown-up weights; None: no check"
    )
    max_nonfinite_updates: int = Field(
        10, ge=1, description="updates in a row with a NaN or inf in the rewards, loss or gradients (each skipped, "
        "the weights untouched) after which the run stops"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"train.device: {value!r} is not a device; use cpu, cuda, cuda:N or mps")
        return value

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


