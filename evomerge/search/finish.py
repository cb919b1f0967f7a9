"""After the search: held-out check, best merged model, report.md + fitness.png, summary."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from evomerge.evaluation import format_table
from evomerge.io_utils import atomic_save_figure, atomic_write_text
from evomerge.merge import MergeRecipe, write_merged_model
from evomerge.merge.recipe import GenomeSpec
from evomerge.pool import load_model
from evomerge.runfolder import dumps_report
from evomerge.search.evaluator import resolved_pool_refs
from evomerge.search.heldout import check_model, load_heldout
from evomerge.search.recipe import SearchRecipe

log = logging.getLogger(__name__)


def timing_summary(result) -> dict[str, float]:
    """Where the search's wall time went; ``outside_share`` is the optimiser, bookkeeping
    and checkpoint overhead (everything but building and scoring candidates)."""
    rows = result.state.candidates
    build_s = sum(r["build_s"] for r in rows)
    score_s = sum(r["score_s"] for r in rows)
    wall = result.state.elapsed_s
    return {"search_wall_s": wall, "build_s": build_s, "score_s": score_s,
            "outside_build_and_score_s": max(0.0, wall - build_s - score_s),
            "outside_share": max(0.0, wall - build_s - score_s) / wall if wall > 0 else 0.0,
            "prepare_s": result.prepare_s, "candidates": len(rows),
            "s_per_candidate": (build_s + score_s) / max(1, len(rows))}


def heldout_table(result, recipe: SearchRecipe):
    """Held-out percentages for the best merge and (optionally) every pool model."""
    import pandas as pd

    spec = recipe.evaluate
    sets = load_heldout(spec, recipe.seed)
    if not sets:
        return None
    ev = result.evaluator
    ev.build(result.best_genome)
    rows = [{"model": "best merge", **check_model(ev.model, ev.tokenizer, sets, spec.max_new_tokens)}]
    if spec.compare_pool:
        _, experts = resolved_pool_refs(recipe)
        for name, ref in experts.items():
            model = load_model(ref).to(recipe.fitness.device)
            rows.append({"model": name, **check_model(model, ev.tokenizer, sets, spec.max_new_tokens)})
            del model
    frame = pd.DataFrame(rows)
    frame.attrs["sizes"] = {k: len(v) for k, v in sets.items()}
    return frame


def fitness_plot(generations, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(generations["generation"], generations["best_so_far"], label="best so far", lw=2)
    ax.plot(generations["generation"], generations["best_fitness"], label="generation best", lw=1, ls="--")
    finite = generations[generations["mean_fitness"].map(math.isfinite)]
    ax.plot(finite["generation"], finite["mean_fitness"], label="generation mean", lw=1, alpha=0.7)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (weighted CE, lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def front_table(result):
    """The non-dominated candidates (``front`` column of the mode), safest first; None
    for modes without a front."""
    import pandas as pd

    cols = result.columns or {}
    if "front" not in cols:
        return None
    frame = pd.DataFrame(result.state.candidates)
    for name, values in cols.items():
        frame[name] = values
    frame["chosen"] = frame["index"] == result.best["index"]
    terms = [c for c in frame.columns if c.startswith("ce_") and frame[c].notna().any()]
    keep = ["index", "generation", "fitness", *terms, *[c for c in ("feasible", "chosen") if c in frame], "genome"]
    return frame.loc[frame["front"], keep].sort_values(["ce_safety", "index"]).reset_index(drop=True)


def front_plot(result, bound: float | None, path) -> None:
    """CE_safety against CE_domain: every candidate, the front, the bar and the result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(result.state.candidates)
    frame["front"] = result.columns["front"]
    ok = frame[frame["ce_safety"].map(math.isfinite) & frame["ce_domain"].map(math.isfinite)]
    front = ok[ok["front"]].sort_values("ce_safety")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(ok["ce_domain"], ok["ce_safety"], s=10, c="0.7", label="candidates")
    ax.plot(front["ce_domain"], front["ce_safety"], "o", ms=5, label="non-dominated")
    best = result.best
    ax.plot([best["ce_domain"]], [best["ce_safety"]], "*", ms=14, c="C3", label=f"result #{best['index']}")
    if bound is not None:
        ax.axhline(bound, ls="--", lw=1, c="C2", label=f"safety bar {bound:.3f}")
    ax.set_xlabel("CE_domain (mean over domain sets; lower: more skilled)")
    ax.set_ylabel("CE_safety (lower: safer)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write_report(result, recipe: SearchRecipe, method: str, timing: dict[str, float], heldout) -> str:
    import pandas as pd

    gens = pd.DataFrame(result.state.generations)
    best = result.best
    names = list(result.space.expert_names)
    g = result.best_genome
    genome_rows = []
    for k, name in enumerate(names):
        row = {"expert": name, "weight": ", ".join(f"{r[k]:.3f}" for r in g.weights)}
        if g.densities is not None:
            row["density"] = ", ".join(f"{r[k]:.3f}" for r in g.densities)
        genome_rows.append(row)
    terms = {k: best[k] for k in ("fitness", "ce_domain", "ce_safety", "ce_benign") if k in best}
    lines = [
        f"# Search report: {recipe.name}",
        "",
        f"- mode **{recipe.search.mode}**, method **{method}**, lambda {recipe.fitness.lambda_}, mu {recipe.fitness.mu}, "
        f"{recipe.fitness.n_samples} samples per set, seed {recipe.seed}",
        f"- pool: base `{recipe.pool.base}`, experts " + ", ".join(f"`{k}` ({v})" for k, v in recipe.pool.experts.items()),
        f"- {timing['candidates']} candidates in {len(gens)} generations; stopped: {result.state.stop_reason}",
        f"- wall {timing['search_wall_s']:.1f} s (prepare {timing['prepare_s']:.1f} s before it): build "
        f"{timing['build_s']:.1f} s, scoring {timing['score_s']:.1f} s, everything else "
        f"{timing['outside_build_and_score_s']:.2f} s ({100 * timing['outside_share']:.1f}%)",
        "",
        f"## Best candidate (#{best['index']}, generation {best['generation']})",
        "",
        format_table(pd.DataFrame([terms]), 4),
        "",
        format_table(pd.DataFrame(genome_rows), 4),
        "",
        "Weights and densities are listed per layer group, first group first.",
        "",
    ]
    checked = result.run_dir / "contamination.json"
    if checked.exists():
        found = json.loads(checked.read_text())
        state = "clean" if found["clean"] else "FOUND: " + "; ".join(
            f"{s} " + ", ".join(f"{n} {k}" for k, n in kinds.items()) for s, kinds in found["counts"].items())
        lines += [f"Contamination check (evaluation prompts vs search data; exact, normalised, "
                  f"{found['ngram']}-word runs): {state}.", ""]
    ref = result.state.reference
    if ref:
        pool = ", ".join(f"{k} {v:.4f}" for k, v in ref.get("pool_ce_safety", {}).items())
        lines += ["## Safety bar", "",
                  f"CE_safety <= {ref['bound']:.4f}: {ref.get('model') or 'the recipe'}'s {ref['ce_safety']:.4f} "
                  f"plus slack {ref['slack']}" + (f" (pool: {pool})" if pool else "") + ".", ""]
    front = front_table(result)
    if front is not None:
        shown = front.drop(columns=["genome"])
        lines += [f"## Non-dominated front ({len(front)} of {len(result.state.candidates)} candidates)", "",
                  "![front](front.png)", "", format_table(shown, 4), "", "Genomes: `front.csv`.", ""]
    if heldout is not None:
        sizes = ", ".join(f"{k} n={v}" for k, v in heldout.attrs.get("sizes", {}).items())
        lines += ["## Held-out check (greedy answers; refusal phrases; exact match), percent", "",
                  format_table(heldout, 1), "", f"Sets: {sizes}.", ""]
    lines += ["## Fitness per generation", "", "![fitness](fitness.png)", "",
              format_table(gens[["generation", "evals", "best_fitness", "mean_fitness", "best_so_far",
                         "best_ce_domain", "best_ce_safety", "seconds"]], 4), ""]
    return "\n".join(lines)


def write_heldout_card(readme, recipe: SearchRecipe, heldout) -> None:
    """The best merge's held-out check as the card's ``model-index``: alignment and
    over-refusal by refusal phrases (what the check measures), accuracy per domain."""
    from pathlib import Path

    from evomerge.card import CardSet, card_results, update_card

    row = heldout[heldout["model"] == "best merge"].iloc[0].to_dict()
    spec = recipe.evaluate
    measured = {"alignment": row.get("refuses_unsafe"), "over_refusal": row.get("refuses_benign"),
                **{k: v for k, v in row.items() if k.startswith("acc_")}}
    sets = [CardSet(Path(spec.unsafe).stem, "unsafe")] if spec.unsafe else []
    sets += [CardSet(Path(spec.benign).stem, "benign")] if spec.benign else []
    sets += [CardSet(Path(v).stem, "domain", k) for k, v in spec.domain.items()]
    results = card_results(measured, sets, "refusal phrases", f"evomerge search ({recipe.name}) held-out check")
    if results:
        update_card(readme, recipe.name, results)


def finish_run(result, recipe: SearchRecipe, method: str, options: dict[str, Any] | None) -> None:
    import pandas as pd

    run = result.run_dir
    timing = timing_summary(result)
    heldout = heldout_table(result, recipe)
    if heldout is not None:
        atomic_write_text(run / "heldout.csv", heldout.to_csv(index=False))
    fitness_plot(pd.DataFrame(result.state.generations), run / "fitness.png")
    front = front_table(result)
    if front is not None:
        atomic_write_text(run / "front.csv", front.to_csv(index=False))
        front_plot(result, result.state.reference.get("bound"), run / "front.png")
    atomic_write_text(run / "report.md", write_report(result, recipe, method, timing, heldout))
    summary = {"best": {k: v for k, v in result.best.items() if k != "genome"},
               "genome": json.loads(result.best["genome"]), "method": method, "timing": timing,
               "stop_reason": result.state.stop_reason, "reference": result.state.reference or None,
               "front": None if front is None else front["index"].tolist(),
               "heldout": None if heldout is None else heldout.to_dict(orient="records")}
    atomic_write_text(run / "summary.json", dumps_report(summary))  # strict JSON: NaN/inf become null
    if recipe.write_model:
        base, experts = resolved_pool_refs(recipe)
        merge = MergeRecipe(base=base, experts=experts, method=method,
                            options=recipe.merge.options if options is None else options,
                            dtype=None, genome=GenomeSpec.from_genome(result.best_genome, list(experts)))
        write_merged_model(merge, run / "model", overwrite=True, device=recipe.fitness.device)
        if heldout is not None:
            write_heldout_card(run / "model" / "README.md", recipe, heldout)
    result.heldout = heldout
    log.info("wrote %s", run)
