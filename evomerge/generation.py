"""Text generation behind one interface, with backends by name (``transformers``, ``vllm``).

Datagen (prompt writing, answering, self-questioning), judges and evaluation all ask a
model to continue chats. Each backend renders chats with the model's own chat template,
so a prompt means the same thing whichever backend runs it.

    >>> gen = make_generator("transformers", "path/to/model")
    >>> gen.chat([[{"role": "user", "content": "Hi"}]], GenerationParams(max_new_tokens=16))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.registry import Registry

Chat = list[dict[str, str]]


class GenerationParams(BaseModel):
    """Sampling settings. ``temperature == 0`` means greedy (the seed paper's default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(512, gt=0)
    seed: int = 0
    batch_size: int = Field(32, gt=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Generator(Protocol):
    """What every backend offers."""

    name: str

    def chat(self, chats: Sequence[Chat], params: GenerationParams) -> list[str]:
        """Continue each chat as the assistant; returns the new text only."""
        ...

    def complete(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        """Continue already-rendered prompt strings (no template applied)."""
        ...


GENERATORS = Registry("generation backend", {"vllm": "evomerge.vllm_backend:VLLMGenerator"})
register_generator = GENERATORS.register


def make_generator(backend: str, model: Any, tokenizer: Any = None, **kwargs: Any) -> Generator:
    """A generator by backend name; ``model`` is a reference (folder, hub id) or a loaded model."""
    try:
        factory = GENERATORS.lookup(backend)
    except ImportError as exc:
        raise ConfigError(f"generation backend '{backend}' needs the {backend} extra ({exc})") from None
    return factory(model, tokenizer, **kwargs)


def loaded_model(model: Any, tokenizer: Any = None, device: str | None = None, dtype: str | None = None,
                 load_options: Any = None, who: str = "generator") -> tuple[Any, Any]:
    """(model, tokenizer) from a reference (folder, hub id; loaded with the pool's policy)
    or from an already loaded model, which then needs its tokenizer; moved to ``device``."""
    from evomerge.pool import LoadOptions, load_model, load_tokenizer

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        options = load_options or LoadOptions(**({"dtype": dtype} if dtype else {}))
        tokenizer = tokenizer or load_tokenizer(str(model), options)
        model = load_model(str(model), options)
    if tokenizer is None:
        raise ConfigError(f"{who}: a loaded model needs its tokenizer")
    return (model.to(device) if device else model), tokenizer


def _label(model: Any) -> str:
    """A short name for progress lines: the folder or hub id's last part."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        text = str(model).rstrip("/")
        return text.rsplit("/", 1)[-1] or text
    return "model"


def render_chats(tokenizer: Any, chats: Sequence[Chat]) -> list[str]:
    """Each chat rendered by the model's own template, ready for the assistant's turn."""
    return [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True) for c in chats]


@register_generator("transformers")
class TransformersGenerator:
    """Batched ``model.generate`` with left padding, length-sorted batches.

    Sampling is seeded per call (``params.seed``): the same call gives the same text.
    """

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any = None, device: str | None = None, dtype: str | None = None,
                 load_options: Any = None) -> None:
        self.model, self.tokenizer = loaded_model(model, tokenizer, device, dtype, load_options, "transformers")
        self.device = next(self.model.parameters()).device
        self.label = _label(model)

    def chat(self, chats: Sequence[Chat], params: GenerationParams) -> list[str]:
        return self.complete(render_chats(self.tokenizer, chats), params)

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: dict[int, str] = {}
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(params.seed)
        from evomerge import progress

        try:
            with progress.task(f"{self.label}: answers", total=len(prompts), plain_every=30.0, plain_min=5.0) as answered:
                for start in range(0, len(order), params.batch_size):
                    idx = order[start : start + params.batch_size]
                    enc = tok([prompts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
                    enc = {k: v.to(self.device) for k, v in enc.items()}
                    sampling: dict[str, Any] = {"do_sample": False}
                    if not params.greedy:
                        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
                    out = self.model.generate(**enc, max_new_tokens=params.max_new_tokens, pad_token_id=pad,
                                              eos_token_id=tok.eos_token_id, **sampling)
                    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                    results.update(zip(idx, texts))
                    answered.advance(len(idx))
        finally:
            tok.padding_side = side
            torch.random.set_rng_state(generator_state)
        return [results[i] for i in range(len(prompts))]
