"""The truncation guard: an answer cut at any ``max_tokens`` from its shortest output upward still parses, takes
no more tokens than allowed, and never takes back text it passed on."""

from __future__ import annotations

import json
import random

import pytest

from gallama_kernel.backend import GenerationEvent
from gallama_kernel.grammar import Grammar
from gallama_kernel.grammar.closing import Closer
from gallama_kernel.grammar.json_schema import json_schema_grammar
from gallama_kernel.grammar.tool_formats import HERMES, MISTRAL, QWEN3_CODER
from gallama_kernel.grammar.tools import ToolSpec
from gallama_kernel.pipeline.truncation import TruncationGuard, closer_for, shortest_tokens
from gallama_kernel.protocol.errors import InvalidRequest

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"type": "string"},
                                                          "minItems": 1},
    "home": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                  "pattern": "^[0-9]{5}$"}},
             "required": ["city", "zip"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "tags", "home", "age"]}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "tags": ["math", "poetry"], "home": {"city": "London", "zip": "12345"},
                       "age": 36}, separators=(",", ":"))
WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                                      "days": {"type": "integer"}},
                                   "required": ["city", "days"]})
NOW = ToolSpec("now", {})


def chars(text: str) -> int:
    """A tokenizer of one token per character: the guard only needs a count that never exceeds the bytes."""
    return len(text)


def generate(grammar: Grammar, document: str, limit: int, rng: random.Random) -> tuple[list[str], GenerationEvent]:
    """Feed ``document`` (cut at ``limit`` tokens, as an engine would) to a guard in random pieces."""
    guard = TruncationGuard(Closer.for_grammar(grammar), limit, chars)
    text = document[:limit]
    sent: list[str] = []
    position = 0
    while True:
        end = min(len(text), position + rng.randint(1, 6))
        last = end == len(text)
        reason = ("length" if limit < len(document) else "stop") if last else None
        event = guard.event(GenerationEvent(text[position:end], end, reason))  # type: ignore[arg-type]
        sent.append(event.text)
        position = end
        if last:
            return sent, event


CASES = [
    (json_schema_grammar(SCHEMA), DOCUMENT),
    (HERMES.build([WEATHER, NOW], "required"),
     '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","days":3}}</tool_call>'
     '<tool_call>{"name":"now","arguments":{}}</tool_call>'),
    (MISTRAL.build([WEATHER, NOW], "required"),
     '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","days":3}},{"name":"now","arguments":{}}]'),
    (QWEN3_CODER.build([WEATHER], "required"),
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
     "</parameter>\n</function>\n</tool_call>"),
]


@pytest.mark.parametrize(("grammar", "document"), CASES, ids=["json_schema", "hermes", "mistral", "qwen3_coder"])
def test_every_budget_from_the_shortest_output_up_gives_valid_output(grammar: Grammar, document: str) -> None:
    assert grammar.matches(document)
    shortest = len(Closer.for_grammar(grammar).shortest())
    rng = random.Random(7)
    for limit in range(shortest, len(document) + 3):
        sent, last = generate(grammar, document, limit, rng)
        output = "".join(sent)
        assert grammar.matches(output), (limit, output)
        assert last.completion_tokens <= limit
        assert last.completion_tokens == len(output)  # what was passed on, closing included
        if limit >= len(document):
            assert output == document and last.finish_reason == "stop"
        else:
            assert last.finish_reason == "length"
            assert document.startswith("".join(sent[:-1]))  # generated text, then the closed end


def test_what_was_passed_on_is_never_taken_back() -> None:
    grammar, document = CASES[0]
    for limit in (20, 40, 60):
        sent, _ = generate(grammar, document, limit, random.Random(limit))
        output = "".join(sent)
        passed = "".join(sent[:-1])
        assert document.startswith(passed)  # every piece before the last is generated text, in order
        assert output.startswith(passed)


def test_a_budget_below_the_shortest_output_is_refused_naming_both_numbers() -> None:
    closer = closer_for(json_schema_grammar(SCHEMA))
    assert closer is not None
    shortest = len(closer.shortest())
    assert shortest_tokens(closer, chars, requested=shortest, room=1000, param="response_format") == shortest
    with pytest.raises(InvalidRequest) as raised:
        shortest_tokens(closer, chars, requested=shortest - 1, room=1000, param="response_format")
    assert raised.value.param == "max_tokens"
    assert str(shortest) in raised.value.message and str(shortest - 1) in raised.value.message
    with pytest.raises(InvalidRequest) as raised:
        shortest_tokens(closer, chars, requested=None, room=shortest - 2, param="response_format")
    assert raised.value.code == "context_length_exceeded"


def test_a_grammar_the_closer_cannot_read_is_not_guarded() -> None:
    assert closer_for(None) is None
    assert closer_for(Grammar('start: /a(?=b)/ "b"\n', 'start: /a(?=b)/ "b"\n')) is None
