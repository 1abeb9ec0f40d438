"""Chat completions (and their chunks) as Anthropic messages (and their stream of events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from gallama_kernel.plugin import sse_event, usage_comment

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body in Anthropic's shape (the ``anthropic`` error format)."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": str(error.get("message", "error"))}}


def message_id(chat_id: str) -> str:
    return "msg_" + chat_id.removeprefix("chatcmpl-")


def stop_reason(finish: str | None, stop_sequence: str | None, client_stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a chat ``finish_reason``."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if stop_sequence is not None and stop_sequence in client_stops:
        return "stop_sequence", stop_sequence
    return "end_turn", None


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage as Anthropic's: ``input_tokens`` leaves out what was read from the cache."""
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
    return {"input_tokens": max(0, usage.get("prompt_tokens", 0) - cached), "output_tokens":
            usage.get("completion_tokens", 0), "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments or "{}")
    except ValueError:  # the tool grammar makes this valid JSON; never fail the response on it
        return {}


def message(completion: dict[str, Any], stop_sequence: str | None, client_stops: list[str]) -> dict[str, Any]:
    """A non-streamed chat completion as a Messages response."""
    choice = completion["choices"][0]
    chat = choice["message"]
    content: list[dict[str, Any]] = []
    if chat.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": chat["reasoning_content"], "signature": ""})
    if chat.get("content"):
        content.append({"type": "text", "text": chat["content"]})
    for call in chat.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": _input(call["function"]["arguments"])})
    reason, sequence = stop_reason(choice["finish_reason"], stop_sequence, client_stops)
    return {"id": message_id(completion["id"]), "type": "message", "role": "assistant",
            "model": completion["model"], "content": content, "stop_reason": reason, "stop_sequence": sequence,
            **({"output_closed": True} if choice.get("output_closed") else {}),
            "usage": anthropic_usage(completion.get("usage"))}


def event(kind: str, data: dict[str, Any]) -> bytes:
    return sse_event(kind, {"type": kind, **data})


class EventWriter:
    """Turns chat chunks into the Messages stream: one content block per kind of output (thinking, text, each
    tool use), opened when its first piece arrives and stopped when another begins."""

    def __init__(self, prepared: Any, client_stops: list[str]) -> None:
        self.prepared = prepared
        self.client_stops = client_stops
        self.index = -1
        self.open: str | None = None  # "thinking" | "text" | "tool:<n>"
        self.finish: str | None = None
        self.closed = False  # the output was closed at max_tokens (``output_closed``)

    def start(self) -> bytes:
        tokens = len(self.prepared.generation.prompt_tokens)
        body = {"id": message_id(self.prepared.id), "type": "message", "role": "assistant",
                "model": self.prepared.model.name, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": tokens, "output_tokens": 0, "cache_read_input_tokens": 0,
                          "cache_creation_input_tokens": 0}}
        return event("message_start", {"message": body}) + event("ping", {})

    def _switch(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._stop()
        self.index += 1
        self.open = kind
        return out + event("content_block_start", {"index": self.index, "content_block": block})

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return event("content_block_stop", {"index": self.index})

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open != "thinking":
                    out += self._switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out += event("content_block_delta", {"index": self.index, "delta": {
                    "type": "thinking_delta", "thinking": delta["reasoning_content"]}})
            if delta.get("content"):
                if self.open != "text":
                    out += self._switch("text", {"type": "text", "text": ""})
                out += event("content_block_delta", {"index": self.index, "delta": {
                    "type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or []:
                kind = f"tool:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self.open != kind:
                    out += self._switch(kind, {"type": "tool_use", "id": call.get("id", ""),
                                               "name": function.get("name", ""), "input": {}})
                if function.get("arguments"):
                    out += event("content_block_delta", {"index": self.index, "delta": {
                        "type": "input_json_delta", "partial_json": function["arguments"]}})
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
                self.closed = bool(choice.get("output_closed"))
        return out

    def end(self) -> bytes:
        usage = self.prepared.final_usage
        reason, sequence = stop_reason(self.finish, self.prepared.stop_sequence, self.client_stops)
        # the whole usage (the cache reads are known only now): the clients' accumulators take it over the start's
        delta = {"delta": {"stop_reason": reason, "stop_sequence": sequence,
                           **({"output_closed": True} if self.closed else {})}, "usage": anthropic_usage(usage)}
        return self._stop() + event("message_delta", delta) + event("message_stop", {})


async def stream_events(pipeline: Any, prepared: Any, client_stops: list[str]) -> AsyncIterator[bytes]:
    """The Messages stream of one prepared request; a failure after the start is an ``error`` event."""
    writer = EventWriter(prepared, client_stops)
    yield writer.start()
    chunks = pipeline.chunks(prepared)
    try:
        async for chunk in chunks:
            piece = writer.chunk(chunk)
            if piece:
                yield piece
    except Exception as error:  # headers are sent: in-band, as Anthropic does
        status = getattr(error, "status", 500)
        body = error.body() if hasattr(error, "body") else {"error": {"message": "Internal error"}}
        yield event("error", {"error": error_body(status, body)["error"]})
        return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # on disconnect too: ends the generation
    yield writer.end()
    yield usage_comment(prepared.final_usage)  # a piece of its own: the gateway reads and drops it
