"""A lean ``text/event-stream`` response, shared by the workers and the gateway's relay.

Each item of the iterator is written as one body message, as soon as it is produced: no per-event task, timer
or cancel scope. Per response, one task watches for the client's disconnect (which stops the producer, and so
the generation behind it) and one sends a keep-alive comment when nothing was written for ``ping_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def sse_event(name: str, data: Any) -> bytes:
    """One named server-sent event (``event: name``, then ``data:`` with ``data`` as compact JSON), as the
    Anthropic and Responses protocols send them."""
    return f"event: {name}\ndata: ".encode() + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"
PING = b": ping\n\n"


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], status_code: int = 200, ping_s: float = 15.0,
                 ended_by: Callable[[], Awaitable[bytes]] | None = None) -> None:
        """:param ended_by: when the awaitable it returns finishes first (the server is shutting down, say), the
            stream stops and its bytes are written last (an error event and ``[DONE]``) instead of a silent cut.
        """
        self.status_code = status_code
        self.ended_by = ended_by
        self.background = None
        self.init_headers(HEADERS)  # no body attribute: no content-length
        self.events = events
        self.ping_s = ping_s
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method", "").upper() == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await self._close_events()
            return
        loop = asyncio.get_running_loop()
        self.last_write = loop.time()
        producer = asyncio.ensure_future(self._produce(send))
        watchers = [asyncio.ensure_future(self._watch_disconnect(receive)),
                    asyncio.ensure_future(self._ping(send, loop))]
        ending = asyncio.ensure_future(self.ended_by()) if self.ended_by is not None else None
        last = b""
        try:
            await asyncio.wait({producer, watchers[0], *([ending] if ending else [])},
                               return_when=asyncio.FIRST_COMPLETED)
            if ending is not None and ending.done() and not producer.done() and not self.disconnected:
                last = ending.result()
        finally:
            for task in (producer, *watchers, *([ending] if ending else [])):
                task.cancel()
            await asyncio.gather(producer, *watchers, *([ending] if ending else []), return_exceptions=True)
            await self._close_events()
        if last:  # ended from outside: the closing words, then the end of the body
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": last, "more_body": False})
            return
        if self.disconnected or producer.cancelled():
            return
        error = producer.exception()
        if isinstance(error, OSError):  # the client left while an event was being written: nobody to tell
            return
        if error is not None:
            raise error
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _produce(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        async for data in self.events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
            self.last_write = loop.time()

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True

    async def _ping(self, send: Send, loop: Any) -> None:
        while True:
            await asyncio.sleep(max(self.ping_s - (loop.time() - self.last_write), 0.05))
            if loop.time() - self.last_write >= self.ping_s:
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                self.last_write = loop.time()

    async def _close_events(self) -> None:
        close = getattr(self.events, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
