"""Crash-safe writes used across the project: a JSON file through a temporary file and a rename, and
a folder built beside its final place and renamed into it. What goes into run folders is paths.py's."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from preftune.errors import PreftuneError


@contextmanager
def disk_errors(path: Path):
    """A full disk or a refused write becomes one clear error naming ``path`` (torch and safetensors
    otherwise report it as a bare ``unexpected pos`` or ``os error 28``)."""
    try:
        yield
    except Exception as e:
        text = str(e)
        if getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text:
            raise PreftuneError(f"no space left on device while writing {path}; free some space or set "
                                "output_dir (or PREFTUNE_CACHE) to a disk with room") from None
        if getattr(e, "errno", None) in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise PreftuneError(f"cannot write {path}: {e.strerror}; fix its permissions or choose another "
                                "output_dir") from None
        raise


STALE = re.compile(r"\.?.+\.(?:tmp|old)-(\d+)")
"""Temporary names of :func:`atomic_dir` and :func:`write_json` (``.NAME.tmp-PID``, ``.NAME.old-PID``)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path: Path) -> bool:
    """Delete a temporary file or folder whose writing process is gone; return whether it was."""
    m = STALE.fullmatch(path.name)
    if not m or (int(m.group(1)) != os.getpid() and _alive(int(m.group(1)))):
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return True


def atomic_dir(final: Path, build, replace: bool = False) -> Path:
    """Build a folder through ``build(tmp)`` beside ``final`` and rename it into place.

    A crash leaves either the old folder or the new one, never half of one (the half-built
    temporary folder is removed by :func:`clean_stale` at the next start)."""
    final = Path(final)
    if final.is_dir() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with disk_errors(final):
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


def json_default(o):
    """JSON for what json cannot write: numbers (numpy scalars, 0-d tensors) as floats, the rest as text."""
    return float(o) if hasattr(o, "__float__") else str(o)


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON through a temporary file and a rename (numpy scalars become floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_errors(path):
            tmp.write_text(json.dumps(data, indent=1, default=json_default))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
