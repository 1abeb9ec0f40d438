"""The ``llama_cpp`` backend: a GGUF model served by one continuous-batching engine loop.

Speculative decoding is opt-in through ``draft_model_id`` (see ``speculative.py``): a GGUF draft model that
shares the model's vocabulary, or the special value ``prompt_lookup`` (n-gram drafts copied from the prompt and
the output so far, no extra model). Verification is exact for any sampler and grammar (each emitted token is
sampled from the model's own distribution at its position; see ``engine.py``), so it only changes speed.
Measured with ``bench/bench_speculative.py`` (SmolLM2-135M Q4_1, 2 CPU cores, greedy, medians of 10 runs, decode
tok/s relative to the same engine with drafting off): prompt lookup 1.29x on quoting tasks (an agent returning
JSON or code with a change; 62% of drafts accepted) but 0.96x on free text (33% accepted); a draft model as
large as the target 0.71x / 0.52x (every greedy draft accepted: drafting K tokens costs K draft decodes). Hence
neither is on by default: ``prompt_lookup`` is worth it for agents that echo their input, a draft model only
when it is much smaller than the model.

A draft model takes ``draft_model_name`` (its label in health and logs), ``draft_gpus`` (as ``gpus``: the whole
draft model on the GPU; refused by a build without GPU support; default: the model's placement),
``draft_cache_quant`` (its K/V cache type; default the model's) and ``draft_cache_size`` (its KV cells; at least
what every slot holds, since it feeds each slot's whole context; default exactly that). With ``prompt_lookup``
only ``draft_model_name`` applies; without ``draft_model_id`` none does: the others are refused at load.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import llama_cpp as ll

from gallama_kernel.plugin import (
    Backend,
    BackendError,
    Capabilities,
    Emit,
    GenerationEvent,
    GenerationRequest,
    ModelSpec,
    ProgressCallback,
    PromptSegment,
    ThreadJobs,
    unused_draft_keys,
)

from .engine import Engine, EngineConfig, Job
from .grammar import GrammarEngine
from .model import LlamaModel
from .speculative import PROMPT_LOOKUP, Drafter, DraftSettings, load_drafter

if TYPE_CHECKING:
    from gallama_kernel.plugin import Grammar

CACHE_TYPES = {"FP16": ll.GGML_TYPE_F16, "Q8": ll.GGML_TYPE_Q8_0, "Q4": ll.GGML_TYPE_Q4_0}
CACHE_BYTES_PER_VALUE = {"FP16": 2.0, "Q8": 34 / 32, "Q4": 18 / 32}  # ggml block sizes
MAX_DEFAULT_SLOTS = 8
DEFAULT_CACHE_BUDGET = 1 << 30  # bytes of KV cache the default slot count may use
DEFAULT_MAX_SEQ_LEN = 4096
CPU_STREAM_INTERVAL_S = 0.02  # see LlamaCppBackend.load


def plan_cache(spec: ModelSpec, n_ctx_train: int, bytes_per_token: float) -> tuple[int, int]:
    """(slots, tokens per slot) from ``max_concurrent_requests``, ``max_seq_len`` and ``cache_size``.

    The cache holds ``slots x tokens per slot`` cells; every slot owns its share, so a request never waits
    for cache space once it runs. Without ``cache_size`` or ``max_concurrent_requests``, as many slots as fit
    in ``DEFAULT_CACHE_BUDGET`` bytes (``bytes_per_token`` of KV per cell), between 1 and 8.
    """
    if spec.max_seq_len and spec.max_seq_len > n_ctx_train:
        raise BackendError(f"max_seq_len={spec.max_seq_len} exceeds the model's training context {n_ctx_train}")
    seq_len = spec.max_seq_len or min(n_ctx_train, DEFAULT_MAX_SEQ_LEN)
    slots = spec.max_concurrent_requests
    if spec.cache_size:
        if slots is None:
            slots = max(1, spec.cache_size // seq_len)
        if spec.max_seq_len is None:
            seq_len = min(seq_len, spec.cache_size // slots)
        if slots * seq_len > spec.cache_size:
            raise BackendError(f"cache_size={spec.cache_size} cannot hold {slots} requests of max_seq_len="
                               f"{seq_len} tokens; raise cache_size to {slots * seq_len} or lower the others")
        if seq_len < 16:
            raise BackendError(f"cache_size={spec.cache_size} leaves {seq_len} tokens per request")
    if slots is None:
        slots = int(min(MAX_DEFAULT_SLOTS, max(1, DEFAULT_CACHE_BUDGET // (seq_len * bytes_per_token))))
    return slots, seq_len


def flash_attention(quant: str, gpu_layers: int, speculative: bool = False) -> bool | None:
    """Flash attention: required by a quantized V cache and by speculative decoding on the CPU (below);
    llama.cpp's choice otherwise, which is on for this build, CPU included.

    Measured on 2 cores with SmolLM2 (in-process decode loop, on and off interleaved, 128 tokens): 126.5 vs
    112.7 tok/s at 2 threads, 92.8 vs 87.4 at 1 thread, 104.2 vs 94.4 at 2 threads after a ~500-token prompt.
    Greedy output is also steadier with it: with flash attention off, llama.cpp's logits for a token change (by up
    to ~1.2 for SmolLM2) with the batch that computed the earlier tokens of its sequence, so the same request
    could give another answer once its prompt came from the prefix cache (near ties flip); with it on, they are
    equal while a slot holds under 256 KV cells.

    With speculative decoding it is forced on on the CPU: verifying ``[last, d1..dK]`` at once must give the
    logits of decoding one token at a time. With flash attention they are equal while a slot holds under 256 KV
    cells (short chats, tool calls); beyond, no setting of this build makes them equal, and a near tie may flip
    (the output is still a sample of the same model).
    """
    if quant != "FP16" or (speculative and not gpu_layers):
        return True
    return None


def gpu_layers_for(key: str, gpus: list[float] | None) -> int:
    """Layers to offload for ``gpus`` (given as ``key``): all of them when it is set (llama.cpp places them
    across the GPUs itself), none otherwise; :class:`BackendError` on a build without GPU support."""
    if not gpus:
        return 0
    if not ll.llama_supports_gpu_offload():
        raise BackendError(f"{key}= was given but this llama.cpp build has no GPU support; omit {key} to run on "
                           "the CPU")
    return -1


def draft_settings(spec: ModelSpec, gpu_layers: int) -> DraftSettings:
    """The draft model's :class:`DraftSettings` from the ``draft_*`` keys (``gpu_layers``: the model's); refuses
    those the llama.cpp backend could not apply (see the module docstring) with :class:`BackendError`."""
    problem = unused_draft_keys(spec, "the llama.cpp backend", frozenset({PROMPT_LOOKUP}))
    if problem:
        raise BackendError(problem)
    quant = spec.draft_cache_quant
    if quant and quant not in CACHE_TYPES:
        raise BackendError(f"draft_cache_quant={quant} is not available in llama.cpp; use one of "
                           f"{', '.join(CACHE_TYPES)}")
    draft_layers = gpu_layers_for("draft_gpus", spec.draft_gpus) if spec.draft_gpus else gpu_layers
    return DraftSettings(name=spec.draft_model_name, n_gpu_layers=draft_layers,
                         n_ctx=spec.draft_cache_size, cache_type=CACHE_TYPES[quant] if quant else None,
                         flash_attention=True if quant and quant != "FP16" else None)


def check_draft_cache(n_ctx: int | None, slots: int, seq_len: int) -> None:
    """Refuse a ``draft_cache_size`` below ``slots x seq_len``: the draft model feeds every slot's whole context,
    so a smaller draft cache would fail once a slot outgrows its share of it."""
    if n_ctx is not None and n_ctx < slots * seq_len:
        raise BackendError(f"draft_cache_size={n_ctx} cannot hold the {slots} slots of {seq_len} tokens the model's "
                           f"cache holds ({slots * seq_len}): the llama.cpp backend's draft model feeds every "
                           f"slot's whole context; raise draft_cache_size to {slots * seq_len} or omit it")


def kv_bytes_per_token(model: LlamaModel, quant: str) -> float:
    """KV cache bytes one token takes: K and V for every layer and KV head."""
    ptr = model.ptr
    head_dim = ll.llama_model_n_embd(ptr) // max(1, ll.llama_model_n_head(ptr))
    values = 2 * ll.llama_model_n_layer(ptr) * ll.llama_model_n_head_kv(ptr) * head_dim
    return values * CACHE_BYTES_PER_VALUE[quant]


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.model: LlamaModel | None = None
        self.engine: Engine | None = None
        self.grammars: GrammarEngine | None = None
        self._jobs = ThreadJobs()

    def load(self, progress: ProgressCallback | None = None) -> None:
        spec = self.spec
        if not spec.model_path:
            raise BackendError("no model file given")
        if spec.tp:
            raise BackendError("tp (tensor parallelism) is an ExLlamaV2 setting; the llama.cpp backend splits "
                               "layers across gpus by itself")
        quant = spec.cache_quant or "FP16"
        if quant not in CACHE_TYPES:
            raise BackendError(f"cache_quant={quant} is not available in llama.cpp; use one of "
                               f"{', '.join(CACHE_TYPES)}")
        gpu_layers = gpu_layers_for("gpus", spec.gpus)
        draft = draft_settings(spec, gpu_layers)
        # A stream's text generated within 20 ms goes out in one chunk on the CPU: every chunk wakes the event
        # loop, the gateway and the client, whose CPU time on a small machine is taken from the compute threads
        # (SmolLM2 on 2 cores, 128-token streams, interleaved: 145.5 vs 139.1 tok/s per token, 43 chunks vs 128).
        # On a GPU those wake-ups run beside the compute: a chunk per token.
        if spec.stream_interval_ms is not None:
            self.stream_interval_s = spec.stream_interval_ms / 1000
        else:
            self.stream_interval_s = 0.0 if gpu_layers else CPU_STREAM_INTERVAL_S
        self.model = LlamaModel(spec.model_path, progress, n_gpu_layers=gpu_layers)
        try:
            self._start(spec, quant, gpu_layers, draft)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: ModelSpec, quant: str, gpu_layers: int, draft: DraftSettings) -> None:
        """Everything after the model file: the cache plan, the drafter, the engine."""
        assert self.model is not None
        slots, seq_len = plan_cache(spec, self.model.n_ctx_train, kv_bytes_per_token(self.model, quant))
        drafter: Drafter | None = None
        if spec.draft_model_id:
            check_draft_cache(draft.n_ctx, slots, seq_len)
            drafter = load_drafter(spec.draft_model_id, self.model, draft)
        self.grammars = GrammarEngine(self.model)  # llguidance's tokenizer: once per model (~0.2 s at 49k tokens)
        config = EngineConfig(n_slots=slots, n_ctx_per_slot=seq_len, n_threads=spec.n_threads,
                              type_k=CACHE_TYPES[quant], type_v=CACHE_TYPES[quant],
                              kv_bytes_per_cell=kv_bytes_per_token(self.model, quant),
                              flash_attention=flash_attention(quant, gpu_layers, speculative=drafter is not None))
        try:
            self.engine = Engine(self.model, config, drafter)
        except RuntimeError as error:
            if drafter is not None:
                drafter.close()
            raise BackendError(str(error)) from None

    def _require(self) -> tuple[LlamaModel, Engine]:
        if self.model is None or self.engine is None:
            raise BackendError("model is not loaded")
        return self.model, self.engine

    def _require_grammars(self) -> GrammarEngine:
        if self.grammars is None:
            raise BackendError("model is not loaded")
        return self.grammars

    @property
    def context_length(self) -> int:
        return self._require()[1].config.n_ctx_per_slot

    @property
    def vocab_size(self) -> int:
        return self._require()[0].n_vocab

    @property
    def chat_template(self) -> str | None:
        return self._require()[0].chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        model = self._require()[0]
        return {"bos_token": model.bos_text, "eos_token": model.eos_text}

    @property
    def capabilities(self) -> Capabilities:
        engine = self._require()[1]
        return Capabilities(max_concurrency=engine.config.n_slots)

    def validate_grammar(self, grammar: Grammar) -> None:
        """Compile ``grammar`` with llguidance (cached for the request that follows); a broken one raises
        :class:`~gallama_kernel.grammar.GrammarError` with llguidance's message."""
        self._require_grammars().validate(grammar)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._require()[0].tokenize(text, add_special)

    def tokenize_plain(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._require()[0].tokenize_plain(text, add_special)

    def tokenize_prompt(self, prompt: Sequence[PromptSegment], *, add_special: bool = True) -> list[int]:
        model = self._require()[0]
        if all(trusted for _, trusted in prompt):  # the usual case: reuses the tokens of recent prompts
            return model.tokenize("".join(text for text, _ in prompt), add_special)
        return model.tokenize_pieces(self.segment_splitter.pieces(prompt), add_special)

    @property
    def control_texts(self) -> frozenset[str]:
        return self._require()[0].control_texts

    def detokenize(self, tokens: list[int]) -> str:
        return self._require()[0].detokenize(tokens)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        model, engine = self._require()
        if not request.prompt_tokens or any(not 0 <= t < model.n_vocab for t in request.prompt_tokens):
            raise BackendError("the prompt is empty or has token ids outside the vocabulary")
        matcher = None
        if request.grammar is not None:  # compiling drops the GIL: off the event loop and off the engine thread
            matcher = await asyncio.to_thread(self._require_grammars().matcher, request.grammar)

        def make(emit: Emit) -> Job:
            return Job(request, emit, matcher=matcher)

        async for event in self._jobs.events(request.request_id, make, engine.submit, engine.cancel):
            yield event

    def abort(self, request_id: str) -> None:
        self._jobs.abort(request_id)

    def health(self) -> dict[str, object]:
        if self.engine is None:
            return {"status": "loading"}
        alive = self.engine.thread.is_alive()
        drafter = self.engine.drafter
        named = {"draft_model": drafter.name} if drafter is not None else {}
        grammars = self.grammars.stats() if self.grammars is not None else {}
        return {"status": "ok" if alive else "failed", **self.engine.stats(), **grammars, **named}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.grammars = None  # its tokenizer points into the model's vocabulary
        if self.model is not None:
            self.model.close()
            self.model = None
