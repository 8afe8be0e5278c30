"""nablagfn: reward finetuning of diffusion models that keeps what the pretrained model knows.

Residual ∇-DB (Nabla-GFlowNet) samples ∝ R(x)^β · p_pretrained(x)^η; eleven baselines share its trainer.
The command line (``nablagfn train …``) builds the same objects as this API from a config.

The API, in the order one uses it:

* **Models** (``Backend``): ``GaussianMixtureBackend.from_mixture(means, stds)`` (exact ground truth), ``DigitsBackend.pretrained()``,
  ``StableDiffusionBackend.from_pipeline(pipe)`` (``StableDiffusion3Backend`` for SD3, ``FluxBackend`` for FLUX) for a
  diffusers pipeline in memory, or ``build_backend(config)``.
* **Rewards** (``Reward``): ``CallableReward(fn)`` for your own ``fn(images, prompts) -> log R``, the built-in
  ones through ``build_reward(config)`` (``AestheticRewardConfig``, ``HPSv2RewardConfig`` …).
* **Methods**: their config objects, e.g. ``ResidualNablaDBConfig(beta=1.0)``, ``DDPOConfig()``.
* **Training**: ``Trainer(backend, reward, method, train={...})`` with ``train()``, ``sample_epoch()``,
  ``update()``, ``sample()``, ``evaluate()``, ``save()``, ``load()``; ``Trainer.from_config(...)`` is what the CLI
  runs. ``load_run(run_dir)`` reopens a run for sampling and evaluation.
* **Out to diffusers**: ``export_lora(run_dir, out, merge=False)`` (``nablagfn export``).

Configs: ``RunConfig`` and its sections, ``load_config(path, overrides)``; every key is in docs/config.md.
"""

from .backends import Backend, GaussianMixture, GaussianMixtureBackend, build_backend
from .backends.digits import DigitsBackend
from .backends.flux import FluxBackend
from .backends.stable_diffusion import StableDiffusionBackend
from .backends.stable_diffusion_3 import StableDiffusion3Backend
from .config import (
    AdjointMatchingConfig,
    AestheticRewardConfig,
    AlignPropConfig,
    BrightnessRewardConfig,
    ClassifierRewardConfig,
    ClipScoreRewardConfig,
    DAGDBConfig,
    DDPOConfig,
    DigitsModelConfig,
    DRaFTConfig,
    DRaFTLVConfig,
    EvalConfig,
    FluxModelConfig,
    GaussianRewardConfig,
    GMMModelConfig,
    GRAFTConfig,
    HPSv2RewardConfig,
    ImageRewardConfig,
    JpegRewardConfig,
    LinearRewardConfig,
    NablaDBConfig,
    OptimizerConfig,
    PGRAFTConfig,
    PickScoreRewardConfig,
    PromptsConfig,
    ReFLConfig,
    ResidualDBConfig,
    ResidualNablaDBConfig,
    RunConfig,
    SamplerConfig,
    StableDiffusion3ModelConfig,
    StableDiffusionModelConfig,
    TrainConfig,
)
from .config_loading import load_config
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .export import export_lora
from .rewards import CallableReward, PythonRewardConfig, Reward, build_reward
from .train.run import Run, load_run
from .train.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "AdjointMatchingConfig",
    "AestheticRewardConfig",
    "AlignPropConfig",
    "Backend",
    "BrightnessRewardConfig",
    "CallableReward",
    "CheckpointError",
    "ClassifierRewardConfig",
    "ClipScoreRewardConfig",
    "ConfigError",
    "DAGDBConfig",
    "DDPOConfig",
    "DRaFTConfig",
    "DRaFTLVConfig",
    "DigitsBackend",
    "DigitsModelConfig",
    "EvalConfig",
    "FluxBackend",
    "FluxModelConfig",
    "GMMModelConfig",
    "GRAFTConfig",
    "GaussianMixture",
    "GaussianMixtureBackend",
    "GaussianRewardConfig",
    "HPSv2RewardConfig",
    "ImageRewardConfig",
    "JpegRewardConfig",
    "LinearRewardConfig",
    "NablaDBConfig",
    "NonFiniteLossError",
    "OptimizerConfig",
    "PGRAFTConfig",
    "PickScoreRewardConfig",
    "PromptsConfig",
    "PythonRewardConfig",
    "ReFLConfig",
    "ResidualDBConfig",
    "ResidualNablaDBConfig",
    "Reward",
    "Run",
    "RunConfig",
    "SamplerConfig",
    "StableDiffusion3Backend",
    "StableDiffusion3ModelConfig",
    "StableDiffusionBackend",
    "StableDiffusionModelConfig",
    "TrainConfig",
    "Trainer",
    "__version__",
    "build_backend",
    "build_reward",
    "export_lora",
    "load_config",
    "load_run",
]
