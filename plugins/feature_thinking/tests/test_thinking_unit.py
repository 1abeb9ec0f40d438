"""Thinking templates without a model: validation, the plan a request gets, the pass grammar, the joiner."""

from __future__ import annotations

from typing import Any

import llguidance
import pytest
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

import gallama_feature_thinking.plugin as thinking
from gallama_feature_thinking.template import MAX_TEMPLATE_CHARS, ThinkingTemplate, parse_template
from gallama_kernel.grammar import Grammar
from gallama_kernel.pipeline.constraints import compile_constraint
from gallama_kernel.pipeline.plan import RequestPlan
from gallama_kernel.plugins import PluginHost
from gallama_kernel.protocol.errors import InvalidRequest
from gallama_kernel.protocol.openai import ChatCompletionRequest, validate_request

SEED_TEMPLATE = """
<chain_of_thought>
  <problem>{problem_statement}</problem>
  <initial_state>{initial_state}</initial_state>
  <steps>
    <step>{action1}</step>
    <step>{action2}</step>
    <!-- Add more steps as needed -->
  </steps>
  <answer>Provide the answer</answer>
  <final_answer>Only the final answer, no need to provide the step by step problem solving</final_answer>
</chain_of_thought>
"""
USER = [{"role": "user", "content": "How many apples?"}]


# -- template validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "root", "opening"), [
    (SEED_TEMPLATE, "chain_of_thought", "<chain_of_thought>"),
    ("<thinking mode='deep' depth=\"2\"><idea>{idea}</idea></thinking>", "thinking",
     "<thinking mode='deep' depth=\"2\">"),
    ('<?xml version="1.0"?>\n<!-- café: a comment first -->\n<plan >\n<goal>{goal}</goal></plan>', "plan", "<plan >"),
    ('<t:plan xmlns:t="urn:x"><t:goal>{goal} &amp; more</t:goal></t:plan>', "t:plan", '<t:plan xmlns:t="urn:x">'),
    ("<é>{ünïcode}</é>", "é", "<é>"),
])
def test_good_templates(text: str, root: str, opening: str) -> None:
    template = parse_template(text)
    assert template.source == text.strip()
    assert (template.root, template.opening, template.closing) == (root, opening, f"</{root}>")


@pytest.mark.parametrize(("text", "problem"), [
    ("<a><b></a>", "mismatched tag: line 1, column 8"),
    ("<chain_of_thought>\n  <steps>\n</chain_of_thought>", "mismatched tag: line 3, column 2"),
    ("<a>", "no element found: line 1, column 3"),
    ("just think", "syntax error: line 1, column 0"),
    ("<a>x</a><b>y</b>", "junk after document element: line 1, column 8"),
    ("<a>{x < y}</a>", "not well-formed (invalid token): line 1, column 7"),
    ("<a>&nbsp;</a>", "undefined entity"),
    ("<p:a>x</p:a>", "unbound prefix"),
    ("<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", "<!DOCTYPE>"),
    ("  \n ", "empty"),
    ("<thinking/>", "root element <thinking/> is empty"),
    ("<a>" + "x" * MAX_TEMPLATE_CHARS + "</a>", "characters"),
])
def test_bad_templates_are_400_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse_template(text)
    assert raised.value.status == 400
    assert raised.value.param == "thinking_template"
    assert problem in raised.value.message


# -- the plan of a request ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host() -> PluginHost:
    host = PluginHost()
    host.register(thinking, "thinking")
    return host


def request(host: PluginHost, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": USER, **fields}
    return validate_request(ChatCompletionRequest, body, host.request_fields)


def prepare(host: PluginHost, messages: list[dict[str, Any]] | None = None, **fields: Any
            ) -> tuple[ChatCompletionRequest, RequestPlan]:
    req = request(host, **fields)
    plan = RequestPlan(messages=[dict(m) for m in messages or USER], leading_prompt=req.leading_prompt or "")
    host.prepare_request(req, plan)
    return req, plan


def test_fields_are_declared(host: PluginHost) -> None:
    assert {"thinking_template", "return_thinking"} <= set(host.request_fields)
    assert request(host, return_thinking="separate", thinking_template="<a>x</a>").extensions["return_thinking"] \
        == "separate"
    with pytest.raises(InvalidRequest) as raised:
        request(host, return_thinking="both", thinking_template="<a>x</a>")
    assert raised.value.param == "return_thinking"


def test_no_template_leaves_the_plan_alone(host: PluginHost) -> None:
    for fields in ({}, {"return_thinking": False}, {"thinking_template": None}):
        req, plan = prepare(host, **fields)
        assert plan.messages == USER and not plan.passes and not plan.leading_prompt
        assert host.response_transformers(req, plan) == []


@pytest.mark.parametrize("value", [True, "separate"])
def test_return_thinking_without_template_is_400(host: PluginHost, value: bool | str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        prepare(host, return_thinking=value)
    assert (raised.value.status, raised.value.param) == (400, "return_thinking")


def test_invalid_template_is_400_from_prepare_request(host: PluginHost) -> None:
    with pytest.raises(InvalidRequest) as raised:
        prepare(host, thinking_template="<a><b></a>")
    assert raised.value.param == "thinking_template"
    assert "line 1, column 8" in raised.value.message


def test_instructions_go_to_the_system_message(host: PluginHost) -> None:
    _, plan = prepare(host, thinking_template=SEED_TEMPLATE)
    assert [m["role"] for m in plan.messages] == ["system", "user"]
    system = plan.messages[0]["content"]
    assert SEED_TEMPLATE.strip() in system
    assert "<chain_of_thought>" in system and "</chain_of_thought>" in system
    assert plan.messages[1] == USER[0]  # the user's words as sent

    history = [{"role": "system", "content": "You are terse."}, *USER]
    _, plan = prepare(host, history, thinking_template=SEED_TEMPLATE)
    assert [m["role"] for m in plan.messages] == ["system", "user"]
    assert plan.messages[0]["content"].startswith("You are terse.\n\n")
    assert SEED_TEMPLATE.strip() in plan.messages[0]["content"]
    assert history[0]["content"] == "You are terse."  # the request's own message is not mutated


@pytest.mark.parametrize(("value", "show_as"), [(None, "hidden"), (False, "hidden"), (True, "content"),
                                                ("separate", "reasoning_content")])
def test_the_pass(host: PluginHost, value: bool | str | None, show_as: str) -> None:
    fields: dict[str, Any] = {"thinking_template": SEED_TEMPLATE}
    if value is not None:
        fields["return_thinking"] = value
    req, plan = prepare(host, **fields)
    (item,) = plan.passes
    assert item.opening == "<chain_of_thought>"
    assert item.show_as == show_as
    assert item.max_tokens == thinking.DEFAULT_MAX_TOKENS
    assert item.stop == []
    assert item.constraint is not None and item.constraint.kind == "custom"
    assert plan.constraint is None and plan.constraint_after is None  # the answer's constraint is untouched
    transformers = host.response_transformers(req, plan)
    assert [type(t) for t in transformers] == ([] if show_as == "hidden" else [thinking.ThinkingJoiner])


def test_done_appends_the_closed_thinking_to_the_leading_prompt(host: PluginHost) -> None:
    _, plan = prepare(host, thinking_template=SEED_TEMPLATE, leading_prompt="Sure. ")
    plan.passes[0].done(plan, "<problem>apples</problem>\n</chain_of_thought>")
    assert plan.leading_prompt == "Sure. <chain_of_thought><problem>apples</problem>\n</chain_of_thought>\n"


def test_done_closes_a_pass_cut_short(host: PluginHost) -> None:
    req, plan = prepare(host, thinking_template=SEED_TEMPLATE, return_thinking="separate")
    plan.passes[0].done(plan, "\n<steps>\n<step>10 apples</step>\n<step>8 ap")
    assert plan.leading_prompt == ("<chain_of_thought>\n<steps>\n<step>10 apples</step>\n<step>8 ap\n</step>\n"
                                   "</steps>\n</chain_of_thought>\n")
    (joiner,) = host.response_transformers(req, plan)
    assert joiner.feed({"content": "8"}) == [{"reasoning_content": "\n</step>\n</steps>\n</chain_of_thought>"},
                                             {"content": "8"}]


@pytest.mark.parametrize(("text", "kept", "suffix"), [
    ("done</x>", "done</x>", ""),
    ("", "", "\n</x>"),
    ("<a><b>text", "<a><b>text", "\n</b>\n</a>\n</x>"),
    ("<a><b>text</a>", "<a><b>text</a>", "\n</x>"),  # an end tag closes what is open inside it
    ("<a><b/><c k='>'>t</c>", "<a><b/><c k='>'>t</c>", "\n</a>\n</x>"),
    ("<a>t</a><b", "<a>t</a>", "\n</x>"),  # an unfinished tag is dropped
    ("<a>t</", "<a>t", "\n</a>\n</x>"),
    ("<a><!-- <b> --></a><!-- open", "<a><!-- <b> --></a>", "\n</x>"),
    ("1 < 2 and 3<", "1 < 2 and 3", "\n</x>"),
    ("2 < 3", "2 < 3", "\n</x>"),  # a comparison is not a tag
])
def test_close(text: str, kept: str, suffix: str) -> None:
    assert parse_template("<x><a>{y}</a></x>").close(text) == (kept, suffix)


def test_joiner_sends_pending_text_once_before_the_answer() -> None:
    state = thinking.ThinkingState(parse_template("<x>y</x>"), "content")
    state.done(RequestPlan(messages=[]), "thought</x>")
    joiner = thinking.ThinkingJoiner(state)
    assert joiner.feed({"content": "Paris"}) == [{"content": "\n"}, {"content": "Paris"}]
    assert joiner.feed({"content": "!"}) == [{"content": "!"}]
    assert joiner.finish() == []

    joiner = thinking.ThinkingJoiner(state)  # an answer without deltas
    assert joiner.finish() == [{"content": "\n"}]


def test_max_tokens_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(thinking.MAX_TOKENS_ENV, raising=False)
    assert thinking.thinking_max_tokens() == 512
    monkeypatch.setenv(thinking.MAX_TOKENS_ENV, "64")
    assert thinking.thinking_max_tokens() == 64
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(thinking.MAX_TOKENS_ENV, bad)
        assert thinking.thinking_max_tokens() == 512


# -- the pass grammar --------------------------------------------------------------------------------------

def pass_grammar(template: ThinkingTemplate) -> Grammar:
    return compile_constraint(template.constraint())


class ByteTokenizer:
    """One token per byte, and an end-of-sequence token: enough for llguidance to run a grammar on bytes."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


BYTES = LLTokenizer(TokenizerWrapper(ByteTokenizer()))


@pytest.mark.parametrize("text", [SEED_TEMPLATE, "<x>a</x>", "<a:b xmlns:a='u'>t</a:b>"])
def test_grammar_validates_with_llguidance(text: str) -> None:
    grammar = pass_grammar(parse_template(text))
    is_error, warnings = LLMatcher.validate_grammar_with_warnings(grammar.llguidance)
    assert not is_error, warnings
    assert not warnings


def test_grammar_is_free_text_up_to_the_closing_tag() -> None:
    grammar = pass_grammar(parse_template(SEED_TEMPLATE))
    thought = ("\n  <problem>10 apples, 2 < 3 & {braces}</problem>\n  <steps><step>10 - 2 - 2 + 5 - 1 = 10</step>"
               "</steps>\n  <final_answer>10</final_answer>\n</chain_of_thought>")
    assert grammar.matches(thought)
    assert grammar.matches("</chain_of_thought>")
    assert not grammar.matches(thought + "\nThe answer is 10.")  # nothing past the closing tag
    assert not grammar.matches(thought + "\n")
    assert not grammar.matches("<problem>unfinished</problem>")  # it must close

    matcher = LLMatcher(BYTES, grammar.llguidance, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    data = BYTES.tokenize_bytes(thought.encode())
    assert matcher.validate_tokens(data) == len(data)
    assert matcher.try_consume_tokens([*data, *BYTES.tokenize_bytes(b" more")]) == len(data)
    assert matcher.is_stopped() and matcher.is_accepting()


def test_engine_refuses_an_early_end() -> None:
    grammar = pass_grammar(parse_template("<x>a</x>"))
    matcher = LLMatcher(BYTES, grammar.llguidance, log_level=0)
    assert matcher.try_consume_tokens(BYTES.tokenize_bytes(b"half a thought")) == 14
    assert matcher.validate_tokens([ByteTokenizer.eos_token_id]) == 0  # no end of turn before </x>
    assert not matcher.is_accepting()


def test_grammar_is_cached_per_closing_tag() -> None:
    first = parse_template("<x><a>1</a></x>").constraint()
    second = parse_template("<x attr='1'><b>2</b></x>").constraint()
    assert first.key() == second.key()
    assert pass_grammar(parse_template("<x>1</x>")) is pass_grammar(parse_template("<x>2</x>"))
    assert llguidance.LLMatcher.validate_grammar(pass_grammar(parse_template("<y>1</y>")).llguidance) == ""
