"""scripts/constraint_drift.py: candidates within a run's safety bar, per generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "constraint_drift.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_counts_candidates_within_the_bar_per_generation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text(json.dumps({"reference": {"bound": 0.2}}))
    ce = [0.1, 0.3, 0.15, 0.25, 0.3, 0.4, 0.5, 0.6]  # 2 generations of 4: 2 then 0 within
    pd.DataFrame({"generation": [0] * 4 + [1] * 4, "ce_safety": ce}).to_parquet(run / "candidates.parquet")
    (run / "summary.json").write_text(json.dumps({"best": {"ce_safety": 0.15, "ce_domain": 0.7}}))
    done = _script(str(run))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if str(run) in x)
    assert "| 2 0 " in line and "2 of 8" in line and "0.150" in line and "True" in line


def test_a_folder_without_a_run_is_named(tmp_path):
    done = _script(str(tmp_path))
    assert done.returncode == 2 and str(tmp_path) in done.stderr and "Traceback" not in done.stderr
