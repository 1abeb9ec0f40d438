"""OpenAI's Responses API for gallama: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A protocol plugin on the kernel's chat pipeline (``chat_pipeline``): tool choice, ``text.format`` schemas, stops,
limits, reasoning (the thinking plugin's passes), cancellation and usage behave as on ``/v1/chat/completions``.
``store`` (the default) keeps the response and the conversation it ended in SQLite under ``GALLAMA_HOME_PATH``
(store.py): ``previous_response_id`` continues it, on any model, after a restart too; ``store: false`` keeps
nothing. A stored response is visible to the key that created it only. Errors are OpenAI's shape, as on every
OpenAI route.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from gallama_kernel.plugin import (
    EventStream,
    InvalidRequest,
    caller_key,
    chat_pipeline,
    hookimpl,
    read_json,
    unless_disconnected,
    usage_comment,
    usage_header,
)

from .output import EventWriter, base_response, from_completion, new_id, stream_events
from .schema import chat_body, chat_messages, echo, items, output_messages, validate
from .store import Store

router = APIRouter()
_stores: dict[str, Store] = {}


def store() -> Store:
    """One store per process (its path is read from the settings when first used)."""
    if "default" not in _stores:
        _stores["default"] = Store()
    return _stores["default"]


class NotFound(InvalidRequest):
    status = 404


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API)")
async def create_response(request: Request) -> Any:
    pipeline = chat_pipeline(request.app)
    body = await read_json(request)
    owner = caller_key(request)

    def translate() -> tuple[Any, list[dict[str, Any]], Any]:
        parsed = validate(body)
        history: list[dict[str, Any]] = []
        if parsed.previous_response_id is not None:
            found = store().get(parsed.previous_response_id, owner)
            if found is None:
                raise InvalidRequest(f"Previous response with id '{parsed.previous_response_id}' not found.",
                                     param="previous_response_id", code="previous_response_not_found")
            history = found[1]
        history = [*history, *chat_messages(items(parsed))]
        return parsed, history, pipeline.validate(chat_body(parsed, history, pipeline.request_fields,
                                                            pipeline.reasons(parsed.model)))

    parsed, history, chat = await asyncio.to_thread(translate)
    prepared = await pipeline.prepare(chat)
    base = base_response(new_id("resp"), echo(parsed), prepared.model.name)

    async def keep(final: dict[str, Any]) -> None:
        if parsed.store:
            await asyncio.to_thread(store().put, final, [*history, *output_messages(final["output"])], owner)

    if parsed.stream:
        async def events() -> Any:
            async for piece in stream_events(pipeline.chunks(prepared), EventWriter(base),
                                             lambda: prepared.final_usage, keep):
                yield piece
            yield usage_comment(prepared.final_usage)  # a piece of its own: the gateway reads and drops it

        return EventStream(events())
    completion = await unless_disconnected(request, pipeline.complete(prepared))
    result = from_completion(base, completion)
    await keep(result)
    return JSONResponse(result, headers=usage_header(completion.get("usage")))


@router.get("/v1/responses/{response_id}", summary="Get a stored response (OpenAI Responses API)")
async def get_response(response_id: str, request: Request) -> Any:
    found = await asyncio.to_thread(store().get, response_id, caller_key(request))
    if found is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return found[0]


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response (OpenAI Responses API)")
async def delete_response(response_id: str, request: Request) -> Any:
    if not await asyncio.to_thread(store().delete, response_id, caller_key(request)):
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@hookimpl
def register_routes(app: FastAPI) -> None:
    app.include_router(router)
