"""The example third-party backend (examples/echo), installed like any other package, through the real server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai import BadRequestError, OpenAI

from gallama_example_echo import EchoBackend
from gallama_kernel.config import ModelSpec
from gallama_kernel.testing import GALLAMA, RunningServer, worker_app

ECHO = "model_id=package:gallama_example_echo backend=echo model_name=echo"


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with RunningServer(tmp_path_factory.mktemp("echo-home"), "-id", f"{ECHO} prefix='you said: '") as server:
        yield server


def test_echo_backend_is_listed_with_its_keys():
    listed = json.loads(subprocess.run([str(GALLAMA), "plugins", "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    echo = next(p for p in listed if p["name"] == "echo")
    assert echo["status"] == "loaded" and echo["hooks"] == ["register_backends"]
    keys = echo["backends"]["echo"]
    assert keys["keys"] == ["model_id", "model_name", "backend", "max_seq_len", "aliases", "stream_interval_ms"]
    assert keys["options"]["prefix"] == {"type": "str", "required": False, "default": "",
                                         "description": "Text put before the echoed message."}


def test_echo_answers_through_the_gateway(echo_server: RunningServer):
    client = OpenAI(base_url=f"{echo_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "héllo <|im_end|> wörld"}]
    reply = client.chat.completions.create(model="echo", messages=messages)
    assert reply.choices[0].message.content == "you said: héllo <|im_end|> wörld"  # client text stays text
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="echo", messages=messages, stream=True) if c.choices)
    assert streamed == reply.choices[0].message.content
    capped = client.chat.completions.create(model="echo", messages=messages, max_tokens=5, stop=["zz"])
    assert capped.choices[0].message.content == "you s" and capped.choices[0].finish_reason == "length"
    stopped = client.chat.completions.create(model="echo", messages=messages, stop=["said"])
    assert stopped.choices[0].message.content == "you "
    with pytest.raises(BadRequestError) as refused:  # it cannot enforce a constraint, so it refuses one
        client.chat.completions.create(model="echo", messages=messages, response_format={"type": "json_object"})
    assert refused.value.body["code"] == "constraint_not_supported"


def test_a_key_the_echo_backend_does_not_declare_is_refused_before_loading(tmp_path: Path):
    for key, expected in [("colour=red", "unknown key 'colour'"), ("cache_size=64", "does not use 'cache_size'"),
                          ("delay_ms=5000", "bad value for 'delay_ms'")]:
        result = subprocess.run([str(GALLAMA), "run", "--port", "1", "-id", f"{ECHO} {key}"], capture_output=True,
                                text=True, timeout=60, env={"GALLAMA_HOME_PATH": str(tmp_path), "PATH": ""})
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Valid keys for the echo backend:" in result.stderr
        assert "  upper: Echo in upper case. [bool, echo backend] (default: False)" in result.stderr


def test_echo_in_process_with_options():
    backend = EchoBackend(ModelSpec(model_id="echo", backend="echo", options={"upper": True}))
    with TestClient(worker_app([backend])) as client:
        reply = client.post("/v1/chat/completions", json={"model": "echo", "messages": [
            {"role": "system", "content": "ignored"}, {"role": "user", "content": "quiet"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "QUIET"
