"""Hostile requests against the real server: client and tool text never becomes control tokens, size limits are
400s naming the limit, malformed history is never a 500, and preparation does not stall other streams."""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from smollm2_vocab import INJECTED, VocabBackend

from gallama_kernel.pipeline.models import ModelRegistry, ServedModel
from gallama_kernel.pipeline.service import ChatService
from gallama_kernel.plugins import PluginHost
from gallama_kernel.protocol import limits
from gallama_kernel.protocol.openai import ChatCompletionRequest

USER = [{"role": "user", "content": "Hi"}]


@functools.cache
def local() -> tuple[ChatService, VocabBackend]:
    backend = VocabBackend()
    registry = ModelRegistry()
    registry.add(ServedModel("local", backend))
    return ChatService(registry, PluginHost()), backend


def expected_prompt(messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(tokens the server must use, tokens with client control text read as control tokens: the old way)."""
    service, backend = local()
    prepared = service.prepare_chat(ChatCompletionRequest(model="local", messages=messages))
    assert prepared.plan is not None
    old = backend.tokenize(service.registry.get("local").renderer.render(prepared.plan.messages))
    return prepared.generation.prompt_tokens, old


def control_count(tokens: list[int]) -> int:
    _, backend = local()
    controls = {backend.tokenize(text, add_special=False)[0] for text in backend.control_texts}
    return sum(t in controls for t in tokens)


def prompt_tokens(client: openai.OpenAI, messages: list[dict[str, Any]]) -> int:
    response = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1, temperature=0)
    return response.usage.prompt_tokens


def test_role_injection_in_a_user_message_is_plain_text(client):
    messages = [{"role": "user", "content": INJECTED}]
    tokens, old = expected_prompt(messages)
    assert len(tokens) != len(old) and control_count(tokens) < control_count(old)
    assert control_count(tokens) == control_count(expected_prompt(USER)[0])  # the template's own, no more
    assert prompt_tokens(client, messages) == len(tokens)


def test_role_injection_in_a_tool_result_opens_no_turn(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": INJECTED},
    ]
    clean = [*messages[:2], {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    tokens, old = expected_prompt(messages)
    assert control_count(tokens) == control_count(expected_prompt(clean)[0]) < control_count(old)
    assert prompt_tokens(client, messages) == len(tokens)


def post(server, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}{path}", content=content, timeout=120,
                      headers={"content-type": "application/json"})


def refused(response: httpx.Response, param: str, *words: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    return error


def tool(index: int, properties: int = 1) -> dict[str, Any]:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": f"field {i}"}
                                               for i in range(properties)}}
    return {"type": "function", "function": {"name": f"tool_{index}", "description": "a tool", "parameters": schema}}


def test_limits_are_400s_naming_the_limit(server):
    chat = {"model": "smollm2", "max_tokens": 1}
    response = post(server, "/v1/chat/completions",
                    {**chat, "messages": [{"role": "user", "content": "x"}] * (limits.MAX_MESSAGES + 1)})
    refused(response, "messages", str(limits.MAX_MESSAGES), str(limits.MAX_MESSAGES + 1))
    response = post(server, "/v1/chat/completions",
                    {**chat, "messages": USER, "tools": [tool(i) for i in range(limits.MAX_TOOLS + 1)]})
    refused(response, "tools", str(limits.MAX_TOOLS))
    response = post(server, "/v1/chat/completions",
                    {**chat, "messages": USER, "stop": [f"s{i}" for i in range(limits.MAX_STOP_STRINGS + 1)]})
    refused(response, "stop", str(limits.MAX_STOP_STRINGS))
    response = post(server, "/v1/chat/completions", {**chat, "messages": USER, "stop": ["x" * 1000]})
    refused(response, "stop.0", str(limits.MAX_STOP_CHARS))
    response = post(server, "/v1/completions", {"model": "smollm2", "prompt": "a", "stop": ["y" * 1000]})
    refused(response, "stop.0", str(limits.MAX_STOP_CHARS))


def test_request_text_over_the_character_limit(server):
    big = "word " * (limits.MAX_REQUEST_CHARS // 5 + 1)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": big}]}
    response = post(server, "/v1/chat/completions", body)
    if response.status_code == 413:  # an HTTP body limit below the text limit answered first: also refused
        return
    refused(response, "messages.0.content", str(limits.MAX_REQUEST_CHARS))


def test_empty_prompt_list_is_a_400(server):
    refused(post(server, "/v1/completions", {"model": "smollm2", "prompt": []}), "prompt")


def test_lone_surrogates_are_400s(server):
    """The API layer may refuse them while parsing the body; if they reach the pipeline, it names the field."""
    body = b'{"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in (None, "messages.0.content")
    response = post(server, "/v1/completions", b'{"model": "smollm2", "max_tokens": 1, "prompt": "a\\udfff"}')
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in (None, "prompt")


@pytest.mark.parametrize("history", [
    [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}],
    [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2"}}],
    [{"id": "c1", "type": "function", "function": {"arguments": "{}"}}],
    [{"id": "c1", "type": "function"}],
    [{"type": "function", "function": {"name": "<|im_start|>", "arguments": "<|im_end|>"}}],
])
def test_malformed_tool_history_is_never_a_500(server, history):
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": history},
                {"role": "tool", "tool_call_id": "unknown-id", "content": "result"}]
    response = post(server, "/v1/chat/completions", {"model": "smollm2", "max_tokens": 2, "messages": messages})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["param"].startswith("messages.1.tool_calls.0")


def test_a_stream_flows_while_another_request_prepares(client, server):
    # preparation-bound: rendering and tokenizing 8,000 messages, then a 400 (over the context), no generation
    history = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} of a long history"}
               for i in range(8000)]
    heavy = json.dumps({"model": "smollm2", "max_tokens": 1, "messages": history}).encode()  # encoded before
    times: list[float] = []
    heavy_times: list[float] = []
    statuses: list[int] = []

    def heavy_request() -> None:
        heavy_times.append(time.perf_counter())
        statuses.append(post(server, "/v1/chat/completions", heavy).status_code)
        heavy_times.append(time.perf_counter())

    worker = threading.Thread(target=heavy_request)
    # held long by a regex, so the stream outlasts the heavy request whatever the model would say
    stream = client.chat.completions.create(model="smollm2", stream=True, max_tokens=1800, temperature=0,
                                            messages=[{"role": "user", "content": "Count from 1 to 500."}],
                                            extra_body={"regex_pattern": "(ab ){900}"})
    for _chunk in stream:
        times.append(time.perf_counter())
        if len(times) == 3:
            worker.start()
        if len(times) > 3 and not worker.is_alive():
            break
    stream.close()
    worker.join()
    assert statuses == [400], statuses
    sent, done = heavy_times
    during = [t for t in times if sent <= t <= done]
    worst = max(b - a for a, b in itertools.pairwise([sent, *during, done]))
    print(f"heavy request {done - sent:.3f} s, {len(during)} chunks meanwhile, worst gap {worst:.3f} s")
    # preparing on the event loop stalled the stream for the whole preparation (0.96-1.6 s of about as long a
    # request); off the loop the stream keeps flowing while it lasts
    assert len(during) >= 3 and worst < 0.5 * (done - sent), (len(during), worst, done - sent)
