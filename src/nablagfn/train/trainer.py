"""The training loop of Algorithm 1, shared by every method.

Each epoch samples ``trajectories_per_epoch`` trajectories with the current
policy and trains on the previous epoch's batch (or on this one, ``on_policy``),
in shuffled minibatches of ``batch_size`` trajectories, ``accumulation``
minibatches per optimiser update. Each trajectory contributes its own draw of
subsampled transitions. All randomness comes from one seeded generator, whose
state is checkpointed, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, dump_config
from ..mdp.rollout import EpochConditions, Trajectories
from .checkpoint import CheckpointError, list_checkpoints, load_model_tensors, load_training_state, save_checkpoint, split_prefix
from .run import Run


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    MAX_NONFINITE_IN_A_ROW = 10

    def __init__(self, config: RunConfig, run_dir: str | Path, progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.progress_desc = "train"  # the progress bar's label, and its line (None: tqdm's choice)
        self.progress_position: int | None = None
        self.run = Run.build(config)
        train = config.train
        self.parameter_groups = self.run.method.parameter_groups()
        optimizer_settings = {"policy": train.policy_optimizer, "flow": train.flow_optimizer}
        self.optimizers = {
            name: torch.optim.AdamW(
                params, lr=optimizer_settings[name].lr, betas=optimizer_settings[name].betas,
                weight_decay=optimizer_settings[name].weight_decay,
            )
            for name, params in self.parameter_groups.items()
        }
        self.generator = torch.Generator().manual_seed(train.seed)
        self.update = 0
        self.epoch = 0
        self.previous: Trajectories | EpochConditions | None = None  # D_prev of Algorithm 1
        self.epoch_data: Trajectories | EpochConditions | None = None  # what this epoch trains on
        self.epoch_sampled: Trajectories | EpochConditions | None = None  # D_curr, carried to the next epoch
        self.epoch_order: torch.Tensor | None = None
        self.epoch_position = 0
        self.nonfinite_in_a_row = 0
        self.elapsed = 0.0  # training wall time in seconds, across resumes
        self._pending_sample_metrics: dict[str, float] = {}  # reward of the latest sampled epoch, for the log
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # -- state -----------------------------------------------------------------
    def lr_factor(self, update: int) -> float:
        train = self.config.train
        if train.lr_schedule == "constant":
            return 1.0
        progress = min(update / train.updates, 1.0)
        return train.lr_min_ratio + (1 - train.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _set_lr(self) -> None:
        settings = {"policy": self.config.train.policy_optimizer, "flow": self.config.train.flow_optimizer}
        factor = self.lr_factor(self.update)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = settings[name].lr * factor

    def save(self) -> Path:
        tensors = {"rng": self.generator.get_state()}
        # this epoch's training data is ``previous`` (off-policy) or ``epoch_sampled`` (on-policy): not saved twice
        for prefix, data in (("previous.", self.previous), ("epoch_sampled.", self.epoch_sampled)):
            if data is not None:
                tensors.update(data.to_dict(prefix))
        if self.epoch_order is not None:
            tensors["epoch_order"] = self.epoch_order
        state = {
            "update": self.update, "epoch": self.epoch, "epoch_position": self.epoch_position,
            "nonfinite_in_a_row": self.nonfinite_in_a_row, "sample_metrics": self._pending_sample_metrics,
            "elapsed": self.elapsed,
        }
        return save_checkpoint(
            self.run_dir, self.update,
            {"policy": self.run.backend.adapter_state_dict(), "method": self.run.method.networks},
            self.optimizers, tensors, state, self.config.train.keep_checkpoints,
        )

    def load(self, checkpoint: Path) -> None:
        load_weights(self.run, checkpoint)
        state, tensors = load_training_state(checkpoint, self.optimizers)
        self.generator.set_state(tensors["rng"])
        self.update, self.epoch = state["update"], state["epoch"]
        self.epoch_position, self.nonfinite_in_a_row = state["epoch_position"], state["nonfinite_in_a_row"]

        def restore(prefix: str) -> Trajectories | EpochConditions | None:
            if prefix + "states" in tensors:
                return Trajectories.from_dict(tensors, prefix)
            return EpochConditions.from_dict(tensors, prefix) if prefix + "cond" in tensors else None

        self.previous = restore("previous.")
        self.epoch_sampled = restore("epoch_sampled.")
        if self.epoch_sampled is not None:
            self.epoch_data = self.epoch_sampled if self.config.train.on_policy else self.previous
        self.epoch_order = tensors.get("epoch_order")
        self._pending_sample_metrics, self.elapsed = state["sample_metrics"], state["elapsed"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop records logged after the checkpoint, so a resumed run has no duplicated steps."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["update"] <= self.update]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------
    def _sample_epoch(self) -> Trajectories | EpochConditions:
        run = self.run
        cond = run.backend.sample_conditions(self.config.train.trajectories_per_epoch, self.generator)
        if run.method.draws_own_chains:
            return EpochConditions(cond)
        return run.rollout(cond, self.generator)

    def _start_epoch(self) -> None:
        if self.previous is None and not self.config.train.on_policy:
            self.previous = self._sample_epoch()  # Algorithm 1, line 3
        self.epoch_sampled = self._sample_epoch()
        self.epoch_data = self.epoch_sampled if self.config.train.on_policy else self.previous
        self.epoch_order = torch.randperm(len(self.epoch_data), generator=self.generator)
        self.epoch_position = 0
        self._pending_sample_metrics = {}
        if self.epoch_sampled.log_reward is not None:
            self._pending_sample_metrics["sample/log_reward_mean"] = self.epoch_sampled.log_reward.mean().item()

    def _end_epoch(self) -> None:
        self.previous = self.epoch_sampled
        self.epoch_data = self.epoch_sampled = self.epoch_order = None
        self.epoch += 1

    def _one_update(self) -> dict[str, float]:
        train, method = self.config.train, self.run.method
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_value = 0.0
        for _ in range(train.accumulation):
            index = self.epoch_order[self.epoch_position : self.epoch_position + train.batch_size]
            self.epoch_position += train.batch_size
            method.set_progress(self.update, train.updates)
            loss, metrics = method.trajectory_loss(self.epoch_data.select(index), self.generator)
            (loss / train.accumulation).backward()
            loss_value += loss.item() / train.accumulation
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / train.accumulation
        gradients_finite = all(
            p.grad is None or torch.isfinite(p.grad).all() for params in self.parameter_groups.values() for p in params
        )
        if not (math.isfinite(loss_value) and gradients_finite):
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or gradient; stopping. "
                    f"The last good checkpoint is in {self.run_dir / 'checkpoints'}"
                )
            return {"loss": loss_value, "skipped_nonfinite": 1.0}
        self.nonfinite_in_a_row = 0
        settings = {"policy": train.policy_optimizer, "flow": train.flow_optimizer}
        for name, params in self.parameter_groups.items():
            if settings[name].grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, settings[name].grad_clip)
                totals[f"grad_norm/{name}"] = norm.item()
        self._set_lr()
        for optimizer in self.optimizers.values():
            optimizer.step()
        return {"loss": loss_value, **totals}

    def train(self, resume: bool = False) -> dict[str, float]:
        """Run to ``train.updates`` optimiser updates; returns the final evaluation metrics."""
        train = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpoints = list_checkpoints(self.run_dir)
            if not checkpoints:
                raise FileNotFoundError(f"no checkpoint to resume from in {self.run_dir / 'checkpoints'}")
            self.load(checkpoints[-1])
        else:
            (self.run_dir / "config.yaml").write_text(dump_config(self.config))
            self.metrics_path.write_text("")
            self._log({"update": 0, **{f"eval/{k}": v for k, v in self.run.evaluate(train.eval_samples).items()}})
        bar = tqdm(total=train.updates, initial=self.update, desc=self.progress_desc, disable=not self.progress,
                   unit="upd", mininterval=1.0, position=self.progress_position)
        started = time.perf_counter() - self.elapsed  # wall time accumulates across resumes
        evaluation: dict[str, float] | None = None
        while self.update < train.updates:
            if self.epoch_data is None:
                self._start_epoch()
            metrics = self._one_update()
            self.update += 1
            if self.epoch_position >= len(self.epoch_data):
                self._end_epoch()
            bar.update(1)
            self.elapsed = time.perf_counter() - started
            if self.update % train.log_every == 0 or self.update == train.updates:
                record = {"update": self.update, "epoch": self.epoch, "time": self.elapsed,
                          "lr/policy": self.optimizers["policy"].param_groups[0]["lr"], **metrics,
                          **self._pending_sample_metrics}
                self._log(record)
                bar.set_postfix(loss=f"{metrics['loss']:.3g}")
            if self.update % train.eval_every == 0 or self.update == train.updates:
                evaluation = self.run.evaluate(train.eval_samples)
                self._log({"update": self.update, **{f"eval/{k}": v for k, v in evaluation.items()}})
                if "mode_tv" in evaluation:
                    bar.set_postfix(loss=f"{metrics['loss']:.3g}", tv=f"{evaluation['mode_tv']:.3f}")
            if self.update % train.checkpoint_every == 0 or self.update == train.updates:
                self.save()
        bar.close()
        return evaluation if evaluation is not None else self.run.evaluate(train.eval_samples)


def load_weights(run: Run, checkpoint: Path) -> None:
    """Load the policy adapter and the method's networks from a checkpoint into ``run``."""
    tensors = load_model_tensors(checkpoint)
    missing, unexpected = run.backend.load_state_dict(split_prefix(tensors, "policy"), strict=False)
    adapter_names = set(run.backend.adapter_state_dict())
    if unexpected or adapter_names & set(missing):
        raise CheckpointError(
            f"checkpoint {checkpoint} does not match this model "
            f"(missing {sorted(adapter_names & set(missing))}, unexpected {unexpected})"
        )
    run.method.networks.load_state_dict(split_prefix(tensors, "method"))
