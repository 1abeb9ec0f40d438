"""``gallama_kernel.testing``: the helpers plugin authors test with, usable without a kernel checkout."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gallama_kernel import hookimpl
from gallama_kernel.testing import DummyBackend, RunningServer, dummy_spec, free_port, worker_app

MESSAGES = [{"role": "user", "content": "hi"}]


class Upper:
    """Response transformer: upper-cases the content of every delta."""

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**delta, "content": delta["content"].upper()}] if "content" in delta else [delta]

    def finish(self) -> list[dict[str, Any]]:
        return []


class ShoutPlugin:
    """A feature plugin: the request field ``shout`` upper-cases the answer."""

    @hookimpl
    def register_request_fields(self, register):
        register("shout", bool, "Answer in capitals.")

    @hookimpl
    def response_transformers(self, request):
        return [Upper()] if request.extensions.get("shout") else None


class Polite(DummyBackend):
    reply = "good day"


def chat(client: TestClient, **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "dummy", "messages": MESSAGES, **extra})


def test_worker_app_serves_the_dummy_through_a_plugin() -> None:
    app = worker_app([DummyBackend(dummy_spec())], {"shout": ShoutPlugin()})
    with TestClient(app) as client:
        plain = chat(client)
        assert plain.status_code == 200, plain.text
        assert plain.json()["choices"][0]["message"]["content"] == "hello"

        shouted = chat(client, shout=True)
        assert shouted.status_code == 200, shouted.text
        assert shouted.json()["choices"][0]["message"]["content"] == "HELLO"

        refused = chat(client, whisper=True)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "whisper"


def test_worker_app_without_the_plugin_refuses_its_field() -> None:
    with TestClient(worker_app([DummyBackend(dummy_spec())])) as client:
        refused = chat(client, shout=True)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "shout"


def test_worker_app_serves_each_model_under_its_names() -> None:
    models = [DummyBackend(dummy_spec()), Polite(dummy_spec("polite", aliases=["courteous"]))]
    with TestClient(worker_app(models)) as client:
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} >= {"dummy", "polite"}
        answer = client.post("/v1/chat/completions", json={"model": "courteous", "messages": MESSAGES})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "good day"
        assert client.get("/health").status_code == 200


def test_the_module_needs_no_test_dependency() -> None:
    code = ("import sys, gallama_kernel.testing; "
            "print(sorted(m for m in ('pytest', 'httpx', 'openai') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_free_port_is_a_loopback_port() -> None:
    assert 0 < free_port() < 65536


def test_running_server_with_a_bad_argument_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        RunningServer(tmp_path, "-id", "model_id=/nonexistent", timeout=60)
    assert time.monotonic() - started < 30
    assert "exited early" in str(caught.value)
    assert "/nonexistent" in str(caught.value)
