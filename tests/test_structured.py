"""Structured output end to end: response_format, regex fields and Lark grammars, enforced by the engine."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": ["string", "null"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["friend", "colleague", "family"]}, "maxItems": 3},
        "status": {"anyOf": [{"const": "active"}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "address", "tags"],
    "additionalProperties": False,
}

PROMPTS = [
    "Describe a fictional person as JSON.", "Give me a customer record.", "Who is Ada Lovelace?",
    "Make up a neighbour who likes cats.", "A teacher from Paris.", "A child who plays chess.",
    "Invent a pilot.", "A retired baker from Lyon.", "A musician on tour.", "My friend Tom, 31.",
    "Someone from Tokyo.", "A doctor with two colleagues.", "Nobody in particular.", "A student, age 19.",
    "An astronaut.", "Return a person named Zoë.", "Tell me about Bob the builder.", "A gardener.",
    "An old sailor.", "A software engineer in Berlin.",
]


def ask(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kwargs)


def test_json_schema_twenty_prompts_all_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in PROMPTS:
        completion = ask(client, prompt, response_format=fmt, max_tokens=300)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object(client):
    completion = ask(client, "Give a person's name and age as JSON.", response_format={"type": "json_object"},
                     max_tokens=120)  # greedy SmolLM2 loops on most open-ended JSON prompts
    assert completion.choices[0].finish_reason == "stop", completion.choices[0].message.content
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


class City(BaseModel):
    name: str
    country: str
    population: int


class Trip(BaseModel):
    title: str
    cities: list[City] = Field(max_length=3)  # greedy SmolLM2 otherwise repeats array items until max_tokens
    days: int


def test_openai_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Plan a trip through two European cities."}],
        response_format=Trip, temperature=0, max_tokens=300)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Trip)


def test_json_schema_stream_equals_non_stream(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask(client, "A person from Rome.", response_format=fmt, max_tokens=200)  # both below then reuse the same cache
    whole = ask(client, "A person from Rome.", response_format=fmt, max_tokens=200)
    parts = [c.choices[0].delta.content or "" for c in
             ask(client, "A person from Rome.", response_format=fmt, max_tokens=200, stream=True) if c.choices]
    assert "".join(parts) == whole.choices[0].message.content
    assert len([p for p in parts if p]) > 3


def test_regex_pattern_whole_output(client):
    pattern = r"\d{3}-\d{4}"
    completion = ask(client, "Give me a phone number.", extra_body={"regex_pattern": pattern}, max_tokens=20)
    assert re.fullmatch(pattern, completion.choices[0].message.content)
    assert completion.choices[0].finish_reason == "stop"


def test_regex_prefix_then_free_text_with_leading_prompt_and_stop(client):
    completion = ask(client, "Is the sky blue? Answer and explain.", max_tokens=40,
                     extra_body={"regex_prefix_pattern": "(Yes|No), ", "leading_prompt": "Answer: ",
                                 "stop_words": ["\n"]})
    content = completion.choices[0].message.content
    assert re.match(r"(Yes|No), ", content), content
    assert "\n" not in content


def test_lark_grammar(client):
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/\n'
    completion = ask(client, "What is 6 times 7?", extra_body={"grammar": grammar}, max_tokens=20)
    assert re.fullmatch(r"The answer is [0-9]+\.", completion.choices[0].message.content)


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}}}},
     "response_format.json_schema.schema", "multipleOf"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema", "not"),
    ({"regex_pattern": "(a)\\1"}, "regex_pattern", "back"),
    ({"regex_pattern": "a(?=b)"}, "regex_pattern", "look"),
    ({"regex_pattern": "a("}, "regex_pattern", ""),
    ({"grammar": "start: (("}, "grammar", "Lark"),
    ({"grammar": "start: \"a\"", "regex_pattern": "a"}, "grammar", "one output constraint"),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
])
def test_unenforceable_constraints_are_400(server, client, body, param, needle):
    response = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert needle.lower() in error["message"].lower()
    assert error["type"] == "invalid_request_error"
    assert ask(client, "hi", max_tokens=2).choices[0].message.content is not None  # still serving


def test_openai_client_raises_bad_request_for_unsupported_keyword(client):
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", max_tokens=5, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}})
