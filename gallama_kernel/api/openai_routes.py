"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..pipeline.embeddings import create_embeddings
from ..pipeline.service import ChatService, off_loop
from ..plugins import PluginHost
from ..protocol.errors import APIError, InvalidRequest
from ..protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, validate_request
from .documents import body_schema
from .errors import internal_error_body
from .http_input import (
    INLINE_PARSE_BYTES,
    check_content_type,
    parse_json,
    read_body,
    unless_disconnected,
)
from .streaming import EventStream

log = logging.getLogger("gallama.api")
T = TypeVar("T")
M = TypeVar("M")


async def read_request(request: Request, model: type[M], fields: Any) -> M:
    """A POST body parsed and validated into ``model`` (with the plugins' ``fields``), in a preparation thread when
    it is large (see :data:`INLINE_PARSE_BYTES`)."""
    check_content_type(request)
    raw = await read_body(request)
    if len(raw) <= INLINE_PARSE_BYTES:
        return validate_request(model, parse_json(raw), fields)
    return await off_loop(lambda: validate_request(model, parse_json(raw), fields))


def sse(chunks: AsyncIterator[dict[str, Any]],
        usage: Callable[[], dict[str, Any] | None] | None = None) -> EventStream:
    """The chunks as server-sent events, then ``[DONE]``. ``usage``: the stream's usage once it ended, written
    just before ``[DONE]`` as an SSE comment (``: usage {...}``), which clients ignore and the gateway reads
    for quotas, metrics and its log whether or not the client asked for usage."""

    def event(payload: Any) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield event(chunk)
        except APIError as error:
            yield event(error.body())
        except Exception as error:  # headers are sent: report in-band, OpenAI clients raise on it
            yield event(internal_error_body("a stream", error))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # on disconnect too: ends the generation
        report = usage() if usage is not None else None
        if report is not None:
            yield b": usage " + json.dumps(report, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return EventStream(events())


def refuse_plugin_fields(body: Any, host: PluginHost, endpoint: str) -> None:
    """A 400 for plugin fields on an endpoint whose requests run no plugin hooks (the hooks ``prepare_request``
    and ``response_transformers`` take chat requests): such a field would be accepted and do nothing."""
    for name in body.extensions:
        field = host.request_fields[name]
        raise InvalidRequest(f"'{name}' (declared by the plugin '{field.plugin}') applies to /v1/chat/completions "
                             f"only: {endpoint} runs no plugin hooks, so it would have no effect.", param=name,
                             code="unsupported_parameter")


def build_router(service: ChatService, host: PluginHost) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest, host))
    async def chat_completions(request: Request) -> Any:
        body = await read_request(request, ChatCompletionRequest, host.request_fields)
        prepared = await service.prepare_chat_async(body)
        if body.stream:
            return sse(service.chat_chunks(prepared, body.include_usage), lambda: prepared.final_usage)
        return await unless_disconnected(request, service.chat_completion(prepared))

    @router.post("/v1/completions", openapi_extra=body_schema(CompletionRequest, host))
    async def completions(request: Request) -> Any:
        body = await read_request(request, CompletionRequest, host.request_fields)
        refuse_plugin_fields(body, host, "/v1/completions")
        prepared = await service.prepare_completion_async(body)
        if body.stream:
            return sse(service.completion_chunks(prepared, body.include_usage), lambda: prepared.final_usage)
        return await unless_disconnected(request, service.completion(prepared))

    @router.post("/v1/embeddings", openapi_extra=body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> JSONResponse:
        body = await read_request(request, EmbeddingRequest, host.request_fields)
        refuse_plugin_fields(body, host, "/v1/embeddings")
        return JSONResponse(await unless_disconnected(request, create_embeddings(service.registry, body)))

    def model_card(model: Any) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": model.created, "owned_by": "gallama",
                "aliases": model.aliases}

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in service.registry.all()]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return model_card(service.registry.get(model))

    return router
