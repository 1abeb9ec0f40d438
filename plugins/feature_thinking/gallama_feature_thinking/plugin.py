"""Entry point ``thinking``: thinking templates, the model thinks by filling in an XML template before it answers.

Request fields (``extra_body`` with the OpenAI client):

``thinking_template`` (``str``)
    An XML template, e.g. ``<chain_of_thought><steps><step>{action}</step></steps></chain_of_thought>``. Not
    well-formed XML is a 400 with ``param="thinking_template"`` and the parser's message (line, column).
``return_thinking`` (``false`` | ``true`` | ``"separate"``, default ``false``)
    Where the thinking goes: ``false`` nowhere (hidden), ``true`` at the start of ``message.content`` (then a
    newline, then the answer), ``"separate"`` in ``message.reasoning_content`` (``delta.reasoning_content``
    when streamed, sent before the answer). ``true`` or ``"separate"`` without a template is a 400.

How it is served (``prepare_request``):

1. The instructions (the template, and to think by filling it in before replying) are appended to the
   **system message**, or open the conversation as one. The system message holds standing instructions, so
   the user's own words and the conversation stay as they were sent; tool instructions live there too.
2. A :class:`~gallama_kernel.pipeline.plan.GenerationPass` opens the assistant turn with the root's start tag
   (``<chain_of_thought>``) and lets the model write free text up to and including the root's end tag, and
   not one character past it (a grammar). At most :data:`DEFAULT_MAX_TOKENS` tokens
   (``GALLAMA_THINKING_MAX_TOKENS`` overrides); they count as ``completion_tokens_details.reasoning_tokens``
   and do not come out of the request's ``max_tokens``, which is the answer's budget.
3. The finished thinking block and a newline are appended to ``plan.leading_prompt`` (a pass that ran out
   of tokens is completed first: an unfinished tag at its end dropped, every open element closed). The
   answer continues the same assistant turn after the thinking (reusing its KV cache) under the request's own
   constraint: ``tools``, ``response_format``, ``regex_pattern`` … apply to the answer only, so the model
   thinks freely and then answers in the required form.

A response transformer sends what the client has not seen of the thinking block before the answer's first
delta: the end tags added to a pass that was cut short, and for ``return_thinking=true`` the newline between
the thinking and the answer (so ``content`` is the assistant turn as the model saw it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field

from gallama_kernel import hookimpl
from gallama_kernel.plugin import (
    ChatCompletionRequest,
    Delta,
    GenerationPass,
    InvalidRequest,
    RequestPlan,
    add_system_text,
)

from .template import PARAM, ThinkingTemplate, parse_template

log = logging.getLogger("gallama.thinking")

DEFAULT_MAX_TOKENS = 512
MAX_BUDGET = 32_768
"""Largest ``thinking_budget`` a request may ask for."""
"""Token budget of the thinking pass (``GALLAMA_THINKING_MAX_TOKENS`` overrides it)."""

MAX_TOKENS_ENV = "GALLAMA_THINKING_MAX_TOKENS"

ReturnThinking = bool | Literal["separate"]
ShowAs = Literal["hidden", "content", "reasoning_content"]

_STATE_KEY = "thinking"
"""Key of this plugin's per-request state in ``plan.state`` (set in ``prepare_request``, read in
``response_transformers``)."""


def thinking_max_tokens() -> int:
    """The thinking pass's budget: ``GALLAMA_THINKING_MAX_TOKENS`` when it is a positive integer, else 512."""
    value = os.environ.get(MAX_TOKENS_ENV)
    if value is None:
        return DEFAULT_MAX_TOKENS
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens <= 0:
        log.warning("%s=%r is not a positive integer; using %d", MAX_TOKENS_ENV, value, DEFAULT_MAX_TOKENS)
        return DEFAULT_MAX_TOKENS
    return tokens


def show_as(return_thinking: ReturnThinking) -> ShowAs:
    """Where the thinking is sent for a ``return_thinking`` value."""
    if return_thinking == "separate":
        return "reasoning_content"
    return "content" if return_thinking is True else "hidden"


@dataclass
class ThinkingState:
    """One request's thinking: the template, where it is shown, and what the client still has to see of it."""

    template: ThinkingTemplate
    show_as: ShowAs
    budget: int | None = None
    """Most tokens of the thinking pass (the request's ``thinking_budget``; default :func:`thinking_max_tokens`)."""
    pending: str = ""
    """Text of the thinking block that was fed to the model but not sent as the pass's output (set by
    :meth:`done`; sent by :class:`ThinkingJoiner` before the answer)."""

    def done(self, plan: RequestPlan, text: str) -> None:
        """Apply the finished pass: the closed thinking block and a newline end ``plan.leading_prompt``.

        A pass cut short by its token budget is completed by :meth:`ThinkingTemplate.close` (open elements
        closed, an unfinished tag dropped from the model's copy); the client is sent the closing tags too.
        """
        kept, suffix = self.template.close(text)
        if suffix:
            log.info("thinking pass ended before %s; closing it", self.template.closing)
        plan.leading_prompt += self.template.opening + kept + suffix + "\n"
        if self.show_as == "content":
            self.pending = suffix + "\n"
        elif self.show_as == "reasoning_content":
            self.pending = suffix

    def generation_pass(self) -> GenerationPass:
        return GenerationPass(opening=self.template.opening, constraint=self.template.constraint(),
                              max_tokens=self.budget or thinking_max_tokens(), show_as=self.show_as,
                              reasoning=True, done=self.done)


class ThinkingJoiner:
    """Response transformer: sends :attr:`ThinkingState.pending` (under the thinking's key) before the answer's
    first delta, or at the end when the answer has none; every delta passes through unchanged."""

    def __init__(self, state: ThinkingState) -> None:
        self.state = state
        self.sent = False

    def _pending(self) -> list[Delta]:
        if self.sent:
            return []
        self.sent = True
        text = self.state.pending
        return [{self.state.show_as: text}] if text else []

    def feed(self, delta: Delta) -> list[Delta]:
        return [*self._pending(), delta]

    def finish(self) -> list[Delta]:
        return self._pending()


@hookimpl
def register_request_fields(register: Callable[[str, Any, str], None]) -> None:
    register("thinking_template", str | None,
             "An XML template the model fills in to think before it answers (gallama-feature-thinking).")
    register("return_thinking", ReturnThinking,
             "Where the thinking goes: false (hidden, default), true (start of content), \"separate\" "
             "(reasoning_content).")
    register("thinking_budget", Annotated[int, Field(ge=1, le=MAX_BUDGET)] | None,
             "Most tokens the thinking pass may write (default: GALLAMA_THINKING_MAX_TOKENS or 512).")


@hookimpl
def prepare_request(request: ChatCompletionRequest, plan: RequestPlan) -> None:
    fields = request.extensions
    source = fields.get("thinking_template")
    return_thinking: ReturnThinking = fields.get("return_thinking", False)
    budget = fields.get("thinking_budget")
    if source is None:
        if return_thinking is not False:
            raise InvalidRequest("return_thinking needs a thinking_template.", param="return_thinking")
        if budget is not None:
            raise InvalidRequest("thinking_budget needs a thinking_template.", param="thinking_budget")
        return
    template = parse_template(source)
    state = ThinkingState(template, show_as(return_thinking), budget)
    plan.messages = add_system_text(plan.messages, template.instructions())
    plan.passes.append(state.generation_pass())
    plan.state[_STATE_KEY] = state


@hookimpl
def response_transformers(request: ChatCompletionRequest, plan: RequestPlan) -> list[ThinkingJoiner] | None:
    state = plan.state.get(_STATE_KEY)
    if not isinstance(state, ThinkingState) or state.show_as == "hidden":
        return None
    return [ThinkingJoiner(state)]


__all__ = ["DEFAULT_MAX_TOKENS", "PARAM", "ThinkingJoiner", "ThinkingState", "parse_template"]
