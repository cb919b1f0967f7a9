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

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from evomerge.errors import CheckpointPolicyError, PoolCompatibilityError

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
                "Pickle files can execute code when loaded; convert them to safetensors, or pass "
                "allow_pickle=True (CLI: --allow-pickle) if you trust their source."
            )
        return "pickle", pickle_files
    raise CheckpointPolicyError(f"{model_dir}: no weights found (*.safetensors or *.bin)")


def load_config(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    from transformers import AutoConfig

    options = options or LoadOptions()
    return AutoConfig.from_pretrained(resolve_model_dir(ref, options), trust_remote_code=options.trust_remote_code)


def load_tokenizer(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    return AutoTokenizer.from_pretrained(resolve_model_dir(ref, options), trust_remote_code=options.trust_remote_code)


def load_model(ref: ModelRef | str, options: LoadOptions | None = None) -> Any:
    """Load a causal LM with the safetensors-only policy and remote code off by default."""
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    model_dir = resolve_model_dir(ref, options)
    kind, _ = weight_files(model_dir, options.allow_pickle)
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
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.folder / fname for name, fname in weight_map.items()}
            from safetensors import safe_open

            mapping: dict[str, Path] = {}
            for path in files:
                with safe_open(str(path), framework="pt") as handle:
                    mapping.update({name: path for name in handle.keys()})
            return mapping
        return {name: Path("<pickle>") for name in self._pickle_state}

    @cached_property
    def _pickle_state(self) -> dict[str, torch.Tensor]:
        # Only reached with allow_pickle=True; weights_only still blocks arbitrary objects.
        state: dict[str, torch.Tensor] = {}
        for path in self._weights[1]:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
        return state

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensor_files)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        kind, _ = self._weights
        if kind == "pickle":
            return tuple(self._pickle_state[name].shape)
        from safetensors import safe_open

        with safe_open(str(self._tensor_files[name]), framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped for safetensors)."""
        try:
            path = self._tensor_files[name]
        except KeyError:
            raise PoolCompatibilityError(f"model '{self.name}' ({self.ref}) has no tensor '{name}'") from None
        if self._weights[0] == "pickle":
            return self._pickle_state[name]
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)


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
            shape = ref.tensor_shape(name)
            for other in self.experts:
                other_shape = other.tensor_shape(name)
                if other_shape != shape:
                    raise PoolCompatibilityError(
                        f"shape mismatch in tensor '{name}': '{other.name}' has {list(other_shape)}, "
                        f"'{ref.name}' has {list(shape)}"
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
