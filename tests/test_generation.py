"""The generation interface: transformers backend on micro models, registry errors."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.generation import GenerationParams, make_generator, render_chats
from evomerge.testing import save_micro_model
from evomerge.zoo.evaluate import generate

CHATS = [[{"role": "user", "content": "How do I fold a shirt?"}], [{"role": "user", "content": "What is 12+30?"}],
         [{"role": "user", "content": "Capital of Vandor?"}]]


@pytest.fixture
def model_dir(tmp_path):
    return save_micro_model(tmp_path / "m", seed=7)


def test_greedy_chat_matches_a_plain_greedy_loop(model_dir):
    gen = make_generator("transformers", model_dir)
    params = GenerationParams(max_new_tokens=6, batch_size=2)
    out = gen.chat(CHATS, params)
    ref = generate(gen.model, gen.tokenizer, render_chats(gen.tokenizer, CHATS), max_new_tokens=6)
    assert out == ref and len(out) == 3


def test_sampling_is_seeded(model_dir):
    gen = make_generator("transformers", model_dir)
    params = GenerationParams(temperature=1.0, max_new_tokens=8, seed=5)
    assert gen.chat(CHATS, params) == gen.chat(CHATS, params)
    # chat is complete() on the model's own template rendering
    assert gen.complete(render_chats(gen.tokenizer, CHATS), params) == gen.chat(CHATS, params)
    other = gen.chat(CHATS, params.model_copy(update={"seed": 6}))
    assert other != gen.chat(CHATS, params)  # the seed is what fixes the draw


def test_unknown_backend_is_named(model_dir):
    with pytest.raises(ConfigError, match="unknown generation backend 'tgi'"):
        make_generator("tgi", model_dir)
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        from evomerge.testing import micro_llama

        make_generator("transformers", micro_llama())
