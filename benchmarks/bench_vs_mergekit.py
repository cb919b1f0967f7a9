"""evomerge vs mergekit 0.1.5 on random Llama models (no downloads).

Run in the benchmark-only environment made by ``benchmarks/make_mergekit_env.sh``
(mergekit is never an evomerge dependency; evomerge is imported from the checkout):

    PYTHONPATH=. nice -n 19 /tmp/mergekit-env/bin/python benchmarks/bench_vs_mergekit.py

Prints, for TIES and DARE-TIES with the same genome:
* our per-candidate ``build(cache, genome, out=model)`` into a live LlamaForCausalLM,
* mergekit's in-process ``merge_state_dicts`` for the same config,
* ``mergekit-yaml`` writing the merge to disk plus reloading it with transformers,
and the speedups; then checks that TIES, task_arithmetic and linear weights equal
mergekit's (max abs difference) and compares DARE-TIES outputs in distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from evomerge.merge import Genome, build, prepare
from evomerge.pool import Pool


def make_models(root: Path, hidden: int, inter: int, layers: int, vocab: int, heads: int) -> dict[str, Path]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False, max_position_embeddings=256,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    paths = {}
    base_sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for i, name in enumerate(["base", "expert_a", "expert_b"]):
        folder = root / name
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        g = torch.Generator().manual_seed(100 + i)
        sd = base_sd if name == "base" else {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in base_sd.items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = folder
    n_params = sum(v.numel() for v in base_sd.values())
    return paths, n_params


def load_sd(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def timed(fn, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where the random models go (default: a temp dir, removed)")
    ap.add_argument("--skip-yaml", action="store_true", help="skip the mergekit-yaml + reload timing")
    ap.add_argument("--methods", nargs="*", default=["ties", "dare_ties"], help="which of ties, dare_ties to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        run(args, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> None:
    from mergekit.merge_methods.api import merge_state_dicts
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    paths, n_params = make_models(root, args.hidden, args.intermediate, args.layers, args.vocab, args.heads)
    print(f"models: 3 x {n_params / 1e6:.1f}M params (fp32) in {root} ({time.perf_counter() - t0:.0f}s to make); threads={args.threads}")
    experts = {"expert_a": str(paths["expert_a"]), "expert_b": str(paths["expert_b"])}
    pool = Pool.from_refs(paths["base"], experts)
    model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32).eval()
    sds = {name: load_sd(p) for name, p in paths.items()}
    w = {"expert_a": 0.6, "expert_b": 0.4}
    configs = {
        "ties": ({"normalize": True, "density_grid": None}, {"expert_a": 0.5, "expert_b": 0.3}, {"normalize": True}),
        "dare_ties": ({"normalize": False, "rescale": "l1"}, {"expert_a": 0.66, "expert_b": 0.5}, {"normalize": False, "rescale": True}),
    }
    results = {}
    for method, (opts, dens, mk_params) in configs.items():
        if method not in args.methods:
            continue
        genome = Genome.from_values(w, dens, 1.0, list(experts))
        t_prep, cache = timed(lambda: prepare(pool, method, opts, fused=True))
        t_first, _ = timed(lambda: build(cache, genome, out=model))
        t_ours, _ = timed(lambda: build(cache, genome, out=model), repeats=3)
        build(cache, genome, out=model)
        ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
        params = {"weight": {"base": 0.0, **w}, "density": {"base": 1.0, **dens}, **mk_params}
        with torch.no_grad():
            t_mk, mk_out = timed(lambda: merge_state_dicts(sds, method, base="base", parameters=params, dtype=torch.float32))
        print(f"\n[{method}] prepare {t_prep:.1f}s (once), first build {t_first:.2f}s (includes compile)")
        print(f"[{method}] evomerge build into live model: {t_ours:.3f}s per candidate")
        if method == "ties":  # the search default: densities on a 1/1024 grid, stable tie order
            grid_cache = prepare(pool, method, {"normalize": True})
            build(grid_cache, genome, out=model)
            t_grid, _ = timed(lambda: build(grid_cache, genome, out=model), repeats=3)
            print(f"[{method}] (density_grid=1024 cache: {t_grid:.3f}s per candidate)")
            del grid_cache
        print(f"[{method}] mergekit merge_state_dicts:     {t_mk:.2f}s  -> {t_mk / t_ours:.0f}x faster")
        results[method] = {"ours": t_ours, "mk": t_mk, "prep": t_prep}
        if method == "ties":
            diff = max(float((ours[k] - mk_out[k]).abs().max()) for k in mk_out)
            print(f"[ties] max |evomerge - mergekit| over all tensors: {diff:.3g}")
            results["ties"]["maxdiff"] = diff
        else:
            base = sds["base"]
            d_ours = torch.cat([(ours[k] - base[k]).reshape(-1) for k in mk_out])
            d_mk = torch.cat([(mk_out[k] - base[k]).reshape(-1) for k in mk_out])
            nz = (float((d_ours != 0).float().mean()), float((d_mk != 0).float().mean()))
            l1 = (float(d_ours.abs().mean()), float(d_mk.abs().mean()))
            sd = (float(d_ours.std()), float(d_mk.std()))
            print(f"[dare_ties] in distribution: nonzero {nz[0]:.4f} vs {nz[1]:.4f}; mean|delta| {l1[0]:.4g} vs {l1[1]:.4g}; std {sd[0]:.4g} vs {sd[1]:.4g}")
        del mk_out, cache
        if not args.skip_yaml:
            cfg = {
                "merge_method": method,
                "base_model": str(paths["base"]),
                "models": [{"model": experts[n], "parameters": {"weight": w[n], "density": dens[n]}} for n in experts],
                "parameters": mk_params,
                "dtype": "float32",
            }
            cfg_path = root / f"{method}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            out_dir = root / f"out_{method}"
            env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
            exe = str(Path(sys.executable).with_name("mergekit-yaml"))
            t0 = time.perf_counter()
            proc = subprocess.run([exe, str(cfg_path), str(out_dir), "--no-copy-tokenizer", "--random-seed", "42"], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"mergekit-yaml failed:\n{proc.stderr[-3000:]}")
            t_yaml = time.perf_counter() - t0
            t_reload, _ = timed(lambda: LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32))
            total = t_yaml + t_reload
            print(f"[{method}] mergekit-yaml {t_yaml:.1f}s + reload {t_reload:.1f}s = {total:.1f}s -> {total / t_ours:.0f}x faster")
            results[method] |= {"yaml": t_yaml, "reload": t_reload}
            if method == "ties":
                written = load_sd(out_dir)
                diff = max(float((ours[k] - written[k]).abs().max()) for k in written)
                print(f"[ties] max |evomerge - mergekit-yaml output|: {diff:.3g}")
            shutil.rmtree(out_dir, ignore_errors=True)
    # exact equality for task_arithmetic and linear as well
    for method, opts, mk_params in [("task_arithmetic", {}, {}), ("linear", {"normalize": True}, {"normalize": True})]:
        genome = Genome.from_values(w, None, 1.0, list(experts))
        build(prepare(pool, method, opts, fused=True), genome, out=model)
        ours = model.state_dict()
        if method == "linear":
            mk_out = merge_state_dicts({n: sds[n] for n in experts}, "linear", parameters={"weight": w, **mk_params}, dtype=torch.float32)
        else:
            mk_out = merge_state_dicts(sds, method, base="base", parameters={"weight": {"base": 0.0, **w}}, dtype=torch.float32)
        diff = max(float((ours[k] - mk_out[k]).abs().max()) for k in mk_out)
        print(f"[{method}] max |evomerge - mergekit| over all tensors: {diff:.3g}")
    print("\nsummary:", json.dumps(results))


if __name__ == "__main__":
    main()
