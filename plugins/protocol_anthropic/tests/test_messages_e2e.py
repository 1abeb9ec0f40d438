"""``/v1/messages`` and ``/v1/messages/count_tokens`` through ``gallama run``, with the official anthropic client."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from gallama_kernel.testing import RunningServer

MODEL = "smollm2"
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city"]}}
TIME = {"name": "get_time", "description": "The time in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # sampling fields: the current SDK no longer has them, older clients send them


def test_text_answer_has_the_messages_shape(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=12, system="Answer briefly.",
                                   messages=[{"role": "user", "content": "Name a fruit."}], extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.id.startswith("msg_") and [block.type for block in reply.content] == ["text"]
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 12


def test_the_sdk_stream_accumulator_gives_the_non_streamed_message(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 24, "extra_body": GREEDY,
                              "messages": [{"role": "user", "content": "Describe the sea in one sentence."}]}
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == plain.content[0].text == final.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        plain.usage.input_tokens + plain.usage.cache_read_input_tokens


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}])
def test_forced_tool_use_is_a_valid_call_every_time(client: anthropic.Anthropic, choice: dict[str, Any]) -> None:
    truncated = 0
    for attempt in range(20):
        stream = attempt % 2 == 1
        kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 80, "extra_body": {"temperature": 0.8},
                                  "tools": [WEATHER, TIME], "tool_choice": choice, "messages": ASK}
        if stream:
            with client.messages.stream(**kwargs) as events:
                reply = events.get_final_message()
        else:
            reply = client.messages.create(**kwargs)
        if reply.stop_reason == "max_tokens":  # sampled: the 135M model may repeat itself inside a string
            truncated += 1  # and the call is closed at the budget: it still parses and validates
            assert stream or reply.model_extra.get("output_closed") is True, (attempt, reply)
        else:
            assert reply.stop_reason == "tool_use", (attempt, reply)
        calls = [block for block in reply.content if block.type == "tool_use"]
        assert calls, reply
        for call in calls:
            assert call.name in ("get_weather", "get_time") and isinstance(call.input.get("city"), str)
            if choice["type"] == "tool":
                assert call.name == "get_time"
    assert truncated <= 10, f"{truncated} of 20 calls ran into max_tokens"


def test_a_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(model=MODEL, max_tokens=80, tools=[WEATHER], tool_choice={"type": "any"},
                                   messages=ASK, extra_body=GREEDY)
    call = next(block for block in first.content if block.type == "tool_use")
    history = [*ASK, {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "Sunny, 24 C"}]},
                                            {"type": "text", "text": "Tell me in one sentence."}]}]
    answer = client.messages.create(model=MODEL, max_tokens=30, tools=[WEATHER], messages=history, extra_body=GREEDY,
                                    tool_choice={"type": "none"})
    assert answer.content and answer.content[0].type == "text" and answer.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=history)
    assert counted.input_tokens > client.messages.count_tokens(model=MODEL, messages=ASK).input_tokens


def test_stop_sequences_end_the_answer_and_never_leak(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 40, "extra_body": GREEDY, "stop_sequences": ["e"],
                              "messages": [{"role": "user", "content": "Write a sentence about the sea."}]}
    reply = client.messages.create(**kwargs)
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "e"
    assert "e" not in reply.content[0].text if reply.content else True
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "e"
    assert [block.model_dump() for block in final.content] == [block.model_dump() for block in reply.content]


def test_count_tokens_is_the_prompt_the_model_reads(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=ASK).input_tokens
    reply = client.messages.create(model=MODEL, max_tokens=1, system="Be brief.", messages=ASK)
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens


def test_the_stream_has_anthropics_event_sequence(anthropic_server: RunningServer) -> None:
    body = {"model": MODEL, "max_tokens": 60, "stream": True, "tools": [WEATHER], "tool_choice": {"type": "any"},
            "messages": ASK}
    kinds: list[str] = []
    partial = ""
    with httpx.stream("POST", f"{anthropic_server.base_url}/v1/messages", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == kinds[-1]
                if data["type"] == "content_block_delta":
                    assert data["delta"]["type"] == "input_json_delta"
                    partial += data["delta"]["partial_json"]
            else:
                assert not line.startswith("data") and "usage" not in line  # the gateway keeps its report
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") > 1  # the tool input streams as it is generated
    assert isinstance(json.loads(partial)["city"], str)


def test_a_disconnected_stream_frees_its_slot(anthropic_server: RunningServer) -> None:
    body = {"model": MODEL, "max_tokens": 2000, "stream": True, "temperature": 1,
            "messages": [{"role": "user", "content": "Tell a very long story."}]}
    with httpx.stream("POST", f"{anthropic_server.base_url}/v1/messages", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if "text_delta" in line:
                break
        assert anthropic_server.health()["models"][MODEL]["busy"] == 1
    deadline = time.monotonic() + 10
    while anthropic_server.health()["models"][MODEL]["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert anthropic_server.health()["models"][MODEL]["busy"] == 0


@pytest.mark.parametrize(("body", "status", "kind", "says"), [
    ({"model": MODEL, "messages": ASK}, 400, "invalid_request_error", "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "temprature": 1}, 400, "invalid_request_error",
     "temprature: Extra inputs are not permitted"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}]}, 400,
     "invalid_request_error", "document blocks are not supported"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "w"}]},
     400, "invalid_request_error", "server tools (web_search_20250305)"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "tool_choice": {"type": "any"}}, 400,
     "invalid_request_error", "tool_choice 'any' needs tools"),
    ({"model": MODEL, "max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400, "invalid_request_error",
     "temperature"),
    ({"model": MODEL, "max_tokens": 2048, "messages": [*ASK, {"role": "assistant", "content": "It is"}],
      "thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error",
     "a prefill (a last assistant message) cannot be combined with thinking"),
    ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "Hello"}]}, 400,
     "invalid_request_error", "a prefill (a last assistant message) needs a user message before it"),
    ({"model": "missing", "max_tokens": 5, "messages": ASK}, 404, "not_found_error", "'missing' does not exist"),
    ({"model": MODEL, "max_tokens": 10**9, "messages": ASK}, 400, "invalid_request_error", "maximum context length"),
    ([1, 2], 400, "invalid_request_error", "JSON object"),
])
def test_bad_requests_get_anthropics_error_shape(anthropic_server: RunningServer, body: Any, status: int, kind: str,
                                                 says: str) -> None:
    reply = httpx.post(f"{anthropic_server.base_url}/v1/messages", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and says in error["error"]["message"], error
    assert anthropic_server.health()["status"] == "ok"


def test_gateway_errors_get_anthropics_error_shape_too(anthropic_server: RunningServer) -> None:
    url = f"{anthropic_server.base_url}/v1/messages"
    form = httpx.post(url, content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and form.json()["error"]["type"] == "invalid_request_error"
    broken = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["type"] == "error"
    # the OpenAI routes keep OpenAI's shape
    openai_route = httpx.post(f"{anthropic_server.base_url}/v1/chat/completions", json={"model": "missing"})
    assert "type" not in openai_route.json() and openai_route.json()["error"]["code"] == "model_not_found"


def test_output_config_format_holds_the_answer_to_its_schema(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
              "required": ["name", "legs"], "additionalProperties": False}
    complete = 0
    for attempt in range(3):  # sampled: a 135M model sometimes repeats itself inside a string until max_tokens
        reply = client.messages.create(model=MODEL, max_tokens=120, extra_body={"temperature": 0.8},
                                       output_config={"format": {"type": "json_schema", "schema": schema}},
                                       messages=[{"role": "user", "content": "Describe an animal."}])
        if reply.stop_reason == "max_tokens":  # closed at the budget: valid all the same
            assert reply.model_extra.get("output_closed") is True, (attempt, reply)
        data = json.loads(reply.content[0].text)
        assert set(data) == {"name", "legs"} and isinstance(data["legs"], int), (attempt, data)
        complete += reply.stop_reason == "end_turn"
    assert complete, "no answer finished within 120 tokens"


def test_thinking_comes_in_thinking_blocks_within_its_budget(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 20, "extra_body": GREEDY,
                              "thinking": {"type": "enabled", "budget_tokens": 24},
                              "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
    reply = client.messages.create(**kwargs)
    kinds = [block.type for block in reply.content]
    assert kinds[0] == "thinking" and reply.content[0].thinking.startswith("<thinking>")
    assert reply.usage.output_tokens <= 20 + 24 + 8  # the answer's budget plus the thinking's (and its closing)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    # the same blocks (greedy text may differ once the prompt is read from the cache: other batch shapes, other
    # rounding in the logits)
    assert [block.type for block in final.content] == kinds and final.content[0].thinking.startswith("<thinking>")
    hidden = client.messages.create(**{**kwargs, "thinking": {"type": "enabled", "budget_tokens": 24,
                                                              "display": "omitted"}})
    assert all(block.type != "thinking" for block in hidden.content)


def test_a_last_assistant_message_is_a_prefill_the_answer_continues(anthropic_server: RunningServer,
                                                                     client: anthropic.Anthropic) -> None:
    """As on Anthropic's API: the response continues the prefill and holds only the continuation. The kernel's
    ``leading_prompt`` does the same on Chat Completions, so both answers are equal."""
    prefill = "Once upon a time, in the city of Zanzibar,"
    story = [{"role": "user", "content": "Tell me a story."}]
    reply = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY,
                                   messages=[*story, {"role": "assistant", "content": [{"type": "text",
                                                                                       "text": prefill}]}])
    chat = httpx.post(f"{anthropic_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": story, "max_tokens": 16, "temperature": 0, "leading_prompt": prefill}).json()
    assert reply.content[0].text == chat["choices"][0]["message"]["content"]
    assert not reply.content[0].text.startswith("Once upon")
    plain = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, messages=story)
    assert plain.content[0].text != reply.content[0].text
    counted = client.messages.count_tokens(model=MODEL, messages=[*story, {"role": "assistant", "content": prefill}])
    assert counted.input_tokens > client.messages.count_tokens(model=MODEL, messages=story).input_tokens + 8


def test_an_answer_cut_at_max_tokens_is_closed_and_says_so(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
              "required": ["name", "legs"], "additionalProperties": False}
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 10, "extra_body": GREEDY,
                              "output_config": {"format": {"type": "json_schema", "schema": schema}},
                              "messages": [{"role": "user", "content": "Describe an animal."}]}
    reply = client.messages.create(**kwargs)
    assert reply.stop_reason == "max_tokens" and reply.model_extra.get("output_closed") is True
    assert set(json.loads(reply.content[0].text)) == {"name", "legs"} and reply.usage.output_tokens <= 10
    with client.messages.stream(**kwargs) as stream:
        deltas = [event.delta for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert deltas[-1].stop_reason == "max_tokens" and deltas[-1].model_extra.get("output_closed") is True
    assert final.content[0].text == reply.content[0].text
