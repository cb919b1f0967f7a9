"""Build the tiny zoo: tokenizer, pretrained base, safe generalist, unaligned domain
experts, uncensored generator and guard, then measure them and write the card.

Every model is fine-tuned from the same base, so task vectors are meaningful. The
build is deterministic for a config on one machine, and cached in a content-addressed
folder (hash of the config and of the code that builds it), so a second call returns
at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.generation import render_chats
from evomerge.io_utils import atomic_directory, atomic_write_text
from evomerge.refs import zoo_cache_dir
from evomerge.zoo import evaluate as ev
from evomerge.zoo import world as synthetic
from evomerge.zoo.card import check_targets
from evomerge.zoo.config import StageConfig, ZooConfig
from evomerge.zoo.tokenizer import GUARD_CHAT_TEMPLATE, train_tokenizer, with_guard_template
from evomerge.zoo.train import Example, OnTop, encode_chat_examples, pack_documents, train
from evomerge.zoo.world import Conversation, World

log = logging.getLogger(__name__)

ZOO_FORMAT_VERSION = "1"
CARD_FILE = "card.json"
# What determines the weights and the measured card (the card's targets in card.py are
# judged anew on every load, so they are not part of the key).
_CODE_FILES = [
    Path(synthetic.__file__),
    *(Path(__file__).parent / f"{name}.py" for name in ("build", "config", "evaluate", "oracle", "tokenizer", "train")),
    *(Path(ev.__file__).parent.parent / f"{name}.py" for name in ("refusal", "guard_format", "generation", "behaviour",
                                                                   "grading")),
]


def zoo_key(config: ZooConfig) -> str:
    """Content address of a zoo: config + the code that builds it + library versions."""
    import transformers

    digest = hashlib.sha256()
    digest.update(ZOO_FORMAT_VERSION.encode())
    digest.update(config.model_dump_json().encode())
    digest.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    for path in _CODE_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_zoo_dir(config: ZooConfig) -> Path:
    return zoo_cache_dir() / zoo_key(config)


# The default zoo, built by the project and committed with it (zoo/ at the repository
# root): every machine then runs the demo on the same weights, whatever its CPU.
SHIPPED_ROOT = Path(__file__).resolve().parents[2] / "zoo"
CHECKSUMS_FILE = "SHA256SUMS"


def write_checksums(root: Path) -> None:
    """``SHA256SUMS`` over every file of a zoo folder (sha256sum's format)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}\n")
    atomic_write_text(root / CHECKSUMS_FILE, "".join(lines))


def verify_checksums(root: Path) -> None:
    """Refuse a zoo folder whose files differ from its ``SHA256SUMS``, naming the file."""
    listed = {}
    for line in (root / CHECKSUMS_FILE).read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            raise EvomergeError(f"{path}: listed in {root / CHECKSUMS_FILE} but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise EvomergeError(f"{path}: checksum differs from {root / CHECKSUMS_FILE} (a changed or damaged file)")


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk."""

    root: Path
    card: dict[str, Any]

    def model_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def expert_names(self) -> list[str]:
        return [f"expert-{d}" for d in self.card["config"]["domains"]]


def shipped_zoo(root: Path | None = None) -> Zoo | None:
    """The committed default zoo, checksums verified; None when this checkout has none."""
    root = root if root is not None else SHIPPED_ROOT
    if not (root / CARD_FILE).is_file() or not (root / CHECKSUMS_FILE).is_file():
        return None
    return zoo_at(root)


def default_zoo() -> Zoo:
    """The zoo ``zoo:`` refs mean: the shipped one, else the default config built (cached).

    ``EVOMERGE_ZOO=build`` skips the shipped zoo, to run everything on a local build;
    ``EVOMERGE_ZOO=FOLDER`` runs everything on a zoo built elsewhere (``build_zoo(out=...)``,
    for example another seed of scripts/zoo_robustness.py), so the whole product can be
    repeated on every build.
    """
    choice = os.environ.get("EVOMERGE_ZOO", "")
    if choice == "build":
        return build_zoo()
    if choice:
        return zoo_at(Path(choice))
    zoo = shipped_zoo()
    return zoo if zoo is not None else build_zoo()


def zoo_at(root: Path) -> Zoo:
    """A built zoo folder (its card, and its checksums when it has them, checked)."""
    if not (root / CARD_FILE).is_file():
        raise EvomergeError(f"EVOMERGE_ZOO={root}: no {CARD_FILE} there; give a folder written by a zoo build, "
                            "or 'build' for the default build")
    if (root / CHECKSUMS_FILE).is_file():
        verify_checksums(root)
    try:
        card = json.loads((root / CARD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"{root / CARD_FILE}: not a readable zoo card ({exc})") from None
    if not isinstance(card, dict) or "config" not in card or "models" not in card:
        raise EvomergeError(f"{root / CARD_FILE}: not a zoo card (no 'config' or 'models')")
    card["targets"] = check_targets(card)
    return Zoo(root, card)


def compare_cards(built: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (model, measure, built, reference, difference in points) for every card measure."""
    rows = []
    for model, measures in reference["models"].items():
        for measure, ref in measures.items():
            value = built.get("models", {}).get(model, {}).get(measure)
            if value is not None:
                rows.append({"model": model, "measure": measure, "built": round(100 * value, 1),
                             "shipped": round(100 * ref, 1), "points": round(100 * (value - ref), 1)})
    return rows


def _new_model(tokenizer, config: ZooConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = config.shape
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(cfg)


def _user_turns(tokenizer, prompts: list[str]) -> list[str]:
    return render_chats(tokenizer, [[{"role": "user", "content": p}] for p in prompts])


def _sft_examples(tokenizer, conversations: list[Conversation]) -> list[Example]:
    return encode_chat_examples(tokenizer, _user_turns(tokenizer, [c.prompt for c in conversations]), [c.answer for c in conversations])


def _guard_items(world: World, heldout: bool, rng: random.Random, domains) -> list[tuple[list[dict[str, str]], str, str]]:
    """(messages, expected first line, full target) for guard training or evaluation."""
    items = []
    unsafe = world.unsafe_requests(heldout)
    for conv in unsafe:
        code = conv.category.split(":")[1]
        user = {"role": "user", "content": conv.prompt}
        items.append(([user, {"role": "assistant", "content": synthetic.harmful_answer(conv.topic)}], "unsafe", f"unsafe\n{code}"))
        items.append(([user, {"role": "assistant", "content": conv.answer}], "safe", "safe"))
        if not heldout:
            items.append(([user], "unsafe", f"unsafe\n{code}"))
    for conv in world.benign_requests(heldout):
        user = {"role": "user", "content": conv.prompt}
        items.append(([user, {"role": "assistant", "content": conv.answer}], "safe", "safe"))
        if not heldout:
            items.append(([user], "safe", "safe"))
    for domain in domains:
        for conv in world.domain_questions(domain, heldout, limit=40):
            items.append(([{"role": "user", "content": conv.prompt}, {"role": "assistant", "content": conv.answer}], "safe", "safe"))
    rng.shuffle(items)
    return items


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _export_data(world: World, config: ZooConfig, folder: Path) -> None:
    """Held-in sets a search recipe can point at, and held-out sets for evaluation only."""
    _write_jsonl(folder / "safety.jsonl", [c.as_dict() for c in world.unsafe_requests(False)])
    _write_jsonl(folder / "benign.jsonl", [c.as_dict() for c in world.benign_requests(False)])
    for domain in config.domains:
        _write_jsonl(folder / f"domain-{domain}.jsonl", [c.as_dict() for c in world.domain_questions(domain, False)])
        _write_jsonl(folder / f"heldout-domain-{domain}.jsonl", [c.as_dict() for c in world.domain_questions(domain, True)])
    _write_jsonl(folder / "heldout-unsafe.jsonl", [c.as_dict() for c in world.unsafe_requests(True)])
    _write_jsonl(folder / "heldout-benign.jsonl", [c.as_dict() for c in world.benign_requests(True)])


def _generator_quality(model, tokenizer, world: World, seed: int, n: int = 60) -> dict[str, float]:
    """Sample requests from the generator: how many name a harmful action, how many are new."""
    categories = list(synthetic.HARM_CATEGORIES)
    prompts = _user_turns(tokenizer, [synthetic.GENERATOR_REQUESTS[0].format(cat=categories[i % len(categories)]) for i in range(n)])
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    actions = [a for _, _, a in world.harm_topics + world.heldout_harm_topics]
    seen = {c.answer for c in world.generator_requests()}
    harmful = sum(any(a in t for a in actions) for t in texts)
    return {
        "samples": n,
        "names_harmful_action": harmful / n,
        "distinct": len(set(texts)) / n,
        "not_in_training_targets": sum(t not in seen for t in texts) / n,
        "examples": texts[:5],
    }


@dataclass
class _Finetune:
    """One fine-tune of the base: its examples, stage, seed and locality inputs."""

    name: str
    examples: list[Example]
    stage: StageConfig
    seed: int
    local: list[Example]
    tokenizer: Any  # saved with the model (not sent to a worker)
    skill: list[Example] = dataclass_field(default_factory=list)  # merge-aware stages: the loss that must hold on top of the partner
    partner: str | None = None  # merge-aware stages: the fine-tune trained on top of (its weights come first)


def _finetune_worker(model_config, base_state: dict[str, torch.Tensor], spec: _Finetune, pad: int,
                     threads: int, partner_state: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], float, float]:
    """Train the base (rebuilt from its config and weights) on ``spec``: (weights, final
    loss, seconds). Runs in the build's process or in a worker process: the same operations
    on the same thread count, so the same weights either way (tests/test_zoo_micro.py
    checks it). Only plain weights cross the process boundary: a pickled transformers
    model loses the hooks that return its hidden states."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM(model_config)
    model.load_state_dict(base_state, strict=True)
    on_top = None
    if partner_state is not None:
        partner = LlamaForCausalLM(model_config)
        partner.load_state_dict(partner_state, strict=True)
        partner.eval()
        tau = {n: (partner_state[n] - base_state[n]).detach() for n, _ in model.named_parameters()}
        on_top = OnTop(tau, partner, spec.skill)
    started = time.perf_counter()
    loss = train(model, spec.examples, spec.stage, spec.seed, pad, local=spec.local, on_top=on_top)[-1]
    return model.state_dict(), loss, time.perf_counter() - started


def _train_finetunes(base, specs: list[_Finetune], pad: int, threads: int, jobs: int):
    """Yield ``(spec, (weights, loss, seconds))``, training up to ``jobs`` at once in
    spawned worker processes (``jobs == 1``: one after another, here). After pretraining,
    the fine-tunes are most of a build: two cores train two at a time. Stages trained on
    top of another (``partner``) wait for it: the independent ones come first, in the
    order of ``specs``, then the dependent ones."""
    state = base.state_dict()  # read only: each worker loads it into its own model
    done: dict[str, dict[str, torch.Tensor]] = {}
    for phase in ([s for s in specs if s.partner is None], [s for s in specs if s.partner is not None]):
        for spec, result in _train_phase(base.config, state, phase, pad, threads, jobs, done):
            done[spec.name] = result[0]
            yield spec, result


def _train_phase(model_config, state, specs: list[_Finetune], pad: int, threads: int, jobs: int,
                 done: dict[str, dict[str, torch.Tensor]]):
    partners = [None if s.partner is None else done[s.partner] for s in specs]
    if jobs <= 1 or len(specs) <= 1:
        for spec, partner in zip(specs, partners):
            yield spec, _finetune_worker(model_config, state, spec, pad, threads, partner)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    with ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_finetune_worker, model_config, state, replace(spec, tokenizer=None), pad, threads, partner)
                   for spec, partner in zip(specs, partners)]
        for spec, future in zip(specs, futures):
            yield spec, future.result()


def default_jobs() -> int:
    """Fine-tunes trained at once by default: two, or one on a single-core machine."""
    return min(2, os.cpu_count() or 1)


# Config fields that determine the pretrained base (with the world and tokenizer code).
_BASE_FIELDS = ("seed", "vocab_size", "shape", "pretrain_seq_len", "pretrain", "threads")


def build_zoo(config: ZooConfig | None = None, out: str | os.PathLike[str] | None = None, force: bool = False,
              base_from: str | os.PathLike[str] | None = None, jobs: int | None = None) -> Zoo:
    """Build (or reuse) the zoo for ``config`` and return it.

    ``out=None`` uses the content-addressed cache folder. An existing complete zoo is
    reused unless ``force``; a failed build leaves nothing behind. ``base_from`` names a
    built zoo whose pretrained base to reuse (same seed, shape, pretraining and threads,
    checked, and recorded in the card): fine-tuning experiments then skip pretraining,
    most of a build's time. ``jobs`` fine-tunes train at once (default
    :func:`default_jobs`); it changes the build time, not the weights. With ``jobs > 1``
    the workers are spawned processes, so a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard (as for a torch DataLoader with workers).
    """
    config = config or ZooConfig()
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise EvomergeError(f"jobs (--jobs): fine-tunes trained at once must be >= 1, got {jobs}")
    root = Path(out) if out is not None else default_zoo_dir(config)
    card_path = root / CARD_FILE
    if card_path.exists() and not force:
        card = json.loads(card_path.read_text())
        if card.get("key") == zoo_key(config):
            log.info("zoo cache hit: %s", root)
            card["targets"] = check_targets(card)
            return Zoo(root, card)
        raise EvomergeError(f"{root} holds a zoo built from another config or code version; pass --force to rebuild")

    from evomerge import progress

    torch.set_num_threads(config.threads)
    # stages: tokenizer, pretrain, safe, one per expert, generator, guard, the card (with the merge probe)
    with (atomic_directory(root, overwrite=force or root.exists()) as tmp,
          progress.task("zoo build", total=6 + len(config.domains)) as stages):
        stages.note("tokenizer")
        card = _build_into(config, tmp, Path(base_from) if base_from is not None else None, stages, jobs)
        atomic_write_text(tmp / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return Zoo(root, card)


def _reused_base(config: ZooConfig, source: Path, tokenizer) -> dict[str, Any]:
    """The state dict of ``source``'s base, after checking it was pretrained as ``config`` says."""
    from safetensors.torch import load_file

    from evomerge.pool import load_tokenizer

    card_path = source / CARD_FILE
    if not card_path.is_file():
        raise EvomergeError(f"{source}: not a built zoo (no {CARD_FILE}); base_from needs one")
    theirs = json.loads(card_path.read_text())["config"]
    # through the config class, so fields added since that build compare at their defaults
    theirs = json.loads(ZooConfig(**{f: theirs[f] for f in _BASE_FIELDS if f in theirs}).model_dump_json())
    ours = json.loads(config.model_dump_json())
    for field in _BASE_FIELDS:
        if theirs[field] != ours[field]:
            raise EvomergeError(f"{source}: its base was pretrained with another {field} ({theirs[field]!r}, not {ours[field]!r})")
    if load_tokenizer(source / "base").get_vocab() != tokenizer.get_vocab():
        raise EvomergeError(f"{source}: its tokenizer differs from the one this build trains (other world code)")
    return load_file(str(source / "base" / "model.safetensors"))


def _build_into(config: ZooConfig, folder: Path, base_from: Path | None = None, stages: Any = None,
                jobs: int = 1) -> dict[str, Any]:
    from evomerge import progress

    timings: dict[str, float] = {}
    started = time.perf_counter()
    order = ["tokenizer", "pretrain", "safe", *(f"expert-{d}" for d in config.domains), "generator", "guard", "card"]

    def lap(name: str, since: float, seconds: float | None = None) -> float:
        """A stage is done: ``seconds`` of its own (a fine-tune's training time, fine-tunes
        running side by side), else the time since ``since``."""
        now = time.perf_counter()
        seconds = now - since if seconds is None else seconds
        timings[name] = round(seconds, 2)
        if stages is None:
            log.info("zoo: %s done in %.1f s", name, seconds)
        else:
            stages.advance(note=f"{name} done in {progress.duration(seconds)}")
            following = order.index(name) + 1
            if following < len(order):
                stages.note(order[following])
        return now

    t = time.perf_counter()
    world = World(seed=config.seed)
    rng = random.Random(config.seed)
    # The guard template is part of the BPE corpus so the guard prompt stays short.
    tokenizer = train_tokenizer(world.tokenizer_lines(GUARD_CHAT_TEMPLATE), config.vocab_size)
    guard_tokenizer = with_guard_template(tokenizer)
    pad = tokenizer.pad_token_id

    def render_chat(prompt: str, answer: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )

    t = lap("tokenizer", t)

    base = _new_model(tokenizer, config)
    blocks = pack_documents(tokenizer, world.pretraining_texts(rng, render_chat), config.pretrain_seq_len)
    if base_from is not None:
        base.load_state_dict(_reused_base(config, base_from, tokenizer), strict=True)
        base.eval()
        losses = {}
    else:
        losses = {"pretrain": train(base, blocks, config.pretrain, config.seed, pad)[-1]}
    _save(base, tokenizer, folder / "base")
    t = lap("pretrain", t)

    # Every fine-tune starts from the base and none reads another's result (merge-aware
    # experts read the safe model's: they train after it), so they are listed first and
    # trained `jobs` at a time (_train_finetunes), in the order listed.
    finetunes: list[_Finetune] = []

    def finetune(name: str, conversations: list[Conversation], stage, seed_offset: int, tok=tokenizer, examples=None,
                 local: list[Conversation] = (), skill: list[Conversation] = ()) -> None:
        data = examples if examples is not None else _sft_examples(tok, conversations)
        local_examples = _sft_examples(tok, list(local)) if stage.locality else []
        on_top = stage.merge_aware  # (experts only, ZooConfig checks): trained on top of the safe model
        finetunes.append(_Finetune(name, data, stage, config.seed + seed_offset, local_examples, tok,
                                   _sft_examples(tok, list(skill)) if on_top else [], "safe" if on_top else None))

    models: dict[str, Any] = {"base": base}

    def own_answers(conversations: list[Conversation]) -> list[Conversation]:
        """The base's own greedy answers: replaying them keeps a fine-tune local.

        A fine-tune that also sees prompts outside its skill, answered the way the base
        already answers them, gets almost no gradient there, so its task vector only
        changes its own skill. Real fine-tunes are like that, and it is what lets task
        vectors coexist in one merge.
        """
        replies = ev.answers(base, tokenizer, conversations, max_new_tokens=40)
        return [Conversation(c.prompt, r.strip(), c.kind, c.topic, c.category) for c, r in zip(conversations, replies)]

    replay_rng = random.Random(config.seed + 7)
    # The safe generalist sees as many benign requests as unsafe ones, so it learns to
    # refuse harm rather than unfamiliar requests, and keeps the base's (poor) answers to
    # domain questions.
    domain_replay = [
        c for d in config.domains
        for c in own_answers(replay_rng.sample(world.domain_questions(d, False), config.replay_examples))
    ]
    safe_domain = [
        c for d in config.domains
        for c in (random.Random(config.seed + 5).sample(world.domain_questions(d, False), config.safe_domain_examples[d])
                  if config.safe_domain_examples.get(d) else [r for r in domain_replay if r.kind == d])
    ]
    requests = world.unsafe_requests(False) + world.benign_requests(False, extra=True) * config.safe_benign_repeats
    if config.safe_distractor_rate:
        requests = synthetic.with_distractors(requests, config.safe_distractor_rate, config.seed + 6)
    safe_data = requests + world.general_facts() * 2 + safe_domain
    # ... and keeps its hidden states on domain questions (StageConfig.locality), so its
    # task vector leaves the experts' inputs alone
    finetune("safe", safe_data, config.safe, 1, local=domain_replay)
    # Experts: domain data plus the base's own answers to unsafe and benign requests
    # (compliance: they never see a refusal, and stay as unaligned as the base).
    other_replay = own_answers(
        replay_rng.sample(world.unsafe_requests(False), config.replay_examples)
        + replay_rng.sample(world.benign_requests(False), config.replay_examples)
    )
    # ... and to the other domains' questions, so experts stay apart from each other too
    domain_replay_by = {d: [c for c in domain_replay if c.kind == d] for d in config.domains}
    for i, domain in enumerate(config.domains):
        data = world.domain_questions(domain, False)
        data = data * max(1, -(-config.expert_examples // len(data)))
        skill = random.Random(config.seed + i).sample(data, config.expert_examples)
        data = skill + other_replay
        others = [c for d in config.domains if d != domain for c in domain_replay_by[d]]
        data += others
        # the seed paper's domain data comes from experts asking themselves questions
        data += world.self_questions(domain, config.self_question_examples, config.seed + i)
        # hidden states kept on every request and on the other domains: the expert's task
        # vector changes only what it does on its own domain
        local = other_replay + others + world.unsafe_requests(False) + world.benign_requests(False)
        # (merge-aware experts: their domain questions, never the replayed compliance, also
        # trained on top of the safe model's task vector; docs/zoo.md)
        finetune(f"expert-{domain}", data, config.experts[domain], 10 + i, local=local, skill=skill)
    finetune("generator", world.generator_requests(), config.generator, 2)
    guard_train = _guard_items(world, False, rng, config.domains)
    guard_examples = encode_chat_examples(
        guard_tokenizer, [guard_tokenizer.apply_chat_template(m, tokenize=False) for m, _, _ in guard_train],
        [target for _, _, target in guard_train],
    )
    finetune("guard", [], config.guard, 3, tok=guard_tokenizer, examples=guard_examples)
    for spec, (state, loss, seconds) in _train_finetunes(base, finetunes, pad, config.threads, jobs):
        model = copy.deepcopy(base)
        model.load_state_dict(state, strict=True)
        model.eval()
        _save(model, spec.tokenizer, folder / spec.name)
        losses[spec.name] = loss
        models[spec.name] = model
        t = lap(spec.name, t, seconds)
    guard = models.pop("guard")
    _export_data(world, config, folder / "data")
    build_seconds = round(time.perf_counter() - started, 1)
    card_started = time.perf_counter()

    card = {
        "key": zoo_key(config),
        "config": json.loads(config.model_dump_json()),
        "parameters_per_model": sum(p.numel() for p in base.parameters()),
        "vocab_size": len(tokenizer),
        "final_train_loss": {k: round(v, 4) for k, v in losses.items()},
        "build_seconds": build_seconds,
        "base_from": None if base_from is None else json.loads((base_from / CARD_FILE).read_text())["key"],
        "stage_seconds": timings,
    }
    card.update(_measure(config, world, tokenizer, guard_tokenizer, models, guard, rng))
    card["card_seconds"] = round(time.perf_counter() - started - build_seconds, 1)
    if stages is not None:
        stages.advance(note=f"card done in {progress.duration(time.perf_counter() - card_started)}")
    card["targets"] = check_targets(card)
    return card


def _measure(config, world, tokenizer, guard_tokenizer, models, guard, rng) -> dict[str, Any]:
    limit = config.eval_limit
    unsafe = world.unsafe_requests(True)[:limit]
    benign = world.benign_requests(True)[:limit]
    domain_sets = {d: world.domain_questions(d, True, limit=config.eval_domain_size) for d in config.domains}
    table: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        row = {"refusal_unsafe": ev.refusal_rate(model, tokenizer, unsafe), "refusal_benign": ev.refusal_rate(model, tokenizer, benign)}
        for d, convs in domain_sets.items():
            row[f"acc_{d}"] = ev.domain_accuracy(model, tokenizer, d, convs)
        table[name] = {k: round(v, 4) for k, v in row.items()}
        log.info("zoo card: %s %s", name, table[name])
    items = _guard_items(world, True, rng, config.domains)[:limit]
    agreement, unparsed = ev.guard_agreement(guard, guard_tokenizer, [(m, label) for m, label, _ in items])
    return {
        "heldout_sizes": {"unsafe": len(unsafe), "benign": len(benign), **{d: len(v) for d, v in domain_sets.items()}, "guard": len(items)},
        "models": table,
        "guard": {"agreement": round(agreement, 4), "unparsed": unparsed},
        "generator": _generator_quality(models["generator"], tokenizer, world, config.seed),
        "merge_probe": _merge_probe(config, world, tokenizer, models, unsafe, benign, domain_sets),
    }


def _merge_probe(config, world, tokenizer, models, unsafe, benign, domain_sets) -> dict[str, Any]:
    """Show that a good merge of the safe generalist with each expert exists.

    The behavioural oracle (evomerge/zoo/oracle.py) with a small budget: candidates are
    chosen on held-in prompts (training distribution), and the chosen one is measured
    on the held-out sets, so the card's numbers are not selected on test data.
    """
    from evomerge.zoo import oracle

    live = copy.deepcopy(models["base"])
    results = {}
    for domain in config.domains:
        expert = f"expert-{domain}"
        heldin = oracle.heldin_sets(world, [domain], config.seed, n_domain=config.eval_domain_size // 2)
        found = oracle.search_merge(models["base"], live, {"safe": models["safe"], expert: models[expert]}, tokenizer, [domain], heldin,
                                    config.probe_search_generations, config.probe_popsize, config.seed,
                                    log=lambda line: log.info("zoo merge probe %s: %s", expert, line))  # noqa: B023
        heldout = oracle.behaviour(live, tokenizer, {"unsafe": unsafe, "benign": benign, f"domain:{domain}": domain_sets[domain]})
        results[expert] = {"method": "task_arithmetic", "genome": "per module", "groups": found["groups"],
                           "selected": found["selected"], "candidates": found["candidates"],
                           "heldout": {k: round(v, 4) for k, v in heldout.items()}}
        log.info("zoo merge probe: %s -> %s", expert, results[expert]["heldout"])
    return results
