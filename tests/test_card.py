"""Measured results in the model card's ``model-index``: from an audit (``--update-card``)
and from a search's held-out check; the rest of the card is kept."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.card import CardSet, card_results, split_front_matter, update_card
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.search import recipe_from_dict, run_search
from tests.test_audit_many import UNSAFE, zoo  # noqa: F401  (fixture)


def test_card_results_and_update_keep_the_card(tmp_path):
    sets = [CardSet("xstest", "benign"), CardSet("beavertails", "unsafe"), CardSet("gsm", "domain", "math")]
    results = card_results({"alignment": 81.234, "over_refusal": 12.0, "acc_math": float("nan")}, sets,
                           "llama_guard (meta-llama/Llama-Guard-3-8B)", "evomerge audit")
    assert [r["metrics"][0]["type"] for r in results] == ["alignment", "over_refusal"]  # NaN accuracy left out
    first = results[0]
    assert first["dataset"] == {"type": "evomerge/beavertails", "name": "beavertails"}
    assert first["metrics"][0]["value"] == 81.23 and "judge: llama_guard (meta-llama/Llama-Guard-3-8B)" in \
        first["metrics"][0]["name"] and first["metrics"][0]["verified"] is False
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: apache-2.0\ntags: [merge]\n---\n\n# My merge\n")
    update_card(readme, "m", results)
    update_card(readme, "m", results[:1])  # a second write replaces the model's entry
    front, body = split_front_matter(readme.read_text())
    assert front["license"] == "apache-2.0" and front["tags"] == ["merge"] and body == "\n# My merge\n"
    assert len(front["model-index"]) == 1 and front["model-index"][0]["results"] == results[:1]
    with pytest.raises(ConfigError, match="no model card to update"):
        update_card(tmp_path / "nope" / "README.md", "m", results)


def test_audit_update_card(zoo, tmp_path, capsys):  # noqa: F811
    _, merges = zoo
    unsafe = tmp_path / "u.jsonl"
    unsafe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in UNSAFE))
    merge = merges["m-safe-geo"]
    assert cli_main(["audit", str(merge), "--prompts", f"unsafe:{unsafe}", "--judge", "refusal_strings",
                     "--backend", "byfile", "--update-card"]) == 0
    assert f"model card: {merge / 'README.md'}" in capsys.readouterr().out
    front, body = split_front_matter((merge / "README.md").read_text())
    (entry,) = front["model-index"]
    assert entry["name"] == "m-safe-geo" and front["base_model_relation"] == "merge"  # the writer's card kept
    metric = entry["results"][0]["metrics"][0]
    assert metric["type"] == "alignment" and metric["value"] == 75.0 and "refusal_strings" in metric["name"]
    assert entry["results"][0]["source"]["name"] == "evomerge audit" and "## Constituents" in body


def test_search_writes_its_heldout_check_into_the_card(micro_search, tmp_path):
    data = dict(micro_search, write_model=True, search={"steps": 1, "popsize": 2},
                contamination={"check": False})
    result = run_search(recipe_from_dict(data), tmp_path / "run", progress=False)
    front = yaml.safe_load((result.run_dir / "model" / "README.md").read_text().split("---")[1])
    (entry,) = front["model-index"]
    kinds = [r["metrics"][0]["type"] for r in entry["results"]]
    assert entry["name"] == "micro" and kinds == ["alignment", "over_refusal", "accuracy"]
    row = result.heldout.set_index("model").loc["best merge"]
    assert entry["results"][0]["metrics"][0]["value"] == round(row["refuses_unsafe"], 2)
    assert entry["results"][2]["dataset"]["name"] == "ho-math"
