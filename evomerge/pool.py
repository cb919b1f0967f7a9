"""Model pool I/O: resolve model references, enforce the loading policy, check that a
pool can be merged, and stream task vectors tensor by tensor.

A *pool* is one base model plus the experts fine-tuned from it. Every merge method
works on task vectors ``tau_i = expert_i - base``, so the pool must agree tensor by
tensor (names, shapes), share a vocabulary and a chat template, and come from the same
architecture class. :meth:`Pool.check_compatibility` stops at the first culprit.

Weights are read lazily through ``safetensors.safe_open`` (memory-mapped), so a pool of
large models is never fully resident; see :meth:`Pool.iter_task_vectors` for the memory
bound.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from evomerge.errors import CheckpointPolicyError, EvomergeError, PoolCompatibilityError


class UnreadableModelError(CheckpointPolicyError):
    """A model file is missing, truncated or corrupted (named with its model)."""


class NonFiniteWeightsError(CheckpointPolicyError):
    """A model tensor holds NaN or Inf values: every merge of it would too."""


class TokenizerUnavailableError(PoolCompatibilityError):
    """A model's tokenizer cannot be loaded (no tokenizer files, or its custom code is refused)."""

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files fetched from the hub: weights, configs, tokenizer files and chat templates.
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.txt"]
HUB_PICKLE_PATTERNS = ["*.bin"]


class LoadOptions(BaseModel):
    """How models are fetched and loaded. Safe defaults: no pickle, no remote code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_pickle: bool = False
    trust_remote_code: bool = False
    dtype: str = "float32"
    cache_dir: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A local folder or a hub id, optionally pinned as ``org/name@revision``."""

    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str | os.PathLike[str] | ModelRef) -> ModelRef:
        if isinstance(text, ModelRef):
            return text
        text = str(text)
        if Path(text).exists():
            return cls(text)
        if "@" in text:
            path, revision = text.rsplit("@", 1)
            return cls(path, revision or None)
        return cls(text)

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


def resolve_model_dir(ref: ModelRef | str, options: LoadOptions | None = None) -> Path:
    """Return a local folder for ``ref``: the folder itself, or a hub snapshot.

    Hub downloads go through ``huggingface_hub.snapshot_download``, which honours
    ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (offline: cache only).
    """
    ref = ModelRef.parse(ref)
    options = options or LoadOptions()
    local = Path(ref.path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointPolicyError(f"{ref}: expected a model folder, found a file")
    from huggingface_hub import snapshot_download

    patterns = HUB_ALLOW_PATTERNS + (HUB_PICKLE_PATTERNS if options.allow_pickle else [])
    try:
        folder = snapshot_download(
            repo_id=ref.path, revision=ref.revision, cache_dir=options.cache_dir, allow_patterns=patterns
        )
    except Exception as exc:  # the hub client raises many types; users need one message
        raise CheckpointPolicyError(
            f"{ref}: not a local folder and could not be fetched from the hub "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}"
        ) from exc
    return Path(folder)


def weight_files(model_dir: Path, allow_pickle: bool = False) -> tuple[str, list[Path]]:
    """Find the checkpoint files of a model folder and apply the safetensors-only policy.

    Returns ``("safetensors" | "pickle", files)``. Pickle checkpoints can run arbitrary
    code when loaded, so they are refused unless ``allow_pickle`` is set.
    """
    safetensors_files = sorted(model_dir.glob("*.safetensors"))
    if safetensors_files:
        return "safetensors", safetensors_files
    pickle_files = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickle_files:
        if not allow_pickle:
            raise CheckpointPolicyError(
                f"{model_dir}: only pickle weights found ({', '.join(p.name for p in pickle_files)}). "
                "Pickle files can execute code when loaded; convert them to safetensors, or, if you trust "
                "their source, pass --allow-pickle (evomerge merge, pool check; LoadOptions(allow_pickle=True) "
                "in Python). evomerge search reads safetensors only."
            )
        return "pickle", pickle_files
    raise CheckpointPolicyError(f"{model_dir}: no weights found (*.safetensors or *.bin)")


REMOTE_CODE_HINT = ("custom code is refused by default because it runs on load; if you trust it, pass "
                    "--trust-remote-code (merge, pool check) or LoadOptions(trust_remote_code=True)")


def _custom_code(folder: Path, filename: str) -> bool:
    try:
        return "auto_map" in json.loads((folder / filename).read_text())
    except (OSError, ValueError):
        return False


def load_config(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    """The model's config; a missing or broken ``config.json`` and refused custom code are
    named (file and model) instead of surfacing as a transformers traceback."""
    from transformers import AutoConfig

    options = options or LoadOptions()
    folder = resolve_model_dir(ref, options)
    path = folder / "config.json"
    if not path.is_file():
        raise UnreadableModelError(f"{ref}: no config.json in {folder} (a model folder needs one)")
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableModelError(f"{ref}: {path} is not valid JSON ({exc})") from None
    if _custom_code(folder, "config.json") and not options.trust_remote_code:
        raise CheckpointPolicyError(f"{ref}: config.json asks for custom model code (auto_map); {REMOTE_CODE_HINT}")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UnreadableModelError(f"{ref}: {path} cannot be loaded ({type(exc).__name__}: {exc})") from None


def load_tokenizer(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    """The model's tokenizer, or :class:`TokenizerUnavailableError` naming the model and why."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    folder = resolve_model_dir(ref, options)
    if _custom_code(folder, "tokenizer_config.json") and not options.trust_remote_code:
        raise TokenizerUnavailableError(f"{ref}: the tokenizer asks for custom code (auto_map); {REMOTE_CODE_HINT}")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, EvomergeError) as exc:
        raise TokenizerUnavailableError(
            f"{ref}: no usable tokenizer in {folder} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        ) from None


@contextlib.contextmanager
def reading(path: Path | str, model: str) -> Iterator[None]:
    """Turn a low-level read failure inside the block into an error naming file and model."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, EOFError, RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, EvomergeError):
            raise
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise UnreadableModelError(
            f"model '{model}': {path} cannot be read ({reason}); the file is truncated, corrupted or not a "
            "checkpoint: download or save it again"
        ) from None


def check_finite(tensor: torch.Tensor, name: str, model: str, path: Path | str) -> torch.Tensor:
    """Refuse a floating tensor holding NaN/Inf: task arithmetic would spread it and TIES
    would silently count it as zero."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise NonFiniteWeightsError(
            f"model '{model}': tensor '{name}' in {path} holds {n_nan} NaN and {n_inf} Inf value(s); "
            "refusing to merge non-finite weights"
        )
    return tensor


def load_model(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    """Load a causal LM with the safetensors-only policy and remote code off by default."""
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    model_dir = resolve_model_dir(ref, options)
    kind, _ = weight_files(model_dir, options.allow_pickle)
    load_config(str(model_dir), options)  # a missing config or refused custom code, by name
    with reading(model_dir, str(ref)):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=getattr(torch, options.dtype),
            use_safetensors=kind == "safetensors",
            trust_remote_code=options.trust_remote_code,
        )
    model.eval()
    return model


@dataclass
class ModelSource:
    """One pool member: where it lives, and lazy access to its config, tokenizer and tensors."""

    name: str
    ref: ModelRef
    options: LoadOptions = field(default_factory=LoadOptions)

    @cached_property
    def folder(self) -> Path:
        return resolve_model_dir(self.ref, self.options)

    @cached_property
    def config(self) -> Any:
        return load_config(str(self.folder), self.options)

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(str(self.folder), self.options)

    @cached_property
    def _weights(self) -> tuple[str, list[Path]]:
        return weight_files(self.folder, self.options.allow_pickle)

    @cached_property
    def _tensor_files(self) -> dict[str, Path]:
        """Tensor name -> file holding it (reads only headers for safetensors)."""
        kind, files = self._weights
        if kind == "safetensors":
            index = self.folder / SAFETENSORS_INDEX
            if index.exists():
                with reading(index, self.name):
                    weight_map = json.loads(index.read_text())["weight_map"]
                    mapping = {str(name): self.folder / str(fname) for name, fname in weight_map.items()}
                for path in sorted(set(mapping.values())):
                    if path.parent != self.folder or not path.is_file():
                        raise UnreadableModelError(f"model '{self.name}': {index} names {path.name}, "
                                                   f"which is not a file in {self.folder}")
                return mapping
            from safetensors import safe_open

            mapping = {}
            for path in files:
                with reading(path, self.name), safe_open(str(path), framework="pt") as handle:
                    mapping.update({name: path for name in handle.keys()})
            return mapping
        return {name: Path("<pickle>") for name in self._pickle_state}

    @cached_property
    def _pickle_state(self) -> dict[str, torch.Tensor]:
        # Only reached with allow_pickle=True; weights_only still blocks arbitrary objects.
        state: dict[str, torch.Tensor] = {}
        for path in self._weights[1]:
            with reading(path, self.name):
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        return state

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensor_files)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensor_spec(name)[0]

    def tensor_spec(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) from the file header, without reading the data."""
        kind, _ = self._weights
        if kind == "pickle":
            t = self._pickle_state[name]
            return tuple(t.shape), str(t.dtype).removeprefix("torch.")
        from safetensors import safe_open

        path = self._tensor_files[name]
        with reading(path, self.name), safe_open(str(path), framework="pt") as handle:
            sl = handle.get_slice(name)
            return tuple(sl.get_shape()), str(sl.get_dtype())

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors)."""
        try:
            path = self._tensor_files[name]
        except KeyError:
            raise PoolCompatibilityError(f"model '{self.name}' ({self.ref}) has no tensor '{name}'") from None
        if self._weights[0] == "pickle":
            return check_finite(self._pickle_state[name], name, self.name, path)
        from safetensors import safe_open

        with reading(path, self.name), safe_open(str(path), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return check_finite(tensor, name, self.name, path)


def _is_float(dtype: str) -> bool:
    return dtype.upper().startswith(("F", "BF")) or dtype.startswith(("float", "bfloat"))


def _architecture(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(config).__name__


@dataclass
class Pool:
    """A base model plus experts fine-tuned from it."""

    base: ModelSource
    experts: list[ModelSource]

    @classmethod
    def from_refs(
        cls,
        base: str | ModelRef,
        experts: Sequence[str | ModelRef] | dict[str, str | ModelRef],
        options: LoadOptions | None = None,
    ) -> Pool:
        options = options or LoadOptions()
        named = experts.items() if isinstance(experts, dict) else ((str(r), r) for r in experts)
        return cls(
            base=ModelSource("base", ModelRef.parse(base), options),
            experts=[ModelSource(name, ModelRef.parse(ref), options) for name, ref in named],
        )

    @property
    def members(self) -> list[ModelSource]:
        return [self.base, *self.experts]

    @property
    def expert_names(self) -> list[str]:
        return [expert.name for expert in self.experts]

    def check_compatibility(self) -> None:
        """Raise :class:`PoolCompatibilityError` naming the first model/tensor/field that differs.

        Order: architecture class, tensor names (missing, extra), tensor shapes,
        vocabulary, chat template. The base may lack a chat template (hub base models
        usually do); every member that has one must share it.
        """
        if not self.experts:
            raise PoolCompatibilityError("the pool has no experts: a merge needs at least one")
        ref = self.base
        ref_arch = _architecture(ref.config)
        for other in self.experts:
            arch = _architecture(other.config)
            if arch != ref_arch:
                raise PoolCompatibilityError(
                    f"architecture mismatch: '{other.name}' is {arch} but '{ref.name}' is {ref_arch}"
                )
        ref_names = ref.tensor_names
        ref_set = set(ref_names)
        for other in self.experts:
            other_set = set(other.tensor_names)
            missing = [n for n in ref_names if n not in other_set]
            if missing:
                raise PoolCompatibilityError(
                    f"missing tensor: '{other.name}' has no tensor '{missing[0]}' "
                    f"that '{ref.name}' has ({len(missing)} missing in all)"
                )
            extra = sorted(other_set - ref_set)
            if extra:
                raise PoolCompatibilityError(
                    f"extra tensor: '{other.name}' has tensor '{extra[0]}' "
                    f"that '{ref.name}' lacks ({len(extra)} extra in all)"
                )
        for name in ref_names:
            shape, dtype = ref.tensor_spec(name)
            for other in self.experts:
                other_shape, other_dtype = other.tensor_spec(name)
                if other_shape != shape:
                    raise PoolCompatibilityError(
                        f"shape mismatch in tensor '{name}': '{other.name}' has {list(other_shape)}, "
                        f"'{ref.name}' has {list(shape)}"
                    )
                if _is_float(other_dtype) != _is_float(dtype):
                    raise PoolCompatibilityError(
                        f"dtype mismatch in tensor '{name}': '{other.name}' stores {other_dtype}, "
                        f"'{ref.name}' stores {dtype} (floating and integer tensors cannot be merged)"
                    )
        ref_vocab = ref.tokenizer.get_vocab()
        for other in self.experts:
            vocab = other.tokenizer.get_vocab()
            if vocab != ref_vocab:
                diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])
                example = f" (first difference: token {diff[0][0]!r} id {diff[0][1]})" if diff else ""
                raise PoolCompatibilityError(
                    f"vocabulary mismatch: '{other.name}' has {len(vocab)} tokens, "
                    f"'{ref.name}' has {len(ref_vocab)}{example}"
                )
        with_template = [m for m in self.members if getattr(m.tokenizer, "chat_template", None)]
        if with_template:
            first = with_template[0]
            for other in with_template[1:]:
                if other.tokenizer.chat_template != first.tokenizer.chat_template:
                    raise PoolCompatibilityError(
                        f"chat template mismatch: '{other.name}' and '{first.name}' use different "
                        "chat templates; the merged model can only keep one"
                    )
            for other in self.experts:
                if not getattr(other.tokenizer, "chat_template", None):
                    raise PoolCompatibilityError(
                        f"chat template mismatch: expert '{other.name}' has no chat template "
                        f"but '{first.name}' has one"
                    )

    def check_weights(self) -> None:
        """Read every tensor of every member once: unreadable data and NaN/Inf are named
        (``pool check`` runs this; merges and searches meet the same checks as they read)."""
        for member in self.members:
            for name in member.tensor_names:
                member.get_tensor(name)

    def iter_task_vectors(
        self, names: Sequence[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """Yield ``(tensor_name, base_fp32, [tau_1, ..., tau_T])`` one tensor at a time.

        Task vectors are ``expert - base`` computed in float32 whatever the storage
        dtype. Peak extra memory is one tensor's worth per model:

            bytes ~= 4 * (T + 1) * max_tensor_numel      (T = number of experts)

        plus whatever the caller keeps; the checkpoints themselves are memory-mapped.
        """
        for name in names if names is not None else self.base.tensor_names:
            base = self.base.get_tensor(name).to(torch.float32)
            taus = [expert.get_tensor(name).to(torch.float32) - base for expert in self.experts]
            yield name, base, taus
