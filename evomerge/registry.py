"""A name -> factory table with a decorator to fill it and a lookup that names the culprit.

Generation backends and judges are chosen by name in recipes and on the command line;
both use this, so an unknown name fails the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evomerge.errors import ConfigError


class Registry(dict):
    """``@REGISTRY.register("name")`` on a factory; ``REGISTRY.lookup("name")`` to get it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind  # how errors call an entry: "judge", "generation backend"

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            self[name] = factory
            return factory

        return deco

    def lookup(self, name: str) -> Callable[..., Any]:
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self))})")
        return self[name]
