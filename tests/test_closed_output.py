"""Structured output that cannot be cut off, end to end: at every ``max_tokens`` from the shortest valid output
upward, JSON answers and tool calls parse and validate, streamed or not; below it the request is a 400."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
from chat_stream import stream_chat
from openai import OpenAI

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 60}, "tags": {"type": "array", "items": {"type": "string"},
                                                          "minItems": 1, "maxItems": 4},
    "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "tags", "age"],
    "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Describe a famous scientist with a long name and many tags."}]


def model_of(client: OpenAI) -> str:
    return client.models.list().data[0].id


def shortest(client: OpenAI, **body: Any) -> int:
    """The shortest output's tokens, as the 400 for ``max_tokens=1`` names them."""
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_of(client), messages=ASK, max_tokens=1, **body)
    assert raised.value.body["param"] == "max_tokens" and raised.value.body["code"] == "max_tokens_too_small"
    found = re.search(r"allows has (\d+) tokens, more than max_tokens \(1\)", raised.value.body["message"])
    assert found, raised.value.body["message"]
    return int(found.group(1))


def test_a_json_answer_is_valid_at_every_max_tokens(client: OpenAI) -> None:
    least = shortest(client, response_format=FORMAT)
    closed = 0
    for budget in range(least, least + 40, 3):
        body = {"model": model_of(client), "messages": ASK, "max_tokens": budget, "temperature": 0.8,
                "seed": budget, "response_format": FORMAT}
        response = client.chat.completions.create(**body)
        choice = response.choices[0]
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert response.usage.completion_tokens <= budget
        assert (choice.finish_reason == "length") == bool((choice.model_extra or {}).get("output_closed"))
        closed += choice.finish_reason == "length"
        streamed = stream_chat(client, **body)
        jsonschema.validate(json.loads(streamed.content), SCHEMA)
        assert streamed.completion_tokens <= budget and (streamed.finish == "length") == streamed.closed
    assert closed  # small budgets were reached: the property was exercised


def test_tool_calls_are_valid_at_every_max_tokens(client: OpenAI) -> None:
    tools = {"tools": [WEATHER], "tool_choice": "required"}
    least = shortest(client, **tools)
    for budget in range(least, least + 24, 2):
        body = {"model": model_of(client), "messages": [{"role": "user", "content": "Weather in Llanfairpwllgwyngyll "
                                                         "for the coming days?"}],
                "max_tokens": budget, "temperature": 0.8, "seed": budget, **tools}
        response = client.chat.completions.create(**body)
        choice = response.choices[0]
        assert choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert choice.finish_reason in ("tool_calls", "length") and response.usage.completion_tokens <= budget
        streamed = stream_chat(client, **body)
        assert streamed.calls and streamed.completion_tokens <= budget
        assert streamed.finish in ("tool_calls", "length")
        for _, arguments in streamed.calls:
            jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_a_budget_that_cannot_hold_the_shortest_output_is_refused(client: OpenAI) -> None:
    least = shortest(client, response_format=FORMAT)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_of(client), messages=ASK, max_tokens=least - 1,
                                       response_format=FORMAT)
    message = raised.value.body["message"]
    assert str(least) in message and f"max_tokens ({least - 1})" in message
