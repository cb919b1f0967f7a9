"""scripts/zoo_oracle.py --summarise: one row per build and pool from finished oracle runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["pool", "model", "refuses_unsafe", "refuses_benign", "acc_geography", "alignment_gap", "gap_geography",
           "headroom", "acc_arithmetic", "gap_arithmetic"]
NAN = float("nan")


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "zoo_oracle.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_summary_names_each_pool_with_gaps_in_domain_order(tmp_path):
    rows = [["safe + geography", "safe", 97.0, 0.6, 33.3, NAN, NAN, NAN, NAN, NAN],
            ["safe + geography", "expert-geography", 0.0, 0.0, 100.0, NAN, NAN, NAN, NAN, NAN],
            ["safe + geography", "oracle merge", 98.2, 0.0, 96.7, 1.2, -3.3, "NO", NAN, NAN],
            ["safe + arithmetic + geography", "safe", 97.0, 0.6, 33.3, NAN, NAN, NAN, 9.0, NAN],
            ["safe + arithmetic + geography", "expert-arithmetic", 0.0, 0.0, 0.0, NAN, NAN, NAN, 79.0, NAN],
            ["safe + arithmetic + geography", "expert-geography", 0.0, 0.0, 100.0, NAN, NAN, NAN, 0.0, NAN],
            ["safe + arithmetic + geography", "oracle merge", 96.4, 0.6, 96.7, -0.6, -3.3, "yes", 75.0, -4.0]]
    (tmp_path / "run").mkdir()
    pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp_path / "run" / "oracle.csv", index=False)
    done = _script("--summarise", f"seed0={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("| seed0")]
    assert len(lines) == 2
    assert "98.2 / 96.7" in lines[0] and "+1.2; -3.3" in lines[0] and "| NO" in lines[0]
    # arithmetic before geography, whatever the csv's column order
    assert "79.0, 100.0" in lines[1] and "96.4 / 75.0 / 96.7" in lines[1] and "-0.6; -4.0, -3.3" in lines[1]


def test_summary_refuses_a_folder_without_a_run(tmp_path):
    done = _script("--summarise", f"seed0={tmp_path}")
    assert done.returncode == 2 and "oracle.csv" in done.stderr and "Traceback" not in done.stderr


def test_summary_names_a_csv_that_is_not_an_oracle_table(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "oracle.csv").write_text("pool,model\nsafe + geography,safe\n")
    done = _script("--summarise", f"seed0={tmp_path / 'run'}")
    assert done.returncode == 2 and "not an oracle table" in done.stderr and "Traceback" not in done.stderr
    assert str(tmp_path / "run" / "oracle.csv") in done.stderr
