"""The per-request plan that ``prepare_request`` hooks edit, and the transformer interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .constraints import Constraint

Delta = dict[str, Any]
"""A fragment of an assistant message: ``{"content": "..."}``, later also tool calls or metadata."""


class ResponseTransformer(Protocol):
    """Turns the raw delta stream of one request into the deltas clients see."""

    def feed(self, delta: Delta) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


@dataclass
class RequestPlan:
    """What will be sent to the backend, before rendering. Plugins edit it in ``prepare_request``.

    ``constraint`` is the output constraint from the request fields (``response_format``, ``tools``,
    ``regex_pattern``…); a plugin may replace it. ``constraint_after``: the model first writes free text up to
    and including this marker (for example ``</think>``), then the constraint applies.
    """

    messages: list[dict[str, Any]]
    leading_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    template_vars: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None
    constraint_after: str | None = None
