"""Request validation: strict, every refusal is a 400 that names the field."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from gallama_kernel import hookimpl
from gallama_kernel.api.app import create_app
from gallama_kernel.pipeline import constraints, tools
from gallama_kernel.pipeline.models import ModelRegistry
from gallama_kernel.pipeline.service import ChatService
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
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
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

        response = client.post("/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
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


# -- tool_choice without tools -------------------------------------------------------------------------

@pytest.mark.parametrize("body", [{"tool_choice": "auto"}, {"tool_choice": "none"}, {"tools": []},
                                  {"tool_choice": "auto", "tools": []},
                                  {"tool_choice": "auto", "parallel_tool_calls": False}])
def test_auto_or_none_without_tools_constrains_nothing(body: dict[str, Any]) -> None:
    request = chat(**body)
    assert request.effective_tool_choice == "none"
    assert constraints.from_request(request) is None
    assert constraints.from_request(chat(response_format={"type": "json_object"}, **body)).kind == "json_object"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("given", [{}, {"tools": []}])
def test_a_choice_that_demands_a_call_needs_tools(choice: Any, given: dict[str, Any]) -> None:
    error = refused(tool_choice=choice, **given)
    assert error.param == "tool_choice"
    assert "needs tools" in error.message


def test_auto_with_tools_is_still_auto() -> None:
    assert chat(tools=[F]).effective_tool_choice == "auto"
    assert chat(tools=[F], tool_choice="required").effective_tool_choice == "required"


# -- messages as the official clients send them back -----------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
PARSE_MESSAGE = {"content": '{"name":"x"}', "role": "assistant", "tool_calls": None, "parsed": {"name": "x"}}
STREAM_MESSAGE = {"content": "", "refusal": None, "role": "assistant", "annotations": None, "audio": None,
                  "function_call": None, "parsed": None, "tool_calls": [
                      {**CALL, "function": {**CALL["function"], "parsed_arguments": {"x": 1}}, "index": 0}]}


def rendered(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as the generic tool history renders them (the path SmolLM2 takes)."""
    request = chat(messages=[*USER, *messages])
    return tools.render_history([ChatService._message_dict(m) for m in request.messages])


@pytest.mark.parametrize("message", [
    PARSE_MESSAGE, STREAM_MESSAGE,
    {"role": "assistant", "content": "hi", "annotations": [{"type": "url_citation", "url_citation": {
        "url": "u", "title": "t", "start_index": 0, "end_index": 1}}], "audio": {"id": "audio_1"}},
    {"role": "assistant", "content": "hi", "reasoning_content": "earlier thoughts", "name": "bot"},
    {"role": "user", "content": [{"type": "text", "text": "hi", "prompt_cache_breakpoint": {"mode": "explicit"}}],
     "name": "ann"},
    {"role": "developer", "content": "rules", "name": "ops"},
])
def test_every_documented_message_field_is_accepted(message: dict[str, Any]) -> None:
    chat(messages=[*USER, message])


def test_fields_that_carry_nothing_to_generate_from_are_not_rendered() -> None:
    plain = rendered({"role": "assistant", "content": '{"name":"x"}'})
    assert rendered(PARSE_MESSAGE) == plain
    assert rendered({"role": "assistant", "content": '{"name":"x"}', "reasoning_content": "hmm", "audio": {"id": "a"},
                     "annotations": [], "refusal": None, "function_call": None}) == plain


def test_sdk_tool_calls_render_like_plain_ones() -> None:
    result = {"role": "tool", "tool_call_id": "call_1", "content": "2"}
    assert rendered(STREAM_MESSAGE, result) == rendered({"role": "assistant", "content": None, "tool_calls": [CALL]},
                                                         result)


def test_a_refusal_is_what_the_assistant_said() -> None:
    expected = rendered({"role": "assistant", "content": "I can't help with that."})
    assert rendered({"role": "assistant", "content": None, "refusal": "I can't help with that."}) == expected
    assert rendered({"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}) \
        == expected
    both = rendered({"role": "assistant", "content": "Partly.", "refusal": "No more."})
    assert both[-1]["content"] == "Partly.\nNo more."


def test_legacy_function_call_and_result_render_like_a_tool_call_and_result() -> None:
    legacy = rendered({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x":1}'}},
                      {"role": "function", "name": "f", "content": "2"})
    modern = rendered({"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "2"})
    assert legacy == modern
    assert '<tool_response name="f">' in legacy[-1]["content"]


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "x", "refusal": "no"}, "messages.1.refusal"),
    ({"role": "system", "content": "x", "tool_calls": [CALL]}, "messages.1.tool_calls"),
    ({"role": "tool", "content": "x", "parsed": {"a": 1}}, "messages.1.parsed"),
    ({"role": "assistant", "content": "x", "foo": 1}, "messages.1.foo"),
    ({"role": "assistant", "content": None, "tool_calls": [{**CALL, "extra": 1}]}, "messages.1.tool_calls.0.extra"),
    ({"role": "user", "content": [{"type": "text", "text": "a", "foo": 1}]}, "messages.1.content.0.foo"),
])
def test_unknown_message_fields_are_refused_like_top_level_ones(message: dict[str, Any], param: str) -> None:
    error = refused(messages=[*USER, message])
    assert (error.param, error.code) == (param, "unknown_field")
    assert f"'{param}'" in error.message


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file_1"}},
])
def test_parts_that_cannot_be_read_are_refused_where_they_are(part: dict[str, Any]) -> None:
    error = refused(messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, part]}])
    assert error.param == "messages.0.content.1"
    assert part["type"] in error.message and "messages.0.content.1" in error.message
    assert "not supported by this server" in error.message


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "messages.1.content.0"),
    ({"role": "user", "content": [{"type": "video"}]}, "messages.1.content.0.type"),
    ({"role": "function", "content": "2"}, "messages.1.name"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "f", "input": "x"}}]},
     "messages.1.tool_calls.0.type"),
])
def test_malformed_messages_name_the_place(message: dict[str, Any], param: str) -> None:
    assert refused(messages=[*USER, message]).param == param


# -- top-level fields that change nothing, and those that cannot be honoured ---------------------------

def test_fields_without_effect_on_the_output_are_accepted() -> None:
    request = chat(metadata={"team": "search", "run": "7"}, store=True, user="u1", service_tier="flex",
                   prompt_cache_key="k", prompt_cache_retention="24h", prompt_cache_options={"ttl": "30m"},
                   safety_identifier="hash", modalities=["text"], audio=None, prediction=None)
    assert request.metadata == {"team": "search", "run": "7"}
    assert request.extensions == {}
    assert validate_request(CompletionRequest, {"model": "m", "prompt": "p", "user": "u1"}, {}).user == "u1"


@pytest.mark.parametrize(("body", "param"), [
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"store": "maybe"}, "store"),
    ({"service_tier": "cheap"}, "service_tier"),
    ({"safety_identifier": 5}, "safety_identifier"),
    ({"prompt_cache_options": {"ttl": "1h"}}, "prompt_cache_options.ttl"),
])
def test_fields_without_effect_are_still_type_checked(body: dict[str, Any], param: str) -> None:
    assert refused(**body).param == param


@pytest.mark.parametrize(("body", "param"), [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "old text"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"verbosity": "low"}, "verbosity"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),  # a model that does not reason refuses any other
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_fields_that_would_change_the_output_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    error = refused(**body)
    assert error.param == param
    assert param in error.message


# -- routes --------------------------------------------------------------------------------------------

def test_unknown_routes_and_methods_name_themselves() -> None:
    with TestClient(create_app(ModelRegistry(), PluginHost())) as client:
        response = client.get("/v1/nope")
        assert response.status_code == 404
        assert response.json()["error"] == {"message": "Unknown route: GET /v1/nope", "type": "invalid_request_error",
                                            "param": None, "code": "unknown_route"}
        response = client.post("/v1/models")
        assert response.status_code == 405
        assert response.json()["error"]["message"] == "POST /v1/models is not allowed (allowed: GET)"
        assert response.headers["allow"] == "GET"
        response = client.get("/v1/models/nope")  # a route's own 404 keeps its message
        assert response.json()["error"]["code"] == "model_not_found"
