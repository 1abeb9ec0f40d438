"""Thinking templates end to end with the embedded model (SmolLM2-135M: structure is asserted, not quality)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI
from test_thinking_unit import SEED_TEMPLATE  # the seed README's template, shared with the unit tests

MODEL = "smollm2"
THINKING_BUDGET = 96  # GALLAMA_THINKING_MAX_TOKENS of the test server (conftest.py)
OPENING, CLOSING = "<chain_of_thought>", "</chain_of_thought>"

APPLES = ("I went to the market and bought 10 apples. I gave 2 apples to the neighbor and 2 to the repairman. I then "
          "went and bought 5 more apples and ate 1. How many apples did I remain with?")
MESSAGES = [{"role": "user", "content": APPLES}]

COUNT = {"type": "object", "properties": {"apples": {"type": "integer", "minimum": 0, "maximum": 100}},
         "required": ["apples"], "additionalProperties": False}
COUNT_TOOL = {"type": "function", "function": {"name": "report_count", "description": "Report how many apples.",
                                               "parameters": COUNT}}


def ask(client: OpenAI, return_thinking: bool | str | None = None, **kwargs: Any) -> Any:
    extra: dict[str, Any] = {"thinking_template": SEED_TEMPLATE}
    if return_thinking is not None:
        extra["return_thinking"] = return_thinking
    kwargs.setdefault("max_tokens", 40)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra, **kwargs)


def reasoning_tokens(completion: Any) -> int:
    details = completion.usage.completion_tokens_details
    return details.reasoning_tokens if details is not None else 0


def assert_thinking_block(text: str) -> None:
    """A whole thinking block: the root's start tag, the model's text, the root's end tag (ours if cut short)."""
    assert text.startswith(OPENING), text[:80]
    assert text.endswith(CLOSING), text[-80:]
    assert text.count(CLOSING) == 1


def assert_thought(completion: Any) -> None:
    """Thinking happened: reasoning tokens, within the test server's budget, and answer tokens besides."""
    tokens = reasoning_tokens(completion)
    assert 0 < tokens <= THINKING_BUDGET
    assert completion.usage.completion_tokens > tokens  # the answer's tokens come on top


@pytest.fixture(scope="module")
def separate(client: OpenAI) -> Any:
    """The non-streamed greedy completion with ``return_thinking="separate"`` (shared by two tests)."""
    return ask(client, "separate")


def test_seed_example_hides_the_thinking(client: OpenAI) -> None:
    completion = ask(client, temperature=0.1, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert OPENING not in choice.message.content  # no thinking block in the answer
    assert getattr(choice.message, "reasoning_content", None) is None
    assert_thought(completion)
    assert completion.usage.completion_tokens - reasoning_tokens(completion) <= 200  # max_tokens is the answer's


def test_return_thinking_true_prepends_the_thinking_to_the_content(client: OpenAI, separate: Any) -> None:
    completion = ask(client, True)
    content = completion.choices[0].message.content
    assert getattr(completion.choices[0].message, "reasoning_content", None) is None
    thinking = separate.choices[0].message.reasoning_content
    assert content == f"{thinking}\n{separate.choices[0].message.content}"  # greedy: the same turn, joined
    assert_thought(completion)


def test_separate_puts_the_thinking_in_reasoning_content(client: OpenAI, separate: Any) -> None:
    message = separate.choices[0].message
    assert_thinking_block(message.reasoning_content)
    assert OPENING not in message.content
    assert_thought(separate)
    hidden = ask(client)  # hidden thinking: the same greedy answer, without the thinking
    assert hidden.choices[0].message.content == message.content
    assert reasoning_tokens(hidden) == reasoning_tokens(separate)


def test_stream_separate_sends_reasoning_before_content(client: OpenAI, separate: Any) -> None:
    stream = ask(client, "separate", stream=True, stream_options={"include_usage": True})
    order: list[str] = []
    parts: dict[str, list[str]] = {"reasoning_content": [], "content": []}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for key in parts:
                piece = getattr(choice.delta, key, None)
                if piece:
                    parts[key].append(piece)
                    order.append(key)
    assert "reasoning_content" in order and "content" in order
    first_content = order.index("content")
    assert "reasoning_content" not in order[first_content:]  # all thinking comes first
    assert len(parts["reasoning_content"]) > 1  # streamed as generated
    message = separate.choices[0].message
    assert "".join(parts["reasoning_content"]) == message.reasoning_content
    assert "".join(parts["content"]) == message.content
    assert usage is not None
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens(separate)


def test_json_schema_applies_to_the_answer_only(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": COUNT, "strict": True}}
    completion = ask(client, "separate", response_format=fmt, max_tokens=60)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    jsonschema.validate(json.loads(message.content), COUNT)
    assert_thinking_block(message.reasoning_content)  # free text, not JSON
    assert_thought(completion)


def test_required_tool_call_after_thinking(client: OpenAI) -> None:
    completion = ask(client, "separate", tools=[COUNT_TOOL], tool_choice="required", max_tokens=60)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "report_count"
        jsonschema.validate(json.loads(call.function.arguments), COUNT)
    assert_thinking_block(choice.message.reasoning_content)
    assert_thought(completion)


def test_regex_pattern_applies_to_the_answer_only(client: OpenAI) -> None:
    pattern = r"You have [0-9]{1,3} apples\."
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=30,
        extra_body={"thinking_template": SEED_TEMPLATE, "regex_pattern": pattern})
    content = completion.choices[0].message.content
    assert re.fullmatch(pattern, content), content
    assert_thought(completion)


def test_invalid_template_is_400_and_the_server_stays_healthy(client: OpenAI, thinking_server: Any) -> None:
    url = f"{thinking_server.base_url}/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5,
            "thinking_template": "<chain_of_thought>\n  <steps>\n</chain_of_thought>"}
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "thinking_template"
    assert error["type"] == "invalid_request_error"
    assert "mismatched tag: line 3, column 2" in error["message"]

    response = httpx.post(url, json={"model": MODEL, "messages": MESSAGES, "return_thinking": True}, timeout=60)
    assert (response.status_code, response.json()["error"]["param"]) == (400, "return_thinking")

    assert thinking_server.health()
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens_details is None  # no thinking without a template
