"""Model-native tool-call formats end to end: the embedded weights under a Llama-3.1-style, a Mistral-style (its
``[TOOL_CALLS]`` a control token), a Qwen3-Coder-style and a Qwen3-style template (see :mod:`model_variants`),
served by ``gallama run`` and asked through the ``openai`` client. Each model is held to its own call syntax,
which its template announces; the server reads the calls back into OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from chat_stream import stream_chat
from model_variants import (
    LLAMA3_STYLE,
    MISTRAL_STYLE,
    MISTRAL_TOKENS,
    QWEN3_CODER_STYLE,
    QWEN3_STYLE,
    THINK_TOKENS,
    write_variant,
)
from openai import OpenAI

from gallama_kernel.testing import RunningServer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}}
CODE = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]}}}
TOOLS = [WEATHER, NOW, CODE]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MODELS = ["llama3-style", "mistral-style", "coder-style", "qwen3-style"]


@pytest.fixture(scope="module")
def formats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("tool-format-models")
    variants = {"llama3-style": write_variant(folder / "llama3.gguf", LLAMA3_STYLE, {}),
                "mistral-style": write_variant(folder / "mistral.gguf", MISTRAL_STYLE, MISTRAL_TOKENS),
                "coder-style": write_variant(folder / "coder.gguf", QWEN3_CODER_STYLE, {}),
                "qwen3-style": write_variant(folder / "qwen3.gguf", QWEN3_STYLE, THINK_TOKENS)}
    # the qwen3-style model's reasoning is turned off by its model key: these tests are about its calls
    arguments = [part for name, path in variants.items()
                 for part in ("-id", f"model_id={path} model_name={name} max_concurrent_requests=2"
                                     + (" reasoning=none" if name == "qwen3-style" else ""))]
    running = RunningServer(tmp_path_factory.mktemp("gallama-formats-home"), *arguments, timeout=240)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(formats_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{formats_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def valid_calls(calls: list[Any]) -> None:
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                    {"type": "function", "function": {"name": "lookup"}}])
def test_each_model_calls_in_its_own_format_and_the_stream_matches(client: OpenAI, model: str,
                                                                   choice: Any) -> None:
    body = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 120,
            "temperature": 0, "parallel_tool_calls": False}
    # the prompt computed once first: the compared requests then both reuse it alike (a prompt computed in other
    # batch sizes can flip a greedy near tie, on the CPU as on any engine)
    client.chat.completions.create(**body)
    response = client.chat.completions.create(**body)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    valid_calls(message.tool_calls)
    assert len(message.tool_calls) == 1
    if isinstance(choice, dict):
        assert message.tool_calls[0].function.name == choice["function"]["name"]
    streamed = stream_chat(client, **body)
    assert (streamed.content or None, streamed.finish) == (message.content, "tool_calls")
    assert streamed.calls == [(c.function.name, c.function.arguments) for c in message.tool_calls]


@pytest.mark.parametrize("model", MODELS)
def test_auto_answers_in_text_or_with_valid_calls(client: OpenAI, model: str) -> None:
    for seed in range(3):
        response = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=40,
                                                  temperature=1.0, seed=seed)
        message = response.choices[0].message
        if message.tool_calls:
            valid_calls(message.tool_calls)
        else:
            for opening in ("[TOOL_CALLS]", '{"name":', "<tool_call>"):
                assert not (message.content or "").startswith(opening)


@pytest.mark.parametrize("model", MODELS)
def test_a_conversation_with_earlier_calls_and_results_goes_on(client: OpenAI, model: str) -> None:
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, light rain"},
                {"role": "user", "content": "And in Lyon?"}]
    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                            max_tokens=120, temperature=0, parallel_tool_calls=False)
    valid_calls(second.choices[0].message.tool_calls)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
