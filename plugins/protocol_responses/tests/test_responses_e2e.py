"""``/v1/responses`` through ``gallama run``, with the official openai client."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from gallama_kernel.testing import RunningServer

MODEL = "smollm2"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "The time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ANIMAL = {"type": "object", "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
          "required": ["name", "legs"], "additionalProperties": False}
ANIMAL_FORMAT = {"format": {"type": "json_schema", "name": "animal", "schema": ANIMAL, "strict": True}}
AUTH = {"authorization": "Bearer responses-key-one"}


def test_text_response_has_the_responses_shape(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=MODEL, input="Name a fruit.", instructions="Answer in one word.",
                                    max_output_tokens=8, temperature=0)
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.model == MODEL
    assert reply.status in ("completed", "incomplete") and reply.output[0].type == "message"
    assert reply.output_text and reply.usage.input_tokens > 5 and 0 < reply.usage.output_tokens <= 8
    if reply.status == "incomplete":
        assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.instructions == "Answer in one word." and reply.max_output_tokens == 8


def test_text_format_json_schema_holds_and_the_stream_accumulator_agrees(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "Describe an animal.", "text": ANIMAL_FORMAT,
                              "temperature": 0, "store": False}
    plain = client.responses.create(**kwargs)
    jsonschema.validate(json.loads(plain.output_text), ANIMAL)
    assert plain.status == "completed"
    with client.responses.stream(**kwargs) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    jsonschema.validate(json.loads(final.output_text), ANIMAL)
    assert final.status == "completed" and [item.type for item in final.output] == ["message"]
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_time"}])
def test_forced_function_calls_are_valid_every_time(client: openai.OpenAI, choice: Any) -> None:
    truncated = 0
    for attempt in range(20):
        kwargs: dict[str, Any] = {"model": MODEL, "input": "What is the weather in Paris?", "tools": [WEATHER, TIME],
                                  "tool_choice": choice, "temperature": 0.8, "store": False, "max_output_tokens": 80}
        if attempt % 2:
            with client.responses.stream(**kwargs) as stream:
                reply = stream.get_final_response()
        else:
            reply = client.responses.create(**kwargs)
        if reply.status == "incomplete":  # sampled: the 135M model may repeat itself inside a string
            assert reply.incomplete_details.reason == "max_output_tokens", (attempt, reply)
            assert reply.incomplete_details.model_extra.get("output_closed") is True, (attempt, reply)
            truncated += 1  # closed at the budget: the calls still parse and validate
        calls = [item for item in reply.output if item.type == "function_call"]
        assert calls, (attempt, reply)
        for call in calls:
            assert isinstance(json.loads(call.arguments)["city"], str) and call.call_id
            assert call.name == "get_time" if isinstance(choice, dict) else call.name in ("get_weather", "get_time")
    assert truncated <= 10, f"{truncated} of 20 calls ran into max_output_tokens"


def test_previous_response_id_continues_with_the_earlier_turns_cached(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", temperature=0)
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                     max_output_tokens=30, input=[{"type": "function_call_output",
                                                                   "call_id": call.call_id,
                                                                   "output": "Sunny, 24 C"}])
    assert second.previous_response_id == first.id and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the earlier turns came from the cache
    # stateless, as Codex sends it: the same turns passed back as items give the same prompt
    stateless = client.responses.create(model=MODEL, store=False, tools=[WEATHER], temperature=0,
                                        max_output_tokens=30, input=[
                                            {"role": "user", "content": "What is the weather in Paris?"},
                                            {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                             "arguments": call.arguments},
                                            {"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 24 C"}])
    assert stateless.usage.input_tokens == second.usage.input_tokens


def test_stored_responses_are_kept_per_key_and_can_be_deleted(client: openai.OpenAI,
                                                              other_client: openai.OpenAI) -> None:
    kept = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert client.responses.retrieve(kept.id).output_text == kept.output_text
    with pytest.raises(openai.NotFoundError):
        other_client.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError) as refused:
        other_client.responses.create(model=MODEL, input="Hi", previous_response_id=kept.id, max_output_tokens=4)
    assert refused.value.body["param"] == "previous_response_id"
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_stream_numbers_its_events_and_has_the_typed_sequence(responses_server: RunningServer) -> None:
    body = {"model": MODEL, "input": "What is the weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
            "stream": True, "store": False}
    kinds: list[str] = []
    numbers: list[int] = []
    with httpx.stream("POST", f"{responses_server.base_url}/v1/responses", json=body, headers=AUTH,
                      timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                kinds.append(data["type"])
                numbers.append(data["sequence_number"])
            else:
                assert "usage" not in line  # the gateway keeps the worker's report
    assert numbers == list(range(len(numbers)))
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]


def test_a_disconnected_stream_frees_its_slot(responses_server: RunningServer) -> None:
    body = {"model": MODEL, "input": "Tell a very long story.", "stream": True, "max_output_tokens": 2000,
            "store": False}
    with httpx.stream("POST", f"{responses_server.base_url}/v1/responses", json=body, headers=AUTH,
                      timeout=120) as response:
        lines = response.iter_lines()
        for line in lines:
            if "output_text.delta" in line:
                break
    deadline = time.monotonic() + 10
    while httpx.get(f"{responses_server.base_url}/health").json()["models"][MODEL]["busy"] and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{responses_server.base_url}/health").json()["models"][MODEL]["busy"] == 0


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type", "'web_search'"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0", "input_image"),
    ({"model": MODEL, "input": "x", "temprature": 1}, "temprature", "Unknown parameter"),
    ({"model": MODEL, "input": "x", "background": True}, "background", ""),
    ({"model": MODEL, "input": "x", "previous_response_id": "resp_missing"}, "previous_response_id", "not found"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format",
     "needs 'name' and 'schema'"),
    ({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "input.0.type", "item_reference"),
    ({"model": MODEL, "input": ""}, "input", "nothing to answer"),
])
def test_bad_requests_are_400_naming_the_field(responses_server: RunningServer, body: Any, param: str,
                                               says: str) -> None:
    reply = httpx.post(f"{responses_server.base_url}/v1/responses", json=body, headers=AUTH, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert httpx.get(f"{responses_server.base_url}/health").json()["status"] == "ok"


def test_stored_responses_survive_a_restart(tmp_path: Path) -> None:
    with RunningServer(tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        first = client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=6, temperature=0)
    assert (tmp_path / "responses.sqlite3").stat().st_mode & 0o777 == 0o600
    with RunningServer(tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        again = client.responses.create(model=MODEL, input="Another one.", previous_response_id=first.id,
                                        max_output_tokens=6, temperature=0)
        assert again.usage.input_tokens > first.usage.input_tokens


def test_reasoning_effort_runs_a_thinking_pass_shown_as_a_reasoning_item(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "Describe an animal.", "text": ANIMAL_FORMAT,
                              "temperature": 0, "store": False, "reasoning": {"effort": "low", "summary": "auto"}}
    reply = client.responses.create(**kwargs)
    assert [item.type for item in reply.output] == ["reasoning", "message"]
    assert reply.output[0].content[0].text.startswith("<thinking>")
    assert reply.usage.output_tokens_details.reasoning_tokens > 0
    jsonschema.validate(json.loads(reply.output_text), ANIMAL)
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message"]
    jsonschema.validate(json.loads(final.output_text), ANIMAL)
    none = client.responses.create(**{**kwargs, "reasoning": {"effort": "none"}})
    assert [item.type for item in none.output] == ["message"]


def test_an_answer_cut_at_max_output_tokens_is_closed_and_says_so(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "Describe a cat.", "text": ANIMAL_FORMAT, "temperature": 0,
                              "store": False, "max_output_tokens": 12}
    reply = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:  # the SDK's get_final_response wants response.completed
        final = next(event.response for event in stream if event.type == "response.incomplete")
    for response in (reply, final):
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        assert response.incomplete_details.model_extra.get("output_closed") is True
        assert set(json.loads(response.output_text)) == set(ANIMAL["required"])
        assert response.usage.output_tokens <= 12
