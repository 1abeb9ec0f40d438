"""Structured output that cannot be cut off: a constrained answer that reaches ``max_tokens`` still parses.

Every engine stops a generation at ``max_tokens``, and a JSON document or tool call stopped there is broken. The
answer's grammar knows the shortest way to finish any prefix (:class:`~gallama_kernel.grammar.closing.Closer`),
so the server keeps the answer finishable and finishes it:

* **Up front**: the shortest output the grammar allows, in tokens, must fit in ``max_tokens`` (and in the
  context); otherwise the request is a 400 naming both numbers (:func:`shortest_tokens`).
* **While it is generated** (:class:`TruncationGuard`): after each piece of text, the shortest closing of the
  text so far is known (microseconds). Text is passed on to the client only up to a point whose closing still
  fits in what is left of ``max_tokens`` (a closing of ``n`` UTF-8 bytes takes at most ``n`` tokens; a longer
  one is counted with the model's tokenizer); beyond that point it is held back. Those points are kept as
  checkpoints.
* **When the budget runs out** (``finish_reason="length"``): the latest checkpoint whose closing fits exactly
  (counted with the model's tokenizer) is where the answer ends, and its shortest closing is appended (closing
  strings, arrays and objects, writing a call's required arguments with the shortest values). Text generated
  after that checkpoint was never sent and is dropped; the tokens reported are the checkpoint's plus the
  closing's, never more than ``max_tokens``. The response keeps ``finish_reason="length"`` and says
  ``"output_closed": true`` on its choice.

Text that the client has seen is never taken back: only text up to a checkpoint that fits is sent, and the answer
ends at that checkpoint or a later one. A grammar the closer cannot read (look-arounds other than free text up
to a marker, ``%ignore`` …: see :mod:`~gallama_kernel.grammar.closing`) is not guarded: its answer may still
end cut off, with ``finish_reason="length"`` and no ``output_closed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..backend import GenerationEvent
from ..grammar import Grammar, GrammarError
from ..grammar.closing import Closer, Progress
from ..protocol.errors import InvalidRequest

log = logging.getLogger("gallama.truncation")

Count = Callable[[str], int]
"""Tokens of a text as the model would write it."""


def closer_for(grammar: Grammar | None) -> Closer | None:
    """The closer of ``grammar`` (cached), or ``None`` when there is no grammar or the closer cannot read it."""
    if grammar is None:
        return None
    try:
        return Closer.for_grammar(grammar)
    except GrammarError as error:
        log.debug("%s is not guarded against truncation: %s", grammar.description, error.message)
        return None


def shortest_tokens(closer: Closer, count: Count, *, requested: int | None, room: int, param: str) -> int:
    """Tokens of the shortest output the grammar allows; a 400 when it cannot fit in ``requested`` (the
    request's ``max_tokens``) or in ``room`` (what the context leaves)."""
    tokens = count(closer.shortest())
    if requested is not None and tokens > requested:
        raise InvalidRequest(f"The shortest output the {param} constraint allows has {tokens} tokens, more than "
                             f"max_tokens ({requested}): raise max_tokens to at least {tokens}.",
                             param="max_tokens", code="max_tokens_too_small")
    if tokens > room:
        raise InvalidRequest(f"The shortest output the {param} constraint allows has {tokens} tokens, more than "
                             f"the {room} the model's context leaves after the prompt.", param="messages",
                             code="context_length_exceeded")
    return tokens


@dataclass
class _Checkpoint:
    tokens: int  # completion tokens up to here
    end: int  # characters of output up to here
    progress: Progress  # the closer after that text


class TruncationGuard:
    """Keeps one answer finishable within ``limit`` tokens (see the module docstring).

    :param closer: the answer grammar's closer
    :param limit: the answer's ``max_tokens``
    :param count: tokens of a text (exact counts for the closing chosen at the end)
    """

    def __init__(self, closer: Closer, limit: int, count: Count) -> None:
        self.limit = limit
        self.count = count
        self.progress = closer.start()
        self.text = ""
        self.sent = 0  # characters passed on
        self.checkpoints = [_Checkpoint(0, 0, self.progress.copy())]
        self.closed = False  # whether a closing was appended
        self.viable = True

    def event(self, event: GenerationEvent) -> GenerationEvent:
        """``event`` with its text cut to what may be passed on now; the last event (``finish_reason`` set)
        carries the rest, closed when the budget ran out, and the tokens that text took."""
        self.text += event.text
        if self.viable and not self.progress.feed(event.text):  # not under the grammar: nothing to guard
            log.error("output left its grammar; not guarding it: %r", self.text[:200])
            self.viable = False
        if event.finish_reason is not None:
            return self._last(event)
        if not self.viable:
            return self._with(event, self._release(len(self.text)), event.completion_tokens)
        closing = self.progress.closing() or ""
        room = self.limit - event.completion_tokens
        if len(closing.encode()) <= room or self.count(closing) <= room:  # bytes bound tokens; else count them
            self.checkpoints = [_Checkpoint(event.completion_tokens, len(self.text), self.progress.copy())]
            return self._with(event, self._release(len(self.text)), event.completion_tokens)
        self.checkpoints.append(_Checkpoint(event.completion_tokens, len(self.text), self.progress.copy()))
        return self._with(event, "", event.completion_tokens)

    def _last(self, event: GenerationEvent) -> GenerationEvent:
        if event.finish_reason != "length" or not self.viable or self.progress.closing() == "":
            return self._with(event, self._release(len(self.text)), event.completion_tokens)
        for checkpoint in reversed(self.checkpoints):
            closing = checkpoint.progress.closing() or ""
            tokens = checkpoint.tokens + (self.count(closing) if closing else 0)
            if tokens <= self.limit or checkpoint is self.checkpoints[0]:  # the first one fits: it was sent
                self.closed = bool(closing)
                return self._with(event, self._release(checkpoint.end) + closing, tokens)
        raise AssertionError("unreachable: the first checkpoint always fits")

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    @staticmethod
    def _with(event: GenerationEvent, text: str, tokens: int) -> GenerationEvent:
        return GenerationEvent(text, tokens, event.finish_reason, prompt_tokens=event.prompt_tokens,
                               cached_tokens=event.cached_tokens, reasoning_tokens=event.reasoning_tokens,
                               stop_sequence=event.stop_sequence)
