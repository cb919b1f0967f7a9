"""mergekit's parameter settings (scalars, gradient lists, ``filter:`` values, ``slices:``)
resolved into an evomerge genome, as mergekit 0.1.5 resolves them per tensor.

mergekit evaluates a parameter of one tensor by walking its scopes from the most to the
least specific (the model's entry in the slice, the slice, the top-level ``parameters``)
and taking the first value that applies: a number, a gradient list at the layer's
``t``, or the first ``{filter, value}`` entry whose filter is a substring of the tensor
name (no filter, or ``*``: always). Here every tensor that resolves alike shares one
genome row: a row per (slot, filter class), where the slots are one (constant values)
or the per-module groups of :class:`~evomerge.merge.genome.Genome` (values that vary
with the layer), and the classes are the filters in first-seen order plus a default.
The rows are then checked against every tensor name of the base, so a filter order
that the classes cannot express is refused instead of merged differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge.cache import genome_group
from evomerge.merge.genome import Genome
from evomerge.merge.recipe import GenomeSpec


@dataclass(frozen=True)
class Filtered:
    """mergekit's conditional values: ``(filter or None, value)`` pairs, first match wins."""

    conds: tuple[tuple[str | None, Any], ...]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalar(value: Any, where: str) -> float:
    """A plain number: the form every parameter but weight, density and slerp's t takes."""
    if not _is_number(value):
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{where}: gradient lists and 'filter:' values are only read for weight, density and "
                              f"slerp's t (got {value!r})")
        raise ConfigError(f"{where}: only scalar values are supported here (got {value!r})")
    return float(value)


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return tuple(float(v) for v in value)
    return scalar(value, where)


def parse_setting(value: Any, where: str) -> Any:
    """A number, a gradient list (tuple) or :class:`Filtered`; anything else is refused."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        conds = []
        for i, cond in enumerate(value):
            extra = sorted(set(cond) - {"filter", "value"})
            if extra or "value" not in cond:
                raise ConfigError(f"{where}[{i}]: a filtered value has the fields 'filter' and 'value' "
                                  f"(got {sorted(cond)})")
            f = cond.get("filter")
            if f is not None and (not isinstance(f, str) or not f):
                raise ConfigError(f"{where}[{i}].filter must be a non-empty string (a substring of tensor names)")
            conds.append((None if f in (None, "*") else f, _plain(cond["value"], f"{where}[{i}].value")))
        return Filtered(tuple(conds))
    return _plain(value, where)


def gradient_value(values: tuple[float, ...], t: float) -> float:
    """mergekit's gradient at ``t`` in [0, 1]: piecewise-linear between equally spaced anchors."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate(setting: Any, name: str, t: float) -> float | None:
    """Value of ``setting`` for tensor ``name`` at gradient position ``t`` (None: no entry applies)."""
    if isinstance(setting, Filtered):
        for f, v in setting.conds:
            if f is None or (name and f in name):
                return evaluate(v, name, t)
        return None
    if isinstance(setting, tuple):
        return gradient_value(setting, t)
    return float(setting)


def _has_gradient(setting: Any) -> bool:
    if isinstance(setting, Filtered):
        return any(isinstance(v, tuple) for _, v in setting.conds)
    return isinstance(setting, tuple)


# --------------------------------------------------------------------------- inputs
@dataclass
class Input:
    """One model of the config: its parameters in each output slice, and where they are written."""

    index: int
    ref: str
    params: list[dict[str, Any]]
    where: list[str]


@dataclass
class Inputs:
    """The models of a ``models:`` config (one slice over all layers) or an aligned ``slices:`` one."""

    base: str | None
    inputs: list[Input]
    slice_params: list[dict[str, Any]]
    slice_where: list[str]
    ranges: list[tuple[int, int]] | None  # layer range of each slice; None: the models form

    def chains(self, k: int | None, key: str, params: dict[str, Any]) -> list[list[tuple[Any, str]]]:
        """Per slice, the settings of ``key`` for input ``k`` (None: a shared parameter) from the
        most to the least specific scope, as mergekit walks them."""
        out = []
        for s, (sp, sw) in enumerate(zip(self.slice_params, self.slice_where)):
            chain = []
            if k is not None and key in self.inputs[k].params[s]:
                w = f"{self.inputs[k].where[s]}.{key}"
                chain.append((parse_setting(self.inputs[k].params[s][key], w), w))
            if key in sp:
                chain.append((parse_setting(sp[key], f"{sw}.{key}"), f"{sw}.{key}"))
            if key in params:
                chain.append((parse_setting(params[key], f"parameters.{key}"), f"parameters.{key}"))
            out.append(chain)
        return out

    def statics(self, k: int, key: str, params: dict[str, Any], default: float, source: str) -> set[float]:
        """A static per-model option (gamma, epsilon): its plain values over all slices."""
        found = set()
        for s in range(len(self.slice_params)):
            p, sp = self.inputs[k].params[s], self.slice_params[s]
            where = self.inputs[k].where[s] if key in p else self.slice_where[s] if key in sp else "parameters"
            found.add(scalar(p.get(key, sp.get(key, params.get(key, default))), f"{source}: {where}.{key}"))
        return found


def model_ref(value: Any) -> str:
    """A mergekit model reference (a string, or a mapping with ``model``) as a string."""
    return str(value.get("model") if isinstance(value, dict) else value)


def check_slice(sl: Any, where: str, source: str) -> None:
    """One ``slices:`` entry's shape: a non-empty ``sources`` list, no keys but ``sources``,
    ``parameters`` and ``base_model`` (shared by merges and passthrough)."""
    if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
        raise ConfigError(f"{source}: {where} needs a non-empty 'sources' list")
    extra = sorted(set(sl) - {"sources", "parameters", "base_model"})
    if extra:
        raise ConfigError(f"{source}: {where}.{extra[0]} is not supported")


def read_inputs(data: dict[str, Any], source: str, per_model: set[str], method: str, shared: set[str] = frozenset()) -> Inputs:  # type: ignore[assignment]
    """The config's models and their parameter scopes; ``slices:`` only where each slice
    merges the same models over the same layers, in order (anything else changes the
    architecture and is refused by name). ``shared``: slice-level keys besides ``per_model``."""
    base = data.get("base_model")
    base = None if base is None else model_ref(base)
    if "slices" in data:
        if data.get("models"):
            raise ConfigError(f"{source}: give either 'models' or 'slices', not both")
        return _read_slices(data["slices"], base, source, per_model, method, per_model | shared)
    models = data.get("models") or []
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: merge_method '{method}': 'models' must be a non-empty list")
    inputs = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{source}: models[{i}] needs a 'model' field")
        ref, p = model_ref(entry["model"]), dict(entry.get("parameters") or {})
        _check_keys(p, per_model, f"{source}: models[{i}] ({ref}): parameter", method)
        inputs.append(Input(i, ref, [p], [f"models[{i}].parameters"]))
    return Inputs(base, inputs, [{}], ["parameters"], None)


def _check_keys(p: dict[str, Any], allowed: set[str], what: str, method: str) -> None:
    extra = sorted(set(p) - allowed)
    if extra:
        raise ConfigError(f"{what} '{extra[0]}' is not supported for '{method}'")


def _read_slices(slices: Any, base: str | None, source: str, per_model: set[str], method: str, slice_keys: set[str]) -> Inputs:
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{source}: 'slices' must be a non-empty list")
    why = ("slices that repeat, drop or reorder layers, or take different layers from different models, change "
           "the architecture (mergekit's passthrough); evomerge merges slices only where every slice takes the same "
           "layers from every model, covering the base's layers in order")
    order: list[str] | None = None
    per_ref: list[tuple[list[dict[str, Any]], list[str]]] = []
    slice_params, slice_where, ranges = [], [], []
    start = 0
    for s, sl in enumerate(slices):
        where = f"slices[{s}]"
        check_slice(sl, where, source)
        if sl.get("base_model") is not None and model_ref(sl["base_model"]) != base:
            raise ConfigError(f"{source}: {where}.base_model: a per-slice base model is not supported (one base for "
                              "all layers)")
        refs, found, rng = [], [], None
        for j, src in enumerate(sl["sources"]):
            sw = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{source}: {sw} needs 'model' and 'layer_range'")
            bad = sorted(set(src) - {"model", "layer_range", "parameters"})
            if bad:
                raise ConfigError(f"{source}: {sw}.{bad[0]} is not supported")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) for v in lr) and 0 <= lr[0] < lr[1]):
                raise ConfigError(f"{source}: {sw}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
            if rng is not None and tuple(lr) != rng:
                raise ConfigError(f"{source}: {sw}.layer_range {lr} differs from {list(rng)}: {why}")
            rng = tuple(lr)
            ref, p = model_ref(src["model"]), dict(src.get("parameters") or {})
            _check_keys(p, per_model, f"{source}: {sw} ({ref}): parameter", method)
            refs.append(ref)
            found.append((p, f"{sw}.parameters"))
        if order is None:
            order, per_ref = refs, [([p], [w]) for p, w in found]
        elif refs != order:
            raise ConfigError(f"{source}: {where}.sources name the models {refs}, slices[0] {order}: evomerge merges "
                              "the same models, in the same order, in every slice")
        else:
            for (params, wheres), (p, w) in zip(per_ref, found):
                params.append(p)
                wheres.append(w)
        assert rng is not None
        if rng[0] != start:
            raise ConfigError(f"{source}: {where} takes layers {list(rng)} where layer {start} comes next: {why}")
        start = rng[1]
        sp = dict(sl.get("parameters") or {})
        _check_keys(sp, slice_keys, f"{source}: {where}.parameters: parameter", method)
        slice_params.append(sp)
        slice_where.append(f"{where}.parameters")
        ranges.append(rng)
    assert order is not None
    if len(set(order)) != len(order):
        raise ConfigError(f"{source}: slices[0].sources name a model twice ({order})")
    n = layer_count(base or order[0], source, "'slices' need")
    if start != n:
        raise ConfigError(f"{source}: slices cover layers 0-{start - 1} of the base's {n}: {why}")
    inputs = [Input(j, ref, params, wheres) for j, (ref, (params, wheres)) in enumerate(zip(order, per_ref))]
    return Inputs(base, inputs, slice_params, slice_where, ranges)


def layer_count(base: str, source: str, what: str = "gradient lists need", whose: str = "the base model's",
                folder: str = "base_model folder") -> int:
    """num_hidden_layers from a local model folder's config.json, or an error naming who needs it."""
    import json

    cfg = Path(base) / "config.json"
    try:
        n = json.loads(cfg.read_text()).get("num_hidden_layers")
    except (OSError, ValueError):
        n = None
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{source}: {what} {whose} layer count (num_hidden_layers in a local "
                          f"{folder}'s config.json; {cfg} has none)")
    return n


def _tensor_names(base: str, source: str) -> list[str]:
    from evomerge.pool import ModelRef, ModelSource

    if not Path(base).is_dir():
        raise ConfigError(f"{source}: 'filter:' values need a local base_model folder (its tensor names decide which "
                          f"filter each tensor takes); {base} is not one")
    return ModelSource("base", ModelRef.parse(base)).tensor_names


# --------------------------------------------------------------------------- genome
def genome_spec(inp: Inputs, source: str, scale: float, values: dict[str, dict[str, Any]],
                defaults: dict[str, float | None], labels: dict[str, str]) -> GenomeSpec:
    """The genome that gives every tensor mergekit's value of each setting.

    ``values``: ``{"weights" | "densities": {expert: per-slice chains, or a fixed float}}``;
    ``defaults``: the value where no setting applies (None: mergekit requires one);
    ``labels``: how errors name each expert's entry (``models[1] (path)``).
    """
    table = {what: {n: v if isinstance(v, list) else [[(float(v), "")]] * len(inp.slice_params) for n, v in per.items()}
             for what, per in values.items() if per}
    settings = [st for per in table.values() for chains in per.values() for chain in chains for st, _ in chain]
    filters: list[str] = []
    for st in settings:
        for f, _ in st.conds if isinstance(st, Filtered) else ():
            if f is not None and f not in filters:
                filters.append(f)
    layered = len(inp.slice_params) > 1 or any(_has_gradient(st) for st in settings)
    n_layers = 1
    if layered:
        n_layers = inp.ranges[-1][1] if inp.ranges else layer_count(str(inp.base), source)
    slots = _slots(inp, n_layers) if layered else [(0, 0.0)]

    def resolve(chain: list[tuple[Any, str]], name: str, t: float, what: str, expert: str) -> float:
        for st, _ in chain:
            v = evaluate(st, name, t)
            if v is not None:
                return v
        default = defaults[what]
        if default is None:
            which = f" for tensor '{name}'" if name else " for tensors no filter matches" if filters else ""
            raise ConfigError(f"{source}: {labels[expert]} has no '{what.removesuffix('s')}'{which} (mergekit requires one)")
        return default

    # each row takes its value from a tensor of the base that reads it (a row no tensor
    # reads, from its filter as a stand-in name: "" matches no filter); all must agree
    members: dict[int, list[str]] = {}
    if filters:
        names = _tensor_names(str(inp.base), source)
        filters = _most_specific_first(filters, names)
        probe = Genome(((0.0,),) * (len(slots) * (len(filters) + 1)), modules=layered, filters=tuple(filters))
        for name in names:
            members.setdefault(genome_group(name, probe, n_layers), []).append(name)
    width = len(filters) + 1
    rows: dict[str, dict[str, list[float]]] = {}
    for what, per in table.items():
        rows[what] = {}
        for n, chains in per.items():
            vals = []
            for g in range(len(slots) * width):
                s, t = slots[g // width]
                found = members.get(g) or [[*filters, ""][g % width]]
                want = resolve(chains[s], found[0], t, what, n)
                for name in found[1:]:
                    real = resolve(chains[s], name, t, what, n)
                    if real != want:
                        where = next((w for st, w in chains[s] if evaluate(st, name, t) is not None), "parameters")
                        raise ConfigError(
                            f"{source}: {where}: tensors '{found[0]}' and '{name}' take {want:g} and {real:g}, but "
                            f"evomerge's filter classes (each tensor takes the first of {filters} its name contains, "
                            "the most specific first) put them together: list overlapping filters in one order everywhere")
                vals.append(want)
            rows[what][n] = vals
    if layered and all(v[i * width:(i + 1) * width] == v[:width] for per in rows.values() for v in per.values()
                       for i in range(len(slots))):
        layered, rows = False, {what: {n: v[:width] for n, v in per.items()} for what, per in rows.items()}
    if not layered and not filters:
        rows = {what: {n: v[0] for n, v in per.items()} for what, per in rows.items()}
    return GenomeSpec(weights=rows["weights"], densities=rows.get("densities"), scale=scale, modules=layered,
                      filters=filters or None)


def _most_specific_first(filters: list[str], names: list[str]) -> list[str]:
    """Filters ordered so that one whose tensors are a strict subset of another's comes first
    (``o_proj`` before ``self_attn``); otherwise in the order the config first names them."""
    hits = {f: frozenset(n for n in names if f in n) for f in filters}
    left, out = list(filters), []
    while left:
        f = next(f for f in left if not any(hits[g] < hits[f] for g in left))
        out.append(f)
        left.remove(f)
    return out


def _slots(inp: Inputs, n_layers: int) -> list[tuple[int, float]]:
    """(slice, t) of each per-module group: embeddings and head at ``t = 0`` of the first and
    last slice, layer ``i`` at ``(i - start) / (n - 1)`` of its slice (1 for a one-layer slice)."""
    ranges = inp.ranges or [(0, n_layers)]

    def at(i: int) -> tuple[int, float]:
        s = next(k for k, (a, b) in enumerate(ranges) if a <= i < b)
        a, b = ranges[s]
        return s, (i - a) / (b - a - 1) if b - a > 1 else 1.0

    return [(0, 0.0)] + [at(i) for i in range(n_layers) for _ in (0, 1)] + [(len(ranges) - 1, 0.0)]


def leaves(chains: list[list[tuple[Any, str]]]) -> list[tuple[float, str]]:
    """Every number written in these settings, with its field (for range checks by name)."""
    out = []
    for chain in chains:
        for st, where in chain:
            for i, (_, v) in enumerate(st.conds if isinstance(st, Filtered) else [(None, st)]):
                w = f"{where}[{i}].value" if isinstance(st, Filtered) else where
                out += [(x, w) for x in (v if isinstance(v, tuple) else (v,))]
    return out
