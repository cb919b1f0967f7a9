"""Which multi-objective optimiser for ``search.mode: pareto``: optuna's NSGA-II against
COMO-CMA-ES (comocma), with the same budget on the same evaluator.

    PYTHONPATH=. python benchmarks/bench_pareto_optimisers.py [--budget 60] [--seeds 0 1] [--n-samples 100]

The pool is recipes/demo.yaml's (safe model + geography expert on the tiny zoo, TIES,
per-layer weights and densities: 12 genes), scored on the zoo's held-in sets. The
objectives are (CE_safety, CE_geography). Reported per optimiser and seed: the
hypervolume of the candidates' front, with the reference point at the pool models' worst
value of each objective (the area of trade-offs better than both models' worst corner);
the front's size; the candidate the safety-bar rule returns (CE_safety <= the safe
model's + 0.05, then the lowest CE_geography); and the optimiser's own time (everything
but building and scoring). comocma is needed only for this script (pip install comocma).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np

OVERRIDES = ["data.safety=zoo:data/safety.jsonl", "data.domain={geography: zoo:data/domain-geography.jsonl}",
             "contamination.check=false", "write_model=false"]
SLACK = 0.05


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    hv, best_y = 0.0, ref[1]
    for x, y in pts:  # sweep by the first objective; keep the running minimum of the second
        if y < best_y:
            hv += (ref[0] - x) * (best_y - y)
            best_y = y
    return hv


def front_2d(points: list[tuple[float, float]]) -> list[int]:
    return [i for i, p in enumerate(points)
            if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]


def run_optuna(ev, space, recipe, budget: int, seed: int):
    from evomerge.search.proposers import ParetoProposer

    recipe = recipe.model_copy(update={"seed": seed})
    prop = ParetoProposer(space, recipe, {"bound": math.inf})
    points, opt_s = [], 0.0
    while len(points) < budget:
        t0 = time.perf_counter()
        genomes = prop.ask()
        opt_s += time.perf_counter() - t0
        scored = [ev.evaluate(g) for g in genomes]
        t0 = time.perf_counter()
        prop.tell(genomes, scored)
        opt_s += time.perf_counter() - t0
        points += [(s.terms["ce_safety"], s.terms["ce_domain"]) for s in scored]
    return points[:budget], opt_s


def run_comocma(ev, space, recipe, budget: int, seed: int, kernels: int = 5):
    import comocma

    lo, hi = space.bounds()
    rng = np.random.default_rng(seed + 1)
    x0 = np.asarray(space.x0(recipe.search.x0_weight, recipe.search.x0_density))
    starts = [np.clip(x0 + 0.1 * rng.standard_normal(len(x0)), lo, hi) for _ in range(kernels)]
    opts = {"bounds": [lo, hi], "verbose": -9, "seed": seed + 1, "popsize": 4}
    cwd = os.getcwd()
    points, opt_s = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # comocma's data logger writes into the working folder
        try:
            np.random.seed(seed + 1)
            moes = comocma.Sofomore(comocma.get_cmas(starts, recipe.search.sigma0, opts), reference_point=[10.0, 10.0],
                                    opts={"verb_log": 0, "verb_disp": 0})
            while len(points) < budget:
                t0 = time.perf_counter()
                xs = moes.ask("all")
                opt_s += time.perf_counter() - t0
                values = []
                for x in xs:
                    s = ev.evaluate(space.to_genome(np.clip(x, lo, hi)))
                    values.append([s.terms["ce_safety"], s.terms["ce_domain"]])
                t0 = time.perf_counter()
                moes.tell(xs, values)
                opt_s += time.perf_counter() - t0
                points += [tuple(v) for v in values]
        finally:
            os.chdir(cwd)
    return points[:budget], opt_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--n-samples", type=int, default=100, help="held-in samples per set (fitness.n_samples)")
    args = parser.parse_args()

    import torch

    from evomerge.merge import Genome
    from evomerge.search import CandidateEvaluator, GenomeSpace, load_search_recipe

    torch.set_num_threads(1)
    recipe = load_search_recipe("recipes/demo.yaml", OVERRIDES + ["search.mode=pareto", f"search.popsize={args.popsize}", f"fitness.n_samples={args.n_samples}"])
    ev = CandidateEvaluator(recipe)
    space = GenomeSpace.from_recipe(recipe, ev.num_layers)
    # the pool's models as merges (TIES of one expert at weight 1, density 1 is that expert)
    pool = {}
    for k, name in enumerate(space.expert_names):
        w = [1.0 if j == k else 0.0 for j in range(space.n_experts)]
        s = ev.evaluate(Genome.from_values(w, [1.0] * space.n_experts))
        pool[name] = (s.terms["ce_safety"], s.terms["ce_domain"])
    ref = (max(p[0] for p in pool.values()), max(p[1] for p in pool.values()))
    bound = pool["safe"][0] + SLACK
    out = {"pool": pool, "reference_point": ref, "bound": bound, "budget": args.budget, "runs": []}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    for seed in args.seeds:
        for name, fn in (("optuna-nsga2", run_optuna), ("comocma", run_comocma)):
            t0 = time.perf_counter()
            points, opt_s = fn(ev, space, recipe, args.budget, seed)
            wall = time.perf_counter() - t0
            front = front_2d(points)
            ok = [points[i] for i in front if points[i][0] <= bound]
            pick = min(ok, key=lambda p: p[1]) if ok else None
            row = {"optimiser": name, "seed": seed, "hypervolume": hypervolume_2d(points, ref), "front": len(front),
                   "within_bar": len(ok), "pick_ce_safety": pick and pick[0], "pick_ce_geography": pick and pick[1],
                   "optimiser_s": opt_s, "wall_s": wall}
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
