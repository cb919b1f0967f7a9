"""The ``evomerge`` command line: a thin argparse layer over the Python API.

Each subcommand lives in ``evomerge/commands/<name>.py`` and exposes
``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
Errors derived from :class:`~evomerge.errors.EvomergeError` are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from evomerge import __version__
from evomerge.commands import COMMANDS
from evomerge.errors import EvomergeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Find safe merges of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    subparsers = parser.add_subparsers(dest="command")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else list(argv)):
        parser.print_help()  # no command: say what there is
        return 2
    # key=value overrides may come after options (``--out DIR search.steps=3``): argparse
    # stops filling a '*' positional at the first option, so collect the rest here
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.error("a command is needed (see the list above)")
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every writer is atomic and run folders checkpoint per generation: nothing to undo
        print("evomerge: interrupted; finished work is saved (a search continues with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
