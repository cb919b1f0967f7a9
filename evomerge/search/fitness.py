"""Answer-only cross-entropy: how a candidate merge is scored.

Each (question, answer) pair is rendered with the pool's chat template; the loss covers
the answer tokens and the template's end-of-turn token, never the prompt. Why answer-only:
the safety signal is "would this model say *this refusal* to *this prompt*", and prompt
tokens only add noise shared by every candidate.

Pitfalls handled here: the rendered text is
tokenised whole with ``add_special_tokens=False`` (no duplicate BOS, no join artefacts at
the prompt/answer boundary), the prompt rendering must be a token prefix of the full one,
padding masks come from lengths (never ``ids != pad``), and per-sample means are computed
with ``reduction='none'`` so batching never mixes samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError


class TemplateError(EvomergeError):
    """A chat template cannot be scored answer-only (prompt is not a prefix, empty answer)."""


@dataclass(frozen=True)
class EncodedSample:
    """Token ids of one rendered conversation; labels are ``ids[answer_start:answer_end]``."""

    ids: tuple[int, ...]
    answer_start: int
    answer_end: int

    @classmethod
    def from_ids(cls, ids: Sequence[int], answer_start: int, answer_end: int | None = None) -> EncodedSample:
        """Pre-tokenised input (benchmarks, other front ends): answer runs to the end by default."""
        end = len(ids) if answer_end is None else answer_end
        if not 0 < answer_start < end <= len(ids):
            raise TemplateError(f"answer span [{answer_start}, {end}) is empty or outside {len(ids)} tokens")
        return cls(tuple(int(i) for i in ids), answer_start, end)

    @property
    def n_answer_tokens(self) -> int:
        return self.answer_end - self.answer_start

    def head(self, n_tokens: int) -> EncodedSample:
        """Only the first ``n_tokens`` answer tokens scored (and fed): where a greedy answer
        decides between refusing and complying."""
        end = min(self.answer_end, self.answer_start + n_tokens)
        return EncodedSample(self.ids[:end], self.answer_start, end)


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int | None = None, where: str = "sample") -> EncodedSample:
    """Render one (prompt, answer) pair and locate its answer span.

    The span starts right after the generation prompt and ends after the first special
    token following the answer text (the end-of-turn marker: ``<|eot_id|>``,
    ``<|im_end|>``, ``</s>``...); anything the template adds after it (a newline) is not
    scored, because the model is never asked to produce it.
    """
    user = [{"role": "user", "content": prompt}]
    prefix_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full[: len(prefix)] != prefix:
        raise TemplateError(
            f"{where}: the chat template's prompt rendering is not a token prefix of the full conversation, "
            "so the answer cannot be scored on its own (templates that rewrite earlier turns are not supported)"
        )
    specials = _end_of_turn_ids(tokenizer)
    end = len(full)
    for i in range(len(prefix), len(full)):
        if full[i] in specials and i > len(prefix):
            end = i + 1
            break
    if end <= len(prefix):
        raise TemplateError(f"{where}: the answer renders to no tokens")
    if max_length is not None and end > max_length:
        raise TemplateError(
            f"{where}: {end} tokens with the answer, over fitness.max_length={max_length}; "
            "raise the limit or drop the sample (truncating would score a cut answer)"
        )
    return EncodedSample(tuple(full[:end]), len(prefix), end)


def encode_pairs(
    tokenizer, pairs: Iterable[tuple[str, str]], max_length: int | None = None, name: str = "data"
) -> list[EncodedSample]:
    return [encode_pair(tokenizer, p, a, max_length, where=f"{name}[{i}]") for i, (p, a) in enumerate(pairs)]


def _batches(samples: Sequence[EncodedSample], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) so padding stays small and the biggest
    batch comes first (an out-of-memory error shows up at once, not at the end)."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].ids), i))
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(samples[current[0]].ids) if current else len(samples[i].ids)
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_batch_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def _decoder_and_head(model):
    """(decoder trunk, output head) when logits can be computed only where labels are,
    else ``None``: the lm_head on a 128k vocabulary is the biggest cost of a scoring pass."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, "base_model", None)
    if head is None or trunk is None or trunk is model:
        return None
    return trunk, head


@dataclass(frozen=True)
class _Batch:
    ids: torch.Tensor  # [B, W] right-padded
    mask: torch.Tensor  # [B, W] from lengths
    rows: torch.Tensor  # [K] batch row of each labelled position
    cols: torch.Tensor  # [K] position whose logits predict the label
    targets: torch.Tensor  # [K] label token ids
    members: torch.Tensor  # [B] sample index of each row


class ScoringPlan:
    """The batches of a fixed sample set, collated once and reused for every candidate.

    Why: a search scores the same samples hundreds of times; padding, index tensors and
    host-to-device copies are genome-independent, so they are paid once here and each
    candidate costs only the forward passes.
    """

    def __init__(self, samples: Sequence[EncodedSample], batch_size: int = 64, max_batch_tokens: int = 16384,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.n = len(samples)
        self.counts = torch.tensor([s.n_answer_tokens for s in samples], dtype=torch.long)
        self.batches: list[_Batch] = []
        for idx in _batches(samples, batch_size, max_batch_tokens):
            width = max(len(samples[i].ids) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, i in enumerate(idx):
                s = samples[i]
                ids[r, : len(s.ids)] = torch.tensor(s.ids)
                mask[r, : len(s.ids)] = 1
                # position t predicts token t + 1
                rows.extend([r] * s.n_answer_tokens)
                cols.extend(range(s.answer_start - 1, s.answer_end - 1))
                targets.extend(s.ids[s.answer_start : s.answer_end])
            dev = self.device
            self.batches.append(_Batch(ids.to(dev), mask.to(dev), torch.tensor(rows, device=dev),
                                       torch.tensor(cols, device=dev), torch.tensor(targets, device=dev),
                                       torch.tensor(idx)))

    @torch.no_grad()
    def run(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (mean CE over answer tokens, answer-token count), in input order."""
        sums = torch.zeros(self.n, dtype=torch.float64)
        split = _decoder_and_head(model)
        was_training = model.training
        model.eval()
        try:
            for b in self.batches:
                if split is not None:
                    trunk, head = split
                    hidden = trunk(input_ids=b.ids, attention_mask=b.mask).last_hidden_state
                    logits = head(hidden[b.rows, b.cols])
                else:
                    logits = model(input_ids=b.ids, attention_mask=b.mask).logits[b.rows, b.cols]
                token_ce = torch.nn.functional.cross_entropy(logits.float(), b.targets, reduction="none")
                per_row = torch.zeros(len(b.members), dtype=torch.float64, device=token_ce.device)
                per_row.index_add_(0, b.rows, token_ce.double())
                sums[b.members] = per_row.cpu()
        finally:
            model.train(was_training)
        return sums / self.counts, self.counts


def answer_cross_entropy(
    model,
    samples: Sequence[EncodedSample],
    batch_size: int = 64,
    max_batch_tokens: int = 16384,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (mean CE over answer tokens, answer-token count), in input order.

    Batched with right padding and length sorting; the attention mask comes from the
    lengths. Logits are computed in the model's dtype and the CE in float32. For many
    candidates on the same samples, build a :class:`ScoringPlan` once instead.
    """
    if not samples:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return ScoringPlan(samples, batch_size, max_batch_tokens, device).run(model)


def naive_answer_cross_entropy(model, samples: Sequence[EncodedSample]) -> torch.Tensor:
    """One sample at a time, full logits, HF's own shifted loss: the reference the batched
    scorer is tested and benchmarked against."""
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.ids])
            labels = torch.full_like(ids, -100)
            labels[0, s.answer_start : s.answer_end] = ids[0, s.answer_start : s.answer_end]
            out.append(float(model(input_ids=ids, labels=labels).loss))
    return torch.tensor(out, dtype=torch.float64)


@dataclass(frozen=True)
class SetScore:
    """One data set's result for one candidate."""

    mean_ce: float  # mean over samples of the per-sample mean CE (the fitness term)
    token_ce_sum: float  # sum over all answer tokens, for token-weighted averaging
    n_tokens: int
    n_samples: int
    n_nonfinite: int

    @classmethod
    def from_per_sample(cls, ce: torch.Tensor, counts: torch.Tensor) -> SetScore:
        finite = torch.isfinite(ce)
        n_bad = int((~finite).sum())
        mean = float(ce.mean()) if n_bad == 0 else math.inf
        return cls(mean, float((ce * counts).sum()), int(counts.sum()), len(ce), n_bad)
