"""The training loop of Algorithm 1, shared by every method.

Each epoch samples ``trajectories_per_epoch`` trajectories with the current
policy and trains on the previous epoch's batch (or on this one, ``on_policy``),
in shuffled minibatches of ``batch_size`` trajectories, ``accumulation``
minibatches per optimiser update. Each trajectory contributes its own draw of
subsampled transitions.

Each epoch is made of ``train.data_shards`` shards, shard k sampled from its own
seeded generator, and each minibatch takes the same number of trajectories from
every shard. The shards are spread over the training processes (one, or several
under ``accelerate launch``), whose gradients are averaged, so a run gives the
same result on any number of processes that divides the shards. Every generator
state is checkpointed, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backends import Backend
from ..config import ConfigError, EvalConfig, RunConfig, SamplerConfig, TrainConfig
from ..config_base import StrictConfig
from ..config_loading import dump_config, flatten, load_config
from ..errors import NonFiniteLossError
from ..files import atomic_write_text, strict_json
from ..mdp.rollout import EpochConditions, Trajectories
from ..rewards import Reward
from .checkpoint import (
    CheckpointError,
    finish_checkpoint,
    list_checkpoints,
    load_model_tensors,
    load_shard,
    load_training_state,
    split_prefix,
    staging_directory,
    start_checkpoint,
    verify_checkpoint,
    write_shard,
)
from .distributed import Processes
from .outputs import write_run_outputs
from .run import Run, build_parts, compose_config, default_run_dir
from .rundir import RunLock, prepare_fresh_run
from .trackers import Trackers

EpochData = Trajectories | EpochConditions


@dataclass
class Shard:
    """One shard of every epoch, with its own generator (``train.seed + index·2³²``; shard 0: ``train.seed``),
    which draws its conditions, rollouts, minibatch order and the losses' random choices."""

    index: int
    generator: torch.Generator
    previous: EpochData | None = None  # D_prev of Algorithm 1
    sampled: EpochData | None = None  # D_curr, carried to the next epoch
    data: EpochData | None = None  # what this epoch trains on
    order: torch.Tensor | None = None

    @classmethod
    def new(cls, index: int, seed: int) -> "Shard":
        return cls(index, torch.Generator().manual_seed(seed + index * 2**32))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"rng": self.generator.get_state()}
        # this epoch's training data is ``previous`` (off-policy) or ``sampled`` (on-policy): not saved twice
        for prefix, data in (("previous.", self.previous), ("epoch_sampled.", self.sampled)):
            if data is not None:
                tensors.update(data.to_dict(prefix))
        if self.order is not None:
            tensors["epoch_order"] = self.order
        return tensors

    def restore(self, tensors: dict[str, torch.Tensor], on_policy: bool, device: str) -> None:
        def restored(prefix: str) -> EpochData | None:
            if prefix + "states" in tensors:
                data = Trajectories.from_dict(tensors, prefix)
            elif prefix + "cond" in tensors:
                data = EpochConditions.from_dict(tensors, prefix)
            else:
                return None
            return data.to(device)

        self.generator.set_state(tensors["rng"])
        self.previous, self.sampled = restored("previous."), restored("epoch_sampled.")
        self.data = None if self.sampled is None else (self.sampled if on_policy else self.previous)
        self.order = tensors.get("epoch_order")


class Trainer:
    """Algorithm 1 on a backend, a reward and a method; writes a run directory (config.yaml, metrics.jsonl,
    checkpoints/, eval.json, figures) that ``nablagfn sample/eval/export`` and ``--resume`` read.

    Args:
        backend: the model being finetuned (``GaussianMixtureBackend``, ``DigitsBackend``,
            ``StableDiffusionBackend.from_pipeline(pipe)``, or your own ``Backend``).
        reward: log R (a built-in ``Reward`` or ``CallableReward(fn)``).
        method: the method's config object (e.g. ``ResidualNablaDBConfig(beta=1.0)``), or a mapping of its keys
            (``{"name": "ddpo"}``), which gets the model's presets beneath it as in the CLI.
        sampler, train, eval: ``SamplerConfig``, ``TrainConfig``, ``EvalConfig`` objects (used as they are), or
            mappings of keys (the model's presets beneath them, as in the CLI); None: the model's defaults.
        run_dir: where the run is written (None: ``runs/<date-time>``).
        progress: show progress bars.

    Parts built in Python without a config (a pipeline in memory, a reward defined in a script) are recorded in
    ``config.yaml`` as far as they can be, and listed under ``handed_over``: loading the run again needs them
    passed in (``load_run(run_dir, backend=…, reward=…)``). Networks the method creates (the flow network g_φ)
    are initialised from torch's global generator: seed it first for a reproducible run (``from_config`` does).
    """

    def __init__(
        self,
        backend: Backend,
        reward: Reward,
        method: StrictConfig | dict[str, Any] | str = "residual_nabla_db",
        *,
        sampler: SamplerConfig | dict[str, Any] | None = None,
        train: TrainConfig | dict[str, Any] | None = None,
        eval: EvalConfig | dict[str, Any] | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
    ):
        config = compose_config(backend, reward, method, sampler, train, eval)
        self.processes = Processes(config.train.device)
        train = config.train
        shards = train.data_shards or self.processes.world_size
        if shards % self.processes.world_size or train.batch_size % shards:
            raise ConfigError(
                f"train.data_shards ({shards}) must be a multiple of the number of processes "
                f"({self.processes.world_size}) and divide train.batch_size ({train.batch_size})"
            )
        self.config = config.model_copy(update={"train": train.model_copy(update={"data_shards": shards})})
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.progress = progress and self.processes.is_main
        self.progress_desc = "train"  # the progress bar's label, and its line (None: tqdm's choice)
        self.progress_position: int | None = None
        run_config = self.config.model_copy(deep=True)
        run_config.train.device = self.processes.device
        self.run = Run.from_parts(run_config, backend.to(self.processes.device), reward.to(self.processes.device))
        self.parameter_groups = self.run.method.parameter_groups()
        optimizer_settings = {"policy": train.policy_optimizer, "flow": train.flow_optimizer}
        self.optimizers = {
            name: torch.optim.AdamW(
                params, lr=optimizer_settings[name].lr, betas=optimizer_settings[name].betas,
                weight_decay=optimizer_settings[name].weight_decay,
            )
            for name, params in self.parameter_groups.items()
        }
        self.lr_schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: self.lr_factor(update))
            for name, optimizer in self.optimizers.items()
        }
        self.last_lr = self.optimizers["policy"].param_groups[0]["lr"]  # the latest update's policy learning rate
        per_process = shards // self.processes.world_size
        first = self.processes.rank * per_process
        self.shards = [Shard.new(index, train.seed) for index in range(first, first + per_process)]
        #: optimiser updates done so far
        self.step = 0
        self.epoch = 0
        self.epoch_position = 0  # trajectories of each shard's epoch order used so far
        self.nonfinite_in_a_row = 0
        self.elapsed = 0.0  # training wall time in seconds, across resumes
        #: seconds spent in ``update()`` (sampling and gradient steps; no evaluations or checkpoints), across resumes
        self.update_time = 0.0
        self._pending_sample_metrics: dict[str, float] = {}  # reward of the latest sampled epoch, for the log
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.trackers = Trackers(self.config, self.run_dir) if self.processes.is_main else None
        #: resume from a checkpoint written under other values of keys that make the run's history
        self.accept_config_changes = False
        #: files the last ``train()`` wrote besides the checkpoints and the log (eval.json, figures), by name
        self.outputs: dict[str, Path] = {}

    @classmethod
    def from_config(
        cls,
        config: RunConfig | str | Path | None = None,
        run_dir: str | Path | None = None,
        overrides: Sequence[str] = (),
        *,
        backend: Backend | None = None,
        reward: Reward | None = None,
        progress: bool = True,
    ) -> "Trainer":
        """The trainer the CLI builds: parts made from a config (seeded with ``train.seed`` first).

        Args:
            config: a ``RunConfig``, a YAML file, a run directory (its ``config.yaml``), or None (the defaults).
            run_dir: where the run is written (None: a run directory given as ``config``, else ``runs/<date-time>``).
            overrides: dotted ``key=value`` overrides (with a YAML file or the defaults).
            backend, reward: parts to use instead of building them from the config (those a run lists under
                ``handed_over`` must be given).
        """
        if isinstance(config, (str, Path)) and Path(config).is_dir():
            run_dir = Path(config) if run_dir is None else run_dir
            config = Path(config) / "config.yaml"
            if not config.is_file():
                raise ConfigError(f"{config.parent} is not a run directory (no config.yaml)")
        if not isinstance(config, RunConfig):
            config = load_config(config, list(overrides))
        elif overrides:
            raise ConfigError("overrides go with a YAML file or the defaults, not with a RunConfig object")
        backend, reward = build_parts(config, backend, reward)
        return cls(backend, reward, config.method, sampler=config.sampler, train=config.train, eval=config.eval,
                   run_dir=run_dir, progress=progress)

    @property
    def shard_batch_size(self) -> int:
        """Trajectories each shard contributes to one gradient computation."""
        return self.config.train.batch_size // self.config.train.data_shards

    @property
    def in_epoch(self) -> bool:
        return self.shards[0].data is not None

    # -- state -----------------------------------------------------------------
    def lr_factor(self, update: int) -> float:
        """The learning rates' factor at ``update`` (``train.lr_schedule``: constant, or cosine down to
        ``lr_min_ratio`` at ``train.updates``); torch's ``LambdaLR`` applies it to each optimiser."""
        train = self.config.train
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(update / train.updates, 1.0)
        return train.lr_min_ratio + (1 - train.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _sync_lr_schedules(self) -> None:
        """Put each schedule at ``self.step`` under the current ``train`` settings (after a resume, which may have
        extended ``train.updates``): the learning rates the next update uses."""
        for scheduler in self.lr_schedulers.values():
            scheduler.last_epoch = self.step
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base_lr * self.lr_factor(self.step)

    def _together(self, action: Callable[[], object], cleanup: Callable[[], None]) -> None:
        """Run ``action`` here and agree with every process on the outcome: a failure anywhere runs ``cleanup`` and
        raises everywhere (so no process waits forever for one that failed)."""
        error: BaseException | None = None
        try:
            action()
        except Exception as exc:  # re-raised below, after every process has learned of it
            error = exc
        if not self.processes.all_true(error is None):
            cleanup()
            if error is not None:
                raise error
            raise CheckpointError("another training process failed while writing a checkpoint; see its error")

    def save(self, directory: str | Path | None = None) -> Path:
        """Write a checkpoint into ``RUN_DIR/checkpoints`` (and, given ``directory``, a copy there, which ``load``
        takes as it is); returns the checkpoint written (the copy, given ``directory``). Every process takes part in
        each step: the main one creates the staging directory, each writes its shards, the main one writes the rest
        and renames it into place."""
        staging = staging_directory(self.run_dir, self.step)
        main = self.processes.is_main
        state = {
            "update": self.step, "epoch": self.epoch, "epoch_position": self.epoch_position,
            "nonfinite_in_a_row": self.nonfinite_in_a_row, "sample_metrics": self._pending_sample_metrics,
            "elapsed": self.elapsed, "update_time": self.update_time,
            "lr_schedulers": {name: scheduler.state_dict() for name, scheduler in self.lr_schedulers.items()},
            "written_by": {"method": self.config.method.name, "model": self.config.model.kind,
                           "config": history_config(self.config)},
        }
        modules = {"policy": self.run.backend.adapter_state_dict(), "method": self.run.method.networks}
        keep = self.config.train.keep_checkpoints

        def remove_staging() -> None:  # the previous checkpoints stay as they were
            if main:
                shutil.rmtree(staging, ignore_errors=True)

        for step in (
            lambda: start_checkpoint(self.run_dir, self.step) if main else None,
            lambda: [write_shard(staging, shard.index, shard.state_tensors()) for shard in self.shards],
            lambda: finish_checkpoint(staging, self.step, modules, self.optimizers, state, keep) if main else None,
        ):
            self._together(step, remove_staging)
        written = self.run_dir / "checkpoints" / staging.name.removeprefix(".tmp_")
        if directory is None:
            return written
        if self.processes.is_main:
            shutil.copytree(written, directory, dirs_exist_ok=True)
        self.processes.barrier()
        return Path(directory)

    def load(self, path: str | Path) -> Path:
        """Restore the weights, optimisers, generators and epoch data of a checkpoint (a checkpoint directory, or a
        run directory: its latest), so training continues exactly as if it had not stopped. Returns the checkpoint."""
        checkpoint = Path(path)
        if (checkpoint / "checkpoints").is_dir() or (checkpoint / "config.yaml").is_file():
            checkpoints = list_checkpoints(checkpoint)
            if not checkpoints:
                raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint / 'checkpoints'}")
            checkpoint = checkpoints[-1]
        self._check_written_by(checkpoint, verify_checkpoint(checkpoint))
        load_weights(self.run, checkpoint, verify=False)
        state = load_training_state(checkpoint, self.optimizers)
        try:
            self.step, self.epoch = state["update"], state["epoch"]
            self.epoch_position, self.nonfinite_in_a_row = state["epoch_position"], state["nonfinite_in_a_row"]
            self._pending_sample_metrics, self.elapsed = state["sample_metrics"], state["elapsed"]
            self.update_time = state.get("update_time", self.elapsed)  # older checkpoints: the wall time
            for name, scheduler_state in state.get("lr_schedulers", {}).items():  # older checkpoints: none
                self.lr_schedulers[name].load_state_dict(scheduler_state)
        except KeyError as missing:
            raise CheckpointError(f"checkpoint {checkpoint}: state.json lacks {missing}") from None
        for shard in self.shards:
            shard.restore(load_shard(checkpoint, shard.index), self.config.train.on_policy, self.run.backend.device)
        self._sync_lr_schedules()
        if self.processes.is_main:
            self._truncate_metrics()
        return checkpoint

    def _check_written_by(self, checkpoint: Path, state: dict) -> None:
        """Refuse a checkpoint written by another method or model, or under a config whose history-making keys differ
        from this run's (unless ``accept_config_changes``): resuming it would silently rewrite the run's history."""
        written_by = state.get("written_by")
        if not isinstance(written_by, dict):  # checkpoints from before this record: nothing to compare
            return
        for key, ours in (("method", self.config.method.name), ("model", self.config.model.kind)):
            if written_by.get(key) != ours:
                raise CheckpointError(f"checkpoint {checkpoint} was written by {key} {written_by.get(key)!r}, this run "
                                      f"is {ours!r}; it belongs to another run")
        theirs, ours = written_by.get("config", {}), history_config(self.config)
        changed = sorted(key for key in theirs.keys() | ours.keys() if theirs.get(key) != ours.get(key))
        if changed and not self.accept_config_changes:
            shown = ", ".join(f"{key} ({theirs.get(key)!r} → {ours.get(key)!r})" for key in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise CheckpointError(f"the config differs from the one checkpoint {checkpoint} was written with: {shown}"
                                  f"{more}; resume with --accept-config-changes to go on with the new values")

    def _truncate_metrics(self) -> None:
        """Drop records logged after the checkpoint, so a resumed run has no duplicated steps."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if _update_of(line) <= self.step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))  # a kill leaves old or new

    def _log(self, record: dict) -> None:
        """Append a record to metrics.jsonl and the trackers (main process)."""
        if not self.processes.is_main:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(strict_json(record) + "\n")
        self.trackers.log(record)

    def evaluate(self, num: int | None = None, seed: int = 1234, split: str = "train",
                 finetuned: bool = True) -> dict[str, float] | None:
        """The run's metrics on ``num`` samples (default ``train.eval_samples``) from ``seed``: mean log-reward, and
        the diversity, FID to the pretrained model and ground-truth distances where the run has them. Computed on
        the main process (the others wait and get None)."""
        num = self.config.train.eval_samples if num is None else num
        evaluation = self.run.evaluate(num, seed, finetuned, split) if self.processes.is_main else None
        self.processes.barrier()
        return evaluation

    def sample(self, num: int, seed: int = 0, split: str = "train", finetuned: bool = True) -> torch.Tensor:
        """What the reward sees (images in [0, 1], or states) of ``num`` samples from ``seed`` on the ``train`` or
        held-out ``eval`` conditions: the finetuned model, or the pretrained one."""
        return self.run.decode(self.run.sample(num, seed, finetuned, split))

    # -- the loop ----------------------------------------------------------------
    def _sample_shard(self, shard: Shard) -> EpochData:
        run = self.run
        size = self.config.train.trajectories_per_epoch // self.config.train.data_shards
        cond = run.method.epoch_conditions(size, shard.generator)
        if run.method.draws_own_chains:
            return EpochConditions(cond)
        return run.method.prepare_epoch(run.rollout(cond, shard.generator))

    def sample_epoch(self) -> None:
        """Sample this epoch's trajectories, ``train.trajectories_per_epoch`` over the shards, with the current policy
        (Algorithm 1, line 5; the first off-policy epoch also samples D_prev, line 3), and shuffle what it trains on."""
        on_policy = self.config.train.on_policy
        rewards = []
        for shard in self.shards:
            if shard.previous is None and not on_policy:
                shard.previous = self._sample_shard(shard)  # Algorithm 1, line 3
            shard.sampled = self._sample_shard(shard)
            shard.data = shard.sampled if on_policy else shard.previous
            shard.order = torch.randperm(len(shard.data), generator=shard.generator)
            if shard.sampled.log_reward is not None:
                rewards.append(shard.sampled.log_reward.mean().item())
        self.epoch_position = 0
        self._pending_sample_metrics = {}
        if rewards:  # every shard has as many trajectories: the mean of shard means is the epoch's mean
            local = {"sample/log_reward_mean": sum(rewards) / len(rewards)}
            self._pending_sample_metrics = self.processes.mean(local)

    def _end_epoch(self) -> None:
        for shard in self.shards:
            shard.previous = shard.sampled
            shard.data = shard.sampled = shard.order = None
        self.epoch += 1

    def update(self) -> dict[str, float]:
        """One optimiser update on the current epoch (sampling one first when none is under way); the epoch ends
        when its trajectories are used up. Returns the update's metrics (loss, the method's own, gradient norms)."""
        if not self.in_epoch:
            self.sample_epoch()
        self.last_lr = self.optimizers["policy"].param_groups[0]["lr"]  # this update's
        metrics = self._optimizer_step()
        self.step += 1
        with warnings.catch_warnings():  # a skipped (non-finite) update steps the schedule without the optimiser
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for scheduler in self.lr_schedulers.values():
                scheduler.step()
        if self.epoch_position >= len(self.shards[0].data):
            self._end_epoch()
        return metrics

    def _optimizer_step(self) -> dict[str, float]:
        """One optimiser step on ``accumulation`` minibatches; each takes ``shard_batch_size`` trajectories from
        every shard, and the gradient is the mean over shards and minibatches (over processes: an all-reduce)."""
        train, method = self.config.train, self.run.method
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_value = 0.0
        parts = train.accumulation * len(self.shards)
        method.set_progress(self.step, train.updates)
        for _ in range(train.accumulation):
            window = slice(self.epoch_position, self.epoch_position + self.shard_batch_size)
            self.epoch_position += self.shard_batch_size
            for shard in self.shards:
                for loss, metrics in method.loss_pieces(shard.data.select(shard.order[window]), shard.generator):
                    (loss / parts).backward()
                    loss_value += loss.item() / parts
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + value / parts
        self.processes.mean_gradients(p for params in self.parameter_groups.values() for p in params)
        totals = self.processes.mean({"loss": loss_value, **totals})
        loss_value = totals.pop("loss")
        gradients_finite = all(
            p.grad is None or torch.isfinite(p.grad).all() for params in self.parameter_groups.values() for p in params
        )
        if not (math.isfinite(loss_value) and gradients_finite):  # the same verdict on every process
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= train.max_nonfinite_updates:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient (a NaN or inf in "
                    f"the rewards, the loss or the gradients; each was skipped); stopping at update {self.step}: "
                    f"{self._what_now()}"
                )
            return {"loss": loss_value, "skipped_nonfinite": 1.0}
        self.nonfinite_in_a_row = 0
        settings = {"policy": train.policy_optimizer, "flow": train.flow_optimizer}
        for name, params in self.parameter_groups.items():
            if settings[name].grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, settings[name].grad_clip)
                totals[f"grad_norm/{name}"] = norm.item()
        before = ({name: [p.detach().clone() for p in params] for name, params in self.parameter_groups.items()}
                  if train.max_relative_step is not None else {})  # no copies when the step size is not checked
        for optimizer in self.optimizers.values():
            optimizer.step()
        problem = self._step_problem(before)
        if not self.processes.all_true(problem is None):  # finite loss and gradients, yet the step blew the weights up
            raise NonFiniteLossError(f"update {self.step + 1}: {problem or 'another process saw a blown-up step'} "
                                     f"(the learning rate or the gradients are far too large); stopping: "
                                     f"{self._what_now()}")
        return {"loss": loss_value, **totals}

    def _step_problem(self, before: dict[str, list[torch.Tensor]]) -> str | None:
        """What is wrong with the step just taken from the parameters ``before`` it: non-finite weights, or a group
        moved by more than ``train.max_relative_step`` times its norm; None when nothing is."""
        limit = self.config.train.max_relative_step
        for name, params in self.parameter_groups.items():
            if not all(bool(torch.isfinite(p).all()) for p in params):
                return f"the {name} weights became non-finite"
            if limit is None:
                continue
            step = math.sqrt(sum(float((p.detach() - old).double().square().sum()) for p, old in zip(params, before[name])))
            norm = math.sqrt(sum(float(old.double().square().sum()) for old in before[name]))
            if norm > 0 and step > limit * norm:
                return (f"the step moved the {name} weights by {step / norm:.3g} times their norm (more than "
                        f"train.max_relative_step={limit:g})")
        return None

    def _what_now(self) -> str:
        """The end of a non-finite stop message: the last checkpoint (never written during a streak of skipped
        updates, so its weights are good) and what to do."""
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints:
            return (f"the last good checkpoint is {checkpoints[-1]}; lower the learning rate or check the reward, "
                    f"then resume with `nablagfn train --resume {self.run_dir}`")
        return "no checkpoint was written yet; lower the learning rate or check the reward and start again"

    def train(self, resume: bool = False, write_outputs: bool = True) -> dict[str, float] | None:
        """Run to ``train.updates`` optimiser updates, evaluating, logging and checkpointing on the way.

        Args:
            resume: continue from the run directory's latest checkpoint instead of starting.
            write_outputs: at the end write ``eval.json``, ``samples.png`` and ``curves.png`` (their paths in
                ``self.outputs``), as ``nablagfn train`` does.

        Returns:
            The final evaluation's metrics (None on every process but the main one).
        """
        if not self.processes.is_main:
            return self._train(resume, write_outputs)
        if not resume:
            prepare_fresh_run(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir):
            return self._train(resume, write_outputs)

    def _train(self, resume: bool, write_outputs: bool) -> dict[str, float] | None:
        train = self.config.train
        main = self.processes.is_main
        if resume:
            checkpoints = list_checkpoints(self.run_dir)
            if not checkpoints:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.run_dir / 'checkpoints'}")
            self.load(checkpoints[-1])
            if main:  # what may have changed (train.updates, how often to log …) is kept for the next resume
                atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
        elif main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            atomic_write_text(self.metrics_path, "")
        self.processes.barrier()
        if main:
            self.trackers.start(resume, self.step)
        if not resume:
            evaluation = self._evaluate_logged("initial evaluation")
        bar = tqdm(total=train.updates, initial=self.step, desc=self.progress_desc, disable=not self.progress,
                   unit="upd", mininterval=1.0, position=self.progress_position)
        started = time.perf_counter() - self.elapsed  # wall time accumulates across resumes
        evaluation, evaluated = None, False
        while self.step < train.updates:
            update_started = time.perf_counter()
            metrics = self.update()
            self.update_time += time.perf_counter() - update_started
            bar.update(1)
            self.elapsed = time.perf_counter() - started
            if self.step % train.log_every == 0 or self.step == train.updates:
                record = {"update": self.step, "epoch": self.epoch, "time": self.elapsed,
                          "update_time": self.update_time,
                          "lr/policy": self.last_lr, **metrics,
                          **self._pending_sample_metrics}
                self._log(record)
                bar.set_postfix(self._postfix(metrics))
            if self.step % train.eval_every == 0 or self.step == train.updates:
                evaluation, evaluated = self._evaluate_logged(None), True
                if main:
                    self.trackers.log_samples(self.run, self.step)
                    bar.set_postfix(self._postfix(metrics, evaluation))
            if self.step % train.checkpoint_every == 0 or self.step == train.updates:
                if not self.nonfinite_in_a_row:  # during a streak of skipped updates the last checkpoint stays
                    self.save()
        bar.close()
        if not evaluated:  # resumed a finished run
            evaluation = self._evaluate_logged("final evaluation", log=False)
        if main:
            self.trackers.finish()
            if write_outputs:
                self.outputs = write_run_outputs(self.run, self.run_dir, evaluation, self.progress)
        return evaluation

    def _postfix(self, metrics: dict[str, float], evaluation: dict[str, float] | None = None) -> dict[str, str]:
        """The training bar's figures: the loss, the latest epoch's mean log-reward, and the mode TV where known."""
        postfix = {"loss": f"{metrics['loss']:.3g}"}
        if "sample/log_reward_mean" in self._pending_sample_metrics:
            postfix["log_r"] = f"{self._pending_sample_metrics['sample/log_reward_mean']:.3g}"
        if evaluation and "mode_tv" in evaluation:
            postfix["tv"] = f"{evaluation['mode_tv']:.3f}"
        return postfix

    def _evaluate_logged(self, label: str | None, log: bool = True) -> dict[str, float] | None:
        """``evaluate()`` at this update, logged to metrics.jsonl; ``label``: say so on the terminal (a long phase
        outside the training bar)."""
        if label and self.progress:
            print(f"{label}: {self.config.train.eval_samples} samples …", flush=True)
        evaluation = self.evaluate()
        if log and self.processes.is_main:
            self._log({"update": self.step, **{f"eval/{k}": v for k, v in evaluation.items()}})
        return evaluation


#: keys a resumed run may change without rewriting what it trained so far (``nablagfn train --resume RUN key=value``)
CHANGEABLE_ON_RESUME = ("train.updates", "train.log_every", "train.eval_every", "train.eval_samples",
                        "train.checkpoint_every", "train.keep_checkpoints", "train.trackers", "train.device")


def history_config(config: RunConfig) -> dict[str, Any]:
    """The config's flat keys that make a run's history (all but ``CHANGEABLE_ON_RESUME``), as JSON values."""
    flat = flatten(json.loads(config.model_dump_json()))
    return {key: value for key, value in flat.items() if key not in CHANGEABLE_ON_RESUME}


def _update_of(line: str) -> float:
    """The update of a metrics.jsonl record; infinite for a blank line or one cut short by a crash (dropped)."""
    try:
        return json.loads(line)["update"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def load_weights(run: Run, checkpoint: Path, verify: bool = True) -> None:
    """Load the policy adapter and the method's networks from a checkpoint into ``run`` (``verify``: check the
    checkpoint's checksums first)."""
    tensors = load_model_tensors(checkpoint, verify)
    try:
        missing, unexpected = run.backend.load_state_dict(split_prefix(tensors, "policy"), strict=False)
        adapter_names = set(run.backend.adapter_state_dict())
        if unexpected or adapter_names & set(missing):
            raise CheckpointError(f"missing {sorted(adapter_names & set(missing))}, unexpected {unexpected}")
        run.method.networks.load_state_dict(split_prefix(tensors, "method"))
    except (RuntimeError, CheckpointError) as error:  # torch reports shape and key mismatches as RuntimeError
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        more = f"; and {len(details) - 1} more" if len(details) > 1 else ""
        raise CheckpointError(f"checkpoint {checkpoint} does not match this model ({details[0]}{more})") from None
