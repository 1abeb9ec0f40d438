"""Function calling around the engine: the prompt that presents tools, history rendering, and the stream parser
that turns enforced call text into OpenAI ``tool_calls`` deltas.

With a chat template that knows tools (it reads a ``tools`` variable), the template renders them. Otherwise the
generic format below is used: a system section lists the functions (one JSON object per line) and explains
the call syntax; earlier calls re-render exactly as the grammar makes the model write them; tool results go
back in a user turn as ``<tool_response>`` blocks.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

from ..grammar.tools import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, CALL_TAIL, ParsedCall, call_text
from .plan import Delta

TOOLS_VARIABLE = re.compile(r"\btools\b")
CALL_START = re.compile(f"(?:{re.escape(CALL_SEPARATOR)})?" + re.escape(CALL_OPEN) + r'\{"name":"([^"]*)","arguments":')


def template_knows_tools(template_source: str | None) -> bool:
    return bool(template_source) and TOOLS_VARIABLE.search(template_source or "") is not None


def tool_system_prompt(tools: list[dict[str, Any]], choice: str) -> str:
    """The generic instructions: the functions, the call syntax, and what ``tool_choice`` asks for."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    lines = [
        "You can call functions. These are available, one JSON description per line:",
        listing,
        "",
        "To call functions, answer only with the calls, each exactly like:",
        f'{CALL_OPEN}{{"name":"<function name>","arguments":<arguments as a JSON object>}}{CALL_CLOSE}',
        "Results come back in <tool_response> blocks.",
    ]
    if choice == "auto":
        lines.append("If no function is needed, answer the user directly in plain text.")
    elif choice == "required":
        lines.append("You must call at least one function now.")
    else:
        lines.append(f"Call the function {choice} now.")
    return "\n".join(lines)


def compact_arguments(arguments: Any) -> str:
    """Arguments of an earlier call as compact JSON (how the grammar writes them)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def render_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite assistant ``tool_calls`` and ``tool`` results into plain turns (the generic format)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                if call.get("id") is not None:
                    names[str(call["id"])] = str(function.get("name", ""))
                calls.append(call_text(str(function.get("name", "")), compact_arguments(function.get("arguments"))))
            text = message.get("content") or ""
            content = (text + "\n" if text else "") + CALL_SEPARATOR.join(calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":  # a result names its function through its call's id, or itself (legacy results)
            call_id = message.get("tool_call_id")
            name = (names.get(str(call_id)) if call_id is not None else None) or message.get("name") or ""
            block = f'<tool_response name="{name}">\n{message.get("content") or ""}\n</tool_response>'
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(dict(message))
    for message in out:
        message.pop("_tool_results", None)
    return out


def template_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows tools: call arguments as objects, as such templates expect."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function") or {})
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        function["arguments"] = json.loads(arguments)
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


def add_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """``messages`` with ``text`` appended to the leading system (or developer) message, after a blank line when
    it has text of its own, or opened by a new system message. Content given as parts keeps its parts, with
    ``text`` added as one more text part. ``messages`` itself is not changed."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [*content, {"type": "text", "text": ("\n\n" if content else "") + text}]
        else:
            first["content"] = f"{content}\n\n{text}" if content else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


class ToolCallStream:
    """Reads generated text that the tool grammar holds to its syntax and emits OpenAI deltas as it arrives.

    ``may_answer``: the output may be plain text instead (``tool_choice="auto"``): text that does not open
    with ``<tool_call>`` is passed through as content. Arguments stream as they are generated.
    """

    def __init__(self, *, may_answer: bool, after: str | None = None) -> None:
        self.may_answer = may_answer
        self.after = after  # free text up to this marker comes first (a reasoning section), passed through
        self.text = ""
        self.position = 0  # how much of ``text`` has been turned into deltas
        self.mode: str | None = "preamble" if after else None if may_answer else "calls"
        self.calls: list[ParsedCall] = []
        self.ids: list[str] = []
        self._name: str | None = None  # call being read
        self._args_start = -1

    def feed(self, text: str) -> list[Delta]:
        self.text += text
        deltas: list[Delta] = []
        if self.mode == "preamble":
            assert self.after is not None
            end = self.text.find(self.after, self.position)
            if end < 0:  # hold back what may be the start of the marker
                safe = len(self.text) - len(self.after) + 1
                return self._content(max(safe, self.position))
            deltas = self._content(end + len(self.after))
            self.mode = None if self.may_answer else "calls"
        if self.mode is None:
            rest = self.text[self.position:]
            if rest.startswith(CALL_OPEN):
                self.mode = "calls"
            elif not CALL_OPEN.startswith(rest):
                self.mode = "text"
            else:
                return deltas
        if self.mode == "text":
            return deltas + self._content(len(self.text))
        return deltas + self._advance()

    def finish(self) -> list[Delta]:
        if self.mode in (None, "preamble"):  # a bare opening of "<tool_call>" (or no marker): it was text
            self.mode = "text"
            return self._content(len(self.text))
        return []

    def _content(self, end: int) -> list[Delta]:
        chunk, self.position = self.text[self.position:end], max(end, self.position)
        return [{"content": chunk}] if chunk else []

    def _advance(self) -> list[Delta]:
        deltas: list[Delta] = []
        while True:
            if self._name is None:
                match = CALL_START.match(self.text, self.position)
                if match is None:
                    return deltas
                self._name = match.group(1)
                self._args_start = self.position = match.end()
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                self.ids.append(call_id)
                deltas.append({"tool_calls": [{"index": len(self.calls), "id": call_id, "type": "function",
                                               "function": {"name": self._name, "arguments": ""}}]})
            end = _json_end(self.text, self._args_start)
            stop = len(self.text) if end is None else end
            if stop > self.position:
                deltas.append({"tool_calls": [{"index": len(self.calls),
                                               "function": {"arguments": self.text[self.position:stop]}}]})
                self.position = stop
            if end is None or not self.text.startswith(CALL_TAIL, end):
                return deltas
            self.calls.append(ParsedCall(self._name, self.text[self._args_start:end]))
            self._name = None
            self.position = end + len(CALL_TAIL)


def _json_end(text: str, start: int) -> int | None:
    """End of the JSON value that starts at ``start`` (compact JSON), or ``None`` while it is incomplete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


