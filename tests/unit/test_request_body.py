"""Hostile request bodies: ``read_json``'s limits (content type, size, time, nesting, unicode), the 500 handler,
the model-path and model-name checks of ``/add_model``, and a stream ended from outside (server shutdown)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.requests import Request as StarletteRequest

from gallama_kernel.api.errors import install_error_handlers
from gallama_kernel.api.http_input import RequestTimeout, parse_json, read_body, read_json
from gallama_kernel.api.streaming import EventStream
from gallama_kernel.config import ConfigError, check_model_path, check_served_name
from gallama_kernel.protocol.errors import InvalidRequest
from gallama_kernel.protocol.limits import MAX_JSON_DEPTH

SMALL_LIMIT = 1000


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return {"body": await read_json(request)}

    @app.post("/small")
    async def small(request: Request) -> Any:
        return {"size": len(await read_body(request, max_bytes=SMALL_LIMIT))}

    @app.post("/boom")
    async def boom(_: Request) -> Any:
        raise RuntimeError("secret detail /home/user/.ssh/id_rsa")

    return TestClient(app, raise_server_exceptions=False)


def post(client: TestClient, path: str, content: bytes | Any, content_type: str | None = "application/json"):
    headers = {"content-type": content_type} if content_type is not None else {}
    return client.post(path, content=content, headers=headers)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deep_nesting_is_a_400_naming_the_limit(client: TestClient, depth: int) -> None:
    error = error_of(post(client, "/echo", nested(depth)), 400)
    assert error["code"] == "body_too_deep"
    assert str(MAX_JSON_DEPTH) in error["message"]


def test_nesting_up_to_the_limit_is_accepted(client: TestClient) -> None:
    assert post(client, "/echo", nested(MAX_JSON_DEPTH)).status_code == 200
    # brackets inside strings do not count
    body = json.dumps({"text": "[" * 10_000, "list": [[1]] * 50}).encode()
    assert post(client, "/echo", body).json()["body"]["text"] == "[" * 10_000


def test_an_unterminated_string_after_many_brackets_is_plain_invalid_json() -> None:
    raw = b"[" * 50 + b"]" * 60 + b'"' + b'\\"' * 200_000  # a scan restarting at each quote would be quadratic
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json(raw)


@pytest.mark.parametrize("raw", [b'{"a": "\\ud800"}', b'["\\udfff x"]', b'{"\\ud83d": 1}'])
def test_a_lone_surrogate_is_a_400(client: TestClient, raw: bytes) -> None:
    error = error_of(post(client, "/echo", raw), 400)
    assert error["code"] == "invalid_unicode"
    assert "unicode escape" in error["message"]


def test_surrogate_pairs_and_escaped_backslashes_are_fine(client: TestClient) -> None:
    response = post(client, "/echo", b'["\\ud83d\\ude00", "\\\\ud800"]')
    assert response.json()["body"] == ["\U0001f600", "\\ud800"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/jsonx", None])
def test_only_json_is_accepted(client: TestClient, content_type: str | None) -> None:
    error = error_of(post(client, "/echo", b"{}", content_type), 415)
    assert "application/json" in error["message"]
    assert (content_type or "none") in error["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_parameters_is_accepted(client: TestClient, content_type: str) -> None:
    assert post(client, "/echo", b'{"a": 1}', content_type).json() == {"body": {"a": 1}}


def test_a_declared_oversize_body_is_a_413(client: TestClient) -> None:
    error = error_of(post(client, "/small", b"x" * (SMALL_LIMIT + 1)), 413)
    assert str(SMALL_LIMIT) in error["message"]
    assert post(client, "/small", b"x" * SMALL_LIMIT).json() == {"size": SMALL_LIMIT}


def test_a_chunked_oversize_body_is_a_413_as_it_arrives(client: TestClient) -> None:
    def chunks():
        for _ in range(50):
            yield b"x" * 100

    response = post(client, "/small", chunks())
    error_of(response, 413)
    assert response.headers["connection"] == "close"


def test_a_body_that_never_ends_is_a_408() -> None:
    async def scenario() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.05)
            return {"type": "http.request", "body": b" ", "more_body": True}

        request = StarletteRequest({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        started = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimeout, match=r"0\.3 s"):
            await read_body(request, timeout_s=0.3)
        assert asyncio.get_running_loop().time() - started < 2

    asyncio.run(scenario())


def test_a_500_says_nothing_of_the_exception(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gallama.api"):
        response = client.post("/boom")
    error = error_of(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text and "ssh" not in response.text
    incident = error["message"].split("incident ")[1].split(";")[0]
    assert len(incident) == 12
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback stays in the log


def test_model_paths_a_backend_cannot_load_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    for path, message in [("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                          (str(tmp_path), "not a regular file"), (str(text), "not a GGUF file"),
                          ("/etc/passwd", "not a GGUF file"), (str(tmp_path / "none"), "cannot be opened")]:
        with pytest.raises(ConfigError, match=message):
            check_model_path(path, "llama_cpp")
    good = tmp_path / "good.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    check_model_path(str(good), "llama_cpp")
    with pytest.raises(ConfigError, match="not a folder"):
        check_model_path(str(good), "exllama")
    with pytest.raises(ConfigError, match=r"lacks config\.json, \*\.safetensors"):
        check_model_path(str(tmp_path), "exllama")
    with pytest.raises(ConfigError, match=r"lacks config\.json"):
        check_model_path(str(tmp_path), "embedding")
    check_model_path(str(fifo), "someone_elses_backend")  # third-party backends check their own paths


@pytest.mark.parametrize("name", ["a\nb", "../etc", "a/../b", "/abs", "a b", "a/b/c", ".hidden", "", "a\x00",
                                  "x" * 101])
def test_unsafe_model_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="is refused"):
        check_served_name(name)


@pytest.mark.parametrize("name", ["smollm2", "Alibaba-NLP/gte-large-en-v1.5", "qwen-2-72B", "a.b_c"])
def test_plain_and_org_slash_names_are_accepted(name: str) -> None:
    assert check_served_name(name) == name


def test_a_stream_ended_from_outside_closes_with_its_last_words() -> None:
    async def scenario() -> list[dict[str, Any]]:
        async def endless():
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0.01)

        async def ended_by() -> bytes:
            await asyncio.sleep(0.1)
            return b'data: {"error": {}}\n\ndata: [DONE]\n\n'

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        stream = EventStream(endless(), ended_by=ended_by)
        await asyncio.wait_for(stream({"type": "http", "method": "GET"}, receive, send), 5)
        return sent

    sent = asyncio.run(scenario())
    assert sent[-1] == {"type": "http.response.body", "body": b'data: {"error": {}}\n\ndata: [DONE]\n\n',
                        "more_body": False}
    assert len(sent) > 3
