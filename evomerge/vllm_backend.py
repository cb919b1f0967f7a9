"""vLLM backends: generation, answer-only CE from prompt logprobs, in-place weight swaps.

Imported lazily (``make_generator("vllm", ...)``, ``fitness.backend: vllm``): importing
evomerge never needs vllm. Why vLLM at all: generation-heavy work (datagen, judged
evaluation) and long scoring sets run faster in its paged-attention engine, and a merge
candidate can be swapped into the running engine without writing a model to disk.

Three things hold the backends to the transformers path's semantics:

* chats are rendered by the model's own chat template (:func:`evomerge.generation.render_chats`)
  and tokenised here with ``add_special_tokens=False``; vLLM receives token ids, never
  text, so it cannot add a second BOS;
* CE is read from vLLM's prompt logprobs, which are raw model logprobs (taken before any
  sampling transform), over exactly ``ids[answer_start:answer_end]``;
* prefix caching is off: a KV block cached under one candidate's weights must never be
  reused for the next candidate.

vLLM starts its engine core in a ``spawn`` subprocess, so code that creates an engine
must run under ``if __name__ == "__main__":`` (or in a function called from there).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from evomerge.errors import ConfigError, EvomergeError
from evomerge.generation import Chat, GenerationParams, register_generator, render_chats
from evomerge.search.fitness import EncodedSample

try:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
except ImportError as exc:  # re-raised with the fix named: callers catch ImportError
    raise ImportError(
        f"evomerge.vllm_backend needs vllm ({exc}); on a CPU machine build its environment with "
        "scripts/make_vllm_env.sh"
    ) from exc

EXTENSION = "evomerge.vllm_backend.WeightSwapExtension"
CPU_HEAD_MULTIPLE = 16  # vLLM's CPU attention kernels: head sizes divisible by 16 (vec16) or 32


class VLLMBackendError(EvomergeError):
    """vLLM returned something the scorer or the weight swap cannot use."""


class WeightSwapExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); runs inside the worker.

    Why ``reload_weights`` and not ``model.load_weights``: on CPU the backend prepacks
    linear weights for oneDNN after loading and drops the original parameters, so a plain
    ``load_weights`` after start-up fails; ``reload_weights`` loads and then redoes that
    post-load processing (and is the same entry point in the GPU model runner).
    """

    model_runner: Any  # provided by the worker this class is mixed into

    def evomerge_load_safetensors(self, payload: bytes) -> int:
        """Load checkpoint-named tensors (a safetensors blob) into the running model; returns how many.

        Why bytes: ``collective_rpc`` arguments cross process boundaries through vLLM's
        msgpack codec, which turns tensors nested in a dict into plain lists; a safetensors
        blob round-trips exactly (dtype, shape, bits) without pickle.
        """
        state = safetensors_load(payload)
        padding = HeadPadding.from_hf_config(self.model_runner.model_config.hf_config)
        if padding is not None:
            state = padding.convert(state)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)


PADDING_KEY = "evomerge_source_head_dim"


class HeadPadding:
    """Run a model whose attention head size vLLM's CPU kernels lack (the tiny zoo's 24)
    as an exactly equivalent model with a supported head size.

    Why exact: each head's 24 dims are placed in a 32-wide head with zeros in the extra
    dims, keeping rotate-half pairs together (dims ``i`` and ``i + h/2`` go to ``i`` and
    ``i + H/2``); the RoPE base becomes ``theta ** (H / h)`` so those dims keep their
    frequencies ``theta ** (-2i / h)``; queries are scaled by ``sqrt(H / h)`` so vLLM's
    ``1 / sqrt(H)`` softmax scale acts as ``1 / sqrt(h)``. The zero dims add nothing to
    q.k and nothing to the output (their ``o_proj`` columns are zero). Callers keep
    sending checkpoint-shaped tensors; the worker converts them (:meth:`convert`).
    """

    def __init__(self, source: int, target: int, n_heads: int, n_kv_heads: int) -> None:
        self.source, self.target, self.n_heads, self.n_kv_heads = source, target, n_heads, n_kv_heads
        half, pad = source // 2, (target - source) // 2
        self.index = torch.tensor([i if i < half else i + pad for i in range(source)])

    @staticmethod
    def head_dim(config: Any) -> int:
        return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    @classmethod
    def needed(cls, config: Any, multiple: int) -> HeadPadding | None:
        """The padding for ``config`` when its head size is not a multiple of ``multiple``;
        refuses (by name) models where padding would not be exact."""
        h = cls.head_dim(config)
        if h % multiple == 0:
            return None
        rope = dict(getattr(config, "rope_parameters", None) or {})
        problems = []
        if getattr(config, "model_type", "") != "llama":
            problems.append(f"model_type {getattr(config, 'model_type', None)!r} (only llama is handled)")
        if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"rope_parameters {rope} (only plain full RoPE is handled)")
        if h % 2:
            problems.append("an odd head size")
        if problems:
            raise ConfigError(f"vllm: head size {h} is not a multiple of {multiple}, which this platform's "
                              f"attention kernels need, and it cannot be padded exactly: {'; '.join(problems)}")
        target = -(-h // multiple) * multiple
        return cls(h, target, int(config.num_attention_heads),
                   int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))

    @classmethod
    def from_hf_config(cls, config: Any) -> HeadPadding | None:
        source = getattr(config, PADDING_KEY, None)
        if source is None:
            return None
        return cls(int(source), cls.head_dim(config), int(config.num_attention_heads),
                   int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))

    def overrides(self, config: Any) -> dict[str, Any]:
        """``hf_overrides`` that make vLLM build the padded model."""
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        rope["rope_theta"] = theta ** (self.target / self.source)
        rope.setdefault("rope_type", "default")
        return {"head_dim": self.target, "rope_parameters": rope, PADDING_KEY: self.source}

    def _rows(self, w: torch.Tensor, heads: int, scale: float = 1.0) -> torch.Tensor:
        out = w.new_zeros(heads, self.target, w.shape[1])
        out[:, self.index] = w.view(heads, self.source, w.shape[1]) * scale
        return out.view(heads * self.target, w.shape[1])

    def convert(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint-shaped tensors -> the padded model's tensors (others unchanged)."""
        out: dict[str, torch.Tensor] = {}
        scale = (self.target / self.source) ** 0.5
        for name, w in state.items():
            if name.endswith("self_attn.q_proj.weight"):
                out[name] = self._rows(w, self.n_heads, scale)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
                out[name] = self._rows(w, self.n_kv_heads)
            elif name.endswith("self_attn.o_proj.weight"):
                cols = w.new_zeros(w.shape[0], self.n_heads, self.target)
                cols[:, :, self.index] = w.view(w.shape[0], self.n_heads, self.source)
                out[name] = cols.view(w.shape[0], self.n_heads * self.target)
            else:
                out[name] = w
        return out


def engine(
    model: str | os.PathLike[str],
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int | None = None,
    load_options: Any = None,
    **kwargs: Any,
) -> LLM:
    """A vLLM engine with the weight-swap extension and settings that suit scoring.

    Defaults (each overridable through ``kwargs``): eager mode (no graph capture: start-up
    matters more than decode speed for short answers), no prefix caching (weights change
    under the cache), and, on CPU, a 1 GiB KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` is set.
    """
    from evomerge.pool import resolve_model_dir

    path = resolve_model_dir(str(model), load_options)  # hub ids (org/name@rev) become a local snapshot
    if not (path / "config.json").exists():
        raise ConfigError(f"vllm engine: {model} is not a model folder (no config.json in {path})")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    options: dict[str, Any] = {
        "dtype": dtype,
        "seed": seed,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "worker_extension_cls": EXTENSION,
    }
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    options.update(kwargs)
    padding = _cpu_head_padding(path)
    if padding is None:
        return LLM(model=str(path), tokenizer=str(path), **options)
    # padded shapes differ from the checkpoint: start from dummy weights, then push the
    # checkpoint through the converting weight swap
    from transformers import AutoConfig

    options["hf_overrides"] = {**options.get("hf_overrides", {}), **padding.overrides(AutoConfig.from_pretrained(path))}
    llm = LLM(model=str(path), tokenizer=str(path), load_format="dummy", **options)
    load_state_dict(llm, _checkpoint_state(path))
    return llm


def _cpu_head_padding(path: Path) -> HeadPadding | None:
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    return HeadPadding.needed(AutoConfig.from_pretrained(path), CPU_HEAD_MULTIPLE)


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"vllm: {path} has no .safetensors files to load the padded model from")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def shutdown(llm: LLM) -> None:
    """Stop the engine's subprocesses now (its KV cache is gigabytes on a GPU) rather than
    whenever the garbage collector gets to it."""
    llm.llm_engine.engine_core.shutdown()


def load_state_dict(llm: LLM, state: Mapping[str, torch.Tensor]) -> None:
    """Swap checkpoint-named weights into the running engine in place (no disk, no restart)."""
    payload = safetensors_save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    loaded = llm.collective_rpc("evomerge_load_safetensors", args=(payload,))
    if not loaded or any(n != len(state) for n in loaded):
        raise VLLMBackendError(f"weight swap: workers report {loaded} tensors loaded, expected {len(state)}")


def sampling_params(params: GenerationParams, offset: int = 0) -> SamplingParams:
    """``GenerationParams`` as vLLM ``SamplingParams``; temperature 0 is greedy.

    Each request gets its own seed (``params.seed + offset``): sampled requests are
    reproducible call to call without every prompt drawing the same random stream.
    """
    if params.greedy:
        return SamplingParams(temperature=0.0, max_tokens=params.max_new_tokens, detokenize=False)
    return SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=0,
                          max_tokens=params.max_new_tokens, seed=params.seed + offset, detokenize=False)


def _token_prompts(ids: Iterable[Sequence[int]]) -> list[TokensPrompt]:
    return [TokensPrompt(prompt_token_ids=[int(i) for i in row]) for row in ids]


@register_generator("vllm")
class VLLMGenerator:
    """``chat``/``complete`` on a vLLM engine, with the transformers generator's semantics.

    ``model`` is a model folder (an engine is started) or a running ``LLM`` (shared, for
    example with a scorer whose weights are swapped). Output text is decoded by the HF
    tokenizer with ``skip_special_tokens=True``, exactly as the transformers backend does.
    """

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any = None, device: str | None = None, dtype: str | None = None,
                 load_options: Any = None, **engine_kwargs: Any) -> None:
        """Same arguments as the transformers backend, plus vLLM engine arguments.

        ``device`` is checked, not chosen: vLLM runs on the device its build targets, so a
        request for another one is refused rather than silently ignored.
        """
        from vllm.platforms import current_platform

        from evomerge.pool import LoadOptions, load_tokenizer

        if device is not None and torch.device(device).type != current_platform.device_type:
            raise ConfigError(f"vllm generator: device '{device}' requested, but this vLLM build runs on "
                              f"'{current_platform.device_type}'")
        options = load_options or LoadOptions(**({"dtype": dtype} if dtype else {}))
        if isinstance(model, LLM):
            self.llm = model
            if tokenizer is None:
                raise ConfigError("vllm generator: a running engine needs the model's HF tokenizer")
        elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            self.llm = engine(model, dtype=dtype or options.dtype, load_options=options, **engine_kwargs)
            tokenizer = tokenizer or load_tokenizer(str(model), options)
        else:
            raise ConfigError(f"vllm generator: needs a model folder or a running vllm.LLM, got {type(model).__name__} "
                              "(a loaded transformers model can only use the transformers backend)")
        self.tokenizer = tokenizer

    def close(self) -> None:
        shutdown(self.llm)

    def chat(self, chats: Sequence[Chat], params: GenerationParams) -> list[str]:
        return self.complete(render_chats(self.tokenizer, chats), params)

    def complete(self, prompts: Sequence[str], params: GenerationParams) -> list[str]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(ids, params)

    def generate_ids(self, ids: Sequence[Sequence[int]], params: GenerationParams) -> list[str]:
        """Continue pre-tokenised prompts; the new text only."""
        if not ids:
            return []
        sps = [sampling_params(params, i) for i in range(len(ids))]
        outs = self.llm.generate(_token_prompts(ids), sps, use_tqdm=False)
        return [self.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outs]


def answer_cross_entropy(llm: LLM, samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (mean CE over answer tokens, answer-token count), in input order.

    Same semantics as :meth:`evomerge.search.fitness.ScoringPlan.run`: token ``t`` of the
    span ``[answer_start, answer_end)`` is scored by the logprob the model gives it after
    ``ids[:t]``. ``prompt_logprobs=0`` asks vLLM for the logprob of the actual token only;
    the one generated token is discarded.
    """
    counts = torch.tensor([s.n_answer_tokens for s in samples], dtype=torch.long)
    if not samples:
        return torch.empty(0, dtype=torch.float64), counts
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate(_token_prompts(s.ids for s in samples), sp, use_tqdm=False)
    ce = torch.empty(len(samples), dtype=torch.float64)
    for k, (s, out) in enumerate(zip(samples, outs)):
        lps = out.prompt_logprobs
        if lps is None or len(lps) != len(s.ids):
            raise VLLMBackendError(f"sample {k}: vLLM returned {None if lps is None else len(lps)} prompt "
                                   f"logprobs for {len(s.ids)} tokens")
        total = 0.0
        for t in range(s.answer_start, s.answer_end):
            entry = lps[t]
            if entry is None or s.ids[t] not in entry:
                raise VLLMBackendError(f"sample {k}: no logprob for token {s.ids[t]} at position {t}")
            total -= float(entry[s.ids[t]].logprob)
        ce[k] = total / s.n_answer_tokens
    return ce, counts


class VLLMScorer:
    """A running engine that candidates are swapped into and scored on.

    Why one object: the engine start (seconds to minutes) is paid once per search; each
    candidate then costs one in-place weight load plus the scoring requests.
    """

    def __init__(self, model: str | os.PathLike[str], dtype: str = "float32", seed: int = 0,
                 load_options: Any = None, **engine_kwargs: Any) -> None:
        self.llm = engine(model, dtype=dtype, seed=seed, load_options=load_options, **engine_kwargs)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_state_dict(self.llm, state)

    def score(self, samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, torch.Tensor]:
        return answer_cross_entropy(self.llm, samples)

    def close(self) -> None:
        shutdown(self.llm)


def version() -> str:
    """The vLLM version in use (recorded in run summaries and test reports)."""
    return str(vllm.__version__)
