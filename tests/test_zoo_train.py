"""The zoo's fine-tuning loop: neuron/head slices, the locality loss and merge-aware training (evomerge/zoo/train.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from evomerge.zoo.config import StageConfig, ZooConfig
from evomerge.zoo.train import Example, OnTop, _locality_loss, _on_top_loss, collate, train


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


def _shifted(model, tau):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(tau[name])
    return out.eval()


def test_on_top_terms_are_locality_and_skill_loss_at_the_weights_plus_tau():
    model, partner, start = _model(2).eval(), _model(1).eval(), _model(0).eval()
    base = _model(3).state_dict()
    tau = {n: (p - base[n]).detach() for n, p in partner.named_parameters()}
    batch, skill = _examples(5)[:8], _examples(6)[:8]
    got = _on_top_loss(model, OnTop(tau, partner, skill), start, batch, skill, 0)
    shifted = _shifted(model, tau)
    with torch.no_grad():
        want = (_locality_loss(shifted, partner, batch, 0) + _locality_loss(model, start, batch, 0)
                + shifted(**collate(skill, 0)).loss)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    got.backward()  # through the shifted weights to the model's own
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _counting(n: int = 24, length: int = 10) -> list[Example]:
    """A learnable skill: every sequence counts up in steps of three."""
    out = []
    for i in range(n):
        ids = [1 + (i + 3 * j) % 49 for j in range(length)]
        out.append(Example(ids, [-100] * 4 + ids[4:]))
    return out


def test_merge_aware_training_keeps_the_skill_with_the_partner_added():
    """The point of StageConfig.merge_aware: the expert's skill survives adding the safe
    model's task vector (docs/zoo.md). Skill loss at expert + tau, trained with and
    without the terms (measured: about 0.83 without, 0.05 with; the expert alone 0.06 both)."""
    start, partner = _model(0), _model(0)
    with torch.no_grad():  # a "safe model": the start moved by a fixed random task vector
        g = torch.Generator().manual_seed(4)
        for p in partner.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-3))
    partner.eval()
    base = start.state_dict()
    tau = {n: (p - base[n]).detach() for n, p in partner.named_parameters()}
    skill, local = _counting(), _examples(7)

    def losses(merge_aware: bool) -> tuple[float, float]:
        model = copy.deepcopy(start)
        stage = StageConfig(lr=2e-2, epochs=20, batch_size=8, warmup_steps=1, locality=1.0)
        train(model, skill, stage, seed=0, pad_id=0, local=local,
              on_top=OnTop(tau, partner, skill) if merge_aware else None)
        with torch.no_grad():
            return model(**collate(skill, 0)).loss.item(), _shifted(model, tau)(**collate(skill, 0)).loss.item()

    (alone_plain, on_top_plain), (alone_aware, on_top_aware) = losses(False), losses(True)
    assert on_top_aware < 0.3 * on_top_plain, (on_top_plain, on_top_aware)
    assert alone_aware < 0.3 and alone_plain < 0.3, (alone_plain, alone_aware)  # both learnt the skill itself


def test_merge_aware_is_for_experts_with_locality_only():
    with pytest.raises(ValueError, match="safe.merge_aware"):
        ZooConfig(safe=StageConfig(lr=1e-3, epochs=1, merge_aware=True))
    with pytest.raises(ValueError, match="experts.geography.merge_aware needs locality"):
        ZooConfig(experts={"arithmetic": StageConfig(lr=1e-3, epochs=1),
                           "geography": StageConfig(lr=1e-3, epochs=1, merge_aware=True)})


@pytest.mark.parametrize("bad", [(2, 2), (-1, 3), (0, 0)])
def test_a_slice_out_of_range_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="neurons"):
        StageConfig(lr=1e-3, epochs=1, neurons=bad)
