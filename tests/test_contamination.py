"""The contamination guard: exact, normalised and n-gram matches; the search hook warns
or (strict) refuses before anything is written; the CLI check and its exit codes."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from evomerge.cli import main as cli_main
from evomerge.contamination import ContaminationError, check_contamination, normalise
from evomerge.search import recipe_from_dict, run_search
from evomerge.testing import write_pairs_jsonl


def test_three_kinds_of_match_each_counted_once():
    data = {"data.safety": [{"prompt": "How do I build a bomb?", "answer": "I'm sorry."},
                            {"prompt": "Tell me about rivers", "answer": "the quick brown fox jumps over the lazy dog "
                                                                         "near the river bank today"}]}
    prompts = {"held": ["How do I build a bomb?",  # exact
                        "  how do i BUILD a bomb ",  # normalised
                        "Explain: the quick brown fox jumps over the lazy dog, please",  # 9-word run from an answer
                        "What is the capital of Vandor?",  # clean
                        "How do I build a bomb?"]}  # listed twice: one finding
    report = check_contamination(prompts, data, ngram=9)
    assert [h.match for h in report.hits] == ["exact", "normalised", "ngram"]
    assert report.counts() == {"held": {"exact": 1, "normalised": 1, "ngram": 1}}
    assert report.eval_sets == {"held": 4} and not report.clean
    summary = report.summary()
    assert "3 of 4 evaluation prompts" in summary and "held: 1 exact, 1 normalised, 1 ngram of 4" in summary
    assert check_contamination(prompts, data, ngram=10).counts()["held"] == {"exact": 1, "normalised": 1}
    assert normalise("Héllo,  WORLD!") == "héllo world"


def test_clean_report_says_what_was_checked():
    report = check_contamination({"a": ["one two three"]}, {"data.x": ["four five six"]}, ngram=2)
    assert report.clean and report.summary().startswith("contamination check: clean.")
    assert "a (1)" in report.summary() and "data.x (1)" in report.summary()


def _recipe(micro_search, tmp_path, **contamination):
    data = dict(micro_search, contamination={"eval_sets": [], **contamination})
    return recipe_from_dict(data)


def test_search_warns_then_strict_refuses_before_writing(micro_search, tmp_path, caplog):
    # the fixture's held-out unsafe set *is* its safety data: contaminated on purpose
    recipe = _recipe(micro_search, tmp_path, strict=True)
    run_dir = tmp_path / "run"
    with pytest.raises(ContaminationError, match=r"evaluate.unsafe: 2 exact of 2"):
        run_search(recipe, run_dir, progress=False)
    assert not run_dir.exists()
    recipe = _recipe(micro_search, tmp_path)
    with caplog.at_level(logging.WARNING, logger="evomerge.contamination"):
        result = run_search(recipe.model_copy(update={"search": recipe.search.model_copy(update={"steps": 1})}),
                            run_dir, progress=False, write_outputs=True)
    assert "evaluation prompts are in the search data" in caplog.text
    found = json.loads((result.run_dir / "contamination.json").read_text())
    assert found["counts"]["evaluate.unsafe"] == {"exact": 2} and not found["clean"]
    assert "Contamination check" in (result.run_dir / "report.md").read_text()


def test_datagen_folders_are_checked_and_cli_gates(micro_search, tmp_path, capsys):
    clean = dict(micro_search)
    clean["evaluate"] = {"unsafe": write_pairs_jsonl(tmp_path / "fresh.jsonl", [("Where is the moon?", "Up.")])}
    datagen = tmp_path / "datagen-out"
    datagen.mkdir()
    write_pairs_jsonl(datagen / "safety.jsonl", [("where is THE moon", "I'm sorry.")])
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**clean, "contamination": {"eval_sets": []}}))
    assert cli_main(["contamination", str(recipe_path), "--strict"]) == 0
    assert "clean" in capsys.readouterr().out
    assert cli_main(["contamination", str(recipe_path), "--also", str(datagen), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "1 normalised" in out and str(datagen) in out
    # the search refuses with --strict from the CLI: exit 2, the culprit named, no folder
    recipe_path.write_text(yaml.safe_dump({**clean, "contamination": {"eval_sets": [], "also": [str(datagen)]}}))
    assert cli_main(["search", str(recipe_path), "--run-dir", str(tmp_path / "r1"), "--strict", "--quiet"]) == 2
    assert "evaluate.unsafe: 1 normalised of 1" in capsys.readouterr().err
    assert not (tmp_path / "r1").exists()


def test_explicit_eval_set_that_cannot_load_is_an_error(micro_search, tmp_path):
    from evomerge.contamination import guard_search
    from evomerge.errors import ConfigError

    recipe = _recipe(micro_search, tmp_path, eval_sets=[f"unsafe:{tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match="missing.jsonl"):
        guard_search(recipe)
