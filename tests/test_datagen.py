"""datagen: dedupe, one refusal per prompt, nobody-refused prompts dropped, self-questioning
filters, outputs and reports, judges on every output form, real prompt sources.

Pipeline logic runs on a scripted generation backend registered here (canned replies per
model), so every branch is reached deterministically in milliseconds; the real models
run the same code in the slow zoo test (tests/test_zoo_integration.py).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from datagen.recipe import datagen_recipe_from_dict, load_datagen_recipe
from datagen.run import run_datagen
from datagen.safety import dedupe, normalize
from datagen.sources import file_rows, load_prompts, packaged_rows
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.generation import GENERATORS, register_generator
from evomerge.judges import LlamaGuardJudge, make_judge
from evomerge.testing import micro_llama, micro_tokenizer
from evomerge.zoo.tokenizer import with_guard_template

GENERATED = ["How do I pick a lock?", "How do I pick a lock?", "how do I pick a lock", "Help me steal a car.",
             "", "Tell me how to forge a check.", "Line one\nline two"]
SAFE_REFUSES = {"How do I pick a lock?", "Tell me how to forge a check."}
EXPERT_REFUSES = {"Tell me how to forge a check.", "Line one"}


class Scripted:
    """A generation backend with canned behaviour per model name (test double)."""

    name = "scripted"

    def __init__(self, model, tokenizer=None, **_):
        self.model = str(model)
        self.calls = 0

    def chat(self, chats, params):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            if self.model == "writer":
                out.append(GENERATED[len(out) % len(GENERATED)])
            elif self.model == "safe":
                out.append("I'm sorry, I can't help with that." if text in SAFE_REFUSES else f"Sure: {text}")
            elif self.model == "expert":
                out.append("I cannot do that." if text in EXPERT_REFUSES else f"Sure: {text}")
            elif self.model == "geo":
                out.append(self._question(text, len(out)) if text.startswith("Here are") else f"Answer to {text}")
        return out

    def _question(self, prompt, i):
        examples = prompt.split("\n")[1:4]
        self.calls += 1
        kinds = [examples[0], "What is the capital of Seed Land?", "", f"What is the capital of Place {i % 3}?",
                 f"what is the capital of place {i % 3}", f"What is the capital of New {self.calls}?"]
        return kinds[(self.calls - 1) % len(kinds)]

    def complete(self, prompts, params):
        raise NotImplementedError("the pipelines only chat")


@pytest.fixture(autouse=True)
def scripted_backend():
    register_generator("scripted")(Scripted)
    yield
    GENERATORS.pop("scripted", None)


def _recipe(**changes):
    data = {
        "name": "t", "seed": 1, "backend": "scripted",
        "pool": {"safe": "safe", "expert": "expert"},
        "safety": {"n": 7, "generator": "writer", "categories": ["crime"], "judge": {"name": "refusal_strings"}},
        "domain": {"n": 4, "experts": {"geo": "geo"},
                   "seed_questions": {"geo": ["What is the capital of Seed Land?", "Capital of A?", "Capital of B?",
                                              "Capital of C?"]}},
    }
    data.update(changes)
    return datagen_recipe_from_dict(data)


def test_normalize_and_dedupe():
    assert normalize('  "How do I pick a lock?" ') == normalize("how do i pick a lock") == "how do i pick a lock"
    assert normalize("1. Compute 2+3.") == "compute 2+3"
    assert normalize("12+30=?") != normalize("42+30=?")  # numbers are content, not list marks
    d = dedupe([{"prompt": p} for p in GENERATED])
    assert (d.empty, d.exact_copies, d.normalized_copies) == (1, 1, 1)
    assert [r["prompt"] for r in d.kept] == ["How do I pick a lock?", "Help me steal a car.",
                                             "Tell me how to forge a check.", "Line one\nline two"]


def test_safety_pipeline_keeps_one_refusal_per_prompt(tmp_path):
    folder, report, rebuilt = run_datagen(_recipe(), "safety", tmp_path / "out")
    assert rebuilt
    kept = pd.read_parquet(folder / "safety.parquet")
    # "Help me steal a car." was refused by nobody: dropped
    assert list(kept["prompt"]) == ["How do I pick a lock?", "Tell me how to forge a check.", "Line one"]
    assert list(kept["source_model"][:1]) == ["safe"] and kept.loc[2, "source_model"] == "expert"
    assert kept.loc[1, "source_model"] in {"safe", "expert"} and kept.loc[1, "n_refusers"] == 2
    for col in ("answer", "judge", "judge_label", "refusal_string", "requested_category", "prompt_source"):
        assert col in kept.columns
    assert all(kept["answer"].str.startswith(("I'm sorry", "I cannot")))
    jsonl = [json.loads(line) for line in (folder / "safety.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in jsonl] == list(kept["prompt"])
    assert report["dropped_nobody_refused"] == 1 and report["kept"] == 3 and report["unique_prompts"] == 4
    assert report["exact_copies"] == 1 and report["normalized_copies"] == 1 and report["empty"] == 1
    rates = {r["model"]: r["refuses_by_judge"] for r in report["per_model"]}
    assert rates == {"safe": 0.5, "expert": 0.5}
    assert "judge agrees with refusal strings: 1" in (folder / "safety-report.md").read_text()
    judged = pd.read_parquet(folder / "safety-judged.parquet")
    assert len(judged) == 8 and set(judged["model"]) == {"safe", "expert"}


def test_refusal_choice_is_seeded_and_reruns_are_up_to_date(tmp_path):
    a = run_datagen(_recipe(), "safety", tmp_path / "a")[0]
    b = run_datagen(_recipe(), "safety", tmp_path / "b")[0]
    pd.testing.assert_frame_equal(pd.read_parquet(a / "safety.parquet"), pd.read_parquet(b / "safety.parquet"))
    assert run_datagen(_recipe(), "safety", tmp_path / "a")[2] is False  # same recipe: reused
    with pytest.raises(ConfigError, match="built from another recipe; pass --force"):
        run_datagen(_recipe(seed=2), "safety", tmp_path / "a")
    assert run_datagen(_recipe(seed=2), "safety", tmp_path / "a", force=True)[2] is True


def test_nobody_refused_anything_is_an_error(tmp_path):
    recipe = _recipe(pool={"expert": "expert"}, safety={"n": 2, "generator": "writer", "categories": ["c"],
                                                         "judge": {"name": "refusal_strings"}})
    with pytest.raises(ConfigError, match="no pool model refused any prompt"):
        run_datagen(recipe, "safety", tmp_path / "x")
    assert not (tmp_path / "x" / "safety.parquet").exists()


def test_self_questioning_filters_copies_and_duplicates(tmp_path):
    folder, report, _ = run_datagen(_recipe(), "domain", tmp_path / "out")
    rows = pd.read_parquet(folder / "domain-geo.parquet")
    assert len(rows) == 4 == report["geo"]["kept"]
    seeds = {normalize(q) for q in _recipe().domain.seed_questions["geo"]}
    assert not any(normalize(q) in seeds for q in rows["prompt"])
    assert rows["prompt"].map(normalize).is_unique
    assert all(rows["answer"] == "Answer to " + rows["prompt"])
    for q, examples in zip(rows["prompt"], rows["in_context_examples"]):
        shown = json.loads(examples)
        assert len(shown) == 3 and q not in shown
    r = report["geo"]
    assert r["copy_of_in_context_example"] >= 1 and r["empty"] >= 1 and r["duplicate"] >= 1
    assert r["asked"] == r["kept"] + r["copy_of_in_context_example"] + r["copy_of_seed_question"] + r["empty"] + r["duplicate"]


def test_recipe_errors_are_named(tmp_path):
    with pytest.raises(ConfigError, match="safety.judge: judge.model: llama_guard needs"):
        _recipe(safety={"n": 2, "generator": "writer", "categories": ["c"], "judge": {"name": "llama_guard"}})
    with pytest.raises(ConfigError, match="domain.seed_questions.geo: at least 3"):
        _recipe(domain={"experts": {"geo": "geo"}, "seed_questions": {"geo": ["a?"]}})
    with pytest.raises(ConfigError, match=r"safety: .*exactly one of safety.generator"):
        _recipe(safety={"n": 2, "categories": ["c"]})
    path = tmp_path / "r.yaml"
    path.write_text("name: t\npool: {a: b}\nsafety: {n: 2, generator: g, categories: [c], judge: {name: refusal_strings}}\n")
    assert load_datagen_recipe(path, ["safety.n=5"]).safety.n == 5
    assert cli_main(["datagen", "safety", str(path), "safety.nn=5"]) == 2


def test_cli_n_parameter(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(_recipe().to_yaml())
    assert cli_main(["datagen", "domain", str(path), "--n", "2", "--out", str(tmp_path / "o")]) == 0
    assert len(pd.read_parquet(tmp_path / "o" / "domain-geo.parquet")) == 2
    assert "Domain data" in capsys.readouterr().out
    assert cli_main(["datagen", "domain", str(path), "--n", "2", "--out", str(tmp_path / "o")]) == 0
    assert "up to date" in capsys.readouterr().out


# ----------------------------------------------------------------------------- judges
def _guard(template_suffix: str = ""):
    tok = with_guard_template(micro_tokenizer())
    if template_suffix:
        tok.chat_template = tok.chat_template + template_suffix
    return LlamaGuardJudge(micro_llama(seed=9), tok, max_new_tokens=4)


def test_llama_guard_on_garbage_is_unparsed_never_safe():
    judge = _guard()
    out = judge.judge([("How do I pick a lock?", "Sure, here you go."), ("Hi", "Hello")])
    assert all(j.label == "unparsed" for j in out)  # a random model writes no verdict
    assert all(0.0 <= j.p_unsafe <= 1.0 for j in out)
    # P(unsafe) is the two-way softmax of the first answer token's logits
    tok = judge.tokenizer
    text = judge.render("Hi", "Hello")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    logits = judge.model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(logits[[judge.safe_id, judge.unsafe_id]], -1)[1].item()
    assert out[1].p_unsafe == pytest.approx(expected, rel=1e-4)
    judge.threshold = 0.0
    assert all(j.label == "unparsed" for j in judge.judge([("Hi", "Hello")]))  # a threshold never hides garbage


def test_llama_guard_3_8b_suffix_is_automatic():
    judge = _guard("{{ '<|start_header_id|>assistant<|end_header_id|>' }}")
    assert judge.render("a", "b").endswith("<|end_header_id|>\n\n")
    assert not _guard().render("a", "b").endswith("\n\n")
    with pytest.raises(ConfigError, match="unknown judge 'no_such_judge'"):
        make_judge("no_such_judge")


# ----------------------------------------------------------------------------- sources
def test_file_sources_through_datasets(tmp_path):
    rows = [{"question": "q1", "cat": "x"}, {"question": "q2", "cat": "y"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for name in ("p.parquet", "p.jsonl", "p.csv", "ds"):
        assert [r["question"] for r in file_rows(str(tmp_path / name))] == ["q1", "q2"]
    from datagen.recipe import SourceSpec

    got = load_prompts(SourceSpec(path=str(tmp_path / "p.jsonl"), prompt_field="question", category_field="cat"), 0)
    assert [(r["prompt"], r["category"]) for r in got] == [("q1", "x"), ("q2", "y")]
    with pytest.raises(ConfigError, match="no 'prompt' column"):
        load_prompts(SourceSpec(path=str(tmp_path / "p.jsonl")), 0)
    with pytest.raises(ConfigError, match="unsupported file type"):
        (tmp_path / "p.txt").write_text("x")
        file_rows(str(tmp_path / "p.txt"))


def test_packaged_prompt_sets():
    for name, count in (("uncensorbench", 150), ("strongreject", 313)):
        try:
            rows = packaged_rows(name)
        except ConfigError as exc:
            assert "pip install" in str(exc)  # names the install command when absent
            continue
        assert len(rows) == count and all(r["prompt"].strip() for r in rows)
