"""References to models and data: ``zoo:NAME`` refs and the cache root.

Every place that turns a recipe's or the command line's reference into a folder goes
through here: ``zoo:NAME`` is ``NAME`` inside the default tiny zoo (the one shipped in zoo/,
else built on first use and cached), anything else is returned as given (a folder, a file, a hub id).

The cache root is ``$EVOMERGE_CACHE``, else the platform's user cache folder; the zoo
lives in ``<cache>/zoo/<key>``, hub sets' local copies in ``<cache>/datasets``.

The zoo package depends on this module (for the cache root); this module reaches the zoo
builder only by name, when a ``zoo:`` ref is first resolved (``ZOO_BUILDER``).
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

ZOO_PREFIX = "zoo:"
ZOO_BUILDER = "evomerge.zoo.build:default_zoo"  # called with no arguments: the shipped zoo, else the default one built


def cache_root() -> Path:
    """``$EVOMERGE_CACHE``, else the user cache folder (``platformdirs``), read on every call."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("EVOMERGE_CACHE", user_cache_dir("evomerge")))


def zoo_cache_dir() -> Path:
    """The folder that holds every built zoo, one subfolder per content key."""
    return cache_root() / "zoo"


def is_zoo_ref(ref: Any) -> bool:
    """A ``zoo:NAME`` ref, or a path inside the zoo cache."""
    if not isinstance(ref, str):
        return False
    if ref.startswith(ZOO_PREFIX):
        return True
    try:
        return Path(ref).resolve().is_relative_to(zoo_cache_dir().resolve())
    except (OSError, ValueError):
        return False


def resolve_path(text: str) -> str:
    """``zoo:NAME`` -> the zoo folder's ``NAME`` (the default zoo is built if missing)."""
    if not text.startswith(ZOO_PREFIX):
        return text
    rel = text[len(ZOO_PREFIX) :].strip("/")
    root = _zoo_root()
    target = root / rel
    if not target.exists():
        raise ConfigError(f"{text}: no '{rel}' in the zoo at {root}")
    return str(target)


@functools.lru_cache(maxsize=1)
def _zoo_root() -> Path:
    module, _, attr = ZOO_BUILDER.partition(":")
    return getattr(importlib.import_module(module), attr)().root
