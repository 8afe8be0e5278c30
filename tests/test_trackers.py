"""Experiment trackers through accelerate: TensorBoard event files and an offline W&B run, next to metrics.jsonl."""

from __future__ import annotations

import importlib.util

import pytest

from nablagfn.config import ConfigError
from nablagfn.config_loading import load_config
from nablagfn.train.trainer import Trainer

DIGITS = ["model.kind=digits", "sampler.steps=5", "train.trajectories_per_epoch=8", "train.batch_size=4",
          "train.updates=2", "train.eval_every=2", "train.eval_samples=16", "train.log_every=1",
          "eval.prior_fid=false"]


def test_tensorboard_gets_the_metrics_and_a_sample_grid_and_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, [*DIGITS, "train.trackers=[tensorboard]", "train.checkpoint_every=1"])
    Trainer.from_config(config, tmp_path, progress=False).train()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"loss", "eval/log_reward_mean", "eval/class_accuracy", "sample/log_reward_mean"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/log_reward_mean")] == [0, 2]
    assert [e.step for e in events.Images("samples")] == [2]
    captions = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    captions.Reload()
    text = captions.Tensors("samples/captions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.count("log R") == 16  # one caption per sample of the grid

    # resume from update 1: the events logged after it are dropped and logged again, once
    (tmp_path / "checkpoints" / "update_0000002").rename(tmp_path / "checkpoints" / ".gone")
    Trainer.from_config(config, tmp_path, progress=False).train(resume=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = load_config(None, [*DIGITS, "train.trackers=[wandb]", "train.project=test"])
    Trainer.from_config(config, tmp_path, progress=False).train()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert list(runs[0].glob(f"run-{run_id}.wandb"))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4  # the local log is always written


def test_missing_tracker_package_is_named(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="train.trackers.*wandb.*pip install wandb"):
        Trainer.from_config(load_config(None, [*DIGITS, "train.trackers=[wandb]"]), tmp_path, progress=False)


def test_unknown_tracker_is_refused():
    with pytest.raises(ConfigError, match="train.trackers"):
        load_config(None, [*DIGITS, "train.trackers=[mlflow]"])
