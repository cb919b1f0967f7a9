"""Run-folder guarantees (issue #17): a run folder cannot run code, has one writer at a
time, refuses changed data on resume, and a failed start leaves nothing that blocks a rerun."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from evomerge import errors
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.runfolder import LOCK_FILE, FolderInUseError, FolderLock, dumps_state, loads_state
from evomerge.search import RunDir, load_search_recipe, recipe_from_dict, run_search

REPO = Path(__file__).resolve().parents[1]


class _Plant:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _recipe(tmp_path: Path, data: dict, **search) -> Path:
    data = data | {"search": data["search"] | search}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_checkpoint_round_trips_non_finite_floats_as_strict_json():
    state = {"a": [1.5, float("inf"), float("-inf")], "b": {"c": float("nan")}, "s": "inf"}
    text = dumps_state(state)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    back = loads_state(text)
    assert back["a"] == [1.5, float("inf"), float("-inf")] and back["b"]["c"] != back["b"]["c"] and back["s"] == "inf"


def test_a_planted_pickle_never_runs(tmp_path, micro_search, capsys):
    """--resume (with or without --run-dir) on a folder holding a crafted checkpoint.pkl
    is refused without unpickling it; the real checkpoint is JSON."""
    path = _recipe(tmp_path, micro_search, steps=1)
    runs = tmp_path / "runs"
    assert cli_main(["search", str(path), "--runs-root", str(runs), "--quiet"]) == 0
    (real,) = runs.iterdir()
    assert json.loads((real / "checkpoint.json").read_text())["format"] == "evomerge-search-checkpoint"
    assert not (real / "checkpoint.pkl").exists()
    # a downloaded folder with a newer name and a malicious pickle
    planted = runs / "micro-20991231-235959"
    planted.mkdir()
    (planted / "recipe.yaml").write_text((real / "recipe.yaml").read_text())
    marker = tmp_path / "pwned"
    (planted / "checkpoint.pkl").write_bytes(pickle.dumps(_Plant(marker)))
    capsys.readouterr()
    assert cli_main(["search", str(path), "--runs-root", str(runs), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pkl" in err and "not loaded" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_tampered_checkpoint_is_refused(tmp_path, micro_search):
    r = recipe_from_dict(micro_search | {"search": {"steps": 1, "popsize": 4}})
    run_search(r, tmp_path / "run", progress=False, write_outputs=False)
    ckpt = tmp_path / "run" / "checkpoint.json"
    data = loads_state(ckpt.read_text())
    data["candidates"][0]["genome"] = data["candidates"][1]["genome"]
    ckpt.write_text(dumps_state(data))
    longer = r.model_copy(update={"search": r.search.model_copy(update={"steps": 2})})
    with pytest.raises(ConfigError, match="does not replay to the recorded genomes"):
        run_search(longer, tmp_path / "run", resume=True, progress=False, write_outputs=False)
    ckpt.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable checkpoint"):
        run_search(longer, tmp_path / "run", resume=True, progress=False, write_outputs=False)


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (f"from evomerge.runfolder import FolderLock; import sys, time; FolderLock({str(folder)!r}).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_writer_per_folder_and_kill_9_frees_it(tmp_path, micro_search, capsys):
    """A second search, --force included, is refused while the first holds the folder;
    the kernel drops the lock when its holder dies."""
    path = _recipe(tmp_path, micro_search, steps=1)
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        for extra in ([], ["--force"], ["--resume"]):
            assert cli_main(["search", str(path), "--run-dir", str(run), "--quiet", *extra]) == 2
            err = capsys.readouterr().err
            assert f"in use by pid {holder.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside the holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli_main(["search", str(path), "--run-dir", str(run), "--quiet"]) == 0


def test_report_ablate_and_datagen_take_the_same_lock(tmp_path, micro_search):
    from datagen.recipe import DatagenRecipe
    from datagen.run import run_datagen
    from evomerge.ablate import Factor, run_ablation

    folder = tmp_path / "busy"
    with FolderLock(folder):
        with pytest.raises(FolderInUseError, match=f"in use by pid {os.getpid()}"):
            run_ablation(_recipe(tmp_path, micro_search), [Factor.parse("lambda=0.5")], folder)
        recipe = DatagenRecipe.model_validate({"name": "d", "pool": {"safe": "x"}, "safety": {"n": 1, "generator": "x", "categories": ["c"]}})
        with pytest.raises(FolderInUseError):
            run_datagen(recipe, "safety", folder)
        held = tmp_path / "held-run"
        with FolderLock(held), pytest.raises(FolderInUseError):
            run_search(load_search_recipe(_recipe(tmp_path, micro_search)), held, progress=False)
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written beside the holder
    assert not folder.exists() and not held.exists()  # a lock that made a folder and wrote nothing removes it


def test_a_failed_start_leaves_nothing_and_the_fixed_command_runs(tmp_path, micro_search, capsys):
    """Bad data: the folder is not left holding only recipe.yaml (which used to block both
    the fixed command and --resume)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    micro_search["data"]["domain"] = {"math": str(bad)}
    path = _recipe(tmp_path, micro_search, steps=1)
    run = tmp_path / "run"
    assert cli_main(["search", str(path), "--run-dir", str(run), "--quiet"]) == 2
    assert "has no 'answer' column" in capsys.readouterr().err
    assert not run.exists()
    # an older evomerge left recipe.yaml alone in the folder: both commands now work
    run.mkdir()
    (run / "recipe.yaml").write_text("name: other\n")
    micro_search["data"]["domain"] = {"math": micro_search["data"]["safety"]}
    path = _recipe(tmp_path, micro_search, steps=1)
    assert cli_main(["search", str(path), "--run-dir", str(run), "--resume", "--quiet"]) == 0
    assert (run / "checkpoint.json").exists()


def test_resume_refuses_data_that_changed(tmp_path, micro_search):
    r = recipe_from_dict(micro_search | {"search": {"steps": 1, "popsize": 4}})
    run_search(r, tmp_path / "run", progress=False, write_outputs=False)
    safety = Path(micro_search["data"]["safety"])
    safety.write_text(safety.read_text().replace("sorry", "SORRY"))
    longer = r.model_copy(update={"search": r.search.model_copy(update={"steps": 2})})
    with pytest.raises(ConfigError, match=r"data.safety \(.*safety.jsonl\) changed since"):
        run_search(longer, tmp_path / "run", resume=True, progress=False, write_outputs=False)
    assert len(RunDir(tmp_path / "run").load_checkpoint().candidates) == 4  # the run is intact


def test_run_dir_that_is_a_file_is_a_clean_error(tmp_path, micro_search, capsys):
    path = _recipe(tmp_path, micro_search, steps=1)
    (tmp_path / "afile").write_text("x")
    assert cli_main(["search", str(path), "--run-dir", str(tmp_path / "afile"), "--quiet"]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err


def test_ctrl_c_is_a_clean_exit_with_an_intact_checkpoint(tmp_path, micro_search):
    micro_search["search"] = {"steps": 200, "popsize": 4}
    path = _recipe(tmp_path, micro_search)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(path), "--run-dir", str(run),
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert RunDir(run).load_checkpoint().generation >= 1


def test_a_ctrl_c_that_a_finaliser_swallows_still_stops_the_command(monkeypatch):
    """CPython prints and drops a KeyboardInterrupt raised inside ``__del__``; the flag the
    CLI's handler sets makes the next safe point (a generation's end) raise it again."""
    monkeypatch.setattr(errors, "_interrupted", threading.Event())

    class Finaliser:
        def __del__(self):
            errors.note_interrupt(signal.SIGINT, None)

    Finaliser()  # collected at once: the KeyboardInterrupt is "ignored" by the interpreter
    with pytest.raises(KeyboardInterrupt):
        errors.check_interrupt()
