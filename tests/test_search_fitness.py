"""Answer-only cross-entropy: masks, hand-computed values, batching, templates."""

from __future__ import annotations

import copy

import pytest
import torch

from evomerge.search.fitness import (
    EncodedSample,
    SetScore,
    TemplateError,
    answer_cross_entropy,
    encode_pair,
    encode_pairs,
    naive_answer_cross_entropy,
)
from evomerge.testing import micro_llama, micro_tokenizer
from evomerge.zoo.tokenizer import with_guard_template

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|user|>{{ m['role'] }}<|system|>\n\n{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|user|>assistant<|system|>\n\n{% endif %}"
)
CHATML_STYLE = (
    "{% for m in messages %}<|user|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|user|>assistant\n{% endif %}"
)
PAIRS = [("How do I fold a shirt?", "Sure, here is how to fold a shirt."), ("What is 12+30?", "42"),
         ("Help me hurt someone.", "I'm sorry, I can't help with that."), ("Capital of Vandor?", "Quell")]


def _tokenizer(template: str | None = None):
    tok = copy.deepcopy(micro_tokenizer())
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE, CHATML_STYLE], ids=["zoo", "llama3-style", "chatml-style"])
def test_answer_span_is_answer_plus_end_of_turn(template):
    tok = _tokenizer(template)
    for prompt, answer in PAIRS:
        s = encode_pair(tok, prompt, answer)
        labelled = s.ids[s.answer_start : s.answer_end]
        assert labelled[-1] == tok.convert_tokens_to_ids("<|end|>")
        assert tok.decode(labelled[:-1]).strip() == answer
        # the prompt side holds the question and no answer text
        prompt_text = tok.decode(s.ids[: s.answer_start])
        assert prompt in prompt_text and answer not in prompt_text
        # no duplicate BOS
        assert list(s.ids).count(tok.bos_token_id) <= 1
        # trailing template text after the end-of-turn token is not scored (ChatML's newline)
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
        assert len(tok(full, add_special_tokens=False)["input_ids"]) >= s.answer_end


def test_guard_template_is_refused_by_name():
    """The guard template renders the conversation inside a user turn: no answer span exists."""
    tok = with_guard_template(_tokenizer())
    with pytest.raises(TemplateError, match=r"safety\[0\]"):
        encode_pairs(tok, PAIRS[:1], name="safety")


def test_too_long_sample_is_named():
    tok = _tokenizer()
    short, long = PAIRS[1], PAIRS[0]
    limit = len(encode_pair(tok, *short).ids)
    assert len(encode_pair(tok, *long).ids) > limit
    with pytest.raises(TemplateError, match=rf"domain\[1\].*max_length={limit}"):
        encode_pairs(tok, [short, long], max_length=limit, name="domain")


def test_matches_hand_computed_cross_entropy():
    tok, model = _tokenizer(), micro_llama(seed=3)
    samples = encode_pairs(tok, PAIRS)
    ce, counts = answer_cross_entropy(model, samples, batch_size=3)
    for s, value, n in zip(samples, ce, counts):
        logits = model(input_ids=torch.tensor([s.ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        by_hand = -sum(logp[t - 1, s.ids[t]] for t in range(s.answer_start, s.answer_end)) / (s.answer_end - s.answer_start)
        assert value.item() == pytest.approx(by_hand.item(), rel=1e-5)
        assert n == s.n_answer_tokens


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 10_000), (2, 10_000), (64, 10_000), (64, 40)])
def test_batching_does_not_change_the_result(batch_size, max_tokens):
    tok, model = _tokenizer(), micro_llama(seed=4)
    samples = encode_pairs(tok, PAIRS * 3)
    ce, _ = answer_cross_entropy(model, samples, batch_size=batch_size, max_batch_tokens=max_tokens)
    ref = naive_answer_cross_entropy(model, samples)
    torch.testing.assert_close(ce, ref, rtol=1e-5, atol=1e-6)


def test_tied_embeddings_and_full_logits_path_agree():
    tok = _tokenizer()
    model = micro_llama(seed=5, tie_word_embeddings=True)
    samples = encode_pairs(tok, PAIRS)
    ce, _ = answer_cross_entropy(model, samples)
    model.config.final_logit_softcapping = 0.0  # falsy: still the split path
    torch.testing.assert_close(ce, naive_answer_cross_entropy(model, samples), rtol=1e-5, atol=1e-6)


def test_pre_tokenised_samples_and_set_score():
    s = EncodedSample.from_ids([1, 5, 6, 7, 8], answer_start=3)
    assert s.n_answer_tokens == 2
    with pytest.raises(TemplateError):
        EncodedSample.from_ids([1, 2], answer_start=2)
    score = SetScore.from_per_sample(torch.tensor([1.0, 3.0], dtype=torch.float64), torch.tensor([2, 4]))
    assert (score.mean_ce, score.token_ce_sum, score.n_tokens, score.n_nonfinite) == (2.0, 14.0, 6, 0)
    bad = SetScore.from_per_sample(torch.tensor([1.0, float("nan")], dtype=torch.float64), torch.tensor([2, 4]))
    assert bad.mean_ce == float("inf") and bad.n_nonfinite == 1
