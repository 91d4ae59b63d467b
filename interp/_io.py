"""Disk helpers shared by every stage: atomic writes (nothing half-written) and file hashes."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---- output folders: never overwrite what the workbench did not write ---------------------------------
OUTPUT_MARKER = ".interp-output.json"  # written into every folder the workbench writes a run into
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def usable_folder(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """``folder`` as a Path if it is, or can be made, a writable folder (not a file, not in /proc, /sys or
    /dev); an `InterpError` saying why not otherwise. Writes nothing."""
    from interp._errors import InterpError

    path = Path(folder).expanduser()
    resolved = path.resolve()
    if any(str(resolved) == r or str(resolved).startswith(r + "/") for r in _SYSTEM_ROOTS):
        raise InterpError(f"{what} '{folder}' is inside a system folder ({resolved}); choose a folder of your own")
    if path.exists() and not path.is_dir():
        raise InterpError(f"{what} '{folder}' is a file, not a folder; choose a new or empty folder")
    parent = next((a for a in (resolved, *resolved.parents) if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InterpError(f"{what} '{folder}' cannot be created or written: '{parent}' is not a writable folder")
    return path


def has_marker(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` carries the workbench's output marker (the workbench made it)."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def mark_folder(folder: str | os.PathLike, *, what: str = "output folder", **info: object) -> Path:
    """Create ``folder`` (and parents) and write the workbench's marker into it, unless it is there already."""
    import json
    import time

    from interp._errors import InterpError

    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not has_marker(path):
            atomic_write_text(path / OUTPUT_MARKER, json.dumps({"written_by": "interp", **info, "created":
                                                                time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    except OSError as e:
        raise InterpError(f"{what} '{folder}' cannot be written ({e.strerror or e}); choose another folder") from None
    return path


def shown(names: list[str], k: int = 4) -> str:
    """The first ``k`` of ``names``, quoted, with a count of the rest: for error messages."""
    out = ", ".join(f"'{n}'" for n in names[:k])
    return out + (f" and {len(names) - k} more" if len(names) > k else "")


# ---- host memory --------------------------------------------------------------------------------------
@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (other C libraries and systems)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc raises its mmap threshold after the first large free, so
    shard-sized buffers freed by a streaming reader stay in the process (RSS grew by 5x the bound of the
    streaming benchmark without this); ``malloc_trim(0)`` returns them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
