"""Read mergekit YAML configs into recipes, and write a recipe as mergekit YAML.

Semantics follow mergekit 0.1.5 (docs/merging.md): per-model ``weight``
and ``density``, method defaults for ``normalize`` (ties/linear: true), ``rescale``
(DARE: true, which mergekit implements as an L1-norm-matching rescale) and ``lambda``.
Scalars, gradient lists, ``filter:`` values and ``slices:`` that merge the same layers of
every model are read into a genome (``mergekit_settings.py``); anything else is refused
by name rather than merged differently.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.merge.genome import Genome
from evomerge.merge.mergekit_settings import Inputs, genome_spec, gradient_value, leaves, read_inputs, scalar
from evomerge.merge.recipe import MergeRecipe

log = logging.getLogger(__name__)
__all__ = ["PASSTHROUGH_SEARCH", "from_mergekit", "gradient_value", "is_mergekit_config", "to_mergekit"]

EXPORTABLE = ("ties", "dare_ties", "dare_linear", "task_arithmetic", "linear", "slerp", "breadcrumbs", "breadcrumbs_ties")
# read from mergekit configs by _from_more(); not yet written back as mergekit YAML
MORE = ("della", "della_linear", "model_stock", "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion",
        "ram", "ramplus_tl")
SUPPORTED = EXPORTABLE + MORE
# mergekit 0.1.5 methods evomerge does not compute, each with the reason it is refused
REFUSED = {
    "passthrough": "it changes the layer count (slices that stack, drop or reorder layers), so it is no recipe of "
                   "the merge engine, which builds in place into a live model of the base's shape: "
                   "`evomerge merge CONFIG --out DIR` writes it as a new model folder (load_recipe reads it as a "
                   "PassthroughPlan, evomerge/merge/passthrough.py); it cannot be searched",
}
# why ``evomerge search`` refuses passthrough (a search moves coefficients of one fixed architecture)
PASSTHROUGH_SEARCH = ("merge method 'passthrough' cannot be searched: it stacks, drops or reorders layers (a new "
                      "layer count) and has no coefficients, while a search builds each candidate in place into a "
                      "live model of the base's shape; write it once with `evomerge merge CONFIG --out DIR`")
_GLOBAL_KEYS = {"normalize", "lambda", "rescale", "int8_mask", "t", "weight", "density", "gamma"}
_BREADCRUMBS = ("breadcrumbs", "breadcrumbs_ties")
_TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name"}
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _check_density(chains: list[list[tuple[Any, str]]], source: str, label: str) -> None:
    for v, where in leaves(chains):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{source}: {where} ({label}) = {v:g} must lie in [0, 1] (the kept fraction of the task vector)")


def _name_for(ref: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ref.rstrip("/")).name or ref) or "model"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name)
    return name


def _label(inp: Inputs, k: int) -> str:
    """How an error names a model: its first entry (``models[1]``, ``slices[0].sources[1]``) and ref."""
    return f"{inp.inputs[k].where[0].removesuffix('.parameters')} ({inp.inputs[k].ref})"


def from_mergekit(data: dict[str, Any], source: str = "mergekit config") -> MergeRecipe:
    """Translate a mergekit config (already parsed YAML) into a :class:`MergeRecipe`."""
    method = data.get("merge_method")
    if method in REFUSED:
        raise ConfigError(f"{source}: merge_method '{method}' is not supported: {REFUSED[method]} "
                          f"(supported: {', '.join(SUPPORTED)})")
    if method not in SUPPORTED:
        raise ConfigError(f"{source}: merge_method '{method}' is not supported (supported: {', '.join(SUPPORTED)})")
    if method in MORE:
        return _from_more(data, source, method)
    if "gamma" in (data.get("parameters") or {}) and method not in _BREADCRUMBS:
        raise ConfigError(f"{source}: parameters.gamma is not supported for '{method}' (only breadcrumbs has it)")
    _common_checks(data, source)
    params = dict(data.get("parameters") or {})
    bad = sorted(set(params) - _GLOBAL_KEYS)
    if bad:
        raise ConfigError(f"{source}: parameters.{bad[0]} is not supported")
    per_model = {"weight", "density", "gamma"} if method in _BREADCRUMBS else {"weight", "density"}
    inp = read_inputs(data, source, per_model, method, shared={"t"} if method == "slerp" else set())
    base = inp.base
    if base is None and method != "linear":
        raise ConfigError(f"{source}: merge_method '{method}' needs base_model")

    experts: dict[str, str] = {}
    weights: dict[str, Any] = {}
    densities: dict[str, Any] = {}
    labels: dict[str, str] = {}
    gammas: dict[str, float] = {}
    taken: set[str] = set()
    for k, entry in enumerate(inp.inputs):
        if method != "linear" and entry.ref == base:
            continue  # mergekit gives the base no parameters for these methods
        name = _name_for(entry.ref, taken)
        experts[name], labels[name] = entry.ref, _label(inp, k)
        if method == "slerp":
            continue
        weights[name] = inp.chains(k, "weight", params)
        if method in _BREADCRUMBS:
            found = inp.statics(k, "gamma", params, 0.01, source)
            if len(found) > 1:
                raise ConfigError(f"{source}: {labels[name]}: gamma differs between slices ({sorted(found)}); evomerge's "
                                  "breadcrumbs takes one gamma for all models (a static option, not a searched gene)")
            gammas[name] = found.pop()
        densities[name] = inp.chains(k, "density", params)
        _check_density(densities[name], source, entry.ref)
    if base is None:  # linear without base: any input can be the reference; it gets tau = 0
        base = next(iter(experts.values()))
        inp.base = base
    if not experts:
        raise ConfigError(f"{source}: no models besides the base_model")

    options: dict[str, Any] = {}
    if "rescale" in params and method in ("task_arithmetic", "linear", "slerp"):
        raise ConfigError(f"{source}: parameters.rescale has no meaning for '{method}' (nothing is trimmed)")
    if method == "ties":
        options = {"normalize": bool(params.get("normalize", True)), "density_grid": None, "rescale": bool(params.get("rescale", False))}
    elif method in ("dare_ties", "dare_linear"):
        options = {"normalize": bool(params.get("normalize", False)), "rescale": "l1" if params.get("rescale", True) else "none"}
    elif method == "task_arithmetic":
        options = {"normalize": bool(params.get("normalize", False))}
    elif method in _BREADCRUMBS:
        if len(set(gammas.values())) > 1:
            raise ConfigError(f"{source}: per-model gamma values differ ({gammas}); evomerge's breadcrumbs takes one "
                              "gamma for all models (a static option, not a searched gene)")
        gamma = next(iter(gammas.values()), 0.01)
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"{source}: parameters.gamma = {gamma:g} must lie in [0, 1] (the fraction of outliers dropped)")
        options = {"normalize": bool(params.get("normalize", False)), "rescale": bool(params.get("rescale", False)), "gamma": gamma}
    elif method == "linear":
        options = {"normalize": bool(params.get("normalize", True))}
    scale = scalar(params.get("lambda", 1.0), f"{source}: parameters.lambda")
    if method in ("linear", "slerp") and "lambda" in params:
        # mergekit's linear and slerp take no lambda and drop it unread; do the same, aloud
        log.warning("%s: parameters.lambda is ignored: mergekit's %s has no lambda (it would not scale the merge)", source, method)
        scale = 1.0
    if method == "slerp":
        if len(experts) != 1:
            raise ConfigError(f"{source}: slerp needs base_model plus exactly one other model, got {len(experts)}")
        t = inp.chains(None, "t", params)  # mergekit's t is shared: the slice's, then the top-level one
        if not all(t):
            raise ConfigError(f"{source}: slerp needs parameters.t")
        weights = {next(iter(experts)): t}
        densities = {}
    # mergekit: ``dtype`` is what inputs are cast to and computed in, ``out_dtype``
    # (default: dtype) what is written; evomerge rounds the inputs to ``dtype`` and
    # computes in float32 (see docs/merging.md for the measured difference)
    compute = _DTYPES.get(data.get("dtype")) if data.get("dtype") else None
    out = data.get("out_dtype") or data.get("dtype")
    genome = genome_spec(inp, source, scale, {"weights": weights, "densities": densities},
                         {"weights": None, "densities": 1.0}, labels)
    return MergeRecipe(
        base=str(base), experts=experts, method=method, options=options, dtype=_DTYPES.get(out) if out else None,
        compute_dtype=None if compute == "float32" else compute, genome=genome,
    )


def _check_tokenizer(data: dict[str, Any], source: str) -> None:
    """Only the trivial tokenizer choice (the base's, unchanged) is accepted; anything that
    would build a different vocabulary or chat template is refused by name."""
    tok = data.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise ConfigError(f"{source}: tokenizer must be a mapping (e.g. {{source: base}})")
        extra = sorted(k for k, v in tok.items() if k != "source" and v not in (None, {}, []))
        if tok.get("source", "base") != "base" or extra:
            what = f"tokenizer.{extra[0]}" if extra else f"tokenizer.source '{tok.get('source')}'"
            raise ConfigError(f"{source}: {what} is not supported: evomerge copies the base's tokenizer unchanged "
                              "(a union or added tokens would change the embedding rows)")
    if data.get("chat_template") is not None:
        raise ConfigError(f"{source}: chat_template is not supported: evomerge copies the base's tokenizer files and "
                          "chat template unchanged")


def to_mergekit(recipe: MergeRecipe, genome: Genome) -> tuple[str | None, str]:
    """mergekit YAML reproducing ``recipe`` at ``genome``, or ``None`` and the reason why not."""
    opts = recipe.method_options
    names = list(recipe.experts)
    if recipe.method in MORE:
        return None, f"writing '{recipe.method}' back as a mergekit config is not implemented yet"
    if recipe.method not in SUPPORTED:
        return None, f"mergekit has no '{recipe.method}' method"
    if recipe.method == "ties" and opts.variant != "mergekit":  # type: ignore[attr-defined]
        return None, "the original-paper TIES variant (global top-k) has no mergekit equivalent"
    if genome.filters:
        return None, "filter classes are not exported yet (mergekit would need 'filter:' values)"
    if genome.n_groups != 1:
        return None, "per-layer-group genomes are not exported (mergekit would need slices)"
    if recipe.method in ("linear", "slerp") and genome.scale != 1.0:
        return None, f"mergekit's {recipe.method} has no global scale (genome scale {genome.scale})"
    comments = []
    cfg: dict[str, Any] = {"merge_method": recipe.method}
    w, d = genome.weights[0], genome.densities[0] if genome.densities else None
    if recipe.method == "slerp":
        cfg["base_model"] = recipe.base
        cfg["models"] = [{"model": recipe.base}, {"model": recipe.experts[names[0]]}]
        cfg["parameters"] = {"t": w[0]}
    else:
        models = []
        grid = getattr(opts, "density_grid", None)
        for k, name in enumerate(names):
            p: dict[str, Any] = {"weight": w[k]}
            if d is not None and recipe.method != "task_arithmetic" and recipe.method != "linear":
                dk = d[k]
                if recipe.method == "ties" and grid is not None and dk < 1:
                    dk = min(grid, max(0, round(dk * grid))) / grid
                p["density"] = dk
            models.append({"model": recipe.experts[name], "parameters": p})
        params: dict[str, Any] = {"normalize": bool(getattr(opts, "normalize", False))}
        if recipe.method == "linear":
            if not opts.normalize:  # type: ignore[attr-defined]
                comments.append("linear without normalize: the base enters with weight sum(w) in both tools")
        else:
            cfg["base_model"] = recipe.base
            params["lambda"] = genome.scale
        if recipe.method in ("ties", *_BREADCRUMBS) and getattr(opts, "rescale", False):
            params["rescale"] = True
        if recipe.method in _BREADCRUMBS:
            params["gamma"] = opts.gamma  # type: ignore[attr-defined]
        if recipe.method in ("dare_ties", "dare_linear"):
            params["rescale"] = opts.rescale != "none"  # type: ignore[attr-defined]
            comments.append("DARE masks are random: mergekit draws its own, so outputs agree in distribution only")
            if opts.rescale == "inv_density":  # type: ignore[attr-defined]
                comments.append("evomerge rescaled kept values by 1/density; mergekit >= 0.1 matches the L1 norm instead")
        cfg["models"] = models
        cfg["parameters"] = params
    cfg["dtype"] = recipe.compute_dtype or "float32"
    if recipe.dtype and recipe.dtype != cfg["dtype"]:
        cfg["out_dtype"] = recipe.dtype
    text = yaml.safe_dump(cfg, sort_keys=False)
    header = "# Reproduce with: mergekit-yaml mergekit_config.yml OUTPUT_DIR\n" + "".join(f"# note: {c}\n" for c in comments)
    return header + text, ""


# --------------------------------------------------------------------------- the other methods
# per method: shared parameters (mergekit name -> (evomerge option, default)), per-model
# parameters, whether mergekit requires a base_model, and whether it uses the models' weights
_MORE_SPEC: dict[str, dict[str, Any]] = {
    "della": {"shared": {"normalize": ("normalize", True), "rescale": ("rescale", True), "int8_mask": (None, False)},
              "per_model": {"weight", "density", "epsilon"}, "base": True, "weights": True},
    "della_linear": {"shared": {"normalize": ("normalize", False), "rescale": ("rescale", True), "int8_mask": (None, False)},
                     "per_model": {"weight", "density", "epsilon"}, "base": True, "weights": True},
    "model_stock": {"shared": {"filter_wise": ("filter_wise", False)}, "per_model": {"weight"}, "base": True, "weights": False},
    "sce": {"shared": {"select_topk": ("select_topk", 1.0), "int8_mask": (None, False)}, "per_model": {"weight"}, "base": True, "weights": False},
    "nuslerp": {"shared": {"nuslerp_row_wise": ("row_wise", False), "nuslerp_flatten": ("flatten", True)},
                "per_model": {"weight"}, "base": False, "weights": True},
    "multislerp": {"shared": {"normalize_weights": ("normalize_weights", True), "eps": ("eps", 1e-8)},
                   "per_model": {"weight"}, "base": False, "weights": True},
    "karcher": {"shared": {"max_iter": ("max_iter", 10), "tol": ("tol", 1e-5)}, "per_model": {"weight"}, "base": False, "weights": False},
    # two-model methods: the base and one other model; nearswap's shared t is the expert's genome weight
    "nearswap": {"shared": {"t": (None, None)}, "per_model": {"weight"}, "base": True, "weights": False},
    "arcee_fusion": {"shared": {}, "per_model": {"weight"}, "base": True, "weights": False},
    "ram": {"shared": {"epsilon": ("epsilon", 1e-5)}, "per_model": {"weight"}, "base": True, "weights": False},
    "ramplus_tl": {"shared": {"r": ("r", 0.1), "alpha": ("alpha", 0.2), "epsilon": ("epsilon", 1e-5)},
                   "per_model": {"weight"}, "base": True, "weights": False},
}
_TWO_MODEL = ("nearswap", "arcee_fusion")


def _common_checks(data: dict[str, Any], source: str) -> None:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unsupported top-level field '{unknown[0]}'")
    ts = data.get("tokenizer_source")
    if ts not in (None, "base"):
        raise ConfigError(f"{source}: tokenizer_source '{ts}' is not supported (the base's tokenizer is copied)")
    _check_tokenizer(data, source)
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in _DTYPES:
            raise ConfigError(f"{source}: {key} '{data[key]}' is not supported (float32, bfloat16, float16)")


def _from_more(data: dict[str, Any], source: str, method: str) -> MergeRecipe:
    """della, della_linear, model_stock, sce, nuslerp, multislerp, karcher (mergekit 0.1.5)."""
    spec = _MORE_SPEC[method]
    _common_checks(data, source)
    params = dict(data.get("parameters") or {})
    shared_keys = set(spec["shared"]) | ({"lambda"} if method in ("della", "della_linear") else set())
    bad = sorted(set(params) - shared_keys - spec["per_model"])
    if bad:
        raise ConfigError(f"{source}: parameters.{bad[0]} is not supported for '{method}'")
    inp = read_inputs(data, source, spec["per_model"], method, shared={"t"} if method == "nearswap" else set())
    base = inp.base
    if base is None and spec["base"]:
        raise ConfigError(f"{source}: merge_method '{method}' needs base_model")
    ks = [k for k, entry in enumerate(inp.inputs) if entry.ref != base]  # the base is an input of its own
    no_base = base is None
    if no_base and method == "karcher":
        base, ks = inp.inputs[ks[0]].ref, ks[1:]
    elif no_base:
        base = inp.inputs[ks[0]].ref  # nuslerp / multislerp on the models themselves: the first one is the reference, tau = 0
    inp.base = base
    if not ks:
        raise ConfigError(f"{source}: no models besides the base_model")
    if method == "nuslerp" and len(ks) != 2:
        raise ConfigError(f"{source}: nuslerp needs exactly two models besides the base_model, got {len(ks)}")
    if method in _TWO_MODEL and len(ks) != 1:
        raise ConfigError(f"{source}: {method} needs base_model plus exactly one other model, got {len(ks)}")
    if method == "model_stock" and len(ks) < 2:
        raise ConfigError(f"{source}: model_stock needs base_model plus at least two other models, got {len(ks)}")

    taken: set[str] = set()
    experts: dict[str, str] = {}
    weights: dict[str, Any] = {}
    densities: dict[str, Any] = {}
    labels: dict[str, str] = {}
    eps_values: dict[str, float] = {}
    for k in ks:
        ref = inp.inputs[k].ref
        name = _name_for(ref, taken)
        experts[name], labels[name] = ref, _label(inp, k)
        if not spec["weights"]:
            continue
        weights[name] = inp.chains(k, "weight", params)
        if method in ("della", "della_linear"):
            d = inp.chains(k, "density", params)
            _check_density(d, source, ref)
            found = inp.statics(k, "epsilon", params, 0.15, source)
            if len(found) > 1:
                raise ConfigError(f"{source}: {labels[name]}: epsilon differs between slices ({sorted(found)}); evomerge's "
                                  "della takes one epsilon for all models (a static option, not a searched gene)")
            e = found.pop()
            for dv, where in leaves(d) or [(1.0, "density")]:
                if 0 < dv < 1 and not (0 < dv - e and dv + e < 1):
                    raise ConfigError(f"{source}: {where} ({ref}): density {dv:g} +/- epsilon {e:g} must lie in "
                                      "(0, 1) (mergekit refuses it too)")
            densities[name], eps_values[name] = d, e
    if not spec["weights"]:
        written = any("weight" in p for k in ks for p in inp.inputs[k].params) or "weight" in params
        if written or any("weight" in sp for sp in inp.slice_params):
            log.warning("%s: the models' weights are ignored: mergekit's %s takes none", source, method)
        default = 1.0 if method == "sce" else 1.0 / len(experts)
        weights = {n: default for n in experts}
    if method == "nearswap":  # mergekit's t (shared: the slice's, then the top-level one), required
        t = inp.chains(None, "t", params)
        if not all(t):
            raise ConfigError(f"{source}: nearswap needs parameters.t (the distance under which the other model's "
                              "values are taken whole)")
        weights = {next(iter(experts)): t}
    options: dict[str, Any] = {}
    for mk_key, (ours, default) in spec["shared"].items():
        value = params.get(mk_key, default)
        if ours is None:
            continue  # int8_mask: a storage choice of mergekit's, no effect on the values
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: parameters.{mk_key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            value = int(scalar(value, f"{source}: parameters.{mk_key}"))
        else:
            value = scalar(value, f"{source}: parameters.{mk_key}")
        options[ours] = value
    if method in ("della", "della_linear"):
        if len(set(eps_values.values())) > 1:
            raise ConfigError(f"{source}: per-model epsilon values differ ({eps_values}); evomerge's della takes one "
                              "epsilon for all models (a static option, not a searched gene)")
        options["epsilon"] = next(iter(eps_values.values()), 0.15)
    if method in ("nuslerp", "multislerp"):
        options["on_task_vectors"] = not no_base  # without a base_model mergekit interpolates the models
    scale = scalar(params.get("lambda", 1.0), f"{source}: parameters.lambda")
    compute = _DTYPES.get(data.get("dtype")) if data.get("dtype") else None
    out = data.get("out_dtype") or data.get("dtype")
    genome = genome_spec(inp, source, scale, {"weights": weights, "densities": densities},
                         {"weights": None, "densities": 1.0}, labels)
    return MergeRecipe(
        base=str(base), experts=experts, method=method, options=options, dtype=_DTYPES.get(out) if out else None,
        compute_dtype=None if compute == "float32" else compute, genome=genome,
    )
