"""Fuzz-style sweep over broken model folders (issue #17): for every case, ``pool check``
and ``merge`` exit 2 with a message naming the culprit, print no traceback and leave
nothing behind. Micro models; each case is a copy edited one way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main as cli_main

TENSOR = "model.layers.0.mlp.up_proj.weight"


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _edit(folder: Path, edit) -> None:
    state = load_file(_weights(folder))
    edit(state)
    save_file(state, _weights(folder), metadata={"format": "pt"})


def _set(name: str, fn):
    return lambda s: s.__setitem__(name, fn(s[name]))


def _truncate(folder: Path) -> None:
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[: len(data) // 2])


def _garbage_header(folder: Path) -> None:
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(b"\xff" * 16 + data[16:])


def _auto_map(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config"}
    (folder / "config.json").write_text(json.dumps(cfg))


def _sharded_with_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {TENSOR: "model-00002-of-00002.safetensors"}}))


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(_weights(folder)), folder / "pytorch_model.bin")
    _weights(folder).unlink()


# (model edited, edit, text the error must contain besides the model's path)
CASES = {
    "truncated": ("expert_a", _truncate, "cannot be read"),
    "corrupted-header": ("base", _garbage_header, "cannot be read"),
    "empty-file": ("expert_b", lambda f: _weights(f).write_bytes(b""), "cannot be read"),
    "wrong-dtype": ("expert_b", _set(TENSOR, lambda t: t.to(torch.int64)), f"dtype mismatch in tensor '{TENSOR}'"),
    "nan": ("expert_a", _set(TENSOR, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "NaN"),
    "inf": ("base", _set(TENSOR, lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))), "Inf"),
    "shape": ("expert_a", _set(TENSOR, lambda t: t[:-1].clone()), f"shape mismatch in tensor '{TENSOR}'"),
    "extra-tensor": ("expert_a", lambda s: None, "extra tensor"),
    "missing-config": ("base", lambda f: (f / "config.json").unlink(), "no config.json"),
    "bad-config-json": ("expert_b", lambda f: (f / "config.json").write_text("{oops"), "not valid JSON"),
    "custom-code": ("expert_a", _auto_map, "custom model code"),
    "missing-weights": ("expert_b", lambda f: _weights(f).unlink(), "no weights found"),
    "missing-shard": ("expert_a", _sharded_with_missing_shard, "model-00002-of-00002.safetensors"),
    "pickle-only": ("expert_b", _pickle_only, "only pickle weights"),
}
STATE_EDITS = {"wrong-dtype", "nan", "inf", "shape"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    from evomerge.testing import save_micro_model

    root = tmp_path_factory.mktemp("pristine")
    return {name: save_micro_model(root / name, seed=i) for i, name in enumerate(("base", "expert_a", "expert_b"))}


def _broken(case: str, pristine: dict[str, Path], root: Path) -> tuple[dict[str, Path], Path]:
    pool = {name: Path(shutil.copytree(path, root / name)) for name, path in pristine.items()}
    model, edit, _ = CASES[case]
    if case == "extra-tensor":
        _edit(pool[model], lambda s: s.__setitem__("model.extra.bias", torch.zeros(3)))
    elif case in STATE_EDITS:
        _edit(pool[model], edit)
    else:
        edit(pool[model])
    return pool, pool[model]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_clean_refusal(rc: int, err: str, culprit: Path, needle: str) -> None:
    assert rc == 2, err
    # progress lines may come first (stderr, one per step when not a terminal); then the error
    assert "Traceback" not in err and "\nevomerge: error:" in "\n" + err, err
    assert needle in err, err
    assert str(culprit) in err or f"'{culprit.name}'" in err or culprit.name in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_pool_check_and_merge_refuse_cleanly(case, pristine, tmp_path, capsys):
    pool, culprit = _broken(case, pristine, tmp_path)
    needle = CASES[case][2]
    rc = cli_main(["pool", "check", str(pool["base"]), str(pool["expert_a"]), str(pool["expert_b"])])
    _assert_clean_refusal(rc, capsys.readouterr().err, culprit, needle)

    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(pool["base"]), "experts": {"expert_a": str(pool["expert_a"]), "expert_b": str(pool["expert_b"])},
        "method": "task_arithmetic", "genome": {"weights": {"expert_a": 0.5, "expert_b": 0.5}}}))
    before = _listing(tmp_path)
    rc = cli_main(["merge", str(recipe), "--out", str(tmp_path / "merged")])
    _assert_clean_refusal(rc, capsys.readouterr().err, culprit, needle)
    assert _listing(tmp_path) == before  # nothing half-written, no hidden temp folder


@pytest.mark.parametrize("case", ["nan", "truncated", "missing-config", "custom-code", "pickle-only"])
def test_search_refuses_cleanly(case, pristine, tmp_path, micro_search, capsys):
    pool, culprit = _broken(case, pristine, Path(tmp_path / "broken"))
    micro_search["pool"] = {"base": str(pool["base"]),
                            "experts": {"a": str(pool["expert_a"]), "b": str(pool["expert_b"])}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(micro_search))
    rc = cli_main(["search", str(path), "--runs-root", str(tmp_path / "runs"), "--quiet"])
    _assert_clean_refusal(rc, capsys.readouterr().err, culprit, CASES[case][2])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_search_whose_every_candidate_is_non_finite_fails_and_writes_no_model(tmp_path, micro_search, capsys):
    """Finite but huge heads overflow every merge's logits: exit 2, no best genome, no model/."""
    for name in ("a", "b"):
        _edit(Path(micro_search["pool"]["experts"][name]),
              _set("lm_head.weight", lambda t: torch.full_like(t, 1e38)))
    micro_search |= {"merge": {"method": "task_arithmetic", "fused": False}, "write_model": True,
                     "search": {"mode": "grid", "grid": {"weights": [1.0]}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(micro_search))
    run = tmp_path / "run"
    rc = cli_main(["search", str(path), "--run-dir", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable candidate" in err and "Traceback" not in err
    assert (run / "candidates.parquet").exists()  # the record of what was tried is kept
    assert not (run / "best_genome.yaml").exists() and not (run / "model").exists()


# ----------------------------------------------------------------------------- odd paths
@pytest.mark.parametrize("name", ["../../x", "/abs/x", ".hidden", "a/b", ""])
def test_recipe_names_cannot_leave_the_runs_root(name, tmp_path, micro_search, capsys):
    from datagen.recipe import datagen_recipe_from_dict
    from evomerge.errors import ConfigError
    from evomerge.report import ReportRecipe
    from evomerge.search import recipe_from_dict

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(micro_search | {"name": name}))
    assert cli_main(["search", str(path), "--runs-root", str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "name:" in err and "cannot be used as a folder name" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()
    for make in (lambda: recipe_from_dict(micro_search | {"name": name}),
                 lambda: datagen_recipe_from_dict({"name": name}),
                 lambda: ReportRecipe.model_validate({"name": name, "search": "s.yaml"})):
        with pytest.raises(ConfigError, match="cannot be used as a folder name"):
            make()


def _merge_recipe(tmp_path: Path, pool: dict[str, Path]) -> Path:
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(pool["base"]), "experts": {"a": str(pool["expert_a"]), "b": str(pool["expert_b"])},
        "method": "ties", "genome": {"weights": {"a": 0.5, "b": 0.5}, "densities": {"a": 0.5, "b": 0.5}}}))
    return recipe


@pytest.mark.parametrize("out", [".", "base", "expert_a", "EXPERT_PARENT"])
def test_merge_never_replaces_an_input_or_the_current_folder(out, tmp_path, micro_pool, monkeypatch, capsys):
    monkeypatch.chdir(micro_pool["base"].parent)
    recipe = _merge_recipe(tmp_path, micro_pool)
    target = str(micro_pool["base"].parent) if out == "EXPERT_PARENT" else out
    before = {p: (p / "model.safetensors").read_bytes() for p in micro_pool.values()}
    assert cli_main(["merge", str(recipe), "--out", target, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("current folder" in err or "would destroy the input" in err), err
    assert {p: (p / "model.safetensors").read_bytes() for p in micro_pool.values()} == before


def test_a_killed_merge_leaves_no_temp_folder_behind(tmp_path, micro_pool):
    import subprocess
    import sys

    out = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".merged.tmp-{dead.stdout.strip()}-abc123"  # what kill -9 mid-write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    assert cli_main(["merge", str(_merge_recipe(tmp_path, micro_pool)), "--out", str(out)]) == 0
    assert not stale.exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device,needle", [("banana", "is not a device"), ("cuda:99", "cuda:99"),
                                           ("xla", "not supported")])
def test_bad_devices_are_named_not_tracebacks(device, needle, tmp_path, micro_pool, micro_search, capsys):
    out = tmp_path / "merged"
    assert cli_main(["merge", str(_merge_recipe(tmp_path, micro_pool)), "--out", str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and needle in err and "Traceback" not in err and not out.exists()
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(micro_search))
    run = tmp_path / "run"
    assert cli_main(["search", str(path), f"fitness.device={device}", "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fitness.device" in err and needle in err and "Traceback" not in err and not run.exists()
    assert cli_main(["eval", str(micro_pool["base"]), "--device", device, "--prompts", "benign:x.jsonl"]) == 2
    assert "device" in capsys.readouterr().err


# ----------------------------------------------------------------------------- genes
@pytest.mark.parametrize("density", [-0.3, 1.7])
def test_out_of_range_densities_are_refused_everywhere(density, tmp_path, micro_pool, capsys):
    out = tmp_path / "merged"
    base, a, b = (str(micro_pool[k]) for k in ("base", "expert_a", "expert_b"))
    mergekit = tmp_path / "mk.yaml"
    mergekit.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": base, "models": [
        {"model": a, "parameters": {"weight": 0.5, "density": density}},
        {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]}))
    recipe = _merge_recipe(tmp_path, micro_pool)
    genome = tmp_path / "genome.yaml"
    genome.write_text(yaml.safe_dump({"weights": {"a": 0.5, "b": 0.5}, "densities": {"a": density, "b": 0.5}}))
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump(yaml.safe_load(recipe.read_text()) | {
        "genome": {"weights": {"a": 0.5, "b": 0.5}, "densities": {"a": 0.5, "b": [0.5, density]}}}))
    for args, culprit in (([str(mergekit)], "models[0].parameters.density"),
                          ([str(recipe), "--genome", str(genome)], "densities.a"),
                          ([str(inline)], "densities.b[1]")):
        assert cli_main(["merge", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert culprit in err and "[0, 1]" in err and "Traceback" not in err and not out.exists(), err
    from evomerge.errors import ConfigError
    from evomerge.merge import Genome

    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        Genome.from_values([0.5, 0.5], [density, 0.5])


# ----------------------------------------------------------------------------- small things
def test_cli_without_a_command_prints_help_and_has_a_version(capsys):
    from evomerge import __version__

    assert cli_main([]) == 2
    assert "search" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and __version__ in capsys.readouterr().out


def test_outputs_follow_the_umask_and_reports_are_strict_json(tmp_path, micro_search, monkeypatch):
    """Folders and files evomerge writes are as readable as the user's umask says (not
    0700/0600); summary.json has no bare NaN; an absent benign set is NaN, not inf; the
    documented ``merge SEARCH_RECIPE --genome best_genome.yaml`` works."""
    import os

    import pandas as pd

    old = os.umask(0o022)
    try:
        micro_search |= {"search": {"steps": 1, "popsize": 4}, "write_model": True}
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump(micro_search))
        run = tmp_path / "run"
        assert cli_main(["search", str(path), "--run-dir", str(run), "--quiet"]) == 0
        assert (run / "model").stat().st_mode & 0o777 == 0o755
        assert (run / "summary.json").stat().st_mode & 0o777 == 0o644
        assert (run / "model" / "config.json").stat().st_mode & 0o777 == 0o644
        json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
        gens = pd.read_csv(run / "generations.csv")
        assert gens["mean_ce_benign"].isna().all() and gens["best_ce_benign"].isna().all()
        out = tmp_path / "again"
        assert cli_main(["merge", str(path), "--genome", str(run / "best_genome.yaml"), "--out", str(out)]) == 0
        assert (out / "model.safetensors").exists()
    finally:
        os.umask(old)


def test_merge_logs_progress(tmp_path, micro_pool, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="evomerge.merge.writer"):
        assert cli_main(["merge", str(_merge_recipe(tmp_path, micro_pool)), "--out", str(tmp_path / "m")]) == 0
    assert "tensors read and merged (100%)" in caplog.text
