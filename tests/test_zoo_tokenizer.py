"""The zoo tokenizer: offline BPE, chat template and Llama Guard template round trips."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from evomerge.testing import micro_tokenizer
from evomerge.zoo.tokenizer import with_guard_template

MESSAGES = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "12+30=42."}]


def test_chat_template_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = micro_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == rendered
    assert rendered == "<|bos|><|user|>\nWhat is 12+30?\n<|assistant|>\n12+30=42.<|end|>\n"
    prompt = loaded.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = loaded(rendered, add_special_tokens=False)["input_ids"]
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == loaded.bos_token_id and loaded.eos_token_id in ids
    assert loaded.decode(ids, skip_special_tokens=False) == rendered


def test_digits_are_single_tokens():
    tok = micro_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("1234+56", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p.isdigit()] == list("123456")


def test_guard_template_selects_role_and_lists_categories():
    guard = with_guard_template(micro_tokenizer())
    pair = guard.apply_chat_template(MESSAGES, tokenize=False)
    assert "unsafe content in 'Agent' messages" in pair
    assert "User: What is 12+30?\n\nAgent: 12+30=42.\n\n<END CONVERSATION>" in pair
    assert "ONLY THE LAST Agent message" in pair
    assert "S1: Violent Crimes.\nS2: Non-Violent Crimes." in pair and "S14: Code Interpreter Abuse." in pair
    prompt_only = guard.apply_chat_template(MESSAGES[:1], tokenize=False)
    assert "unsafe content in 'User' messages" in prompt_only and "Agent:" not in prompt_only
    assert pair.endswith("<|assistant|>\n")


def test_guard_template_rejects_non_alternating_roles():
    guard = with_guard_template(micro_tokenizer())
    with pytest.raises(Exception, match="alternate"):
        guard.apply_chat_template([MESSAGES[1], MESSAGES[0]], tokenize=False)
