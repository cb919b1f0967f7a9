"""Atomic filesystem writes: a failure never leaves a half-written folder or file behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings left by a killed
    writer (its pid is gone); a live writer's are left alone."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-.+")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def check_replaceable(target: Path, protected: list[Path] = ()) -> None:
    """Refuse an output folder whose replacement would destroy something else: the current
    folder or one above it, or a folder that is or holds one of ``protected`` (inputs)."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise EvomergeError(f"output folder '{target}' is the current folder or above it; choose a new folder")
    if not target.name or target.name in (".", ".."):
        raise EvomergeError(f"output folder '{target}' must be a named folder, not '.' or '..'")
    for path in protected:
        p = Path(path).resolve()
        if p == resolved or resolved in p.parents:
            raise EvomergeError(f"output folder '{target}' is or holds the input '{path}'; replacing it "
                                "would destroy the input: choose another --out")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], overwrite: bool = False,
                     protected: list[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder that is renamed to ``target`` only on success.

    The temporary folder lives next to ``target`` so the final rename stays on one
    filesystem (and is therefore atomic). On any exception it is deleted; one left by a
    killed process (``kill -9``) is deleted by the next write to the same target. The
    folder gets the umask's permissions, like any folder the user makes.
    """
    target = Path(target)
    check_replaceable(target, list(protected))
    if target.exists() and not overwrite:
        raise EvomergeError(f"{target} already exists; refusing to overwrite it")
    if target.exists() and not target.is_dir():
        raise EvomergeError(f"{target} is a file; an output folder cannot replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report is as readable as any file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save_figure(fig, path: str | os.PathLike[str]) -> None:
    """Save a matplotlib figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one ``{"a.b.c": leaf}`` mapping (recipe diffs, tracker params)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


_SKIP_FILES = {"README.md", "model.safetensors.index.json", "config.json"}
_COPY_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """A model folder's tokenizer, generation config and chat template files (not its
    weights, index, config.json or model card), copied from ``src`` into ``dst``."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _SKIP_FILES and path.suffix in _COPY_SUFFIXES:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
