"""One config loader for every recipe type (search, merge, datagen, report): YAML files,
``key=value`` overrides and validation whose errors name the field and the file.

    >>> data = load_overridden("recipes/demo.yaml", ["search.steps=3"])
    >>> recipe = validate_mapping(SearchRecipe, data, "recipes/demo.yaml")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError


def validate_mapping(model: type[BaseModel], data: Any, source: str) -> Any:
    """``model.model_validate(data)``; every error names the field by its dotted path and
    the source (file) it came from, as one :class:`ConfigError`. Shared by every recipe type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top)"
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" + (" (unknown field)" if e["type"] == "extra_forbidden" else ""))
        raise ConfigError(f"{source}: " + "; ".join(parts)) from None


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file; errors name the file."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in a nested mapping (a copy); a bad key is named."""
    out = yaml.safe_load(yaml.safe_dump(data, sort_keys=False))  # deep copy, key order kept
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (for example search.steps=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty name in '{key}'")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[: depth + 1])}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def load_overridden(path: str | os.PathLike[str], overrides: list[str] | None) -> dict[str, Any]:
    """A recipe file's mapping with ``key=value`` overrides applied."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_overrides(data, overrides or [])
