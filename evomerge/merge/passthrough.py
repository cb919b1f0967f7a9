"""mergekit's ``passthrough``: a new model assembled from layer ranges of one or more models
(frankenmerges that stack, drop or reorder layers), each tensor optionally multiplied by
``scale``, with mergekit 0.1.5's semantics.

It changes the layer count, so it is no method of the prepare / build engine (a build
writes into a live model of the base's shape, a search moves coefficients): a mergekit
config with ``merge_method: passthrough`` is read by ``load_recipe`` into a
:class:`PassthroughPlan`, which ``write_merged_model`` writes (``evomerge merge``) and
``explain_merge`` describes; ``evomerge search`` refuses it.

As mergekit's planner does:

* ``models: [one model]`` is one slice over all its layers; ``slices:`` take exactly one
  source each (passthrough copies, it merges nothing);
* the layers of each slice are appended in order: input layer ``start + i`` becomes the
  next output layer, its tensor names renumbered (``model.layers.{n}.``);
* the embeddings (tensors outside the layers whose name contains ``embed``) come from the
  first slice's model, the other tensors outside the layers (final norm, ``lm_head``) from
  the last slice's model;
* ``scale`` is resolved per tensor like any per-model parameter: the source's, then the
  slice's, then the top-level ``parameters``; ``filter:`` values match the *input* tensor
  name (mergekit resolves per-input parameters under the input's name), gradients run
  over the layers of the slice (``t = i / (n - 1)``, 1 for a one-layer slice), the
  embeddings and head read ``t = 0``; no value leaves the tensor unchanged;
* arithmetic in mergekit's ``dtype`` (the inputs cast to it; without one, each tensor's
  own dtype), then the cast to ``out_dtype`` (default ``dtype``);
* ``config.json`` is the ``base_model``'s (else the first model named) with
  ``num_hidden_layers`` set to the total; the tokenizer files come from that model too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.errors import ConfigError, EvomergeError
from evomerge.io_utils import atomic_directory, check_replaceable, copy_support_files
from evomerge.merge.cache import POST, PRE, layer_of
from evomerge.merge.mergekit_compat import _DTYPES, _common_checks
from evomerge.merge.mergekit_settings import check_slice, evaluate, layer_count, model_ref, parse_setting
from evomerge.pool import LoadOptions, ModelRef, ModelSource

log = logging.getLogger(__name__)
__all__ = ["PassthroughPlan", "explain_passthrough", "is_passthrough", "read_passthrough", "write_passthrough"]

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_WHY_ONE = "mergekit's passthrough takes exactly one model per slice: it copies layers, it merges nothing"


@dataclass(frozen=True)
class PassSlice:
    """One output slice: layers ``[start, end)`` of ``model``, and the scopes of its ``scale``."""

    model: str
    start: int
    end: int
    chain: tuple[tuple[Any, str], ...]  # (parsed setting, field), most specific first
    where: str  # how errors and --explain name it: ``slices[1]`` or ``models[0]``


@dataclass(frozen=True)
class PassthroughPlan:
    """A mergekit passthrough config, checked and resolved (``read_passthrough``)."""

    source: str
    slices: tuple[PassSlice, ...]
    config_model: str  # config.json and tokenizer come from it
    compute_dtype: str | None  # mergekit's dtype: inputs cast to it (None: each tensor's own)
    dtype: str | None  # output dtype (out_dtype, default dtype; None: as computed)
    config: dict[str, Any]  # the mergekit config itself, written back as mergekit_config.yml
    method: str = "passthrough"

    @property
    def num_layers(self) -> int:
        return sum(s.end - s.start for s in self.slices)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys([s.model for s in self.slices]))


@dataclass(frozen=True)
class PassTensor:
    out: str  # output tensor name (layers renumbered)
    model: str
    name: str  # tensor name in ``model``
    scale: float | None
    where: str  # "slices[1] layer 3" / "embeddings" / "head"


def is_passthrough(data: Any) -> bool:
    return isinstance(data, dict) and data.get("merge_method") == "passthrough"


def _scale_scope(params: Any, where: str, source: str) -> list[tuple[Any, str]]:
    if params is None:
        return []
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: {where} must be a mapping (passthrough takes only 'scale')")
    bad = sorted(set(params) - {"scale"})
    if bad:
        raise ConfigError(f"{source}: {where}.{bad[0]} is not supported for 'passthrough' (it takes only scale: "
                          "nothing is merged)")
    return [(parse_setting(params["scale"], f"{source}: {where}.scale"), f"{where}.scale")] if "scale" in params else []


def _num_layers(ref: str, source: str, where: str) -> int:
    return layer_count(ref, f"{source}: {where}", "passthrough needs", "the model's", "model folder")


def read_passthrough(data: dict[str, Any], source: str = "mergekit config") -> PassthroughPlan:
    """Check a ``merge_method: passthrough`` config and resolve its slices (no tensor is read)."""
    _common_checks(data, source)
    top = _scale_scope(data.get("parameters"), "parameters", source)
    base = None if data.get("base_model") is None else model_ref(data["base_model"])
    slices: list[PassSlice] = []
    if "slices" in data:
        if data.get("models"):
            raise ConfigError(f"{source}: give either 'models' or 'slices', not both")
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{source}: 'slices' must be a non-empty list")
        for s, sl in enumerate(raw):
            where = f"slices[{s}]"
            check_slice(sl, where, source)
            if len(sl["sources"]) != 1:
                raise ConfigError(f"{source}: {where}.sources names {len(sl['sources'])} models: {_WHY_ONE}")
            if sl.get("base_model") is not None:
                log.warning("%s: %s.base_model has no effect on passthrough (mergekit ignores the base there)", source, where)
            src, sw = sl["sources"][0], f"{where}.sources[0]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ConfigError(f"{source}: {sw} needs 'model' and 'layer_range'")
            bad = sorted(set(src) - {"model", "layer_range", "parameters"})
            if bad:
                raise ConfigError(f"{source}: {sw}.{bad[0]} is not supported")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                    and 0 <= lr[0] < lr[1]):
                raise ConfigError(f"{source}: {sw}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
            ref = model_ref(src["model"])
            n = _num_layers(ref, source, sw)
            if lr[1] > n:
                raise ConfigError(f"{source}: {sw}.layer_range {lr} ends past the {n} layers of {ref}")
            chain = _scale_scope(src.get("parameters"), f"{sw}.parameters", source) + \
                _scale_scope(sl.get("parameters"), f"{where}.parameters", source) + top
            slices.append(PassSlice(ref, lr[0], lr[1], tuple(chain), where))
    else:
        models = data.get("models")
        if not isinstance(models, list) or len(models) != 1:
            count = len(models) if isinstance(models, list) else 0
            raise ConfigError(f"{source}: merge_method 'passthrough' with 'models' takes exactly one model (got {count}); "
                              f"{_WHY_ONE} (use 'slices' to stack layers)")
        entry = models[0] if isinstance(models[0], dict) else {"model": models[0]}
        if "model" not in entry:
            raise ConfigError(f"{source}: models[0] needs a 'model' field")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{source}: models[0].{extra[0]} is not supported")
        ref = model_ref(entry["model"])
        if base is not None and base != ref:
            raise ConfigError(f"{source}: base_model {base} is not models[0] ({ref}): mergekit would add it as a second "
                              f"input, and {_WHY_ONE}")
        chain = _scale_scope(entry.get("parameters"), "models[0].parameters", source) + top
        slices.append(PassSlice(ref, 0, _num_layers(ref, source, "models[0]"), tuple(chain), "models[0]"))
    compute = _DTYPES.get(data["dtype"]) if data.get("dtype") else None
    out = data.get("out_dtype") or data.get("dtype")
    return PassthroughPlan(source, tuple(slices), base or slices[0].model, compute, _DTYPES[out] if out else None, data)


def _scale(chain: tuple[tuple[Any, str], ...], name: str, t: float) -> float | None:
    for setting, _ in chain:
        value = evaluate(setting, name, t)
        if value is not None:
            return value
    return None


def plan_tensors(plan: PassthroughPlan, load_options: LoadOptions | None = None) -> tuple[list[PassTensor], dict[str, ModelSource]]:
    """Every output tensor: its source model and name, and its scale; shapes checked
    against the config model's (layer 0 for layer tensors)."""
    refs = list(dict.fromkeys([plan.config_model, *plan.models]))
    sources = {r: ModelSource(f"passthrough input {r}", ModelRef.parse(r), load_options or LoadOptions()) for r in refs}
    layers: dict[str, dict[int, list[str]]] = {}
    outside: dict[str, list[str]] = {}
    for r, src in sources.items():
        per: dict[int, list[str]] = {}
        for name in src.tensor_names:
            m = _LAYER.search(name)
            if m:
                per.setdefault(int(m.group(1)), []).append(name)
            else:
                outside.setdefault(r, []).append(name)
        layers[r] = per
    ref_layer = layers[plan.config_model].get(0)
    if not ref_layer:
        raise ConfigError(f"{plan.source}: passthrough needs decoder layers named '<prefix>.layers.<n>.<tensor>' "
                          f"(Llama-style); {plan.config_model} has none")
    cfg_src = sources[plan.config_model]

    def suffix(name: str) -> str:
        return _LAYER.sub(".layers.{}.", name, count=1)

    ref_shapes = {suffix(n): cfg_src.tensor_shape(n) for n in ref_layer}
    out: list[PassTensor] = []
    first, last = plan.slices[0], plan.slices[-1]
    for name in outside.get(first.model, []):
        if layer_of(name) == PRE:
            out.append(PassTensor(name, first.model, name, _scale(first.chain, name, 0.0), "embeddings"))
    j = 0
    for sl in plan.slices:
        n = sl.end - sl.start
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            names = layers[sl.model].get(sl.start + i, [])
            found = {suffix(x): x for x in names}
            if set(found) != set(ref_shapes):
                odd = sorted(set(found) ^ set(ref_shapes))
                raise ConfigError(f"{plan.source}: {sl.where}: layer {sl.start + i} of {sl.model} does not have the "
                                  f"tensors of {plan.config_model}'s layers (e.g. {odd[0].format('N')})")
            for key, name in found.items():
                shape = sources[sl.model].tensor_shape(name)
                if shape != ref_shapes[key]:
                    raise ConfigError(f"{plan.source}: {sl.where}: {sl.model}'s '{name}' has shape {list(shape)}, "
                                      f"{plan.config_model}'s layers {list(ref_shapes[key])}: stacked layers must "
                                      "share the architecture")
                out.append(PassTensor(key.format(j), sl.model, name, _scale(sl.chain, name, t), f"{sl.where} layer {sl.start + i}"))
            j += 1
    for name in outside.get(last.model, []):
        if layer_of(name) == POST:
            out.append(PassTensor(name, last.model, name, _scale(last.chain, name, 0.0), "head"))
    cfg_names = set(cfg_src.tensor_names)
    for p in out:
        if p.where in ("embeddings", "head") and p.name in cfg_names:
            want, got = cfg_src.tensor_shape(p.name), sources[p.model].tensor_shape(p.name)
            if want != got:
                raise ConfigError(f"{plan.source}: {p.model}'s '{p.name}' has shape {list(got)}, {plan.config_model}'s "
                                  f"{list(want)} (config.json comes from {plan.config_model})")
    return out, sources


def _compute(tensor: torch.Tensor, scale: float | None, compute: str | None, dtype: str | None) -> torch.Tensor:
    """mergekit's passthrough on one tensor: cast to ``dtype``, multiply, cast to ``out_dtype``."""
    if not tensor.is_floating_point():
        return tensor  # token-index buffers and the like: copied unchanged
    x = tensor.to(getattr(torch, compute)) if compute else tensor
    if scale is not None:
        x = x * scale
    return x.to(getattr(torch, dtype)) if dtype else x


def _card(plan: PassthroughPlan, tensors: list[PassTensor], mk_yaml: str) -> str:
    front = {"base_model": plan.models, "base_model_relation": "merge", "library_name": "transformers",
             "tags": ["merge", "evomerge", "passthrough"]}
    rows, j = [], 0
    for sl in plan.slices:
        n = sl.end - sl.start
        rows.append(f"| {sl.where} | `{sl.model}` | {sl.start}-{sl.end - 1} | {j}-{j + n - 1} |")
        j += n
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# Passthrough of {len(plan.models)} model(s): {plan.num_layers} layers",
        "", "Made with evomerge (mergekit's `passthrough`: layers copied, not merged). "
        f"config.json and tokenizer from `{plan.config_model}`.", "",
        "| slice | model | input layers | output layers |", "|---|---|---|---|", *rows, "",
        f"{sum(p.scale is not None and p.scale != 1 for p in tensors)} of {len(tensors)} tensors scaled.", "",
        "## Reproduce with mergekit", "", "```yaml", mk_yaml.strip(), "```", ""])


def write_passthrough(plan: PassthroughPlan, out_dir: str | os.PathLike[str], overwrite: bool = False,
                      load_options: LoadOptions | None = None) -> Path:
    """Write the passthrough model folder atomically (a temporary sibling renamed at the end)."""
    out_dir = Path(out_dir)
    tensors, sources = plan_tensors(plan, load_options)
    inputs = [s.folder for s in sources.values()]
    check_replaceable(out_dir, inputs)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    state = {}
    for p in tensors:
        x = _compute(sources[p.model].get_tensor(p.name), p.scale, plan.compute_dtype, plan.dtype)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise EvomergeError(f"passthrough: tensor '{p.out}' ({p.where}) is not finite at scale {p.scale}"
                                + (f" in {plan.dtype}" if plan.dtype else "") + "; nothing was written")
        state[p.out] = x.contiguous()
    mk_yaml = "# Reproduce with: mergekit-yaml mergekit_config.yml OUTPUT_DIR\n" + yaml.safe_dump(plan.config, sort_keys=False)
    from safetensors.torch import save_file

    cfg_folder = sources[plan.config_model].folder
    with atomic_directory(out_dir, overwrite=overwrite, protected=inputs) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((cfg_folder / "config.json").read_text())
        config["num_hidden_layers"] = plan.num_layers
        if plan.dtype or plan.compute_dtype:
            config["torch_dtype"] = plan.dtype or plan.compute_dtype
            if "dtype" in config:
                config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_support_files(cfg_folder, tmp)
        (tmp / "mergekit_config.yml").write_text(mk_yaml)
        (tmp / "README.md").write_text(_card(plan, tensors, mk_yaml))
    log.info("wrote %s (passthrough, %d layers, %d tensors)", out_dir, plan.num_layers, len(state))
    return out_dir


def _scales(items: list[PassTensor]) -> str:
    counts = Counter(p.scale for p in items)
    if set(counts) == {None}:
        return "unscaled"
    parts = [f"scale {v:g} on {c}" if v is not None else f"unscaled {c}" for v, c in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
    return ", ".join(parts)


def explain_passthrough(plan: PassthroughPlan, load_options: LoadOptions | None = None) -> str:
    """What ``write_passthrough`` would write, slice by slice (reads only headers and configs)."""
    tensors, sources = plan_tensors(plan, load_options)
    dtypes = sorted({sources[p.model].tensor_spec(p.name)[1] for p in tensors})
    lines = [
        "method: passthrough (layers copied, not merged)",
        f"config.json and tokenizer: {plan.config_model}; num_hidden_layers: {plan.num_layers}",
        f"inputs: {'/'.join(dtypes)}; " + (f"cast to {plan.compute_dtype}, " if plan.compute_dtype else "")
        + "output dtype: " + (plan.dtype or "as read"),
    ]
    pre = [p for p in tensors if p.where == "embeddings"]
    post = [p for p in tensors if p.where == "head"]
    lines.append(f"embeddings ({len(pre)} tensors) from {plan.slices[0].model}: {_scales(pre)}")
    j = 0
    for sl in plan.slices:
        n = sl.end - sl.start
        items = [p for p in tensors if p.where.startswith(f"{sl.where} layer ")]
        lines.append(f"{sl.where}: layers {sl.start}-{sl.end - 1} of {sl.model} -> output layers {j}-{j + n - 1} "
                     f"({len(items)} tensors): {_scales(items)}")
        scaled = sorted({p.name for p in items if p.scale is not None and p.scale != 1})
        if scaled:
            lines.append(f"  scaled: {', '.join(scaled[:4])}" + (f" and {len(scaled) - 4} more" if len(scaled) > 4 else ""))
        j += n
    lines.append(f"final norm/lm_head ({len(post)} tensors) from {plan.slices[-1].model}: {_scales(post)}")
    lines.append("nothing was written (--explain)")
    return "\n".join(lines)
