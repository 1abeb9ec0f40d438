"""Anthropic's Messages API for gallama: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A protocol plugin: its routes translate each request into the kernel's chat request and serve it with the
kernel's chat pipeline (``chat_pipeline``), so tool choice, structured tool input, stop sequences, thinking,
limits, cancellation and usage behave exactly as on ``/v1/chat/completions``. ``tool_choice`` ``any`` and
``tool`` are enforced by the tool grammar: the answer is a valid ``tool_use`` every time. Errors leave in
Anthropic's shape (the ``anthropic`` error format), the gateway's own included. Keys: ``x-api-key`` or
``Authorization: Bearer``, as on every route.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from gallama_kernel.plugin import (
    EventStream,
    chat_pipeline,
    error_format,
    hookimpl,
    read_json,
    unless_disconnected,
    usage_header,
)

from .messages import error_body, message, stream_events
from .schema import CountTokensRequest, MessagesRequest, chat_body, validate

FORMAT = "anthropic"
router = APIRouter()


async def _prepare(request: Request, model: type[CountTokensRequest]) -> tuple[Any, Any, Any]:
    """The pipeline, the validated request and the prepared chat request; validation and translation run in a
    thread (a large body must not hold the event loop)."""
    pipeline = chat_pipeline(request.app)
    body = await read_json(request)

    def translate() -> tuple[Any, Any]:
        parsed = validate(model, body)
        return parsed, pipeline.validate(chat_body(parsed, pipeline.request_fields, pipeline.reasons(parsed.model)))

    parsed, chat = await asyncio.to_thread(translate)
    return pipeline, parsed, await pipeline.prepare(chat)


@router.post("/v1/messages", openapi_extra=error_format(FORMAT), summary="Create a message (Anthropic Messages API)")
async def create_message(request: Request) -> Any:
    pipeline, parsed, prepared = await _prepare(request, MessagesRequest)
    stops = list(parsed.stop_sequences or [])
    if parsed.stream:
        return EventStream(stream_events(pipeline, prepared, stops))
    completion = await unless_disconnected(request, pipeline.complete(prepared))
    return JSONResponse(message(completion, prepared.stop_sequence, stops),
                        headers=usage_header(completion.get("usage")))


@router.post("/v1/messages/count_tokens", openapi_extra=error_format(FORMAT),
             summary="Count the input tokens of a message (Anthropic Messages API)")
async def count_tokens(request: Request) -> dict[str, int]:
    _, _, prepared = await _prepare(request, CountTokensRequest)
    return {"input_tokens": len(prepared.generation.prompt_tokens)}


@hookimpl
def register_routes(app: FastAPI) -> None:
    app.include_router(router)


@hookimpl
def register_error_formats(register: Any) -> None:
    register(FORMAT, error_body)
