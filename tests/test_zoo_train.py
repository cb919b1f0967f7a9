"""The zoo's fine-tuning loop: neuron/head slices and the locality loss (evomerge/zoo/train.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from evomerge.zoo.config import StageConfig
from evomerge.zoo.train import Example, _locality_loss, train


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=24, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _examples(seed: int, n: int = 24, length: int = 10) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (length,), generator=g).tolist()
        out.append(Example(ids, [-100] * 4 + ids[4:]))
    return out


def _delta(start, model) -> dict[str, torch.Tensor]:
    before = start.state_dict()
    return {k: v - before[k] for k, v in model.state_dict().items()}


def test_disjoint_slices_give_task_vectors_with_disjoint_support():
    start = _model()
    deltas = []
    for i in range(2):
        model = copy.deepcopy(start)
        stage = StageConfig(lr=1e-2, epochs=2, batch_size=8, warmup_steps=1, neurons=(i, 2), heads=(i, 2))
        train(model, _examples(i), stage, seed=i, pad_id=0)
        deltas.append(_delta(start, model))
    moved = 0
    for name in deltas[0]:
        a, b = deltas[0][name], deltas[1][name]
        assert not torch.any((a != 0) & (b != 0)), name
        if ".mlp." not in name and ".self_attn." not in name:
            assert not a.any() and not b.any(), f"{name} is outside every slice and must stay frozen"
        moved += int(a.any()) + int(b.any())
    assert moved > 0
    # MLP neuron j of slice i: rows of gate/up and the column of down; head h: rows of q/k/v, columns of o
    gate = deltas[0]["model.layers.0.mlp.gate_proj.weight"]
    assert gate[1::2].abs().sum() == 0 and gate[0::2].abs().sum() > 0
    o_proj = deltas[1]["model.layers.1.self_attn.o_proj.weight"]
    assert o_proj[:, 0:4].abs().sum() == 0 and o_proj[:, 4:8].abs().sum() > 0


def test_locality_loss_is_zero_at_the_start_and_keeps_hidden_states():
    start = _model()
    local = _examples(7)
    assert _locality_loss(start, copy.deepcopy(start), local[:8], 0).item() == pytest.approx(0.0, abs=1e-12)

    def drift(locality: float) -> float:
        model = copy.deepcopy(start)
        stage = StageConfig(lr=1e-2, epochs=3, batch_size=8, warmup_steps=1, locality=locality)
        train(model, _examples(1), stage, seed=0, pad_id=0, local=local)
        with torch.no_grad():
            return _locality_loss(model, start, local, 0).item()

    free, pinned = drift(0.0), drift(30.0)
    assert pinned < 0.5 * free, (free, pinned)


@pytest.mark.parametrize("bad", [(2, 2), (-1, 3), (0, 0)])
def test_a_slice_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="neurons"):
        StageConfig(lr=1e-3, epochs=1, neurons=bad)
