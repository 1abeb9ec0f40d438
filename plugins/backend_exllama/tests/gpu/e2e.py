"""End to end over HTTP with the openai client, against the server ``server.py start`` left running.

The served model may be the tiny random-weight Llama, whose text is noise, so every check is about behaviour
that holds for any weights: a request ends with a proper finish reason and usage, a stream closes with one
finish and its usage, a stop string never shows, a constrained output (JSON schema, regex, required or named
tool call) is valid against its constraint, ``tool_choice="none"`` calls nothing, features (artifact, thinking)
answer in their shape, concurrent requests all finish, a repeated prompt is served from the cache, and bad
requests get the right 4xx. Constrained schemas are bounded (string lengths, enums, integer ranges, one call)
so that noise cannot run them into ``max_tokens``.

Each check's result is appended to the report as soon as it is known; a failed check never stops the next.
Exit code: the number of failed checks (capped at 100).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
from checklib import progress, report, server_state
from openai import OpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search_web", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 16},
                                                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["query"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "current_time", "description": "The time now."}}
TOOLS = [WEATHER, SEARCH, NOW]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False})
           for t in TOOLS}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["pilot", "baker", "chess player"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "email": {"type": ["string", "null"], "maxLength": 20}},
    "required": ["name", "age", "role", "tags"], "additionalProperties": False}
PHONE = r"[0-9]{3}-[0-9]{4}"
THINKING = """
<chain_of_thought>
  <problem>{problem_statement}</problem>
  <steps>
    <step>{action1}</step>
  </steps>
  <final_answer>Only the final answer</final_answer>
</chain_of_thought>
"""
FINISHED = ("stop", "length")


# -- a JSON schema check for the keywords the schemas above use ---------------------------------------------
def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema`` (type, enum, const, properties, required,
    additionalProperties, items, min/maxItems, min/maxLength, minimum/maximum); [] when valid."""
    errors: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
                  "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
                  "null": lambda v: v is None,
                  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool)}
        if not any(checks[name](value) for name in names):
            return [f"{where}: {value!r} is not of type {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r} != {schema['const']!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{where}: missing {key}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected key {key}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: {len(value)} items")
        for index, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{index}]")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        errors.append(f"{where}: length {len(value)}")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{where}: {value} out of range")
    return errors


def check_call(call: Any, names: set[str]) -> str:
    """A tool call from the API: known function, arguments valid against its schema; returns a short text."""
    assert call.type == "function" and call.id, call
    assert call.function.name in names, f"unknown function {call.function.name}"
    arguments = json.loads(call.function.arguments)
    errors = schema_errors(arguments, SCHEMAS[call.function.name])
    assert not errors, f"{call.function.name} {call.function.arguments}: {errors}"
    return f"{call.function.name}({call.function.arguments})"


def check_usage(usage: Any, finish: str, max_tokens: int) -> None:
    assert usage is not None, "no usage"
    assert usage.prompt_tokens > 0, usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
    assert 0 <= usage.completion_tokens <= max_tokens, usage
    if finish == "length":
        assert usage.completion_tokens == max_tokens, f"finish length with {usage.completion_tokens} tokens"


def short(text: Any, size: int = 60) -> str:
    return json.dumps(text)[:size]


# -- the checks ----------------------------------------------------------------------------------------------
class Checks:
    def __init__(self, base_url: str, model: str) -> None:
        self.base_url = base_url
        self.model = model
        # on a GPU every request here takes seconds: a stuck one should fail its check, not eat the phase
        timeout = float(os.environ.get("GPU_CHECK_REQUEST_TIMEOUT_S") or 30)
        self.client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=timeout)
        self.failed: list[str] = []
        self.passed = 0
        self.greedy = ""  # the plain chat answer, for the stream and stop checks

    def run(self, name: str, check: Callable[[], str]) -> None:
        began = time.monotonic()
        try:
            detail = check()
        except Exception as error:  # a failed check is reported and the next one runs
            seconds = time.monotonic() - began
            self.failed.append(name)
            message = f"{type(error).__name__}: {error}".replace("\n", " ")[:400]
            progress(f"e2e FAIL {name} ({seconds:.1f} s): {message}")
            report(f"- FAIL `{name}` ({seconds:.1f} s): {message}")
            return
        seconds = time.monotonic() - began
        self.passed += 1
        progress(f"e2e ok   {name} ({seconds:.1f} s): {detail}")
        report(f"- ok `{name}` ({seconds:.1f} s): {detail}")

    def chat(self, content: str, **keys: Any) -> Any:
        keys.setdefault("temperature", 0)
        return self.client.chat.completions.create(model=self.model,
                                                   messages=[{"role": "user", "content": content}], **keys)

    def stream(self, content: str, **keys: Any) -> list[Any]:
        keys.setdefault("temperature", 0)
        return list(self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], stream=True,
            stream_options={"include_usage": True}, **keys))

    # basic chat ---------------------------------------------------------------------------------------------
    def models(self) -> str:
        names = [m.id for m in self.client.models.list()]
        assert self.model in names, names
        return f"/v1/models lists {names}"

    def plain_chat(self) -> str:
        answer = self.chat("Name three colours.", max_tokens=24)
        choice = answer.choices[0]
        assert choice.finish_reason in FINISHED, choice.finish_reason
        assert isinstance(choice.message.content, str) and not choice.message.tool_calls
        check_usage(answer.usage, choice.finish_reason, 24)
        self.greedy = choice.message.content
        return f"{choice.finish_reason}, usage {answer.usage.prompt_tokens}+{answer.usage.completion_tokens}, " \
               f"text {short(self.greedy)}"

    def streaming(self) -> str:
        chunks = self.stream("Name three colours.", max_tokens=24)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finishes) == 1 and finishes[0] in FINISHED, finishes
        usage = chunks[-1].usage
        assert usage is not None and not chunks[-1].choices, "the last chunk is not the usage chunk"
        check_usage(usage, finishes[0], 24)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        same = "same text as" if text == self.greedy else "DIFFERENT text from"
        return f"{len(chunks)} chunks, {finishes[0]}, usage {usage.completion_tokens} tokens, {same} non-stream"

    def stop_string(self) -> str:
        """A character the greedy answer has (ASCII: noise text may hold partial UTF-8) must end the same
        request early and never show."""
        stop = next((ch for ch in self.greedy[4:] if ch.isascii() and ch.isalnum()), "e")
        answer = self.chat("Name three colours.", max_tokens=24, stop=[stop])
        text = answer.choices[0].message.content or ""
        finish = answer.choices[0].finish_reason
        assert stop not in text, f"stop {stop!r} leaked: {text!r}"
        assert finish in FINISHED, finish
        note = "" if finish == "stop" or stop not in self.greedy else " (WARN: the greedy text had it, yet length)"
        return f"stop {stop!r}: {short(text)}, {finish}{note}"

    def one_token(self) -> str:
        answer = self.chat("Hello", max_tokens=1)
        check_usage(answer.usage, answer.choices[0].finish_reason, 1)
        return f"{answer.choices[0].finish_reason}, {answer.usage.completion_tokens} token"

    def legacy_completion(self) -> str:
        answer = self.client.completions.create(model=self.model, prompt="Once upon a time", max_tokens=16,
                                                temperature=0)
        assert answer.choices[0].finish_reason in FINISHED
        check_usage(answer.usage, answer.choices[0].finish_reason, 16)
        return f"{answer.choices[0].finish_reason}: {short(answer.choices[0].text)}"

    # tools --------------------------------------------------------------------------------------------------
    def tools_none(self) -> str:
        answer = self.chat("What's the weather in Paris?", tools=TOOLS, tool_choice="none", max_tokens=32)
        choice = answer.choices[0]
        assert not choice.message.tool_calls and choice.finish_reason in FINISHED, choice
        assert "<tool_call>" not in (choice.message.content or "")
        return f"no call, {choice.finish_reason}: {short(choice.message.content)}"

    def tools_auto(self) -> str:
        answer = self.chat("What's the weather in Paris?", tools=TOOLS, tool_choice="auto", max_tokens=160,
                           parallel_tool_calls=False)
        choice = answer.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls", choice.finish_reason
            assert len(choice.message.tool_calls) == 1
            return "called " + check_call(choice.message.tool_calls[0], set(SCHEMAS))
        assert choice.finish_reason in FINISHED and "<tool_call>" not in (choice.message.content or "")
        return f"answered in text, {choice.finish_reason}: {short(choice.message.content)}"

    def tools_required(self) -> str:
        answer = self.chat("Find recent news about Mars.", tools=TOOLS, tool_choice="required", max_tokens=200,
                           parallel_tool_calls=False)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice.finish_reason
        assert choice.message.content is None and len(choice.message.tool_calls or []) == 1, choice.message
        check_usage(answer.usage, "tool_calls", 200)
        return check_call(choice.message.tool_calls[0], set(SCHEMAS))

    def tools_required_parallel(self) -> str:
        answer = self.chat("Weather in Oslo and Rome, and the time.", tools=TOOLS, tool_choice="required",
                           max_tokens=400)
        choice = answer.choices[0]
        if choice.finish_reason == "length":  # parallel calls are unbounded in number: noise may go on calling
            return f"WARN ran to max_tokens with {len(choice.message.tool_calls or [])} calls parsed"
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        return f"{len(choice.message.tool_calls)} calls: " + ", ".join(
            check_call(call, set(SCHEMAS)) for call in choice.message.tool_calls)

    def tools_named(self) -> str:
        named = {"type": "function", "function": {"name": "get_weather"}}
        answer = self.chat("Find recent news about Mars.", tools=TOOLS, tool_choice=named, max_tokens=200)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", choice.finish_reason
        assert [c.function.name for c in choice.message.tool_calls or []] == ["get_weather"], choice.message
        return check_call(choice.message.tool_calls[0], {"get_weather"})

    def tools_named_stream(self) -> str:
        named = {"type": "function", "function": {"name": "search_web"}}
        chunks = self.stream("What's the weather in Paris?", tools=TOOLS, tool_choice=named, max_tokens=200)
        calls: dict[int, dict[str, str]] = {}
        for chunk in chunks:
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["tool_calls"], finishes
        assert [c["name"] for c in calls.values()] == ["search_web"], calls
        errors = schema_errors(json.loads(calls[0]["arguments"]), SCHEMAS["search_web"])
        assert not errors and calls[0]["id"], (calls, errors)
        return f"{len(chunks)} chunks, search_web({calls[0]['arguments']})"

    def tool_result_round_trip(self) -> str:
        first = self.chat("What's the weather in Paris?", tools=[WEATHER], tool_choice="required", max_tokens=120,
                          parallel_tool_calls=False).choices[0].message
        call = first.tool_calls[0]
        messages = [{"role": "user", "content": "What's the weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        answer = self.client.chat.completions.create(model=self.model, messages=messages, tools=[WEATHER],
                                                     tool_choice="none", max_tokens=24, temperature=0)
        choice = answer.choices[0]
        assert not choice.message.tool_calls and choice.finish_reason in FINISHED, choice
        return f"answer after the tool result: {choice.finish_reason}, prompt {answer.usage.prompt_tokens} tokens"

    # structured output ------------------------------------------------------------------------------------
    def json_schema(self) -> str:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        answer = self.chat("A pilot from Rome as JSON.", response_format=fmt, max_tokens=200)
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", f"{choice.finish_reason}: {choice.message.content!r}"
        value = json.loads(choice.message.content)
        errors = schema_errors(value, PERSON)
        assert not errors, (choice.message.content, errors)
        return choice.message.content

    def json_schema_stream(self) -> str:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        chunks = self.stream("A baker from Lyon as JSON.", response_format=fmt, max_tokens=200)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        errors = schema_errors(json.loads(text), PERSON)
        assert not errors, (text, errors)
        return f"{len(chunks)} chunks: {text}"

    def json_object(self) -> str:
        answer = self.chat("Give a JSON object.", response_format={"type": "json_object"}, max_tokens=300)
        choice = answer.choices[0]
        if choice.finish_reason == "length":  # any JSON object: unbounded, noise may not close it
            return f"WARN ran to max_tokens: {short(choice.message.content)}"
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        return short(choice.message.content, 120)

    def regex(self) -> str:
        answer = self.chat("Give me a phone number.", extra_body={"regex_pattern": PHONE}, max_tokens=20)
        text = answer.choices[0].message.content
        assert re.fullmatch(PHONE, text or ""), text
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].finish_reason
        return f"{text!r}"

    def regex_stream(self) -> str:
        chunks = self.stream("Give me a phone number.", extra_body={"regex_pattern": PHONE}, max_tokens=20)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert re.fullmatch(PHONE, text), text
        return f"{text!r} in {len(chunks)} chunks"

    def regex_prefix(self) -> str:
        answer = self.chat("Is the sky blue?", extra_body={"regex_prefix_pattern": r"(Yes|No)\."}, max_tokens=16)
        text = answer.choices[0].message.content or ""
        assert text.startswith(("Yes.", "No.")), text
        return short(text)

    # features -----------------------------------------------------------------------------------------------
    def artifact(self) -> str:
        answer = self.chat("Write quicksort in Python.", max_tokens=120, extra_body={"artifact": "Fast"})
        kinds = []
        for choice in answer.choices:
            meta = (choice.message.model_extra or {}).get("artifact_meta")
            assert isinstance(meta, dict) and meta.get("tag_type") in ("text", "artifact"), meta
            kinds.append(meta["tag_type"])
            assert choice.finish_reason in FINISHED, choice.finish_reason
        return f"{len(answer.choices)} segments {kinds}"

    def artifact_stream(self) -> str:
        chunks = self.stream("Write quicksort in Python.", max_tokens=120, extra_body={"artifact": "Fast"})
        kinds = set()
        for chunk in chunks:
            if chunk.choices:
                meta = (chunk.choices[0].delta.model_extra or {}).get("artifact_meta")
                if meta is not None:
                    assert meta.get("tag_type") in ("text", "artifact"), meta
                    kinds.add(meta["tag_type"])
        assert kinds, "no artifact_meta in the stream"
        return f"{len(chunks)} chunks, tag types {sorted(kinds)}"

    def thinking(self) -> str:
        answer = self.chat("I had 10 apples and gave 3 away. How many are left?", max_tokens=64,
                           extra_body={"thinking_template": THINKING})
        choice = answer.choices[0]
        content = choice.message.content or ""
        assert "<chain_of_thought>" not in content and "<step>" not in content, content
        assert choice.finish_reason in FINISHED, choice.finish_reason
        return f"{choice.finish_reason}, answer {short(content)}, usage {answer.usage.completion_tokens} tokens"

    def thinking_separate(self) -> str:
        answer = self.chat("2 + 2?", max_tokens=48,
                           extra_body={"thinking_template": THINKING, "return_thinking": "separate"})
        message = answer.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content")
        assert reasoning, f"no reasoning_content: {message}"
        return f"reasoning {short(reasoning)}, answer {short(message.content)}"

    # serving ------------------------------------------------------------------------------------------------
    def concurrent(self) -> str:
        results: list[Any] = [None] * 8
        began = time.monotonic()

        def one(index: int) -> None:
            try:
                results[index] = self.chat(f"Story number {index}: once upon a time", max_tokens=32)
            except Exception as error:
                results[index] = error

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors[:2]
        for result in results:
            check_usage(result.usage, result.choices[0].finish_reason, 32)
        return f"8 requests in {time.monotonic() - began:.2f} s, " \
               f"{sum(r.usage.completion_tokens for r in results)} tokens"

    def cached_prompt(self) -> str:
        prompt = "The capital of France is Paris. " * 40 + "And the capital of Italy is"
        self.chat(prompt, max_tokens=4)
        again = self.chat(prompt, max_tokens=4)
        details = again.usage.prompt_tokens_details
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        assert cached and cached > 0, f"no cached tokens on a repeated prompt: {again.usage}"
        return f"{cached} of {again.usage.prompt_tokens} prompt tokens from the cache"

    def cancelled_stream(self) -> str:
        stream = self.client.chat.completions.create(model=self.model, stream=True, max_tokens=400,
                                                     messages=[{"role": "user", "content": "Tell a long story."}])
        got = 0
        for _ in stream:
            got += 1
            if got >= 3:
                break
        stream.close()
        answer = self.chat("Hello again", max_tokens=8)
        assert answer.choices[0].finish_reason in FINISHED
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            model = httpx.get(f"{self.base_url}/health", timeout=5).json()["models"][self.model]
            if not model.get("busy"):
                return f"closed after {got} chunks; the next request answered; health busy=0"
            time.sleep(0.2)
        raise AssertionError(f"still busy after a closed stream: {model}")

    # errors -------------------------------------------------------------------------------------------------
    def errors(self) -> str:
        seen = []
        cases: list[tuple[str, dict[str, Any], type[Exception]]] = [
            ("unknown model", {"model": "no-such-model"}, openai.NotFoundError),
            ("bad regex", {"extra_body": {"regex_pattern": "a("}}, openai.BadRequestError),
            ("required without tools", {"tool_choice": "required"}, openai.BadRequestError),
            ("artifact with tools", {"tools": TOOLS, "extra_body": {"artifact": "Fast"}}, openai.BadRequestError),
        ]
        for name, keys, expected in cases:
            body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **keys}
            try:
                self.client.chat.completions.create(**body)
            except expected as error:
                seen.append(f"{name}: {error.status_code}")
                continue
            raise AssertionError(f"{name}: no {expected.__name__}")
        return ", ".join(seen)

    def health_after(self) -> str:
        health = httpx.get(f"{self.base_url}/health", timeout=5).json()
        model = health["models"][self.model]
        assert health["status"] == "ok" and model["status"] == "ok", health
        return json.dumps({k: v for k, v in model.items() if k != "replicas"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", required=True, help="server.py's state file")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args()
    state = server_state(args.state)
    checks = Checks(state["base_url"], state["model"])
    names = [
        "models", "plain_chat", "streaming", "stop_string", "one_token", "legacy_completion",
        "tools_none", "tools_auto", "tools_required", "tools_named", "tools_named_stream", "tools_required_parallel",
        "tool_result_round_trip", "json_schema", "json_schema_stream", "json_object", "regex", "regex_stream",
        "regex_prefix", "artifact", "artifact_stream", "thinking", "thinking_separate", "concurrent",
        "cached_prompt", "cancelled_stream", "errors", "health_after",
    ]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    began = time.monotonic()
    for name in names:
        checks.run(name, getattr(checks, name))
    summary = f"{checks.passed} passed, {len(checks.failed)} failed in {time.monotonic() - began:.0f} s"
    report(f"- e2e: {summary}" + (f" (failed: {', '.join(checks.failed)})" if checks.failed else ""))
    progress(f"e2e: {summary}")
    return min(len(checks.failed), 100)


if __name__ == "__main__":
    raise SystemExit(main())
