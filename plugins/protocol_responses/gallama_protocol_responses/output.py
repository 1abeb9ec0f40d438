"""Chat completions (and their chunks) as Responses objects (and their stream of typed events)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gallama_kernel.plugin import sse_event


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens", 0),
            "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0)},
            "output_tokens": usage.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": (usage.get("completion_tokens_details") or {}).get(
                "reasoning_tokens", 0)},
            "total_tokens": usage.get("total_tokens", 0)}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def finished(finish: str | None, closed: bool = False) -> tuple[str, dict[str, Any] | None]:
    """``status`` and ``incomplete_details`` for a chat ``finish_reason``; ``closed``: the output reached the
    budget and was closed with its grammar's shortest ending (``"output_closed": true`` in the details)."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens", **({"output_closed": True} if closed else {})}
    return "completed", None


def response(base: dict[str, Any], output: list[dict[str, Any]], status: str, details: dict[str, Any] | None,
             usage: dict[str, Any] | None) -> dict[str, Any]:
    return {**base, "status": status, "incomplete_details": details, "output": output,
            "usage": responses_usage(usage) if usage is not None else None, "error": None}


def base_response(response_id: str, echo: dict[str, Any], model: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": int(time.time()), **echo, "model": model,
            "output": [], "status": "in_progress", "incomplete_details": None, "usage": None, "error": None}


def from_completion(base: dict[str, Any], completion: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat completion as a Response."""
    choice = completion["choices"][0]
    chat = choice["message"]
    output: list[dict[str, Any]] = []
    if chat.get("reasoning_content"):
        output.append(reasoning_item(new_id("rs"), chat["reasoning_content"]))
    if chat.get("content") or not chat.get("tool_calls"):
        output.append(message_item(new_id("msg"), chat.get("content") or ""))
    for call in chat.get("tool_calls") or []:
        output.append(call_item(new_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    status, details = finished(choice["finish_reason"], bool(choice.get("output_closed")))
    return response(base, output, status, details, completion.get("usage"))


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return sse_event(kind, {"type": kind, **data})


class EventWriter:
    """Chat chunks in, Responses events out: an output item per kind of output (reasoning, the message, each
    function call), added when its first piece arrives and done when another begins; every event numbered."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = base
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: str | None = None
        self.text = ""
        self.finish: str | None = None
        self.closed = False  # the output was closed at max_output_tokens (``output_closed``)

    def emit(self, kind: str, data: dict[str, Any]) -> bytes:
        piece = sse(kind, {**data, "sequence_number": self.sequence})
        self.sequence += 1
        return piece

    def start(self) -> bytes:
        return (self.emit("response.created", {"response": self.base}) +
                self.emit("response.in_progress", {"response": self.base}))

    @property
    def item(self) -> dict[str, Any]:
        return self.output[-1]

    def _add(self, key: str, item: dict[str, Any]) -> bytes:
        out = self._done()
        self.open, self.text = key, ""
        self.output.append(item)
        out += self.emit("response.output_item.added", {"output_index": len(self.output) - 1, "item": item})
        if item["type"] == "message":
            out += self.emit("response.content_part.added", {
                "item_id": item["id"], "output_index": len(self.output) - 1, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        return out

    def _done(self) -> bytes:
        if self.open is None:
            return b""
        index, item, out = len(self.output) - 1, self.item, b""
        if item["type"] == "message":
            item.update(message_item(item["id"], self.text))
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out += self.emit("response.output_text.done", {**where, "text": self.text, "logprobs": []})
            out += self.emit("response.content_part.done", {**where, "part": item["content"][0]})
        elif item["type"] == "reasoning":
            item.update(reasoning_item(item["id"], self.text))
            out += self.emit("response.reasoning_text.done", {"item_id": item["id"], "output_index": index,
                                                             "content_index": 0, "text": self.text})
        else:
            item.update(status="completed", arguments=self.text)
            out += self.emit("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"], "arguments": self.text})
        self.open = None
        return out + self.emit("response.output_item.done", {"output_index": index, "item": item})

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b""
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self.open != "reasoning":
                    out += self._add("reasoning", {**reasoning_item(new_id("rs"), "", "in_progress"), "content": []})
                self.text += delta["reasoning_content"]
                out += self.emit("response.reasoning_text.delta", {
                    "item_id": self.item["id"], "output_index": len(self.output) - 1, "content_index": 0,
                    "delta": delta["reasoning_content"]})
            if delta.get("content"):
                if self.open != "message":
                    out += self._add("message", message_item(new_id("msg"), "", "in_progress"))
                self.text += delta["content"]
                out += self.emit("response.output_text.delta", {
                    "item_id": self.item["id"], "output_index": len(self.output) - 1, "content_index": 0,
                    "delta": delta["content"], "logprobs": []})
            for call in delta.get("tool_calls") or []:
                key = f"call:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self.open != key:
                    out += self._add(key, call_item(new_id("fc"), call.get("id", ""), function.get("name", ""), "",
                                                    "in_progress"))
                if function.get("arguments"):
                    self.text += function["arguments"]
                    out += self.emit("response.function_call_arguments.delta", {
                        "item_id": self.item["id"], "output_index": len(self.output) - 1,
                        "delta": function["arguments"]})
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
                self.closed = bool(choice.get("output_closed"))
        return out

    def end(self, usage: dict[str, Any] | None) -> tuple[bytes, dict[str, Any]]:
        out = self._done()
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            out += self._add("message", message_item(new_id("msg"), "", "in_progress")) + self._done()
        status, details = finished(self.finish, self.closed)
        final = response(self.base, self.output, status, details, usage)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self.emit(kind, {"response": final}), final


async def stream_events(chunks: AsyncIterator[dict[str, Any]], writer: EventWriter, usage: Callable[[], Any],
                        on_done: Callable[[dict[str, Any]], Awaitable[None]]) -> AsyncIterator[bytes]:
    """The Responses stream; a failure after the start is an ``error`` event then ``response.failed``."""
    yield writer.start()
    try:
        async for chunk in chunks:
            piece = writer.chunk(chunk)
            if piece:
                yield piece
    except Exception as error:  # headers are sent: in-band
        body = error.body()["error"] if hasattr(error, "body") else {"message": "Internal error",
                                                                   "code": "internal_error"}
        yield writer.emit("error", {"code": body.get("code"), "message": body.get("message"),
                                    "param": body.get("param")})
        failed = {**writer.base, "status": "failed", "output": writer.output,
                  "error": {"code": body.get("code") or "server_error", "message": body.get("message")}}
        yield writer.emit("response.failed", {"response": failed})
        return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # on disconnect too: ends the generation
    piece, final = writer.end(usage())
    await on_done(final)  # stored before the client hears it is complete: a next turn can continue from it
    yield piece
