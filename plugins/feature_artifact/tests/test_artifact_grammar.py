"""The answer grammar (accepts the format, refuses the rest, compiles for llguidance) and the plugin's hooks."""

from __future__ import annotations

from importlib.metadata import entry_points

import llguidance
import pytest

from gallama_feature_artifact import plugin
from gallama_feature_artifact.grammar import (
    PLAN_CLOSE,
    PLAN_OPEN,
    answer_constraint,
    answer_grammar,
    plan_constraint,
)
from gallama_feature_artifact.transformer import ArtifactTransformer
from gallama_kernel.grammar.closing import Closer
from gallama_kernel.pipeline.constraints import compile_constraint
from gallama_kernel.pipeline.plan import RequestPlan
from gallama_kernel.plugins import PluginHost, create_host
from gallama_kernel.protocol.errors import InvalidRequest
from gallama_kernel.protocol.openai import ChatCompletionRequest, validate_request

ART = '<artifact identifier="quicksort-python" type="code" language="python" title="Quicksort in Python">'

ACCEPTED = [
    "<answer><text>Hello.</text></answer>",
    "<answer><text></text></answer>",
    f"<answer>\n<text>Quicksort sorts.</text>\n{ART}\ndef f(a):\n    return a if len(a) < 2 else a\n</artifact>\n"
    "<text>Done.</text>\n</answer>",
    '<answer><artifact identifier="poem" type="self_contained_text" language="" title="A poem">Roses'
    "</artifact></answer>",
    '<answer><artifact identifier="list-2" type="code" language="c++" title="List&lt;int&gt; \'demo\'">'
    "std::vector<int> v; if (a < b && c </d) {}</artifact></answer>",
    '<answer><artifact identifier="svg-logo" type="code" language="svg" title="Logo">'
    "<svg><text>hi</text></svg></artifact></answer>",
    "<answer><text>a <b>bold</b> </tex claim about <artifacts</text> <text>x</text></answer>",
]

REFUSED = [
    "<text>Hello.</text>",  # no <answer>
    "<answer></answer>",  # no segment
    "<answer><text>Hello.</text>",  # not closed
    "<answer><text>Hello.</text></answer> trailing",
    "<answer>loose<text>Hello.</text></answer>",  # text outside segments
    "<answer><text>a</text>b</text></answer>",  # a body cannot contain its closing tag
    "<answer><text>a</text>\n\n\n\n\n<text>b</text></answer>",  # too much whitespace between segments
    '<answer><artifact identifier="Quick_Sort" type="code" language="python" title="t">x</artifact></answer>',
    '<answer><artifact identifier="quick--sort" type="code" language="python" title="t">x</artifact></answer>',
    '<answer><artifact identifier="-quick" type="code" language="python" title="t">x</artifact></answer>',
    '<answer><artifact identifier="q" type="python" language="python" title="t">x</artifact></answer>',
    '<answer><artifact identifier="q" type="code" language="py"thon" title="t">x</artifact></answer>',
    '<answer><artifact identifier="q" type="code" language="python" title="two\nlines">x</artifact></answer>',
    '<answer><artifact identifier="q" type="code" language="python" title="">x</artifact></answer>',
    f'<answer><artifact identifier="q" type="code" language="python" title="{"t" * 81}">x</artifact></answer>',
    '<answer><artifact type="code" identifier="q" language="python" title="t">x</artifact></answer>',  # order
    f"<answer>{ART}def f(): pass</answer>",  # artifact not closed
    "<answer><text>a <text>b</text></answer>",  # no tag of the format inside prose
    '<answer><text>a <text id="x">b</text></answer>',
    f"<answer><text>see {ART}</text></answer>",
    "<answer><text>a </artifact></text></answer>",
    f"<answer>{ART}x <answer></artifact></answer>",  # nor answer or artifact tags inside an artifact
    f"<answer>{ART}x {ART}y</artifact></answer>",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_grammar_accepts_well_formed_answers(text: str) -> None:
    assert answer_grammar().matches(text)


@pytest.mark.parametrize("text", REFUSED)
def test_grammar_refuses_malformed_answers(text: str) -> None:
    assert not answer_grammar().matches(text)


def test_grammars_compile_for_llguidance() -> None:
    for constraint in (answer_constraint(), plan_constraint()):
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            compile_constraint(constraint).llguidance)
        assert not is_error, messages
        assert not messages


def llguidance_accepts(grammar: str, text: str) -> bool:
    """Whether llguidance lets a byte-level model write exactly ``text`` and then stop."""
    tokenizer = llguidance.LLTokenizer("byte")
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    tokens = tokenizer.tokenize_bytes(text.encode())
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("text", ACCEPTED + REFUSED)
def test_llguidance_enforces_what_lark_reads(text: str) -> None:
    assert llguidance_accepts(answer_grammar().llguidance, text) == (text in ACCEPTED)


@pytest.mark.parametrize("text", ACCEPTED + REFUSED)
def test_the_closer_reads_what_lark_reads(text: str) -> None:
    """The kernel's closer (and GBNF) read the bodies' look-aheads as an automaton: the same language."""
    progress = Closer.for_grammar(answer_grammar()).start()
    assert (progress.feed(text) and progress.closing() == "") == (text in ACCEPTED)


@pytest.mark.parametrize("text", ACCEPTED)
def test_every_prefix_closes_to_a_valid_answer(text: str) -> None:
    """An answer cut anywhere (at ``max_tokens``) gets the shortest ending that makes it a valid answer."""
    closer = Closer.for_grammar(answer_grammar())
    for end in range(len(text) + 1):
        progress = closer.start()
        assert progress.feed(text[:end])
        closing = progress.closing()
        assert closing is not None and answer_grammar().matches(text[:end] + closing), (text[:end], closing)
        assert llguidance_accepts(answer_grammar().llguidance, text[:end] + closing)
    assert closer.shortest() == "<answer><text></text></answer>"


def test_a_cut_artifact_body_gets_its_closing_tags() -> None:
    progress = Closer.for_grammar(answer_grammar()).start()
    assert progress.feed(f"<answer>{ART}def f(a):\n    return a if len(a) </")
    assert progress.closing() == "artifact></answer>"


# -- hooks -------------------------------------------------------------------------------------------------

def fields() -> dict:
    host = PluginHost()
    host.register(plugin, "artifact")
    return host.request_fields


def request(**extra: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Write quicksort"}], **extra}
    return validate_request(ChatCompletionRequest, body, fields())


def new_plan(req: ChatCompletionRequest) -> RequestPlan:
    return RequestPlan(messages=[{"role": "user", "content": "Write quicksort"}])


def test_entry_point_loads() -> None:
    assert any(ep.name == "artifact" and ep.value == "gallama_feature_artifact.plugin"
               for ep in entry_points(group="gallama"))
    host = create_host()
    record = host.records["artifact"]
    assert record.status == "loaded", record.error
    assert set(record.hooks) == {"prepare_request", "register_request_fields", "response_transformers"}


def test_field_values() -> None:
    assert request().extensions == {}
    assert request(artifact="Slow").extensions == {"artifact": "Slow"}
    with pytest.raises(InvalidRequest) as caught:
        request(artifact="Maybe")
    assert caught.value.param == "artifact"


def test_no_leaves_the_plan_alone() -> None:
    req = request(artifact="No")
    plan = new_plan(req)
    plugin.prepare_request(request=req, plan=plan)
    assert plan == new_plan(req)
    assert plugin.response_transformers(request=req) is None
    assert plugin.response_transformers(request=request()) is None


def test_fast_prompts_and_constrains() -> None:
    req = request(artifact="Fast")
    plan = new_plan(req)
    plugin.prepare_request(request=req, plan=plan)
    assert plan.messages[0]["role"] == "system" and "<artifact" in plan.messages[0]["content"]
    assert "<plan>" not in plan.messages[0]["content"]
    assert [m["role"] for m in plan.messages] == ["system", "user", "assistant", "user"]
    assert answer_grammar().matches(plan.messages[2]["content"])  # the example follows the format
    assert plan.messages[3] == {"role": "user", "content": "Write quicksort"}
    assert plan.constraint is not None and plan.constraint.kind == "custom"
    assert compile_constraint(plan.constraint) == answer_grammar()
    assert plan.passes == []
    [transformer] = plugin.response_transformers(request=req)
    assert isinstance(transformer, ArtifactTransformer)


def test_slow_plans_in_a_hidden_pass() -> None:
    req = request(artifact="Slow", max_tokens=100)
    plan = RequestPlan(messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Write quicksort"}])
    plugin.prepare_request(request=req, plan=plan)
    assert plan.messages[0]["content"].startswith("Be brief.\n\n") and "<plan>" in plan.messages[0]["content"]
    example = plan.messages[2]["content"]
    assert example.startswith(PLAN_OPEN)
    example_plan, example_answer = example.removeprefix(PLAN_OPEN).split(f"{PLAN_CLOSE}\n", 1)
    assert compile_constraint(plan.passes[0].constraint).matches(example_plan + PLAN_CLOSE)
    assert answer_grammar().matches(example_answer)
    [planning] = plan.passes
    assert planning.show_as == "hidden" and planning.opening == PLAN_OPEN and planning.max_tokens == 100
    plan_grammar = compile_constraint(planning.constraint)
    assert plan_grammar.matches("- explain\n- code: quicksort-python\n</plan>")
    assert not plan_grammar.matches("1. explain</plan>")
    assert not plan_grammar.matches("- <artifact>\n</plan>")
    assert not plan_grammar.matches("".join(f"- line {i}\n" for i in range(9)) + "</plan>")
    assert llguidance_accepts(plan_grammar.llguidance, "- explain\n- code\n</plan>")
    planning.done(plan, "1. explain</plan>")
    assert plan.leading_prompt == f"{PLAN_OPEN}1. explain</plan>\n"
    truncated = RequestPlan(messages=[])
    planning.done(truncated, "1. expl")
    assert truncated.leading_prompt == f"{PLAN_OPEN}1. expl\n{PLAN_CLOSE}\n"
    assert plugin.planning_pass(None).max_tokens == plugin.PLAN_MAX_TOKENS


def test_example_only_before_a_user_turn() -> None:
    from gallama_feature_artifact.prompt import with_prompts

    opened_by_assistant = with_prompts([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}],
                                       "Fast")
    assert [m["role"] for m in opened_by_assistant] == ["system", "assistant", "user"]


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"response_format": {"type": "json_object"}},
    {"regex_pattern": "[a-z]+"},
])
def test_other_constraints_are_refused(extra: dict) -> None:
    from gallama_kernel.pipeline.constraints import from_request

    req = request(artifact="Fast", **extra)
    plan = RequestPlan(messages=[], constraint=from_request(req))
    with pytest.raises(InvalidRequest) as caught:
        plugin.prepare_request(request=req, plan=plan)
    assert caught.value.param == "artifact"
    assert next(iter(extra)) in caught.value.message
