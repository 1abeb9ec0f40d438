"""Bad input gets a 4xx in OpenAI's error shape and leaves the server healthy."""

from __future__ import annotations

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Hi"}]


def assert_healthy(server, client) -> None:
    assert server.health()["status"] == "ok"
    completion = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, temperature=0)
    assert completion.usage.completion_tokens >= 1


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", timeout=30, **kwargs)


def assert_error_shape(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_json(server, client, path):
    error = assert_error_shape(post(server, path, content=b'{"model": "smollm2", "messages": [',
                                    headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    assert_healthy(server, client)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "smollm2", "messages": "hello"}, "messages"),
    ({"model": "smollm2", "messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"model": "smollm2", "messages": MESSAGES, "max_tokens": -3}, "max_tokens"),
    ({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MESSAGES}, "model"),
    ({"model": "smollm2", "messages": MESSAGES, "n": 3}, "n"),
    ({"model": "smollm2", "messages": MESSAGES, "logprobs": True}, "logprobs"),
])
def test_wrong_types_and_unsupported_options(server, client, body, param):
    error = assert_error_shape(post(server, "/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert_healthy(server, client)


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"
    error = assert_error_shape(post(server, "/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found"
    assert_healthy(server, client)


def test_context_overflow_names_both_numbers(server, client):
    limit = 4096
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=limit)
    message = caught.value.body["message"]
    assert str(limit) in message and "in the prompt" in message
    long_prompt = "word " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt=long_prompt, max_tokens=10)
    assert "10 for the completion" in caught.value.body["message"]
    assert_healthy(server, client)


def test_unknown_extension_field_is_named(server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"
    assert "frobnicate" in caught.value.body["message"]
    assert_healthy(server, client)


def test_unknown_route_and_method_name_themselves(server, client):
    error = assert_error_shape(httpx.get(f"{server.base_url}/v1/nope"), 404)
    assert (error["message"], error["code"]) == ("Unknown route: GET /v1/nope", "unknown_route")
    response = post(server, "/v1/models", json={})
    error = assert_error_shape(response, 405)
    assert error["message"] == "POST /v1/models is not allowed (allowed: GET)"
    assert response.headers["allow"] == "GET"
    error = assert_error_shape(httpx.get(f"{server.base_url}/v1/chat/completions"), 405)
    assert "GET /v1/chat/completions" in error["message"]
    assert_healthy(server, client)


@pytest.mark.parametrize(("message", "param", "code"), [
    ({"role": "user", "content": "x", "foo": 1}, "messages.0.foo", "unknown_field"),
    ({"role": "user", "content": [{"type": "text", "text": "Hi"},
                                  {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
     "messages.0.content.1", "unsupported_content"),
])
def test_message_refusals_name_the_place(server, client, message, param, code):
    error = assert_error_shape(post(server, "/v1/chat/completions", json={"model": "smollm2", "messages": [message]}),
                               400)
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]
    assert_healthy(server, client)
