"""Materialise one merge as a complete Hugging Face model folder, atomically.

Folder contents: ``model.safetensors``, ``config.json`` (dtype updated), the base's
tokenizer and generation files, ``README.md`` (model card with
``base_model_relation: merge``), ``evomerge_recipe.yaml`` (the resolved recipe and
genome) and, where the method exists in mergekit, ``mergekit_config.yml``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.errors import ConfigError, EvomergeError, check_device
from evomerge.io_utils import atomic_directory, check_replaceable, copy_support_files
from evomerge.merge.cache import RoundedInputsPool, build, prepare
from evomerge.merge.genome import Genome
from evomerge.merge.mergekit_compat import to_mergekit
from evomerge.merge.passthrough import PassthroughPlan, explain_passthrough, is_passthrough, read_passthrough, write_passthrough
from evomerge.merge.recipe import GenomeSpec, MergeRecipe
from evomerge.pool import LoadOptions, Pool, TokenizerUnavailableError

log = logging.getLogger(__name__)

PAPERS = {
    "task_arithmetic": "https://arxiv.org/abs/2212.04089",
    "linear": "https://arxiv.org/abs/2203.05482",
    "ties": "https://arxiv.org/abs/2306.01708",
    "dare_linear": "https://arxiv.org/abs/2311.03099",
    "dare_ties": "https://arxiv.org/abs/2311.03099",
    "slerp": "https://en.wikipedia.org/wiki/Slerp",
    "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "breadcrumbs_ties": "https://arxiv.org/abs/2312.06795",
    "tsvm": "https://arxiv.org/abs/2412.00081",
    "r_tsvm": "https://arxiv.org/abs/2502.06876",
    "nearswap": "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    "arcee_fusion": "https://arcee.ai",
}


def model_card(recipe: MergeRecipe, genome: Genome, mergekit_yaml: str | None, why_not: str) -> str:
    names = list(recipe.experts)
    front = {
        "base_model": [recipe.base, *recipe.experts.values()],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "evomerge", recipe.method],
    }
    rows = "\n".join(
        f"| {n} | `{recipe.experts[n]}` | {', '.join(f'{row[k]:.6g}' for row in genome.weights)} | "
        + (", ".join(f"{row[k]:.6g}" for row in genome.densities) if genome.densities else "-")
        + " |"
        for k, n in enumerate(names)
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# Merge of {len(names)} expert(s) into `{recipe.base}` with `{recipe.method}`",
        "",
        f"Made with evomerge. Method: `{recipe.method}` ({PAPERS.get(recipe.method, '')}).",
        "",
        "## Constituents",
        "",
        f"Base model: `{recipe.base}`. Global scale: {genome.scale:.6g}; layer groups: {genome.n_groups}.",
        "",
        "| expert | source | weight per group | density per group |",
        "|---|---|---|---|",
        rows,
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.to_yaml().strip(),
        "```",
        "",
        "## Reproduce with mergekit",
        "",
    ]
    if mergekit_yaml:
        lines += ["```yaml", mergekit_yaml.strip(), "```", ""]
    else:
        lines += [f"Not expressible in mergekit: {why_not}.", ""]
    return "\n".join(lines)


def resolve_genome(recipe: MergeRecipe, pool: Pool, genome: Genome | GenomeSpec | None) -> Genome:
    if isinstance(genome, Genome):
        return genome
    spec = genome or recipe.genome
    if spec is None:
        raise ConfigError("no genome: give one in the recipe ('genome:') or with --genome")
    num_layers = getattr(pool.base.config, "num_hidden_layers", None)
    return spec.to_genome(list(recipe.experts), num_layers)


def _no_genome(plan: PassthroughPlan, genome: Any) -> None:
    if genome is not None:
        raise ConfigError(f"{plan.source}: passthrough has no genome (it copies layers, with the config's scale): "
                          "drop --genome")


def write_merged_model(
    recipe: MergeRecipe | PassthroughPlan,
    out_dir: str | os.PathLike[str],
    genome: Genome | GenomeSpec | None = None,
    overwrite: bool = False,
    load_options: LoadOptions | None = None,
    device: str = "cpu",
) -> Path:
    """Merge ``recipe`` at ``genome`` (default: the recipe's) into a new model folder.

    Everything is written to a temporary sibling folder that is renamed into place only
    at the end, so a failure leaves nothing behind. A :class:`PassthroughPlan` (a mergekit
    passthrough config) is written by :func:`write_passthrough`.
    """
    out_dir = Path(out_dir)
    check_device(device, "--device")
    if isinstance(recipe, PassthroughPlan):
        _no_genome(recipe, genome)
        return write_passthrough(recipe, out_dir, overwrite=overwrite, load_options=load_options)
    pool = Pool.from_refs(recipe.base, recipe.experts, load_options)
    inputs = [m.folder for m in pool.members]
    check_replaceable(out_dir, inputs)  # before any work: never --out . or an input's folder
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    try:
        pool.check_compatibility()
    except TokenizerUnavailableError as exc:
        # tokenizers are compared last, so architecture, tensor names, shapes and dtypes
        # were all checked; a merge only copies the base's tokenizer files
        log.warning("%s; vocabulary and chat template not compared (architecture, tensor names, shapes and "
                    "dtypes were checked)", exc)
    g = resolve_genome(recipe, pool, genome)
    # one build only: compiling the fused kernels would cost more than it saves
    def report(done: int, total: int) -> None:  # a big model takes minutes: say how far it is
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            log.info("merge: %d of %d tensors read and merged (%d%%)", done, total, 100 * done // total)

    source: Any = pool
    if recipe.compute_dtype and recipe.compute_dtype != "float32":
        source = RoundedInputsPool(pool, getattr(torch, recipe.compute_dtype))
    cache = prepare(source, recipe.method, recipe.options, device=device, fused=False, progress=report)
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    state = build(cache, g, dtype=dtype)
    for name, tensor in state.items():  # the inputs are finite; an output dtype can still overflow
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise EvomergeError(f"the merge of tensor '{name}' is not finite (NaN/Inf) at this genome"
                                + (f" in {recipe.dtype}" if recipe.dtype else "") + "; nothing was written")
    mk_yaml, why_not = to_mergekit(recipe, g)
    from safetensors.torch import save_file

    with atomic_directory(out_dir, overwrite=overwrite, protected=inputs) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((pool.base.folder / "config.json").read_text())
        if recipe.dtype:
            config["torch_dtype"] = recipe.dtype
            if "dtype" in config:
                config["dtype"] = recipe.dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_support_files(pool.base.folder, tmp)
        resolved = recipe.model_copy(update={"genome": GenomeSpec.from_genome(g, list(recipe.experts))})
        (tmp / "evomerge_recipe.yaml").write_text(resolved.to_yaml())
        if mk_yaml:
            (tmp / "mergekit_config.yml").write_text(mk_yaml)
        (tmp / "README.md").write_text(model_card(resolved, g, mk_yaml, why_not))
    log.info("wrote %s (%s, %d tensors)", out_dir, recipe.method, len(state))
    return out_dir


def explain_merge(recipe: MergeRecipe | PassthroughPlan, genome: Genome | GenomeSpec | None = None,
                  load_options: LoadOptions | None = None) -> str:
    """What ``write_merged_model`` would compute, per tensor group, without computing it.

    Reads only the checkpoints' headers and configs. Each line is one layer group of the
    genome (the tensors that share weights and densities), so a user can check that a
    (mergekit) config means what they think before spending a merge on it.
    """
    from evomerge.merge.cache import POST, PRE, _specs, genome_group, is_attention, layer_of
    from evomerge.merge.methods import get_method

    if isinstance(recipe, PassthroughPlan):
        _no_genome(recipe, genome)
        return explain_passthrough(recipe, load_options)
    pool = Pool.from_refs(recipe.base, recipe.experts, load_options)
    g = resolve_genome(recipe, pool, genome)
    names = list(recipe.experts)
    specs = _specs(pool)
    num_layers = getattr(pool.base.config, "num_hidden_layers", None) or 1
    impl = get_method(recipe.method)
    opts = recipe.method_options
    base_dtypes = sorted({str(d).removeprefix("torch.") for _, d in specs.values() if d.is_floating_point})
    compute = recipe.compute_dtype or "float32"
    lines = [
        f"method: {recipe.method}  options: " + ", ".join(f"{k}={v}" for k, v in opts.model_dump().items()),
        f"base: {recipe.base}",
        *(f"expert {n}: {recipe.experts[n]}" for n in names),
        f"inputs: {'/'.join(base_dtypes)}; " + (f"inputs and task vectors rounded to {compute}, " if compute != "float32" else "")
        + "arithmetic in float32; output dtype: " + (recipe.dtype or f"the base's ({'/'.join(base_dtypes)})"),
        f"scale (lambda): {g.scale:g}; layer groups: {g.n_slots}" + (" (per module)" if g.modules else "")
        + (f" x filter classes {[*g.filters, '(none)']}" if g.filters else "") + f" over {num_layers} layers",
    ]
    groups: dict[int, list[str]] = {}
    copied = 0
    for name, (_, dtype) in specs.items():
        if not dtype.is_floating_point:
            copied += 1
            continue
        groups.setdefault(genome_group(name, g, num_layers), []).append(name)
    width = len(g.filters) + 1
    for grp in sorted(groups):
        members = groups[grp]
        layers = sorted({layer_of(n) for n in members if layer_of(n) >= 0})
        where = f"layers {layers[0]}-{layers[-1]}" if layers else "no decoder layers"
        if g.modules and layers:
            where = f"layer {layers[0]} {'attention' if is_attention(members[0]) else 'MLP'}"
        extra = [w for w, flag in (("embeddings", any(layer_of(n) == PRE for n in members)),
                                   ("final norm/lm_head", any(layer_of(n) == POST for n in members))) if flag]
        if g.filters:
            c = grp % width
            extra.append(f"filter '{g.filters[c]}'" if c < len(g.filters) else "no filter matches")
        desc = ", ".join(f"{n}={g.weights[grp][k]:g}" for k, n in enumerate(names))
        line = f"group {grp} ({where}{''.join(' + ' + e for e in extra)}; {len(members)} tensors): weights {desc}"
        if impl.uses_density and g.densities is not None:
            line += "; densities " + ", ".join(f"{n}={g.densities[grp][k]:g}" for k, n in enumerate(names))
        lines.append(line)
    if copied:
        lines.append(f"{copied} non-float tensor(s) copied from the base")
    lines.append("nothing was written (--explain)")
    return "\n".join(lines)


def load_recipe(path: str | os.PathLike[str]) -> MergeRecipe | PassthroughPlan:
    """An evomerge merge recipe, a mergekit config (``merge_method``; passthrough gives a
    :class:`PassthroughPlan`) or a search recipe (``pool`` + ``data``: its pool, method and
    options; the genome comes from ``--genome``, e.g. a run's ``best_genome.yaml``)."""
    from evomerge.config import load_yaml
    from evomerge.merge.mergekit_compat import from_mergekit, is_mergekit_config

    data: Any = load_yaml(path)
    if is_passthrough(data):
        return read_passthrough(data, str(path))
    if is_mergekit_config(data):
        return from_mergekit(data, str(path))
    if isinstance(data, dict) and "pool" in data and "data" in data:
        from evomerge.refs import resolve_path
        from evomerge.search.recipe import load_search_recipe

        search = load_search_recipe(path)
        base, experts = resolve_path(search.pool.base), {k: resolve_path(v) for k, v in search.pool.experts.items()}
        method = "linear" if search.search.mode == "lm-cocktail" else search.merge.method
        options = {} if method != search.merge.method else search.merge.options
        return MergeRecipe(base=base, experts=experts, method=method, options=options)
    return MergeRecipe.from_dict(data, str(path))
