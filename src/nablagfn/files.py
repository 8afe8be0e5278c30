"""Writing files so that a crash, a kill or a full disk never leaves one half-written, and JSON that strict parsers read.

``atomic_write_text`` writes a temporary file beside the target, flushes it to disk, renames it over the target and
flushes the directory: a reader sees the old file or the new one, never a mix. ``strict_json`` writes non-finite
numbers as null (JSON has no NaN or infinity).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the platform allows."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf), however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON text that strict parsers accept: non-finite numbers become null."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)
