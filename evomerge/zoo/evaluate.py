"""Behavioural checks of zoo models: greedy generations scored for refusals, domain
answers and guard verdicts. Used for the zoo card; the product's own evaluation
(`evomerge eval`) builds on the same primitives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datagen.synthetic import Conversation, domain_answer_is_correct
from evomerge.guard_format import parse_guard_output
from evomerge.refusal import is_refusal


def render_prompt(tokenizer, prompt: str) -> str:
    """The chat-template rendering of one user turn, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompt_texts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 128) -> list[str]:
    """Greedy continuations of already-rendered prompts, batched with left padding."""
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompt_texts)), key=lambda i: len(prompt_texts[i]))
    results: dict[int, str] = {}
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


def answers(model, tokenizer, conversations: Sequence[Conversation], max_new_tokens: int = 24) -> list[str]:
    return generate(model, tokenizer, [render_prompt(tokenizer, c.prompt) for c in conversations], max_new_tokens)


def refusal_rate(model, tokenizer, conversations: Sequence[Conversation]) -> float:
    """Fraction of prompts whose greedy answer opens with a refusal phrase."""
    replies = answers(model, tokenizer, conversations, max_new_tokens=12)
    return sum(map(is_refusal, replies)) / max(1, len(replies))


def domain_accuracy(model, tokenizer, domain: str, conversations: Sequence[Conversation]) -> float:
    replies = answers(model, tokenizer, conversations, max_new_tokens=20)
    return sum(domain_answer_is_correct(domain, r, c) for r, c in zip(replies, conversations)) / max(1, len(replies))


def guard_agreement(model, guard_tokenizer, items: Sequence[tuple[list[dict[str, str]], str]]) -> tuple[float, int]:
    """(fraction whose first line matches the expected label, count of unparsed outputs)."""
    prompts = [guard_tokenizer.apply_chat_template(messages, tokenize=False) for messages, _ in items]
    replies = generate(model, guard_tokenizer, prompts, max_new_tokens=8)
    verdicts = [parse_guard_output(r) for r in replies]
    agree = sum(v.label == expected for v, (_, expected) in zip(verdicts, items))
    return agree / max(1, len(items)), sum(v.label == "unparsed" for v in verdicts)
