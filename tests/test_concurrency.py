"""Every concurrent request is served to completion; a client that leaves frees its slot at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


async def one_stream(async_client, index: int) -> tuple[str, str | None]:
    parts, finish = [], None
    stream = await async_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": f"Story number {index}: a lighthouse keeper."}],
        max_tokens=32, temperature=0.8, seed=index, stream=True)
    async for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish


def test_eight_concurrent_streams_all_complete(async_client, server):
    async def run_all():
        return await asyncio.gather(*(one_stream(async_client, i) for i in range(8)))

    results = asyncio.run(run_all())
    assert len(results) == 8
    for text, finish in results:
        assert text, "every stream must get content"
        assert finish in ("stop", "length")
    assert server.health()["models"]["smollm2"]["busy"] == 0


def wait_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = server.health()["models"]["smollm2"]
        if stats["busy"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.monotonic() < deadline, f"slot not freed: {stats}"
        time.sleep(0.05)


def test_disconnect_mid_stream_stops_generation(server, client):
    body = {"model": "smollm2", "messages": STORY, "max_tokens": 2000, "temperature": 0.8, "seed": 3,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.base_url}/v1/chat/completions",
                                                       json=body) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and "content" in line:
                received += 1
            if received >= 5:
                break
    stats = wait_idle(server)
    steps_after_disconnect = stats["steps"]
    time.sleep(0.5)
    assert server.health()["models"]["smollm2"]["steps"] == steps_after_disconnect, "engine still generating"
    completion = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5


def test_disconnect_of_non_stream_request_stops_generation(server):
    body = {"model": "smollm2", "messages": STORY, "max_tokens": 3000, "temperature": 0.8, "seed": 5}
    before = server.health()["models"]["smollm2"]["steps"]
    with contextlib.suppress(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=0.5)
    stats = wait_idle(server)
    assert stats["steps"] - before < 1000, "generation must stop when the client leaves"
    assert server.health()["status"] == "ok"


def test_streams_report_json_chunks_and_done(server):
    body = {"model": "smollm2", "messages": STORY, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        lines = [line for line in http.post(f"{server.base_url}/v1/chat/completions", json=body).text.splitlines()
                 if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
