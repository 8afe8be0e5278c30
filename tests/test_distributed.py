"""Data-parallel training through accelerate: 2 CPU processes (gloo) equal 1 process with the same data shards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nablagfn.config import ConfigError, load_config
from nablagfn.train.trainer import Trainer
from conftest import TWO_UPDATES_PER_EPOCH

SMALL = [*TWO_UPDATES_PER_EPOCH, "train.updates=6", "train.eval_every=3", "train.checkpoint_every=4",
         "train.data_shards=2"]
# Gradients are averaged in one all-reduce instead of summed in one process, so the two may differ by rounding;
# on this CPU they agree bitwise, and the test allows float32 rounding.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: list[str], processes: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())] if processes > 1 else [sys.executable]
    result = subprocess.run([*launch, "-m", "nablagfn", "train", "--no-progress", *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


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
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_on_another_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(["--out", str(one), *SMALL])
    train(["--out", str(two), *SMALL], processes=2)
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
    train(["--resume", str(two)])
    assert_same_checkpoint(one / final, two / final)
    assert [r["update"] for r in records(two)] == [r["update"] for r in log_one]


def test_shards_in_one_process_differ_from_one_shard_and_are_resolved(tmp_path):
    """data_shards is part of the run (its own random streams); None resolves to the number of processes and is
    saved, so a resume keeps it."""
    base = [s for s in SMALL if not s.startswith("train.data_shards")] + ["train.updates=2"]
    default = Trainer(load_config(None, base), tmp_path / "a", progress=False)
    assert default.config.train.data_shards == 1 and len(default.shards) == 1
    default.train()
    assert "data_shards: 1" in (tmp_path / "a" / "config.yaml").read_text()
    sharded = Trainer(load_config(None, [*base, "train.data_shards=2"]), tmp_path / "b", progress=False)
    assert [s.index for s in sharded.shards] == [0, 1]
    sharded.train()
    a, b = default.run.backend.adapter_state_dict(), sharded.run.backend.adapter_state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_shards_must_divide_the_batch():
    with pytest.raises(ConfigError, match="train.data_shards"):
        load_config(None, [*SMALL, "train.data_shards=3"])
