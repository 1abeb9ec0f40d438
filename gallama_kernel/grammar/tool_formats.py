"""Model-native tool-call formats: each model's own call syntax, enforced by a grammar and read back by a stream
reader, behind one interface (:class:`ToolFormat`).

Models are trained on different ways of writing a function call. A model writes its own syntax most reliably,
so the server enforces that syntax token by token and turns it back into OpenAI ``tool_calls``. Every format
writes JSON compactly, as the rest of the kernel does (:mod:`.json_schema`: no whitespace, properties in the
order ``properties`` lists them), and every call's arguments are valid against its function's ``parameters``.

The formats (:data:`FORMATS`, by name):

``hermes``
    ``<tool_call>{"name":"NAME","arguments":{...}}</tool_call>``, several calls back to back with nothing in
    between. The kernel's generic syntax (:mod:`.tools`, whose rules and texts this format reuses), trained
    into Hermes, Qwen2.5 and Qwen3. Templates show ``<tool_call>``.

``hermes_lines``
    ``<tool_call>\n{"name":"NAME","arguments":{...}}\n</tool_call>``, calls separated by ``"\n"``: the same
    calls, each on lines of its own between the tags, as the templates of Hermes 2 Pro, Qwen2.5 and Qwen3 write
    them (``<tool_call>\n{`` in the template's source).

``llama3_json``
    Llama 3.1/3.2/3.3 JSON calls: the whole message is ``{"name":"NAME","parameters":{...}}`` (keys in that
    order; Meta's template renders an earlier call as ``{"name": "NAME", "parameters": ARGS}``, spaced, which
    this format writes compactly like all kernel JSON). Llama 3.1 defines no way to write several calls in one
    message and Meta's template raises an exception for a message holding more than one, so this format holds
    exactly **one call**: ``parallel`` is ignored (as if ``parallel_tool_calls`` were false),
    :attr:`ToolFormat.parallel_calls` is false, and :meth:`~ToolFormat.render_calls` refuses several calls (a
    caller renders them as consecutive messages). Its :attr:`~ToolFormat.opening` is ``{"name":``: once a
    message starts so, only a call may follow, and a model used to writing ``{"name": "`` (with a space) is
    held to the compact form instead of slipping into free text. Templates show ``"parameters"`` together with
    ``<|python_tag|>``, ``Environment: ipython`` or the instruction ``{"name": function name, "parameters": ...}``.

``mistral``
    Mistral v3 and later (Mistral 7B v0.3, Nemo, Small): ``[TOOL_CALLS][{"name":"NAME","arguments":{...}},...]``:
    one JSON array holding every call (parallel calls are its members, separated by a bare comma). Mistral's
    templates write ``[TOOL_CALLS] [``, ``", "`` between calls and an ``"id"`` member for earlier calls; the
    model is held to the compact array without ids (ids are the server's). ``[TOOL_CALLS]`` is a control token
    in Mistral vocabularies, listed in :attr:`~ToolFormat.special_texts`: the grammar writes it as that token
    (:meth:`~.core.GrammarBuilder.special_token`) and the engine renders it as its text. Templates of
    Mistral's later tokenizers write calls as ``[TOOL_CALLS]NAME[ARGS]{...}``, another syntax:
    :meth:`~ToolFormat.detect` leaves them out.

``qwen3_coder``
    Qwen3-Coder's XML, one block per call, blocks separated by ``"\\n"``::

        <tool_call>
        <function=NAME>
        <parameter=ARG>
        VALUE
        </parameter>
        </function>
        </tool_call>

    A function without parameters is ``<tool_call>\\n<function=NAME>\\n</function>\\n</tool_call>``. Parameters
    are the properties of the function's ``parameters`` object: required ones always, optional ones when the
    model chooses, in the order ``properties`` lists them; other keys are never written (as in
    :mod:`.json_schema`). Without any ``properties`` or ``required`` (``{"type": "object"}``), any names may be
    written, with values of the ``additionalProperties`` schema. Names holding ``<``, ``>`` or a newline
    cannot be written in a tag and are refused. Templates show ``<function=`` and ``<parameter=``.

    Value typing. A parameter whose schema is a plain string schema (``"type": "string"``, or no type with an
    ``enum``/``const`` of strings only) is written **raw**: the text itself, unquoted, as the model was trained
    to write it; any text not containing ``</parameter>``, newlines included. The reader turns it into a JSON
    string. Every other parameter (numbers, booleans, arrays, objects, unions such as ``["string", "null"]``,
    ``$ref``/``anyOf`` schemas) is written as compact JSON valid against its schema, compiled by
    :class:`~.json_schema.JsonSchemaCompiler` (so a string inside an object or a union is JSON-quoted). On a
    raw string, ``enum``/``const`` are enforced exactly (members are literals; one holding ``</parameter>``
    cannot be written raw and is left out, and ``minLength``/``maxLength``/``pattern``/``format`` beside them
    filter the members), ``format`` exactly (the supported formats never hold ``<``), and ``minLength`` of 0 or
    1 exactly (1: not empty). The rest cannot be enforced exactly on text that must also exclude the closing
    tag (``pattern``, ``maxLength``, ``minLength`` above 1): a string parameter with one of them is written as a
    JSON string instead (quoted, escaped), enforced exactly like any JSON value, and read back as that string.

    The official template writes non-string values through Jinja's ``string`` filter (Python's ``True`` and
    ``None``); this format writes them as JSON (``true``, ``null``), which is what the grammar makes the model
    write and what JSON Schema validates.

Each format has a stream reader (:meth:`ToolFormat.reader`) that emits OpenAI deltas exactly like
:class:`~gallama_kernel.pipeline.tools.ToolCallStream`: a call's first delta carries its index, id, type,
name and empty arguments; then pieces of its arguments follow as they are generated; with ``may_answer``
(``tool_choice="auto"``) an output that does not open with the format's :attr:`~ToolFormat.opening` passes
through as ``content``. The argument pieces of a call concatenate to compact JSON equal to
:attr:`~.tools.ParsedCall.arguments`.

:func:`detect_format` recognises a model's format from its chat template's source; ``None`` means no known
native format (the server then uses ``hermes`` as the generic format).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .core import Grammar, GrammarBuilder, GrammarError, escape_regex, literal, not_starting_with
from .json_schema import ANNOTATIONS, JsonSchemaCompiler, compact
from .json_schema import FORMATS as STRING_FORMATS
from .tools import (
    CALL_CLOSE,
    CALL_OPEN,
    CALL_SEPARATOR,
    CALL_TAIL,
    EMPTY_PARAMETERS,
    MARKERS,
    ParsedCall,
    ToolSpec,
    add_tool_calls,
    call_text,
    tool_call_grammar,
)

__all__ = [
    "FORMATS",
    "HARMONY",
    "HERMES",
    "HERMES_LINES",
    "LLAMA3_JSON",
    "MISTRAL",
    "QWEN3_CODER",
    "Delta",
    "HarmonyFormat",
    "HarmonyReader",
    "HermesFormat",
    "HermesLinesFormat",
    "JsonCallFormat",
    "JsonCallReader",
    "JsonLayout",
    "Llama3JsonFormat",
    "MistralFormat",
    "Qwen3CoderFormat",
    "Qwen3CoderReader",
    "ToolCallReader",
    "ToolFormat",
    "detect_format",
]

Delta = dict[str, Any]
"""One streamed chunk of an assistant message (``content`` or ``tool_calls``), as the pipeline sends them."""

MAX_IN_A_ROW = 32
"""Most parameter rules written one after another in one rule (the grammar budget caps symbols in a row)."""


# -- shared helpers -----------------------------------------------------------------------------------------


def _parameters(tool: ToolSpec) -> dict[str, Any] | bool:
    """A tool's parameters schema; none given means no parameters (as in :mod:`.tools`)."""
    return EMPTY_PARAMETERS if tool.parameters in (None, {}) else tool.parameters


def _check_only(tools: Sequence[ToolSpec], only: str | None) -> None:
    """Calls need a tool, and ``only`` (a named ``tool_choice``) must name one of them."""
    if not tools:
        raise GrammarError("No tools are given to call.", param="tools")
    if only is not None and all(tool.name != only for tool in tools):
        raise GrammarError(f"tool_choice names the function {only!r}, which is not among the tools.",
                           param="tool_choice")


def _check_choice(tools: Sequence[ToolSpec], choice: str) -> None:
    _check_only(tools, None if choice in ("auto", "required") else choice)


def _compact_arguments(arguments: str) -> str:
    """An earlier call's arguments as compact JSON (how the grammars write them); empty text is ``{}``."""
    if not arguments.strip():
        return "{}"
    try:
        return compact(json.loads(arguments))
    except json.JSONDecodeError:  # not JSON: kept as it was sent, the model sees what the client gave
        return arguments


def _escape_json_text(text: str) -> str:
    """``text`` escaped as the inside of a JSON string (pieces escaped one by one concatenate correctly)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _held_back(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper beginning of one of ``markers``: text that
    may still turn out to be a marker, so it is not passed on yet."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text) - start), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


JSON_STRING_TEXT = r'"(?:[^"\\]|\\.)*"'
"""Regex for one JSON string as written (a function name in a JSON head)."""
_SCALAR_CHARS = frozenset("-+.0123456789eEtruefalsn")
"""Characters of a bare JSON number or literal (``true``, ``false``, ``null``)."""


class _JsonEnd:
    """Finds where the JSON value that starts at ``start`` ends, reading its text as it grows: each character
    is looked at once, however the text arrives (long arguments streamed in small pieces stay linear)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.at = start
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.end: int | None = None

    def scan(self, text: str) -> int | None:
        """The end (exclusive) once known, else ``None``."""
        if self.end is not None:
            return self.end
        for i in range(self.at, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:  # the value was a string
                        self.end = i + 1
                        return self.end
            elif self.depth == 0 and i > self.start:  # a bare number or literal: it ends where its characters do
                if ch not in _SCALAR_CHARS:
                    self.end = i
                    return self.end
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
                    return self.end
        self.at = len(text)
        return None


# -- the stream reader --------------------------------------------------------------------------------------


class ToolCallReader(ABC):
    """Reads generated text that a format's grammar holds to its syntax; emits OpenAI deltas as it arrives.

    :param opening: the format's opening (an output starting with it is calls)
    :param may_answer: the output may be plain text instead (``tool_choice="auto"``): text that does not open
        with ``opening`` passes through as ``content``
    :param after: free text up to this marker comes first (a reasoning section), passed through as content

    ``calls`` holds the finished calls and ``ids`` the id of every call opened, in order. :attr:`complete`
    tells whether everything fed formed a whole answer or whole calls.
    """

    def __init__(self, opening: str, *, may_answer: bool, after: str | None = None) -> None:
        self.opening = opening
        self.may_answer = may_answer
        self.after = after
        self.text = ""
        self.position = 0  # how much of ``text`` has been turned into deltas (or consumed as syntax)
        # preamble: before ``after``; None: not known yet whether calls or text; "text"; "calls"
        self.mode: str | None = "preamble" if after else None if may_answer else "calls"
        self.calls: list[ParsedCall] = []
        self.ids: list[str] = []
        self._name: str | None = None  # the call being read
        self._pieces: list[str] = []  # its argument pieces so far

    def feed(self, text: str) -> list[Delta]:
        self.text += text
        deltas: list[Delta] = []
        if self.mode == "preamble":
            assert self.after is not None
            end = self.text.find(self.after, self.position)
            if end < 0:  # what may be the start of the marker stays back
                return self._content(max(len(self.text) - len(self.after) + 1, self.position))
            deltas = self._content(end + len(self.after))
            self.mode = None if self.may_answer else "calls"
        if self.mode is None:
            self.mode = self._decide(self.text[self.position:])
            if self.mode is None:  # still a beginning of the opening: either may follow
                return deltas
        if self.mode == "text":
            return deltas + self._content(len(self.text))
        return deltas + self._advance()

    def finish(self) -> list[Delta]:
        """The end of the output: a bare beginning of the opening (or no marker) was text after all."""
        if self.mode in (None, "preamble"):
            self.mode = "text"
            return self._content(len(self.text))
        return []

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole plain answer or whole calls with nothing left over."""
        if self.mode == "text":
            return True
        return (self.mode == "calls" and self._name is None and self.position == len(self.text)
                and self._may_end())

    def _decide(self, rest: str) -> str | None:
        """``"calls"`` or ``"text"`` for an output that starts with ``rest``, or ``None`` while either may follow
        (a format may consume a header of a plain answer here by moving ``position``)."""
        if rest.startswith(self.opening):
            return "calls"
        return None if self.opening.startswith(rest) else "text"

    @abstractmethod
    def _advance(self) -> list[Delta]:
        """Read calls from ``position`` on as far as the text allows."""

    @abstractmethod
    def _may_end(self) -> bool:
        """Whether the calls may end where reading stands."""

    def _content(self, end: int) -> list[Delta]:
        chunk, self.position = self.text[self.position:end], max(end, self.position)
        return [{"content": chunk}] if chunk else []

    def _open_call(self, name: str) -> Delta:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.ids.append(call_id)
        self._name, self._pieces = name, []
        return {"tool_calls": [{"index": len(self.calls), "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _arguments(self, piece: str) -> Delta:
        self._pieces.append(piece)
        return {"tool_calls": [{"index": len(self.calls), "function": {"arguments": piece}}]}

    def _close_call(self) -> None:
        assert self._name is not None
        self.calls.append(ParsedCall(self._name, "".join(self._pieces)))
        self._name, self._pieces = None, []


# -- the interface ------------------------------------------------------------------------------------------


class ToolFormat(ABC):
    """One tool-call syntax: its grammar, how earlier calls are written, its stream reader, its detection."""

    name: str
    opening: str
    """Text every output of calls starts with: the auto alternative must not start with it, and a reader that
    sees it knows the output is calls."""
    special_texts: tuple[str, ...] = ()
    """Marker texts that are control tokens in the model's vocabulary: the grammar writes them as such
    (:meth:`~.core.GrammarBuilder.special_token`), and the engine renders them as their text."""
    parallel_calls: bool = True
    """Whether one message may hold several calls."""
    answer_opening: str = ""
    """What a plain answer starts with under ``auto`` (harmony's final-channel header); readers leave it out of
    ``content``."""

    @abstractmethod
    def add_calls(self, builder: GrammarBuilder, tools: Sequence[ToolSpec], *, only: str | None = None,
                  parallel: bool = True) -> str:
        """Add rules for calls of ``tools`` (or of the one named ``only``); return the expansion for the calls.

        Call rules are named after ``tool_call_<index in tools>``; ``parallel``: several calls may follow."""

    def grammar(self, tools: Sequence[ToolSpec], choice: str, *, parallel: bool = True,
                alternative: str | None = None, builder: GrammarBuilder | None = None) -> tuple[GrammarBuilder, str]:
        """Rules and start expansion for ``tool_choice`` = ``required`` / ``auto`` / a function name.

        ``auto`` lets the model answer with calls or with ``alternative`` (an expansion; default: text that does
        not start with :attr:`opening`, so free text can never pass for a malformed call). A named function is
        called once."""
        _check_choice(tools, choice)
        builder = builder or GrammarBuilder()
        if choice == "required":
            return builder, self.add_calls(builder, tools, parallel=parallel)
        if choice == "auto":
            calls = self.add_calls(builder, tools, parallel=parallel)
            if alternative is None:
                alternative = "[" + builder.terminal("text", not_starting_with(self.opening)) + "]"
            return builder, f"{calls} | {alternative}"
        return builder, self.add_calls(builder, tools, only=choice, parallel=False)

    def build(self, tools: Sequence[ToolSpec], choice: str, *, parallel: bool = True) -> Grammar:
        """The grammar for ``tool_choice`` = ``choice`` on its own."""
        builder, start = self.grammar(tools, choice, parallel=parallel)
        return builder.build(start, f"{self.name} tool calls", param="tools")

    @abstractmethod
    def render_calls(self, calls: Sequence[tuple[str, str]]) -> str:
        """Earlier calls ``(name, arguments as JSON text)`` as the model would have written them (for history
        when the chat template does not render tool calls itself)."""

    @abstractmethod
    def reader(self, tools: Sequence[ToolSpec], *, may_answer: bool, after: str | None = None) -> ToolCallReader:
        """A stream reader for output generated under this format's grammar."""

    def read(self, text: str, tools: Sequence[ToolSpec]) -> list[ParsedCall]:
        """The calls in a finished output; none for a plain answer. Raises :class:`ValueError` when the output
        opens a call but is not whole calls (it was not generated under this format's grammar)."""
        reader = self.reader(tools, may_answer=True)
        reader.feed(text)
        reader.finish()
        if reader.mode == "text":
            return []
        if not reader.complete:
            raise ValueError(f"The output is not complete {self.name} tool calls: {text[:200]!r}")
        return reader.calls

    @abstractmethod
    def detect(self, template_source: str) -> bool:
        """Whether a chat template's Jinja source writes tool calls in this format."""


# -- JSON formats (hermes, llama3_json, mistral) ------------------------------------------------------------


@dataclass(frozen=True)
class JsonLayout:
    """Where JSON calls sit in the output: ``prefix``, the calls joined by ``separator``, ``suffix``; one call is
    ``head_start``, the name as a JSON string, ``head_end``, the arguments (compact JSON), ``tail``."""

    prefix: str
    head_start: str
    head_end: str
    tail: str
    separator: str = ""
    suffix: str = ""
    single: bool = False  # one call per message, whatever ``parallel`` says
    head_pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        pattern = re.compile(re.escape(self.head_start) + f"({JSON_STRING_TEXT})" + re.escape(self.head_end))
        object.__setattr__(self, "head_pattern", pattern)

    def head(self, name: str) -> str:
        return self.head_start + compact(name) + self.head_end


class JsonCallReader(ToolCallReader):
    """Stream reader of calls laid out by a :class:`JsonLayout`: arguments stream as they are generated."""

    def __init__(self, layout: JsonLayout, opening: str, *, may_answer: bool, after: str | None = None) -> None:
        super().__init__(opening, may_answer=may_answer, after=after)
        self.layout = layout
        self._state = "prefix" if layout.prefix else "head"
        self._scanner = _JsonEnd(0)

    def _may_end(self) -> bool:
        # without a suffix the calls may stop after any whole call; with one, only once it is written
        return self._state == "done" or (self._state == "after" and not self.layout.suffix)

    def _advance(self) -> list[Delta]:
        layout, text = self.layout, self.text
        deltas: list[Delta] = []
        while True:
            if self._state == "prefix":
                if not text.startswith(layout.prefix, self.position):
                    return deltas
                self.position += len(layout.prefix)
                self._state = "head"
            if self._state == "head":
                match = layout.head_pattern.match(text, self.position)
                if match is None:
                    return deltas
                deltas.append(self._open_call(json.loads(match.group(1))))
                self.position = match.end()
                self._scanner = _JsonEnd(self.position)
                self._state = "arguments"
            if self._state == "arguments":
                end = self._scanner.scan(text)
                stop = len(text) if end is None else end
                if stop > self.position:
                    deltas.append(self._arguments(text[self.position:stop]))
                    self.position = stop
                if end is None or not text.startswith(layout.tail, end):
                    return deltas
                self._close_call()
                self.position = end + len(layout.tail)
                self._state = "done" if layout.single else "after"
            if self._state != "after":
                return deltas
            rest = text[self.position:]
            if layout.suffix and rest.startswith(layout.suffix):
                self.position += len(layout.suffix)
                self._state = "done"
                return deltas
            if layout.separator:
                if not rest.startswith(layout.separator):
                    return deltas
                self.position += len(layout.separator)
            elif not rest:  # calls back to back: the next one has not started (and may never)
                return deltas
            self._state = "head"


class JsonCallFormat(ToolFormat):
    """A format whose calls are compact JSON objects laid out by :attr:`layout`."""

    layout: JsonLayout

    def add_calls(self, builder: GrammarBuilder, tools: Sequence[ToolSpec], *, only: str | None = None,
                  parallel: bool = True) -> str:
        _check_only(tools, only)
        layout = self.layout
        rules = []
        for i, tool in enumerate(tools):
            if only not in (None, tool.name):
                continue
            arguments = JsonSchemaCompiler(builder, param=f"tools[{i}].function.parameters").compile(_parameters(tool))
            head = builder.spelled(layout.head(tool.name), self.special_texts)
            rules.append(builder.rule(f"tool_call_{i}",
                                      f"{head} {arguments} {builder.spelled(layout.tail, self.special_texts)}"))
        one = builder.rule("one_tool_call", " | ".join(rules))
        many = parallel and not layout.single
        if not many:
            calls = one
        elif layout.separator:
            calls = f"{one} ({literal(layout.separator)} {one})*"
        else:
            calls = f"{one}+"
        parts = [builder.spelled(layout.prefix, self.special_texts)] if layout.prefix else []
        parts.append(calls)
        if layout.suffix:
            parts.append(literal(layout.suffix))
        return builder.rule("tool_calls", " ".join(parts))

    def render_calls(self, calls: Sequence[tuple[str, str]]) -> str:
        layout = self.layout
        if layout.single and len(calls) > 1:
            raise ValueError(f"The {self.name} format holds one call per message, not {len(calls)}.")
        if not calls:
            return ""
        written = [layout.head(name) + _compact_arguments(arguments) + layout.tail for name, arguments in calls]
        return layout.prefix + layout.separator.join(written) + layout.suffix

    def reader(self, tools: Sequence[ToolSpec], *, may_answer: bool, after: str | None = None) -> JsonCallReader:
        del tools  # the JSON arguments are passed on as written: no schema needed
        return JsonCallReader(self.layout, self.opening, may_answer=may_answer, after=after)


class HermesFormat(JsonCallFormat):
    """``<tool_call>{"name":…,"arguments":…}</tool_call>``: the kernel's own syntax, from :mod:`.tools`."""

    name = "hermes"
    opening = CALL_OPEN
    special_texts = MARKERS
    # call_head writes the name with json.dumps (ASCII escapes); the reader decodes any JSON string alike
    layout = JsonLayout(prefix="", head_start=CALL_OPEN + '{"name":', head_end=',"arguments":', tail=CALL_TAIL,
                        separator=CALL_SEPARATOR)

    def add_calls(self, builder: GrammarBuilder, tools: Sequence[ToolSpec], *, only: str | None = None,
                  parallel: bool = True) -> str:
        _check_only(tools, only)
        return add_tool_calls(builder, list(tools), only=only, parallel=parallel)

    def grammar(self, tools: Sequence[ToolSpec], choice: str, *, parallel: bool = True,
                alternative: str | None = None, builder: GrammarBuilder | None = None) -> tuple[GrammarBuilder, str]:
        _check_choice(tools, choice)
        return tool_call_grammar(list(tools), choice, parallel=parallel, alternative=alternative, builder=builder)

    def render_calls(self, calls: Sequence[tuple[str, str]]) -> str:
        return CALL_SEPARATOR.join(call_text(name, _compact_arguments(arguments)) for name, arguments in calls)

    def detect(self, template_source: str) -> bool:
        return CALL_OPEN in template_source


class HermesLinesFormat(JsonCallFormat):
    """``<tool_call>\\n{"name":…,"arguments":…}\\n</tool_call>``: Hermes as templates write it, a call per line."""

    name = "hermes_lines"
    opening = CALL_OPEN
    special_texts = MARKERS
    layout = JsonLayout(prefix="", head_start=CALL_OPEN + '\n{"name":', head_end=',"arguments":',
                        tail="}\n" + CALL_CLOSE, separator="\n")

    def detect(self, template_source: str) -> bool:
        # the newline as the template's Jinja string writes it (an escape) or as a line break
        return CALL_OPEN + "\\n{" in template_source or CALL_OPEN + "\n{" in template_source


LLAMA3_INSTRUCTION = re.compile(r'\{"name": [^{}\n]{0,200}"parameters":')
"""The call shape Llama 3.x templates state or write: ``{"name": function name, "parameters": …`` or
``{"name": "' + tool_call.name + '", "parameters": …``."""


class Llama3JsonFormat(JsonCallFormat):
    """``{"name":…,"parameters":…}`` as the whole message: exactly one call."""

    name = "llama3_json"
    opening = '{"name":'
    parallel_calls = False
    layout = JsonLayout(prefix="", head_start='{"name":', head_end=',"parameters":', tail="}", single=True)

    def detect(self, template_source: str) -> bool:
        if '"parameters"' not in template_source:
            return False
        return ("<|python_tag|>" in template_source or "Environment: ipython" in template_source
                or LLAMA3_INSTRUCTION.search(template_source) is not None)


MISTRAL_CALLS = "[TOOL_CALLS]"


class MistralFormat(JsonCallFormat):
    """``[TOOL_CALLS][{"name":…,"arguments":…},…]``: one array of every call after a control token."""

    name = "mistral"
    opening = MISTRAL_CALLS
    special_texts = (MISTRAL_CALLS,)
    layout = JsonLayout(prefix=MISTRAL_CALLS + "[", head_start='{"name":', head_end=',"arguments":', tail="}",
                        separator=",", suffix="]")

    def detect(self, template_source: str) -> bool:
        # [ARGS] marks the later NAME[ARGS]{…} syntax, which this format does not write
        return MISTRAL_CALLS in template_source and "[ARGS]" not in template_source


# -- qwen3_coder --------------------------------------------------------------------------------------------

QWEN_OPEN = "<tool_call>"
QWEN_FUNCTION = "<tool_call>\n<function="
QWEN_TAIL = "</function>\n</tool_call>"
QWEN_CALL_SEPARATOR = "\n"
PARAMETER_OPEN = "<parameter="
PARAMETER_NAME_END = ">\n"
VALUE_CLOSE = "</parameter>"
"""Ends a value: a raw string value never holds it."""
PARAMETER_CLOSE = "\n" + VALUE_CLOSE + "\n"
"""What follows every value (the line break before the closing tag is the format's, not the value's)."""
TAG_NAME_FORBIDDEN = re.compile(r"[<>\n]")

OBJECT_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties"})
"""What the ``parameters`` object itself may say in this format (besides annotations)."""
RAW_STRING_KEYWORDS = frozenset({"type", "enum", "const", "format", "pattern", "minLength", "maxLength",
                                 "nullable"})
"""Keywords a raw string parameter may carry; some of them only beside ``enum``/``const`` (they filter it)."""
COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[" else escape_regex(ch)


def _avoiding(word: str, *, nonempty: bool = False) -> str:
    """Regex for any text (newlines included; empty unless ``nonempty``) in which ``word`` does not occur.

    ``word``'s first character occurs nowhere else in it (true of ``</parameter>``), so the text splits at
    each occurrence of that character: before the first one anything else goes, and what follows each one up to
    the next must not begin with the rest of ``word``. No look-ahead: the regex works in both dialects.
    """
    first, rest = word[0], word[1:]
    if not rest or first in rest:
        raise ValueError("the word must be longer than one character and not repeat its first character")
    plain = f"[^{_class_char(first)}]"  # any character but the first one of the word
    after = ""  # text after the first character that does not begin with rest[i:] (built from the end)
    for i in range(len(rest) - 1, -1, -1):
        other = f"[^{_class_char(rest[i])}{_class_char(first)}]{plain}*"
        after = f"(?:{other}|{escape_regex(rest[i])}{after})?" if after else f"(?:{other})?"
    step = escape_regex(first) + after  # one occurrence of the first character and what follows it
    if nonempty:
        return f"(?:{plain}+(?:{step})*|(?:{step})+)"
    return f"{plain}*(?:{step})*"


RAW_TEXT = _avoiding(VALUE_CLOSE)
"""Regex for the text of a raw string value."""
RAW_NONEMPTY_TEXT = _avoiding(VALUE_CLOSE, nonempty=True)


@dataclass(frozen=True)
class _Slots:
    """What a ``parameters`` object lets a call write: named properties in order, and other names' schema."""

    named: tuple[tuple[str, Any, bool], ...]  # (name, schema, required)
    free: bool  # any names may be written (no properties nor required listed)
    extra: Any  # the schema of values under other names (``free``); None: no other names


def _slots(schema: dict[str, Any] | bool, param: str) -> _Slots:
    if schema is True:
        return _Slots((), True, True)
    if not isinstance(schema, dict):  # ``false``: the JSON compiler has refused it already
        raise GrammarError("The parameters schema accepts no value.", param=param)
    for keyword in schema:
        if keyword in COMBINATORS or (keyword not in OBJECT_KEYWORDS and keyword not in ANNOTATIONS
                                      and not keyword.startswith("x-")):
            raise GrammarError(f"The qwen3_coder tool-call format writes parameters as named tags: the parameters "
                               f"schema must be an object schema with 'properties', not one using {keyword!r}.",
                               param=param)
    if schema.get("type", "object") not in ("object", ["object"]):
        raise GrammarError("The qwen3_coder tool-call format needs an object parameters schema.", param=param)
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    additional = schema.get("additionalProperties")
    named = [(name, sub, name in required) for name, sub in properties.items() if sub is not False]
    # required names missing from properties take the additionalProperties schema, as in .json_schema
    named += [(name, True if additional is None else additional, True)
              for name in dict.fromkeys(required) if name not in properties]
    free = not properties and not required
    extra = (True if additional is None else additional) if free and additional is not False else None
    return _Slots(tuple(named), free, extra)


def _is_raw_string(schema: Any) -> bool:
    """Whether values of ``schema`` are written raw (unquoted) rather than as JSON."""
    if not isinstance(schema, dict) or any(keyword in schema for keyword in COMBINATORS):
        return False
    if schema.get("nullable") is True:  # null is a second type: JSON tells the two apart
        return False
    declared = schema.get("type")
    if declared in ("string", ["string"]) and "enum" not in schema and "const" not in schema:
        # what raw text cannot hold exactly (it must also exclude the closing tag) is written as a JSON string
        unenforceable = "pattern" in schema or "maxLength" in schema or schema.get("minLength", 0) > 1
        unknown = any(keyword not in RAW_STRING_KEYWORDS and keyword not in ANNOTATIONS
                      and not keyword.startswith("x-") for keyword in schema)
        return not unenforceable and not unknown
    if declared in ("string", ["string"]):
        return True
    if declared is None and ("const" in schema or "enum" in schema):
        members = [schema["const"]] if "const" in schema else schema["enum"]
        return isinstance(members, list) and bool(members) and all(isinstance(m, str) for m in members)
    return False


def _string_allowed(value: str, schema: dict[str, Any]) -> bool:
    """Whether an enum member satisfies the string keywords beside the enum."""
    if len(value) < schema.get("minLength", 0):
        return False
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return False
    if "format" in schema and re.fullmatch(STRING_FORMATS[schema["format"]], value) is None:
        return False
    return "pattern" not in schema or re.search(schema["pattern"], value) is not None


class Qwen3CoderFormat(ToolFormat):
    """Qwen3-Coder's XML calls: ``<function=NAME>`` holding ``<parameter=ARG>`` blocks, strings raw."""

    name = "qwen3_coder"
    opening = QWEN_OPEN
    special_texts = MARKERS

    def add_calls(self, builder: GrammarBuilder, tools: Sequence[ToolSpec], *, only: str | None = None,
                  parallel: bool = True) -> str:
        _check_only(tools, only)
        rules = []
        for i, tool in enumerate(tools):
            if only not in (None, tool.name):
                continue
            if TAG_NAME_FORBIDDEN.search(tool.name):
                raise GrammarError(f"The function name {tool.name!r} cannot be written in a qwen3_coder tag.",
                                   param=f"tools[{i}].function.name")
            param = f"tools[{i}].function.parameters"
            schema = _parameters(tool)
            # the whole schema through the JSON compiler first: its errors name the exact place in the schema
            JsonSchemaCompiler(GrammarBuilder(), param=param).compile(schema)
            body = self._parameters(builder, schema, param)
            head = builder.spelled(f"{QWEN_FUNCTION}{tool.name}>\n", self.special_texts)
            tail = builder.spelled(QWEN_TAIL, self.special_texts)
            rules.append(builder.rule(f"tool_call_{i}", f"{head} {body} {tail}" if body else f"{head} {tail}"))
        one = builder.rule("one_tool_call", " | ".join(rules))
        if not parallel:
            return one
        return builder.rule("tool_calls", f"{one} ({literal(QWEN_CALL_SEPARATOR)} {one})*")

    def _parameters(self, builder: GrammarBuilder, schema: dict[str, Any] | bool, param: str) -> str:
        """The expansion for a call's parameter blocks ("" when it has none)."""
        slots = _slots(schema, param)
        compiler = JsonSchemaCompiler(builder, param=param)
        root = schema if isinstance(schema, dict) else None
        if slots.free:
            if slots.extra is None:
                return ""
            key = builder.terminal("xml_name", r"[^<>\n]+", key=("qwen3_coder", "name"))
            value = self._value(builder, compiler, slots.extra, "/additionalProperties", root, param)
            entry = builder.rule("xml_parameter",
                                 f"{literal(PARAMETER_OPEN)} {key} {literal(PARAMETER_NAME_END)} {value}")
            return f"{entry}*"
        entries = []
        for name, sub, required in slots.named:
            pointer = "/properties/" + name.replace("~", "~0").replace("/", "~1")
            if TAG_NAME_FORBIDDEN.search(name):
                raise GrammarError(f"The parameter name {name!r} at {pointer} cannot be written in a qwen3_coder "
                                   "tag.", param=param)
            value = self._value(builder, compiler, sub, pointer, root, param)
            head = PARAMETER_OPEN + name + PARAMETER_NAME_END
            entry = builder.rule("xml_parameter", f"{literal(head)} {value}")
            entries.append(entry if required else f"[{entry}]")
        # parameters are self-delimiting: a plain sequence, in chunks that keep each rule short
        while len(entries) > MAX_IN_A_ROW:
            entries = [builder.rule("xml_parameters", " ".join(entries[i:i + MAX_IN_A_ROW]))
                       for i in range(0, len(entries), MAX_IN_A_ROW)]
        return " ".join(entries)

    def _value(self, builder: GrammarBuilder, compiler: JsonSchemaCompiler, schema: Any, pointer: str,
               root: dict[str, Any] | None, param: str) -> str:
        """The expansion for one value and the closing tag after it."""
        if _is_raw_string(schema):
            return self._raw_string(builder, schema, pointer, param)
        # a $ref points into the parameters schema: compile against it only then (budgets are checked per root)
        needs_root = root is not None and "$ref" in json.dumps(schema)
        value = compiler.compile(schema, root=root if needs_root else None)
        return f"{value} {literal(PARAMETER_CLOSE)}"

    def _raw_string(self, builder: GrammarBuilder, schema: dict[str, Any], pointer: str, param: str) -> str:
        """A raw string value with its closing tag in the same terminal or literal: the engine's lexer reads
        each lexeme as far as it can, so a free-text lexeme followed by a separate closing tag could swallow
        the tag's first characters and never end."""

        def refuse(keyword: str, why: str) -> GrammarError:
            return GrammarError(f"The JSON Schema keyword '{keyword}' at {pointer} is not supported by the "
                                f"qwen3_coder tool-call format: {why}", param=param)

        for keyword in schema:
            if keyword not in RAW_STRING_KEYWORDS and keyword not in ANNOTATIONS and not keyword.startswith("x-"):
                raise refuse(keyword, "string parameters are written unquoted, where only enum, const, format and "
                                      "minLength up to 1 can be enforced.")
        if "const" in schema or "enum" in schema:
            members = [schema["const"]] if "const" in schema else list(schema["enum"])
            if "const" in schema and "enum" in schema:
                members = [m for m in members if m in schema["enum"]]
            kept = [m for m in dict.fromkeys(m for m in members if isinstance(m, str))
                    if VALUE_CLOSE not in m and _string_allowed(m, schema)]
            if not kept:
                raise GrammarError(f"Invalid or unsupported JSON schema at {pointer}: no member of 'enum'/'const' "
                                   f"can be written as a qwen3_coder string value.", param=param,
                                   code="unsatisfiable_schema")
            options = [literal(member + PARAMETER_CLOSE) for member in kept]
            if len(options) == 1:
                return options[0]
            return builder.rule("xml_enum", " | ".join(options), key=("qwen3_coder", "enum", tuple(kept)))
        for keyword in ("pattern", "maxLength"):
            if keyword in schema:
                raise refuse(keyword, "the value is written unquoted and must also exclude the closing tag, which "
                                      "this keyword cannot be combined with; use an enum, or a non-string schema.")
        low = schema.get("minLength", 0)
        if low > 1:
            raise refuse("minLength", "only a minimum of 0 or 1 can be enforced on an unquoted value.")
        close = escape_regex(PARAMETER_CLOSE)
        if "format" in schema:  # the supported formats never hold '<': the closing tag cannot occur inside
            content = STRING_FORMATS[schema["format"]]
            return builder.terminal("xml_" + schema["format"], f"(?:{content}){close}",
                                    key=("qwen3_coder", "format", content))
        content = RAW_NONEMPTY_TEXT if low == 1 else RAW_TEXT
        return builder.terminal("xml_text", content + close, key=("qwen3_coder", "text", low))

    def render_calls(self, calls: Sequence[tuple[str, str]]) -> str:
        blocks = []
        for name, arguments in calls:
            values = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(values, dict):
                raise ValueError(f"The arguments of a qwen3_coder call must be a JSON object, not {arguments!r}.")
            parts = [f"{QWEN_FUNCTION}{name}>\n"]
            for key, value in values.items():
                text = value if isinstance(value, str) else compact(value)
                parts.append(f"{PARAMETER_OPEN}{key}>\n{text}{PARAMETER_CLOSE}")
            parts.append(QWEN_TAIL)
            blocks.append("".join(parts))
        return QWEN_CALL_SEPARATOR.join(blocks)

    def reader(self, tools: Sequence[ToolSpec], *, may_answer: bool, after: str | None = None) -> Qwen3CoderReader:
        return Qwen3CoderReader(tools, may_answer=may_answer, after=after)

    def detect(self, template_source: str) -> bool:
        return "<function=" in template_source and "<parameter=" in template_source


class Qwen3CoderReader(ToolCallReader):
    """Stream reader of qwen3_coder calls: builds each call's arguments as a compact JSON object while the
    parameters arrive (raw strings JSON-escaped, other values passed on as written), so it needs the tools'
    schemas to tell raw strings from JSON. A parameter it has no schema for (an unknown function or name) is
    read as a raw string: its text becomes a JSON string, which is always valid JSON."""

    CALL_HEAD = re.compile(re.escape(QWEN_FUNCTION) + r"([^<>\n]*)>\n")
    PARAMETER_HEAD = re.compile(re.escape(PARAMETER_OPEN) + r"([^<>\n]*)>\n")

    def __init__(self, tools: Sequence[ToolSpec], *, may_answer: bool, after: str | None = None) -> None:
        super().__init__(QWEN_OPEN, may_answer=may_answer, after=after)
        self._raw: dict[str, tuple[dict[str, bool], bool]] = {}  # function -> (raw per name, raw for other names)
        for tool in tools:
            schema = _parameters(tool)
            try:
                slots = _slots(schema, "tools")
            except GrammarError:  # a schema the grammar refuses: nothing is generated under it
                continue
            self._raw[tool.name] = ({name: _is_raw_string(sub) for name, sub, _ in slots.named},
                                    _is_raw_string(slots.extra))
        self._state = "call"
        self._written = 0  # parameters written in the current call
        self._value_raw = True

    def _may_end(self) -> bool:
        return self._state == "after"

    def _is_raw(self, name: str) -> bool:
        assert self._name is not None
        named, other = self._raw.get(self._name, ({}, True))
        return named.get(name, other)

    def _advance(self) -> list[Delta]:
        text = self.text
        deltas: list[Delta] = []
        while True:
            if self._state == "call":
                match = self.CALL_HEAD.match(text, self.position)
                if match is None:
                    return deltas
                deltas.append(self._open_call(match.group(1)))
                self.position, self._written, self._state = match.end(), 0, "parameters"
            if self._state == "parameters":
                if text.startswith(QWEN_TAIL, self.position):
                    deltas.append(self._arguments("}" if self._written else "{}"))
                    self._close_call()
                    self.position += len(QWEN_TAIL)
                    self._state = "after"
                else:
                    match = self.PARAMETER_HEAD.match(text, self.position)
                    if match is None:
                        return deltas
                    name = match.group(1)
                    self._value_raw = self._is_raw(name)
                    opening = ("," if self._written else "{") + compact(name) + ":" + ('"' if self._value_raw else "")
                    deltas.append(self._arguments(opening))
                    self._written += 1
                    self.position, self._state = match.end(), "value"
            if self._state == "value":
                piece, done = self._raw_value() if self._value_raw else self._json_value()
                if piece:
                    deltas.append(self._arguments(piece))
                if not done:
                    return deltas
                self._state = "value_end"
            if self._state == "value_end":  # the line break after the closing tag
                if self.position == len(text) or text[self.position] != "\n":
                    return deltas
                self.position += 1
                self._state = "parameters"
                continue
            if self._state == "after":  # between calls: a line break, then the next call
                if self.position == len(text) or text[self.position] != QWEN_CALL_SEPARATOR:
                    return deltas
                self.position += 1
                self._state = "call"

    def _raw_value(self) -> tuple[str, bool]:
        """The next piece of a raw string value (escaped), and whether the value is done (its closing tag read).
        Text that may begin the closing tag stays back until it is known."""
        text = self.text
        end = text.find(VALUE_CLOSE, self.position)
        if end < 0:
            safe = len(text) - _held_back(text, self.position, (PARAMETER_CLOSE, VALUE_CLOSE))
            piece, self.position = text[self.position:safe], max(safe, self.position)
            return _escape_json_text(piece), False
        # the line break before the tag is the format's: it stayed back above, so it is still unread here
        stop = end - 1 if end > self.position and text[end - 1] == "\n" else end
        piece = text[self.position:stop]
        self.position = end + len(VALUE_CLOSE)
        return _escape_json_text(piece) + '"', True

    def _json_value(self) -> tuple[str, bool]:
        """The next piece of a JSON value (as written), and whether it is done. Compact JSON holds no line
        break, so the value ends at the first one, which starts its closing tag."""
        text = self.text
        end = text.find("\n", self.position)
        stop = len(text) if end < 0 else end
        piece, self.position = text[self.position:stop], max(stop, self.position)
        if end < 0 or not text.startswith(PARAMETER_CLOSE[:-1], end):
            return piece, False
        self.position = end + len(PARAMETER_CLOSE) - 1
        return piece, True


# -- the registry -------------------------------------------------------------------------------------------

HERMES = HermesFormat()
HERMES_LINES = HermesLinesFormat()
LLAMA3_JSON = Llama3JsonFormat()
MISTRAL = MistralFormat()
QWEN3_CODER = Qwen3CoderFormat()


# -- harmony ------------------------------------------------------------------------------------------------

HARMONY_CHANNEL = "<|channel|>"
HARMONY_MESSAGE = "<|message|>"
HARMONY_CONSTRAIN = "<|constrain|>"
HARMONY_CALL = "commentary to=functions."
HARMONY_FINAL = HARMONY_CHANNEL + "final" + HARMONY_MESSAGE
HARMONY_ARGUMENTS = " " + HARMONY_CONSTRAIN + "json" + HARMONY_MESSAGE


class HarmonyFormat(ToolFormat):
    """gpt-oss's harmony messages: a call is ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>``
    then its JSON arguments, after which the model ends its message with ``<|call|>`` (an end-of-generation
    token); a plain answer is ``<|channel|>final<|message|>`` then the text. One call per message. The markers
    are written as the vocabulary's control tokens where they are ones (llama.cpp shows ``<|channel|>``,
    ``<|message|>`` and ``<|constrain|>`` as text anyway). The reader drops the final channel's header from
    ``content``."""

    name = "harmony"
    opening = HARMONY_CHANNEL + HARMONY_CALL
    special_texts = (HARMONY_CHANNEL, HARMONY_MESSAGE, HARMONY_CONSTRAIN)
    parallel_calls = False
    answer_opening = HARMONY_FINAL

    def add_calls(self, builder: GrammarBuilder, tools: Sequence[ToolSpec], *, only: str | None = None,
                  parallel: bool = True) -> str:
        _check_only(tools, only)
        channel, message = builder.special_token(HARMONY_CHANNEL), builder.special_token(HARMONY_MESSAGE)
        constrain = builder.special_token(HARMONY_CONSTRAIN)
        rules = []
        for i, tool in enumerate(tools):
            if only not in (None, tool.name):
                continue
            if " " in tool.name or "<" in tool.name:
                raise GrammarError(f"The function name {tool.name!r} cannot be written in a harmony header.",
                                   param=f"tools[{i}].function.name")
            arguments = JsonSchemaCompiler(builder, param=f"tools[{i}].function.parameters").compile(_parameters(tool))
            head = literal(f"{HARMONY_CALL}{tool.name} ")
            rules.append(builder.rule(f"tool_call_{i}",
                                      f'{channel} {head} {constrain} {literal("json")} {message} {arguments}'))
        return builder.rule("one_tool_call", " | ".join(rules))

    def grammar(self, tools: Sequence[ToolSpec], choice: str, *, parallel: bool = True,
                alternative: str | None = None, builder: GrammarBuilder | None = None) -> tuple[GrammarBuilder, str]:
        if choice != "auto":
            return super().grammar(tools, choice, parallel=False, alternative=alternative, builder=builder)
        _check_choice(tools, choice)
        builder = builder or GrammarBuilder()
        calls = self.add_calls(builder, tools)
        final = f'{builder.special_token(HARMONY_CHANNEL)} {literal("final")} {builder.special_token(HARMONY_MESSAGE)}'
        answer = f"({alternative})" if alternative is not None else \
            "[" + builder.terminal("text", r"(.|\n)+", key=("harmony", "text")) + "]"
        return builder, f"{calls} | {final} {answer}"

    def render_calls(self, calls: Sequence[tuple[str, str]]) -> str:
        if len(calls) > 1:
            raise ValueError(f"The harmony format holds one call per message, not {len(calls)}.")
        return "".join(f"{HARMONY_CHANNEL}{HARMONY_CALL}{name}{HARMONY_ARGUMENTS}{_compact_arguments(arguments)}"
                       for name, arguments in calls)

    def reader(self, tools: Sequence[ToolSpec], *, may_answer: bool, after: str | None = None) -> HarmonyReader:
        return HarmonyReader(self.opening, may_answer=may_answer, after=after)

    def detect(self, template_source: str) -> bool:
        return HARMONY_CHANNEL in template_source and "functions." in template_source


class HarmonyReader(ToolCallReader):
    """Stream reader of :class:`HarmonyFormat`: a final-channel answer without its header, or one call."""

    def __init__(self, opening: str, *, may_answer: bool, after: str | None = None) -> None:
        super().__init__(opening, may_answer=may_answer, after=after)
        self._state = "head"
        self._scanner = _JsonEnd(0)

    def _decide(self, rest: str) -> str | None:
        if rest.startswith(HARMONY_FINAL):
            self.position += len(HARMONY_FINAL)
            return "text"
        if HARMONY_FINAL.startswith(rest):
            return None
        return super()._decide(rest)

    def _may_end(self) -> bool:
        return self._state == "done"

    def _advance(self) -> list[Delta]:
        deltas: list[Delta] = []
        if self._state == "head":
            start = self.position + len(self.opening)
            end = self.text.find(HARMONY_ARGUMENTS, start)
            if end < 0:
                return deltas
            deltas.append(self._open_call(self.text[start:end]))
            self.position = end + len(HARMONY_ARGUMENTS)
            self._scanner = _JsonEnd(self.position)
            self._state = "arguments"
        if self._state == "arguments":
            end = self._scanner.scan(self.text)
            stop = len(self.text) if end is None else end
            if stop > self.position:
                deltas.append(self._arguments(self.text[self.position:stop]))
                self.position = stop
            if end is not None:
                self._close_call()
                self._state = "done"
        return deltas


HARMONY = HarmonyFormat()

FORMATS: dict[str, ToolFormat] = {fmt.name: fmt for fmt in (HERMES, HERMES_LINES, LLAMA3_JSON, MISTRAL,
                                                              QWEN3_CODER, HARMONY)}
"""Every format by name."""

DETECTION_ORDER: tuple[ToolFormat, ...] = (HARMONY, MISTRAL, QWEN3_CODER, HERMES_LINES, HERMES, LLAMA3_JSON)
"""Most specific first: Qwen3-Coder templates also hold ``<tool_call>``; a template that shows an explicit
``<tool_call>`` syntax is taken at its word before the looser signs of Llama's JSON calls."""


def detect_format(template_source: str | None) -> ToolFormat | None:
    """The format a chat template writes tool calls in, or ``None`` when it shows no known one (the server then
    uses ``hermes`` as the generic format)."""
    if not template_source:
        return None
    return next((fmt for fmt in DETECTION_ORDER if fmt.detect(template_source)), None)
