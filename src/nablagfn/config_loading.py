"""Reading a run configuration: YAML ← dotted ``key=value`` overrides ← the model's presets, validated as one tree.

Unknown keys, wrong types, out-of-range values and inconsistent combinations stop with a ``ConfigError`` whose
message names the key; ``MODEL_PRESETS`` holds the defaults that depend on ``model.kind``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import MethodConfig, ModelConfig, RewardConfig, RunConfig
from .errors import ConfigError


def _tag_values(union: Any) -> set[str]:
    """All discriminator values of an annotated union (pydantic puts them in error locations)."""
    values: set[str] = set()
    for member in union.__origin__.__args__:
        for name in ("kind", "name"):
            field = member.model_fields.get(name)
            if field is not None:
                values.update(field.annotation.__args__)
    return values


_TAG_VALUES = _tag_values(ModelConfig) | _tag_values(RewardConfig) | _tag_values(MethodConfig)


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-after"))
        # drop the discriminator tag pydantic inserts (e.g. model.gmm.means → model.means)
        parts = [p for p in key.split(".") if p not in _TAG_VALUES]
        key = ".".join(parts)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_invalid":
            tag = item["ctx"]["discriminator"].strip("'")
            key = f"{key}.{tag}"
            message = f"unknown value {item['ctx']['tag']!r}; choose one of {item['ctx']['expected_tags']}"
        if item["type"] == "extra_forbidden":
            message = "unknown key (see docs/config.md for the valid ones)"
        if re.match(r"^[a-z_]+(\.[a-z_]+)+:", message):
            lines.append(f"  {message}")  # our own validators already name the key
        else:
            lines.append(f"  {key or '<root>'}: {message}")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. method.beta=2.0)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if raw == "":
        return key.split("."), ""
    try:
        return key.split("."), safe_load_unique(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({one_line(error)})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (the last one would win without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` (no Python objects), refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: str | Path, label: str, expected: str) -> dict:
    """A YAML file holding a mapping (empty file: {}), or a ConfigError naming ``label`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{label} {path} does not exist")
    try:
        loaded = safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{label} {path} is not a text file (not UTF-8); it must be YAML") from None
    except OSError as error:
        raise ConfigError(f"{label} {path} cannot be read ({one_line(error)})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{label} {path} is not valid YAML: {one_line(error)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{label} {path} must {expected}")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults ← YAML file ← dotted overrides, validated as one tree."""
    expected = "hold a mapping of sections (model, reward, method, …)"
    tree = {} if path is None else read_yaml_mapping(path, "config file", expected)
    for override in overrides:
        key, value = parse_override(override)
        _set(tree, key, value)
    return validate_config(tree)


#: the model of a config that names none: the built-in digits model
DEFAULT_MODEL = "digits"


#: the reward used when a config names a model but no reward kind
DEFAULT_REWARD = {"gmm": "gaussian", "digits": "classifier", "stable_diffusion": "aesthetic",
                  "stable_diffusion_3": "aesthetic", "flux": "aesthetic"}


#: defaults that depend on model.kind, applied beneath the user's own values (listed in docs/config.md)
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gmm": {},
    "digits": {
        "method": {"beta": 1.0},
        "train": {
            "updates": 200,
            "flow_optimizer": {"lr": 1e-2},
            "trajectories_per_epoch": 32,
            "batch_size": 16,
            "checkpoint_every": 50,
            "eval_every": 50,
            "eval_samples": 300,
        },
    },
    "stable_diffusion": {  # the paper's single-GPU share (configs/sd_aesthetic.yaml), an evaluation sized for images;
        # 2 trajectories per backward pass, not the reference code's 4: at 512 px in bf16 with gradient checkpointing a
        # residual ∇-DB update then peaks at ≈ 14 GB instead of ≈ 23 GB, so it fits a 24 GB GPU (benchmarks/sd_memory.py)
        "train": {
            "updates": 200,
            "trajectories_per_epoch": 64,
            "batch_size": 2,
            "accumulation": 16,
            "policy_optimizer": {"lr": 1e-3, "weight_decay": 1e-4},
            "flow_optimizer": {"lr": 1e-3, "weight_decay": 1e-2},
            "lr_schedule": "constant",
            "checkpoint_every": 20,
            "eval_every": 20,
            "eval_samples": 64,
            "log_every": 1,
        },
    },
}

#: the keys that size a batch: when a config sets one of them, the presets' accumulation is not applied (a preset
#: of 8 under the user's own 4 trajectories per epoch would make an invalid config)
BATCH_KEYS = {"trajectories_per_epoch", "batch_size", "accumulation"}

#: defaults for a reward on a model, beneath the user's values and above the model's: the paper's β and output
#: regularisation λ per reward (its code's scale: losses are element means); ImageReward's λ is not in the paper (HPSv2's)
REWARD_PRESETS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("stable_diffusion", "aesthetic"): {"method": {"beta": 1e4, "output_reg": 1e3}},
    ("stable_diffusion", "hpsv2"): {"method": {"beta": 1e4, "output_reg": 1e2}},
    ("stable_diffusion", "imagereward"): {"method": {"beta": 1e3, "output_reg": 1e2}},
}
# SD3: SD 1.5's settings, a starting point (nothing published for SD3, not yet run on it by this project), with
# 1 trajectory per backward pass and gradient checkpointing: a residual ∇-DB update at 1024 px in bf16 is estimated at
# 20.3 GB with them, 25.9 GB at 2 per pass, 94 GB without checkpointing (benchmarks/sd_memory.py --model sd3)
MODEL_PRESETS["stable_diffusion_3"] = {
    "model": {"gradient_checkpointing": True},
    "train": {**MODEL_PRESETS["stable_diffusion"]["train"], "batch_size": 1, "accumulation": 32},
}
# FLUX: SD3's preset (nothing published or run for FLUX by this project; its 12 B transformer needs more memory still)
MODEL_PRESETS["flux"] = MODEL_PRESETS["stable_diffusion_3"]
REWARD_PRESETS.update({(pipeline, reward): preset for (model, reward), preset in list(REWARD_PRESETS.items())
                       if model == "stable_diffusion" for pipeline in ("stable_diffusion_3", "flux")})


def _with_defaults(defaults: dict, tree: dict) -> dict:
    """``defaults`` deep-merged beneath ``tree`` (the user's values win)."""
    merged = dict(defaults)
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _with_defaults(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_preset(tree: dict, model_kind: str) -> dict:
    """The reward's preset on this model (``REWARD_PRESETS``), then the model's (``MODEL_PRESETS``), each beneath
    what is already there."""
    method = tree.get("method") if isinstance(tree.get("method"), dict) else {}
    method_class = {cls.model_fields["name"].default: cls for cls in MethodConfig.__origin__.__args__}.get(
        method.get("name", "residual_nabla_db")
    )
    reward = tree.get("reward") if isinstance(tree.get("reward"), dict) else {}
    reward_kind = reward.get("kind", DEFAULT_REWARD.get(model_kind, "gaussian"))
    for preset in (REWARD_PRESETS.get((model_kind, reward_kind), {}), MODEL_PRESETS.get(model_kind, {})):
        for section, values in preset.items():
            if section == "method":  # only the keys the chosen method has
                values = {k: v for k, v in values.items() if method_class is not None and k in method_class.model_fields}
            given = tree.get(section) if isinstance(tree.get(section), dict) else {}
            if section == "train" and BATCH_KEYS & set(given):  # the user sized the batches: no preset accumulation
                values = {k: v for k, v in values.items() if k != "accumulation"}
            if values and (section not in tree or isinstance(tree[section], dict)):
                tree[section] = _with_defaults(values, tree.get(section) or {})
    return tree


def validate_config(tree: dict) -> RunConfig:
    tree = dict(tree)
    model = tree.get("model")
    model_kind = model.get("kind", DEFAULT_MODEL) if isinstance(model, dict) else DEFAULT_MODEL
    tree = _apply_preset(tree, model_kind)
    defaults = {"model": ("kind", DEFAULT_MODEL), "method": ("name", "residual_nabla_db")}
    defaults["reward"] = ("kind", DEFAULT_REWARD.get(model_kind, "gaussian"))
    tree.setdefault("reward", {})
    for section, (tag, default) in defaults.items():
        if isinstance(tree.get(section), dict):
            tree[section] = {tag: default, **tree[section]}
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (a dumped config) → flat dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat
