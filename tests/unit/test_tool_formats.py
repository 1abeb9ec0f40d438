"""Model-native tool-call formats without a model: grammars, read-back, stream readers, rendering, detection."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import jinja2
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gallama_kernel.grammar.core import GrammarBuilder, GrammarError
from gallama_kernel.grammar.json_schema import JsonSchemaCompiler
from gallama_kernel.grammar.tool_formats import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    QWEN3_CODER,
    ToolFormat,
    detect_format,
)
from gallama_kernel.grammar.tools import EMPTY_PARAMETERS, ParsedCall, ToolSpec, grammar_for_tools
from gallama_kernel.pipeline.service import merge_delta

WEATHER = ToolSpec("get_weather", {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "a city"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["city"],
    "additionalProperties": False,
})
BOOK = ToolSpec("book_trip", {
    "type": "object",
    "properties": {
        "travellers": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name"], "additionalProperties": False}},
        "room": {"type": "object", "properties": {"kind": {"enum": ["single", "double"]},
                                                  "smoking": {"type": "boolean"}},
                 "required": ["kind"], "additionalProperties": False},
        "budget": {"type": ["number", "null"]},
        "note": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["travellers", "room"],
    "additionalProperties": False,
})
NOW = ToolSpec("now", {})
TOOLS = [WEATHER, BOOK, NOW]
SCHEMAS: dict[str, Any] = {tool.name: tool.parameters or EMPTY_PARAMETERS for tool in TOOLS}

WEATHER_ARGS = {"city": "Paris", "unit": "celsius", "days": 3}
TRICKY_ARGS = {"city": 'São "Paulo"\n  if a<b: x = "</param"\n</parameter', "when": "2024-02-29"}
EDGE_ARGS = {"city": "\nstarts and ends with a line break\n\n"}
EMPTY_ARGS = {"city": ""}
BOOK_ARGS = {"travellers": [{"name": "Ann", "age": 31}, {"name": "Bo"}], "room": {"kind": "double", "smoking": False},
             "budget": None, "note": "late\narrival <b>", "tags": ["a", "b c"]}
CALL_SETS: list[list[tuple[str, dict[str, Any]]]] = [
    [("get_weather", WEATHER_ARGS)],
    [("get_weather", TRICKY_ARGS)],
    [("get_weather", EDGE_ARGS)],
    [("get_weather", EMPTY_ARGS)],
    [("book_trip", BOOK_ARGS)],
    [("now", {})],
    [("get_weather", WEATHER_ARGS), ("now", {})],
    [("now", {}), ("book_trip", BOOK_ARGS), ("get_weather", TRICKY_ARGS)],
]
CASES = [pytest.param(fmt, calls, id=f"{fmt.name}-{i}") for fmt in FORMATS.values()
         for i, calls in enumerate(CALL_SETS) if fmt.parallel_calls or len(calls) == 1]


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(fmt: ToolFormat, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Calls as the format writes them; arguments handed over spaced, as clients send them."""
    return fmt.render_calls([(name, json.dumps(arguments)) for name, arguments in calls])


def expected(calls: list[tuple[str, dict[str, Any]]]) -> list[ParsedCall]:
    return [ParsedCall(name, compact(arguments)) for name, arguments in calls]


def chunks(text: str, cuts: list[int]) -> list[str]:
    edges = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    return [text[a:b] for a, b in itertools.pairwise(edges)]


def stream(fmt: ToolFormat, pieces: list[str], *, may_answer: bool, after: str | None = None,
           tools: list[ToolSpec] = TOOLS) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    reader = fmt.reader(tools, may_answer=may_answer, after=after)
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        deltas += reader.feed(piece)
    deltas += reader.finish()
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for delta in deltas:
        merge_delta(message, delta)
    return reader, message, deltas


def check_stream(fmt: ToolFormat, pieces: list[str], calls: list[ParsedCall], *, may_answer: bool) -> None:
    """The deltas of ``pieces`` merge into ``calls``, shaped exactly as the OpenAI stream shapes them."""
    reader, message, deltas = stream(fmt, pieces, may_answer=may_answer)
    assert message["content"] == ""
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        (c.name, c.arguments) for c in calls]
    assert reader.calls == calls
    assert reader.complete
    assert len(set(reader.ids)) == len(calls)
    pieces_by_call: list[list[str]] = []
    for delta in deltas:
        assert list(delta) == ["tool_calls"]
        (part,) = delta["tool_calls"]
        index = part["index"]
        if "id" in part:  # a call's first delta: everything but its arguments, calls opened in order
            assert index == len(pieces_by_call)
            assert part == {"index": index, "id": reader.ids[index], "type": "function",
                            "function": {"name": calls[index].name, "arguments": ""}}
            assert part["id"].startswith("call_")
            pieces_by_call.append([])
        else:  # then only pieces of the arguments of the call opened last
            assert index == len(pieces_by_call) - 1
            assert part == {"index": index, "function": {"arguments": part["function"]["arguments"]}}
            assert part["function"]["arguments"]
            pieces_by_call[index].append(part["function"]["arguments"])
    assert ["".join(p) for p in pieces_by_call] == [c.arguments for c in calls]


# --- (a) round trip: rendered calls parse with the grammar and read back --------------------------------------

GOLDEN = {
    "hermes": '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius","days":3}}</tool_call>'
              '<tool_call>{"name":"now","arguments":{}}</tool_call>',
    "hermes_lines": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius","days":3}}\n'
                    '</tool_call>\n<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>',
    "llama3_json": '{"name":"get_weather","parameters":{"city":"Paris","unit":"celsius","days":3}}',
    "harmony": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
               '{"city":"Paris","unit":"celsius","days":3}',
    "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius","days":3}},'
               '{"name":"now","arguments":{}}]',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                   "<parameter=unit>\ncelsius\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n"
                   "</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>",
}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_each_format_writes_its_own_syntax(fmt: ToolFormat) -> None:
    calls = CALL_SETS[0] if not fmt.parallel_calls else CALL_SETS[6]
    assert render(fmt, calls) == GOLDEN[fmt.name]
    assert fmt.build(TOOLS, "required").matches(GOLDEN[fmt.name])


@pytest.mark.parametrize(("fmt", "calls"), CASES)
def test_rendered_calls_parse_with_the_grammar_and_read_back(fmt: ToolFormat, calls: list[Any]) -> None:
    text = render(fmt, calls)
    assert fmt.build(TOOLS, "required").matches(text), text
    assert fmt.build(TOOLS, "auto").matches(text), text
    parsed = fmt.read(text, TOOLS)
    assert parsed == expected(calls)
    for call in parsed:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_render_compacts_arguments_and_takes_empty_ones_as_none() -> None:
    for fmt in FORMATS.values():
        assert fmt.render_calls([("now", "")]) == fmt.render_calls([("now", "{ }")]) == render(fmt, [("now", {})])
        assert fmt.render_calls([]) == ""


# --- (b) streaming: any chunking gives the non-streamed result ------------------------------------------------


@pytest.mark.parametrize(("fmt", "calls"), CASES)
def test_stream_split_at_every_cut_point(fmt: ToolFormat, calls: list[Any]) -> None:
    text = render(fmt, calls)
    result = fmt.read(text, TOOLS)
    for cut in range(len(text) + 1):
        check_stream(fmt, [text[:cut], text[cut:]], result, may_answer=cut % 2 == 0)
    check_stream(fmt, list(text), result, may_answer=True)


@pytest.mark.parametrize(("fmt", "calls"), CASES)
def test_stream_in_random_chunk_sizes(fmt: ToolFormat, calls: list[Any]) -> None:
    text = render(fmt, calls)
    result = fmt.read(text, TOOLS)
    rng = random.Random(f"{fmt.name}{len(text)}")
    for _ in range(30):
        cuts = [rng.randrange(len(text) + 1) for _ in range(rng.randrange(1, 12))]
        check_stream(fmt, chunks(text, cuts), result, may_answer=bool(rng.getrandbits(1)))


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_arguments_stream_while_a_value_is_generated(fmt: ToolFormat) -> None:
    """Arguments are passed on as they arrive, not only once a call (or a value) is complete."""
    long_city = "Llanfair " * 20
    text = render(fmt, [("get_weather", {"city": long_city})])
    middle = text.index("Llanfair") + len(long_city) // 2
    reader = fmt.reader(TOOLS, may_answer=False)
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for delta in reader.feed(text[:middle]):
        merge_delta(message, delta)
    so_far = message["tool_calls"][0]["function"]["arguments"]
    assert so_far.startswith('{"city":"Llanfair') and len(so_far) > len(long_city) // 3


SAFE_CHARS = st.characters(blacklist_categories=("Cs",))
TRICKY_TEXT = st.one_of(
    st.text(SAFE_CHARS, max_size=30),
    st.lists(st.sampled_from(["<", "/", "parameter", ">", "\n", "</param", "</parameter", "a", "é", '"', "\\", " "]),
             max_size=12).map("".join),
).filter(lambda s: "</parameter>" not in s)


@given(fmt=st.sampled_from(list(FORMATS.values())), city=TRICKY_TEXT, note=TRICKY_TEXT,
       days=st.integers(min_value=1, max_value=14), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_string_values_round_trip_and_stream(fmt: ToolFormat, city: str, note: str, days: int,
                                                  cuts: list[int]) -> None:
    calls = [("get_weather", {"city": city, "days": days})]
    if fmt.parallel_calls:
        calls.append(("book_trip", {"travellers": [{"name": note}], "room": {"kind": "single"}, "note": note}))
    text = render(fmt, calls)
    assert fmt.build(TOOLS, "required").matches(text), text
    assert fmt.read(text, TOOLS) == expected(calls)
    check_stream(fmt, chunks(text, cuts), expected(calls), may_answer=True)


def test_reasoning_before_calls_passes_through_as_content() -> None:
    for fmt in FORMATS.values():
        text = "let me see </thi</think>" + render(fmt, CALL_SETS[0])
        for cut in range(len(text) + 1):
            _, message, _ = stream(fmt, [text[:cut], text[cut:]], may_answer=True, after="</think>")
            assert message["content"] == "let me see </thi</think>"
            assert message["tool_calls"][0]["function"]["arguments"] == compact(WEATHER_ARGS)


def test_read_refuses_output_that_is_not_whole_calls() -> None:
    for fmt in FORMATS.values():
        text = render(fmt, CALL_SETS[0])
        for broken in (text[:-1], fmt.opening + "oops", text + "trailing"):
            with pytest.raises(ValueError, match=fmt.name):
                fmt.read(broken, TOOLS)
        reader = fmt.reader(TOOLS, may_answer=False)
        reader.feed(text[:-1])
        reader.finish()
        assert not reader.complete


# --- (c) the grammar refuses malformed calls ------------------------------------------------------------------

MALFORMED_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("launch_rocket", {"city": "Paris"}),  # no such function
    ("get_weather", {"unit": "celsius"}),  # required argument missing
    ("get_weather", {"city": "Paris", "days": "three"}),  # wrong type
    ("get_weather", {"city": "Paris", "days": 15}),  # above the maximum
    ("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
    ("get_weather", {"city": "Paris", "when": "2024-02-30"}),  # not a date
    ("get_weather", {"city": "Paris", "country": "FR"}),  # not a property
    ("get_weather", {"days": 3, "city": "Paris"}),  # properties out of their order
    ("book_trip", {"travellers": [{"age": 3}], "room": {"kind": "single"}}),  # nested required missing
    ("book_trip", {"travellers": [], "room": {"kind": "single"}}),  # minItems
    ("book_trip", {"travellers": [{"name": "A"}], "room": {"kind": "single", "smoking": "no"}}),  # nested type
    ("book_trip", {"travellers": [{"name": "A"}], "room": {"kind": "single"}, "tags": [1]}),  # item type
]

SYNTAX_ERRORS = {
    "hermes": ['<tool_call>{"name": "now", "arguments": {}}</tool_call>', '<tool_call>\n{"name":"now","arguments":{}}'
               '\n</tool_call>', '{"name":"now","arguments":{}}'],
    "hermes_lines": ['<tool_call>{"name":"now","arguments":{}}</tool_call>',
                     '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call><tool_call>\n{"name":"now",'
                     '"arguments":{}}\n</tool_call>', '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'],
    "harmony": ['<|channel|>commentary to=functions.now<|constrain|>json<|message|>{}',
                '<|channel|>commentary to=functions.now <|constrain|>json<|message|>{} ',
                '<|channel|>commentary to=now <|constrain|>json<|message|>{}',
                '<|channel|>analysis<|message|>{}'],
    "llama3_json": ['{"name": "now", "parameters": {}}', '{"name":"now","arguments":{}}',
                    '<|python_tag|>{"name":"now","parameters":{}}', '{"parameters":{},"name":"now"}'],
    "mistral": ['[TOOL_CALLS] [{"name":"now","arguments":{}}]', '[TOOL_CALLS]{"name":"now","arguments":{}}',
                '[TOOL_CALLS][{"name":"now","arguments":{}}, {"name":"now","arguments":{}}]',
                '[TOOL_CALLS][{"name":"now","arguments":{},"id":"abcdefghi"}]', '[TOOL_CALLS][]'],
    "qwen3_coder": ["<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n</function>\n</tool_call>",
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
                    "</tool_call>\n\n<tool_call>\n<function=now>\n</function>\n</tool_call>",
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n"
                    "\"3\"\n</parameter>\n</function>\n</tool_call>",
                    "<tool_call>\n<function=now>\n</function>\n</tool_call><tool_call>\n<function=now>\n</function>\n"
                    "</tool_call>",
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>"],
}


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_grammar_refuses_malformed_calls(fmt: ToolFormat) -> None:
    required, auto = fmt.build(TOOLS, "required"), fmt.build(TOOLS, "auto")
    for call in MALFORMED_CALLS:
        text = render(fmt, [call])
        assert not required.matches(text), text
        assert not auto.matches(text), text
    for text in SYNTAX_ERRORS[fmt.name]:
        assert not required.matches(text), text
        # under auto, text that does not start with the opening is a plain answer, never a call
        plain = text.startswith(fmt.answer_opening) and not text.startswith(fmt.opening)
        assert auto.matches(text) == plain, text
        if plain:
            assert fmt.read(text, TOOLS) == []
    good = render(fmt, CALL_SETS[0])
    for text in ("Sure! " + good, " " + good, "\n" + good, good + "\n", good + " Done.", "Hello", ""):
        assert not required.matches(text), text
    assert required.matches(good)


def test_qwen3_coder_raw_strings_cannot_hold_the_closing_tag() -> None:
    grammar = QWEN3_CODER.build(TOOLS, "required")
    for city in ("a</parameter>b", "a\n</parameter>", "<</parameter>", "</p</parameter>", "</parameter</parameter>",
                 "</parameter>"):
        assert not grammar.matches(render(QWEN3_CODER, [("get_weather", {"city": city})])), city
    # in a JSON format the same text is an ordinary string
    assert HERMES.build(TOOLS, "required").matches(render(HERMES, [("get_weather", {"city": "a</parameter>b"})]))


CLOSING_TAG_PIECES = st.lists(st.sampled_from(["<", "/", "p", "parameter", "</parameter>", ">", "\n", "</param", "x"]),
                              max_size=10).map("".join)

QWEN3_GRAMMAR = QWEN3_CODER.build(TOOLS, "required")


@given(CLOSING_TAG_PIECES)
@settings(max_examples=150, deadline=None)
def test_qwen3_coder_takes_a_raw_string_exactly_when_it_lacks_the_closing_tag(city: str) -> None:
    text = render(QWEN3_CODER, [("get_weather", {"city": city})])
    assert QWEN3_GRAMMAR.matches(text) == ("</parameter>" not in city), city


# --- (d) auto: plain answers are content; the opening only starts a call --------------------------------------

PLAIN_ANSWERS = ["Hello there", "", "I'd call <tool_call> later", '{"answer": 1}', "[TOOL] [x]", "<", "\n\nHi",
                 '{"nam', '{"names":[]}']


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_auto_takes_plain_answers_as_content(fmt: ToolFormat) -> None:
    grammar = fmt.build(TOOLS, "auto")
    answers = [*PLAIN_ANSWERS, fmt.opening[:-1], fmt.opening[:1]]
    for answer in answers:
        text = fmt.answer_opening + answer  # harmony's answers open the final channel: not content
        assert grammar.matches(text), text
        assert fmt.read(text, TOOLS) == []
        for cut in range(len(text) + 1):
            reader, message, _ = stream(fmt, [text[:cut], text[cut:]], may_answer=True)
            assert message["content"] == answer
            assert "tool_calls" not in message
            assert reader.complete and reader.calls == []


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_auto_accepts_text_starting_with_the_opening_only_as_a_call(fmt: ToolFormat) -> None:
    grammar = fmt.build(TOOLS, "auto")
    good = render(fmt, CALL_SETS[0])
    assert good.startswith(fmt.opening)
    assert grammar.matches(good)
    for text in (fmt.opening, fmt.opening + " oops", fmt.opening + "\nI will call a tool", good[:-1],
                 good[:len(fmt.opening) + 3]):
        assert not grammar.matches(text), text
    _, message, _ = stream(fmt, [good], may_answer=True)
    assert message["content"] == "" and len(message["tool_calls"]) == 1


def test_an_answer_alternative_replaces_the_default_one() -> None:
    for fmt in (HERMES, MISTRAL, QWEN3_CODER):
        builder = GrammarBuilder()
        answer = JsonSchemaCompiler(builder).compile({"type": "object", "properties": {"a": {"type": "integer"}},
                                                      "required": ["a"]})
        _, start = fmt.grammar(TOOLS, "auto", alternative=answer, builder=builder)
        grammar = builder.build(start)
        assert grammar.matches('{"a":1}')
        assert grammar.matches(render(fmt, CALL_SETS[0]))
        assert not grammar.matches("Hello")


# --- (e) parallel calls on and off ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, QWEN3_CODER], ids=lambda fmt: fmt.name)
def test_parallel_calls_on_and_off(fmt: ToolFormat) -> None:
    one, two, three = render(fmt, CALL_SETS[0]), render(fmt, CALL_SETS[6]), render(fmt, CALL_SETS[7])
    on, off = fmt.build(TOOLS, "required"), fmt.build(TOOLS, "required", parallel=False)
    assert on.matches(one) and on.matches(two) and on.matches(three)
    assert off.matches(one)
    assert not off.matches(two) and not off.matches(three)
    auto_off = fmt.build(TOOLS, "auto", parallel=False)
    assert auto_off.matches(one) and not auto_off.matches(two)
    named = fmt.build(TOOLS, "now")
    assert named.matches(render(fmt, [("now", {})]))
    assert not named.matches(one)
    assert not named.matches(render(fmt, [("now", {}), ("now", {})]))
    assert not named.matches("Hello")


def test_llama3_json_holds_exactly_one_call() -> None:
    one = render(LLAMA3_JSON, CALL_SETS[0])
    now = render(LLAMA3_JSON, [("now", {})])
    several = [one + now, one + "; " + now, one + ";" + now, one + "\n" + now, f"[{one},{now}]"]
    for grammar in (LLAMA3_JSON.build(TOOLS, "required"), LLAMA3_JSON.build(TOOLS, "required", parallel=False)):
        assert grammar.matches(one)
        for text in several:
            assert not grammar.matches(text), text
    auto = LLAMA3_JSON.build(TOOLS, "auto")
    assert auto.matches(one)
    for text in several[:-1]:  # the array does not start with the opening: under auto it is a plain answer
        assert not auto.matches(text), text
    assert not LLAMA3_JSON.parallel_calls and HERMES.parallel_calls
    with pytest.raises(ValueError, match="one call"):
        render(LLAMA3_JSON, CALL_SETS[6])
    named = LLAMA3_JSON.build(TOOLS, "now")
    assert named.matches(now) and not named.matches(one)


def test_choices_that_name_no_tool_are_refused() -> None:
    for fmt in FORMATS.values():
        with pytest.raises(GrammarError) as error:
            fmt.build(TOOLS, "launch_rocket")
        assert error.value.param == "tool_choice"
        with pytest.raises(GrammarError) as error:
            fmt.build([], "auto")
        assert error.value.param == "tools"


# --- (f) detection from chat templates -------------------------------------------------------------------------

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions. Signatures within <tools></tools>:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nReturn each call within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": "
        "<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" and message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
{%- endfor %}"""

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{%- if builtin_tools is defined %}{{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ")
}}{%- endif %}
{{- 'Given the following functions, respond with a JSON for a function call with its proper arguments.' }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}{{- raise_exception("one tool call at a time") }}{%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
        {%- else %}
            {{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + "}" }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}"""

LLAMA32_LIKE_TEMPLATE = """{%- if tools %}{{- 'Respond in the format {"name": function name, "parameters": '
'dictionary of argument name and its value}. Do not use variables.' }}{%- endif %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"""

MISTRAL_V3_TEMPLATE = """{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}{%- for tool in tools %}{{- tool.function|tojson }}{%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- tool_call.function|tojson }}{%- if not loop.last %}{{- ", " }}{%- endif %}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + "}[/TOOL_RESULTS]" }}
    {%- endif %}
{%- endfor %}"""

MISTRAL_ARGS_TEMPLATE = """{%- for tool_call in message.tool_calls %}
    {{- "[TOOL_CALLS]" + tool_call.function.name + "[ARGS]" + tool_call.function.arguments|tojson }}
{%- endfor %}"""

QWEN3_CODER_TEMPLATE = """{%- if tools is iterable and tools | length > 0 %}
    {{- "If you choose to call a function ONLY reply in the following format:\\n<tool_call>\\n<function="
        "example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n"
        "</tool_call>" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "assistant" and message.tool_calls is defined %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
            {%- for args_name, args_value in tool_call.arguments|items %}
                {{- '<parameter=' + args_name + '>\\n' }}
                {{- args_value if args_value is string else args_value | tojson }}
                {{- '\\n</parameter>\\n' }}
            {%- endfor %}
            {{- '</function>\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}"""

CHATML_TEMPLATE = """{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content
+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
LLAMA3_NO_TOOLS_TEMPLATE = """{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] +
'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"""
MISTRAL_V1_TEMPLATE = """{%- for message in messages %}{%- if message['role'] == 'user' %}{{- '[INST] ' +
message['content'] + ' [/INST]' }}{%- else %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"""


@pytest.mark.parametrize(("template", "name"), [
    (QWEN25_TEMPLATE, "hermes_lines"),
    ("{{ '<tool_call>' + call | tojson + '</tool_call>' }}", "hermes"),
    (LLAMA31_TEMPLATE, "llama3_json"),
    (LLAMA32_LIKE_TEMPLATE, "llama3_json"),
    (MISTRAL_V3_TEMPLATE, "mistral"),
    (QWEN3_CODER_TEMPLATE, "qwen3_coder"),
    ("{{- '<|start|>assistant<|channel|>commentary to=functions.' + call.name + ' <|constrain|>json<|message|>' }}",
     "harmony"),
    (MISTRAL_ARGS_TEMPLATE, None),
    (CHATML_TEMPLATE, None),
    (LLAMA3_NO_TOOLS_TEMPLATE, None),
    (MISTRAL_V1_TEMPLATE, None),
    ("", None),
    (None, None),
])
def test_detect_format_from_template_source(template: str | None, name: str | None) -> None:
    found = detect_format(template)
    assert (found.name if found else None) == name
    if name is not None:
        assert FORMATS[name].detect(template or "")
    else:
        assert not any(fmt.detect(template or "") for fmt in FORMATS.values())


def test_qwen3_coder_calls_are_written_as_its_template_writes_them() -> None:
    # strings and integers: what the official template writes the same way (other values through str())
    calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris\nFrance", "days": 3}}},
             {"function": {"name": "now", "arguments": {}}}]
    written = jinja2.Environment().from_string(QWEN3_CODER_TEMPLATE).render(
        messages=[{"role": "assistant", "tool_calls": calls}], tools=None)
    body = written.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>\n")
    rendered = QWEN3_CODER.render_calls([(c["function"]["name"], json.dumps(c["function"]["arguments"]))
                                         for c in calls])
    assert body == rendered
    assert QWEN3_CODER.build(TOOLS, "required").matches(rendered)


def test_special_texts_name_the_control_tokens_a_format_writes() -> None:
    assert MISTRAL.special_texts == ("[TOOL_CALLS]",)
    assert render(MISTRAL, CALL_SETS[0]).startswith(MISTRAL.special_texts[0])
    assert MISTRAL.opening == "[TOOL_CALLS]"
    for fmt in (HERMES, QWEN3_CODER):  # Qwen's vocabularies have <tool_call> and </tool_call> as tokens
        assert fmt.special_texts == ("<tool_call>", "</tool_call>")
    assert LLAMA3_JSON.special_texts == ()
    for fmt in FORMATS.values():  # each special text becomes a grammar rule a vocabulary may map to its token
        grammar = fmt.build(TOOLS, "required")
        assert {text for _, text in grammar.special} == set(fmt.special_texts)
    assert set(FORMATS) == {"hermes", "hermes_lines", "llama3_json", "mistral", "qwen3_coder", "harmony"}
    assert all(FORMATS[name].name == name for name in FORMATS)


# --- hermes is the kernel's syntax ----------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", "auto", "now"])
@pytest.mark.parametrize("parallel", [True, False])
def test_hermes_grammar_is_the_kernel_grammar(choice: str, parallel: bool) -> None:
    assert HERMES.build(TOOLS, choice, parallel=parallel).lark == grammar_for_tools(TOOLS, choice, parallel).lark


# --- qwen3_coder value typing ---------------------------------------------------------------------------------


def qwen_tool(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> list[ToolSpec]:
    return [ToolSpec("f", {"type": "object", "properties": properties, "required": required or [], **extra})]


def qwen_call(*parameters: tuple[str, str]) -> str:
    body = "".join(f"<parameter={name}>\n{value}\n</parameter>\n" for name, value in parameters)
    return f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>"


def test_qwen3_coder_strings_are_raw_and_other_values_json() -> None:
    tools = qwen_tool({"s": {"type": "string"}, "nick": {"type": ["string", "null"]},
                       "alias": {"type": "string", "nullable": True}, "n": {"type": "number"},
                       "flag": {"type": "boolean"}, "obj": {"type": "object", "properties": {"k": {"type": "string"}}},
                       "any": {}}, ["s"])
    grammar = QWEN3_CODER.build(tools, "required")
    text = qwen_call(("s", 'say "hi"\n'), ("nick", '"Bo"'), ("n", "-1.5e3"), ("flag", "true"), ("obj", '{"k":"v"}'),
                     ("any", "[1,null]"))
    assert grammar.matches(text)
    (call,) = QWEN3_CODER.read(text, tools)
    assert call.arguments == '{"s":"say \\"hi\\"\\n","nick":"Bo","n":-1.5e3,"flag":true,"obj":{"k":"v"},"any":[1,null]}'
    assert json.loads(call.arguments) == {"s": 'say "hi"\n', "nick": "Bo", "n": -1500, "flag": True,
                                          "obj": {"k": "v"}, "any": [1, None]}
    assert grammar.matches(qwen_call(("s", "x"), ("nick", "null"), ("alias", "null")))
    assert QWEN3_CODER.read(qwen_call(("s", "x"), ("alias", '"Al"')), tools) == [
        ParsedCall("f", '{"s":"x","alias":"Al"}')]
    for bad in (qwen_call(("s", "x"), ("nick", "Bo")), qwen_call(("s", "x"), ("alias", "Al")),
                qwen_call(("s", "x"), ("flag", "True")), qwen_call(("s", "x"), ("obj", "{'k': 'v'}")),
                qwen_call(("s", "x"), ("n", "1,5")), qwen_call(("s", "x"), ("obj", '{"k": "v"}'))):
        assert not grammar.matches(bad), bad


def test_qwen3_coder_string_constraints_are_enforced() -> None:
    tools = qwen_tool({"color": {"type": "string", "enum": ["red", "dark red", "a</parameter>b"]},
                       "day": {"type": "string", "format": "date"}, "id": {"type": "string", "minLength": 1},
                       "fixed": {"const": "yes"}, "short": {"enum": ["ab", "abc"], "maxLength": 2}},
                      ["color"])
    grammar = QWEN3_CODER.build(tools, "required")
    assert grammar.matches(qwen_call(("color", "dark red"), ("day", "2024-02-29"), ("id", "x"), ("fixed", "yes"),
                                     ("short", "ab")))
    for bad in (qwen_call(("color", "blue")), qwen_call(("color", "red "), ), qwen_call(("color", "a</parameter>b")),
                qwen_call(("color", "red"), ("day", "2023-02-29")), qwen_call(("color", "red"), ("id", "")),
                qwen_call(("color", "red"), ("fixed", "no")), qwen_call(("color", "red"), ("short", "abc")),
                qwen_call(("color", '"red"'))):
        assert not grammar.matches(bad), bad
    # what raw text cannot enforce exactly is written as a JSON string, enforced exactly and read back as the string
    for keyword, value, good, bad in (("pattern", "^[a-z]+$", "abc", "ABC"), ("maxLength", 5, "abcde", "abcdef"),
                                      ("minLength", 2, "ab", "a")):
        tools = qwen_tool({"code": {"type": "string", keyword: value}}, ["code"])
        grammar = QWEN3_CODER.build(tools, "required")
        text = qwen_call(("code", json.dumps(good)))
        assert grammar.matches(text)
        assert not grammar.matches(qwen_call(("code", json.dumps(bad))))
        assert not grammar.matches(qwen_call(("code", good)))  # never unquoted
        assert QWEN3_CODER.read(text, tools) == [ParsedCall("f", json.dumps({"code": good}, separators=(",", ":")))]
    # nested strings are JSON: every keyword the JSON compiler knows holds there
    nested = qwen_tool({"o": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]+$"}},
                              "required": ["code"]}}, ["o"])
    assert QWEN3_CODER.build(nested, "required").matches(qwen_call(("o", '{"code":"abc"}')))
    assert not QWEN3_CODER.build(nested, "required").matches(qwen_call(("o", '{"code":"ABC"}')))


def test_qwen3_coder_schema_errors_name_the_place() -> None:
    with pytest.raises(GrammarError) as error:
        QWEN3_CODER.build([NOW, *qwen_tool({"x": {"type": "string", "format": "hostname"}})], "required")
    assert error.value.param == "tools[1].function.parameters" and "/properties/x" in error.value.message
    with pytest.raises(GrammarError) as error:
        QWEN3_CODER.build([ToolSpec("f", {"anyOf": [{"type": "object"}]})], "required")
    assert error.value.param == "tools[0].function.parameters"
    with pytest.raises(GrammarError) as error:
        QWEN3_CODER.build(qwen_tool({"a>b": {"type": "integer"}}), "required")
    assert "a>b" in error.value.message
    with pytest.raises(GrammarError) as error:
        QWEN3_CODER.build([ToolSpec("bad>name", {})], "required")
    assert error.value.param == "tools[0].function.name"


def test_qwen3_coder_refs_and_free_form_parameters() -> None:
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
             "required": ["x", "y"]}
    tools = [ToolSpec("f", {"type": "object", "$defs": {"Point": point},
                            "properties": {"at": {"$ref": "#/$defs/Point"}}, "required": ["at"]}),
             ToolSpec("anything", {"type": "object"}),
             ToolSpec("texts", {"type": "object", "additionalProperties": {"type": "string"}})]
    grammar = QWEN3_CODER.build(tools, "required")
    text = qwen_call(("at", '{"x":1,"y":2}'))
    assert grammar.matches(text) and not grammar.matches(qwen_call(("at", '{"x":1}')))
    free = ("<tool_call>\n<function=anything>\n<parameter=k 1>\n[1,{\"a\":null}]\n</parameter>\n"
            "<parameter=s>\n\"x\"\n</parameter>\n</function>\n</tool_call>")
    raw = "<tool_call>\n<function=texts>\n<parameter=a\"b>\nfree <text>\n</parameter>\n</function>\n</tool_call>"
    assert grammar.matches(free) and grammar.matches(raw)
    assert not grammar.matches(free.replace('"x"', "x"))
    assert QWEN3_CODER.read(text + "\n" + free + "\n" + raw, tools) == [
        ParsedCall("f", '{"at":{"x":1,"y":2}}'), ParsedCall("anything", '{"k 1":[1,{"a":null}],"s":"x"}'),
        ParsedCall("texts", '{"a\\"b":"free <text>"}')]


# --- the engine enforces the grammars (llguidance, where the tokenizer is installed) -------------------------




@pytest.mark.parametrize("fmt", FORMATS.values(), ids=lambda fmt: fmt.name)
def test_llguidance_enforces_each_format(tokenizer: Any, fmt: ToolFormat) -> None:
    import llguidance

    def accepts(grammar: Any, text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar.llguidance, log_level=0)
        return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()

    grammars = {choice: fmt.build(TOOLS, choice) for choice in ("auto", "required", "now")}
    for grammar in grammars.values():
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.llguidance)
        assert not is_error, messages
    for calls in CALL_SETS:
        if fmt.parallel_calls or len(calls) == 1:
            assert accepts(grammars["auto"], render(fmt, calls)), render(fmt, calls)
    for call in MALFORMED_CALLS:
        assert not accepts(grammars["auto"], render(fmt, [call]))
    for text in SYNTAX_ERRORS[fmt.name]:
        assert not accepts(grammars["required"], text), text
    assert accepts(grammars["auto"], fmt.answer_opening + "Hello there")
    assert not accepts(grammars["auto"], fmt.opening + " oops")
    assert not accepts(grammars["now"], render(fmt, CALL_SETS[0]))
