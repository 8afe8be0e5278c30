"""Finding reward-model weights: a local path first, then the Hugging Face hub.

Every weight source is one config string: a local file or directory, or a hub
reference. Files on the hub are written ``owner/repo:filename``; whole model
directories (transformers ``from_pretrained``) by their hub id. When neither is
available the error names the missing file and the config key to set.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 is set, so the hub was not tried"
    return "the hub could not be reached or does not have it"


def resolve_file(source: str, key: str) -> Path:
    """A local file path for ``source`` (local path, or ``owner/repo:filename`` downloaded from the hub)."""
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if ":" not in source or local.exists():
        raise ConfigError(
            f"{key}: weights file {source!r} not found. Download it and set {key}=/path/to/file "
            "(or a hub reference owner/repo:filename)"
        )
    repo_id, filename = source.split(":", 1)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # offline, missing repo or file, no network
        raise ConfigError(
            f"{key}: weights file {filename!r} from hub repo {repo_id!r} is not available locally and "
            f"{offline_hint()} ({type(error).__name__}). Download it and set {key}=/path/to/{filename}"
        ) from None


#: what a tokenizer needs from a hub repository (not its multi-GB weights)
TOKENIZER_FILES = ("*.json", "*.txt", "*.model")
#: what a transformers model needs from a hub repository: configs, tokenizer files, safetensors weights
MODEL_FILES = ("*.json", "*.txt", "*.safetensors")


def resolve_dir(
    source: str, key: str, required: tuple[str, ...] = ("config.json",), allow_patterns: tuple[str, ...] | None = None
) -> str:
    """A ``from_pretrained`` source: a local directory holding ``required``, or a hub id available offline/online.

    ``allow_patterns`` limits what is fetched from the hub (e.g. ``TOKENIZER_FILES`` for a tokenizer)."""
    local = Path(source).expanduser()
    if local.is_dir():
        missing = [name for name in required if not (local / name).exists()]
        if missing:
            raise ConfigError(f"{key}: directory {str(local)!r} lacks {', '.join(missing)}; point {key} at a model directory")
        return str(local)
    if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"{key}: model directory {source!r} not found. Set {key}=/path/to/model (or a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, allow_patterns=list(allow_patterns) if allow_patterns else None)
    except Exception as error:
        raise ConfigError(
            f"{key}: model {source!r} is not available locally and {offline_hint()} ({type(error).__name__}). "
            f"Download it (e.g. `hf download {source}`) and set {key}=/path/to/its/directory"
        ) from None
