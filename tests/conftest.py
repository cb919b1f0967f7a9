"""Shared fixtures: micro random pools saved to tmp folders (seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.testing import save_micro_model


@pytest.fixture
def micro_pool(tmp_path: Path) -> dict[str, Path]:
    """A base and two experts of identical shape, with different random weights."""
    return {
        "base": save_micro_model(tmp_path / "base", seed=0),
        "expert_a": save_micro_model(tmp_path / "expert_a", seed=1),
        "expert_b": save_micro_model(tmp_path / "expert_b", seed=2),
    }
