"""Subcommands of the ``evomerge`` CLI; each module exposes ``register(subparsers)``."""

from evomerge.commands import pool as _pool

COMMANDS = [_pool.register]
