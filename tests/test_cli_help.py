"""The CLI explains itself: help with no command, --version, and a help line for every option."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge import __version__
from evomerge.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, name: str = "evomerge"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


PARSERS = list(_parsers(build_parser()))


def test_every_command_is_reached():
    names = {n for n, _ in PARSERS}
    assert {"evomerge search", "evomerge zoo build", "evomerge pool check", "evomerge report", "evomerge eval",
            "evomerge audit", "evomerge ablate", "evomerge datagen", "evomerge merge", "evomerge contamination"} <= names


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_option_and_argument_has_help(name, parser):
    missing = [a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help and a.help.strip())]
    assert not missing, f"{name}: no help for {missing}"
    for action in parser._actions:  # every subcommand is described in its parent's list
        if isinstance(action, argparse._SubParsersAction):
            described = {c.dest for c in action._choices_actions if c.help}
            assert described == set(action.choices), f"{name}: commands without help: {set(action.choices) - described}"


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_quiet_and_verbose_on_every_command(name, parser):
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"-q", "--quiet", "-v", "--verbose"} <= options


def test_quiet_and_verbose_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-q", "contamination", "r.yaml"]).quiet
    assert parser.parse_args(["contamination", "r.yaml", "-q"]).quiet
    assert parser.parse_args(["zoo", "build", "-v"]).verbose
    args = parser.parse_args(["search", "r.yaml"])
    assert not args.quiet and not args.verbose


def test_no_command_prints_help_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "evomerge.cli"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode in (0, 2)
    assert "usage: evomerge" in run.stdout and "commands" in run.stdout and "Traceback" not in run.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"evomerge {__version__}"
