"""The grid of ``nablagfn compare``: one validated run per (method, seed), trained, resumed or skipped."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import current_process, get_context
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..config_loading import flatten, load_config, parse_override, read_yaml_mapping
from ..errors import CheckpointError, ConfigError
from ..files import atomic_write_text, strict_json
from ..methods import METHODS

#: keys compare sets itself for each run
RESERVED_KEYS = ("method.name", "train.seed")


def run_name(method: str, seed: int) -> str:
    return f"{method}_seed{seed}"


# -- the grid ------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One (method, seed) of the grid: its validated config and its run directory."""

    method: str
    seed: int
    config: RunConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return run_name(self.method, self.seed)


def load_settings(path: str | Path | None) -> dict[str, list[str]]:
    """Per-method overrides from a YAML file mapping method name → list of ``key=value`` strings."""
    if path is None:
        return {}
    data = read_yaml_mapping(path, "--settings", "map method names to lists of key=value overrides")
    settings: dict[str, list[str]] = {}
    for method, items in data.items():
        if method not in METHODS:
            raise ConfigError(f"--settings {path}: unknown method {method!r}; choose from {', '.join(METHODS)}")
        items = [] if items is None else items
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"--settings {path}: {method} must be a list of key=value strings, e.g. "
                              f"['train.on_policy=true']")
        settings[method] = items
    return settings


def plan_grid(
    methods: Iterable[str],
    seeds: Iterable[int],
    out: str | Path,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    settings: dict[str, list[str]] | None = None,
) -> list[RunSpec]:
    """Every run's config, validated before any work: defaults ← ``config_file`` ← ``overrides`` ← the method's
    ``settings`` ← ``method.name``, ``train.seed``. Raises ConfigError naming the method (and key) at fault, and when
    a run directory already under ``out`` was made with another config."""
    methods, seeds, overrides = list(dict.fromkeys(methods)), list(dict.fromkeys(seeds)), list(overrides)
    settings = settings or {}
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not methods or not seeds:
        raise ConfigError(f"empty grid: {len(methods)} method(s) × {len(seeds)} seed(s); give --methods and --seeds")
    for source, items in [("", overrides), *((f"--settings {m}: ", s) for m, s in settings.items())]:
        for item in items:
            try:
                key = ".".join(parse_override(item)[0])
            except ConfigError as error:
                raise ConfigError(f"{source}{error}") from None
            if key in RESERVED_KEYS:
                raise ConfigError(f"{source}override {item!r}: compare sets {key} for each run; use --methods and "
                                  "--seeds")
    failures: dict[str, list[str]] = {}  # error message → methods (a bad global override fails them all alike)
    configs: dict[str, RunConfig] = {}
    for method in methods:
        try:  # the seed cannot make a config invalid: validate once per method (method × reward included)
            load_config(config_file, [*overrides, *settings.get(method, []), f"method.name={method}"])
        except ConfigError as error:
            failures.setdefault(str(error), []).append(method)
            continue
        for seed in seeds:
            configs[run_name(method, seed)] = load_config(
                config_file, [*overrides, *settings.get(method, []), f"method.name={method}", f"train.seed={seed}"]
            )
    if failures:
        hint = ("\n(a key that only some methods have belongs in those methods' entries of --settings)"
                if any("unknown key" in message and len(names) < len(methods) for message, names in failures.items())
                else "")
        raise ConfigError("\n".join(f"method {', '.join(names)}: {message}" for message, names in failures.items())
                          + hint)
    runs = Path(out) / "runs"
    specs = [RunSpec(m, s, configs[run_name(m, s)], runs / run_name(m, s)) for m in methods for s in seeds]
    for spec in specs:
        _check_saved_config(spec)
    return specs


def _check_saved_config(spec: RunSpec) -> None:
    """A run directory that exists must hold a run of the same config (else resuming it would mix two configs)."""
    saved = spec.run_dir / "config.yaml"
    if not saved.is_file():
        return
    previous = load_config(saved)
    if spec.config.train.data_shards is None and previous.train.data_shards == 1:  # what one process resolves
        previous.train.data_shards = None  # None to (compare trains each run in one process)
    if previous == spec.config:
        return
    old, new = flatten(previous.model_dump(mode="json")), flatten(spec.config.model_dump(mode="json"))
    changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    raise ConfigError(f"{spec.run_dir} holds a run with another config ({'; '.join(changed[:5])}); "
                      f"use another --out, or delete that run directory to retrain it")


# -- running -------------------------------------------------------------------------------------------------------
def final_checkpoint(run_dir: Path, updates: int) -> Path:
    return run_dir / "checkpoints" / f"update_{updates:07d}"


def run_state(run_dir: Path, updates: int) -> str:
    """``finished`` (its final checkpoint exists), ``diverged`` (stopped on non-finite losses, ``diverged.json``),
    ``partial`` (a checkpoint to resume from) or ``new``."""
    from ..train.checkpoint import list_checkpoints

    if (final_checkpoint(run_dir, updates) / "model.safetensors").is_file():
        return "finished"
    if (run_dir / "diverged.json").is_file():
        return "diverged"
    return "partial" if list_checkpoints(run_dir) else "new"


def train_run(spec: RunSpec, progress: bool = False, position: int | None = None) -> dict[str, Any]:
    """Train one run of the grid from scratch, or resume it; skip it when finished or diverged. Returns what happened
    (``status``: skipped, trained, resumed, diverged or failed; ``seconds``; ``error``). Never raises for a failing
    run, so the other runs of the grid go on; a diverged run (non-finite losses) is marked so reruns skip it."""
    from ..errors import NonFiniteLossError
    from ..train.rundir import is_locked
    from ..train.trainer import Trainer

    state = run_state(spec.run_dir, spec.config.train.updates)
    outcome: dict[str, Any] = {"name": spec.name, "state": state, "seconds": 0.0}
    if state in ("finished", "diverged"):
        return {**outcome, "status": "skipped"}
    if is_locked(spec.run_dir):  # another live process (an earlier compare's worker) trains it
        return {**outcome, "state": "held by another process", "status": "skipped"}
    started = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer.from_config(spec.config, spec.run_dir, progress=progress)
        trainer.progress_desc, trainer.progress_position = spec.name, position
        trainer.train(resume=state == "partial")  # writes eval.json and the run's figures
        outcome["status"] = "resumed" if state == "partial" else "trained"
    except NonFiniteLossError as error:
        atomic_write_text(spec.run_dir / "diverged.json", strict_json({"update": trainer.step, "error": str(error)}))
        outcome.update(status="diverged", error=str(error))
    except (ConfigError, CheckpointError, FileNotFoundError) as error:  # a clear message is enough
        outcome.update(status="failed", error=" ".join(str(error).split()))
    except Exception as error:  # noqa: BLE001 — reported with its traceback, and the grid goes on
        outcome.update(status="failed", error=" ".join(f"{type(error).__name__}: {error}".split()),
                       traceback=traceback.format_exc())
    outcome["seconds"] = time.perf_counter() - started
    outcome["training_time"] = trainer.elapsed if trainer is not None else None
    return outcome


def _pool_worker_init(parent: int) -> None:
    """One thread per worker, and a watch on the parent: a worker whose ``compare`` died (killed, even with SIGKILL)
    exits within a second instead of training on alone (its run resumes from its last checkpoint on a rerun)."""
    import threading
    import time

    import torch

    torch.set_num_threads(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="nablagfn-parent-watch").start()


def in_worker_processes(function: Callable[..., Any], calls: list[tuple], jobs: int) -> Iterator[Any]:
    """``function(*arguments)`` for each of ``calls`` in ``jobs`` spawned processes of one thread each, yielded as
    they finish. On Ctrl-C or an error no queued call starts and the running ones stop at once; a worker whose
    parent died (even by SIGKILL) exits within a second. ``function`` must be importable (a module's top level)."""
    saved_env = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update({name: "1" for name in saved_env})  # inherited by the spawned workers before torch loads
    try:
        pool = ProcessPoolExecutor(min(jobs, len(calls)), mp_context=get_context("spawn"),
                                   initializer=_pool_worker_init, initargs=(os.getpid(),))
        futures = [pool.submit(function, *arguments) for arguments in calls]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:  # Ctrl-C, an error, or the caller stopped early: the running calls stop now
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train_in_worker(spec: RunSpec, progress: bool) -> dict[str, Any]:
    identity = current_process()._identity  # worker number in the pool: one progress-bar line each
    return train_run(spec, progress, position=identity[0] - 1 if identity else None)


def _describe(outcome: dict[str, Any]) -> str:
    if outcome["status"] == "skipped":
        return f"skipped ({outcome['state']})"
    text = f"{outcome['status']} in {outcome['seconds']:.1f} s"
    if outcome.get("training_time") is not None:
        text += f" (training time {outcome['training_time']:.1f} s)"
    if outcome["status"] in ("diverged", "failed"):
        text += f": {outcome['error']}"
    return text


def run_grid(
    specs: list[RunSpec], jobs: int = 1, progress: bool = True, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Train every run of the grid, ``jobs`` at a time (separate processes, one thread each); one line per run."""
    import torch

    total, done = len(specs), 0
    outcomes: list[dict[str, Any]] = []

    def report(outcome: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        outcomes.append(outcome)
        echo(f"[{done}/{total}] {outcome['name']}: {_describe(outcome)}")
        if outcome.get("traceback"):
            echo(outcome["traceback"].rstrip())

    todo = []
    for spec in specs:
        state = run_state(spec.run_dir, spec.config.train.updates)
        if state in ("finished", "diverged"):
            report({"name": spec.name, "state": state, "status": "skipped", "seconds": 0.0})
        else:
            todo.append(spec)
    if jobs <= 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for spec in todo:
                report(train_run(spec, progress, position=None))
        finally:
            torch.set_num_threads(threads)
        return outcomes
    for outcome in in_worker_processes(_train_in_worker, [(spec, progress) for spec in todo], jobs):
        report(outcome)
    return outcomes

