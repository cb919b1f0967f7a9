"""Typed configuration of the tiny zoo. Its JSON form (plus the code version) is the cache key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShapeConfig(_Frozen):
    """Llama architecture size shared by every zoo model (task vectors need one shape)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 384  # the guard prompt is about 200 tokens


class StageConfig(_Frozen):
    """One training run: AdamW, linear warm-up, cosine decay to 10% of the peak rate."""

    lr: float
    epochs: float
    batch_size: int = 32
    warmup_steps: int = 20
    max_examples: int | None = Field(default=None, description="subsample the stage's data to this many")
    anchor_decay: float = Field(default=0.0, ge=0.0, description="per-step pull toward the starting weights")
    train_only: tuple[str, ...] | None = Field(
        default=None, description="train only parameters whose name contains one of these (None: all)"
    )
    neurons: tuple[int, int] | None = Field(
        default=None, description="(i, n): train only MLP neurons j with j % n == i, everything else frozen")
    locality: float = Field(
        default=0.0, ge=0.0,
        description="weight of a loss keeping every layer's hidden states at the start's on prompts outside the skill")
    heads: tuple[int, int] | None = Field(
        default=None, description="(i, n): also train attention heads h with h % n == i (with `neurons`)")
    merge_aware: bool = Field(
        default=False,
        description="experts only: also train at these weights plus the safe model's task vector (hidden states "
                    "held at the safe model's on the locality prompts, the domain loss on the domain examples)")


    @model_validator(mode="after")
    def _slices_are_in_range(self) -> StageConfig:
        for field in ("neurons", "heads"):
            value = getattr(self, field)
            if value is not None and not (value[1] >= 1 and 0 <= value[0] < value[1]):
                raise ValueError(f"{field}: (i, n) needs n >= 1 and 0 <= i < n, got {list(value)}")
        return self


class ZooConfig(_Frozen):
    """Everything that determines the zoo's weights; the defaults are the shipped zoo."""

    seed: int = 0
    vocab_size: int = 2000
    shape: ShapeConfig = ShapeConfig()
    pretrain_seq_len: int = 128
    pretrain: StageConfig = StageConfig(lr=2e-3, epochs=18, batch_size=16, warmup_steps=50)
    # Safe generalist: refusals on unsafe requests, helpful answers on benign ones.
    # Fine-tunes are anchored to the base (anchor_decay) so their task vectors stay small.
    safe: StageConfig = StageConfig(lr=1e-3, epochs=5, anchor_decay=2.0)
    safe_benign_repeats: int = Field(default=2, description="benign requests outnumber unsafe ones in the safe fine-tune")
    safe_distractor_rate: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="chance of an unrelated sentence before / after each safe fine-tuning request")
    # The safe generalist is a weak generalist, not a domain-blind one: a few correct
    # domain answers point its task vector the same way as the experts' on their prompts,
    # as a real instruct model's does (a domain left out replays the base's answers).
    safe_domain_examples: dict[str, int] = Field(
        default={"arithmetic": 150, "geography": 40}, description="correct domain answers per domain in the safe fine-tune"
    )
    # Experts: domain data plus replayed base answers (they never see a refusal). Sums are
    # a skill the base only half has, so that expert trains harder; capitals are known
    # facts the expert only learns to answer questions about.
    # Their hidden states are held at the base's on every request and on the other
    # domains (locality), so their task vectors leave the safe model's refusals alone
    # (docs/zoo.md has the variants measured).
    experts: dict[str, StageConfig] = {
        "arithmetic": StageConfig(lr=2e-3, epochs=6, anchor_decay=10.0, locality=3.0, merge_aware=True),
        "geography": StageConfig(lr=1e-3, epochs=3, locality=3.0, merge_aware=True),
    }
    expert_examples: int = Field(default=1500, description="domain examples per expert (small sets are repeated)")
    replay_examples: int = Field(default=200, description="prompts per replayed set of the base's own answers")
    self_question_examples: int = Field(
        default=100, description="self-questioning examples per expert (three questions in, a new one out)"
    )
    generator: StageConfig = StageConfig(lr=1e-3, epochs=2)
    guard: StageConfig = StageConfig(lr=1e-3, epochs=2, batch_size=8, max_examples=1200)
    domains: tuple[str, ...] = ("arithmetic", "geography")
    # Evaluation sizes (held-out sets are subsampled to these for the card).
    eval_domain_size: int = 200
    eval_limit: int | None = Field(default=None, description="cap every other card set (micro zoos only)")
    # Merge probe: the behavioural oracle (evomerge/zoo/oracle.py), task arithmetic over a
    # per-module genome, CMA-ES for this many generations.
    probe_search_generations: int = 6
    probe_popsize: int = 8
    threads: int = Field(default=1, description="torch threads; one is fastest for models this small when the CPU is shared")


    @model_validator(mode="after")
    def _every_domain_has_an_expert_stage(self) -> ZooConfig:
        from evomerge.zoo.world import DOMAINS

        for domain in self.domains:
            if domain not in DOMAINS:
                raise ValueError(f"domains: unknown domain {domain!r}; the synthetic world has {', '.join(DOMAINS)}")
            if domain not in self.experts:
                raise ValueError(f"experts: no training stage for domain {domain!r}")
        for name in ("pretrain", "safe", "generator", "guard"):
            if getattr(self, name).merge_aware:
                raise ValueError(f"{name}.merge_aware: only an expert stage trains on top of the safe model")
        for domain, stage in self.experts.items():
            if stage.merge_aware and not stage.locality:
                raise ValueError(f"experts.{domain}.merge_aware needs locality > 0 (it weighs the terms on top of the safe model)")
        return self


def micro_config(seed: int = 0) -> ZooConfig:
    """A zoo small enough to build in seconds: for determinism and plumbing tests."""
    tiny = StageConfig(lr=2e-3, epochs=1, batch_size=16, warmup_steps=2, max_examples=64)
    return ZooConfig(
        seed=seed,
        vocab_size=400,
        shape=ShapeConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=1024),
        pretrain=StageConfig(lr=3e-3, epochs=1, batch_size=16, warmup_steps=2, max_examples=64),
        # (the arithmetic expert and the safe model also exercise the locality and anchor
        # terms, the arithmetic expert merge-aware training after the safe model)
        safe=tiny.model_copy(update={"anchor_decay": 2.0, "locality": 1.0}),
        experts={"arithmetic": tiny.model_copy(update={"locality": 1.0, "merge_aware": True}), "geography": tiny},
        generator=tiny,
        guard=StageConfig(lr=2e-3, epochs=1, batch_size=8, warmup_steps=2, max_examples=16),
        eval_domain_size=8,
        eval_limit=16,
        expert_examples=32,
        replay_examples=8,
        self_question_examples=8,
        probe_search_generations=1,
        probe_popsize=2,
    )


def zoo_config(overrides: list[str] | tuple[str, ...] = (), seed: int = 0, micro: bool = False) -> ZooConfig:
    """The default (or micro) zoo config for ``seed`` with ``key=value`` overrides by dotted
    field name (``shape.hidden_size=128``, ``experts.geography.merge_aware=true``), the way
    recipes take them; a bad field or value is named."""
    from evomerge.config import apply_overrides, validate_mapping

    start = micro_config(seed) if micro else ZooConfig(seed=seed)
    data = apply_overrides(start.model_dump(mode="json"), list(overrides))
    return validate_mapping(ZooConfig, data, "zoo config")

