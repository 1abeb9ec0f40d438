"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..pipeline.embeddings import create_embeddings
from ..pipeline.service import ChatService
from ..plugins import PluginHost
from ..protocol.errors import APIError, InvalidRequest, error_body
from ..protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, validate_request
from .streaming import EventStream

log = logging.getLogger("gallama.api")


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error}") from None


async def unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run ``work``; cancel it (which aborts its generation) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the generation unwind
    if task.cancelled():
        raise ClientDisconnected("The client disconnected before the response was ready.")
    return task.result()


class ClientDisconnected(APIError):
    """Nobody is left to read the response; the status is only logged."""

    status = 499
    type = "client_disconnected"


def sse(chunks: AsyncIterator[dict[str, Any]]) -> EventStream:
    def event(payload: Any) -> bytes:
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield event(chunk)
        except APIError as error:
            yield event(error.body())
        except Exception as error:  # headers are sent: report in-band, OpenAI clients raise on it
            log.exception("stream failed")
            yield event(error_body(f"{type(error).__name__}: {error}", "server_error"))
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # on disconnect too: ends the generation
        yield b"data: [DONE]\n\n"

    return EventStream(events())


def build_router(service: ChatService, host: PluginHost) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest, host))
    async def chat_completions(request: Request) -> Any:
        body = validate_request(ChatCompletionRequest, await read_json(request), host.request_fields)
        prepared = service.prepare_chat(body)
        if body.stream:
            return sse(service.chat_chunks(prepared, body.include_usage))
        return await unless_disconnected(request, service.chat_completion(prepared))

    @router.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest, host))
    async def completions(request: Request) -> Any:
        body = validate_request(CompletionRequest, await read_json(request), host.request_fields)
        prepared = service.prepare_completion(body)
        if body.stream:
            return sse(service.completion_chunks(prepared, body.include_usage))
        return await unless_disconnected(request, service.completion(prepared))

    @router.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> JSONResponse:
        body = validate_request(EmbeddingRequest, await read_json(request), {})
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


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def _body_schema(model: Any, host: PluginHost | None = None) -> dict[str, Any]:
    """The request schema for the OpenAPI document, with the fields plugins declared (given ``host``)."""
    schema = model.model_json_schema()
    schema = _inline_refs(schema, schema.pop("$defs", {}))
    for field in host.request_fields.values() if host is not None else ():
        schema.setdefault("properties", {})[field.name] = {"description": f"{field.description} ({field.plugin})"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
