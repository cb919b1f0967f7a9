"""The demo search scored by vLLM vs by transformers: same seed, same best genome?

Runs ``recipes/demo.yaml`` (with overrides, default ``search.steps=5``) twice in this
process, ``fitness.backend=transformers`` then ``fitness.backend=vllm``, and prints both
best genomes, their fitness terms, and the time spent building and scoring candidates.

Run it with the vLLM environment (``scripts/make_vllm_env.sh``). That environment has an
older transformers, so its zoo key differs from the main environment's: pass the main
environment's built zoo with ``--zoo`` rather than building a second one.

    ZOO=$(.venv/bin/python -c "from evomerge.refs import resolve_path; print(resolve_path('zoo:'))")
    PYTHONPATH=. nice -n 19 /tmp/evomerge-vllm-env/bin/python benchmarks/bench_vllm_search.py --zoo "$ZOO"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def _with_zoo(node: Any, zoo: Path) -> Any:
    """Every ``zoo:NAME`` string in a recipe mapping replaced by the folder ``zoo/NAME``."""
    if isinstance(node, dict):
        return {k: _with_zoo(v, zoo) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_zoo(v, zoo) for v in node]
    if isinstance(node, str) and node.startswith("zoo:"):
        return str(zoo / node[len("zoo:") :])
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="a built zoo folder (default: this environment's zoo:)")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "demo.yaml")
    parser.add_argument("overrides", nargs="*", default=["search.steps=5"])
    args = parser.parse_args()

    from evomerge.search import recipe_from_dict, run_search
    from evomerge.search.recipe import apply_overrides

    data = apply_overrides(yaml.safe_load(args.recipe.read_text()), args.overrides)
    if args.zoo is not None:
        data = _with_zoo(data, args.zoo)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("transformers", "vllm"):
            recipe = recipe_from_dict(apply_overrides(data, [f"fitness.backend={backend}"]), str(args.recipe))
            started = time.perf_counter()
            result = run_search(recipe, Path(tmp) / backend, progress=False, write_outputs=False)
            wall = time.perf_counter() - started
            rows = result.state.candidates
            score_s = sum(r["score_s"] for r in rows)
            build_s = sum(r["build_s"] for r in rows)
            results[backend] = result
            print(f"== {backend}: {len(rows)} candidates, wall {wall:.1f}s (prepare {result.evaluator.prepare_s:.1f}s), "
                  f"build+push {build_s:.2f}s, score {score_s:.2f}s ({1000 * score_s / max(1, len(rows)):.0f} ms/candidate)")
            print(f"   best fitness {result.best['fitness']:.6f}  ce_safety {result.best['ce_safety']:.6f}  "
                  f"ce_domain {result.best['ce_domain']:.6f}  ce_benign {result.best['ce_benign']:.6f}")
            print(f"   best genome weights {result.best_genome.weights}")
            print(f"               densities {result.best_genome.densities}")
            if result.evaluator.engine is not None:
                result.evaluator.engine.close()
    same = results["vllm"].best_genome == results["transformers"].best_genome
    diff = abs(results["vllm"].best["fitness"] - results["transformers"].best["fitness"])
    print(f"same best genome: {same}; |fitness difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
