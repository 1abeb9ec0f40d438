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
    assert set(shout["hooks"]) == {"register_request_fields", "register_routes", "response_transformers"}
    assert shout["errors"] == []


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
    assert "/v1/embeddings" in embedded.json()["error"]["message"]


def test_plugin_route_is_reached_through_the_gateway(server):
    """The route the plugin adds is served by the worker of the model the body names, on the gateway's address."""
    import httpx

    url = f"{server.base_url}/v1/shout"
    reply = httpx.post(url, json={"model": "smollm2", "text": "Hello <|im_start|> there"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == "HELLO <|IM_START|> THERE" and reply.json()["model"] == "smollm2"
    assert reply.json()["tokens"] > 5  # the control-token text counted as the characters it is
    missing = httpx.post(url, json={"model": "nope", "text": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    form = httpx.post(url, content=b"text=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert httpx.get(url).status_code == 405


def test_gateway_openapi_lists_plugin_routes_and_fields(server):
    import httpx

    document = httpx.get(f"{server.base_url}/openapi.json").json()
    operation = document["paths"]["/v1/shout"]["post"]
    assert "plugin: shout" in operation["tags"]
    assert "ShoutRequest" in document["components"]["schemas"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert "shout" in chat["schema"]["properties"]
