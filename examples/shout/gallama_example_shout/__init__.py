"""An example third-party gallama plugin: ``"shout": true`` upper-cases the assistant's text.

It shows the two hooks a response feature needs: ``register_request_fields`` declares the field (so the server
accepts it and the OpenAPI document lists it) and ``response_transformers`` returns, once per request, an
object that rewrites the stream of deltas. The kernel calls pluggy once per request, never per token.
"""

from __future__ import annotations

from typing import Any

from gallama_kernel import hookimpl


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
