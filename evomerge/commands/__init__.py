"""Subcommands of the ``evomerge`` CLI; each module exposes ``register(subparsers)``."""

from evomerge.commands import ablate as _ablate
from evomerge.commands import contamination as _contamination
from evomerge.commands import datagen as _datagen
from evomerge.commands import evaluate as _evaluate
from evomerge.commands import merge as _merge
from evomerge.commands import pool as _pool
from evomerge.commands import report as _report
from evomerge.commands import search as _search
from evomerge.commands import zoo as _zoo

COMMANDS = [_zoo.register, _datagen.register, _search.register, _merge.register, _pool.register,
            _evaluate.register, _report.register, _ablate.register,
            _contamination.register]
