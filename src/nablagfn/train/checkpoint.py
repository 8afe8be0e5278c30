"""Checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

Layout of ``RUN_DIR/checkpoints/update_000500/``:
  model.safetensors         the policy adapter (``policy.*``) and the method's networks (``method.*``)
  optimizers.safetensors    every optimiser's state tensors
  shard_000.safetensors …   per data shard: its RNG state and the trajectories carried to the next epoch
  state.json                counters, optimiser hyper-parameters, epoch position
A checkpoint directory is first written under a temporary name and then renamed,
so a crash while saving leaves the previous checkpoints intact. With several training processes, each writes its
own shards into the staging directory and one process writes the rest and renames it (the directory must be on a
file system that every process sees).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..files import fsync_directory, strict_json


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = name + "."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("update_"))


def staging_directory(run_dir: Path, update: int) -> Path:
    """Where the checkpoint of ``update`` is written before it is renamed into place."""
    return Path(run_dir) / "checkpoints" / f".tmp_update_{update:07d}"


def _write_failed(path: Path, error: BaseException) -> str:
    detail = " ".join(str(error).split()) or type(error).__name__
    return (f"writing checkpoint file {path} failed ({detail}); the previous checkpoints are intact: free space or fix "
            "the directory, then resume with --resume")


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``save_file`` with a full disk or an unwritable directory as a one-line CheckpointError."""
    try:
        save_file(tensors, path)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(_write_failed(path, error)) from None


def start_checkpoint(run_dir: Path, update: int) -> Path:
    """Create an empty staging directory for the checkpoint of ``update`` (by one process)."""
    staging = staging_directory(run_dir, update)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_shard(staging: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """The state of one data shard (its RNG state and the trajectories it carries to the next epoch)."""
    _save(staging / f"shard_{index:03d}.safetensors", {k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def finish_checkpoint(
    staging: Path,
    update: int,
    modules: dict[str, nn.Module | dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict,
    keep: int,
) -> Path:
    """Write the networks, optimisers and counters into ``staging`` (after every shard), rename it into place and
    keep the last ``keep`` checkpoints (by one process)."""
    model = {}
    for prefix, module in modules.items():
        items = module.state_dict() if isinstance(module, nn.Module) else module
        model.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in items.items()})
    _save(staging / "model.safetensors", model)
    optimizer_tensors, optimizer_meta = {}, {}
    for name, optimizer in optimizers.items():
        t, meta = _optimizer_tensors(name, optimizer)
        optimizer_tensors.update({k: v.cpu() for k, v in t.items()})
        optimizer_meta[name] = meta
    _save(staging / "optimizers.safetensors", optimizer_tensors)
    checksums = {path.name: file_sha256(path) for path in sorted(staging.glob("*.safetensors"))}
    try:
        (staging / "state.json").write_text(
            strict_json({**state, "optimizers": optimizer_meta, "sha256": checksums}, indent=1)
        )
    except OSError as error:
        raise CheckpointError(_write_failed(staging / "state.json", error)) from None
    for path in staging.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    final = staging.parent / f"update_{update:07d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    fsync_directory(staging.parent)
    for old in list_checkpoints(staging.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


#: what an unreadable checkpoint's error suggests
_ELSEWHERE = ("move this checkpoint directory away to resume from the previous one, or pick another with "
              "--checkpoint (sample, eval)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file of a checkpoint; CheckpointError naming the file if it cannot be read."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:  # truncated, garbage, unreadable
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({type(error).__name__}: {detail}); {_ELSEWHERE}"
        ) from None


def _read_state_json(path: Path) -> dict:
    """The counters of a checkpoint's state.json; CheckpointError naming the file if it cannot be read."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name} (incomplete or not a checkpoint)")
    try:
        state = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(error).__name__}: {error}); "
                              f"{_ELSEWHERE}") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint file {path} holds a JSON {type(state).__name__}, not an object; {_ELSEWHERE}"
        )
    return state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint's state.json, after checking that its update matches its directory's name and that every file
    it lists still has the checksum recorded when it was written (checkpoints older than the checksums: names only)."""
    checkpoint = Path(checkpoint)
    state = _read_state_json(checkpoint / "state.json")
    name = checkpoint.name.removeprefix("update_")
    if name.isdigit() and state.get("update") != int(name):
        raise CheckpointError(f"checkpoint {checkpoint} says it is update {state.get('update')!r} in state.json, not "
                              f"{int(name)} as its name says; {_ELSEWHERE}")
    checksums = state.get("sha256", {})
    if not isinstance(checksums, dict):
        raise CheckpointError(f"checkpoint file {checkpoint / 'state.json'}: sha256 is not a mapping; {_ELSEWHERE}")
    for file_name, expected in checksums.items():
        path = checkpoint / str(file_name)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} lacks {file_name}, which it was written with; {_ELSEWHERE}")
        if file_sha256(path) != expected:
            raise CheckpointError(f"checkpoint file {path} has changed since it was written (its SHA-256 differs "
                                  f"from state.json's: corrupted?); {_ELSEWHERE}")
    return state


def load_model_tensors(checkpoint: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The policy adapter's and the method's tensors (``policy.*``, ``method.*``) of a checkpoint, verified first
    (``verify=False``: the caller has just run ``verify_checkpoint``)."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no model.safetensors (incomplete or not a checkpoint)")
    if verify:
        verify_checkpoint(checkpoint)
    return _read_tensors(path)


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def load_training_state(checkpoint: Path, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore the optimisers in place; return the contents of state.json."""
    checkpoint = Path(checkpoint)
    state_path, tensors_path = checkpoint / "state.json", checkpoint / "optimizers.safetensors"
    state = _read_state_json(state_path)
    if not tensors_path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {tensors_path.name} (incomplete or not a checkpoint)")
    optimizer_tensors = _read_tensors(tensors_path)
    for name, optimizer in optimizers.items():
        meta = state.get("optimizers")
        if not isinstance(meta, dict) or name not in meta:
            raise CheckpointError(f"checkpoint file {state_path} has no optimiser state for {name!r} "
                                  "(written by another method or version?)")
        try:
            _restore_optimizer(name, optimizer, optimizer_tensors, meta[name])
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {checkpoint}: the {name!r} optimiser state in {tensors_path.name} and {state_path.name} "
                f"does not fit this run ({type(error).__name__}: {error})"
            ) from None
    return state


def load_shard(checkpoint: Path, index: int) -> dict[str, torch.Tensor]:
    """The state of data shard ``index`` (see ``write_shard``)."""
    path = Path(checkpoint) / f"shard_{index:03d}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no {path.name}: it was written with fewer data shards "
                              "(train.data_shards) than this run has, or is incomplete")
    return _read_tensors(path)
