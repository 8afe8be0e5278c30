"""Data-parallel training through accelerate: 2 CPU processes (gloo, launched by torchrun, whose environment
accelerate reads) equal 1 process with the same data shards."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TWO_UPDATES_PER_EPOCH
from safetensors.torch import load_file

from nablagfn.config import ConfigError
from nablagfn.config_loading import load_config
from nablagfn.train.trainer import Trainer

SMALL = [*TWO_UPDATES_PER_EPOCH, "train.updates=6", "train.eval_every=3", "train.checkpoint_every=4",
         "train.data_shards=2"]
# Gradients are averaged in one all-reduce instead of summed in one process, so the two differ by float32
# rounding: 1.6e-7 at most after 6 updates on this CPU.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int) -> list[str]:
    """The command prefix that starts ``processes`` CPU processes (accelerate's own launcher starts one on CPU)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


def train(args: list[str], processes: int = 1, env: dict[str, str] | None = None,
          timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*launch(processes), "-m", "nablagfn", "train", "--no-progress", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def train_ok(args: list[str], processes: int = 1) -> str:
    result = train(args, processes)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def assert_same_checkpoint(a, b) -> None:
    for name in ("model", "optimizers", "shard_000", "shard_001"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and ta, name
        for key in ta:
            if ta[key].is_floating_point():
                torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=TOLERANCE, msg=f"{name}: {key}")
            else:
                assert torch.equal(ta[key], tb[key]), (name, key)


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "update_time")} for line in lines]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_another_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_ok(["--out", str(one), *SMALL])
    assert "training processes: 2, data shards: 2" in train_ok(["--out", str(two), *SMALL], processes=2)
    final = "checkpoints/update_0000006"
    assert_same_checkpoint(one / final, two / final)
    # metrics are reduced over processes and logged once, by the main process
    log_one, log_two = records(one), records(two)
    assert [r["update"] for r in log_two] == [r["update"] for r in log_one]
    for r1, r2 in zip(log_one, log_two, strict=True):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (r1["update"], key)

    # a checkpoint written by 2 processes resumes in 1 (each shard keeps its generator and carried trajectories)
    shutil.rmtree(two / final)
    train_ok(["--resume", str(two)])
    assert_same_checkpoint(one / final, two / final)
    assert [r["update"] for r in records(two)] == [r["update"] for r in log_one]


def test_shards_in_one_process_differ_from_one_shard_and_are_resolved(tmp_path):
    """data_shards is part of the run (its own random streams); None resolves to the number of processes and is
    saved, so a resume keeps it."""
    base = [s for s in SMALL if not s.startswith("train.data_shards")] + ["train.updates=2"]
    default = Trainer.from_config(load_config(None, base), tmp_path / "a", progress=False)
    assert default.config.train.data_shards == 1 and len(default.shards) == 1
    default.train()
    assert "data_shards: 1" in (tmp_path / "a" / "config.yaml").read_text()
    sharded = Trainer.from_config(load_config(None, [*base, "train.data_shards=2"]), tmp_path / "b", progress=False)
    assert [s.index for s in sharded.shards] == [0, 1]
    sharded.train()
    a, b = default.run.backend.adapter_state_dict(), sharded.run.backend.adapter_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_shards_must_divide_the_batch():
    with pytest.raises(ConfigError, match="train.data_shards"):
        load_config(None, [*SMALL, "train.data_shards=3"])


SITECUSTOMIZE = '''
import errno, os
import safetensors.torch

_save_file = safetensors.torch.save_file


def save_file(tensors, filename, *args, **kwargs):
    if os.environ.get("RANK") == "1" and os.path.basename(str(filename)).startswith("shard_"):
        raise OSError(errno.ENOSPC, "No space left on device (injected on rank 1)", str(filename))
    return _save_file(tensors, filename, *args, **kwargs)


safetensors.torch.save_file = save_file
'''


@pytest.mark.slow
def test_a_checkpoint_failure_on_one_process_stops_every_process(tmp_path):
    """The reference implementation hangs when one process fails while the others wait in a collective: here a
    disk-full error on rank 1 while it writes its shard stops both processes with that error, and leaves no
    checkpoint, complete or half-written."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)  # imported at start-up by every launched process
    run_dir = tmp_path / "run"
    result = train(["--out", str(run_dir), *SMALL, "train.checkpoint_every=2"], processes=2,
                   env={"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode != 0
    assert "No space left on device (injected on rank 1)" in result.stderr
    assert "another training process failed while writing a checkpoint" in result.stderr  # rank 0's error
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_two_processes_on_digits_with_fid_evaluations_and_checkpoints(tmp_path):
    """The digits default evaluates FIDs (distance to the real class, FID to the pretrained model) on the main process
    while the others wait: torchmetrics must not try to gather across processes there (it hung for good before)."""
    run_dir = tmp_path / "run"
    result = train(["--out", str(run_dir), "sampler.steps=5", "train.trajectories_per_epoch=8", "train.batch_size=4",
                    "train.updates=4", "train.eval_every=2", "train.checkpoint_every=2", "train.eval_samples=32"],
                   processes=2, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluations = [r for r in records(run_dir) if "eval/fid_to_pretrained" in r]
    assert [r["update"] for r in evaluations] == [0, 2, 4]
    assert all(math.isfinite(r["eval/fd_to_class"]) for r in evaluations)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["update_0000002", "update_0000004"]
