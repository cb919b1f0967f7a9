"""Subcommands of the ``evomerge`` CLI; each module exposes ``register(subparsers)``."""

from evomerge.commands import merge as _merge
from evomerge.commands import pool as _pool

COMMANDS = [_pool.register, _merge.register]
