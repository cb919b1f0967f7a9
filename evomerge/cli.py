"""The ``evomerge`` command line: a thin argparse layer over the Python API.

Each subcommand lives in ``evomerge/commands/<name>.py`` and exposes
``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
Errors derived from :class:`~evomerge.errors.EvomergeError` are printed without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from evomerge import __version__, errors
from evomerge.commands import COMMANDS
from evomerge.errors import EvomergeError

VERBOSE_HELP = "debug logging, and the libraries' own progress bars (transformers, the hub)"
QUIET_HELP = "no progress display and no info logging; warnings, errors and the results still print"


def _add_output_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v/--verbose and -q/--quiet, the same on every command and before or after its name
    (a subcommand's copy defaults to SUPPRESS, so it never undoes the top-level flag)."""
    default = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP, **default)
    group.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP, **default)


def _leaf_parsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield sub
                yield from _leaf_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Find safe merges of language models.")
    _add_output_options(parser, top=True)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}",
                        help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    for sub in _leaf_parsers(parser):
        _add_output_options(sub, top=False)
    return parser


def configure_output(verbose: bool = False, quiet: bool = False) -> None:
    """Logging and the progress display for one command (``evomerge.progress``)."""
    from evomerge import progress

    progress.configure(quiet=quiet, verbose=verbose)
    handler = progress.LogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


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
    configure_output(args.verbose, args.quiet)
    errors.clear_interrupt()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, errors.note_interrupt) if in_main else None
    try:
        code = int(args.func(args) or 0)
        errors.check_interrupt()  # a Ctrl-C that something swallowed still ends as one
        return code
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every writer is atomic and run folders checkpoint per generation: nothing to undo
        print("evomerge: interrupted; finished work is saved (a search continues with --resume)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # None: a handler set outside Python, left as it was
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
