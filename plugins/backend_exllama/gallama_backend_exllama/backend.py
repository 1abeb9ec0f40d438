"""The ``exllama`` backend: an ExLlamaV2 (EXL2 or FP16 safetensors) model folder on CUDA GPUs, served by
exllamav2's dynamic generator (continuous batching, paged cache, prefix reuse) on a thread of its own.

Keys of ``-id``: ``max_seq_len`` (default the model's, at most 32768), ``cache_size`` (tokens of the shared
paged cache, default one full-length request), ``cache_quant`` (FP16, Q8, Q6, Q4), ``gpus`` (GB of weights per
GPU; default: split automatically), ``tp=true`` (tensor parallelism over the GPUs), ``max_concurrent_requests``
(default 8), ``draft_model_id`` (a smaller ExLlamaV2 model with the same vocabulary, or ``prompt_lookup`` for
exllamav2's n-gram drafts), and for a draft model ``draft_gpus`` (its GPU split; default ``gpus``),
``draft_cache_quant`` (default FP16), ``draft_cache_size`` (only the cache's own size: see
:func:`.settings.plan_load`) and ``draft_model_name`` (its label in health and logs). Grammars (tools,
``response_format``, regexes) are enforced with llguidance on the model's own ``tokenizer.json``; a model whose
tokenizer llguidance cannot read refuses them with a 400.

Importing exllamav2 needs CUDA; this module imports it only in :meth:`ExLlamaBackend.load`, so the plugin
installs and registers anywhere and a machine without a GPU gets a clear load error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gallama_kernel.plugin import (
    Backend,
    BackendError,
    Capabilities,
    ConfigError,
    Emit,
    GenerationEvent,
    GenerationRequest,
    MatcherCache,
    ProgressCallback,
    ThreadJobs,
    resolve_named_model,
)

from .engine import GeneratorLoop, Request
from .guidance import GuidanceMask, filter_class, tokenizer_for
from .settings import (
    PROMPT_LOOKUP,
    LoadPlan,
    TokenizerFiles,
    model_folder,
    plan_load,
    sampler_fields,
    trained_context,
)

if TYPE_CHECKING:
    from gallama_kernel.plugin import Grammar

log = logging.getLogger("gallama.exllama")

INSTALL_HINT = "pip install 'gallama-backend-exllama[engine]' (exllamav2 with a CUDA build of torch)"


def resolve_draft_folder(draft_model_id: str, home: Path | None = None) -> str:
    """The ExLlamaV2 folder ``draft_model_id`` names: a path or an entry of ``model_config.yaml``."""
    try:
        return str(model_folder(resolve_named_model(draft_model_id, home)))
    except (ConfigError, BackendError) as error:
        raise BackendError(f"draft_model_id={draft_model_id}: {error}") from None


class ExLlamaBackend(Backend):
    name = "exllama"

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.folder: Path | None = None
        self.plan: LoadPlan | None = None
        self.loop: GeneratorLoop | None = None
        self.grammars: MatcherCache | None = None
        self.end_ids: list[int] = []
        self._objects: dict[str, Any] = {}  # exllamav2 model, cache, tokenizer, generator, draft model/cache
        self._requests = ThreadJobs()
        self._pieces: list[str] = []
        self._add_bos = False
        self._bos_text = ""
        self._eos_text = ""
        self._control: frozenset[str] = frozenset()
        self._template: str | None = None
        self._filter: type | None = None

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        spec = self.spec
        folder = model_folder(spec.model_path)
        draft = None
        if spec.draft_model_id and spec.draft_model_id != PROMPT_LOOKUP:
            draft = resolve_draft_folder(spec.draft_model_id)
        plan = plan_load(spec, trained_context(folder), draft)
        try:
            import exllamav2
            import torch
            from exllamav2.generator import ExLlamaV2DynamicGenerator
        except Exception as error:  # ImportError, or the CUDA extension failing to build or load
            raise BackendError(f"the exllama backend needs exllamav2 and CUDA ({type(error).__name__}: {error}); "
                               f"{INSTALL_HINT}") from None
        if not torch.cuda.is_available():
            raise BackendError("the exllama backend needs a CUDA GPU and none is visible; GGUF models run on the "
                               "CPU with backend=llama_cpp")
        self.stream_interval_s = (spec.stream_interval_ms or 0) / 1000  # GPU: a chunk per token by default
        self.folder, self.plan = folder, plan
        try:
            self._load(exllamav2, ExLlamaV2DynamicGenerator, folder, plan, progress)
        except BaseException:
            self.close()
            raise

    def _load(self, exl: Any, generator_class: Any, folder: Path, plan: LoadPlan,
              progress: ProgressCallback | None) -> None:
        model, cache, tokenizer = self._load_model(exl, folder, plan, progress)
        draft_model = draft_cache = None
        if plan.draft_path:
            draft_model, draft_cache, _ = self._load_model(exl, Path(plan.draft_path), plan, None, draft=True)
            log.info("draft model %s: %s, %s of %d tokens", plan.draft_name, plan.draft_path, plan.draft_cache_class,
                     plan.cache_tokens)
        self._pieces = tokenizer.get_id_to_piece_list(False)
        files = TokenizerFiles(folder)
        self.end_ids = files.end_token_ids(tokenizer.eos_token_id)
        self._add_bos, self._template = files.adds_bos(), files.chat_template()
        self._bos_text = files.special_token_text("bos_token")
        self._eos_text = files.special_token_text("eos_token")
        # the added tokens marked special: what encode_special_tokens=True reads as control tokens and client text
        # must never become (non-special ones such as a thinking model's <think> stay as exllamav2 reads them)
        self._control = frozenset(files.special_tokens()) | {t for t in (self._bos_text, self._eos_text) if t}
        try:
            self.grammars = MatcherCache(tokenizer_for(files, self.end_ids))
            self._filter = filter_class()
        except BackendError as error:
            log.warning("%s", error)
            self.grammars = None
        keys = dict(model=model, cache=cache, tokenizer=tokenizer, max_seq_len=plan.max_seq_len,
                    draft_model=draft_model, draft_cache=draft_cache, use_ngram_draft=plan.ngram_draft)
        try:
            generator = generator_class(max_batch_size=plan.max_batch_size, paged=True, **keys)
        except AssertionError as error:  # paged attention needs flash-attn >= 2.5.7
            log.warning("exllamav2's paged cache is unavailable (%s): one request at a time; install flash-attn "
                        ">= 2.5.7 to decode several at once", error or "flash-attn missing")
            generator = generator_class(max_batch_size=1, paged=False, **keys)
            self.plan = plan = dataclasses.replace(plan, max_batch_size=1)
        self._objects["generator"] = generator
        self.loop = GeneratorLoop(generator, self._make_job, self._piece)

    def _load_model(self, exl: Any, folder: Path, plan: LoadPlan, progress: ProgressCallback | None,
                    draft: bool = False) -> tuple[Any, Any, Any]:
        """Config, model (weights on the GPUs as the plan says), cache and tokenizer of one folder."""
        prefix = "draft_" if draft else ""
        config = exl.ExLlamaV2Config(str(folder))
        config.arch_compat_overrides(quiet=True)
        config.max_seq_len = plan.max_seq_len
        model = exl.ExLlamaV2(config)
        self._objects[prefix + "model"] = model
        cache_class = getattr(exl, plan.draft_cache_class if draft else plan.cache_class)
        gpu_split = plan.draft_gpu_split if draft else plan.gpu_split

        def callback(done: int, total: int) -> None:
            if progress is not None and total:
                progress(done / total)

        try:
            if plan.tensor_parallel and not draft:
                model.load_tp(gpu_split=plan.gpu_split, expect_cache_tokens=plan.cache_tokens,
                              expect_cache_base=cache_class, callback=callback)
                cache = exl.ExLlamaV2Cache_TP(model, base=cache_class, max_seq_len=plan.cache_tokens)
            elif gpu_split:
                model.load(gpu_split=gpu_split, callback=callback)
                cache = cache_class(model, max_seq_len=plan.cache_tokens)
            else:
                cache = cache_class(model, max_seq_len=plan.cache_tokens, lazy=True)
                model.load_autosplit(cache, callback=callback)
        except (RuntimeError, ValueError, AssertionError) as error:  # "Insufficient VRAM for model and cache", …
            raise BackendError(f"{folder}: loading failed: {error}; lower cache_size / max_seq_len, use "
                               "cache_quant=Q8 or Q4, or give gpus=") from None
        self._objects[prefix + "cache"] = cache
        tokenizer = exl.ExLlamaV2Tokenizer(config)
        self._objects[prefix + "tokenizer"] = tokenizer
        return model, cache, tokenizer

    # -- the loop's callbacks (loop thread) --------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self._pieces[token] if 0 <= token < len(self._pieces) else ""

    def _make_job(self, request: Request) -> Any:
        import torch
        from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

        generation = request.request
        settings = ExLlamaV2Sampler.Settings()
        for key, value in sampler_fields(generation.sampling).items():
            setattr(settings, key, value)
        filters = None
        if request.mask is not None and self._filter is not None:
            filters = [self._filter(self._objects["model"], self._objects["tokenizer"], request.mask)]
        return ExLlamaV2DynamicJob(input_ids=torch.tensor([generation.prompt_tokens], dtype=torch.long),
                                   max_new_tokens=generation.max_tokens, stop_conditions=list(self.end_ids),
                                   gen_settings=settings, seed=generation.sampling.seed, filters=filters,
                                   identifier=generation.request_id, decode_special_tokens=False)

    # -- the backend contract ----------------------------------------------------------------------------------
    def _require(self) -> tuple[GeneratorLoop, Any]:
        if self.loop is None or "tokenizer" not in self._objects or self.plan is None:
            raise BackendError("model is not loaded")
        return self.loop, self._objects["tokenizer"]

    @property
    def context_length(self) -> int:
        if self.plan is None:
            raise BackendError("model is not loaded")
        return self.plan.max_seq_len

    @property
    def vocab_size(self) -> int:
        return int(self._require()[1].get_vocab_size())

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": self._bos_text, "eos_token": self._eos_text}

    @property
    def capabilities(self) -> Capabilities:
        plan = self.plan
        return Capabilities(max_concurrency=plan.max_batch_size if plan else 1)

    def validate_grammar(self, grammar: Grammar) -> None:
        if self.grammars is None:
            super().validate_grammar(grammar)  # refuses: llguidance could not read this model's tokenizer
            return
        self.grammars.validate(grammar)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        tokenizer = self._require()[1]
        bos = add_special and self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return [int(t) for t in tokenizer.encode(text, add_bos=bos, encode_special_tokens=True)[0].tolist()]

    def tokenize_plain(self, text: str, *, add_special: bool = True) -> list[int]:
        tokenizer = self._require()[1]
        bos = add_special and self._add_bos
        return [int(t) for t in tokenizer.encode(text, add_bos=bos, encode_special_tokens=False)[0].tolist()]

    @property
    def control_texts(self) -> frozenset[str]:
        return self._control

    def detokenize(self, tokens: list[int]) -> str:
        import torch

        return str(self._require()[1].decode(torch.tensor(tokens, dtype=torch.long), decode_special_tokens=False))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        loop_, _ = self._require()
        n_vocab = self.vocab_size
        if not request.prompt_tokens or any(not 0 <= t < n_vocab for t in request.prompt_tokens):
            raise BackendError("the prompt is empty or has token ids outside the vocabulary")
        mask = None
        if request.grammar is not None:
            if self.grammars is None:
                raise BackendError("this model cannot enforce grammars")
            matcher = await asyncio.to_thread(self.grammars.matcher, request.grammar)
            mask = GuidanceMask(matcher, self.grammars.tokenizer.vocab_size, self.end_ids)

        def make(emit: Emit) -> Request:
            return Request(request, emit, mask)

        async for event in self._requests.events(request.request_id, make, loop_.submit, loop_.cancel):
            yield event

    def abort(self, request_id: str) -> None:
        self._requests.abort(request_id)

    def health(self) -> dict[str, object]:
        if self.loop is None or self.plan is None:
            return {"status": "loading"}
        plan = self.plan
        drafting = plan.draft_path or plan.ngram_draft
        return {"status": "ok" if self.loop.thread.is_alive() else "failed", "slots": plan.max_batch_size,
                "context_length": plan.max_seq_len, "cache_tokens": plan.cache_tokens,
                **({"draft_model": plan.draft_name} if drafting else {}), **self.loop.stats(),
                **(self.grammars.stats() if self.grammars is not None else {})}

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        for key in ("draft_model", "model"):
            model = self._objects.get(key)
            if model is not None:
                try:
                    model.unload()
                except Exception:  # a half-loaded model: drop it anyway
                    log.debug("unload of %s failed", key, exc_info=True)
        self._objects.clear()  # caches and the generator hold GPU memory until they are gone
        self.grammars = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
