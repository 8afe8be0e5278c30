"""The run configuration: ``RunConfig``, one section per part, each part's config class beside its code.

The ``model``, ``reward`` and ``method`` sections are unions of the config classes of the registered backends,
rewards and methods (``BACKENDS``, ``REWARDS``, ``METHODS``: each implementation names its ``config_class``), so a
new method or reward is one file plus one registry line. Reading YAML, overrides, presets and error messages:
``config_loading.py``. Every field is documented in docs/config.md.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .backends import BACKENDS
from .backends.digits import DigitsModelConfig
from .backends.flux import FluxModelConfig
from .backends.gmm import GMMModelConfig, ScheduleConfig
from .backends.prompts import PromptsConfig
from .backends.stable_diffusion import StableDiffusionModelConfig
from .backends.stable_diffusion_3 import StableDiffusion3ModelConfig
from .config_base import StrictConfig
from .errors import ConfigError
from .eval.features import EvalConfig
from .mdp.sampler import SamplerConfig
from .methods import METHODS
from .methods.adjoint_matching import AdjointMatchingConfig
from .methods.backprop import AlignPropConfig, DRaFTConfig, DRaFTLVConfig, ReFLConfig
from .methods.base import RewardSmoothingConfig, SubsampleConfig
from .methods.ddpo import DDPOConfig
from .methods.detailed_balance import DAGDBConfig, ResidualDBConfig
from .methods.flow_grpo import FlowGRPOConfig
from .methods.graft import GRAFTConfig, PGRAFTConfig
from .methods.nabla_db import NablaDBConfig
from .methods.residual_nabla_db import ResidualNablaDBConfig
from .registry import config_classes
from .rewards import REWARDS
from .rewards.classifier import ClassifierRewardConfig
from .rewards.clip_rewards import AestheticRewardConfig, ClipScoreRewardConfig, PickScoreRewardConfig
from .rewards.hpsv2 import HPSv2RewardConfig
from .rewards.imagereward import ImageRewardConfig
from .rewards.python import PythonRewardConfig
from .rewards.simple import BrightnessRewardConfig, JpegRewardConfig
from .rewards.vector import GaussianRewardConfig, LinearRewardConfig
from .train.settings import OptimizerConfig, TrainConfig

ModelConfig = Annotated[Union[config_classes(BACKENDS, "nablagfn.backends")], Field(discriminator="kind")]
RewardConfig = Annotated[Union[config_classes(REWARDS, "nablagfn.rewards")], Field(discriminator="kind")]
MethodConfig = Annotated[Union[config_classes(METHODS, "nablagfn.methods")], Field(discriminator="name")]


class RunConfig(StrictConfig):
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
        if model in PIPELINE_MODELS and self.model.dtype == "auto":
            from .backends.stable_diffusion import resolve_dtype

            self.model.dtype = resolve_dtype("auto", self.train.device)
        self._sampler_matches_model()
        self._gamma_matches_model()
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
        group_size = getattr(self.method, "group_size", None)
        shards = self.train.data_shards or 1
        if group_size is not None and (self.train.trajectories_per_epoch // shards) % group_size:
            raise ValueError(
                f"train.trajectories_per_epoch: {self.train.trajectories_per_epoch} over {shards} data shard(s) is not "
                f"a multiple of method.group_size={group_size} per shard; make it one"
            )
        return self


    def _sampler_matches_model(self) -> None:
        """``sampler.kind`` defaults to ``flow_sde`` for flow models (``flow_ddpm`` for the methods that need a
        memoryless sampler, ``FLOW_DDPM_METHODS``); a kind for the other parameterization is refused."""
        from .mdp import KERNEL_KINDS

        parameterization = getattr(self.model, "parameterization", "eps")
        if "kind" not in self.sampler.model_fields_set and parameterization == "flow":
            needs_memoryless = self.method.name in FLOW_DDPM_METHODS and (
                getattr(self.method, "policy_target", "tilted_score") == "tilted_score")
            self.sampler.kind = "flow_ddpm" if needs_memoryless else "flow_sde"
        if self.sampler.kind not in KERNEL_KINDS[parameterization]:
            raise ValueError(
                f"sampler.kind: {self.sampler.kind} does not sample model.parameterization={parameterization}; "
                f"choose one of {', '.join(KERNEL_KINDS[parameterization])}"
            )

    def _gamma_matches_model(self) -> None:
        """``method.gamma`` (the ∇-DB family's look-ahead scale) defaults to ``one`` for flow models: there
        ``sqrt_alpha_bar`` is 1 − σ, which leaves g_φ more to learn mid-path, and on the flow ring it stopped at mode
        TV 0.10 where ``one`` reaches 0.009 (docs/methods.md § Flow models)."""
        parameterization = getattr(self.model, "parameterization", "eps")
        if parameterization == "flow" and hasattr(self.method, "gamma") and "gamma" not in self.method.model_fields_set:
            self.method.gamma = "one"


#: keys whose default depends on the model (``RunConfig._sampler_matches_model``, ``_gamma_matches_model``): a config
#: object that does not set them leaves them to the model
MODEL_DEPENDENT_KEYS = {"sampler": ("kind",), "method": ("gamma",)}
VECTOR_REWARDS = ("gaussian", "linear")
#: the diffusers pipeline models (images from prompts, LoRA, model.dtype)
PIPELINE_MODELS = ("stable_diffusion", "stable_diffusion_3", "flux")
#: methods whose default flow sampler is ``flow_ddpm``: their losses assume a memoryless chain (residual ∇-DB's and
#: ∇-DB's ``tilted_score`` policy target, Adjoint Matching)
FLOW_DDPM_METHODS = ("residual_nabla_db", "nabla_db", "adjoint_matching")


def _reward_gradient_problem(method: str, reward) -> str | None:
    """Why ``method`` cannot use the reward of config ``reward`` (it needs ∇ log R and the reward config says it has
    none: ``differentiable``, True unless a config class says otherwise), or None. Read from the classes without
    building anything, so the error comes before any model is loaded."""
    from .methods import METHODS, method_class

    if method not in METHODS or not method_class(method).needs_reward_gradient or getattr(reward, "differentiable", True):
        return None
    free = [m for m in METHODS if not method_class(m).needs_reward_gradient]
    return (f"method.name: {method} needs reward gradients, but reward.kind={reward.kind} is not differentiable; "
            f"choose a method without reward gradients ({', '.join(free)}) or a differentiable reward")


#: every config class, importable from here as from its own module
__all__ = [
    "AdjointMatchingConfig",
    "AestheticRewardConfig",
    "AlignPropConfig",
    "BrightnessRewardConfig",
    "ClassifierRewardConfig",
    "ClipScoreRewardConfig",
    "ConfigError",
    "DAGDBConfig",
    "DDPOConfig",
    "DRaFTConfig",
    "DRaFTLVConfig",
    "DigitsModelConfig",
    "EvalConfig",
    "FlowGRPOConfig",
    "FluxModelConfig",
    "GMMModelConfig",
    "GRAFTConfig",
    "GaussianRewardConfig",
    "HPSv2RewardConfig",
    "ImageRewardConfig",
    "JpegRewardConfig",
    "LinearRewardConfig",
    "MethodConfig",
    "ModelConfig",
    "NablaDBConfig",
    "OptimizerConfig",
    "PGRAFTConfig",
    "PickScoreRewardConfig",
    "PromptsConfig",
    "PythonRewardConfig",
    "ReFLConfig",
    "ResidualDBConfig",
    "ResidualNablaDBConfig",
    "RewardConfig",
    "RewardSmoothingConfig",
    "RunConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "StableDiffusion3ModelConfig",
    "StableDiffusionModelConfig",
    "SubsampleConfig",
    "TrainConfig",
]
