"""What a ``ModelSpec`` and a request mean for ExLlamaV2, decided without importing exllamav2 or torch.

Everything here reads plain files of the model folder (``config.json``, ``tokenizer_config.json``,
``generation_config.json``, ``chat_template.jinja``) and returns plain values, so it is tested on machines
without a GPU; :mod:`.backend` turns them into exllamav2 objects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gallama_kernel.plugin import BackendError, ModelSpec, SamplingParams, unused_draft_keys

PAGE_TOKENS = 256  # the dynamic generator's cache page: its cache size must be a multiple of it
MAX_DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_SEQ_LEN = 32768  # the default context when the model's own is longer (its cache must fit the GPU)
PENALTY_WINDOW = 64  # tokens the repetition penalties look back on, as in the llama.cpp backend
PROMPT_LOOKUP = "prompt_lookup"  # draft_model_id for n-gram drafts (exllamav2's use_ngram_draft)
CACHE_CLASSES = {"FP16": "ExLlamaV2Cache", "Q8": "ExLlamaV2Cache_Q8", "Q6": "ExLlamaV2Cache_Q6",
                 "Q4": "ExLlamaV2Cache_Q4"}
# Special tokens that end a turn in common chat formats. generation_config.json usually lists the model's own
# (Llama 3's <|eot_id|>, Qwen's <|im_end|>); these cover folders without it. Only pieces the vocabulary
# holds as special tokens count.
END_OF_TURN_PIECES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class LoadPlan:
    """How to load one model: sizes, cache class, GPU placement, drafting."""

    max_seq_len: int  # most tokens one request may use (prompt + completion)
    cache_tokens: int  # KV cache shared by all requests (the generator pages it), a multiple of PAGE_TOKENS
    max_batch_size: int  # requests decoded at once
    cache_class: str  # exllamav2 class name
    gpu_split: list[float] | None  # GB per GPU for the weights; None: autosplit (or all GPUs with tp)
    tensor_parallel: bool
    draft_path: str | None  # an ExLlamaV2 model folder
    ngram_draft: bool
    draft_name: str | None = None  # the drafter's label in health and logs
    draft_gpu_split: list[float] | None = None  # GB per GPU for the draft weights; None: autosplit
    draft_cache_class: str = "ExLlamaV2Cache"  # exllamav2 class name of the draft cache


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """``folder/name`` as a JSON object, ``{}`` when it is missing; :class:`BackendError` when it is broken."""
    path = folder / name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BackendError(f"{path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise BackendError(f"{path} is not a JSON object")
    return data


def model_folder(path: str | None) -> Path:
    """The model folder of ``spec.model_path``: an ExLlamaV2 (EXL2) or plain Hugging Face safetensors folder."""
    if not path:
        raise BackendError("no model folder given")
    folder = Path(path)
    if not folder.is_dir():
        raise BackendError(f"{folder} is not a folder: the exllama backend loads a model folder (config.json, "
                           "*.safetensors, tokenizer.json); GGUF files go to backend=llama_cpp")
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).exists()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise BackendError(f"{folder} lacks {', '.join(missing)}: not an ExLlamaV2 model folder")
    return folder


def trained_context(folder: Path) -> int:
    """The model's own context length from ``config.json``, read as exllamav2 reads it (2048 when absent)."""
    config = read_json(folder, "config.json")
    sources = [config, config.get("text_config") or {}]
    for key in ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions"):
        for source in sources:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 2048


def plan_load(spec: ModelSpec, n_ctx_train: int, draft_path: str | None = None) -> LoadPlan:
    """The :class:`LoadPlan` of ``spec``; :class:`BackendError` for settings this backend cannot honour.

    ``max_seq_len`` defaults to the model's context, at most 32768 tokens. The cache is shared: requests take
    pages of it as they run and wait in the queue while it is full, so ``cache_size`` (default: one full-length
    request) may be smaller than ``max_concurrent_requests x max_seq_len``, but never smaller than one request.
    It is rounded up to the generator's page of 256 tokens.

    A draft model takes ``draft_gpus`` (its GPU split; default ``gpus``), ``draft_cache_quant`` (its cache class;
    default FP16) and ``draft_cache_size``, which can only repeat the cache's size: exllamav2's dynamic generator
    requires the draft cache to have the same dimensions as the model's (both page the same sequences). Drafting
    keys that would go unused (without ``draft_model_id``, or cache and GPU keys with ``prompt_lookup``) are
    refused.
    """
    if spec.max_seq_len and spec.max_seq_len > n_ctx_train:
        raise BackendError(f"max_seq_len={spec.max_seq_len} exceeds the model's context {n_ctx_train}")
    seq_len = spec.max_seq_len or min(n_ctx_train, DEFAULT_MAX_SEQ_LEN)
    cache_tokens = spec.cache_size or seq_len
    if spec.cache_size and spec.max_seq_len is None:
        seq_len = min(seq_len, spec.cache_size)
    if cache_tokens < seq_len:
        raise BackendError(f"cache_size={cache_tokens} cannot hold one request of max_seq_len={seq_len} tokens; "
                           f"raise cache_size to {seq_len} or lower max_seq_len")
    cache_tokens = pages(cache_tokens)
    quant = spec.cache_quant or "FP16"
    if quant not in CACHE_CLASSES:
        raise BackendError(f"cache_quant={quant} is not available in ExLlamaV2; use one of {', '.join(CACHE_CLASSES)}")
    gpus = list(spec.gpus) if spec.gpus else None
    if gpus is not None and any(gb <= 0 for gb in gpus):
        raise BackendError(f"gpus={','.join(str(g) for g in gpus)}: every GPU needs a positive number of GB")
    if spec.n_threads:
        raise BackendError("n_threads is a CPU setting of the llama.cpp backend; ExLlamaV2 runs on GPUs")
    tp = bool(spec.tp)
    ngram = spec.draft_model_id == PROMPT_LOOKUP
    if spec.draft_model_id and not ngram and draft_path is None:
        raise BackendError(f"draft_model_id={spec.draft_model_id}: no ExLlamaV2 model folder found")
    if tp and spec.draft_model_id:
        raise BackendError("tp=true with a draft model is not supported by the exllama backend; drop one of them")
    problem = unused_draft_keys(spec, "the exllama backend", frozenset({PROMPT_LOOKUP}))
    if problem:
        raise BackendError(problem)
    draft_quant = spec.draft_cache_quant or "FP16"
    if draft_quant not in CACHE_CLASSES:
        raise BackendError(f"draft_cache_quant={draft_quant} is not available in ExLlamaV2; use one of "
                           f"{', '.join(CACHE_CLASSES)}")
    draft_gpus = list(spec.draft_gpus) if spec.draft_gpus else gpus
    if spec.draft_gpus and any(gb <= 0 for gb in spec.draft_gpus):
        raise BackendError(f"draft_gpus={','.join(str(g) for g in spec.draft_gpus)}: every GPU needs a positive "
                           "number of GB")
    # Equal page counts give equal caches whatever the classes: a Q cache's quantization block divides a page.
    if spec.draft_cache_size and pages(spec.draft_cache_size) != cache_tokens:
        raise BackendError(f"draft_cache_size={spec.draft_cache_size}: exllamav2's dynamic generator needs the draft "
                           f"cache the size of the model's cache ({cache_tokens} tokens, in pages of {PAGE_TOKENS}); "
                           f"set draft_cache_size to {cache_tokens} or omit it")
    return LoadPlan(max_seq_len=seq_len, cache_tokens=cache_tokens,
                    max_batch_size=spec.max_concurrent_requests or MAX_DEFAULT_CONCURRENCY,
                    cache_class=CACHE_CLASSES[quant], gpu_split=gpus, tensor_parallel=tp,
                    draft_path=None if ngram else draft_path, ngram_draft=ngram,
                    draft_name=spec.draft_model_name or spec.draft_model_id,
                    draft_gpu_split=draft_gpus, draft_cache_class=CACHE_CLASSES[draft_quant])


def pages(tokens: int) -> int:
    """``tokens`` rounded up to whole cache pages of :data:`PAGE_TOKENS`."""
    return math.ceil(tokens / PAGE_TOKENS) * PAGE_TOKENS


def sampler_fields(params: SamplingParams) -> dict[str, Any]:
    """``ExLlamaV2Sampler.Settings`` attributes for ``params``, every one set: exllamav2's own defaults
    (temperature 0.8, top-k 50, top-p 0.8, repetition penalty 1.025) are not OpenAI's.

    ``temperature == 0`` is greedy (top-k 1). Penalties look at the last 64 tokens, as in the llama.cpp backend
    (there, of the completion; here, of the sequence, prompt included, which is how exllamav2 counts).
    """
    greedy = params.temperature <= 0
    return {
        "temperature": 1.0 if greedy else params.temperature,
        "top_k": 1 if greedy else max(params.top_k, 0),
        "top_p": 0.0 if greedy or params.top_p >= 1.0 else params.top_p,
        "min_p": 0.0 if greedy else params.min_p,
        "top_a": 0.0, "tfs": 0.0, "typical": 0.0, "smoothing_factor": 0.0, "skew": 0.0,
        "token_repetition_penalty": params.repeat_penalty,
        "token_repetition_range": PENALTY_WINDOW,
        "token_repetition_decay": 0,
        "token_presence_penalty": params.presence_penalty,
        "token_frequency_penalty": params.frequency_penalty,
        "mirostat": False, "dry_multiplier": 0.0, "xtc_probability": 0.0,
    }


class TokenizerFiles:
    """The tokenizer side of a model folder, each file read once at load: ``tokenizer_config.json``,
    ``generation_config.json``, ``chat_template.jinja`` and the text of ``tokenizer.json`` (also what llguidance
    reads)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = read_json(folder, "tokenizer_config.json")
        self.generation = read_json(folder, "generation_config.json")
        path = folder / "tokenizer.json"
        try:
            self.tokenizer_text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BackendError(f"{path} cannot be read: {error}") from None
        template = folder / "chat_template.jinja"
        self._template_file = template.read_text(encoding="utf-8") if template.exists() else None

    def chat_template(self) -> str | None:
        """The model's Jinja chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
        ``chat_template`` (a string, or a list of named templates: ``default`` or the first)."""
        if self._template_file is not None:
            return self._template_file
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) and template.strip() else None

    def special_token_text(self, name: str) -> str:
        """Text of ``bos_token`` / ``eos_token`` in ``tokenizer_config.json`` (a string or ``{"content": …}``)."""
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else ""

    def adds_bos(self) -> bool:
        """Whether prompts start with BOS: ``add_bos_token`` in ``tokenizer_config.json`` (false when absent)."""
        return bool(self.config.get("add_bos_token", False))

    def special_tokens(self) -> dict[str, int]:
        """Special tokens of ``tokenizer.json`` (``added_tokens`` marked special): piece -> id."""
        try:
            data = json.loads(self.tokenizer_text)
        except json.JSONDecodeError as error:
            raise BackendError(f"{self.folder / 'tokenizer.json'} cannot be read: {error}") from None
        found: dict[str, int] = {}
        for token in (data.get("added_tokens") if isinstance(data, dict) else None) or []:
            if isinstance(token, dict) and token.get("special") and isinstance(token.get("id"), int):
                found[str(token.get("content"))] = token["id"]
        return found

    def end_token_ids(self, eos_token_id: int | None) -> list[int]:
        """Token ids that end a generation: the tokenizer's EOS, ``generation_config.json``'s ``eos_token_id``
        (an id or a list), and the end-of-turn pieces of :data:`END_OF_TURN_PIECES` that are special tokens of
        this vocabulary."""
        special_id = self.special_tokens()
        declared = self.generation.get("eos_token_id")
        candidates = [eos_token_id, *(declared if isinstance(declared, list) else [declared])]
        candidates += [special_id.get(piece) for piece in END_OF_TURN_PIECES]
        ids: list[int] = []
        for token in candidates:
            if isinstance(token, int) and not isinstance(token, bool) and token >= 0 and token not in ids:
                ids.append(token)
        return ids
