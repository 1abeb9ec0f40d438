"""The example third-party plugin (examples/shout), installed like any other package, through the real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MESSAGES = [{"role": "user", "content": "Name three fruits."}]


def test_example_plugin_is_listed_with_its_hooks():
    gallama = Path(sys.executable).with_name("gallama")
    listed = json.loads(subprocess.run([str(gallama), "plugins", "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    shout = next(p for p in listed if p["name"] == "shout")
    assert shout["status"] == "loaded"
    assert set(shout["hooks"]) == {"register_request_fields", "response_transformers"}


def test_example_transformer_applies_stream_and_non_stream(client):
    kwargs = {"model": "smollm2", "messages": MESSAGES, "temperature": 0, "max_tokens": 24}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    loud = client.chat.completions.create(**kwargs, extra_body={"shout": True}).choices[0].message.content
    assert loud == plain.upper()
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kwargs, stream=True, extra_body={"shout": True})
                       if c.choices)
    assert streamed == loud


def test_plugin_fields_are_refused_where_no_hook_runs(client, server):
    import httpx
    import openai
    import pytest

    try:
        client.completions.create(model="smollm2", prompt="Fruits:", max_tokens=4, extra_body={"shout": True})
    except openai.BadRequestError as error:
        assert error.body["param"] == "shout" and error.body["code"] == "unsupported_parameter"
        assert "/v1/completions" in error.body["message"] and "shout" in error.body["message"]
    else:
        pytest.fail("a plugin field on /v1/completions was accepted without effect")
    embedded = httpx.post(f"{server.base_url}/v1/embeddings", json={"model": "smollm2", "input": "x", "shout": True})
    assert embedded.status_code == 400 and embedded.json()["error"]["param"] == "shout"
