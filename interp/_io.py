"""Disk helpers shared by every stage: atomic writes (nothing half-written) and file hashes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _temp_beside(target: Path) -> Path:
    """A fresh name beside ``target`` for a file being written: ``.{name}.tmp{pid}-{token}{suffix}``. Hidden,
    carrying the pid (the capture cache sweeps a dead writer's ``.*.tmp*`` names) and the target's suffix
    (writers that pick a format from the file name, such as kaleido, still see ``.png``)."""
    return target.with_name(f".{target.name}.tmp{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to the disk (a rename alone can leave an empty file after a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort (some file systems refuse to sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Call ``write(tmp)`` to write a temporary file beside ``path``, flush it to disk, then rename it into place:
    readers see the old file or the new one, never half of one. The temporary file is removed if anything
    fails (the error is raised as it was). ``fsync=False``: ``write`` flushed the file itself."""
    target = Path(path)
    tmp = _temp_beside(target)
    try:
        write(tmp)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, flush it to disk, then rename it into place;
    the temporary file is removed if the write or the rename fails."""

    def write(tmp: Path) -> None:
        # O_EXCL: never write through a name someone else holds; 0o666 less the umask, as open() would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write, fsync=False)


def _path(value: Any, what: str) -> Path:
    """``value`` as a Path when it is one (a non-empty str or an ``os.PathLike``); an `InterpError` naming the
    argument ``what`` otherwise, rather than pathlib's TypeError from deep inside a call."""
    from interp._errors import InterpError

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        raise InterpError(f"{what}={value!r} is bytes; pass the path as text (a str) or a pathlib.Path")
    if not isinstance(value, str):
        many = " (one path, not a list: call it once per path)" if isinstance(value, (list, tuple, set)) else ""
        raise InterpError(f"{what}={value!r} is of type {type(value).__name__}, not a path{many}; pass a str or a "
                          "pathlib.Path")
    if not value.strip():
        raise InterpError(f"{what} is an empty string; pass a path")
    if "\x00" in value:
        raise InterpError(f"{what}={value!r} holds a NUL character, which no file name can; check the path")
    return Path(value)


def read_json_object(path: Path, *, what: str, writer: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; an `InterpError` naming the file and ``fix`` when it cannot be read as
    ``what`` or holds something other than the object ``writer`` writes (not a traceback from inside json)."""
    import json

    from interp._errors import InterpError

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InterpError(f"'{path}' cannot be read as {what} ({why}); {fix}") from None
    if not isinstance(value, dict):
        raise InterpError(f"'{path}' holds a JSON {type(value).__name__}, not the object {writer} writes; {fix}")
    return value


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

    path = _path(folder, what).expanduser()
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


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What the marker in ``folder`` says (``written_by``, and ``kind`` or ``by`` for the writers that set one),
    or None when there is no readable marker."""
    import json

    try:
        info = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


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
