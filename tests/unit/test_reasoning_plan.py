"""How a request's reasoning is planned: the model's syntax, where its turn stands, the pass or the empty block."""

from __future__ import annotations

import pytest

from gallama_kernel.pipeline.plan import GenerationPass, RequestPlan
from gallama_kernel.pipeline.prompt import PromptRenderer
from gallama_kernel.pipeline.reasoning import (
    HARMONY,
    ReasoningRequest,
    ReasoningSyntax,
    answer_reserve,
    detect,
    parse_setting,
    plan_reasoning,
)
from gallama_kernel.pipeline.service import keep_order
from gallama_kernel.protocol.errors import InvalidRequest

THINK = ReasoningSyntax("<think>", "</think>")
MAY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
       "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
OPENS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def plan_for(template: str, asked: ReasoningRequest | None = None, leading: str = "") -> tuple[RequestPlan, bool]:
    plan = RequestPlan(messages=[{"role": "user", "content": "hi"}], leading_prompt=leading)
    outcome = plan_reasoning(detect(template), asked or ReasoningRequest(), plan, PromptRenderer(template), "m")
    return plan, outcome == "pass"


def test_the_syntax_comes_from_the_template_or_the_model_key() -> None:
    assert detect(MAY) == THINK
    assert detect("{{ messages }}") is None
    assert detect(None) is None
    assert detect(MAY, "none") is None
    assert detect(None, "<|think|>,<|/think|>") == ReasoningSyntax("<|think|>", "<|/think|>")
    assert parse_setting("AUTO") == "auto"
    assert detect("<|start|>assistant<|channel|>final<|message|>") == HARMONY == detect(None, "harmony")
    for bad in ("<think>", "<think>,", ",</think>", "<t>,<t>"):
        with pytest.raises(ValueError, match="START,END"):
            parse_setting(bad)


def test_where_a_turn_stands() -> None:
    assert THINK.state("<|im_start|>assistant\n") == "none"
    assert THINK.state("assistant\n<think>\n") == "open"
    assert THINK.state("assistant\n<think>\n\n</think>\n\n") == "closed"
    assert THINK.state("<think>a</think> then <think>b") == "open"


def test_the_answer_keeps_a_quarter_at_most_512_and_never_less_than_its_shortest_output() -> None:
    assert answer_reserve(60, 0) == 15
    assert answer_reserve(8000, 0) == 512
    assert answer_reserve(60, 40) == 40
    assert answer_reserve(2, 0) == 1


def test_a_model_that_may_reason_gets_its_reasoning_opened_and_a_shared_budget() -> None:
    plan, added = plan_for(MAY, ReasoningRequest(effort="low"))
    assert added
    (reasoning,) = plan.passes
    assert (reasoning.opening, reasoning.stop, reasoning.max_tokens) == ("<think>\n", ["</think>"], 1024)
    assert reasoning.shares_max_tokens and not reasoning.show_opening
    assert reasoning.show_as == "reasoning_content"
    assert plan.template_vars == {"enable_thinking": True, "reasoning_effort": "low"}
    assert reasoning.done is not None
    reasoning.done(plan, "cut sho")  # a pass ended by its budget: the kernel writes the end marker
    assert plan.continuation == [("<think>\n", True), ("cut sho", False), ("\n</think>\n\n", True)]


def test_a_template_that_opens_the_reasoning_is_continued() -> None:
    plan, added = plan_for(OPENS)
    assert added and plan.passes[0].opening == ""
    assert plan.passes[0].done is not None
    plan.passes[0].done(plan, "thought\n")
    assert plan.continuation == [("thought\n", False), ("</think>\n\n", True)]


@pytest.mark.parametrize("asked", [ReasoningRequest(effort="none"), ReasoningRequest(budget=0),
                                   ReasoningRequest(template_kwargs={"enable_thinking": False})])
def test_reasoning_off_closes_an_open_turn_with_an_empty_block(asked: ReasoningRequest) -> None:
    plan, added = plan_for(OPENS, asked)
    assert not added and not plan.passes
    assert plan.continuation == [("\n\n</think>\n\n", True)]
    assert plan.template_vars["enable_thinking"] is False


def test_reasoning_off_where_the_template_closes_the_block_itself_adds_nothing() -> None:
    plan = RequestPlan(messages=[{"role": "user", "content": "hi"}], template_vars={"enable_thinking": False})
    assert plan_reasoning(THINK, ReasoningRequest(effort="none"), plan, PromptRenderer(MAY), "m") == "answer"
    assert plan.continuation == [] and plan.passes == []


def test_a_leading_prompt_decides_where_the_turn_stands() -> None:
    plan, added = plan_for(MAY, leading="<think>\nI know")
    assert added and plan.passes[0].opening == ""
    # the client's own markers are the model's markers; the rest of its text stays plain text
    assert (plan.leading_prompt, plan.continuation) == ("", [("<think>", True), ("\nI know", False)])
    plan, added = plan_for(MAY, leading="The answer is")  # the client opened the answer
    assert not added and not plan.continuation and plan.leading_prompt == "The answer is"
    plan, added = plan_for(MAY, leading="<think>done</think>")
    assert not added and plan.continuation == [("<think>", True), ("done", False), ("</think>", True)]


def test_reasoning_asked_of_a_model_without_it_is_refused_and_none_is_accepted() -> None:
    with pytest.raises(InvalidRequest) as raised:
        plan_for("{{ messages }}", ReasoningRequest(effort="high"))
    assert raised.value.param == "reasoning_effort"
    with pytest.raises(InvalidRequest) as raised:
        plan_for("{{ messages }}", ReasoningRequest(budget=10))
    assert raised.value.param == "reasoning_budget"
    assert plan_for("{{ messages }}", ReasoningRequest(effort="none")) == (plan_for("{{ messages }}")[0], False)


def test_a_thinking_template_replaces_the_models_reasoning() -> None:
    plan = RequestPlan(messages=[{"role": "user", "content": "hi"}],
                       passes=[GenerationPass(opening="<x>", reasoning=True)])
    assert plan_reasoning(THINK, ReasoningRequest(), plan, PromptRenderer(OPENS), "m") == "answer"
    assert len(plan.passes) == 1
    assert plan.continuation == [("\n\n</think>\n\n", True)]
    with pytest.raises(InvalidRequest) as raised:
        plan_reasoning(THINK, ReasoningRequest(budget=5), plan, PromptRenderer(OPENS), "m")
    assert raised.value.param == "reasoning_budget"


def test_the_reasoning_runs_before_a_plugins_other_passes_and_stays_before_their_output() -> None:
    plan = RequestPlan(messages=[{"role": "user", "content": "hi"}], passes=[GenerationPass(opening="<plan>")])
    assert plan_reasoning(THINK, ReasoningRequest(), plan, PromptRenderer(MAY), "m") == "pass"
    assert [p.opening for p in plan.passes] == ["<think>\n", "<plan>"]
    assert plan.passes[0].done is not None
    keep_order(plan, plan.passes[0].done, "why\n")
    keep_order(plan, lambda p, text: setattr(p, "leading_prompt", p.leading_prompt + text), "<plan>steps</plan>\n")
    assert plan.leading_prompt == ""
    assert plan.continuation == [("<think>\n", True), ("why\n", False), ("</think>\n\n", True),
                                 ("<plan>steps</plan>\n", False)]


def test_harmony_reasons_on_the_analysis_channel_and_answers_on_final() -> None:
    template = "{% for m in messages %}<|start|>{{ m.role }}<|channel|>final<|message|>{{ m.content }}<|end|>" \
               "{% endfor %}" \
               "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
    plan, added = plan_for(template)
    assert added
    (reasoning,) = plan.passes
    assert reasoning.opening == "<|channel|>analysis<|message|>" and reasoning.stop == ["<|end|>"]
    assert reasoning.constraint is not None  # the end marker may be a control token: a grammar writes it
    assert reasoning.done is not None
    reasoning.done(plan, "why")
    assert plan.continuation == [("<|channel|>analysis<|message|>", True), ("why", False),
                                 ("<|end|><|start|>assistant<|channel|>final<|message|>", True)]
    plan, added = plan_for(template, ReasoningRequest(effort="none"))
    assert plan.continuation == [("<|channel|>analysis<|message|><|end|><|start|>assistant"
                                  "<|channel|>final<|message|>", True)]


def test_a_template_that_only_names_the_markers_reasons_when_asked() -> None:
    """An instruct model's template that drops earlier reasoning (``split('</think>')``) but neither opens a
    reasoning block nor offers a switch: the model answers, unless the request asks for reasoning."""
    names_only = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>"
                  "{{ m.reasoning_content }}</think>{% endif %}{{ m.content.split('</think>')[-1] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    plan, added = plan_for(names_only)
    assert not added and not plan.continuation
    plan, added = plan_for(names_only, ReasoningRequest(effort="low"))
    assert added and plan.passes[0].opening == "<think>\n"


def test_template_kwargs_count_against_the_request_text_budget() -> None:
    from gallama_kernel.pipeline.service import check_chat_limits
    from gallama_kernel.protocol import limits
    from gallama_kernel.protocol.openai import ChatCompletionRequest

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    chat_template_kwargs={"notes": "x" * (limits.MAX_REQUEST_CHARS + 1)})
    with pytest.raises(InvalidRequest) as raised:
        check_chat_limits(request)
    assert (raised.value.param or "").startswith("chat_template_kwargs")
