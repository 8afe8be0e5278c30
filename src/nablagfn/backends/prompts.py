"""Prompt tables of text-to-image backends: a built-in list or a file, with a deterministic held-out split.

Sources (``model.prompts.source``):
* ``animals``: the 45 simple animal names of DDPO's aesthetic experiment, also used by Nabla-GFlowNet
  (stored in ``nablagfn/data/animals.txt``);
* a list of prompts (from Python or YAML);
* a ``.txt`` file (one prompt per line, blank lines skipped), a ``.json`` file (a list of strings) or a
  ``.csv`` file (the column ``model.prompts.column``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from ..config_base import StrictConfig
from ..errors import ConfigError


class PromptsConfig(StrictConfig):
    """Where prompts come from: ``animals`` (45 built-in names) or a file (.txt one per line, .json list, .csv)."""

    source: str | list[str] = Field("animals", description="animals, a prompt file, or the prompts themselves (a list)")
    column: str = Field("prompt", description="CSV column holding the prompt")
    held_out: float = Field(0.0, ge=0, lt=1, description="fraction of prompts kept for evaluation only")
    seed: int = Field(0, description="seed of the held-out split")


#: built-in prompt lists: name → file in nablagfn/data
BUILTIN_PROMPTS = {"animals": "animals.txt"}
SOURCE_KEY = "model.prompts.source"


@dataclass(frozen=True)
class PromptTable:
    """Prompts (conditioning id i means ``prompts[i]``) and the ids of the training and held-out splits."""

    prompts: list[str]
    train_ids: Tensor  # long, sorted
    eval_ids: Tensor  # long, sorted; the training ids when nothing is held out

    def draw(self, num: int, generator: torch.Generator, split: str = "train") -> Tensor:
        """``num`` ids drawn uniformly (with replacement) from the ``train`` or held-out ``eval`` split."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        ids = self.train_ids if split == "train" else self.eval_ids
        return ids[torch.randint(len(ids), (num,), generator=generator)]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _csv_prompts(text: str, source: str, column: str) -> list[str]:
    """The non-empty values of ``column`` in CSV ``text``; ConfigError naming the file for malformed CSV."""
    try:
        reader = csv.DictReader(text.splitlines(), strict=True)
        if column not in (reader.fieldnames or []):
            raise ConfigError(
                f"model.prompts.column: {source!r} has no column {column!r} "
                f"(its columns: {', '.join(reader.fieldnames or []) or 'none'})"
            )
        return [row[column].strip() for row in reader if (row[column] or "").strip()]
    except csv.Error as error:
        raise ConfigError(f"{SOURCE_KEY}: {source!r} is not valid CSV (line {reader.line_num}: {error})") from None


def read_prompts(source: str, column: str = "prompt") -> list[str]:
    """The prompts of a built-in list or a .txt / .json / .csv file; ConfigError if none can be read."""
    if source in BUILTIN_PROMPTS:
        prompts = _lines(resources.files("nablagfn").joinpath("data", BUILTIN_PROMPTS[source]).read_text("utf-8"))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{SOURCE_KEY}: prompt file {source!r} not found; use a built-in list "
                f"({', '.join(BUILTIN_PROMPTS)}) or a .txt, .json or .csv file"
            )
        suffix = path.suffix.lower()
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{SOURCE_KEY}: {source!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8"
            ) from None
        except OSError as error:
            raise ConfigError(f"{SOURCE_KEY}: prompt file {source!r} could not be read ({error.strerror})") from None
        if suffix == ".txt":
            prompts = _lines(text)
        elif suffix == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{SOURCE_KEY}: {source!r} is not valid JSON ({error})") from None
            if not isinstance(loaded, list) or not all(isinstance(p, str) for p in loaded):
                raise ConfigError(f"{SOURCE_KEY}: {source!r} must hold a JSON list of strings")
            prompts = [p.strip() for p in loaded if p.strip()]
        elif suffix == ".csv":
            prompts = _csv_prompts(text, source, column)
        else:
            raise ConfigError(f"{SOURCE_KEY}: {source!r} has an unknown extension; use .txt, .json or .csv")
    if not prompts:
        raise ConfigError(f"{SOURCE_KEY}: {source!r} holds no prompts")
    return prompts


def split_held_out(num: int, held_out: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train ids, held-out ids): a seeded random ``held_out`` fraction (at least one prompt when > 0) is held out."""
    all_ids = torch.arange(num)
    if held_out == 0:
        return all_ids, all_ids
    num_held_out = max(1, round(held_out * num))
    if num_held_out >= num:
        raise ConfigError(
            f"model.prompts.held_out: {held_out} of {num} prompt(s) leaves none for training; lower it or add prompts"
        )
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return order[num_held_out:].sort().values, order[:num_held_out].sort().values


def build_prompt_table(config) -> PromptTable:
    """The prompt table of a ``PromptsConfig``."""
    if isinstance(config.source, list):
        if not config.source or not all(isinstance(p, str) and p.strip() for p in config.source):
            raise ConfigError(f"{SOURCE_KEY}: a list of prompts must hold at least one non-empty string")
        prompts = [p.strip() for p in config.source]
    else:
        prompts = read_prompts(config.source, config.column)
    train_ids, eval_ids = split_held_out(len(prompts), config.held_out, config.seed)
    return PromptTable(prompts, train_ids, eval_ids)
