"""Function calling around the engine: the prompt that presents tools and the history rendering.

With a chat template that knows tools (it reads a ``tools`` variable), the template renders them. Otherwise the
generic presentation below is used: a system section lists the functions (one JSON object per line) and explains
the call syntax of the model's format (:mod:`gallama_kernel.grammar.tool_formats`, ``hermes`` unless the
model's ``tool_format`` key says otherwise); earlier calls re-render exactly as the grammar makes the model
write them; tool results go back in a user turn as ``<tool_response>`` blocks. The format's stream reader turns
the enforced output into OpenAI ``tool_calls`` deltas.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from ..grammar.tool_formats import HERMES, ToolFormat
from ..grammar.tools import CALL_CLOSE, CALL_OPEN

TOOLS_VARIABLE = re.compile(r"\btools\b")


def template_knows_tools(template_source: str | None) -> bool:
    return bool(template_source) and TOOLS_VARIABLE.search(template_source or "") is not None


def tool_system_prompt(tools: list[dict[str, Any]], choice: str, fmt: ToolFormat = HERMES) -> str:
    """The generic instructions: the functions, the call syntax of ``fmt``, and what ``tool_choice`` asks for."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    if fmt is HERMES:
        example = f'{CALL_OPEN}{{"name":"<function name>","arguments":<arguments as a JSON object>}}{CALL_CLOSE}'
    else:
        example = fmt.render_calls([("<function name>", '{"<argument>":"<value>"}')])
    lines = [
        "You can call functions. These are available, one JSON description per line:",
        listing,
        "",
        "To call functions, answer only with the calls, each exactly like:" if fmt.parallel_calls else
        "To call a function, answer only with the call, exactly like:",
        example,
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


def render_history(messages: list[dict[str, Any]], fmt: ToolFormat = HERMES) -> list[dict[str, Any]]:
    """Rewrite assistant ``tool_calls`` (as ``fmt`` writes them) and ``tool`` results into plain turns."""
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
                calls.append((str(function.get("name", "")), compact_arguments(function.get("arguments"))))
            text = message.get("content") or ""
            written = fmt.render_calls(calls) if fmt.parallel_calls else \
                "\n".join(fmt.render_calls([call]) for call in calls)  # one call per message: as it would write
            content = (text + "\n" if text else "") + written
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
