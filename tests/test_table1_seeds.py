"""scripts/table1_seeds.py: Table 1 rows over zoo seeds (mean +- half the range)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "search", "model", "alignment", "over_refusal", "acc_geography"]


def _run(tmp_path: Path, name: str, rows: list[list]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "table1.csv", index=False)
    return folder


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "table1_seeds.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_rows_matched_across_runs_with_mean_and_half_range(tmp_path):
    a = _run(tmp_path, "a", [["-", "pool", "safe", 99.0, 1.0, 30.0], ["ties", "safety-aware", "ties-safety-aware", 95.0, 0.0, 70.0],
                             ["ties", "domain-only", "ties-domain-only", 30.0, 0.0, 100.0]])
    b = _run(tmp_path, "b", [["-", "pool", "safe", 98.0, 3.0, 10.0], ["ties", "safety-aware", "ties-safety-aware", 97.0, 2.0, 30.0]])
    done = _script(f"s0={a}", f"s1={b}", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "out" / "seeds.csv").fillna("")
    assert list(table["search"]) == ["pool", "safety-aware"]  # domain-only is missing from run b: left out
    safe, searched = table.iloc[0], table.iloc[1]
    assert safe["alignment"] == "98.5 +- 0.5" and safe["alignment per run"] == "99.0 / 98.0"
    assert searched["acc_geography"] == "50.0 +- 20.0" and searched["over_refusal"] == "1.0 +- 1.0"
    assert (tmp_path / "out" / "seeds.md").read_text().startswith("mean +- half the range over s0 / s1")


def test_a_folder_without_a_report_is_named_with_exit_2(tmp_path):
    done = _script(f"s0={tmp_path}", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "table1.csv: no such file" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    done = _script("no-label", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "expected LABEL=FOLDER" in done.stderr
