"""EventStream, the event-stream response of workers and gateway, driven through its ASGI interface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gallama_kernel.api.streaming import PING, EventStream


def drive(response: EventStream, disconnect_after: int | None = None, method: str = "POST") -> list[dict[str, Any]]:
    """Run ``response``; the client disconnects once ``disconnect_after`` body messages were sent."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            if disconnect_after is not None and len(bodies) >= disconnect_after:
                gone.set()

        await response({"type": "http", "method": method}, receive, send)

    asyncio.run(main())
    return sent


async def endless(cleaned: list[bool]) -> AsyncIterator[bytes]:
    """Events until closed; ``cleaned`` records that its cleanup ran."""
    try:
        while True:
            yield b"data: x\n\n"
            await asyncio.sleep(0.01)
    finally:
        cleaned.append(True)


def test_each_event_is_one_body_message_then_the_end():
    async def events() -> AsyncIterator[bytes]:
        for n in range(3):
            yield b"data: %d\n\n" % n

    sent = drive(EventStream(events()))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream") and b"content-length" not in headers
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 0\n\n", True), (b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"", False)]


def test_a_disconnect_stops_the_producer_and_runs_its_cleanup():
    cleaned: list[bool] = []

    sent = drive(EventStream(endless(cleaned)), disconnect_after=3)
    assert cleaned == [True]
    assert all(m.get("more_body", True) for m in sent)  # nothing more is sent to a client that left


def test_an_idle_stream_sends_keep_alive_comments():
    async def slow() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.35)
        yield b"data: late\n\n"

    bodies = [m["body"] for m in drive(EventStream(slow(), ping_s=0.1)) if m["type"] == "http.response.body"]
    assert bodies.count(PING) >= 2 and bodies[-2:] == [b"data: late\n\n", b""]


def test_head_sends_no_events():
    async def events() -> AsyncIterator[bytes]:
        yield b"data: x\n\n"

    sent = drive(EventStream(events()), method="HEAD")
    assert [m.get("body") for m in sent[1:]] == [b""]


def test_a_write_to_a_client_that_left_ends_the_stream_quietly():
    cleaned: list[bool] = []

    async def main() -> None:
        sent = 0

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # the disconnect is only seen by the failing write
            return {}

        async def send(message: dict[str, Any]) -> None:
            nonlocal sent
            sent += 1
            if sent > 3:
                raise OSError("client disconnected")

        await EventStream(endless(cleaned))({"type": "http", "method": "POST"}, receive, send)

    asyncio.run(main())
    assert cleaned == [True]
