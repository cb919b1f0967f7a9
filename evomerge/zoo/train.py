"""Small, deterministic training loops for the zoo (pretraining and answer-only SFT).

Why not ``transformers.Trainer``: the zoo trains six ~1M-parameter models on two CPU
cores, where Trainer's per-step overhead dominates. A plain AdamW loop with
length-bucketed batches is several times faster and bit-for-bit reproducible.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from evomerge.zoo.config import StageConfig

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """Token ids and labels (prompt positions masked with -100)."""

    input_ids: list[int]
    labels: list[int]


def encode_chat_examples(tokenizer, prompt_texts: Sequence[str], answers: Sequence[str]) -> list[Example]:
    """``prompt_texts`` are rendered prompts (each ending in the assistant marker).

    Prompt and answer are tokenised separately so no BPE merge crosses the boundary,
    and the answer ends with the end-of-turn token so models learn to stop.
    """
    if not prompt_texts:
        return []
    prompts = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    replies = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [Example(p + a + [eos], [IGNORE_INDEX] * len(p) + a + [eos]) for p, a in zip(prompts, replies)]


def pack_documents(tokenizer, docs: Sequence[str], seq_len: int) -> list[Example]:
    """Concatenate documents (each closed by the end token) and cut into ``seq_len`` blocks."""
    stream: list[int] = []
    for doc, ids in zip(docs, tokenizer(list(docs), add_special_tokens=False)["input_ids"]):
        stream.extend(ids)
        if not doc.endswith("<|end|>\n"):
            stream.append(tokenizer.eos_token_id)
    return [Example(stream[i : i + seq_len], stream[i : i + seq_len]) for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _bucketed_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffle, sort chunks of 50 batches by length, then shuffle the batches: little padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches: list[list[Example]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(examples[i].input_ids))
        batches.extend([examples[i] for i in part[j : j + batch_size]] for j in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training (padding is masked in attention and labels)."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _slice_masks(model, stage: StageConfig) -> dict[str, torch.Tensor]:
    """Gradient masks for a neuron-sliced fine-tune (``stage.neurons`` / ``stage.heads``).

    An MLP is a sum over its neurons and attention a sum over its heads, so fine-tunes
    that own disjoint neurons and heads add up exactly within a layer: their task
    vectors interfere only through what each changes in later layers' inputs. Large
    models' fine-tunes are close to that (each task moves few, mostly distinct units);
    a model this small needs it spelled out.
    """
    masks: dict[str, torch.Tensor] = {}
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for name, param in model.named_parameters():
        if ".mlp." in name and stage.neurons is not None:
            i, n = stage.neurons
            keep = (torch.arange(cfg.intermediate_size) % n == i).to(param.dtype)
            masks[name] = keep[None, :] if name.endswith("down_proj.weight") else keep[:, None]
        elif ".self_attn." in name and stage.heads is not None:
            i, n = stage.heads
            keep = (torch.arange(cfg.num_attention_heads) % n == i).to(param.dtype).repeat_interleave(head_dim)
            masks[name] = keep[None, :] if name.endswith("o_proj.weight") else keep[:, None]
    return masks


@dataclass(frozen=True)
class OnTop:
    """A partner to train on top of (``StageConfig.merge_aware``): its task vector
    ``tau`` (parameter name -> partner minus the starting weights), the partner itself
    (eval mode; its hidden states are the targets) and the skill examples whose loss
    must also hold with ``tau`` added."""

    tau: dict[str, torch.Tensor]
    partner: Any
    skill: Sequence[Example]


def _on_top_loss(model, on_top: OnTop, reference, batch: Sequence[Example], skill_batch: Sequence[Example],
                 pad_id: int) -> torch.Tensor:
    """Merge-aware terms: at ``weights + tau`` every layer's hidden states stay at the
    partner's on ``batch`` and the skill loss holds on ``skill_batch``; plus the usual
    locality around ``reference`` (the start).

    Why: an expert whose change keeps its skill and leaves the safe model's hidden
    states alone *when added to the safe model* is what a merge of the two needs; large
    models' fine-tunes nearly are that without being told (docs/zoo.md measures it).
    """
    params = {n: p + on_top.tau[n] for n, p in model.named_parameters()}
    loss = _locality_loss(model, on_top.partner, batch, pad_id, params)
    loss = loss + _locality_loss(model, reference, batch, pad_id)
    return loss + functional_call(model, params, args=(), kwargs=collate(skill_batch, pad_id)).loss


def _locality_loss(model, reference, batch: Sequence[Example], pad_id: int,
                   params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean squared change of every layer's hidden states from ``reference``'s, relative
    to their size, on inputs outside the fine-tune's skill.

    Replaying the base's answers only pins the greedy output there; a task vector can
    still move hidden states that another model's task vector reads, which is what
    breaks a merge. Pinning the hidden states keeps each fine-tune's change to its own
    inputs, as large models' fine-tunes nearly are.
    """
    inputs = collate(batch, pad_id)
    del inputs["labels"]
    mask = inputs["attention_mask"].unsqueeze(-1).to(torch.float32)
    with torch.no_grad():
        ref = reference(**inputs, output_hidden_states=True).hidden_states[1:]
    if params is None:
        out = model(**inputs, output_hidden_states=True).hidden_states[1:]
    else:  # the model at other weights (``params``), gradients flowing back to its own
        out = functional_call(model, params, args=(), kwargs={**inputs, "output_hidden_states": True}).hidden_states[1:]
    total = 0.0
    for h, r in zip(out, ref):
        total = total + (((h - r) ** 2) * mask).sum() / ((r ** 2) * mask).sum().clamp_min(1e-8)
    return total / len(ref)


def train(model, examples: Sequence[Example], stage: StageConfig, seed: int, pad_id: int,
          local: Sequence[Example] = (), on_top: OnTop | None = None) -> list[float]:
    """Train ``model`` in place; returns the loss of every step (for the build log).
    ``on_top`` (with ``stage.locality``) adds the merge-aware terms of :func:`_on_top_loss`.

    ``stage.anchor_decay`` pulls the weights back toward where training started after
    every step (decoupled, like AdamW's weight decay but toward the start instead of
    zero). Fine-tunes then move only as far as their data needs: small task vectors.
    """
    rng = random.Random(seed)
    examples = list(examples)
    if stage.max_examples is not None and len(examples) > stage.max_examples:
        examples = rng.sample(examples, stage.max_examples)
    torch.manual_seed(seed)
    n_epochs = math.ceil(stage.epochs)
    epochs = [_bucketed_batches(examples, stage.batch_size, rng) for _ in range(n_epochs)]
    batches = [b for epoch in epochs for b in epoch][: max(1, round(stage.epochs * len(epochs[0])))]
    params = dict(model.named_parameters())
    if stage.train_only is not None:
        params = {n: p for n, p in params.items() if any(part in n for part in stage.train_only)}
        if not params:
            raise ValueError(f"train_only {list(stage.train_only)} matches no parameter")
    masks = _slice_masks(model, stage) if stage.neurons is not None or stage.heads is not None else {}
    if masks:
        params = {n: p for n, p in params.items() if n in masks}
    frozen = [p for n, p in model.named_parameters() if n not in params]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(list(params.values()), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.0)
    total = len(batches)

    def lr_at(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = (step - stage.warmup_steps) / max(1, total - stage.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    anchor = {n: p.detach().clone() for n, p in params.items()} if stage.anchor_decay else None
    reference = None
    if stage.locality and local:
        import copy

        reference = copy.deepcopy(model).eval()
        local = list(local)
        local_rng = random.Random(seed + 1)
        if on_top is not None:
            skill = list(on_top.skill)
            skill_rng = random.Random(seed + 99)
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    report_every = max(1, total // 10)
    for step, batch in enumerate(batches, 1):
        inputs = collate(batch, pad_id)
        loss = model(**inputs).loss
        if reference is not None:
            near = local_rng.sample(local, min(len(local), stage.batch_size))
            if on_top is None:
                loss = loss + stage.locality * _locality_loss(model, reference, near, pad_id)
            else:
                loss = loss + stage.locality * _on_top_loss(model, on_top, reference, near,
                                                            skill_rng.sample(skill, len(near)), pad_id)
        loss.backward()
        for name, mask in masks.items():
            params[name].grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        if anchor is not None:
            rate = scheduler.get_last_lr()[0] * stage.anchor_decay
            with torch.no_grad():
                for name, param in params.items():
                    param.sub_(param - anchor[name], alpha=rate)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % report_every == 0 or step == total:
            log.info("train: step %d/%d loss %.3f (%.0f s)", step, total, losses[-1], time.perf_counter() - started)
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return losses
