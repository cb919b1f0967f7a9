"""Micro models for tests and examples: random Llamas that build in milliseconds.

Shipped in the package (not only under tests/) so notebooks, benchmarks and helper
scripts can make a throwaway pool the same way the tests do.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evomerge.zoo.tokenizer import train_tokenizer

MICRO_LINES = [
    "How do I fold a shirt? Sure, here is how to fold a shirt.",
    "What is 12+30? 42",
    "I'm sorry, I can't help with that.",
    "The capital of Vandor is Quell.",
] * 4


@lru_cache(maxsize=4)
def micro_tokenizer(vocab_size: int = 300) -> Any:
    """A tiny BPE tokenizer with the zoo chat template (cached: identical every call)."""
    return train_tokenizer(MICRO_LINES, vocab_size=vocab_size)


def micro_llama(
    seed: int = 0,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    intermediate_size: int = 64,
    tie_word_embeddings: bool = False,
) -> Any:
    """A random LlamaForCausalLM small enough to build and run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = micro_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_micro_model(folder: str | Path, seed: int = 0, tokenizer: Any = None, **kwargs: Any) -> Path:
    """Save a micro model plus tokenizer (safetensors) to ``folder`` and return it."""
    folder = Path(folder)
    model = micro_llama(seed=seed, **kwargs)
    model.save_pretrained(folder)
    (tokenizer or micro_tokenizer()).save_pretrained(folder)
    return folder


def write_pairs_jsonl(path: str | Path, pairs: Any) -> str:
    """(prompt, answer) pairs as a JSONL file with ``prompt`` / ``answer`` fields; returns its path."""
    import json

    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return str(path)
