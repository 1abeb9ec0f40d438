"""The thread that owns an ExLlamaV2 dynamic generator and turns its results into gallama's events.

exllamav2's generator batches jobs, pages its cache and reuses cached prompt prefixes itself, but it is not
thread-safe: ``enqueue``, ``iterate`` and ``cancel`` must come from one thread. This loop is that thread. It
enqueues new requests and cancels abandoned ones between steps, and routes each step's results:

* text goes through the kernel's :class:`StopMatcher` (stop strings are the kernel's, the same on every engine:
  the generator never sees them), then out, held back for the request's ``emit_interval_s`` except the first;
* a completed stop string, or a grammar that admits nothing more, cancels the job at once (as the llama.cpp
  engine ends it), with ``finish_reason="stop"``;
* the generator's own end: a stop token (``"stop"``; the stop token is not counted nor shown, as on llama.cpp)
  or ``max_new_tokens`` (``"length"``), with its prompt and cached-prompt counts;
* a grammar matcher error fails the request (:class:`BackendError`): never unconstrained text.

The generator is duck-typed (``enqueue``, ``iterate``, ``cancel``, ``num_remaining_jobs``), and results are the
dicts exllamav2 documents (``stage``, ``identifier``, ``text``, ``token_ids``, ``eos``, ``eos_reason``,
``new_tokens``, ``prompt_tokens``, ``cached_tokens``, ``held``, ``eos_triggering_token_id``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gallama_kernel.plugin import BackendError, Emit, GenerationEvent, GenerationRequest, StopMatcher, hold_text

from .guidance import GuidanceMask

log = logging.getLogger("gallama.exllama")


@dataclass
class Request:
    """One generation in the loop."""

    request: GenerationRequest
    emit: Emit
    mask: GuidanceMask | None = None
    cancelled: bool = False
    job: Any = None  # the exllamav2 job, once enqueued
    stops: StopMatcher = field(init=False)
    tokens: int = 0  # completion tokens so far
    held: str = ""  # text not emitted yet (see emit_interval_s)
    emitted_at: float | None = None

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.request.stop)

    @property
    def id(self) -> str:
        return self.request.request_id


class GeneratorLoop:
    """Runs ``generator`` on its own thread.

    :param make_job: builds the generator's job for a request (called on the loop thread)
    :param piece: the text a token adds when decoded without special tokens (to drop the stop token's own text)
    """

    def __init__(self, generator: Any, make_job: Callable[[Request], Any], piece: Callable[[int], str]) -> None:
        self.generator = generator
        self.make_job = make_job
        self.piece = piece
        self.inbox: list[Request] = []
        self.live: dict[str, Request] = {}
        self.wakeup = threading.Condition()
        self.running = True
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="gallama-exllama-generator", daemon=True)
        self.thread.start()

    # -- other threads -------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self.wakeup:
            self.inbox.append(request)
            self.wakeup.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.wakeup:
            self.wakeup.notify()

    def stats(self) -> dict[str, int]:
        with self.wakeup:
            return {"busy": len(self.live), "waiting": len(self.inbox), "steps": self.steps}

    def close(self) -> None:
        with self.wakeup:
            self.running = False
            self.wakeup.notify()
        self.thread.join(timeout=30)

    # -- the loop thread -----------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return not self.inbox and not any(r.cancelled for r in self.live.values()) and not self.live

    def _run(self) -> None:
        while True:
            with self.wakeup:
                while self.running and self._idle():
                    self.wakeup.wait()
                if not self.running:
                    break
                arrived, self.inbox = self.inbox, []
            for request in arrived:
                self._enqueue(request)
            for request in [r for r in self.live.values() if r.cancelled]:
                self._drop(request)
            if not self.live:
                continue
            try:
                results = self.generator.iterate()
            except Exception as error:  # the generator's state is unknown now: end everything it held
                log.exception("exllamav2 generator step failed")
                for request in list(self.live.values()):
                    self._drop(request, error)
                continue
            self.steps += 1
            for result in results:
                request = self.live.get(result.get("identifier"))
                if request is not None and result.get("stage") == "streaming":
                    self._route(request, result)
        for request in list(self.live.values()) + self.inbox:
            request.emit(RuntimeError("the model was unloaded"))

    def _enqueue(self, request: Request) -> None:
        if request.cancelled:
            return
        try:
            request.job = self.make_job(request)
            self.generator.enqueue(request.job)
        except Exception as error:  # exllamav2 asserts on jobs it cannot hold
            request.emit(BackendError(f"the generator refused the request: {error or type(error).__name__}"))
            return
        self.live[request.id] = request

    def _drop(self, request: Request, error: BaseException | None = None) -> None:
        """Take ``request`` out of the generator (its pages are freed) and of the loop."""
        self.live.pop(request.id, None)
        try:
            self.generator.cancel(request.job)
        except Exception:  # already finished inside the generator
            log.debug("cancel of %s ignored", request.id, exc_info=True)
        if error is not None:
            request.emit(error)

    def _route(self, request: Request, result: dict[str, Any]) -> None:
        mask = request.mask
        if mask is not None and mask.error is not None:
            self._drop(request, BackendError(f"grammar enforcement failed: {mask.error}"))
            return
        text = result.get("text") or ""
        if result.get("eos"):
            self._end(request, result, text)
            return
        ids = result.get("token_ids")
        request.tokens += int(ids.shape[-1]) if ids is not None else 0
        emit, stopped = request.stops.feed(text)
        request.held += emit
        if stopped or (mask is not None and mask.finished):  # a stop string, or the grammar admits nothing more
            tail = "" if stopped else request.stops.flush()
            self._drop(request)
            self._finish(request, request.held + tail, request.tokens, "stop", cached=_cached(request.job))
            return
        self._pace(request)

    def _end(self, request: Request, result: dict[str, Any], text: str) -> None:
        """The generator ended the job: a stop token or max_new_tokens."""
        self.live.pop(request.id, None)
        reason = result.get("eos_reason")
        count = int(result.get("new_tokens", request.tokens))
        if reason == "stop_token":
            count -= 1  # the stop token is not part of the completion
            held = (result.get("held") or {}).get("text") or ""
            token = result.get("eos_triggering_token_id")
            piece = self.piece(token) if isinstance(token, int) else ""
            text += held[: len(held) - len(piece)] if piece and held.endswith(piece) else held
        emit, stopped = request.stops.feed(text)
        finish = "length" if reason == "max_new_tokens" and not stopped else "stop"
        tail = "" if stopped else request.stops.flush()
        self._finish(request, request.held + emit + tail, count, finish, cached=int(result.get("cached_tokens", 0)),
                     prompt=int(result.get("prompt_tokens", len(request.request.prompt_tokens))))

    def _pace(self, request: Request) -> None:
        """Emit the held text unless the kernel's pacing holds it (see :func:`hold_text`)."""
        if not request.held:
            return
        now = time.perf_counter()
        if hold_text(request.emitted_at, request.request.emit_interval_s, now):
            return
        request.emitted_at = now
        request.emit(GenerationEvent(request.held, request.tokens))
        request.held = ""

    @staticmethod
    def _finish(request: Request, text: str, count: int, finish: str, cached: int, prompt: int | None = None) -> None:
        request.held = ""
        request.emit(GenerationEvent(text, count, finish,  # type: ignore[arg-type]
                                     prompt_tokens=prompt if prompt is not None else len(request.request.prompt_tokens),
                                     cached_tokens=cached, stop_sequence=request.stops.matched))


def _cached(job: Any) -> int:
    """Prompt tokens the generator took from its cache for ``job`` (0 when it does not say)."""
    value = getattr(job, "cached_tokens", 0)
    return value if isinstance(value, int) else 0
