"""Reasoning models end to end: the embedded weights under a Qwen3-style and a DeepSeek-R1-style template with
``<think>`` tokens (see :mod:`model_variants`), served by ``gallama run``, asked through the ``openai`` client.

The weights never learnt the markers: a reasoning span is forced with ``leading_prompt`` or sampled at
temperature 1, and ended by its budget, by the end marker, or by the end of the model's turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from model_variants import (
    HARMONY_STYLE,
    HARMONY_TOKENS,
    OLDER_R1_STYLE,
    OLDER_R1_TOKENS,
    QWEN3_STYLE,
    R1_STYLE,
    THINK_TOKENS,
    write_variant,
)
from openai import OpenAI

from gallama_kernel.testing import RunningServer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
          "required": ["name", "legs"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Describe a cat."}]
FORCED = "<think>\nLet me think about this step by step. First,"
"""A ``leading_prompt`` that opens the reasoning and starts it (the weights would often end their turn at once)."""


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("reasoning-models")
    qwen3 = write_variant(folder / "smol-qwen3.gguf", QWEN3_STYLE, THINK_TOKENS)
    r1 = write_variant(folder / "smol-r1.gguf", R1_STYLE, THINK_TOKENS)
    harmony = write_variant(folder / "smol-harmony.gguf", HARMONY_STYLE, HARMONY_TOKENS)
    older_r1 = write_variant(folder / "smol-older-r1.gguf", OLDER_R1_STYLE, OLDER_R1_TOKENS)
    running = RunningServer(tmp_path_factory.mktemp("gallama-reasoning-home"),
                            "-id", f"model_id={qwen3} model_name=qwen3-style max_concurrent_requests=4",
                            "-id", f"model_id={r1} model_name=r1-style max_concurrent_requests=2",
                            "-id", f"model_id={harmony} model_name=harmony-style max_concurrent_requests=2",
                            "-id", f"model_id={older_r1} model_name=older-r1-style max_concurrent_requests=2",
                            timeout=240)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def reasoner(reasoning_server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{reasoning_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def reasoning_of(message: object) -> str | None:
    return (getattr(message, "model_extra", None) or {}).get("reasoning_content")


def reasoning_tokens(usage: object) -> int:
    details = getattr(usage, "completion_tokens_details", None)
    return (details.reasoning_tokens or 0) if details is not None else 0


def assert_apart(reasoning: str | None, content: str | None) -> None:
    for marker in ("<think>", "</think>"):
        assert marker not in (content or ""), content
        assert marker not in (reasoning or ""), reasoning


def test_the_reasoning_is_returned_apart_from_the_answer(reasoner: OpenAI) -> None:
    response = reasoner.chat.completions.create(model="qwen3-style", messages=ASK, max_tokens=60, temperature=0,
                                                extra_body={"leading_prompt": FORCED})
    message = response.choices[0].message
    reasoning = reasoning_of(message)
    assert reasoning, message
    assert_apart(reasoning, message.content)
    assert "step by step" not in reasoning  # the client's leading_prompt is not generated text
    used = reasoning_tokens(response.usage)
    assert 0 < used <= 60 - 15  # a quarter of max_tokens is the answer's
    assert response.usage.completion_tokens <= 60


def test_a_streamed_reasoning_equals_the_whole_response(reasoner: OpenAI) -> None:
    body = {"model": "qwen3-style", "messages": ASK, "max_tokens": 48, "temperature": 0,
            "extra_body": {"leading_prompt": FORCED}}
    whole = reasoner.chat.completions.create(**body).choices[0].message
    reasoning, content = "", ""
    for chunk in reasoner.chat.completions.create(**body, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += reasoning_of(delta) or ""
            content += delta.content or ""
    assert reasoning == reasoning_of(whole)
    assert content == (whole.content or "")


@pytest.mark.parametrize("model", ["qwen3-style", "r1-style"])
def test_the_answer_is_constrained_after_the_reasoning_on_every_try(reasoner: OpenAI, model: str) -> None:
    reasoned = 0
    for seed in range(6):
        response = reasoner.chat.completions.create(
            model=model, messages=ASK, max_tokens=120, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}})
        message = response.choices[0].message
        assert_apart(reasoning_of(message), message.content)
        jsonschema.validate(json.loads(message.content or ""), SCHEMA)
        reasoned += bool(reasoning_of(message))
        assert response.usage.completion_tokens <= 120
    assert reasoned  # the reasoning was free: some tries reasoned before the enforced answer


def test_tool_calls_follow_the_reasoning(reasoner: OpenAI) -> None:
    for seed in range(4):
        response = reasoner.chat.completions.create(
            model="qwen3-style", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
            tool_choice="required", max_tokens=120, temperature=1.0, seed=seed, extra_body={"leading_prompt": FORCED})
        choice = response.choices[0]
        assert reasoning_of(choice.message)
        assert choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert choice.message.tool_calls


@pytest.mark.parametrize(("extra", "most"), [({"reasoning_budget": 6}, 6), ({"reasoning_effort": "minimal"}, 256)])
def test_a_reasoning_budget_ends_the_reasoning(reasoner: OpenAI, extra: dict[str, object], most: int) -> None:
    response = reasoner.chat.completions.create(model="qwen3-style", messages=ASK, max_tokens=400, temperature=0,
                                                extra_body={**extra, "leading_prompt": FORCED})
    assert 0 < reasoning_tokens(response.usage) <= most
    assert_apart(reasoning_of(response.choices[0].message), response.choices[0].message.content)


@pytest.mark.parametrize(("model", "body"), [
    ("qwen3-style", {"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}),
    ("qwen3-style", {"reasoning_effort": "none"}),
    ("r1-style", {"reasoning_effort": "none"}),
    ("r1-style", {"extra_body": {"reasoning_budget": 0}}),
])
def test_reasoning_turned_off_leaves_only_the_answer(reasoner: OpenAI, model: str, body: dict[str, object]) -> None:
    for seed in range(3):
        response = reasoner.chat.completions.create(model=model, messages=ASK, max_tokens=24, temperature=1.0,
                                                    seed=seed, **body)
        assert reasoning_of(response.choices[0].message) is None
        assert reasoning_tokens(response.usage) == 0
        assert "<think>" not in (response.choices[0].message.content or "")


def test_a_template_that_opens_the_reasoning_is_read_as_reasoning(reasoner: OpenAI) -> None:
    response = reasoner.chat.completions.create(model="r1-style", messages=ASK, max_tokens=40, temperature=0,
                                                extra_body={"leading_prompt": "Let me think. First,"})
    message = response.choices[0].message
    assert reasoning_of(message)
    assert_apart(reasoning_of(message), message.content)


def test_reasoning_asked_of_a_model_that_does_not_reason_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, max_tokens=4,
                                       reasoning_effort="low")
    assert raised.value.body["param"] == "reasoning_effort"
    response = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, max_tokens=4,
                                              reasoning_effort="none")
    assert response.choices[0].message.content is not None


def test_template_kwargs_may_not_replace_the_kernels_variables(reasoner: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        reasoner.chat.completions.create(model="qwen3-style", messages=ASK, max_tokens=4,
                                         extra_body={"chat_template_kwargs": {"messages": []}})
    assert raised.value.body["param"] == "chat_template_kwargs"


def test_anthropic_thinking_is_the_models_own_reasoning(reasoning_server: RunningServer) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=reasoning_server.base_url, api_key="unused", max_retries=0, timeout=300)
    kinds = []
    for _ in range(8):
        reply = client.messages.create(model="qwen3-style", max_tokens=80, messages=ASK,
                                       thinking={"type": "enabled", "budget_tokens": 40})
        kinds.append([block.type for block in reply.content])
        for block in reply.content:
            assert "<think>" not in getattr(block, "text", "") + getattr(block, "thinking", "")
        assert reply.usage.output_tokens <= 80
    assert any("thinking" in found for found in kinds), kinds
    for _ in range(3):  # without thinking, the model does not reason
        reply = client.messages.create(model="qwen3-style", max_tokens=24, messages=ASK)
        assert all(block.type != "thinking" for block in reply.content)


def test_responses_reasoning_effort_is_the_models_reasoning_effort(reasoner: OpenAI) -> None:
    reasoned = 0
    for _ in range(8):
        response = reasoner.responses.create(model="qwen3-style", input="Describe a cat.", max_output_tokens=80,
                                             temperature=1.0, reasoning={"effort": "low"})
        reasoned += any(item.type == "reasoning" for item in response.output)
        assert response.usage.output_tokens <= 80
    assert reasoned
    response = reasoner.responses.create(model="qwen3-style", input="Describe a cat.", max_output_tokens=24,
                                         reasoning={"effort": "none"})
    assert all(item.type != "reasoning" for item in response.output)
    assert response.usage.output_tokens_details.reasoning_tokens == 0


HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|constrain|>")


@pytest.mark.parametrize("stream", [False, True])
def test_harmony_reasoning_answers_and_calls_come_apart(reasoner: OpenAI, stream: bool) -> None:
    """gpt-oss style: the analysis channel is the reasoning, the final channel the answer, commentary the calls;
    no channel header reaches the client."""
    def ask(**body: object) -> tuple[str, str, list[tuple[str, str]], int]:
        request = {"model": "harmony-style", "messages": [{"role": "user", "content": "Weather in Paris?"}],
                   "max_tokens": 80, "temperature": 0, "extra_body": {"reasoning_budget": 12}, **body}
        if not stream:
            response = reasoner.chat.completions.create(**request)
            message = response.choices[0].message
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            return reasoning_of(message) or "", message.content or "", calls, reasoning_tokens(response.usage)
        reasoning, content, pieces = "", "", {}
        for chunk in reasoner.chat.completions.create(**request, stream=True):
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning += reasoning_of(delta) or ""
                content += delta.content or ""
                for part in delta.tool_calls or []:
                    name, arguments = pieces.get(part.index, ("", ""))
                    pieces[part.index] = (name + (part.function.name or ""),
                                          arguments + (part.function.arguments or ""))
        return reasoning, content, [pieces[i] for i in sorted(pieces)], 1 if reasoning else 0

    for body in ({}, {"tools": [WEATHER]}, {"response_format": {"type": "json_object"}}):
        reasoning, content, calls, used = ask(**body)
        assert reasoning and used
        for marker in HARMONY_MARKERS:
            assert marker not in reasoning + content
        if "response_format" in body:
            assert isinstance(json.loads(content), dict)
    reasoning, content, calls, _ = ask(tools=[WEATHER], tool_choice="required")
    assert reasoning and len(calls) == 1 and calls[0][0] == "get_weather"
    jsonschema.validate(json.loads(calls[0][1]), WEATHER["function"]["parameters"])
    reasoning, content, calls, used = ask(reasoning_effort="none", extra_body={})
    assert not reasoning and not used


def test_a_block_opened_unasked_is_read_as_reasoning(reasoner: OpenAI) -> None:
    """An older R1 distill's template names only ``</think>``: the vocabulary's two marker tokens make it a
    reasoning model, and a free answer that opens ``<think>`` unasked has that block as reasoning, streamed the
    same way, counted as reasoning tokens, hidden with ``include_reasoning: false``."""
    ask = {"model": "older-r1-style", "messages": [{"role": "user", "content": "How do I add 3 and 3?"}],
           "max_tokens": 40, "temperature": 0}
    reasoner.chat.completions.create(**ask)  # the prompt in the cache: the stream then computes the same
    response = reasoner.chat.completions.create(**ask)
    message = response.choices[0].message
    reasoning = reasoning_of(message)
    assert reasoning and message.content, message
    assert "<think>" not in message.content and "<think>" not in reasoning and "</think>" not in reasoning
    assert 0 < reasoning_tokens(response.usage) < response.usage.completion_tokens <= 40
    chunks = list(reasoner.chat.completions.create(**ask, stream=True))
    assert "".join(reasoning_of(c.choices[0].delta) or "" for c in chunks if c.choices) == reasoning
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    hidden = reasoner.chat.completions.create(**ask, extra_body={"include_reasoning": False})
    assert reasoning_of(hidden.choices[0].message) is None and hidden.choices[0].message.content == message.content
    assert reasoning_tokens(hidden.usage) == reasoning_tokens(response.usage)
    constrained = reasoner.chat.completions.create(**ask, response_format={"type": "json_object"})
    assert reasoning_of(constrained.choices[0].message) is None  # the constraint starts at the first token
