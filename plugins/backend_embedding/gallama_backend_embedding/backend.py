"""The ``embedding`` backend: a sentence-transformers model folder, served by infinity-emb's batching engine.

torch and infinity-emb are imported by :meth:`EmbeddingBackend.load` only, so registering the backend costs
nothing. The model is read from its folder, offline (``HF_HUB_OFFLINE=1``), on the CPU, without running code
shipped with the model.

infinity-emb's engine runs a batching loop: threads for tokenizing, the forward pass and post-processing, plus
a task on the event loop that completes the requests' futures. That task and those futures belong to one event
loop, so the engine starts lazily, on the loop of the first :meth:`~EmbeddingBackend.embed` call (the server's
loop), and :meth:`~EmbeddingBackend.close` stops it. Requests arriving together are batched together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gallama_kernel.plugin import (
    DRAFT_KEYS,
    Backend,
    BackendError,
    Capabilities,
    GenerationEvent,
    GenerationRequest,
    ProgressCallback,
    core_share,
    draft_keys_given,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gallama_kernel.plugin import ModelSpec

log = logging.getLogger("gallama.embedding")

BATCH_SIZE = 32  # texts per forward pass; infinity-emb fills batches from all waiting requests
MATRYOSHKA_TAGS = ("matryoshka",)  # a model card tag containing this marks a Matryoshka-trained model
GENERATION_KEYS = ("cache_size", "cache_quant", "max_concurrent_requests", "tp", "stream_interval_ms")
"""``-id`` keys of text generation engines: nothing here reads them, so they are refused rather than ignored."""


def is_matryoshka(folder: Path) -> bool:
    """Whether the model card (README.md front matter) tags the model as Matryoshka-trained (for instance the
    ``loss:MatryoshkaLoss`` tag sentence-transformers writes): its embeddings may then be truncated."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    front, _, _ = text[3:].partition("\n---")
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return False
    tags = meta.get("tags") if isinstance(meta, dict) else None
    if not isinstance(tags, list):
        return False
    return any(marker in str(tag).lower() for tag in tags for marker in MATRYOSHKA_TAGS)


def _normalized(vector: Any) -> list[float]:
    values = [float(v) for v in vector]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values] if norm else values


class EmbeddingBackend(Backend):
    """A text embedding model. Chat and completions are refused by the kernel (``capabilities.chat`` is off).

    ``-id`` keys: ``model_id`` (a sentence-transformers folder, or ``package:pkg`` whose ``get_model_path()``
    gives one), ``max_seq_len`` (at most the model's position limit; default the model's ``max_seq_length``),
    ``n_threads`` (torch threads; default all usable cores). Embeddings are L2-normalized.
    """

    name = "embedding"
    # others are refused before loading; gpus is refused by load itself, saying why (this backend runs on the CPU)
    spec_keys = frozenset({"max_seq_len", "n_threads", "gpus"})

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._engine: Any = None  # infinity_emb.AsyncEmbeddingEngine
        self._counter: Any = None  # tokenizers.Tokenizer without truncation: counts what the model reads
        self._context_length = 0
        self._size = 0
        self._matryoshka = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Task[None] | None = None
        self._requests = 0
        self._texts = 0
        self._embedding = 0  # embed calls under way (they hold the core board's seat)
        self._threads = 1  # torch threads, set at load

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        spec = self.spec
        if spec.gpus:
            raise BackendError(f"model '{spec.name}': the embedding backend runs on the CPU; remove 'gpus'")
        drafting = draft_keys_given(spec, ("draft_model_id", *DRAFT_KEYS))
        if drafting:  # nothing here would read them: refused rather than ignored
            raise BackendError(f"model '{spec.name}': the embedding backend has no speculative decoding; remove "
                               f"{', '.join(repr(key) for key in drafting)}")
        unused = [key for key in GENERATION_KEYS if getattr(spec, key) is not None]
        if unused:
            raise BackendError(f"model '{spec.name}': the embedding backend has no KV cache, slots or streams; "
                               f"remove {', '.join(repr(key) for key in unused)}")
        folder = Path(spec.model_path or spec.model_id).expanduser()
        if not folder.is_dir():
            raise BackendError(f"model '{spec.name}': {folder} is not a folder; the embedding backend loads a "
                               "sentence-transformers model folder (or package:pkg with get_model_path())")
        report = progress or (lambda _fraction: None)
        os.environ["HF_HUB_OFFLINE"] = "1"  # read before huggingface_hub is imported: never reach the network
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("DO_NOT_TRACK", "1")
        AsyncEmbeddingEngine, EngineArgs = _import_infinity()
        import torch

        self._threads = spec.n_threads or core_share().cores
        torch.set_num_threads(self._threads)
        report(0.2)
        args = EngineArgs(model_name_or_path=str(folder), engine="torch", device="cpu", batch_size=BATCH_SIZE,
                          model_warmup=False, bettertransformer=False, trust_remote_code=False,
                          served_model_name=spec.name)
        try:
            engine = AsyncEmbeddingEngine.from_args(args)
        except Exception as error:  # the library raises whatever its loaders raise
            raise BackendError(f"model '{spec.name}': could not load the embedding model in {folder}: "
                               f"{type(error).__name__}: {error}") from error
        if "embed" not in engine.capabilities:
            raise BackendError(f"model '{spec.name}': {folder} is not an embedding model "
                               f"(it offers {', '.join(sorted(engine.capabilities))})")
        report(0.8)
        model = engine._model_replicas[0]  # the SentenceTransformer infinity-emb loaded
        limit = _position_limit(model)
        if spec.max_seq_len is not None:
            if limit is not None and spec.max_seq_len > limit:
                raise BackendError(f"model '{spec.name}': max_seq_len={spec.max_seq_len} exceeds the model's "
                                   f"limit of {limit} tokens")
            model.max_seq_length = spec.max_seq_len
        self._context_length = int(model.max_seq_length or limit or 512)
        self._size = int(model.get_sentence_embedding_dimension())
        self._counter = _counting_tokenizer(model.tokenizer)
        self._matryoshka = is_matryoshka(folder)
        model.encode_core(model.encode_pre(["warm up"]))  # the first forward pass is slow (~1 s): not in a request
        self._engine = engine
        report(1.0)
        log.info("%s: %d dimensions, %d tokens per text%s", spec.name, self._size, self._context_length,
                 ", Matryoshka" if self._matryoshka else "")

    def _require(self) -> Any:
        if self._engine is None:
            raise BackendError(f"model '{self.spec.name}' is not loaded")
        return self._engine

    # -- the batching loop, on the server's event loop -----------------------------------------------------
    async def _running_engine(self) -> Any:
        """The engine, started on the running loop (restarted there if it ran on a loop that has gone)."""
        engine = self._require()
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._started is None or _failed(self._started):
            self._stop_engine()
            self._loop = loop
            self._started = loop.create_task(engine.astart(), name=f"start {self.spec.name}")
        await asyncio.shield(self._started)  # a cancelled request must not cancel the start shared by others
        return engine

    def _stop_engine(self) -> None:
        """Stop infinity-emb's batching loop (what its ``astop()`` does, callable from synchronous code).

        The push task is cancelled on its own loop; the threads see the shutdown flag within half a second and
        the thread pool is joined.
        """
        engine, self._started = self._engine, None
        handler = getattr(engine, "_batch_handler", None)
        if engine is None or not engine.running or handler is None:
            return
        engine.running = False
        handler._shutdown.set()
        task = handler._push_task
        loop = task.get_loop()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is running:
            task.cancel()
        elif running is None and not loop.is_closed() and not loop.is_running():
            task.cancel()  # an idle loop (a test's, say): run it until the task has seen the cancellation
            loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the task will never run again anyway
                loop.call_soon_threadsafe(task.cancel)
        handler._threadpool.shutdown(wait=True)

    # -- embeddings ----------------------------------------------------------------------------------------
    async def embed(self, texts: list[str], *, dimensions: int | None = None) -> list[list[float]]:
        engine = await self._running_engine()
        truncate = dimensions if dimensions is not None and dimensions != self._size else None
        cores = core_share()
        self._embedding += 1
        cores.hold(id(self), self._threads)  # torch's threads count against the cores all workers share
        try:
            vectors, _ = await engine.embed(sentences=texts, matryoshka_dim=truncate)
        finally:
            self._embedding -= 1
            if not self._embedding:
                cores.release(id(self))
        self._requests += 1
        self._texts += len(texts)
        if truncate is not None:  # a shortened Matryoshka embedding is normalized again, as OpenAI does
            return [_normalized(vector) for vector in vectors]
        return [vector.tolist() for vector in vectors]

    def supports_dimensions(self, dimensions: int) -> bool:
        return dimensions == self._size or (self._matryoshka and 1 <= dimensions <= self._size)

    @property
    def embedding_size(self) -> int:
        """Values per embedding."""
        return self._size

    # -- the rest of the backend contract -----------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        raise BackendError(f"The model '{self.spec.name}' serves embeddings only; it cannot generate text.")

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokens the model reads for ``text`` (``add_special``: with its ``[CLS]``/``[SEP]``), never truncated."""
        if self._counter is None:
            raise BackendError(f"model '{self.spec.name}' is not loaded")
        return list(self._counter.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, tokens: list[int]) -> str:
        if self._counter is None:
            raise BackendError(f"model '{self.spec.name}' is not loaded")
        return str(self._counter.decode(tokens, skip_special_tokens=False))

    @property
    def context_length(self) -> int:
        """Most tokens one text may have (the model's ``max_seq_length``); longer texts are refused."""
        return self._context_length

    @property
    def vocab_size(self) -> int | None:
        return int(self._counter.get_vocab_size()) if self._counter is not None else None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(chat=False, embeddings=True, max_concurrency=BATCH_SIZE)

    def health(self) -> dict[str, object]:
        if self._engine is None:
            return {"status": "failed", "error": "not loaded"}
        return {"status": "ok", "context_length": self._context_length, "embedding_size": self._size,
                "engine_running": bool(self._engine.running), "requests": self._requests, "texts": self._texts}

    def close(self) -> None:
        """Stop the batching loop and drop the model."""
        self._stop_engine()
        self._engine = None
        self._loop = None


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


def _import_infinity() -> tuple[Any, Any]:
    """infinity-emb's engine classes. Importing it replaces the root logger's handlers with its own: they are
    put back, and its logger is quieted to warnings unless debug logging is on."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from infinity_emb import AsyncEmbeddingEngine, EngineArgs
    except ImportError as error:
        raise BackendError(f"the embedding backend needs infinity-emb and torch ({error}); install them with: "
                           "pip install torch==2.13.0 'infinity-emb[torch]==0.0.78'") from error
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logging.getLogger("infinity_emb").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    return AsyncEmbeddingEngine, EngineArgs


def _position_limit(model: Any) -> int | None:
    """Most positions the transformer has (``max_position_embeddings``), when it says."""
    with contextlib.suppress(AttributeError, IndexError, TypeError):
        value = model[0].auto_model.config.max_position_embeddings
        return int(value) if value else None
    return None


def _counting_tokenizer(tokenizer: Any) -> Any:
    """A private copy of the model's fast tokenizer with truncation and padding off: read-only afterwards, so
    several threads may count tokens at once."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BackendError("the embedding backend needs a model with a fast (tokenizer.json) tokenizer")
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    return counter
