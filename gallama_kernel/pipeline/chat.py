"""The chat pipeline as protocol plugins use it: :class:`ChatPipeline`.

A plugin that speaks another protocol (Anthropic Messages, OpenAI Responses) translates its request into an
OpenAI chat request body, lets the kernel serve it — the plugins' hooks, prompt rendering, tools and their grammar,
output constraints, stop strings, passes before the answer, limits, cancellation and usage, exactly as on
``/v1/chat/completions`` — and translates the chat completion (or its chunks) back. Nothing is implemented twice,
so every protocol has the same semantics: what one enforces or refuses, all do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..config import Settings
from ..protocol.errors import ModelNotFound, ServiceUnavailable
from ..protocol.openai import ChatCompletionRequest, validate_request
from .service import ChatService, Prepared, off_loop


class ChatPipeline:
    """The worker's chat pipeline; get it in a route with :func:`chat_pipeline`.

    The :class:`Prepared` request it hands back is opaque but for: ``id``, ``created``, ``model.name``,
    ``generation.prompt_tokens`` (the prompt as the model reads it), ``final_usage`` (once a stream ended) and
    ``stop_sequence`` (the stop string that ended the answer, once it finished; ``None`` when the model ended its
    turn or ran out of tokens).
    """

    def __init__(self, service: ChatService) -> None:
        self._service = service

    @property
    def request_fields(self) -> dict[str, Any]:
        """The request fields plugins declared, by name (a protocol may map its own options onto them)."""
        return self._service.host.request_fields

    def reasons(self, model: str) -> bool:
        """Whether ``model`` (a name or alias served here) reasons natively: then ``reasoning_effort``,
        ``reasoning_budget`` and ``include_reasoning`` steer its reasoning (a model not served here: False, and
        the request fails later with the usual 404)."""
        try:
            return self._service.registry.get(model).reasoning is not None
        except ModelNotFound:
            return False

    def validate(self, body: dict[str, Any]) -> ChatCompletionRequest:
        """An OpenAI chat request body validated as ``/v1/chat/completions`` validates it (plugin fields
        included); :class:`~gallama_kernel.protocol.errors.InvalidRequest` names the first bad field. Call it off
        the event loop for large bodies (it is blocking work)."""
        return validate_request(ChatCompletionRequest, body, self._service.host.request_fields)

    async def prepare(self, request: ChatCompletionRequest) -> Prepared:
        """Run the plugins' hooks, render and tokenize the prompt, compile its constraint: in a preparation thread,
        within the preparation budget (a 400 past it)."""
        return await off_loop(lambda: self._service.prepare_chat(request))

    async def complete(self, prepared: Prepared) -> dict[str, Any]:
        """Generate the whole answer: a ``chat.completion`` body (choices, tool calls, ``usage``)."""
        return await self._service.chat_completion(prepared)

    def chunks(self, prepared: Prepared) -> AsyncIterator[dict[str, Any]]:
        """Stream the answer: ``chat.completion.chunk`` bodies as generated, the last one with empty ``choices``
        and the ``usage``. Closing the iterator early (a client that went away) ends the generation and frees its
        slot. A failure after the first chunk is raised from the iterator."""
        return self._service.chat_chunks(prepared, include_usage=True)


CALLER_HEADER = "x-gallama-key-id"
"""Request header the gateway sets on a relayed plugin route: the id of the key that called (empty without keys).
Workers take requests from the gateway only (its per-run secret), so the value is the gateway's own."""


def caller_key(request: Any) -> str:
    """The id of the key that called a plugin route (``""`` when no keys are configured): what a plugin that keeps
    things per caller (stored responses) files them under."""
    return str(request.headers.get(CALLER_HEADER, ""))


def gallama_home() -> Path:
    """``GALLAMA_HOME_PATH``: where a plugin keeps its files."""
    return Settings().home


USAGE_HEADER = "x-gallama-usage"
"""Response header of a worker that reports a non-streamed response's usage (OpenAI's shape) to the gateway, for
its quotas, metrics and log; the gateway does not relay it."""


def usage_header(usage: dict[str, Any] | None) -> dict[str, str]:
    """Headers that report ``usage`` (OpenAI's shape, as :meth:`ChatPipeline.complete` gives it) to the gateway:
    a protocol plugin sets them on a non-streamed response whose own usage has another shape."""
    return {USAGE_HEADER: json.dumps(usage, separators=(",", ":"))} if usage else {}


def usage_comment(usage: dict[str, Any] | None) -> bytes:
    """The SSE comment that reports a stream's ``usage`` to the gateway (``prepared.final_usage``); a protocol
    plugin yields it, as an item of its own, once its stream has ended. Clients ignore comments; the gateway
    reads it and does not relay it."""
    return b": usage " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n" if usage else b""


def chat_pipeline(app: Any) -> ChatPipeline:
    """The chat pipeline of the worker app ``app`` (a plugin route's ``request.app``)."""
    pipeline = getattr(app.state, "chat_pipeline", None)
    if not isinstance(pipeline, ChatPipeline):
        raise ServiceUnavailable("This process serves no models (a plugin route reached the gateway itself).",
                                 code="no_pipeline")
    return pipeline
