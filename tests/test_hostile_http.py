"""Hostile HTTP input against the live gateway (real workers, real model): every attack is a 4xx in OpenAI's
error shape, answered quickly, and the server keeps serving."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer

BODY_LIMIT = 200_000
BODY_TIMEOUT_S = 2
HI = [{"role": "user", "content": "Say hello."}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("hostile")
    server = RunningServer(home, "-id", "model_id=smollm2 max_concurrent_requests=2 max_seq_len=2048",
                           env={"GALLAMA_MAX_BODY_BYTES": str(BODY_LIMIT),
                                "GALLAMA_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)})
    yield server
    server.stop()


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def assert_serving(server: RunningServer) -> None:
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                       json={"model": "smollm2", "messages": HI, "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert [m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]] == ["smollm2"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/add_model", "/remove_model"])
def test_deeply_nested_json_is_a_400(hostile, path):
    body = b"[" * 100_000 + b"]" * 100_000
    error = assert_error(httpx.post(f"{hostile.base_url}{path}", content=body, headers=JSON, timeout=10), 400)
    assert error["code"] == "body_too_deep"
    assert_serving(hostile)


def test_a_lone_surrogate_is_a_400_not_a_500(hostile):
    body = b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
    error = assert_error(httpx.post(f"{hostile.base_url}/v1/chat/completions", content=body, headers=JSON), 400)
    assert error["code"] == "invalid_unicode"


def test_a_cross_site_text_plain_post_cannot_remove_a_model(hostile):
    response = httpx.post(f"{hostile.base_url}/remove_model", content=b'{"model_name": "smollm2"}',
                          headers={"content-type": "text/plain"})
    assert "text/plain" in assert_error(response, 415)["message"]
    form = httpx.post(f"{hostile.base_url}/add_model", data={"model_id": "smollm2", "model_name": "x"})
    assert_error(form, 415)
    chat = httpx.post(f"{hostile.base_url}/v1/chat/completions", headers={"content-type": "text/plain"},
                      content=json.dumps({"model": "smollm2", "messages": HI, "max_tokens": 2}))
    assert_error(chat, 415)
    assert_serving(hostile)


def test_an_oversize_body_is_a_413(hostile):
    body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}).encode()
    error = assert_error(httpx.post(f"{hostile.base_url}/v1/chat/completions", content=body, headers=JSON), 413)
    assert str(BODY_LIMIT) in error["message"]

    def chunks():  # no content-length: refused as it arrives
        for _ in range(BODY_LIMIT // 1000 + 10):
            yield b" " * 1000

    assert_error(httpx.post(f"{hostile.base_url}/v1/chat/completions", content=chunks(), headers=JSON), 413)
    assert_serving(hostile)


def test_a_body_that_never_ends_is_a_408_within_the_deadline(hostile):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=BODY_TIMEOUT_S + 10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        sock.setblocking(False)
        reply = b""
        while b"\r\n\r\n" not in reply and time.monotonic() - started < BODY_TIMEOUT_S + 10:
            with contextlib.suppress(OSError):
                sock.sendall(b"1\r\n \r\n")  # a byte at a time, never the last chunk
            time.sleep(0.3)
            with contextlib.suppress(BlockingIOError):
                reply += sock.recv(4096)
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert elapsed < BODY_TIMEOUT_S + 5
    assert_serving(hostile)


def test_add_model_refuses_paths_that_are_not_models(hostile, tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for path, problem in [("/etc/passwd", "not a GGUF file"), ("/dev/zero", "not a regular file"),
                          (str(folder), "not a regular file"), (str(fifo), "not a regular file"),
                          ("/proc/self/mem", "")]:
        started = time.monotonic()
        response = httpx.post(f"{hostile.base_url}/add_model", json={"model_id": path, "model_name": "evil"},
                              timeout=10)
        error = assert_error(response, 400)
        assert problem in error["message"] and path in error["message"]
        assert time.monotonic() - started < 5
    assert_error(httpx.post(f"{hostile.base_url}/add_model", timeout=10,
                            json={"model_id": str(folder), "backend": "embedding"}), 400)
    assert "evil" not in httpx.get(f"{hostile.base_url}/list_loaded_models").text


@pytest.mark.parametrize("name", ["bad\nname", "../../etc/x", "/abs", "with space", "a/b/c"])
def test_add_model_refuses_unsafe_names(hostile, name):
    response = httpx.post(f"{hostile.base_url}/add_model", json={"model_id": "smollm2", "model_name": name})
    assert "is refused" in assert_error(response, 400)["message"]
    aliases = httpx.post(f"{hostile.base_url}/add_model", json={"model_id": "smollm2", "model_name": "fine",
                                                               "aliases": [name]})
    assert_error(aliases, 400)


def test_a_failed_wait_is_an_error_body(hostile):
    response = httpx.post(f"{hostile.base_url}/add_model?wait=true", timeout=120,
                          json={"model_id": "smollm2", "model_name": "gpu-less", "gpus": [0, 0, 5]})
    error = assert_error(response, 422)
    assert error["code"] == "model_load_failed" and "gpus" in error["message"] and "gpu-less" in error["message"]
    assert len(error["message"]) < 2000
    httpx.post(f"{hostile.base_url}/remove_model", json={"model_name": "gpu-less"}, timeout=60).raise_for_status()
    assert_serving(hostile)


def test_health_shows_no_pids_or_ports(hostile):
    health = httpx.get(f"{hostile.base_url}/health").json()
    replica = health["models"]["smollm2"]["replicas"][0]
    assert "pid" not in replica and "port" not in replica
    assert {"state", "outstanding", "restarts"} <= set(replica)
    listed = httpx.get(f"{hostile.base_url}/list_loaded_models").json()["models"][0]["replicas"][0]
    assert listed["pid"] and listed["port"], "the admin listing keeps them"


def test_mixture_of_agents_is_limited(hostile):
    body = {"model": "smollm2", "messages": HI, "max_tokens": 2,
            "mixture_of_agents": {"agents": ["smollm2"] * 9}}
    error = assert_error(httpx.post(f"{hostile.base_url}/v1/chat/completions", json=body), 400)
    assert "8" in error["message"] and error["code"] == "too_many_agents"


def test_mixture_agents_stop_when_the_client_leaves(hostile):
    body = {"model": "smollm2", "max_tokens": 1500, "temperature": 0, "mixture_of_agents": {"agents": ["smollm2"]},
            "messages": [{"role": "user", "content": "Count from 1 to 10000, one number per line."}]}
    busy = lambda: hostile.health()["models"]["smollm2"].get("busy", 0)  # noqa: E731
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the agent generates
        httpx.post(f"{hostile.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=2))
    deadline = time.monotonic() + 5
    while busy() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy() == 0, "the agent's generation was cancelled with its client"
    steps = hostile.health()["models"]["smollm2"]["steps"]
    time.sleep(0.5)
    assert hostile.health()["models"]["smollm2"]["steps"] == steps


def test_an_oversize_header_is_refused(hostile):
    try:  # refused with a 400, or the connection reset while the head was still being sent
        status = httpx.get(f"{hostile.base_url}/health", headers={"x-junk": "a" * 200_000}).status_code
    except httpx.TransportError:
        status = 400
    assert status == 400
    assert_serving(hostile)


def test_shutdown_ends_open_streams_with_an_error_event(tmp_path: Path):
    server = RunningServer(tmp_path, "-id", "model_id=smollm2 max_seq_len=2048")
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "smollm2", "stream": True, "max_tokens": 1800, "temperature": 0,
                "regex_pattern": "(ab ){900}",  # long whatever the model would say: it outlasts the grace period
                "messages": [{"role": "user", "content": "Count from 1 to 10000, one number per line."}]}
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) >= 3:
                    started.set()

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert not reader.is_alive()
    finally:
        server.stop()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
