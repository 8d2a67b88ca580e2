"""Crash-safe writes used across the project: a JSON file through a temporary file and a rename, and
a folder built beside its final place and renamed into it. What goes into run folders is paths.py's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def atomic_dir(final: Path, build, replace: bool = False) -> Path:
    """Build a folder through ``build(tmp)`` beside ``final`` and rename it into place; with
    ``replace`` False an existing ``final`` is kept as it is (a cache entry).

    A crash leaves either the old folder or the new one, never half of one."""
    final = Path(final)
    if final.is_dir() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _plain(o):
    return float(o) if hasattr(o, "__float__") else str(o)


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename (numpy scalars become floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=_plain))
    tmp.replace(path)
