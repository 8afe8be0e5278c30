"""A run's parts (backend, reward, kernel, method) and what they do together: sample, reward, evaluate."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from ..backends import Backend, GaussianMixtureBackend, build_backend
from ..config import MODEL_DEPENDENT_KEYS, PIPELINE_MODELS, ConfigError, RunConfig
from ..config_loading import format_validation_error, load_config, validate_config
from ..eval.digits import digits_metrics
from ..eval.features import FeatureExtractor, build_features
from ..eval.gmm import target_metrics
from ..eval.metrics import diversity, grouped_frechet_distance
from ..mdp import GaussianKernel, make_kernel, rollout
from ..mdp.rollout import Trajectories
from ..methods import Method, build_method
from ..rewards import Reward, build_reward
from ..rewards.classifier import ClassifierReward
from ..rewards.vector import ExactFlowScore, GaussianReward, LinearReward, exact_target


@dataclass
class Run:
    config: RunConfig
    backend: Backend
    reward: Reward
    kernel: GaussianKernel
    method: Method
    #: a progress bar over sampling batches (for commands that sample many; training has its own bar)
    progress: bool = False
    #: the checkpoint whose weights were loaded (``load_run``); None: as built or trained
    checkpoint: Path | None = None
    #: features of the pretrained reference samples of ``fid_to_pretrained``, by (num, seed, split): drawn once
    #: per run, since the pretrained model does not change
    _pretrained_features: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def build(cls, config: RunConfig, backend: Backend | None = None, reward: Reward | None = None) -> "Run":
        """The run of ``config``, its parts built from it (after seeding torch with ``train.seed``) unless given."""
        from .distributed import check_device

        check_device(config.train.device)
        backend, reward = build_parts(config, backend, reward)
        return cls.from_parts(config, backend.to(config.train.device), reward.to(config.train.device))

    @classmethod
    def from_parts(cls, config: RunConfig, backend: Backend, reward: Reward) -> "Run":
        """The run of a backend and a reward (already on ``config.train.device``): the kernel and the method of
        ``config`` built around them."""
        reward.set_prompts(backend.prompts)
        try:  # inconsistent combinations found while building (step counts, reward without gradients, …)
            sampler = config.sampler
            kernel = make_kernel(sampler.kind, backend.parameterization, sampler.steps, sampler.eta, sampler.noise_level)
            method = build_method(config.method, backend, reward, kernel)
        except ValueError as error:
            raise ConfigError(f"invalid config:\n  {error}") from None
        if hasattr(method, "exact_flow_score"):
            method.exact_flow_score = _exact_flow_score(config, backend, reward)
            if getattr(config.method, "flow_oracle", False) and method.exact_flow_score is None:
                raise ConfigError(
                    "method.flow_oracle: the exact flow score is known only for model.kind=gmm with reward.kind=gaussian "
                    "or linear and method.prior_strength=1; set method.flow_oracle=false"
                )
        return cls(config, backend, reward, kernel, method)

    def exact_target(self):
        """The closed-form target of a Gaussian-mixture run (R^β·p^η from the method's ``beta`` and
        ``prior_strength``, 0 when it has none), or None. Built once per run (a grid for fractional η)."""
        return self._exact_target

    @cached_property
    def _exact_target(self):
        if not isinstance(self.backend, GaussianMixtureBackend):
            return None
        method = self.config.method
        if getattr(method, "beta", None) is None:  # reward maximisers have no target distribution
            return None
        return exact_target(self.backend.mixture, self.reward, method.beta, getattr(method, "prior_strength", 0.0))

    @torch.no_grad()
    def rollout(self, cond: torch.Tensor, generator: torch.Generator, finetuned: bool = True, record: bool = True):
        """``rollout`` in chunks of the backend's ``sample_batch_size`` (the chunking is fixed by the backend, so
        results are reproducible for a given backend); recorded trajectories carry their final log-rewards.
        ``finetuned`` samples the method's policy (``Method.sampling_policy``), else the pretrained model."""
        size = self.backend.sample_batch_size
        starts = range(0, len(cond), size)
        if self.progress and len(starts) > 1:
            starts = tqdm(starts, desc="sample", unit="batch", mininterval=1.0)
        policy = self.method.sampling_policy if finetuned else False  # e.g. P-GRAFT: finetuned above t_I only
        parts = [rollout(self.backend, self.kernel, cond[start : start + size], generator, policy, record)
                 for start in starts]
        if not record:
            return torch.cat(parts)
        trajectories = Trajectories.concatenate(parts)
        trajectories.log_reward = self.log_reward(trajectories.final, trajectories.cond)
        return trajectories

    @torch.no_grad()
    def decode(self, states: torch.Tensor) -> torch.Tensor:
        """What the reward sees for final states, in chunks of the backend's ``sample_batch_size``."""
        return torch.cat([self.backend.decode(part) for part in states.split(self.backend.sample_batch_size)])

    @torch.no_grad()
    def log_reward(self, states: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log R(decode(x)) of final states, in chunks of the backend's ``sample_batch_size``."""
        size = self.backend.sample_batch_size
        return torch.cat(
            [
                self.reward.log_reward(self.backend.decode(states[start : start + size]), cond[start : start + size])
                for start in range(0, len(states), size)
            ]
        )

    @torch.no_grad()
    def sample_with_conditions(
        self, num: int, seed: int, finetuned: bool = True, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states of ``num`` fresh trajectories and their conditioning ids, reproducible from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        cond = self.backend.sample_conditions(num, generator, split)
        return self.rollout(cond, generator, finetuned, record=False), cond.to(self.backend.device)

    def sample(self, num: int, seed: int, finetuned: bool = True, split: str = "train") -> torch.Tensor:
        return self.sample_with_conditions(num, seed, finetuned, split)[0]

    @cached_property
    def features(self) -> FeatureExtractor | None:
        """The feature extractor of the sample metrics (``eval.features``), built at first use; None: none."""
        return build_features(self.config, self.reward)

    @torch.no_grad()
    def features_of(self, states: torch.Tensor) -> torch.Tensor:
        """``features`` of the decoded final states, decoding ``sample_batch_size`` at a time."""
        parts = states.split(self.backend.sample_batch_size)
        return torch.cat([self.features(self.backend.decode(part)) for part in parts])

    def pretrained_reference(self, num: int, seed: int, split: str, cond: torch.Tensor) -> torch.Tensor:
        """Features of pretrained samples of the conditions ``cond`` (those of ``num`` samples from ``seed``) with
        independent noise (seed + 1), computed at the first call for (num, seed, split) and kept."""
        key = (num, seed, split)
        if key not in self._pretrained_features:
            generator = torch.Generator().manual_seed(seed + 1)
            states = self.rollout(cond.cpu(), generator, finetuned=False, record=False)
            self._pretrained_features[key] = self.features_of(states)
        return self._pretrained_features[key]

    @torch.no_grad()
    def evaluate(self, num: int, seed: int = 1234, finetuned: bool = True, split: str = "train") -> dict[str, float]:
        """Metrics of ``num`` samples from ``seed`` on the ``train`` or the held-out ``eval`` conditions: the mean
        log-reward; with an ``eval.features`` extractor the diversity and (``eval.prior_fid``) the FID to the
        pretrained model, each per prompt and averaged over prompts; the ground-truth distances when the target is
        known (Gaussian mixture, digits with the classifier reward)."""
        samples, cond = self.sample_with_conditions(num, seed, finetuned, split)
        log_reward = self.log_reward(samples, cond)
        metrics = {"log_reward_mean": log_reward.mean().item(), "log_reward_std": log_reward.std().item()}
        if self.features is not None:
            features = self.features_of(samples)
            metrics["diversity"] = diversity(features, cond, self.features.distance)
            if self.config.eval.prior_fid:
                reference = self.pretrained_reference(num, seed, split, cond)
                metrics["fid_to_pretrained"] = grouped_frechet_distance(features, cond, reference, cond)
        target = self.exact_target()
        if target is not None:
            generator = torch.Generator().manual_seed(seed + 1)
            metrics.update(target_metrics(samples, target, self.backend.mixture, generator))
        if isinstance(self.reward, ClassifierReward):  # ground truth: the real digits of the class
            images = self.decode(samples)
            metrics.update(digits_metrics(images, self.reward.digit, self.reward.classifier, self.features))
        return metrics


def _exact_flow_score(config: RunConfig, backend: Backend, reward: Reward) -> ExactFlowScore | None:
    """The closed-form ∇ log F̃ of a Gaussian-mixture run with a Gaussian or linear reward at η = 1, else None."""
    method = config.method
    if not isinstance(backend, GaussianMixtureBackend) or not isinstance(reward, (GaussianReward, LinearReward)):
        return None
    if getattr(method, "prior_strength", None) != 1:
        return None
    return ExactFlowScore(backend.mixture, reward, method.beta, backend.parameterization)


def build_parts(config: RunConfig, backend: Backend | None = None, reward: Reward | None = None
                ) -> tuple[Backend, Reward]:
    """The backend and the reward of ``config`` (on the CPU), after seeding torch with ``train.seed``; a part given
    is used instead. A part the config lists under ``handed_over`` must be given (one-line ConfigError)."""
    missing = [part for part, given in (("model", backend), ("reward", reward))
               if part in config.handed_over and given is None]
    if missing:
        how = {"model": "backend=…", "reward": "reward=…"}
        raise ConfigError(
            f"this run's {' and '.join(missing)} {'was' if len(missing) == 1 else 'were'} handed over in Python "
            f"(config.yaml: handed_over {missing}); load it in Python with "
            f"{', '.join(how[part] for part in missing)} (nablagfn.load_run or Trainer.from_config)"
        )
    torch.manual_seed(config.train.seed)  # network initialisation
    if backend is None:
        backend = build_backend(config.model)
    if reward is None:
        reward = build_reward(config.reward)
    return backend, reward


def compose_config(backend: Backend, reward: Reward, method, sampler=None, train=None, eval=None) -> RunConfig:
    """The ``RunConfig`` of a trainer made from parts: the backend's and the reward's own configs (or their
    descriptions, listed under ``handed_over``), and the other sections. Config objects are taken as they are;
    mappings (and a method name) get the model's presets beneath them, as in the CLI."""
    handed_over = []
    sections = {}
    for name, part in (("model", backend), ("reward", reward)):
        if part.config is not None:
            sections[name] = part.config
        else:
            sections[name] = part.describe()
            handed_over.append(name)
    given = {"method": {"name": method} if isinstance(method, str) else method,
             "sampler": sampler, "train": train, "eval": eval}
    if all(isinstance(value, BaseModel) for value in given.values()):
        try:
            return RunConfig(**sections, **given, handed_over=handed_over)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error)) from None
    tree: dict = {name: config.model_dump() for name, config in sections.items()}
    for name, value in given.items():
        if isinstance(value, BaseModel):  # as it is, but for the keys it leaves to the model
            unset = set(MODEL_DEPENDENT_KEYS.get(name, ())) - value.model_fields_set
            tree[name] = {key: item for key, item in value.model_dump().items() if key not in unset}
        elif value is not None:
            tree[name] = dict(value)
    tree["handed_over"] = handed_over
    return validate_config(tree)


def default_run_dir() -> Path:
    """``runs/<date-time>`` under the working directory."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, *, backend: Backend | None = None,
             reward: Reward | None = None, device: str | None = None) -> "Run":
    """A finished or running run, rebuilt from ``RUN_DIR/config.yaml`` with the weights of its latest checkpoint
    (or ``checkpoint``), for sampling and evaluation.

    Args:
        run_dir: the run directory.
        checkpoint: a checkpoint directory (default: the run's latest).
        backend, reward: the parts the run lists under ``handed_over`` (made in Python); others are rebuilt.
        device: where to load it (default: the run's ``train.device``), e.g. ``cpu`` for a run trained on a GPU.

    Returns:
        The ``Run``; ``run.checkpoint`` is the checkpoint loaded.
    """
    from .checkpoint import list_checkpoints
    from .trainer import load_weights

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(config_path, [f"train.device={device}"] if device else [])
    if device is None and config.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{run_dir} was trained on {config.train.device}, which this torch does not see; load it "
                          "on the CPU with --device cpu (load_run(..., device='cpu'))")
    run = Run.build(config, backend, reward)
    if checkpoint:
        path = Path(checkpoint)
    else:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise ConfigError(f"{run_dir} has no checkpoint yet (nothing under {run_dir / 'checkpoints'})")
        path = checkpoints[-1]
    load_weights(run, path)
    run.checkpoint = path
    return run


def describe_run(config: RunConfig) -> str:
    """The key settings a run goes with (after presets) and the size of its evaluations, a few lines for the start of
    ``nablagfn train``."""
    model, method, train, sampler = config.model, config.method, config.train, config.sampler
    if model.kind == "gmm":
        where = f"{len(model.means)}-mode Gaussian mixture in {model.dim}-D"
    elif model.kind in PIPELINE_MODELS:
        where = (f"{model.path} ({model.dtype} base weights, LoRA rank {model.lora_rank}, guidance "
                 f"{model.guidance_scale:g})")
    else:
        where = "the built-in 8×8 digits " + ("rectified flow" if model.parameterization == "flow" else "DDPM")
    beta = getattr(method, "beta", None)
    per_update = train.batch_size * train.accumulation
    evaluations = train.updates // train.eval_every + 1 + (train.updates % train.eval_every != 0)
    pretrained = " + as many pretrained ones for the FID, once" if config.eval.prior_fid and model.kind != "gmm" else ""
    return "\n".join([
        f"model: {where}; reward: {config.reward.kind}",
        f"method: {method.name}" + (f", β = {beta:g}" if beta is not None else "")
        + (f", η = {method.prior_strength:g}" if hasattr(method, "prior_strength") else ""),
        f"sampler: {sampler.kind}, {sampler.steps} steps; training: {train.updates} updates of {per_update} "
        f"trajectories ({train.batch_size} × {train.accumulation}), {train.trajectories_per_epoch} per epoch, on "
        f"{train.device}",
        f"evaluations: {evaluations} × {train.eval_samples} samples (every {train.eval_every} updates and at the "
        f"start and end){pretrained}",
    ])
