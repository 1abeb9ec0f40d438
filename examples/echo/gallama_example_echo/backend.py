"""The ``echo`` backend (see the package docstring)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from gallama_kernel.plugin import (
    Backend,
    BackendError,
    GenerationEvent,
    GenerationRequest,
    ProgressCallback,
    StopMatcher,
    hold_text,
)

CONTROL = {"<|im_start|>": 256, "<|im_end|>": 257}
"""ChatML's markers (the kernel's default chat template) and their token ids; bytes are 0-255."""
TEXT_OF = {token: text for text, token in CONTROL.items()}
USER_TURN = [CONTROL["<|im_start|>"], *b"user\n"]


class EchoOptions(BaseModel):
    """The echo backend's own model keys (``-id "… prefix='you said: '"``)."""

    prefix: str = Field(default="", max_length=200, description="Text put before the echoed message.")
    upper: bool = Field(default=False, description="Echo in upper case.")
    delay_ms: int = Field(default=0, ge=0, le=1000, description="Pause after each generated token, in ms.")


class EchoBackend(Backend):
    """Answers with ``prefix`` + the last user message of the prompt, one byte-token at a time."""

    name = "echo"
    spec_keys = frozenset({"max_seq_len", "stream_interval_ms"})
    options_model = EchoOptions

    def load(self, progress: ProgressCallback | None = None) -> None:
        self._context_length = self.spec.max_seq_len or 4096
        if self._context_length < 16:
            raise BackendError(f"max_seq_len={self._context_length} is too small for the echo backend (16 or more)")
        self.stream_interval_s = (self.spec.stream_interval_ms or 0) / 1000
        if progress is not None:
            progress(1.0)

    # -- tokens: UTF-8 bytes, and two control tokens -------------------------------------------------------------
    @property
    def control_texts(self) -> frozenset[str]:
        return frozenset(CONTROL)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        tokens: list[int] = []
        for piece, control in self.segment_splitter.pieces([(text, True)]):
            tokens += [CONTROL[piece]] if control else list(piece.encode())
        return tokens

    def tokenize_plain(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(text.encode())

    def detokenize(self, tokens: list[int]) -> str:
        out, run = [], bytearray()
        for token in tokens:
            if token in TEXT_OF:
                out.append(run.decode(errors="replace") + TEXT_OF[token])
                run.clear()
            else:
                run.append(token)
        return "".join(out) + run.decode(errors="replace")

    @property
    def context_length(self) -> int:
        return self._context_length

    # -- generation --------------------------------------------------------------------------------------------
    def answer(self, prompt_tokens: list[int]) -> str:
        """What the echo says to a prompt: the prefix and the last user message. The turn is found by its control
        tokens, never by text, so a user who types ``<|im_end|>`` is echoed whole."""
        start = max((i for i in range(len(prompt_tokens)) if prompt_tokens[i:i + len(USER_TURN)] == USER_TURN),
                    default=None)
        said_tokens = prompt_tokens if start is None else prompt_tokens[start + len(USER_TURN):]
        end = CONTROL["<|im_end|>"]
        said = self.detokenize(said_tokens[:said_tokens.index(end)] if end in said_tokens else said_tokens)
        options: EchoOptions = self.options
        return options.prefix + (said.upper() if options.upper else said)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        options: EchoOptions = self.options
        answer = self.answer(request.prompt_tokens).encode()
        stops = StopMatcher(request.stop)
        held, emitted_at, count, finish = "", None, 0, "stop"
        decoder = _Utf8()
        for byte in answer:
            if count == request.max_tokens:
                finish = "length"
                break
            count += 1
            text, stopped = stops.feed(decoder.feed(byte))
            held += text
            if stopped:
                break
            now = time.monotonic()
            if held and not hold_text(emitted_at, request.emit_interval_s, now):
                yield GenerationEvent(held, count)
                held, emitted_at = "", now
            await asyncio.sleep(options.delay_ms / 1000)  # also where a cancelled stream stops
        else:
            held += stops.flush()
        yield GenerationEvent(held, count, finish_reason=finish, prompt_tokens=len(request.prompt_tokens),
                              stop_sequence=stops.matched)


class _Utf8:
    """Bytes in, whole characters out: a character split over tokens is emitted once complete."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, byte: int) -> str:
        self._pending.append(byte)
        try:
            text = self._pending.decode()
        except UnicodeDecodeError:
            return "" if len(self._pending) < 4 else self._flush_invalid()
        self._pending.clear()
        return text

    def _flush_invalid(self) -> str:
        text = self._pending.decode(errors="replace")
        self._pending.clear()
        return text
