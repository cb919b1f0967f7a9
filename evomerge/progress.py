"""Progress a person can follow: one display for every long command.

    >>> from evomerge import progress
    >>> with progress.task("report table1-zoo", total=18) as rows:
    ...     for label in labels:
    ...         run(label)
    ...         rows.advance(note=label)

Three modes, chosen once by :func:`configure` (the CLI calls it from ``--quiet`` / ``-v``):

- ``rich``: live bars on a terminal (stderr), nested tasks shown together: description,
  bar, ``k/N``, elapsed and remaining time, and a note (the current row, model, stage);
- ``plain``: when stderr is not a terminal (CI logs, files), one line per finished step,
  ``description: [k/N] note (elapsed 1m05s, about 3m10s left)``; tasks with many small
  steps (prompt batches) print at most one line every ``plain_every`` seconds, and always
  their last step;
- ``quiet``: nothing at all.

:func:`silence_libraries` turns off the per-load "Loading weights" bars of transformers,
the hub's download bars and datasets' bars (the CLI does it unless ``-v``). Output goes to
stderr so that the tables a command prints on stdout stay clean.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Literal

Mode = Literal["auto", "rich", "plain", "quiet"]

_mode: Mode = "auto"
_stream: IO[str] | None = None  # None: sys.stderr at the time of writing (tests swap it)
_live: Any = None  # the rich Progress while a task is open in rich mode
_open = 0


def configure(quiet: bool = False, verbose: bool = False, mode: Mode | None = None,
              stream: IO[str] | None = None) -> None:
    """Choose the mode: ``quiet`` silences everything; ``mode`` forces one (tests);
    otherwise ``auto`` (rich on a terminal, plain elsewhere). Library bars are silenced
    unless ``verbose``."""
    global _mode, _stream
    _mode = "quiet" if quiet else (mode or "auto")
    _stream = stream
    if not verbose:
        silence_libraries()


def silence_libraries() -> None:
    """No per-load weight bars, download bars or info chatter from transformers, the hub and
    datasets. Set before they are imported (environment) and applied if they already are."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def mode() -> Mode:
    """The mode in effect now (``auto`` resolved against the current stream)."""
    if _mode != "auto":
        return _mode
    stream = _out()
    return "rich" if getattr(stream, "isatty", lambda: False)() else "plain"


def _out() -> IO[str]:
    return _stream if _stream is not None else sys.stderr


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def log(message: str) -> None:
    """One line (above the live bars in rich mode); nothing when quiet."""
    m = mode()
    if m == "quiet":
        return
    if m == "rich" and _live is not None:
        _live.console.print(message, highlight=False, markup=False)
    else:
        print(message, file=_out(), flush=True)


class LogHandler(logging.Handler):
    """Log records as lines that keep out of the live bars; warnings and errors are written
    even when quiet (the CLI's ``--quiet`` raises the level to WARNING)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
            return
        if _live is not None:
            _live.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=_out(), flush=True)


class Task:
    """One task: ``advance`` after each step, ``note`` to say what runs now."""

    def __init__(self, description: str, total: int | None, completed: int, plain_every: float, show: bool,
                 plain_min: float = 0.0) -> None:
        self.description = description
        self.plain_min = plain_min
        self.total = total
        self.completed = completed
        self.plain_every = plain_every
        self.show = show
        self.started = time.perf_counter()
        self._start_count = completed  # resumed steps do not count towards the speed
        self._last_line = -math.inf
        self._printed_last = False
        self._id: Any = None
        if show and mode() == "rich" and _live is not None:
            self._id = _live.add_task(description, total=total, completed=completed, note="")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        done = self.completed - self._start_count
        if self.total is None or done <= 0:
            return math.nan
        return self.elapsed() / done * max(0, self.total - self.completed)

    def line(self, note: str = "") -> str:
        count = f"[{self.completed}/{self.total}]" if self.total is not None else f"[{self.completed}]"
        timing = f"elapsed {duration(self.elapsed())}"
        left = self.remaining()
        if math.isfinite(left) and self.completed != self.total:
            timing += f", about {duration(left)} left"
        return f"{self.description}: {count}{' ' + note if note else ''} ({timing})"

    def note(self, text: str) -> None:
        """What is running now (shown beside the bar; in plain mode on the next line)."""
        self._note = text
        if self._id is not None:
            _live.update(self._id, note=text)
        elif self.show and mode() == "plain" and self.plain_every == 0:  # a line when each step starts
            count = f"[{self.completed + 1}/{self.total}]" if self.total is not None else f"[{self.completed + 1}]"
            print(f"{self.description}: {count} {text} ...", file=_out(), flush=True)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.completed += n
        if not self.show:
            return
        m = mode()
        if m == "rich" and self._id is not None:
            _live.update(self._id, completed=self.completed, note=note or getattr(self, "_note", ""))
        elif m == "plain":
            now = time.perf_counter()
            last = self.total is not None and self.completed >= self.total
            if self.elapsed() < self.plain_min or (last and self._printed_last):
                return  # a short task prints nothing; the last step prints once
            if last or now - self._last_line >= self.plain_every:
                self._last_line = now
                self._printed_last = last
                print(self.line(note), file=_out(), flush=True)

    def update(self, total: int | None = None, description: str | None = None) -> None:
        if total is not None:
            self.total = total
        if description is not None:
            self.description = description
        if self._id is not None:
            _live.update(self._id, total=self.total, description=self.description)

    def _close(self) -> None:
        if self._id is not None and _live is not None:
            _live.remove_task(self._id)
            self._id = None


def _start_live() -> None:
    global _live
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=_out(), force_terminal=True)
    _live = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                     TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                     console=console, transient=False)
    _live.start()


@contextmanager
def task(description: str, total: int | None = None, completed: int = 0, plain_every: float = 0.0,
         show: bool = True, plain_min: float = 0.0) -> Iterator[Task]:
    """A task for the ``with`` block. ``plain_every``: in plain mode, seconds between lines
    (0: a line per step, and one when each step starts if the caller gives a ``note``);
    ``plain_min``: in plain mode, no line before the task has run this long (a quick task
    stays silent); ``show=False``: count but display nothing (the caller prints its own
    lines). Tasks nest: in rich mode each open task is one bar."""
    global _open, _live
    show = show and mode() != "quiet"
    if show and mode() == "rich" and _live is None:
        _start_live()
    _open += 1
    t = Task(description, total, completed, plain_every, show, plain_min)
    try:
        yield t
    finally:
        if t._id is not None and _open == 1:
            _live.console.print(t.line(), highlight=False, markup=False)  # the bar goes; its last state stays
        t._close()
        _open -= 1
        if _open == 0 and _live is not None:
            _live.stop()
            _live = None


def step(description: str, seconds: float | None = None) -> None:
    """A finished stage of a long command (``zoo: pretrain done in 41.2s``)."""
    log(f"{description}" + (f" done in {duration(seconds)}" if seconds is not None else ""))
