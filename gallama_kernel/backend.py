"""The backend contract: what every inference engine plugin implements.

Modelled on an engine client: the kernel renders prompts, counts tokens and shapes responses; the backend owns
the engine, its memory and its scheduling, and streams :class:`GenerationEvent` objects.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from .config import ModelSpec
    from .grammar import Grammar

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One generation: prompt tokens in, text events out.

    ``stop`` strings end the generation and are never part of the emitted text; ``max_tokens`` caps the
    completion tokens (``finish_reason="length"``). With ``grammar``, every generated token keeps the output
    a prefix of the grammar's language; the generation ends (``"stop"``) when the grammar is complete and the
    model ends its turn, or when the grammar admits nothing more.
    """

    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    grammar: Grammar | None = None
    emit_interval_s: float = 0.0  # text may be held back this long and sent in one event (see Backend)


@dataclass
class GenerationEvent:
    """A piece of generated text; the last event of a stream has ``finish_reason`` set and the final counts."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # of ``completion_tokens``: written by passes before the answer
    stop_sequence: str | None = None  # the stop string that ended it (``StopMatcher.matched``), on the last event


@dataclass(frozen=True)
class Capabilities:
    """What a loaded backend can do, as the kernel reads it: a chat or completion request to a backend without
    ``chat`` is refused (400), and so is an embeddings request to one without ``embeddings``;
    ``max_concurrency`` is the number of requests it decodes at once (the gateway's slots per replica: beyond
    them requests wait in its queue). Output constraints are checked by :meth:`Backend.validate_grammar`."""

    chat: bool = True
    embeddings: bool = False
    max_concurrency: int = 1


PromptSegment = tuple[str, bool]
"""A piece of a prompt: ``(text, trusted)``. Trusted text (the chat template's own markup) may hold control
tokens; untrusted text (whatever a client or a tool sent) is never read as control tokens."""


class SegmentSplitter:
    """Cuts a segmented prompt the way a tokenizer with special-token parsing cuts text: at the control-token
    texts, here only those in trusted segments. The text in between, trusted and untrusted joined, is tokenized
    as one plain run, so a client's ``<|im_start|>`` is read as the characters it is, like any other text."""

    def __init__(self, control_texts: Iterable[str]) -> None:
        texts = sorted({t for t in control_texts if t}, key=lambda t: (-len(t), t))
        self._cut = re.compile("(" + "|".join(re.escape(t) for t in texts) + ")") if texts else None

    def pieces(self, prompt: Sequence[PromptSegment]) -> list[tuple[str, bool]]:
        """``(text, is_control)`` in order: a trusted control-token text alone, or a plain run of text."""
        out: list[tuple[str, bool]] = []
        run: list[str] = []
        for text, trusted in prompt:
            parts = self._cut.split(text) if trusted and self._cut is not None else [text]
            for index, part in enumerate(parts):
                if index % 2:
                    if run:
                        out.append(("".join(run), False))
                        run = []
                    out.append((part, True))
                elif part:
                    run.append(part)
        if run:
            out.append(("".join(run), False))
        return out


ProgressCallback = Callable[[float], None]
J = TypeVar("J")
Emit = Callable[["GenerationEvent | BaseException"], None]


def hold_text(emitted_at: float | None, interval_s: float, now: float) -> bool:
    """Whether streamed text must wait for a later event: the last one went out (at ``emitted_at``, ``None``
    for none yet) less than ``interval_s`` before ``now``. The first text of a generation is never held, and the
    final event carries whatever still is (see :attr:`Backend.stream_interval_s`)."""
    return emitted_at is not None and now - emitted_at < interval_s


async def events_from_thread(start: Callable[[Emit], None], stop: Callable[[], None]) -> AsyncIterator[GenerationEvent]:
    """The events of a generation that an engine thread runs: ``start(emit)`` hands it to the thread, which calls
    ``emit`` with each event (or an exception, raised here); the event with a ``finish_reason`` ends the
    iteration. ``stop()`` cancels the generation; it runs at the end however the consumer leaves, and from the
    engine thread when it emits after the event loop has closed (so it must be idempotent and thread-safe)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

    def emit(item: GenerationEvent | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            stop()

    start(emit)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        stop()


class ThreadJobs:
    """The generations a backend's engine thread is running, by request id: streamed with
    :func:`events_from_thread`, cancelled when the stream ends early and by :meth:`abort`."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[Any, Callable[[Any], None]]] = {}

    def events(self, request_id: str, make: Callable[[Emit], J], submit: Callable[[J], None],
               cancel: Callable[[J], None]) -> AsyncIterator[GenerationEvent]:
        """Events of the job ``make(emit)``, handed to the engine with ``submit``; ``cancel`` (thread-safe)
        stops it."""

        def start(emit: Emit) -> None:
            job = make(emit)
            self._running[request_id] = (job, cancel)
            submit(job)

        def stop() -> None:
            entry = self._running.pop(request_id, None)
            if entry is not None:
                entry[1](entry[0])

        return events_from_thread(start, stop)

    def abort(self, request_id: str) -> None:
        entry = self._running.get(request_id)
        if entry is not None:
            entry[1](entry[0])


class BackendError(RuntimeError):
    """A backend could not load or serve; the message is shown to the operator."""


class Backend(abc.ABC):
    """An inference engine serving one model.

    ``stream_interval_s``: how long a streamed response may hold generated text back to send it in one chunk.
    The kernel passes it in :attr:`GenerationRequest.emit_interval_s` for streams, and ``math.inf`` (only the
    final event carries text) when nobody reads the text before the end. A backend that honours it never holds
    the first text of a generation, and its final event carries whatever was held; one that ignores it emits as
    it likes: the text and the counts are the same either way, only the chunking differs.
    """

    name: ClassVar[str]
    spec_keys: ClassVar[frozenset[str] | None] = None
    """Which of the kernel's engine keys (``gallama_kernel.config.ENGINE_KEYS``: ``max_seq_len``, ``cache_size``,
    ``gpus``, ``n_threads`` …) this backend applies. A model spec that sets another is refused before the model
    loads, naming the valid keys. ``None``: all of them (the backend reads or refuses each itself)."""
    model_file: ClassVar[bool] = True
    """Whether ``model_id`` names a model file or folder, which the kernel finds (a path, ``package:…``, an entry of
    ``model_config.yaml``) and passes in ``spec.model_path``. ``False``: ``model_id`` is a name the backend reads
    itself (the model a remote engine serves); ``model_path`` stays ``None``."""
    options_model: ClassVar[type[BaseModel] | None] = None
    """The backend's own ``-id`` / ``model_config.yaml`` keys: a pydantic model whose fields (types, defaults,
    descriptions) the kernel validates specs against and shows in ``gallama plugins`` and errors. The validated
    values, defaults filled, are in ``self.spec.options`` (a dict); :attr:`options` gives them as the model."""
    stream_interval_s: float = 0.0

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @functools.cached_property
    def options(self) -> Any:
        """``spec.options`` as an instance of :attr:`options_model` (``None`` without one)."""
        return self.options_model.model_validate(self.spec.options) if self.options_model is not None else None

    @abc.abstractmethod
    def load(self, progress: ProgressCallback | None = None) -> None:
        """Load the model; call ``progress(fraction)`` as it goes. Raise :class:`BackendError` on failure."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Generate; closing the iterator early aborts the generation and frees its resources."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokens of ``text``; special-token text (``<|im_start|>``) is read as the special token."""

    def tokenize_plain(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokens of ``text`` read as plain text: special-token text is its characters, never a control token
        (BOS first as :meth:`tokenize` adds it). Backends that declare :attr:`control_texts` implement it."""
        raise NotImplementedError(f"The '{self.name}' backend cannot tokenize text without reading special tokens.")

    @property
    def control_texts(self) -> frozenset[str]:
        """Texts that :meth:`tokenize` reads as control tokens (``<|im_start|>``…). The kernel keeps them out of
        client text: with none declared, a backend's prompts are tokenized whole, unprotected."""
        return frozenset()

    @functools.cached_property
    def segment_splitter(self) -> SegmentSplitter:
        """A :class:`SegmentSplitter` for :attr:`control_texts` (read once, after :meth:`load`)."""
        return SegmentSplitter(self.control_texts)

    def tokenize_prompt(self, prompt: Sequence[PromptSegment], *, add_special: bool = True) -> list[int]:
        """Tokens of a segmented prompt: the control-token texts of trusted segments are control tokens, every
        other text is read plain (:meth:`tokenize_plain`), cut as :class:`SegmentSplitter` says. A prompt with
        only trusted text is :meth:`tokenize` of its text (which a backend may speed up, for example by reusing
        the tokens of a recent prompt with the same opening)."""
        if not self.control_texts or all(trusted for _, trusted in prompt):
            return self.tokenize("".join(text for text, _ in prompt), add_special=add_special)
        tokens: list[int] = []
        for index, (text, control) in enumerate(self.segment_splitter.pieces(prompt)):
            first = add_special and index == 0
            read = self.tokenize if control else self.tokenize_plain
            tokens += read(text, add_special=first)
        return tokens

    @abc.abstractmethod
    def detokenize(self, tokens: list[int]) -> str:
        """Text of ``tokens``."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one request may use."""

    @property
    def vocab_size(self) -> int | None:
        """Number of token ids, when known: prompts given as token ids are checked against it."""
        return None

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, or ``None`` (the kernel then uses ChatML)."""
        return None

    @property
    def special_tokens(self) -> dict[str, str]:
        """Texts of ``bos_token`` / ``eos_token`` for the chat template."""
        return {}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def validate_grammar(self, grammar: Grammar) -> None:
        """Check that this backend can enforce ``grammar``; raise :class:`~gallama_kernel.grammar.GrammarError`
        (a 400) when it cannot. The default refuses: a backend without a grammar engine never ignores one."""
        from .grammar import GrammarError

        raise GrammarError(f"The '{self.name}' backend cannot enforce output constraints ({grammar.description}).",
                           code="constraint_not_supported")

    def abort(self, request_id: str) -> None:  # noqa: B027 - optional for engines without queues
        """Stop a running generation as soon as possible."""

    def health(self) -> dict[str, object]:
        return {"status": "ok"}

    def close(self) -> None:  # noqa: B027 - optional
        """Release the engine."""

    # -- embeddings: backends whose capabilities say ``embeddings=True`` --------------------------------------
    async def embed(self, texts: list[str], *, dimensions: int | None = None) -> list[list[float]]:
        """One embedding per text, in order. ``dimensions`` (only when :meth:`supports_dimensions` accepted
        it) asks for vectors of that length. The kernel has checked each text against ``context_length``."""
        raise NotImplementedError(f"The '{self.name}' backend does not compute embeddings.")

    def supports_dimensions(self, dimensions: int) -> bool:
        """Whether :meth:`embed` can return vectors of ``dimensions`` values (a 400 otherwise)."""
        return False
