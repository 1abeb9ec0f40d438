"""Speculative decoding for the llama.cpp engine: who proposes draft tokens, and where a draft model comes from.

``draft_model_id`` selects a :class:`Drafter`:

* ``prompt_lookup`` (:data:`PROMPT_LOOKUP`): prompt-lookup (n-gram) decoding, no extra model. The draft is the
  tokens that followed the most recent earlier occurrence of the context's last ``n`` tokens (``n`` = 3, then
  2), the context being the prompt and everything generated so far. It pays off when the output quotes its
  input (an agent echoing code or JSON with a change, a list repeated back). A single-token match is not used:
  on free text its drafts were accepted less often (21% vs 33%; 0.88x vs 0.96x the decode rate without drafts,
  SmolLM2 on 2 cores, ``bench/bench_speculative.py``), on quoting tasks it gained nothing; on a CPU every drafted
  token costs (a 2-token batch takes ~1.8x a 1-token step for SmolLM2).
* anything else: a GGUF file (a path, ``package:…``, or an entry of ``model_config.yaml``) loaded as a draft
  model (:class:`DraftModel`); it must share the target's vocabulary. It runs its own llama.cpp context, one
  sequence per slot, on the engine thread, and proposes its greedy continuation.

Drafters only propose. The engine verifies every draft with the target model in its normal batch and samples
every emitted token from the target's own distribution (see ``engine.py``), so the output does not depend on
the draft; a bad draft only costs time. Each slot asks for ``EngineConfig.draft_tokens`` tokens, twice as many
after a fully accepted draft (up to ``draft_max``), one more than were accepted after a rejection.
"""

from __future__ import annotations

import abc
import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import llama_cpp as ll
import numpy as np

from gallama_kernel.plugin import BackendError, ConfigError, resolve_named_model

from .model import LlamaModel, common_prefix

log = logging.getLogger("gallama.llama_cpp")

PROMPT_LOOKUP = "prompt_lookup"
"""The ``draft_model_id`` value that selects prompt-lookup decoding instead of a draft model."""

LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM = 2
VOCAB_SAMPLES = 16  # token texts compared between a target and its draft, besides the special tokens

DraftRequest = tuple[int, list[int], int]
"""(sequence id, the slot's context: prompt and generated tokens, most draft tokens wanted)."""


@dataclass(frozen=True)
class DraftSettings:
    """How a draft model is loaded and where its context differs from the engine's (None: as the engine's).

    :param name: the label health and logs show (``draft_model_name``)
    :param n_gpu_layers: layers of the draft model on the GPU
    :param n_ctx: KV cells of the draft context (``draft_cache_size``); the backend checks that it holds every
        slot's tokens, since the draft model feeds each slot's whole context
    :param cache_type: ggml type of the draft context's K and V cache (``draft_cache_quant``)
    :param flash_attention: forced on for a quantized V cache, which llama.cpp computes only with it
    """

    name: str | None = None
    n_gpu_layers: int = 0
    n_ctx: int | None = None
    cache_type: int | None = None
    flash_attention: bool | None = None


class Drafter(abc.ABC):
    """Proposes draft tokens for decoding slots. Used on the engine thread only.

    The engine passes each slot's whole context every time; a drafter keeps whatever state it likes per
    sequence and resynchronises itself when the context is not a continuation of what it saw (a new request
    in the slot, rejected drafts).
    """

    name: str

    def open(self, params: ll.llama_context_params, n_slots: int) -> None:  # noqa: B027 - optional hook
        """Called once by the engine with its own context parameters (a draft model copies them)."""

    def set_threads(self, n_threads: int) -> None:  # noqa: B027 - optional hook
        """The engine's compute threads changed (its share of the cores, see ``gallama_kernel.cores``)."""

    @abc.abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> dict[int, list[int]]:
        """Draft tokens per sequence id (at most the number wanted; empty or absent: no draft this step)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget every sequence's state (the engine cleared its cache)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the drafter holds."""


# -- prompt lookup --------------------------------------------------------------------------------------------


class NgramIndex:
    """Tokens of one context and, for every n-gram (``min_n <= n <= max_n``) that ends before the last token,
    the position where its most recent occurrence ends. Appending a token costs ``max_n`` dict updates."""

    def __init__(self, max_n: int = LOOKUP_MAX_NGRAM, min_n: int = LOOKUP_MIN_NGRAM) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        history, ends, max_n = self.tokens, self.ends, self.max_n
        for token in tokens:
            last = len(history) - 1  # the n-grams ending here become "earlier occurrences" once a token follows
            if last >= 0:
                for n in range(self.min_n, min(max_n, last + 1) + 1):
                    ends[tuple(history[last - n + 1: last + 1])] = last
            history.append(token)

    def propose(self, k: int) -> list[int]:
        """The (up to) ``k`` tokens that followed the most recent earlier occurrence of the longest suffix found."""
        history = self.tokens
        size = len(history)
        for n in range(min(self.max_n, size), self.min_n - 1, -1):
            end = self.ends.get(tuple(history[size - n:]))
            if end is not None:
                return history[end + 1: end + 1 + k]
        return []


class PromptLookup(Drafter):
    """Prompt-lookup decoding: drafts copied from the context itself (see :class:`NgramIndex`)."""

    name = PROMPT_LOOKUP

    def __init__(self, max_n: int = LOOKUP_MAX_NGRAM, min_n: int = LOOKUP_MIN_NGRAM) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.indexes: dict[int, NgramIndex] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> dict[int, list[int]]:
        drafts: dict[int, list[int]] = {}
        for seq_id, context, k in requests:
            index = self.indexes.get(seq_id)
            seen = len(index.tokens) if index is not None else 0
            if index is None or seen > len(context) or context[:seen] != index.tokens:
                index = self.indexes[seq_id] = NgramIndex(self.max_n, self.min_n)
                seen = 0
            index.extend(context[seen:])
            drafts[seq_id] = index.propose(k)
        return drafts

    def reset(self) -> None:
        self.indexes.clear()


# -- draft model ----------------------------------------------------------------------------------------------


class Vocabulary(Protocol):
    """What :func:`check_same_vocabulary` reads of a model."""

    n_vocab: int

    def token_text(self, token: int) -> bytes: ...


def check_same_vocabulary(target: Vocabulary, draft: Vocabulary, draft_name: str = "the draft model") -> None:
    """Raise :class:`BackendError` unless ``draft`` has ``target``'s vocabulary: the same size and the same
    text for the first tokens (where special tokens live), the last one and ``VOCAB_SAMPLES`` spread between.
    Draft token ids are compared with the target's sampled ids, so they must mean the same text."""
    if draft.n_vocab != target.n_vocab:
        raise BackendError(f"draft_model_id: {draft_name} has a vocabulary of {draft.n_vocab} tokens, the model "
                           f"{target.n_vocab}; a draft model must share the model's tokenizer "
                           f"(or use draft_model_id={PROMPT_LOOKUP}, which needs no draft model)")
    n = target.n_vocab
    samples = sorted({*range(min(n, 8)), n - 1, *(i * n // VOCAB_SAMPLES for i in range(VOCAB_SAMPLES))})
    for token in samples:
        if draft.token_text(token) != target.token_text(token):
            raise BackendError(f"draft_model_id: {draft_name} spells token {token} as {draft.token_text(token)!r}, "
                               f"the model as {target.token_text(token)!r}; a draft model must share the model's "
                               f"tokenizer (or use draft_model_id={PROMPT_LOOKUP})")


def resolve_draft_path(draft_model_id: str, home: Path | None = None) -> str:
    """The GGUF file ``draft_model_id`` names: a path, ``package:pkg/file``, or an entry of ``model_config.yaml``
    (in ``home``, default ``GALLAMA_HOME_PATH``) or of gallama's embedded entries. :class:`BackendError` if none."""
    try:
        path = resolve_named_model(draft_model_id, home)
    except ConfigError as error:
        raise BackendError(f"draft_model_id={draft_model_id}: {error}") from None
    if Path(path).is_dir() or not path.endswith(".gguf"):
        raise BackendError(f"draft_model_id={draft_model_id}: {path} is not a GGUF file; the llama.cpp backend "
                           f"needs a GGUF draft model (or draft_model_id={PROMPT_LOOKUP})")
    return path


class DraftModel(Drafter):
    """A small model with the target's vocabulary, proposing its greedy continuation.

    It owns its own llama.cpp context (one sequence per slot, the engine's context parameters: as many KV cells
    as the model's, each of the draft's size, unless ``settings`` give another cell count, cache type or flash
    attention) and remembers which tokens each sequence's KV holds: a new context only costs the tokens after the
    common prefix (after accepted drafts, usually one or two; a new request's prompt, fed in chunks of
    ``n_batch`` tokens over successive steps so that other streams do not stall).
    The ``.gguf`` file is loaded with the model's GPU setting unless ``draft_gpus`` gave its own.

    :param model: the draft model (owned: freed by :meth:`close`)
    """

    def __init__(self, model: LlamaModel, path: str, settings: DraftSettings | None = None) -> None:
        self.model = model
        self.settings = settings or DraftSettings()
        self.name = self.settings.name or f"draft:{path}"
        self.ctx: ll.llama_context_p | None = None
        self.kv: list[list[int]] = []
        self.n_batch = 0
        self.n_ctx = 0  # KV cells of the draft context, once open

    def open(self, params: ll.llama_context_params, n_slots: int) -> None:
        params = type(params).from_buffer_copy(params)  # the engine's stay as they are
        settings = self.settings
        if settings.n_ctx is not None:
            params.n_ctx = settings.n_ctx
        if settings.cache_type is not None:
            params.type_k = params.type_v = settings.cache_type
        if settings.flash_attention is not None:
            params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attention
                                      else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = ll.llama_init_from_model(self.model.ptr, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the draft model's context (cache too large for memory?)")
        self.memory = ll.llama_get_memory(self.ctx)
        self.n_batch = params.n_batch
        self.batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self.kv = [[] for _ in range(n_slots)]
        self._row = ctypes.c_float * self.model.n_vocab
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        log.info("draft model %s: %d KV cells for %d slots", self.name, self.n_ctx, n_slots)

    def set_threads(self, n_threads: int) -> None:
        if self.ctx:
            ll.llama_set_n_threads(self.ctx, n_threads, n_threads)

    def propose(self, requests: Sequence[DraftRequest]) -> dict[int, list[int]]:
        feeds: dict[int, list[int]] = {}
        wanted: dict[int, int] = {}
        budget = self.n_batch  # tokens to catch up with this step, over all sequences
        for seq_id, context, k in requests:
            if k <= 0:
                continue
            kv = self.kv[seq_id]
            keep = min(common_prefix(kv, context), len(context) - 1)  # the last token is fed again for its logits
            if keep < len(kv):
                ll.llama_memory_seq_rm(self.memory, seq_id, keep, -1)
                del kv[keep:]
            missing = context[keep:]
            if len(missing) > budget:  # a long prompt to catch up with: part of it now, drafts in a later step
                if budget > 0:
                    self._decode({seq_id: missing[:budget]}, logits=False)
                budget = 0
                continue
            budget -= len(missing)
            feeds[seq_id], wanted[seq_id] = missing, k
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id in wanted}
        while feeds:  # one batch per draft position, every drafting sequence in it
            for seq_id, token in self._decode(feeds).items():
                drafts[seq_id].append(token)
            feeds = {seq_id: [draft[-1]] for seq_id, draft in drafts.items()
                     if len(draft) < wanted[seq_id] and not self.model.is_eog(draft[-1])}
        return drafts

    def _decode(self, feeds: dict[int, list[int]], logits: bool = True) -> dict[int, int]:
        """Feed ``feeds`` (sequence id → tokens) in batches of ``n_batch``; the greedy next token per sequence."""
        batch, n = self.batch, 0
        ends: list[tuple[int, int]] = []
        best: dict[int, int] = {}
        for seq_id, tokens in feeds.items():
            kv = self.kv[seq_id]
            for token in tokens:
                if n == self.n_batch:
                    self._flush(n, ends, best)
                    n, ends = 0, []
                batch.token[n] = token
                batch.pos[n] = len(kv)
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = 0
                kv.append(token)
                n += 1
            if logits:
                batch.logits[n - 1] = 1
                ends.append((seq_id, n - 1))
        if n:
            self._flush(n, ends, best)
        return best

    def _flush(self, n: int, ends: list[tuple[int, int]], best: dict[int, int]) -> None:
        self.batch.n_tokens = n
        status = ll.llama_decode(self.ctx, self.batch)
        if status != 0:
            self.reset()  # forget everything: the next proposals start afresh
            raise RuntimeError(f"llama_decode failed with status {status} (draft model)")
        for seq_id, index in ends:
            row = np.frombuffer(self._row.from_address(ctypes.addressof(ll.llama_get_logits_ith(
                self.ctx, index).contents)), dtype=np.float32)
            best[seq_id] = int(row.argmax())

    def reset(self) -> None:
        if self.ctx is not None:
            ll.llama_memory_clear(self.memory, True)
        self.kv = [[] for _ in self.kv]

    def close(self) -> None:
        if self.ctx is not None:
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            self.ctx = None
        self.model.close()


def load_drafter(draft_model_id: str, target: LlamaModel, settings: DraftSettings | None = None) -> Drafter:
    """The drafter ``draft_model_id`` selects (see the module docstring); :class:`BackendError` if it cannot
    be used with ``target``. A prompt-lookup drafter takes only ``settings.name``: the backend refuses the
    other ``draft_*`` keys with it."""
    settings = settings or DraftSettings()
    if draft_model_id == PROMPT_LOOKUP:
        lookup = PromptLookup()
        lookup.name = settings.name or PROMPT_LOOKUP
        return lookup
    path = resolve_draft_path(draft_model_id)
    model = LlamaModel(path, n_gpu_layers=settings.n_gpu_layers)
    try:
        check_same_vocabulary(target, model, path)
    except BackendError:
        model.close()
        raise
    return DraftModel(model, path, settings)
