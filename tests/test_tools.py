"""Function calling end to end with the embedded model: every tool_choice, streaming, history, refusals."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_web",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 60},
                           "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "current_time", "description": "The time now."}}
TOOLS = [WEATHER, SEARCH, NOW]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}

PROMPTS = [
    "What's the weather in Paris?", "Find recent news about Mars.", "What time is it?", "Is it raining in Oslo?",
    "Search for a pancake recipe.", "How hot is it in Cairo, in fahrenheit?", "Look up the population of Peru.",
    "Weather in Tokyo please.", "Who won the last world cup?", "Tell me the current time.",
    "Do I need an umbrella in London?", "Search: best hiking boots.", "Temperature in Sydney?",
    "Find the tallest building.", "What is the time right now?", "Snow in Denver today?",
    "Search for Python tutorials.", "Weather for Berlin in celsius.", "Find cheap flights to Rome.",
    "Is it windy in Chicago?",
]


def ask(client, content: str, **kwargs):
    kwargs.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kwargs)


def valid_call(call) -> dict:
    assert call.type == "function"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_required_always_calls_valid_functions(client):
    for prompt in PROMPTS:
        completion = ask(client, prompt, tools=TOOLS, tool_choice="required")
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.tool_calls
        assert choice.message.content is None
        for call in choice.message.tool_calls:
            valid_call(call)


def test_named_choice_calls_exactly_that_function(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for prompt in PROMPTS:
        completion = ask(client, prompt, tools=TOOLS, tool_choice=named)
        calls = completion.choices[0].message.tool_calls
        assert completion.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in calls] == ["get_weather"]
        valid_call(calls[0])


def test_none_never_calls(client):
    completion = ask(client, "What's the weather in Paris?", tools=TOOLS, tool_choice="none", max_tokens=30)
    choice = completion.choices[0]
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content


def test_auto_is_clean_text_or_valid_calls(client):
    for prompt in [*PROMPTS[:6], "Say hello.", "Write a haiku about rain."]:
        choice = ask(client, prompt, tools=TOOLS).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                valid_call(call)
        else:
            assert "<tool_call>" not in (choice.message.content or "")


def test_parallel_false_limits_to_one_call(client):
    for prompt in PROMPTS[:5]:
        completion = ask(client, prompt + " Also search the web for it.", tools=TOOLS, tool_choice="required",
                         parallel_tool_calls=False)
        assert len(completion.choices[0].message.tool_calls) == 1


def test_stream_deltas_and_accumulation_equal_non_stream(client):
    kwargs = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = ask(client, "What's the weather in Paris?", **kwargs).choices[0]
    calls: dict[int, dict] = {}
    argument_deltas = 0
    finish = None
    for chunk in ask(client, "What's the weather in Paris?", stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for part in choice.delta.tool_calls or []:
            if part.index not in calls:
                assert part.id and part.type == "function" and part.function.name, "first delta names the call"
                calls[part.index] = {"name": part.function.name, "arguments": part.function.arguments or ""}
            else:
                assert part.id is None
                calls[part.index]["arguments"] += part.function.arguments or ""
                argument_deltas += 1
    assert finish == "tool_calls"
    assert argument_deltas > 1, "arguments must stream as they are generated"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_history_with_tool_calls_and_results(client):
    first = ask(client, "What's the weather in Paris?", tools=TOOLS, tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=40, tool_choice="none")
    assert second.choices[0].message.content
    third = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=40)
    assert third.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strnig"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
])
def test_bad_tools_are_400(server, client, body, param):
    response = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert ask(client, "hi", max_tokens=2).choices[0].message.content is not None


def test_auto_without_tools_is_plain_chat(client):
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                                tool_choice="auto", max_tokens=16, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls
    assert choice.message.content
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=16, temperature=0)
    assert choice.message.content == plain.choices[0].message.content
    assert completion.usage.prompt_tokens == plain.usage.prompt_tokens


class GetWeather(BaseModel):
    city: str = Field(max_length=40)


def test_parsed_tool_calls_go_back_with_their_results(client):
    """parse() leaves ``parsed_arguments`` on each call; the message and a tool result make the next turn."""
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    weather = openai.pydantic_function_tool(GetWeather)
    completion = client.chat.completions.parse(model=MODEL, messages=messages, tools=[weather],
                                               tool_choice="required", max_tokens=60, temperature=0)
    message = completion.choices[0].message
    call = message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)
    messages += [message, {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=[weather], tool_choice="none",
                                            max_tokens=30, temperature=0)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens > 0
