"""The progress display: plain lines when not on a terminal, nothing when quiet, the same
-q/-v on every command."""

from __future__ import annotations

import io
import logging
import re

import pytest

from evomerge import progress
from evomerge.cli import main


@pytest.fixture(autouse=True)
def _reset():
    yield
    progress.configure(mode=None)  # back to auto for the other tests


def _plain() -> io.StringIO:
    out = io.StringIO()  # not a terminal: auto mode picks plain lines
    progress.configure(stream=out)
    assert progress.mode() == "plain"
    return out


def test_plain_mode_prints_one_line_per_step():
    out = _plain()
    with progress.task("report demo", total=3) as rows:
        for label in ("TIES grid", "TIES domain-only", "lm-cocktail"):
            rows.note(label)
            rows.advance(note=label)
    progress.step("zoo: pretrain", 65.0)
    progress.log("gen   1  evals   18")
    lines = out.getvalue().splitlines()
    assert lines[0] == "report demo: [1/3] TIES grid ..."
    assert re.fullmatch(r"report demo: \[1/3\] TIES grid \(elapsed 0s, about 0s left\)", lines[1])
    assert lines[2] == "report demo: [2/3] TIES domain-only ..."
    assert re.fullmatch(r"report demo: \[3/3\] lm-cocktail \(elapsed 0s\)", lines[5])  # no time left at the end
    assert lines[6:] == ["zoo: pretrain done in 1m05s", "gen   1  evals   18"]


def test_plain_mode_throttles_many_small_steps_and_keeps_the_last():
    out = _plain()
    with progress.task("safe: answers", total=700, plain_every=3600) as answered:
        for _ in range(11):
            answered.advance(64 if answered.completed + 64 <= 700 else 700 - answered.completed)
        answered.advance(700 - answered.completed)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("safe: answers: [64/700]")
    assert lines[1].startswith("safe: answers: [700/700]")


def test_a_quick_task_with_plain_min_prints_nothing():
    out = _plain()
    with progress.task("x: answers", total=2, plain_min=60) as t:
        t.advance(2)
    assert out.getvalue() == ""


def test_remaining_time_from_the_speed_of_this_run():
    task = progress.Task("t", total=10, completed=4, plain_every=0, show=False)
    task.started -= 6.0  # 6 s for 0 new steps: unknown
    assert "left" not in task.line()
    task.advance(2)  # 2 steps in 6 s: 4 left -> 12 s
    assert "about 12s left" in task.line()


def test_durations():
    assert [progress.duration(s) for s in (0.4, 42, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_quiet_is_silent_and_log_lines_go_through_the_handler():
    out = io.StringIO()
    progress.configure(quiet=True, stream=out)
    with progress.task("report", total=2) as t:
        t.note("a")
        t.advance()
        progress.log("nothing")
        progress.step("zoo: stage", 1.0)
    assert out.getvalue() == ""
    progress.configure(stream=out)
    handler = progress.LogHandler()
    handler.emit(logging.LogRecord("evomerge", logging.WARNING, __file__, 1, "careful", None, None))
    assert out.getvalue() == "careful\n"


def test_libraries_are_silenced():
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled

    progress.configure()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert are_progress_bars_disabled()
    assert transformers.utils.logging.get_verbosity() == logging.ERROR


def test_quiet_command_prints_no_progress_and_no_log(tmp_path, capsys):
    """A small command (the micro zoo): its stages on stderr; with -q, after or before the
    command, nothing on stderr (the cache hit's info line is gone too), the result on stdout."""
    out = tmp_path / "zoo"
    assert main(["zoo", "build", "--micro", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "zoo build: [1/" in err and "tokenizer done in" in err and "card done in" in err
    assert main(["zoo", "build", "--micro", "--out", str(out)]) == 0
    assert "zoo cache hit" in capsys.readouterr().err
    for argv in (["zoo", "build", "--micro", "--out", str(out), "-q"], ["-q", "zoo", "build", "--micro", "--out", str(out)]):
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        assert f"zoo: {out}" in captured.out  # the result itself still prints
