"""A streamed chat completion read back the way a client accumulates it (content, tool calls, finish)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openai import OpenAI


@dataclass
class Streamed:
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments) per call index, in order
    finish: str | None = None
    closed: bool = False  # a choice said output_closed
    completion_tokens: int = 0  # from the usage chunk


def stream_chat(client: OpenAI, **body: Any) -> Streamed:
    """Send ``body`` with ``stream=True`` (usage included) and accumulate every chunk."""
    out, calls = Streamed(), {}
    for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            out.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        out.content += choice.delta.content or ""
        for part in choice.delta.tool_calls or []:
            name, arguments = calls.get(part.index, ("", ""))
            calls[part.index] = (name + (part.function.name or ""), arguments + (part.function.arguments or ""))
        out.finish = choice.finish_reason or out.finish
        out.closed = out.closed or bool((choice.model_extra or {}).get("output_closed"))
    out.calls = [calls[index] for index in sorted(calls)]
    return out
