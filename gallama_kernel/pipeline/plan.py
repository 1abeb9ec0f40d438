"""The per-request plan that ``prepare_request`` hooks edit, and the transformer interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ..backend import PromptSegment
    from .constraints import Constraint

Delta = dict[str, Any]
"""A fragment of an assistant message: ``{"content": "..."}``, ``{"tool_calls": [...]}``, or plugin keys such as
``artifact_meta``. A delta holding ``SEGMENT: True`` opens a new choice in a non-streamed response (the key
itself is never sent); streamed, every delta goes to choice 0."""

SEGMENT = "_segment"


class ResponseTransformer(Protocol):
    """Turns the raw delta stream of one request into the deltas clients see.

    ``feed`` takes one delta and returns the deltas to send instead; ``finish`` returns what is left at the end.
    A transformer may also define ``annotate(delta) -> Delta``: the kernel passes it every delta it sends by
    itself (the streamed opening ``{"role": "assistant", "content": ""}`` and the closing delta that carries
    ``finish_reason``), so metadata can be on every chunk.
    """

    def feed(self, delta: Delta) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


@dataclass
class GenerationPass:
    """A generation that runs before the answer, in the same assistant turn (for example hidden thinking).

    The pass's prompt is the plan's prompt as it stands (messages, ``leading_prompt``) followed by
    ``opening``; the model continues under ``constraint`` (``None``: free text) with ``stop`` and at most
    ``max_tokens``. Then ``done(plan, text)`` applies the result to the plan (typically it appends ``opening +
    text`` to ``plan.leading_prompt``, so the answer continues after the thinking and reuses its KV cache).
    Text ``done`` appends to ``leading_prompt`` after an earlier pass continued the prompt (``plan.continuation``)
    is moved to the end of that continuation, so the prompt keeps the passes' outputs in the order they ran.

    :param show_as: ``"hidden"``, or send ``opening`` and the pass's text to the client as ``"content"`` or
        as ``"reasoning_content"`` (streamed as generated)
    :param show_opening: with ``show_as``, whether ``opening`` is sent too (a model's reasoning marker is not)
    :param reasoning: the pass is the model's reasoning (a thinking template's, say): a model that reasons
        natively then does not reason again before the answer (see :mod:`~gallama_kernel.pipeline.reasoning`)
    :param shares_max_tokens: the pass's tokens come out of the request's ``max_tokens`` (a model's own
        reasoning), leaving the answer at least ``Prepared.answer_reserve``; otherwise ``max_tokens`` is the
        answer's alone
    """

    opening: str = ""
    constraint: Constraint | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None
    show_as: Literal["hidden", "content", "reasoning_content"] = "hidden"
    show_opening: bool = True
    shares_max_tokens: bool = False
    reasoning: bool = False
    done: Callable[[RequestPlan, str], None] | None = None


@dataclass
class RequestPlan:
    """What will be sent to the backend, before rendering. Plugins edit it in ``prepare_request``.

    ``constraint`` is the output constraint from the request fields (``response_format``, ``tools``,
    ``regex_pattern``…); a plugin may replace it. ``constraint_after``: the model first writes free text up to
    and including this marker (for example ``</think>``), then the constraint applies. ``passes`` run in order
    before the answer (see :class:`GenerationPass`); the constraint applies to the answer only.
    """

    messages: list[dict[str, Any]]
    leading_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    template_vars: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None
    constraint_after: str | None = None
    passes: list[GenerationPass] = field(default_factory=list)
    continuation: list[PromptSegment] = field(default_factory=list)
    """Prompt after ``leading_prompt``, as ``(text, trusted)`` segments: what passes appended (a reasoning
    marker is trusted markup, the model's reasoning untrusted text)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Plugins' own per-request values, keyed by plugin: set in ``prepare_request``, read in
    ``response_transformers`` (which receives the same plan)."""
