"""Tool calls without a model: the grammar, its read-back, the stream parser, history rendering."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from gallama_kernel.grammar.tool_formats import HERMES, ToolCallReader
from gallama_kernel.grammar.tools import CALL_SEPARATOR, ToolSpec, call_text, grammar_for_tools, read_calls
from gallama_kernel.pipeline.constraints import Constraint, compile_constraint
from gallama_kernel.pipeline.service import merge_delta
from gallama_kernel.pipeline.tools import render_history

TOOLS = [
    ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                              "unit": {"enum": ["c", "f"]}},
                             "required": ["city"], "additionalProperties": False}),
    ToolSpec("now", {}),
]
WEATHER = call_text("get_weather", '{"city":"Paris","unit":"c"}')
NOW = call_text("now", "{}")


def test_required_grammar_accepts_calls_and_refuses_text() -> None:
    grammar = grammar_for_tools(TOOLS, "required")
    assert grammar.matches(WEATHER)
    assert grammar.matches(WEATHER + CALL_SEPARATOR + NOW)
    assert not grammar.matches("hello")
    assert not grammar.matches(call_text("get_weather", '{"town":"Paris"}'))
    assert not grammar.matches(call_text("launch", "{}"))


def test_parallel_false_and_named_choice_allow_one_call() -> None:
    assert not grammar_for_tools(TOOLS, "required", parallel=False).matches(WEATHER + CALL_SEPARATOR + NOW)
    named = grammar_for_tools(TOOLS, "now")
    assert named.matches(NOW)
    assert not named.matches(WEATHER)


def test_auto_grammar_allows_text_or_calls_never_a_broken_call() -> None:
    grammar = grammar_for_tools(TOOLS, "auto")
    for ok in ["Hello there", "", WEATHER, "<tool", "I will not <tool_call> you"]:
        assert grammar.matches(ok), ok
    assert not grammar.matches("<tool_call>{oops")


def test_calls_are_read_back_by_the_parser() -> None:
    grammar = grammar_for_tools(TOOLS, "required")
    text = WEATHER + CALL_SEPARATOR + NOW
    calls = read_calls(grammar.parse(text), text, TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris","unit":"c"}'), ("now", "{}")]


def test_compiled_constraints_are_cached() -> None:
    constraint = Constraint("tools", "tools", tools=tuple(TOOLS), choice="required")
    assert compile_constraint(constraint) is compile_constraint(Constraint("tools", "tools", tools=tuple(TOOLS),
                                                                           choice="required"))
    after = compile_constraint(constraint, after="</think>")
    assert after.matches("let me think</think>" + WEATHER)
    assert not after.matches(WEATHER)


def accumulate(stream: ToolCallReader, pieces: list[str]) -> tuple[dict, list[dict]]:
    message: dict = {"role": "assistant", "content": ""}
    deltas: list[dict] = []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.finish()
    for delta in deltas:
        merge_delta(message, delta)
    return message, deltas


def chunks(text: str, cuts: list[int]) -> list[str]:
    edges = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    return [text[a:b] for a, b in itertools.pairwise(edges)]


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=30))
def test_stream_parser_is_independent_of_chunking(cuts: list[int]) -> None:
    text = WEATHER + CALL_SEPARATOR + NOW
    message, deltas = accumulate(HERMES.reader([], may_answer=False), chunks(text, cuts))
    assert message["content"] == ""
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city":"Paris","unit":"c"}'), ("now", "{}")]
    firsts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [f["index"] for f in firsts] == [0, 1]
    assert all(f["type"] == "function" and f["function"]["name"] for f in firsts)


@given(st.lists(st.integers(min_value=0, max_value=100), max_size=10))
def test_auto_text_passes_through(cuts: list[int]) -> None:
    for text in ["Just text.", "<to be or not>", "<tool"]:
        message, _ = accumulate(HERMES.reader([], may_answer=True), chunks(text, cuts))
        assert message["content"] == text
        assert "tool_calls" not in message


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_reasoning_before_calls_passes_through_as_content(cuts: list[int]) -> None:
    text = "think about </thi it</think>" + WEATHER
    message, _ = accumulate(HERMES.reader([], may_answer=True, after="</think>"), chunks(text, cuts))
    assert message["content"] == "think about </thi it</think>"
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_history_renders_calls_as_generated_and_results_as_a_user_turn() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    out = render_history(messages)
    assert out[1] == {"role": "assistant", "content": WEATHER + CALL_SEPARATOR + NOW}
    assert out[2]["role"] == "user"
    assert '<tool_response name="get_weather">\n21C\n</tool_response>' in out[2]["content"]
    assert '<tool_response name="now">\nnoon\n</tool_response>' in out[2]["content"]
    assert len(out) == 3
    assert json.loads(out[1]["content"][len("<tool_call>"):].split("</tool_call>")[0])["name"] == "get_weather"
