"""A training process killed with SIGKILL and resumed ends exactly where an uninterrupted run ends (CPU, bitwise).

Black-box: the killed run and its resumption go through ``python -m nablagfn train``, the uninterrupted reference
through ``Trainer.from_config(config, run_dir).train()`` (what the command runs), and only the files of the run directories are
compared (``metrics.jsonl``, ``checkpoints/update_*/model.safetensors``), so the test holds whatever the trainer's
internals and the rest of the checkpoint layout become.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TWO_UPDATES_PER_EPOCH
from safetensors.torch import load_file

from nablagfn.config_loading import load_config
from nablagfn.train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]

UPDATES = 40
CHECKPOINT_EVERY = 3
CONFIG = [  # 2 updates per epoch: checkpoints every 3 updates fall mid-epoch and at epoch ends
    *TWO_UPDATES_PER_EPOCH,
    f"train.updates={UPDATES}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.eval_every=1000",
]
#: deterministic functions of the training state in each training record (not wall time)
COMPARED_PREFIXES = ("loss", "grad_norm/", "lr/", "skipped_nonfinite", "sample/")
TIMEOUT = 300  # seconds for any one command (the whole test: ~35 s on a 2-core machine at load 5, mostly the
# start-up of the two commands on its critical path: importing torch and diffusers, and the figures at the end)


def _train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nablagfn", "train", "--no-progress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output


def _records(run_dir: Path) -> list[dict]:
    """The complete records of metrics.jsonl (a line being written at the moment is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _training_records(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if "loss" in r]


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return {}
    return {int(p.name.removeprefix("update_")): p for p in root.iterdir() if p.name.startswith("update_")}


def _kill_after_a_checkpoint(process: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL ``process`` as soon as it has logged a checkpoint update (u = k·CHECKPOINT_EVERY, k ≥ 2) with a
    checkpoint on disk, so the kill lands while checkpoint u is being written or early in update u + 1 (or, should
    the polls miss those, halfway through training). Returns the last training update logged before the kill."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended (exit {process.returncode}) before it could be killed: "
                        f"{process.communicate()[0]}")
        logged = [r["update"] for r in _training_records(run_dir)]
        last = max(logged, default=0)
        at_checkpoint = last % CHECKPOINT_EVERY == 0 or last >= UPDATES // 2  # (a late poll: kill mid-run anyway)
        if last >= 2 * CHECKPOINT_EVERY and at_checkpoint and _checkpoints(run_dir):
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=TIMEOUT)
            assert process.returncode == -signal.SIGKILL
            return last
        time.sleep(0.005)
    process.kill()
    pytest.fail("no checkpoint update was logged in time")


def _assert_same_tensors(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between {path_a} and {path_b}"


def _in_background(action) -> threading.Thread:
    """Run ``action`` in a thread; ``join_and_check(thread)`` re-raises what it raised."""

    def run():
        try:
            action()
        except BaseException as error:  # handed to the test's thread
            thread.error = error

    thread = threading.Thread(target=run, daemon=True)
    thread.error = None
    thread.start()
    return thread


def _join_and_check(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the reference run did not finish in time"
    if thread.error is not None:
        raise thread.error


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    victim = _train("--out", str(killed), *CONFIG)
    # meanwhile, the uninterrupted run of the same config, in this process (as `nablagfn train` runs it)
    uninterrupted = _in_background(lambda: Trainer.from_config(load_config(None, CONFIG), reference, progress=False).train())
    try:
        last_logged = _kill_after_a_checkpoint(victim, killed)
    finally:
        if victim.poll() is None:
            victim.kill()

    # the kill happened in the middle of training: no final checkpoint, updates missing from the log
    assert last_logged < UPDATES and UPDATES not in _checkpoints(killed)
    assert max(r["update"] for r in _training_records(killed)) < UPDATES
    assert _checkpoints(killed), "killed before its first checkpoint"
    # also what a kill during the next checkpoint write leaves behind (deterministically, whatever the kill hit):
    # a half-written staging directory, which the resumed run must neither load nor trip over
    next_checkpoint = (max(_checkpoints(killed)) // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
    stale = killed / "checkpoints" / f".tmp_update_{next_checkpoint:07d}"
    print(f"killed after update {last_logged} was logged; checkpoints on disk: {sorted(_checkpoints(killed))}; "
          f"staging directory left by the kill: {stale.exists()}")
    if not stale.exists():
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"\x00" * 7)  # a truncated file

    _finish(_train("--resume", str(killed)))
    _join_and_check(uninterrupted)

    # the same final weights, bitwise, in every checkpoint both runs kept (the final one included)
    kept_a, kept_b = _checkpoints(reference), _checkpoints(killed)
    assert max(kept_a) == max(kept_b) == UPDATES
    for update in sorted(kept_a.keys() & kept_b.keys()):
        _assert_same_tensors(kept_a[update] / "model.safetensors", kept_b[update] / "model.safetensors")

    # the log: every training update exactly once, with the same losses as the uninterrupted run
    log_a, log_b = _training_records(reference), _training_records(killed)
    assert [r["update"] for r in log_a] == list(range(1, UPDATES + 1))
    assert [r["update"] for r in log_b] == list(range(1, UPDATES + 1))
    for ra, rb in zip(log_a, log_b):
        compared = {k for k in ra if k.startswith(COMPARED_PREFIXES)}
        assert compared and compared == {k for k in rb if k.startswith(COMPARED_PREFIXES)}
        for key in compared:
            assert ra[key] == rb[key], (ra["update"], key)
    # evaluations: once at the start and once at the end, with equal results
    evals_a = [r for r in _records(reference) if any(k.startswith("eval/") for k in r)]
    evals_b = [r for r in _records(killed) if any(k.startswith("eval/") for k in r)]
    assert [r["update"] for r in evals_b] == [r["update"] for r in evals_a] == [0, UPDATES]
    for ra, rb in zip(evals_a, evals_b):
        assert {k: v for k, v in ra.items() if k.startswith("eval/")} == {k: v for k, v in rb.items()
                                                                          if k.startswith("eval/")}
