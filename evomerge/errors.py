"""Exceptions with messages meant for users: each names the culprit (file, model, tensor, field)."""

from __future__ import annotations

import threading

_interrupted = threading.Event()


def note_interrupt(signum: int, frame: object) -> None:
    """SIGINT handler for the CLI: remember the Ctrl-C, then raise as Python's default does.
    CPython drops an exception raised inside a finaliser or a callback ("Exception ignored
    in ..."), so a Ctrl-C landing there would be lost and the command would run to its end;
    long loops call :func:`check_interrupt` at their safe points."""
    _interrupted.set()
    raise KeyboardInterrupt


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was seen, even one that something swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    """Forget an earlier Ctrl-C (each CLI call in one process starts afresh)."""
    _interrupted.clear()


class EvomergeError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class CheckpointPolicyError(EvomergeError):
    """A checkpoint breaks the loading policy (pickle weights, missing files)."""


class PoolCompatibilityError(EvomergeError):
    """Models in a pool cannot be merged tensor by tensor."""


class ConfigError(EvomergeError):
    """A recipe or config field is invalid."""


def check_device(device: object, where: str = "device", available: bool = True) -> object:
    """A torch device this machine can use, or a :class:`ConfigError` naming the field.

    ``available=False`` checks the spelling only (a recipe may be written on one machine
    and run on another); the search and merge check availability where they use it.
    """
    import torch

    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{where}: '{device}' is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{where}: device type '{dev.type}' is not supported (cpu, cuda, cuda:N, mps)")
    if not available:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: '{device}' needs CUDA, which this machine (torch {torch.__version__}) "
                              "does not have; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: '{device}' but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: '{device}' needs Apple MPS, which this machine does not have; use cpu")
    return dev
