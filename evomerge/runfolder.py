"""Folders evomerge writes into (search runs, reports, ablations, datagen output): one
mechanism for who may write, what they may be called, and how state is stored.

- :class:`FolderLock`: one writer per folder. An OS-level ``fcntl.flock`` on
  ``<folder>/.evomerge.lock``; the kernel drops it when the holder exits, even on
  ``kill -9``, so a stale lock never blocks a rerun. A second writer is refused with
  "in use by pid N".
- :func:`check_name`: a name that becomes one folder component (recipe ``name``,
  grid-point names): no separators, no ``..``, no leading dot, so a folder never lands
  outside the root it is meant to be in.
- :func:`dumps_state` / :func:`loads_state`: JSON that round-trips floats exactly,
  non-finite ones included; loading it can never execute code (unlike pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError

LOCK_FILE = ".evomerge.lock"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+,-]*")
MAX_NAME = 200


class FolderInUseError(EvomergeError):
    """Another process holds the folder's lock."""


def check_name(name: str, field: str) -> str:
    """Return ``name`` if it is safe as a single folder name, else raise naming ``field``."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{field}: {name!r} cannot be used as a folder name (letters, digits and _ . = + , - only; "
            f"no '/', no '..', no leading dot; at most {MAX_NAME} characters)"
        )
    return name


def check_folder(path: Path, what: str = "folder") -> None:
    """A path that is to be a folder must not be a file (clear error instead of NotADirectoryError)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: is a file, not a {what}")


class FolderLock:
    """Exclusive writer lock on a folder (created if missing), released on close or exit."""

    def __init__(self, folder: str | os.PathLike[str], what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None
        self.created = False  # this lock made the folder: an unused one is removed on release

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        check_folder(self.folder, self.what)
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            self.created = False
            raise FolderInUseError(
                f"{self.folder}: in use by pid {holder} (another evomerge writes this {self.what}); "
                "wait for it to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; a folder this lock created and nothing else wrote to is removed
        (a command that failed before writing leaves no trace)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            if self.created and not folder_entries(self.folder):
                with contextlib.suppress(OSError):
                    (self.folder / LOCK_FILE).unlink()
                    self.folder.rmdir()
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def folder_entries(folder: Path) -> list[str]:
    """What a folder holds besides its lock file (empty when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)


def clear_folder(folder: Path) -> None:
    """Delete everything in ``folder`` but the lock file (held by the caller)."""
    import shutil

    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ----------------------------------------------------------------------------- state as JSON
_FLOAT_TAG = "__float__"


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _encode(value.item())
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_FLOAT_TAG}:
            text = value[_FLOAT_TAG]
            if text not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float tag {text!r}")
            return float(text)
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dumps_state(data: Any) -> str:
    """Strict JSON (no bare NaN) that :func:`loads_state` turns back into equal values."""
    return json.dumps(_encode(data), allow_nan=False, indent=1) + "\n"


def loads_state(text: str) -> Any:
    return _decode(json.loads(text))


def json_safe(data: Any) -> Any:
    """For reports meant for other tools: non-finite floats become ``null`` (valid JSON)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {str(k): json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if hasattr(data, "item") and not isinstance(data, (str, bytes)):
        return json_safe(data.item())
    return data


def dumps_report(data: Any) -> str:
    """``json.dumps`` for summary/report files: strict JSON, non-finite values as null."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False, default=str) + "\n"
