"""The fault catalogue (issue 14): each class of fault a user or the machine can cause, driven through the CLI on the
small mixture settings, with what it must produce — a one-line error, a clean refusal, an exact resume — and a check
that nothing in the run directory was lost. The older catalogue of checkpoint, prompt-file and NaN faults is
``tests/test_faults.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from nablagfn.cli import main
from nablagfn.files import atomic_write_text, strict_json
from nablagfn.train.checkpoint import list_checkpoints
from nablagfn.train.rundir import LOCK_FILE, RunLock, is_locked

SMALL = [*SMALL_RUN, "train.updates=4", "train.checkpoint_every=2", "train.log_every=1"]
ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, *names: str) -> str:
    """The command's stderr: one ``nablagfn: error:`` line naming each of ``names``, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("nablagfn: error: ")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (but the lock) with its bytes: to check that nothing was changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL]) == 0
    return run_dir


# -- foreign and busy run directories ----------------------------------------------------------------------------------
def test_a_foreign_directory_is_refused_and_left_as_it_was(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert main(["train", "--out", str(tmp_path), "--no-progress", *SMALL]) == 2
    one_line_error(capsys, str(tmp_path), "not a run directory")
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--no-progress", *SMALL]) == 2
    one_line_error(capsys, "is a file")


def test_a_second_trainer_in_the_same_directory_is_refused(finished, tmp_path, capsys):
    """While one process trains in a run directory (holds its lock), a second one is refused, fresh or resumed, and
    changes nothing; a lock file whose process is gone is no obstacle."""
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL, "train.updates=2"]) == 0
    before = snapshot(run_dir)
    with RunLock(run_dir):  # another trainer, as the OS sees it (flock conflicts between open files)
        assert is_locked(run_dir)
        assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=4"]) == 2
        one_line_error(capsys, str(run_dir), "is being trained by", str(os.getpid()))
    assert snapshot(run_dir) == before
    assert not is_locked(run_dir)  # released with its file, as by a process that died
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=4"]) == 0


def test_a_run_whose_first_checkpoint_never_finished_starts_again(tmp_path, capsys):
    """Killed (or out of disk) during its first checkpoint: config.yaml, a log and an empty staging directory."""
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL, "train.updates=2"]) == 0
    (run_dir / "checkpoints" / "update_0000002").rename(run_dir / "checkpoints" / ".tmp_update_0000002")
    assert list_checkpoints(run_dir) == []
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "starting it again from the beginning" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run_dir)] == ["update_0000002"]
    assert not (run_dir / "checkpoints" / ".tmp_update_0000002").exists()
    updates = [json.loads(line)["update"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert updates == [0, 1, 2, 2]  # one run's log, not two
    (run_dir / "checkpoints" / "update_0000002").rename(run_dir / "checkpoints" / ".tmp_update_0000002")
    assert main(["train", "--out", str(run_dir), "--no-progress", *SMALL, "train.updates=2"]) == 0  # or afresh


def test_a_run_with_checkpoints_is_not_overwritten(finished, capsys):
    before = snapshot(finished)
    assert main(["train", "--out", str(finished), "--no-progress", *SMALL]) == 2
    one_line_error(capsys, "already holds a run", "--resume")
    assert snapshot(finished) == before


# -- kills -------------------------------------------------------------------------------------------------------------
def test_the_metrics_log_is_replaced_atomically(tmp_path, monkeypatch):
    """A kill while the log is rewritten on resume (here: an interrupt just before the rename) leaves the old log."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"update": 1}\n{"update": 2}\n')

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(log, '{"update": 1}\n')
    assert log.read_text() == '{"update": 1}\n{"update": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_sigkill_during_a_resume_keeps_every_record_once(tmp_path):
    """SIGKILL a resumed run at several points; the log always holds each update once and the run finishes."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "nablagfn", "train", "--no-progress"]
    subprocess.run([*args, "--out", str(run_dir), *SMALL_RUN, "train.updates=2", "train.checkpoint_every=1",
                    "train.log_every=1"], env=env, check=True, capture_output=True)
    for delay in (0.5, 1.5, 2.5):
        process = subprocess.Popen([*args, "--resume", str(run_dir), "train.updates=40", "train.checkpoint_every=1"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        training = [r["update"] for r in records if "loss" in r]
        assert training == sorted(set(training)) and training[:2] == [1, 2]
    subprocess.run([*args, "--resume", str(run_dir), "train.updates=40"], env=env, check=True, capture_output=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == list(range(1, 41))


# -- corrupt and foreign checkpoints -----------------------------------------------------------------------------------
def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_a_bit_flip_in_a_checkpoint_is_caught_before_sampling(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    model = list_checkpoints(run_dir)[-1] / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data
    model.write_bytes(bytes(data))
    assert main(["sample", str(run_dir), "--num", "8", "--out", str(tmp_path / "x.npy")]) == 2
    one_line_error(capsys, "model.safetensors", "SHA-256")


def test_a_checkpoint_renamed_to_another_update_is_refused(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    (run_dir / "checkpoints" / "update_0000004").rename(run_dir / "checkpoints" / "update_0000003")
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=6"]) == 2
    one_line_error(capsys, "update 4", "not 3")


def test_a_checkpoint_of_another_method_is_refused(finished, tmp_path, capsys):
    """A checkpoint from another run whose networks have the same shapes (as nabla_db's do) would load silently."""
    run_dir = _copy(finished, tmp_path)
    state_path = list_checkpoints(run_dir)[-1] / "state.json"
    state = json.loads(state_path.read_text())
    state["written_by"]["method"] = "nabla_db"
    state_path.write_text(json.dumps(state))
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=6"]) == 2
    one_line_error(capsys, "written by method 'nabla_db'", "'residual_nabla_db'")


def test_an_edited_config_is_named_and_needs_a_flag(finished, tmp_path, capsys):
    run_dir = _copy(finished, tmp_path)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("seed: 0\n", "seed: 5\n", 1))
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=6"]) == 2
    one_line_error(capsys, "train.seed (0 → 5)", "--accept-config-changes")
    assert main(["train", "--resume", str(run_dir), "--no-progress", "train.updates=6", "--accept-config-changes"]) == 0


# -- configs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method.beta=.inf"], "method.beta"),
        (["train.policy_optimizer.lr=.nan"], "train.policy_optimizer.lr"),
        (["reward.center=[.inf,0]"], "reward.center"),
        (["model.means=[[.nan,0]]", "model.stds=[1]"], "model.means"),
        (["train.policy_optimizer.betas=[0.9,1.0]"], "train.policy_optimizer.betas"),
        (["train.device=gpu"], "train.device"),
        (["train.device=cuda:3"], "train.device"),
        (["method.beta=[1"], "method.beta"),
        (["reward.scale=1e-200"], "reward.scale"),  # its square underflowed: a division by zero mid-run
        (["model.means=[[1e300,0]]", "model.stds=[1]"], "model.means"),  # ran, with meaningless metrics
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, overrides, key):
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *SMALL, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("nablagfn: error: ") and key in err, err
    assert not (tmp_path / "run").exists()


def test_duplicate_keys_and_binary_config_files(tmp_path, capsys):
    (tmp_path / "dup.yaml").write_text("method:\n  beta: 1\n  beta: 2\n")
    assert main(["train", "--config", str(tmp_path / "dup.yaml"), "--out", str(tmp_path / "a")]) == 2
    one_line_error(capsys, "duplicate key 'beta'")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    assert main(["train", "--config", str(tmp_path / "bin.yaml"), "--out", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "not a text file")


def test_bad_weight_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    assert main(["train", "--out", str(tmp_path / "run"), f"model.weights={tmp_path / 'garbage.safetensors'}"]) == 2
    one_line_error(capsys, "model.weights", "garbage.safetensors")


# -- output files ------------------------------------------------------------------------------------------------------
def test_metrics_files_are_strict_json():
    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": float("-inf")}})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON")) == {
        "a": None, "b": [None, 1.0], "c": {"d": None}}


def test_unexpected_errors_are_one_line_with_a_way_to_the_traceback(tmp_path, capsys, monkeypatch):
    from nablagfn.train import trainer as trainer_module

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer_module.Trainer, "_train", broken)
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *SMALL]) == 2
    one_line_error(capsys, "unexpected ZeroDivisionError: a bug", "--debug")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "train", "--out", str(tmp_path / "run2"), "--no-progress", *SMALL])


# -- compare under signals ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="watches processes through Linux semantics")
def test_compare_workers_die_with_their_parent_and_a_rerun_skips_held_runs(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "nablagfn", "compare", "--out", str(out), "--no-progress", "--jobs", "2",
               "--methods", "residual_nabla_db", "ddpo", "--seeds", "0", *SMALL_RUN, "train.updates=400",
               "train.eval_every=1000", "train.checkpoint_every=5"]
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    runs = [out / "runs" / "residual_nabla_db_seed0", out / "runs" / "ddpo_seed0"]
    deadline = time.time() + 120
    while not all(is_locked(run) for run in runs) and time.time() < deadline:
        time.sleep(0.5)
    assert all(is_locked(run) for run in runs), "the workers did not start"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    while any(is_locked(run) for run in runs) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(is_locked(run) for run in runs), "a worker outlived its compare"
    # a run another process holds is skipped, not trained twice
    with RunLock(runs[0]):
        result = subprocess.run([*command[:command.index("--methods")], "--methods", "residual_nabla_db", "--seeds",
                                 "0", *SMALL_RUN, "train.updates=400", "train.eval_every=1000",
                                 "train.checkpoint_every=5"], env=env, capture_output=True, text=True, timeout=300)
    assert "skipped (held by another process)" in result.stdout, result.stdout + result.stderr


def _sleep_or_fail(kind: str, pid_file: str) -> None:
    """A worker task of the test below: ``sleep`` writes its pid and sleeps; ``fail`` raises once the sleeper runs."""
    if kind == "sleep":
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(300)
    while not Path(pid_file).exists():
        time.sleep(0.05)
    raise RuntimeError("a case failed")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="watches processes through /proc")
def test_an_error_in_one_worker_process_stops_the_others(tmp_path):
    """What benchmarks/gmm_suite.py --jobs and compare --jobs run on: one call's error reaches the caller and the
    other workers are stopped, not left to run on."""
    from nablagfn.compare.grid import in_worker_processes

    pid_file, threads = tmp_path / "sleeper.pid", os.environ.get("OMP_NUM_THREADS")
    with pytest.raises(RuntimeError, match="a case failed"):
        list(in_worker_processes(_sleep_or_fail, [("sleep", str(pid_file)), ("fail", str(pid_file))], jobs=2))
    sleeper = int(pid_file.read_text())
    deadline = time.time() + 30
    while _alive(sleeper) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(sleeper), "a worker outlived the error"
    assert os.environ.get("OMP_NUM_THREADS") == threads  # the workers' one-thread setting is not left behind


# -- a real full disk --------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that lets this process mount; skipped otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_stops_in_one_line_and_the_run_resumes_elsewhere(small_disk, tmp_path, capsys):
    import shutil

    from nablagfn.train.checkpoint import verify_checkpoint

    run_dir = small_disk / "run"
    code = main(["train", "--out", str(run_dir), "--no-progress", *SMALL_RUN, "train.updates=400",
                 "train.checkpoint_every=1", "train.keep_checkpoints=1000", "train.eval_every=100000",
                 "train.log_every=1"])
    assert code == 2
    one_line_error(capsys, "No space left on device")
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints, "the disk filled before the first checkpoint"
    for checkpoint in checkpoints:  # every checkpoint that looks complete is complete
        verify_checkpoint(checkpoint)
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns(".tmp_*", LOCK_FILE))
    last = int(checkpoints[-1].name.removeprefix("update_"))
    assert main(["train", "--resume", str(moved), "--no-progress", f"train.updates={last + 2}"]) == 0
    records = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == list(range(1, last + 3))


@pytest.mark.skipif(sys.platform != "linux", reason="watches processes through Linux semantics")
def test_ctrl_c_stops_compare_and_its_runs_at_once(tmp_path):
    """Before, Ctrl-C waited for the running runs and started a queued one (tens of seconds)."""
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nablagfn", "compare", "--out", str(out), "--no-progress",
                                "--jobs", "2", "--methods", "residual_nabla_db", "ddpo", "nabla_db", "--seeds", "0",
                                *SMALL_RUN, "train.updates=400", "train.eval_every=1000"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = out / "runs"
    deadline = time.time() + 120
    while not (runs.is_dir() and sum(is_locked(run) for run in runs.iterdir()) == 2) and time.time() < deadline:
        time.sleep(0.5)
    started = time.time()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert time.time() - started < 15, "Ctrl-C took too long"
    assert process.returncode == 130 and "interrupted" in err, err
    assert not any(is_locked(run) for run in runs.iterdir())
    assert not (runs / "nabla_db_seed0").exists() or not list_checkpoints(runs / "nabla_db_seed0")  # never started
