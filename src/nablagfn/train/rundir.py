"""The run directory: who may write it, and what a fresh start may find in it.

* **One trainer at a time**: the training process holds an exclusive ``flock`` on ``RUN_DIR/.lock`` (holding its pid
  and host) while it trains. The operating system releases it when the process dies, however it dies, so a lock
  left by a killed run is never in the way; a second process trying to train in the same directory gets a one-line
  refusal naming the holder.
* **A fresh start** goes into a missing or empty directory, or into a run that never finished its first checkpoint
  (what it wrote is cleared); a directory holding something else, or a run with checkpoints, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import list_checkpoints

LOCK_FILE = ".lock"
#: what a run writes before its first checkpoint; cleared when such a run is started again
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.json", "samples.png", "curves.png", "tensorboard", "wandb",
             "wandb_id.txt", "checkpoints", "evaluations", LOCK_FILE)


class RunLock:
    """An exclusive lock on a run directory for as long as this process trains in it (``with RunLock(run_dir):``)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.handle = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: no protection against a second trainer
            return self
        self.handle = open(self.path, "a+")  # noqa: SIM115 — held open for the lock's lifetime
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise ConfigError(
                f"{self.path.parent} is being trained by {holder} ({self.path}); wait for it to finish or stop it, "
                "or train into another --out"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # releases the flock
            self.handle = None


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (for ``compare``: never train a run another process trains)."""
    try:
        import fcntl
    except ImportError:
        return False
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def prepare_fresh_run(run_dir: Path, clear: bool = True) -> None:
    """Make ``run_dir`` ready for a run started from scratch, or refuse it with a one-line ConfigError; ``clear=False``
    only checks (nothing is changed)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a directory; choose another --out")
    if not run_dir.exists():
        return
    if list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --out")
    entries = {entry.name for entry in run_dir.iterdir()}
    if entries and "config.yaml" not in entries:
        raise ConfigError(f"{run_dir} is not empty and is not a run directory; choose another --out (nothing there "
                          "was changed)")
    foreign = entries - set(RUN_FILES)
    if foreign:
        raise ConfigError(f"{run_dir} holds files a run does not write ({', '.join(sorted(foreign)[:3])}); choose "
                          "another --out (nothing there was changed)")
    if not clear:
        return
    if is_locked(run_dir):
        raise ConfigError(f"{run_dir} is being trained by another process ({run_dir / LOCK_FILE}); wait for it or "
                          "stop it, or train into another --out")
    for name in entries - {LOCK_FILE}:  # a run that never finished its first checkpoint: start it again
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
