"""Request validation: strict, every refusal is a 400 that names the field."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from gallama_kernel import hookimpl
from gallama_kernel.api.app import create_app
from gallama_kernel.pipeline.models import ModelRegistry
from gallama_kernel.plugins import PluginHost, RequestField
from gallama_kernel.protocol.errors import InvalidRequest, ModelNotFound
from gallama_kernel.protocol.openai import ChatCompletionRequest, CompletionRequest, validate_request

USER = [{"role": "user", "content": "hi"}]
F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def chat(fields: dict[str, Any] | None = None, **body: Any) -> ChatCompletionRequest:
    return validate_request(ChatCompletionRequest, {"model": "m", "messages": USER, **body}, fields or {})


def refused(request_model: type = ChatCompletionRequest, fields: dict[str, Any] | None = None, /,
            **body: Any) -> InvalidRequest:
    chat_like = request_model is ChatCompletionRequest
    base = {"model": "m", "messages": USER} if chat_like else {"model": "m", "prompt": "p"}
    with pytest.raises(InvalidRequest) as caught:
        validate_request(request_model, {**base, **body}, fields or {})
    assert caught.value.status == 400
    return caught.value


# -- refusals ------------------------------------------------------------------------------------------

def test_unknown_field_is_refused_with_its_name() -> None:
    error = refused(frobnicate=True)
    assert error.param == "frobnicate"
    assert error.code == "unknown_field"
    assert "frobnicate" in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error",
                                      "param": "frobnicate", "code": "unknown_field"}}


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stream": "maybe"}, "stream"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages.0.mood"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    ({"model": 5}, "model"),
])
def test_wrong_types_name_the_field(body: dict[str, Any], param: str) -> None:
    error = refused(**body)
    assert error.param == param
    assert f"'{param}'" in error.message


def test_missing_required_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(ChatCompletionRequest, {"messages": USER}, {})
    assert caught.value.param == "model"


@pytest.mark.parametrize("body", [[], "text", None, 3])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        validate_request(ChatCompletionRequest, body, {})


def test_wrong_content_type_names_the_message_content() -> None:
    assert (refused(messages=[{"role": "user", "content": 5}]).param or "").startswith("messages.0.content")


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"42": 1.0}}, "logit_bias"),
    ({"tools": [F, F]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [F], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "params": {}}}]}, "tools.0.function.params"),
    ({"tool_choice": "sometimes", "tools": [F]}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "regex_pattern": "a"}, "regex_pattern"),
    ({"grammar": "start: \"a\"", "regex_prefix_pattern": "a"}, "grammar"),
])
def test_unsupported_options_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(**body).param == param


@pytest.mark.parametrize("body", [
    {"n": 1}, {"logprobs": False}, {"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
    {"tools": [F], "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": False},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}},
    {"stream": True, "stream_options": {"include_usage": True}}, {"user": "u1", "seed": 3},
])
def test_harmless_values_of_those_options_are_accepted(body: dict[str, Any]) -> None:
    chat(**body)


@pytest.mark.parametrize(("body", "param"), [
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"n": 3}, "n"),
    ({"echo": True, "frobnicate": 1}, "frobnicate"),
])
def test_completion_refusals(body: dict[str, Any], param: str) -> None:
    assert refused(CompletionRequest, **body).param == param


def test_completion_accepts_token_prompts_and_single_prompt_lists() -> None:
    for prompt in ("text", ["text"], [1, 2, 3]):
        request = validate_request(CompletionRequest, {"model": "m", "prompt": prompt}, {})
        assert request.prompt == prompt
        assert request.max_tokens == 16


# -- accepted fields ---------------------------------------------------------------------------------

def test_stop_and_stop_words_merge() -> None:
    assert chat(stop="END").stop_list == ["END"]
    assert chat(stop_words=["A", "B"]).stop_list == ["A", "B"]
    assert chat(stop=["A", ""], stop_words="B").stop_list == ["A", "B"]
    assert chat(stop=["A", "B"], stop_words=["B", "C"]).stop_list == ["A", "B", "C"]
    assert chat().stop_list == []


def test_max_completion_tokens() -> None:
    assert chat(max_completion_tokens=7).token_limit == 7
    assert chat(max_tokens=9).token_limit == 9
    assert chat(max_tokens=9, max_completion_tokens=7).token_limit == 7
    assert chat().token_limit is None
    assert refused(max_completion_tokens=0).param == "max_completion_tokens"


def test_messages_content_parts_and_roles() -> None:
    request = chat(messages=[
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ])
    assert [m.text for m in request.messages] == ["rules", "ab", "", "42"]


def test_include_usage_and_gallama_fields() -> None:
    request = chat(stream=True, stream_options={"include_usage": True}, leading_prompt="<think>", top_k=40,
                   min_p=0.05, repeat_penalty=1.1)
    assert request.include_usage
    assert request.leading_prompt == "<think>"
    assert (request.top_k, request.min_p, request.repeat_penalty) == (40, 0.05, 1.1)
    assert not chat(stream=True).include_usage


def test_declared_plugin_field_is_validated_and_lands_in_extensions() -> None:
    fields = {"artifact": RequestField("artifact", bool, "d", "p"), "depth": RequestField("depth", int, "d", "p")}
    request = chat(fields, artifact=True, depth="3")
    assert request.extensions == {"artifact": True, "depth": 3}
    assert chat(fields).extensions == {}
    assert refused(ChatCompletionRequest, fields, depth="deep").param == "depth"


def test_extensions_cannot_be_set_by_the_client() -> None:
    fields = {"artifact": RequestField("artifact", bool, "d", "p")}
    with pytest.raises(InvalidRequest) as caught:
        chat(fields, extensions={"artifact": "not-a-bool", "undeclared": 1})
    assert caught.value.param == "extensions"


def test_model_not_found_error() -> None:
    error = ModelNotFound("nope", ["a", "b"])
    assert error.status == 404
    assert error.param == "model"
    assert error.code == "model_not_found"
    assert "a, b" in error.message


# -- over HTTP, without a model --------------------------------------------------------------------------

def test_http_refusals_are_openai_error_bodies() -> None:
    class Fields:
        @hookimpl
        def register_request_fields(self, register):
            register("artifact", bool, "Return artifacts.")

    host = PluginHost()
    host.register(Fields(), "fields")
    with TestClient(create_app(ModelRegistry(), host)) as client:
        response = client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "bogus": 1})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "bogus"
        assert response.json()["error"]["type"] == "invalid_request_error"

        response = client.post("/v1/chat/completions", content=b"{not json")
        assert response.status_code == 400
        assert "not valid JSON" in response.json()["error"]["message"]

        response = client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "n": 2})
        assert (response.status_code, response.json()["error"]["param"]) == (400, "n")

        # a declared field passes validation; the request then fails on the (absent) model, with a 404
        response = client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "artifact": True})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"

        schema = client.get("/openapi.json").json()
        body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
        assert "artifact" in body["schema"]["properties"]
