"""Measured results on the model card: the hub's ``model-index`` front matter.

The hub reads ``model-index`` from a README's YAML front matter and shows it as the
model's evaluation results. evomerge writes one entry per measure (alignment,
over-refusal, domain accuracy), each naming its prompt sets and its judge, from a
search's held-out check or from an audit:

    >>> from evomerge.card import card_results, update_card
    >>> update_card("runs/x/model/README.md", "x", card_results(row, sets, judge="llama_guard"))

Numbers are percentages; ``verified: false`` because the hub did not compute them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError

_FRONT = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


@dataclass(frozen=True)
class CardSet:
    """A prompt set as the card names it."""

    name: str
    kind: str  # unsafe | benign | domain
    domain: str | None = None


def _result(task: str, metric: str, label: str, value: float, sets: Sequence[CardSet], source: str) -> dict[str, Any]:
    return {"task": {"type": "text-generation", "name": task},
            "dataset": {"type": "evomerge/" + "+".join(s.name for s in sets), "name": " + ".join(s.name for s in sets)},
            "metrics": [{"type": metric, "value": round(float(value), 2), "name": label, "verified": False}],
            "source": {"name": source}}


def card_results(row: dict[str, Any], sets: Sequence[CardSet], judge: str, source: str = "evomerge eval",
                 refusal_by: str = "refusal phrases") -> list[dict[str, Any]]:
    """``model-index`` results from one evaluation row (``alignment``, ``over_refusal``,
    ``acc_<domain>``, percent); a measure that is absent or NaN is left out."""
    def ok(key: str) -> bool:
        v = row.get(key)
        return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))

    out = []
    unsafe = [s for s in sets if s.kind == "unsafe"]
    benign = [s for s in sets if s.kind == "benign"]
    if unsafe and ok("alignment"):
        out.append(_result("Safety alignment", "alignment", f"alignment (% unsafe prompts answered safely; judge: "
                           f"{judge})", row["alignment"], unsafe, source))
    if benign and ok("over_refusal"):
        out.append(_result("Over-refusal", "over_refusal", f"over-refusal (% benign prompts refused; by {refusal_by})",
                           row["over_refusal"], benign, source))
    for s in sets:
        if s.kind == "domain" and ok(f"acc_{s.domain}"):
            out.append(_result(f"Domain accuracy: {s.domain}", "accuracy", f"accuracy on {s.domain} (% correct)",
                               row[f"acc_{s.domain}"], [s], source))
    return out


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter mapping, the rest of the README)."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    data = yaml.safe_load(m.group(1)) or {}
    if not isinstance(data, dict):
        raise ConfigError("the README's front matter is not a mapping")
    return data, text[m.end():]


def update_card(readme: str | Path, model_name: str, results: list[dict[str, Any]]) -> Path:
    """Write ``results`` as the card's ``model-index`` (replacing an older one of the same
    model name, keeping everything else); the README must exist."""
    from evomerge.io_utils import atomic_write_text

    readme = Path(readme)
    if readme.is_dir():
        readme = readme / "README.md"
    if not readme.is_file():
        raise ConfigError(f"{readme}: no model card to update (write the model first, e.g. with evomerge merge)")
    if not results:
        raise ConfigError(f"{readme}: no measured result to write (no unsafe, benign or domain set was evaluated)")
    try:
        front, body = split_front_matter(readme.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{readme}: front matter is not valid YAML ({exc})") from None
    entries = [e for e in front.get("model-index") or [] if isinstance(e, dict) and e.get("name") != model_name]
    front["model-index"] = [*entries, {"name": model_name, "results": results}]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip() + "\n---\n" + body
    atomic_write_text(readme, text)
    return readme


def config_card_sets(config: Any) -> list[CardSet]:
    """The card's view of an :class:`~evomerge.evaluation.EvalConfig`'s sets (names only, nothing loaded)."""
    return [CardSet(p.name, p.kind, p.domain) for p in config.prompt_sets()]


def judge_label(config: Any) -> str:
    """Judges as the card names them: ``llama_guard (zoo:guard)``."""
    return ", ".join(j.name + (f" ({j.model})" if j.model else "") for j in config.judges)


def write_audit_card(report: Any, config: Any) -> Path:
    """The audited merge's measured results into its own (local) model card."""
    from evomerge.refs import resolve_path

    folder = Path(resolve_path(report.merge))
    if not folder.is_dir():
        raise ConfigError(f"--update-card: {report.merge} is not a local model folder (a hub card is updated by "
                          "pushing the folder's README.md)")
    row = report.result.table.set_index("ref").loc[report.merge].to_dict()
    from evomerge.judges import JUDGES

    own = getattr(JUDGES.lookup(config.judge.name), "judges_refusal", False)  # then over-refusal is its label
    refusal_by = f"judge: {config.judge.name}" if own else "refusal phrases"
    results = card_results(row, config_card_sets(config), judge_label(config), "evomerge audit", refusal_by)
    return update_card(folder / "README.md", folder.name, results)
