"""The per-request plan that ``prepare_request`` hooks edit, and the transformer interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Delta = dict[str, Any]
"""A fragment of an assistant message: ``{"content": "..."}``, later also tool calls or metadata."""


class ResponseTransformer(Protocol):
    """Turns the raw delta stream of one request into the deltas clients see."""

    def feed(self, delta: Delta) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


@dataclass
class RequestPlan:
    """What will be sent to the backend, before rendering. Plugins edit it in ``prepare_request``."""

    messages: list[dict[str, Any]]
    leading_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    template_vars: dict[str, Any] = field(default_factory=dict)
