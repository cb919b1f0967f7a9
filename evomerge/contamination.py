"""Contamination guard: no evaluation prompt may be in the data a search learns from.

A held-out number means nothing if the prompt it was measured on was in the search's
fitness data (or in the datagen output that became it). Three tests, strongest first:

- ``exact``: the evaluation prompt equals a search prompt;
- ``normalised``: equal after Unicode NFKC, lower case, punctuation dropped and
  whitespace collapsed ("How do I X?" vs "how do i x");
- ``ngram``: the evaluation prompt shares a run of ``ngram`` words (13 by default, the
  length GPT-3's contamination study used) with a search prompt or answer.

    >>> from evomerge.contamination import check_contamination
    >>> report = check_contamination({"zoo-unsafe": prompts}, {"data.safety": rows})
    >>> report.clean, report.summary()

A search runs the check before its first generation (``contamination`` in the recipe):
it warns with counts and examples, and ``--strict`` refuses to start.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

log = logging.getLogger(__name__)

DEFAULT_NGRAM = 13
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


class ContaminationError(EvomergeError):
    """Evaluation prompts were found in search data and the check is strict."""


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = normalise(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Hit:
    eval_set: str
    prompt: str
    data_set: str
    match: str  # "exact" | "normalised" | "ngram"
    data_text: str  # the search row's text that matched (prompt, or prompt + answer for n-grams)


@dataclass
class ContaminationReport:
    eval_sets: dict[str, int]  # set -> prompts checked
    data_sets: dict[str, int]  # set -> rows checked
    ngram: int
    hits: list[Hit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # eval set -> why it was not checked

    @property
    def clean(self) -> bool:
        return not self.hits

    def counts(self) -> dict[str, dict[str, int]]:
        """eval set -> {match kind -> contaminated prompts}; each prompt counted once, by its strongest match."""
        out: dict[str, dict[str, int]] = {}
        for h in self.hits:
            out.setdefault(h.eval_set, {}).setdefault(h.match, 0)
            out[h.eval_set][h.match] += 1
        return out

    def summary(self, examples: int = 3) -> str:
        checked = ", ".join(f"{k} ({v})" for k, v in self.eval_sets.items()) or "none"
        data = ", ".join(f"{k} ({v})" for k, v in self.data_sets.items()) or "none"
        lines = []
        if self.clean:
            lines.append(f"contamination check: clean. No evaluation prompt of {checked} is in the search data "
                         f"{data} (exact, normalised, or a shared {self.ngram}-word run).")
        else:
            total = sum(self.eval_sets.values())
            lines.append(f"contamination check: {len(self.hits)} of {total} evaluation prompts are in the search data "
                         f"{data}:")
            for eval_set, kinds in self.counts().items():
                lines.append(f"  {eval_set}: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
                             + f" of {self.eval_sets[eval_set]}")
            for h in self.hits[:examples]:
                lines.append(f"  e.g. [{h.match}] {h.eval_set}: {h.prompt[:80]!r} ~ {h.data_set}: {h.data_text[:80]!r}")
        for name, why in self.skipped.items():
            lines.append(f"  not checked: {name} ({why})")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, "ngram": self.ngram, "eval_sets": self.eval_sets, "data_sets": self.data_sets,
                "counts": self.counts(), "skipped": self.skipped,
                "examples": [h.__dict__ for h in self.hits[:10]]}


def check_contamination(eval_prompts: Mapping[str, Sequence[str]],
                        search_data: Mapping[str, Sequence[dict[str, Any] | str]],
                        ngram: int = DEFAULT_NGRAM, prompt_field: str = "prompt",
                        answer_field: str = "answer") -> ContaminationReport:
    """Every evaluation prompt against every search row; rows are dicts (prompt and answer
    are read) or plain strings (treated as prompts)."""
    if ngram < 1:
        raise EvomergeError(f"contamination ngram: {ngram} must be at least 1")
    exact: dict[str, str] = {}
    norm: dict[str, str] = {}
    grams: dict[tuple[str, ...], tuple[str, str]] = {}
    sizes: dict[str, int] = {}
    for data_name, rows in search_data.items():
        sizes[data_name] = len(rows)
        for row in rows:
            prompt = row if isinstance(row, str) else str(row.get(prompt_field) or "")
            answer = "" if isinstance(row, str) else str(row.get(answer_field) or "")
            exact.setdefault(prompt, data_name)
            norm.setdefault(normalise(prompt), data_name)
            for text in (prompt, answer):
                for g in ngrams(text, ngram):
                    grams.setdefault(g, (data_name, text))
    hits: list[Hit] = []
    for eval_name, prompts in eval_prompts.items():
        for prompt in dict.fromkeys(prompts):  # a prompt listed twice is one finding
            if prompt in exact:
                hits.append(Hit(eval_name, prompt, exact[prompt], "exact", prompt))
                continue
            key = normalise(prompt)
            if key and key in norm:
                hits.append(Hit(eval_name, prompt, norm[key], "normalised", key))
                continue
            for g in ngrams(prompt, ngram):
                if g in grams:
                    data_name, text = grams[g]
                    hits.append(Hit(eval_name, prompt, data_name, "ngram", text))
                    break
    return ContaminationReport({k: len(dict.fromkeys(v)) for k, v in eval_prompts.items()}, sizes, ngram, hits)


# ----------------------------------------------------------------------------- sources
def data_rows(source: str) -> list[dict[str, Any]]:
    """Rows of a data file or ``datasets`` folder, or of every .jsonl/.parquet in a
    datagen output folder (``runs/<name>/``)."""
    from evomerge.datafiles import file_rows
    from evomerge.refs import resolve_path

    path = Path(resolve_path(source))
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        files = sorted(path.glob("*.jsonl")) or sorted(path.glob("*.parquet"))
        if not files:
            raise EvomergeError(f"contamination: {source} holds no .jsonl or .parquet data")
        return [r for f in files for r in file_rows(str(f))]
    return file_rows(source)


def search_data_of(recipe: Any) -> dict[str, list[dict[str, Any]]]:
    """What a search recipe learns from: ``data.*`` plus ``contamination.also`` (datagen folders)."""
    d = recipe.data
    sources = {"data.safety": d.safety, "data.benign": d.benign} | {f"data.domain.{k}": v for k, v in d.domain.items()}
    out = {k: _renamed(data_rows(v), d.prompt_field, d.answer_field) for k, v in sources.items() if v is not None}
    for source in recipe.contamination.also:
        out[source] = data_rows(source)
    return out


def _renamed(rows: list[dict[str, Any]], prompt_field: str, answer_field: str) -> list[dict[str, Any]]:
    if (prompt_field, answer_field) == ("prompt", "answer"):
        return rows
    return [{"prompt": r.get(prompt_field), "answer": r.get(answer_field)} for r in rows]


def default_eval_sets(pool_refs: Iterable[str]) -> list[str]:
    """The sets ``evomerge eval`` uses by default for this pool (zoo sets for the zoo)."""
    from evomerge.evaluation import REAL_SETS, ZOO_SETS
    from evomerge.refs import is_zoo_ref

    return list(ZOO_SETS) if any(is_zoo_ref(r) for r in pool_refs) else list(REAL_SETS)


def eval_prompts_of(recipe: Any, sets: Sequence[str] | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Evaluation prompts a search's results will be measured on: ``sets`` when given (a
    report's or ablation's evaluation), else its ``evaluate`` section and the named sets (``contamination.eval_sets``; None: ``evomerge eval``'s defaults,
    skipping, with a note, a default set whose package is not installed)."""
    from evomerge.errors import ConfigError
    from evomerge.evaluation import parse_prompt_set

    prompts: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    e = recipe.evaluate
    own = {"evaluate.unsafe": e.unsafe, "evaluate.benign": e.benign} | {f"evaluate.domain.{k}": v
                                                                        for k, v in e.domain.items()}
    for name, source in own.items():
        if source is not None and sets is None:  # given sets are the whole evaluation (report, ablate)
            prompts[name] = [str(r.get("prompt") or "") for r in data_rows(source)]
    chosen = recipe.contamination.eval_sets if sets is None else list(sets)
    explicit = chosen is not None
    if chosen is None:
        chosen = default_eval_sets([recipe.pool.base, *recipe.pool.experts.values()])
    for spec in chosen:
        prompt_set = parse_prompt_set(spec)
        try:
            rows = prompt_set.load()
        except ConfigError as exc:
            if explicit:
                raise
            skipped[prompt_set.name] = str(exc)
            continue
        prompts[prompt_set.name] = [str(r.get("prompt") or "") for r in rows]
    return prompts, skipped


def guard_search(recipe: Any, strict: bool | None = None, sets: Sequence[str] | None = None) -> ContaminationReport:
    """The check a search runs before it starts: logs a warning with counts and examples,
    raises :class:`ContaminationError` when strict (``contamination.strict`` or ``strict``)."""
    spec = recipe.contamination
    prompts, skipped = eval_prompts_of(recipe, sets)
    report = check_contamination(prompts, search_data_of(recipe), spec.ngram)
    report.skipped.update(skipped)
    strict = spec.strict if strict is None else strict
    if report.clean:
        log.info(report.summary())
    elif strict:
        raise ContaminationError(report.summary() + "\n(strict: the search does not start; fix the data or drop "
                                 "--strict to go on with a warning)")
    else:
        log.warning(report.summary())
    return report
