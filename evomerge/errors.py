"""Exceptions with messages meant for users: each names the culprit (file, model, tensor, field)."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class CheckpointPolicyError(EvomergeError):
    """A checkpoint breaks the loading policy (pickle weights, missing files)."""


class PoolCompatibilityError(EvomergeError):
    """Models in a pool cannot be merged tensor by tensor."""


class ConfigError(EvomergeError):
    """A recipe or config field is invalid."""
