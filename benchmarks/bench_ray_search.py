"""The demo search with ``search.workers.backend`` serial vs ray: wall time and equality.

Runs ``recipes/demo.yaml`` for ``--steps`` generations three times with the same seed:
serial with torch's default thread count, serial with ``--threads-per-worker`` threads
(the actors' count, so its candidates must equal the Ray run's bit for bit), and Ray with
``--workers`` actors on a local cluster. Prints each run's wall time (from the call to
``run_search`` to its return: Ray start and the actors' ``prepare`` included) and the
search loop's own time, and whether the candidates tables (timing columns aside) and the
best genomes are identical.

    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/bench_ray_search.py [--zoo DIR] [--steps 2]

``--zoo`` points at a built zoo folder (default: the zoo ``zoo:`` resolves to, built if
missing); the demo's data paths are taken from that zoo's ``data/`` folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help="a built zoo folder (base/, safe/, expert-geography/, data/)")
    parser.add_argument("--steps", type=int, default=2, help="generations per run")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors")
    parser.add_argument("--threads-per-worker", type=int, default=1)
    args = parser.parse_args()

    import pandas as pd

    from evomerge.refs import resolve_path
    from evomerge.search import load_search_recipe, run_search

    zoo = Path(args.zoo) if args.zoo else Path(resolve_path("zoo:"))
    paths = [f"pool.base={zoo / 'base'}", f"pool.experts.safe={zoo / 'safe'}",
             f"pool.experts.geography={zoo / 'expert-geography'}", f"data.safety={zoo / 'data/safety.jsonl'}",
             f"data.domain.geography={zoo / 'data/domain-geography.jsonl'}",
             f"data.benign={zoo / 'data/benign.jsonl'}", f"search.steps={args.steps}"]
    default_threads = torch.get_num_threads()
    runs = {
        f"serial, {default_threads} threads": (default_threads, ["search.workers.backend=serial"]),
        f"serial, {args.threads_per_worker} thread(s)": (args.threads_per_worker, ["search.workers.backend=serial"]),
        f"ray, {args.workers} actors x {args.threads_per_worker} thread(s)": (
            default_threads, ["search.workers.backend=ray", f"search.workers.n={args.workers}",
                              f"search.workers.num_cpus_per_worker={args.threads_per_worker}"]),
    }
    tables, genomes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, (threads, overrides)) in enumerate(runs.items()):
            torch.set_num_threads(threads)
            recipe = load_search_recipe("recipes/demo.yaml", paths + overrides)
            started = time.perf_counter()
            result = run_search(recipe, Path(tmp) / f"run{k}", progress=False, write_outputs=False)
            wall = time.perf_counter() - started
            rows = result.state.candidates
            tables[label] = pd.DataFrame(rows).drop(columns=["build_s", "score_s"])
            genomes[label] = result.best_genome
            print(f"{label}: {len(rows)} candidates, wall {wall:.1f} s (search loop {result.state.elapsed_s:.1f} s, "
                  f"prepare {result.prepare_s:.1f} s), build+score summed over candidates "
                  f"{sum(r['build_s'] + r['score_s'] for r in rows):.1f} s, best fitness {result.best['fitness']:.6f}")
    ray_label = list(runs)[2]
    for label in list(runs)[:2]:
        same = tables[label].equals(tables[ray_label])
        diff = (tables[label]["fitness"] - tables[ray_label]["fitness"]).abs().max()
        print(f"{ray_label} vs {label}: candidates table identical: {same} (max |fitness diff| {diff:.2e}); "
              f"same best genome: {genomes[label] == genomes[ray_label]}")


if __name__ == "__main__":
    main()
