"""OpenAI Responses requests, validated, and their translation into the kernel's chat request.

Honoured through the kernel's pipeline (enforced as on ``/v1/chat/completions``): ``input`` (text, messages,
``function_call`` / ``function_call_output`` items), ``instructions``, function ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``text.format`` (``text``, ``json_object``, ``json_schema``), ``max_output_tokens``,
``temperature``, ``top_p``, ``reasoning.effort`` (the reasoning effort of a model that reasons natively, else a
thinking budget, with the thinking plugin), ``store`` and
``previous_response_id``. Accepted: ``metadata``, ``user``, ``safety_identifier``, ``prompt_cache_key``,
``service_tier``, ``truncation: disabled``, ``include`` of what gallama has, ``reasoning.summary``, reasoning items a
client sends back (earlier turns' reasoning is not part of the prompt). Refused with a 400 naming them: other
tool types, images and files, ``background``, ``truncation: auto``, ``conversation``, ``prompt``, logprobs, unknown
fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gallama_kernel.plugin import InvalidRequest

MAX_ITEMS = 10_000
MAX_TOOLS = 512
THINKING_TEMPLATE = "<thinking>{your step by step reasoning}</thinking>"
EFFORT_BUDGET = {"low": 256, "medium": 512, "high": 1024, "xhigh": 2048}
"""Thinking tokens per ``reasoning.effort`` (``none`` / ``minimal``: no thinking pass)."""
INCLUDABLE = {"reasoning.encrypted_content", "message.output_text.logprobs"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Text(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[Text | Refusal, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[Part], Field(max_length=MAX_ITEMS)]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[Text]
    id: str | None = None
    status: str | None = None


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Strict):
    """``POST /v1/responses``."""

    model: str = Field(min_length=1)
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_ITEMS)] = ""
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=128)
    reasoning: Reasoning | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=512)
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=512)
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    background: Literal[False] | None = None
    stream_options: dict[str, Any] | None = None


UNSUPPORTED_PARTS = {"input_image", "input_file", "input_audio", "computer_screenshot"}


def validate(body: Any) -> ResponsesRequest:
    """``body`` as a :class:`ResponsesRequest`, or a 400 that names the first problem."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequest(f"tools.{index}: tools of type {kind!r} are not supported by this server "
                                 "(function tools are)", param=f"tools.{index}.type", code="unsupported_tool")
    for name in ("conversation", "prompt", "top_logprobs", "max_tool_calls"):
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported by this server.", param=name,
                                 code="unsupported_parameter")
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TAGS)))
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unknown parameter: '{where}'.", param=where, code="unknown_parameter") from None
        raise InvalidRequest(f"Invalid value for '{where}': {first['msg']}", param=where) from None
    for item in request.include or []:
        if item not in INCLUDABLE:
            raise InvalidRequest(f"include: '{item}' is not available on this server", param="include")
    if request.background:
        raise InvalidRequest("background responses are not supported by this server", param="background")
    return request


_TAGS = {"str", "list", "function", "auto", "none", "required", "NamedFunction", "Text", "Refusal"}


def items(request: ResponsesRequest) -> list[Item]:
    """The input as typed items (a string is one user message)."""
    if isinstance(request.input, str):
        return [MessageItem(role="user", content=request.input)] if request.input else []
    parsed: list[Item] = []
    for index, raw in enumerate(request.input):
        kind = raw.get("type", "message")
        model = {"message": MessageItem, "function_call": FunctionCallItem,
                 "function_call_output": FunctionCallOutputItem, "reasoning": ReasoningItem}.get(kind)
        if model is None:
            raise InvalidRequest(f"input.{index}: items of type {kind!r} are not supported by this server",
                                 param=f"input.{index}.type")
        content = raw.get("content")
        for position, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") in UNSUPPORTED_PARTS:
                raise InvalidRequest(f"input.{index}.content.{position}: {part['type']} is not supported by this "
                                     "server (text is)", param=f"input.{index}.content.{position}")
        try:
            parsed.append(model.model_validate(raw))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in _TAGS)))
            raise InvalidRequest(f"Invalid value for 'input.{index}.{where}': {first['msg']}",
                                 param=f"input.{index}.{where}") from None
    return parsed


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, Text) else part.refusal if isinstance(part, Refusal) else
                   str(part.get("text", "")) for part in content)


def chat_messages(parsed: list[Item]) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls join one assistant message."""
    messages: list[dict[str, Any]] = []
    for item in parsed:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                         "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return messages


def chat_body(request: ResponsesRequest, history: list[dict[str, Any]], fields: Any,
              native: bool = False) -> dict[str, Any]:
    """The chat request body: instructions (this request's only), the stored history, then the new input.
    ``native``: the model reasons natively (``reasoning.effort`` is its ``reasoning_effort``)."""
    messages = [*([{"role": "system", "content": request.instructions}] if request.instructions else []),
                *history]
    if not messages:
        raise InvalidRequest("'input' is empty and no previous response continues: nothing to answer.",
                         param="input")
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if getattr(request, name) is not None:
            body[name] = getattr(request, name)
    if request.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": tool.name, "parameters": tool.parameters or {"type": "object", "properties": {}},
            **({"description": tool.description} if tool.description else {})}} for tool in request.tools]
    choice = request.tool_choice
    if choice is not None:
        if isinstance(choice, NamedFunction):
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = choice
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None or not fmt.name:
            raise InvalidRequest("text.format: json_schema needs 'name' and 'schema'", param="text.format")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)}}
    effort = request.reasoning.effort if request.reasoning is not None else None
    if native and effort is not None:
        body["reasoning_effort"] = "high" if effort == "xhigh" else effort
    elif effort in EFFORT_BUDGET:
        if "thinking_template" not in fields or "thinking_budget" not in fields:
            raise InvalidRequest("reasoning.effort needs the plugin package 'gallama-feature-thinking', which is not "
                                 "installed or is disabled; leave reasoning out or set effort to 'none'",
                                 param="reasoning.effort", code="plugin_required")
        body.update(thinking_template=THINKING_TEMPLATE, thinking_budget=EFFORT_BUDGET[effort],
                    return_thinking="separate")
    return body


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages a later turn continues from (reasoning left out)."""
    messages: list[dict[str, Any]] = []
    text = "".join(part.get("text", "") for item in output if item["type"] == "message"
                   for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                       "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if text or calls:
        messages.append({"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})})
    return messages


def echo(request: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as a response repeats them."""
    fmt = request.text.format if request.text is not None and request.text.format is not None else None
    return {
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "model": request.model, "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": request.reasoning.model_dump(exclude_none=True) if request.reasoning else None,
        "store": request.store, "temperature": request.temperature if request.temperature is not None else 1.0,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": (request.tool_choice.model_dump() if isinstance(request.tool_choice, NamedFunction)
                        else request.tool_choice or "auto"),
        "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
        "top_p": request.top_p if request.top_p is not None else 1.0, "truncation": "disabled",
        "metadata": request.metadata or {}, "user": request.user, "background": False,
        "service_tier": request.service_tier or "default",
    }


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
