"""An example third-party gallama plugin: ``"shout": true`` upper-cases the assistant's text, and ``POST /v1/shout``
upper-cases any text and counts its tokens with a served model's tokenizer.

It shows the two hooks a response feature needs: ``register_request_fields`` declares the field (so the server
accepts it and the OpenAPI document lists it) and ``response_transformers`` returns, once per request, an
object that rewrites the stream of deltas. The kernel calls pluggy once per request, never per token.
``register_routes`` adds the endpoint: a worker serves it, the gateway relays it to the worker serving ``model``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field

from gallama_kernel.plugin import hookimpl, served_backend


class Shout:
    """Upper-cases ``content``; every other key of a delta (tool calls, metadata) passes through."""

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(delta.get("content"), str):
            delta = {**delta, "content": delta["content"].upper()}
        return [delta]

    def finish(self) -> list[dict[str, Any]]:
        return []


@hookimpl
def register_request_fields(register: Any) -> None:
    register("shout", bool, "Upper-case the answer.")


@hookimpl
def response_transformers(request: Any) -> list[Shout] | None:
    return [Shout()] if request.extensions.get("shout") else None


class ShoutRequest(BaseModel):
    model: str = Field(description="The model whose tokenizer counts the tokens.")
    text: str = Field(max_length=100_000, description="The text to upper-case.")


class ShoutResponse(BaseModel):
    object: str = "shout"
    model: str
    text: str
    tokens: int


router = APIRouter()


@router.post("/v1/shout", response_model=ShoutResponse)
def shout(body: ShoutRequest, request: Request) -> ShoutResponse:
    """Upper-case ``text``; ``tokens`` is its length in ``model``'s tokens, the text read as plain text (a client's
    text is never read as control tokens)."""
    backend = served_backend(request.app, body.model)
    loud = body.text.upper()
    tokens = backend.tokenize_prompt([(loud, False)], add_special=False)
    return ShoutResponse(model=body.model, text=loud, tokens=len(tokens))


@hookimpl
def register_routes(app: FastAPI) -> None:
    app.include_router(router)
