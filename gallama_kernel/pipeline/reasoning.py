"""Models that reason natively: their reasoning span is recognised, budgeted, and kept out of the answer.

**Recognition, per model.** A reasoning model's chat template writes its markers: gpt-oss's harmony channels
(``<|channel|>`` and ``<|message|>``: :data:`HARMONY`), else Qwen3, QwQ and the DeepSeek-R1 distills write
``<think>`` … ``</think>``, other families one of :data:`KNOWN_MARKERS`; the first pair whose two markers both
occur in the template's source is the model's syntax. A template that names none (a generic or missing one)
leaves the vocabulary: the first pair that are both special tokens of their own. The model key ``reasoning``
overrides both: ``none`` (the model never reasons), ``auto`` (the default), ``harmony``, or ``START,END`` (the
two markers).

**Where the turn stands.** The generation prompt (what the template writes after the conversation to open the
assistant's turn) and the request's ``leading_prompt`` tell where the model starts:

* ``open``: the last marker in them is the start marker (DeepSeek-R1's template opens ``<think>`` itself, or a
  client's ``leading_prompt`` does): the model starts inside its reasoning;
* ``closed``: the last marker is the end marker (Qwen3's template with ``enable_thinking=false`` writes an empty
  ``<think></think>``): the reasoning is over, the model starts with its answer;
* ``none``: no marker. Without a ``leading_prompt`` the kernel opens the reasoning itself (start marker and a
  newline) when the template offers a switch for it (``enable_thinking``: Qwen3's hybrid models) or the request
  asks for reasoning (``reasoning_effort``, ``reasoning_budget``); a template that only names the markers (to
  drop earlier turns' reasoning, as instruct-only models' templates do, or as older DeepSeek-R1 distills' do
  although the model reasons anyway) leaves the model answering, and a free answer (no constraint) that opens
  with the start marker has its block read as reasoning (:class:`UnaskedReasoning`). A ``leading_prompt``
  without markers opened the answer, and the model answers.

**Think, then answer.** With reasoning on, the reasoning runs as a generation pass of its own before the answer
(:class:`~.plan.GenerationPass`): free text, streamed as ``reasoning_content``, ended by the end marker (a stop
string), by the end of the model's turn, or by its budget. The kernel then writes the end marker itself when the
model did not, and the answer continues the same assistant turn after it, under the request's constraint (tools,
``response_format``, regex, grammar, artifacts): the reasoning is free, the answer enforced. The answer's prompt
repeats the pass's prompt and output, so an engine with a prefix cache computes nothing twice.

**One budget.** ``max_tokens`` covers the reasoning and the answer. The reasoning may use at most its own budget
(``reasoning_budget``, else :data:`EFFORT_BUDGET` of ``reasoning_effort``), and never so much that less than
the answer's reserve is left (:func:`answer_reserve`: a quarter of ``max_tokens``, at most
:data:`MAX_ANSWER_RESERVE`, and never less than the answer's shortest valid output).

**Reasoning off** (``reasoning_effort="none"``, ``reasoning_budget=0``, ``chat_template_kwargs`` with
``enable_thinking: false``, or a plugin's reasoning pass such as a thinking template, which replaces it): the
template is told (``enable_thinking=false``), and a turn it leaves ``open`` or ``none`` gets an empty reasoning
block closed by the kernel, so the model answers at once and nothing it writes is taken for reasoning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..grammar.core import GrammarBuilder
from ..protocol.errors import InvalidRequest
from .constraints import Constraint
from .plan import GenerationPass, RequestPlan

if TYPE_CHECKING:
    from ..protocol.openai import ChatCompletionRequest
    from .prompt import PromptRenderer

KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<seed:think>", "</seed:think>"),
    ("◁think▷", "◁/think▷"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)
"""Reasoning markers of the model families whose templates name them (the first pair found wins)."""

EFFORT_BUDGET: dict[str, int | None] = {"minimal": 256, "low": 1024, "medium": 4096, "high": None}
"""Reasoning tokens per ``reasoning_effort`` (``None``: as many as ``max_tokens`` leaves; ``none``: no
reasoning)."""

MAX_ANSWER_RESERVE = 512
"""The most tokens the reasoning must leave for the answer (see :func:`answer_reserve`)."""

TEMPLATE_SWITCHES = ("enable_thinking", "thinking")
"""``chat_template_kwargs`` that turn a template's reasoning on or off (Qwen3: ``enable_thinking``)."""

State = Literal["open", "closed", "none"]


@dataclass(frozen=True)
class ReasoningSyntax:
    """How a model marks its reasoning: it reasons between :attr:`start` and :attr:`end`.

    :param lead: what follows the start marker the kernel writes itself (``<think>`` then a newline)
    :param blank: what an empty reasoning block holds between its markers
    :param after: what follows the end marker before the answer
    :param answer: what opens a plain answer after the reasoning (harmony's final channel); a tool format that
        writes its own channel headers does without it
    :param token_end: the end marker is a control token: the reasoning pass ends with it under a grammar that
        writes it as that token (see :meth:`~gallama_kernel.grammar.core.GrammarBuilder.special_token`)
    :param always: the model reasons in every turn (harmony's analysis channel), whatever its template offers
    """

    start: str
    end: str
    lead: str = "\n"
    blank: str = "\n\n"
    after: str = "\n\n"
    answer: str = ""
    token_end: bool = False
    always: bool = False

    def state(self, text: str) -> State:
        """Where a turn that opens with ``text`` stands (see the module docstring)."""
        start, end = text.rfind(self.start), text.rfind(self.end)
        if start > end:
            return "open"
        return "closed" if end >= 0 else "none"


HARMONY = ReasoningSyntax("<|channel|>analysis<|message|>", "<|end|>", lead="", blank="",
                          after="<|start|>assistant", answer="<|channel|>final<|message|>", token_end=True,
                          always=True)
"""gpt-oss's harmony format: reasoning in the ``analysis`` channel, ended by ``<|end|>`` (a control token), the
answer in a new message on the ``final`` channel (tool calls on ``commentary``: see the ``harmony`` tool format).
Recognised from a template that writes ``<|channel|>`` and ``<|message|>``, or the key ``reasoning=harmony``."""


def parse_setting(value: str | None) -> ReasoningSyntax | Literal["auto"] | None:
    """The model key ``reasoning``: ``auto`` (or unset), ``none``, ``harmony``, or ``START,END``."""
    if value is None or value.strip().lower() == "auto":
        return "auto"
    if value.strip().lower() == "none":
        return None
    if value.strip().lower() == "harmony":
        return HARMONY
    start, comma, end = value.partition(",")
    if not comma or not start.strip() or not end.strip() or start.strip() == end.strip():
        raise ValueError(f"reasoning={value!r}: give 'auto', 'none', or the two markers as START,END "
                         "(for example <think>,</think>)")
    return ReasoningSyntax(start.strip(), end.strip())


def detect(template: str | None, setting: str | None = None,
           vocabulary: Collection[str] = ()) -> ReasoningSyntax | None:
    """The model's reasoning syntax from its ``reasoning`` key, else from its chat template's source, else from
    its vocabulary: ``vocabulary`` holds the texts its tokenizer reads as special tokens of their own (a model
    whose template says nothing of reasoning but whose vocabulary has ``<think>`` and ``</think>``)."""
    chosen = parse_setting(setting)
    if chosen != "auto":
        return chosen
    for names in (template or "", vocabulary):
        if "<|channel|>" in names and "<|message|>" in names:
            return HARMONY
        for start, end in KNOWN_MARKERS:
            if start in names and end in names:
                return ReasoningSyntax(start, end)
    return None


def generation_prompt(renderer: PromptRenderer, messages: list[dict[str, Any]], variables: dict[str, Any]) -> str:
    """What the template writes to open the assistant's turn: the rendering with the generation prompt less the
    rendering without (its last 256 characters when the template renders the conversation differently)."""
    full = renderer.render(messages, add_generation_prompt=True, **variables)
    try:
        bare = renderer.render(messages, add_generation_prompt=False, **variables)
    except InvalidRequest:  # a template that insists on ending with a user turn, say
        return full[-256:]
    return full[len(bare):] if full.startswith(bare) else full[-256:]


def answer_reserve(total: int, shortest: int) -> int:
    """Tokens the reasoning leaves the answer out of ``total``: a quarter, at most :data:`MAX_ANSWER_RESERVE`,
    at least ``shortest`` (the answer's shortest valid output) and 1."""
    return max(1, shortest, min(total // 4, MAX_ANSWER_RESERVE))


@dataclass
class ReasoningRequest:
    """What a chat request asks of a model's reasoning."""

    effort: str | None = None
    budget: int | None = None
    template_kwargs: dict[str, Any] | None = None
    include: bool = True  # the reasoning is returned (``include_reasoning``)

    @classmethod
    def of(cls, request: ChatCompletionRequest) -> ReasoningRequest:
        return cls(request.reasoning_effort, request.reasoning_budget, request.chat_template_kwargs,
                   request.include_reasoning)

    @property
    def wanted(self) -> bool:
        """False when any of the request's fields turns reasoning off."""
        if self.effort == "none" or self.budget == 0:
            return False
        kwargs = self.template_kwargs or {}
        return all(kwargs.get(switch, True) is not False for switch in TEMPLATE_SWITCHES)

    @property
    def explicit(self) -> str | None:
        """The field that asks for reasoning by name (refused by a model that does not reason)."""
        if self.budget:
            return "reasoning_budget"
        if self.effort not in (None, "none"):
            return "reasoning_effort"
        return None

    @property
    def tokens(self) -> int | None:
        """The reasoning's own budget (``None``: only ``max_tokens`` bounds it)."""
        if self.budget is not None:
            return self.budget
        return EFFORT_BUDGET.get(self.effort) if self.effort is not None else None


Outcome = Literal["pass", "answer", "may_open"]
"""What :func:`plan_reasoning` planned: a reasoning ``pass``; the model starts with its ``answer``; or the model
starts with its answer but ``may_open`` a reasoning block unasked (read by :class:`UnaskedReasoning`)."""


def plan_reasoning(syntax: ReasoningSyntax | None, asked: ReasoningRequest, plan: RequestPlan,
                   renderer: PromptRenderer, model_name: str) -> Outcome:
    """Apply the model's reasoning to ``plan`` (after the plugins' ``prepare_request``): template variables, the
    reasoning pass, or the empty block that keeps a model that reasons from reasoning. Returns what it planned
    (:data:`Outcome`).

    :raises InvalidRequest: reasoning asked of a model without a reasoning syntax, or a reasoning budget beside
        a plugin's thinking passes (one replaces the other).
    """
    if syntax is None:
        if asked.explicit is not None:
            raise InvalidRequest(f"The model '{model_name}' does not reason natively, so '{asked.explicit}' "
                                 "cannot be honoured (a model reasons when its chat template writes reasoning "
                                 "markers, or its 'reasoning' key names them).", param=asked.explicit,
                                 code="unsupported_parameter")
        return "answer"
    replaced = any(existing.reasoning for existing in plan.passes)
    if replaced and asked.explicit is not None:
        raise InvalidRequest(f"'{asked.explicit}' sets the model's own reasoning, which a thinking template "
                             "replaces; send one of them.", param=asked.explicit)
    on = asked.wanted and not replaced
    variables = plan.template_vars  # the request's chat_template_kwargs are in already
    variables.setdefault("enable_thinking", on)
    if asked.effort is not None:
        variables.setdefault("reasoning_effort", asked.effort)
    state = syntax.state(generation_prompt(renderer, plan.messages, variables) + plan.leading_prompt)
    _trust_markers(syntax, plan)
    if state == "closed" or (state == "none" and plan.leading_prompt):
        return "answer"
    offered = syntax.always or any(name in renderer.source for name in TEMPLATE_SWITCHES)
    if state == "none" and asked.explicit is None and not offered:
        # neither opened by the template nor offered by a switch: the model reasons when asked to, or opens a
        # block of its own accord (an older DeepSeek-R1 distill), which a free answer reads as reasoning
        return "may_open" if plan.constraint is None and not replaced else "answer"
    calls_format_answer = plan.constraint is not None and plan.constraint.kind == "tools"
    answer = "" if calls_format_answer else syntax.answer  # a tool format writes its own channel headers
    if not on:  # an empty block: the answer starts at once
        opening = "" if state == "open" else syntax.start
        plan.continuation.append((f"{opening}{syntax.blank}{syntax.end}{syntax.after}{answer}", True))
        return "answer"
    opening = syntax.start + syntax.lead if state == "none" else ""
    pass_ = GenerationPass(opening=opening, stop=[syntax.end], max_tokens=asked.tokens,
                           constraint=_token_end(syntax) if syntax.token_end else None,
                           show_as="reasoning_content" if asked.include else "hidden",
                           show_opening=False, shares_max_tokens=True, reasoning=True,
                           done=_closer(syntax, opening, answer))
    plan.passes.insert(0, pass_)  # before the plugins' passes (an artifact plan is made after the reasoning)
    return "pass"


def _trust_markers(syntax: ReasoningSyntax, plan: RequestPlan) -> None:
    """The reasoning markers in a ``leading_prompt`` (the client's own opening of the assistant turn) are the
    model's markers, not their characters: the prompt continues with the leading prompt cut at them, markers
    trusted. Every other text of the client stays plain text."""
    text = plan.leading_prompt
    if syntax.start not in text and syntax.end not in text:
        return
    pattern = re.compile(f"({re.escape(syntax.start)}|{re.escape(syntax.end)})")
    pieces = [(part, index % 2 == 1) for index, part in enumerate(pattern.split(text)) if part]
    plan.continuation[:0] = pieces
    plan.leading_prompt = ""


def _token_end(syntax: ReasoningSyntax) -> Constraint:
    """Free text ended by the end marker written as its control token (which the engine then shows as text,
    where the pass's stop string ends it)."""

    def build(builder: GrammarBuilder) -> str:
        text = builder.terminal("reasoning_text", r"(.|\n)+")
        return f"[{text}] {builder.special_token(syntax.end)}"

    return Constraint.custom(f"reasoning-until-token:{syntax.end}", build, f"reasoning ended by {syntax.end}",
                             param="messages")


def _closer(syntax: ReasoningSyntax, opening: str, answer: str) -> Callable[[RequestPlan, str], None]:
    def done(plan: RequestPlan, text: str) -> None:
        """The pass's opening, the reasoning as the model wrote it, then the end marker (written here whatever
        ended the pass), and what opens the answer."""
        if opening:
            plan.continuation.append((opening, True))
        if text:
            plan.continuation.append((text, False))
        newline = "\n" if syntax.blank and text and not text.endswith("\n") else ""
        plan.continuation.append((newline + syntax.end + syntax.after + answer, True))
    return done


class UnaskedReasoning:
    """Reads a free answer that may open with a reasoning block the model wrote unasked (an older DeepSeek-R1
    distill's template neither opens ``<think>`` nor offers a switch, and the model reasons anyway).

    While the answer's first characters (after white space) may still be the start marker, they are held back.
    If the answer opens with it, what follows up to the end marker is reasoning (``reasoning_content``, or
    nothing when the client hides it or turned reasoning off), and the answer is what comes after the end
    marker and the white space after it. Any other opening is the answer, unchanged.
    """

    def __init__(self, syntax: ReasoningSyntax, include: bool) -> None:
        self.syntax = syntax
        self.include = include
        self.state: Literal["head", "inside", "after", "answer"] = "head"
        self.held = ""
        self.reasoning = ""  # the reasoning read so far, markers left out
        self.opened = False  # the answer opened a reasoning block

    def feed(self, text: str) -> list[dict[str, str]]:
        """The deltas of ``text``: ``{"reasoning_content": …}`` and ``{"content": …}``, in order."""
        out: list[dict[str, str]] = []
        self.held += text
        while self.held:
            if self.state == "head":
                stripped = self.held.lstrip()
                if self.syntax.start.startswith(stripped):
                    break  # maybe the start marker, not yet whole
                if not stripped.startswith(self.syntax.start):
                    self.state = "answer"
                    continue
                self.held = stripped[len(self.syntax.start):]
                self.state, self.opened = "inside", True
            elif self.state == "inside":
                if not self.reasoning:
                    self.held = self.held.lstrip()  # the white space after the start marker
                at = self.held.find(self.syntax.end)
                if at < 0:  # hold back a marker begun, and the white space before it (left out if it ends)
                    cut = len(self.held) - _partial_suffix(self.held, self.syntax.end)
                    while cut and self.held[cut - 1].isspace():
                        cut -= 1
                    self._reason(self.held[:cut], out)
                    self.held = self.held[cut:]
                    break
                self._reason(self.held[:at].rstrip(), out)
                self.held = self.held[at + len(self.syntax.end):]
                self.state = "after"
            elif self.state == "after":
                self.held = self.held.lstrip()
                if self.held:
                    self.state = "answer"
            else:
                out.append({"content": self.held})
                self.held = ""
        return out

    def finish(self) -> list[dict[str, str]]:
        """What is still held when the answer ends: a marker begun is the answer's text, a reasoning not ended
        stays reasoning."""
        out: list[dict[str, str]] = []
        if self.state == "inside":
            self._reason(self.held, out)
        elif self.held and self.state != "after":
            out.append({"content": self.held})
        self.held = ""
        return out

    def _reason(self, piece: str, out: list[dict[str, str]]) -> None:
        self.reasoning += piece
        if piece and self.include:
            out.append({"reasoning_content": piece})


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (held back: the marker may follow)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
