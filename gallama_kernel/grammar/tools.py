"""The tool-call grammar: how a model calls functions, enforced token by token.

A call is written ``<tool_call>{"name":"NAME","arguments":{...}}</tool_call>`` with compact JSON arguments valid
against the function's ``parameters`` schema; parallel calls follow each other directly. This is the
Hermes/Qwen call syntax, so models trained on it write it naturally, and the same text re-renders a
conversation's earlier calls exactly as they were generated (their KV stays cached).

No newline between calls: with one allowed, greedy SmolLM2 wrote ``"\n"`` after every call instead of ending
its turn and repeated the call until ``max_tokens`` (5 identical calls, ``length``); without it, it ends after
the call (``tool_calls``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lark import Token, Tree

from .core import Grammar, GrammarBuilder, literal, not_starting_with
from .json_schema import JsonSchemaCompiler

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CALL_SEPARATOR = ""
MARKERS = (CALL_OPEN, CALL_CLOSE)
"""Written as the vocabulary's tokens where it has them (Qwen's ``<tool_call>``): an engine's grammar matcher
reads such a token apart from text, so a model trained to write it writes that token, not its characters."""
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
"""A function without ``parameters`` takes none: its arguments are ``{}``."""


def call_head(name: str) -> str:
    """Text that opens a call of ``name``, up to its arguments."""
    return CALL_OPEN + '{"name":' + json.dumps(name) + ',"arguments":'


CALL_TAIL = "}" + CALL_CLOSE


def call_text(name: str, arguments: str) -> str:
    """A whole call as the grammar writes it (``arguments`` is compact JSON text)."""
    return call_head(name) + arguments + CALL_TAIL


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any] | bool


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # compact JSON text, exactly as generated


def add_tool_calls(builder: GrammarBuilder, tools: list[ToolSpec], *, only: str | None = None,
                   parallel: bool = True) -> str:
    """Add rules for calls of ``tools`` (or of the one named ``only``); return the expansion for the calls.

    Call rules are named ``tool_call_<index in tools>``; :func:`read_calls` finds them in a parse tree.
    """
    rules = {i: builder.reserve(f"tool_call_{i}") for i, tool in enumerate(tools) if only in (None, tool.name)}
    for i, name in rules.items():
        tool = tools[i]
        parameters = EMPTY_PARAMETERS if tool.parameters in (None, {}) else tool.parameters
        compiler = JsonSchemaCompiler(builder, param=f"tools[{i}].function.parameters")
        arguments = compiler.compile(parameters)
        head, tail = builder.spelled(call_head(tool.name), MARKERS), builder.spelled(CALL_TAIL, MARKERS)
        builder.define(name, f"{head} {arguments} {tail}")
    one = builder.rule("one_tool_call", " | ".join(rules.values()))
    if not parallel:
        return one
    if not CALL_SEPARATOR:
        return builder.rule("tool_calls", f"{one}+")
    return builder.rule("tool_calls", f"{one} ({literal(CALL_SEPARATOR)} {one})*")


def tool_call_grammar(tools: list[ToolSpec], choice: str, *, parallel: bool = True,
                      alternative: str | None = None, builder: GrammarBuilder | None = None) -> tuple[GrammarBuilder,
                                                                                                  str]:
    """Rules and start expansion for ``tool_choice`` = ``required`` / ``auto`` / a function name.

    ``auto`` lets the model answer with calls or with ``alternative`` (an expansion; default: text that does
    not start with ``<tool_call>``, so it can never be a malformed call).
    """
    builder = builder or GrammarBuilder()
    if choice == "required":
        return builder, add_tool_calls(builder, tools, parallel=parallel)
    if choice == "auto":
        calls = add_tool_calls(builder, tools, parallel=parallel)
        if alternative is None:
            alternative = "[" + builder.terminal("text", not_starting_with(CALL_OPEN)) + "]"
        return builder, f"{calls} | {alternative}"
    return builder, add_tool_calls(builder, tools, only=choice, parallel=False)


def read_calls(tree: Tree, text: str, tools: list[ToolSpec]) -> list[ParsedCall]:
    """The calls in a parse of ``text`` by a grammar made with :func:`add_tool_calls`, in order."""
    found: list[tuple[int, ParsedCall]] = []
    for node in tree.iter_subtrees():
        if not isinstance(node.data, str) or not node.data.startswith("tool_call_"):
            continue
        suffix = node.data.removeprefix("tool_call_")
        if not suffix.isdigit():
            continue
        tool = tools[int(suffix)]
        span = _span(node, text)
        head = call_head(tool.name)
        arguments = span[len(head):len(span) - len(CALL_TAIL)]
        found.append((node.meta.start_pos, ParsedCall(tool.name, arguments)))
    return [call for _, call in sorted(found, key=lambda item: item[0])]


def _span(node: Tree | Token, text: str) -> str:
    if isinstance(node, Token):
        return str(node)
    return text[node.meta.start_pos:node.meta.end_pos]


def grammar_for_tools(tools: list[ToolSpec], choice: str, parallel: bool = True) -> Grammar:
    builder, start = tool_call_grammar(tools, choice, parallel=parallel)
    return builder.build(start, "tool calls")
