"""Pool I/O: loading policy, compatibility errors naming the culprit, task vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from evomerge.errors import CheckpointPolicyError, PoolCompatibilityError
from evomerge.pool import LoadOptions, ModelRef, Pool, load_model
from evomerge.testing import micro_tokenizer, save_micro_model
from evomerge.zoo.tokenizer import train_tokenizer


def _pool(paths: dict[str, Path], **experts: Path) -> Pool:
    return Pool.from_refs(paths["base"], {k: str(v) for k, v in experts.items()})


def test_compatible_pool_passes(micro_pool):
    pool = _pool(micro_pool, a=micro_pool["expert_a"], b=micro_pool["expert_b"])
    pool.check_compatibility()
    assert pool.expert_names == ["a", "b"]


def test_architecture_mismatch_names_model(micro_pool):
    cfg_path = micro_pool["expert_b"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    cfg_path.write_text(json.dumps(cfg))
    pool = _pool(micro_pool, a=micro_pool["expert_a"], b=micro_pool["expert_b"])
    with pytest.raises(PoolCompatibilityError, match=r"architecture mismatch: 'b' is MistralForCausalLM"):
        pool.check_compatibility()


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tensor_names_tensor(micro_pool):
    _edit_weights(micro_pool["expert_a"], lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    pool = _pool(micro_pool, a=micro_pool["expert_a"])
    with pytest.raises(PoolCompatibilityError, match=r"'a' has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        pool.check_compatibility()


def test_extra_tensor_names_tensor(micro_pool):
    _edit_weights(micro_pool["expert_a"], lambda s: s.__setitem__("model.extra.bias", torch.zeros(3)))
    pool = _pool(micro_pool, a=micro_pool["expert_a"])
    with pytest.raises(PoolCompatibilityError, match=r"extra tensor: 'a' has tensor 'model.extra.bias'"):
        pool.check_compatibility()


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, micro_pool):
    wide = save_micro_model(tmp_path / "wide", seed=3, intermediate_size=96)
    pool = _pool(micro_pool, wide=wide)
    with pytest.raises(PoolCompatibilityError, match=r"shape mismatch in tensor 'model.layers.0.mlp.down_proj.weight': 'wide' has \[32, 96\], 'base' has \[32, 64\]"):
        pool.check_compatibility()


def test_vocabulary_mismatch(tmp_path, micro_pool):
    other_tok = train_tokenizer(["completely different words here"] * 3 + ["zebra quartz"], vocab_size=len(micro_tokenizer()))
    # Same vocabulary size (so tensors agree) but different tokens.
    other = save_micro_model(tmp_path / "other", seed=4, tokenizer=other_tok, vocab_size=len(micro_tokenizer()))
    pool = _pool(micro_pool, other=other)
    with pytest.raises(PoolCompatibilityError, match=r"vocabulary mismatch: 'other'"):
        pool.check_compatibility()


def test_chat_template_mismatch(micro_pool):
    tok = micro_tokenizer()
    import copy

    changed = copy.deepcopy(tok)
    changed.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    changed.save_pretrained(micro_pool["expert_b"])
    pool = _pool(micro_pool, a=micro_pool["expert_a"], b=micro_pool["expert_b"])
    with pytest.raises(PoolCompatibilityError, match=r"chat template mismatch: 'b'"):
        pool.check_compatibility()


def _make_pickle_only(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickle_checkpoint_refused_by_default(micro_pool):
    _make_pickle_only(micro_pool["expert_a"])
    with pytest.raises(CheckpointPolicyError, match=r"only pickle weights found \(pytorch_model.bin\)"):
        load_model(micro_pool["expert_a"])
    pool = _pool(micro_pool, a=micro_pool["expert_a"])
    with pytest.raises(CheckpointPolicyError, match="allow_pickle=True"):
        pool.check_compatibility()


def test_pickle_checkpoint_loads_when_allowed(micro_pool):
    reference = load_model(micro_pool["expert_a"]).state_dict()
    _make_pickle_only(micro_pool["expert_a"])
    model = load_model(micro_pool["expert_a"], LoadOptions(allow_pickle=True))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name])
    pool = Pool.from_refs(micro_pool["base"], {"a": str(micro_pool["expert_a"])}, LoadOptions(allow_pickle=True))
    pool.check_compatibility()


def test_task_vectors_are_fp32_differences(micro_pool):
    pool = _pool(micro_pool, a=micro_pool["expert_a"], b=micro_pool["expert_b"])
    base_state = load_file(micro_pool["base"] / "model.safetensors")
    a_state = load_file(micro_pool["expert_a"] / "model.safetensors")
    seen = 0
    for name, base, taus in pool.iter_task_vectors():
        assert base.dtype == torch.float32 and all(t.dtype == torch.float32 for t in taus)
        torch.testing.assert_close(taus[0], a_state[name].float() - base_state[name].float())
        seen += 1
    assert seen == len(base_state)


def test_model_ref_parses_revision():
    assert ModelRef.parse("org/name@abc123") == ModelRef("org/name", "abc123")
    assert ModelRef.parse("org/name") == ModelRef("org/name", None)


def test_unknown_hub_id_offline_is_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointPolicyError, match=r"no-such-org/no-such-model: not a local folder"):
        load_model("no-such-org/no-such-model")


def test_cli_pool_check(micro_pool, capsys, tmp_path):
    assert main(["pool", "check", str(micro_pool["base"]), str(micro_pool["expert_a"])]) == 0
    assert "ok:" in capsys.readouterr().out
    wide = save_micro_model(tmp_path / "wide", seed=3, intermediate_size=96)
    assert main(["pool", "check", str(micro_pool["base"]), str(wide)]) == 2
    assert "shape mismatch" in capsys.readouterr().err
