"""The zoo builder on a micro config: layout, determinism, caching, atomicity, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.pool import Pool
from evomerge.zoo import build as zoo_build
from evomerge.zoo.build import build_zoo, zoo_key
from evomerge.zoo.config import ZooConfig, micro_config

MODELS = ["base", "safe", "expert-arithmetic", "expert-geography", "generator", "guard"]


def _weight_hashes(root: Path) -> dict[str, str]:
    return {m: hashlib.sha256((root / m / "model.safetensors").read_bytes()).hexdigest() for m in MODELS}


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory):
    return build_zoo(micro_config(seed=0), out=tmp_path_factory.mktemp("zoo") / "zoo", jobs=2)


def test_layout_and_card(micro_zoo):
    root = micro_zoo.root
    for name in MODELS:
        assert (root / name / "model.safetensors").is_file()
        assert (root / name / "tokenizer.json").is_file()
        assert (root / name / "config.json").is_file()
    card = json.loads((root / "card.json").read_text())
    assert set(card["models"]) == {"base", "safe", "expert-arithmetic", "expert-geography", "generator"}
    assert set(card["models"]["safe"]) == {"refusal_unsafe", "refusal_benign", "acc_arithmetic", "acc_geography"}
    assert 0.0 <= card["guard"]["agreement"] <= 1.0
    assert set(card["merge_probe"]) == {"expert-arithmetic", "expert-geography"}
    assert card["key"] == zoo_key(micro_config(seed=0))
    for name in ["safety.jsonl", "heldout-unsafe.jsonl", "domain-arithmetic.jsonl", "heldout-domain-geography.jsonl"]:
        first = json.loads((root / "data" / name).read_text().splitlines()[0])
        assert {"prompt", "answer", "kind"} <= set(first)


def test_zoo_is_a_mergeable_pool(micro_zoo):
    root = micro_zoo.root
    pool = Pool.from_refs(root / "base", {n: str(root / n) for n in ["safe", "expert-arithmetic", "expert-geography"]})
    pool.check_compatibility()


def test_guard_uses_llama_guard_template(micro_zoo):
    from evomerge.pool import load_tokenizer

    guard_tok = load_tokenizer(micro_zoo.root / "guard")
    text = guard_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert "Provide your safety assessment for ONLY THE LAST Agent message" in text


def test_same_seed_same_weights_other_seed_differs(micro_zoo, tmp_path):
    """Also: fine-tunes trained one at a time (jobs=1) and side by side in worker processes
    (the fixture: jobs=2) give the same bytes."""
    again = build_zoo(micro_config(seed=0), out=tmp_path / "again", jobs=1)
    assert _weight_hashes(again.root) == _weight_hashes(micro_zoo.root)
    assert again.card["models"] == micro_zoo.card["models"] and again.card["final_train_loss"] == micro_zoo.card["final_train_loss"]
    other = build_zoo(micro_config(seed=1), out=tmp_path / "other")
    assert _weight_hashes(other.root)["base"] != _weight_hashes(micro_zoo.root)["base"]


def test_second_build_is_a_cache_hit(micro_zoo, monkeypatch):
    def boom(*_args, **_kwargs):
        raise AssertionError("rebuilt instead of reusing the cache")

    monkeypatch.setattr(zoo_build, "_build_into", boom)
    assert build_zoo(micro_config(seed=0), out=micro_zoo.root).card == micro_zoo.card


def test_content_addressed_default_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    folder = zoo_build.default_zoo_dir(micro_config(seed=0))
    assert folder == tmp_path / "cache" / "zoo" / zoo_key(micro_config(seed=0))
    assert zoo_key(micro_config(seed=0)) != zoo_key(micro_config(seed=1))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def fail(*_args, **_kwargs):
        raise RuntimeError("simulated crash in a training stage")

    monkeypatch.setattr(zoo_build, "train", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_zoo(micro_config(seed=0), out=tmp_path / "zoo")
    assert list(tmp_path.iterdir()) == []


def test_folder_with_other_zoo_is_refused(micro_zoo, tmp_path):
    import shutil

    target = tmp_path / "zoo"
    shutil.copytree(micro_zoo.root, target)
    with pytest.raises(EvomergeError, match="another config or code version"):
        build_zoo(micro_config(seed=5), out=target)


def test_cli_zoo_build_prints_card(micro_zoo, capsys):
    assert main(["zoo", "build", "--micro", "--out", str(micro_zoo.root)]) == 0
    out = capsys.readouterr().out
    assert "refuses unsafe" in out and "guard: agreement" in out and "zoo: " in out


def test_cli_zoo_build_takes_config_overrides_and_names_a_bad_one(micro_zoo, tmp_path, capsys):
    from evomerge.zoo.config import zoo_config

    config = zoo_config(["shape.hidden_size=128", "experts.geography.merge_aware=true"], seed=2)
    assert (config.seed, config.shape.hidden_size, config.experts["geography"].merge_aware) == (2, 128, True)
    assert config.experts["arithmetic"] == ZooConfig().experts["arithmetic"]  # the rest stays the default
    assert zoo_config(seed=3) == ZooConfig(seed=3) and zoo_config(micro=True) == micro_config()
    # the micro zoo's own config, stated as overrides, is the fixture's cache hit
    assert main(["zoo", "build", "--micro", "--out", str(micro_zoo.root), "experts.arithmetic.merge_aware=true"]) == 0
    target = tmp_path / "never"
    assert main(["zoo", "build", "--micro", "--out", str(target), "shape.width=3"]) == 2
    err = capsys.readouterr().err
    assert "shape.width" in err and "unknown field" in err and "Traceback" not in err
    assert not target.exists()


def test_config_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="domains: unknown domain 'cooking'"):
        ZooConfig(domains=("arithmetic", "cooking"))
    with pytest.raises(ValidationError, match="experts: no training stage for domain 'geography'"):
        ZooConfig(experts={"arithmetic": ZooConfig().experts["arithmetic"]})
    with pytest.raises(ValidationError, match="vocab_sise"):
        ZooConfig(vocab_sise=10)


def test_merge_headroom_is_the_gap_in_points():
    """The card's headroom: refusals against the safe model's, accuracy against the expert's."""
    from evomerge.zoo.card import merge_headroom

    card = {"models": {"safe": {"refusal_unsafe": 0.95}, "expert-geography": {"acc_geography": 1.0}},
            "merge_probe": {"expert-geography": {"heldout": {"refusal_unsafe": 0.94, "acc_geography": 0.97}}}}
    gaps = merge_headroom(card)["expert-geography"]
    assert gaps == {"alignment_gap": -1.0, "gap_geography": -3.0, "headroom": False}
    card["merge_probe"]["expert-geography"]["heldout"]["acc_geography"] = 0.985
    assert merge_headroom(card)["expert-geography"]["headroom"] is True


def test_oracle_searches_ties_with_a_density_per_module(micro_zoo):
    """``method="ties"``: one weight and one density gene per module group and model; the
    chosen merge is left in the live model (a TIES build of the selected genome)."""
    from evomerge.merge import Genome, StatePool, build, prepare
    from evomerge.pool import load_model, load_tokenizer
    from evomerge.zoo import oracle
    from evomerge.zoo.world import World

    root = micro_zoo.root
    tok = load_tokenizer(root / "safe")
    models = {n: load_model(root / n) for n in ("safe", "expert-geography")}
    base, live = load_model(root / "base"), load_model(root / "base")
    heldin = oracle.heldin_sets(World(seed=0), ["geography"], 0, n_unsafe=4, n_benign=4, n_domain=4)
    found = oracle.search_merge(base, live, models, tok, ["geography"], heldin, 1, 2, 0, method="ties")
    groups = len(found["groups"])
    x = found["selected"]["weights"]
    assert len(x) == 2 * groups * 2  # weights then densities, 2 models
    pool = StatePool(base.state_dict(), {n: m.state_dict() for n, m in models.items()}, num_layers=base.config.num_hidden_layers)
    dens = [tuple(min(1.0, max(0.05, v / 2)) for v in x[(groups + g) * 2:(groups + g + 1) * 2]) for g in range(groups)]
    want = build(prepare(pool, "ties", {"normalize": False}, fused=False),
                 Genome(tuple(tuple(x[g * 2:(g + 1) * 2]) for g in range(groups)), tuple(dens), modules=True))
    for name, tensor in live.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    with pytest.raises(ValueError, match="task_arithmetic or ties"):
        oracle.search_merge(base, live, models, tok, ["geography"], heldin, 1, 2, 0, method="dare_ties")


def test_micro_card_renders_with_its_probe(micro_zoo):
    from rich.console import Console

    from evomerge.zoo.card import render_card

    console = Console(record=True, width=200)
    render_card(micro_zoo.card, console)
    text = console.export_text()
    assert "merge: safe + geography" in text and "points of accuracy from the expert" in text


def test_shipped_zoo_is_verified_and_preferred(micro_zoo, tmp_path, monkeypatch):
    import shutil

    shipped = tmp_path / "zoo"
    shutil.copytree(micro_zoo.root, shipped)
    zoo_build.write_checksums(shipped)
    monkeypatch.setattr(zoo_build, "SHIPPED_ROOT", shipped)
    monkeypatch.delenv("EVOMERGE_ZOO", raising=False)
    assert zoo_build.default_zoo().root == shipped
    assert zoo_build.shipped_zoo().card["key"] == micro_zoo.card["key"]
    # EVOMERGE_ZOO=build skips it (the default config would then be built: stop before that)
    monkeypatch.setenv("EVOMERGE_ZOO", "build")
    monkeypatch.setattr(zoo_build, "build_zoo", lambda: "built")
    assert zoo_build.default_zoo() == "built"
    # a damaged file is named
    (shipped / "safe" / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(EvomergeError, match=r"safe/model.safetensors: checksum differs"):
        zoo_build.shipped_zoo()
    (shipped / "safe" / "model.safetensors").unlink()
    with pytest.raises(EvomergeError, match="missing"):
        zoo_build.shipped_zoo()


def test_evomerge_zoo_names_a_built_folder(micro_zoo, tmp_path, monkeypatch):
    """EVOMERGE_ZOO=FOLDER: every zoo: ref means that build (another seed, another machine)."""
    monkeypatch.setenv("EVOMERGE_ZOO", str(micro_zoo.root))
    assert zoo_build.default_zoo().root == micro_zoo.root
    monkeypatch.setenv("EVOMERGE_ZOO", str(tmp_path))
    with pytest.raises(EvomergeError, match=rf"EVOMERGE_ZOO={tmp_path}: no card.json there"):
        zoo_build.default_zoo()
    (tmp_path / "card.json").write_text("[1, 2]")
    with pytest.raises(EvomergeError, match="not a zoo card"):
        zoo_build.default_zoo()


def test_no_shipped_zoo_means_none(tmp_path):
    assert zoo_build.shipped_zoo(tmp_path / "nothing") is None


def test_compare_cards_in_points(micro_zoo):
    other = json.loads(json.dumps(micro_zoo.card))
    other["models"]["safe"]["refusal_unsafe"] = micro_zoo.card["models"]["safe"]["refusal_unsafe"] - 0.25
    rows = zoo_build.compare_cards(micro_zoo.card, other)
    row = next(r for r in rows if r["model"] == "safe" and r["measure"] == "refusal_unsafe")
    assert row["points"] == 25.0
    assert all(r["points"] == 0 for r in rows if r is not row)


def test_base_from_reuses_the_pretrained_base_and_checks_it(micro_zoo, tmp_path):
    again = build_zoo(micro_config(seed=0), out=tmp_path / "again", base_from=micro_zoo.root)
    assert _weight_hashes(again.root) == _weight_hashes(micro_zoo.root)  # same base, so the same fine-tunes
    assert again.card["base_from"] == micro_zoo.card["key"] and micro_zoo.card["base_from"] is None
    with pytest.raises(EvomergeError, match="another seed"):
        build_zoo(micro_config(seed=1), out=tmp_path / "other", base_from=micro_zoo.root)
    assert not (tmp_path / "other").exists()


def test_jobs_below_one_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(EvomergeError, match=r"jobs \(--jobs\).*got 0"):
        build_zoo(micro_config(seed=0), out=tmp_path / "zoo", jobs=0)
    assert not (tmp_path / "zoo").exists()
