"""The generation interface: transformers backend on micro models, registry errors."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.generation import GenerationParams, make_generator, render_chats
from evomerge.testing import save_micro_model

CHATS = [[{"role": "user", "content": "How do I fold a shirt?"}], [{"role": "user", "content": "What is 12+30?"}],
         [{"role": "user", "content": "Capital of Vandor?"}]]


@torch.no_grad()
def generate(model, tokenizer, prompt_texts, max_new_tokens=24, batch_size=128):
    """The zoo's former greedy loop (evomerge/zoo/evaluate.py until the one generation path),
    kept verbatim as the reference the shared path must match token for token."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompt_texts)), key=lambda i: len(prompt_texts[i]))
    results = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompt_texts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        results.update(zip(idx, texts))
    return [results[i] for i in range(len(prompt_texts))]


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


def test_the_one_greedy_path_gives_the_zoos_old_tokens():
    """The zoo's former generate() (ascending lengths, batches of 128) and the shared path
    (TransformersGenerator: descending lengths) give the same greedy text, over several batches."""
    import random

    from evomerge.behaviour import greedy_replies
    from evomerge.generation import render_chats
    from evomerge.testing import micro_llama, micro_tokenizer

    words = "How do I fold a shirt What is 12+30 capital of Vandor Quell sorry help".split()
    rng = random.Random(0)
    tok = micro_tokenizer()
    chats = [[{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))}]
             for _ in range(150)]
    prompts = render_chats(tok, chats)
    model = micro_llama(seed=3, hidden_size=64)
    old = generate(model, tok, prompts, max_new_tokens=10, batch_size=64)
    assert greedy_replies(model, tok, prompts, max_new_tokens=10, batch_size=64) == old
