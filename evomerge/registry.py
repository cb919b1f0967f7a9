"""One registry class for everything chosen by name: merge methods, evaluation backends,
prompt sets, proposers, generation backends and judges.

An entry is an object (registered with the decorator or :meth:`Registry.add`) or a lazy
``"module:attr"`` string (:meth:`Registry.add_lazy`), imported on first lookup. Lazy
entries keep optional dependencies (vllm, ray) out of the import graph until used, and
let a table name an implementation without importing its module (no import cycles).
An unknown name fails the same way everywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from evomerge.errors import ConfigError


class LazyEntry(str):
    """``"module:attr"``: what an entry will be, once imported."""

    def load(self) -> Any:
        module, _, attr = self.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
        return obj


class Registry(dict):
    """``@REGISTRY.register("name")`` on a factory; ``REGISTRY.lookup("name")`` to get it."""

    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.kind = kind  # how errors call an entry: "judge", "generation backend"
        for name, target in (lazy or {}).items():
            self.add_lazy(name, target)

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(factory: Any) -> Any:
            self[name] = factory
            return factory

        return deco

    def add(self, name: str, obj: Any) -> Any:
        self[name] = obj
        return obj

    def add_lazy(self, name: str, target: str) -> None:
        """Register ``"module:attr"``, imported when ``name`` is first looked up."""
        if ":" not in target:
            raise ValueError(f"lazy {self.kind} '{name}': expected 'module:attr', got '{target}'")
        dict.__setitem__(self, name, LazyEntry(target))

    def is_loaded(self, name: str) -> bool:
        return name in self and not isinstance(dict.__getitem__(self, name), LazyEntry)

    def __getitem__(self, name: str) -> Any:
        value = dict.__getitem__(self, name)
        if isinstance(value, LazyEntry):
            loaded = value.load()
            # importing the module may have registered the real object under this name already
            current = dict.__getitem__(self, name)
            value = current if not isinstance(current, LazyEntry) else loaded
            dict.__setitem__(self, name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self))})")
        return self[name]
