"""Resuming from a checkpoint reproduces an uninterrupted run bitwise (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TWO_UPDATES_PER_EPOCH, Interrupted, interrupt_after

from nablagfn.config_loading import load_config
from nablagfn.train.checkpoint import list_checkpoints
from nablagfn.train.trainer import Trainer

BASE = [*TWO_UPDATES_PER_EPOCH, "train.updates=6", "train.eval_every=100"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def training_records(run_dir):
    return [r for r in records(run_dir) if "loss" in r]


def assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.run.backend.adapter_state_dict(), b.run.backend.adapter_state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 0
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"policy {name} differs"
    na, nb = a.run.method.networks.state_dict(), b.run.method.networks.state_dict()
    assert na.keys() == nb.keys() and (len(na) > 0 or a.run.method.draws_own_chains)
    for name in na:
        assert torch.equal(na[name], nb[name]), f"method network {name} differs"
    for group in a.optimizers:
        state_a, state_b = a.optimizers[group].state_dict()["state"], b.optimizers[group].state_dict()["state"]
        assert state_a.keys() == state_b.keys()
        for index in state_a:
            for key, value in state_a[index].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[index][key])), (group, index, key)
    assert a.step == b.step and a.epoch == b.epoch
    for shard_a, shard_b in zip(a.shards, b.shards, strict=True):
        assert torch.equal(shard_a.generator.get_state(), shard_b.generator.get_state())


LOSS_KEYS = ("loss", "loss/forward", "loss/reverse", "loss/terminal", "grad_norm/policy", "grad_norm/flow", "lr/policy")


# Checkpoints mid-epoch (2 updates per epoch, checkpoint at an odd update) and at epoch boundaries.
@pytest.mark.parametrize(
    "extra,checkpoint_every,stop_at",
    [
        ([], 3, 4),  # checkpoint mid-epoch (update 3), crash after update 4 was logged
        ([], 2, 5),  # checkpoint at an epoch boundary (update 4), crash after update 5
        (["train.on_policy=true"], 3, 4),
        (["train.on_policy=true"], 2, 3),
        (["method.reverse_target=sampled", "method.subsample.kind=uniform", "method.subsample.fraction=0.3"], 2, 5),
        (["method.name=draft", "method.backprop_steps=2"], 3, 4),  # epochs of conditions only
    ],
    ids=["mid-epoch", "epoch-boundary", "on-policy-mid-epoch", "on-policy-epoch-boundary", "sampled-uniform",
         "conditions-only"],
)
def test_resume_reproduces_uninterrupted_run(tmp_path, extra, checkpoint_every, stop_at):
    # The cosine lr schedule depends on train.updates, so run B keeps the 6-update config and is interrupted
    # (see interrupt_after) instead of being trained with train.updates=3.
    config = load_config(None, [*BASE, f"train.checkpoint_every={checkpoint_every}", *extra])
    assert config.train.lr_schedule == "cosine"

    a = Trainer.from_config(config, tmp_path / "a", progress=False)
    a.train()

    b = Trainer.from_config(config, tmp_path / "b", progress=False)
    interrupt_after(b, stop_at)
    with pytest.raises(Interrupted):
        b.train()
    last = (stop_at // checkpoint_every) * checkpoint_every
    assert list_checkpoints(tmp_path / "b")[-1].name == f"update_{last:07d}"
    assert max(r["update"] for r in training_records(tmp_path / "b")) == stop_at  # logged past the checkpoint

    resumed = Trainer.from_config(config, tmp_path / "b", progress=False)
    resumed.train(resume=True)
    assert_same_state(a, resumed)

    # the log: every update exactly once, with the same losses as the uninterrupted run
    log_a, log_b = training_records(tmp_path / "a"), training_records(tmp_path / "b")
    assert [r["update"] for r in log_b] == list(range(1, 7))
    assert [r["update"] for r in log_a] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        for key in LOSS_KEYS:
            if key in ra:
                assert ra[key] == rb[key], (ra["update"], key)
    evals_b = [r["update"] for r in records(tmp_path / "b") if "eval/log_reward_mean" in r]
    assert evals_b == [0, 6]
    # the final evaluation agrees too
    assert a.run.evaluate(200, seed=3) == resumed.run.evaluate(200, seed=3)


def test_extending_a_finished_run_with_constant_lr(tmp_path):
    """With a constant lr, a finished 3-update run resumed under a 6-update config equals a 6-update run."""
    one_per_epoch = [*BASE, "train.trajectories_per_epoch=16", "train.checkpoint_every=3", "train.lr_schedule=constant"]
    six = load_config(None, one_per_epoch)
    three = load_config(None, [*one_per_epoch, "train.updates=3"])
    a = Trainer.from_config(six, tmp_path / "a", progress=False)
    a.train()
    Trainer.from_config(three, tmp_path / "b", progress=False).train()
    resumed = Trainer.from_config(six, tmp_path / "b", progress=False)
    resumed.train(resume=True)
    assert_same_state(a, resumed)
    assert [r["update"] for r in training_records(tmp_path / "b")] == list(range(1, 7))


def test_resume_without_checkpoint_fails(tmp_path):
    config = load_config(None, [*BASE, "train.checkpoint_every=3"])
    with pytest.raises(FileNotFoundError):
        Trainer.from_config(config, tmp_path / "empty", progress=False).train(resume=True)


def test_training_changes_the_policy_and_keeps_checkpoints(tmp_path):
    config = load_config(None, [*BASE, "train.checkpoint_every=2", "train.keep_checkpoints=2"])
    trainer = Trainer.from_config(config, tmp_path, progress=False)
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_0000004", "update_0000006"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert any(torch.count_nonzero(p) > 0 for p in trainer.run.backend.residual.out.parameters())
    assert any(torch.count_nonzero(p) > 0 for p in trainer.run.method.networks["flow_score"].out.parameters())


def test_checkpoint_can_be_written_mid_epoch(tmp_path):
    """With 2 updates per epoch the checkpoint after update 1 is mid-epoch (the epoch's data is not saved twice)."""
    config = load_config(None, [*BASE, "train.updates=1", "train.checkpoint_every=1"])
    Trainer.from_config(config, tmp_path, progress=False).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["update_0000001"]


def test_wall_time_accumulates_across_resume_and_final_metrics_are_not_recomputed(tmp_path):
    config = load_config(None, [*BASE, "train.checkpoint_every=3", "train.lr_schedule=constant",
                                "train.trajectories_per_epoch=16"])
    three = load_config(None, [*BASE, "train.checkpoint_every=3", "train.lr_schedule=constant",
                               "train.trajectories_per_epoch=16", "train.updates=3"])
    Trainer.from_config(three, tmp_path, progress=False).train()
    first = [r for r in training_records(tmp_path) if r["update"] == 3][0]["time"]
    resumed = Trainer.from_config(config, tmp_path, progress=False)
    final = resumed.train(resume=True)
    times = [r["time"] for r in training_records(tmp_path)]
    assert times == sorted(times) and times[-1] > first > 0
    update_times = [r["update_time"] for r in training_records(tmp_path)]  # updates alone, also accumulated
    assert update_times == sorted(update_times) and all(0 < u < t for u, t in zip(update_times, times))
    last_eval = [r for r in records(tmp_path) if "eval/log_reward_mean" in r][-1]
    assert final["log_reward_mean"] == last_eval["eval/log_reward_mean"]


def test_resuming_hashes_each_checkpoint_file_once(tmp_path, monkeypatch):
    """Loading a checkpoint verifies every file's SHA-256 once (checkpoints of a large model are gigabytes)."""
    from nablagfn.train import checkpoint as checkpoint_module

    config = load_config(None, [*BASE, "train.updates=2", "train.checkpoint_every=2"])
    Trainer.from_config(config, tmp_path, progress=False).train()
    hashed = []
    file_sha256 = checkpoint_module.file_sha256
    monkeypatch.setattr(checkpoint_module, "file_sha256", lambda path: hashed.append(path.name) or file_sha256(path))
    Trainer.from_config(config, tmp_path, progress=False).load(tmp_path)
    files = sorted(p.name for p in list_checkpoints(tmp_path)[-1].glob("*.safetensors"))
    assert sorted(hashed) == files and len(files) >= 3
