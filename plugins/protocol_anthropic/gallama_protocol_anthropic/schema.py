"""Anthropic Messages requests, validated, and their translation into the kernel's chat request.

Every field is either honoured through the kernel's pipeline, accepted as what it means here, or refused with a
400 naming it:

* honoured (enforced as on ``/v1/chat/completions``): tools and ``tool_choice`` (``any`` / ``tool``: a valid call
  every time), ``output_config.format`` (a JSON schema the output is held to), ``stop_sequences``, ``max_tokens``,
  a last assistant message (a prefill: the answer continues its text, as the kernel's ``leading_prompt``, and the
  response holds only the continuation), ``thinking`` (``enabled`` with its budget, ``adaptive`` with a budget from
  ``output_config.effort``; ``display: omitted`` hides it: a model that reasons natively reasons within that
  budget, and without ``thinking`` it does not reason; another model fills in a thinking template, with the
  thinking plugin), and ``temperature`` / ``top_p`` / ``top_k``, which older clients still send;
* accepted: ``cache_control`` (gallama reuses the longest cached prefix by itself), ``metadata``,
  ``service_tier``, ``speed: standard``, ``inference_geo``, ``diagnostics``, ``user_profile_id``,
  ``workspace_id``; ``output_config.effort`` without thinking (there is nothing it could shorten); thinking blocks
  a client sends back (earlier turns' thinking is not part of the prompt);
* refused: images, documents and other content gallama cannot read, server tools, ``container``, ``speed:
  fast``, unknown fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gallama_kernel.plugin import InvalidRequest

MAX_BLOCKS = 10_000
MAX_TOOLS = 512
MAX_STOP_SEQUENCES = 16
THINKING_TEMPLATE = "<thinking>{your step by step reasoning}</thinking>"
"""The thinking template used for ``thinking: {"type": "enabled"}`` (the thinking plugin's fields)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: CacheControl | None = None


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(max_length=MAX_BLOCKS)]


class Tool(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1, le=32_768)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


Thinking = Annotated[ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")]
EFFORT_BUDGET = {"low": 256, "medium": 512, "high": 1024, "xhigh": 2048, "max": 4096}
"""Thinking tokens for ``output_config.effort`` when thinking is adaptive (``high`` when no effort is given)."""


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Diagnostics(Strict):
    previous_message_id: str | None = None


class Metadata(Strict):
    user_id: str | None = Field(default=None, max_length=512)


class CountTokensRequest(Strict):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens`` and sampling."""

    model: str = Field(min_length=1)
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_BLOCKS)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)] | None \
        = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    speed: Literal["standard"] | None = None
    inference_geo: str | None = Field(default=None, max_length=64)
    diagnostics: Diagnostics | None = None
    user_profile_id: str | None = Field(default=None, max_length=512)
    workspace_id: str | None = Field(default=None, max_length=512)


UNSUPPORTED_BLOCKS = {"image", "document", "search_result", "server_tool_use", "web_search_tool_result",
                      "container_upload", "mcp_tool_use", "mcp_tool_result", "code_execution_tool_result"}


def validate(model: type[CountTokensRequest], body: Any) -> Any:
    """``body`` as ``model``, or a 400 naming the first problem (a block type gallama cannot read by its type)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _refuse_unsupported(body)
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if not _is_tag(part)) or None
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"{where}: Extra inputs are not permitted", param=where) from None
        if first["type"] == "missing":
            raise InvalidRequest(f"{where}: Field required", param=where) from None
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in {"str", "list[...]"} or part.startswith(("list[", "function-")) or
                                      part in {"text", "tool_use", "tool_result", "thinking", "redacted_thinking",
                                               "enabled", "adaptive", "disabled"})


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Content blocks and tools gallama cannot serve: a 400 that names them, before validation."""
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for position, block in enumerate(content if isinstance(content, list) else []):
            kinds = [block.get("type")] if isinstance(block, dict) else []
            inner = block.get("content") if isinstance(block, dict) and kinds == ["tool_result"] else None
            kinds += [part.get("type") for part in inner if isinstance(part, dict)] if isinstance(inner, list) else []
            for kind in kinds:
                if kind in UNSUPPORTED_BLOCKS:
                    raise InvalidRequest(f"messages.{index}.content.{position}: {kind} blocks are not supported by "
                                         "this server (text, tool_use, tool_result and thinking are)",
                                         param=f"messages.{index}.content.{position}")
    if body.get("container") is not None:
        raise InvalidRequest("container: code execution containers are not supported by this server",
                             param="container")
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom"):
            raise InvalidRequest(f"tools.{index}: server tools ({kind}) are not supported by this server; declare "
                                 "client tools with name, description and input_schema", param=f"tools.{index}")


def _text(blocks: str | list[TextBlock]) -> str:
    return blocks if isinstance(blocks, str) else "\n".join(block.text for block in blocks)


def chat_body(request: CountTokensRequest, fields: Any, native: bool = False) -> dict[str, Any]:
    """The OpenAI chat request body that serves ``request``. ``fields``: the request fields plugins declared (for
    ``thinking``, which needs the thinking plugin unless the model reasons ``native``-ly)."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": _text(request.system)})
    for index, message in enumerate(request.messages):
        messages += _messages(message, index)
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    prefill = _prefill(request.messages)
    if prefill is not None:  # the answer continues the client's text, which is not returned
        if isinstance(request.thinking, ThinkingEnabled | ThinkingAdaptive):
            raise InvalidRequest("thinking: a prefill (a last assistant message) cannot be combined with thinking: "
                                 "the thinking would have to come before text the answer already holds",
                                 param="thinking")
        messages.pop()
        if not any(message["role"] != "system" for message in messages):
            raise InvalidRequest("messages: a prefill (a last assistant message) needs a user message before it",
                                 param="messages")
        body["leading_prompt"] = prefill
    if request.tools:
        body["tools"] = [{"type": "function", "function": {"name": tool.name, "parameters": tool.input_schema,
                                                           **({"description": tool.description}
                                                              if tool.description else {})}}
                         for tool in request.tools]
    choice = request.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise InvalidRequest("tool_choice.name: Field required when type is 'tool'", param="tool_choice.name")
        if choice.type in ("any", "tool") and not request.tools:
            raise InvalidRequest(f"tool_choice {choice.type!r} needs tools", param="tool_choice")
        if request.tools or choice.type in ("auto", "none"):
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or \
                {"type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use and request.tools:
            body["parallel_tool_calls"] = False
    config = request.output_config or OutputConfig()
    thinking = request.thinking
    if native and isinstance(thinking, ThinkingEnabled | ThinkingAdaptive):
        body.update(reasoning_budget=thinking.budget_tokens if isinstance(thinking, ThinkingEnabled) else
                    EFFORT_BUDGET[config.effort or "high"], include_reasoning=thinking.display != "omitted")
    elif native:  # thinking is off unless asked for
        body["reasoning_effort"] = "none"
    elif isinstance(request.thinking, ThinkingEnabled | ThinkingAdaptive):
        if "thinking_template" not in fields or "thinking_budget" not in fields:
            raise InvalidRequest("thinking: extended thinking needs the plugin package 'gallama-feature-thinking', "
                                 "which is not installed or is disabled", param="thinking")
        budget = request.thinking.budget_tokens if isinstance(request.thinking, ThinkingEnabled) else \
            EFFORT_BUDGET[config.effort or "high"]
        body.update(thinking_template=THINKING_TEMPLATE, thinking_budget=budget,
                    return_thinking=False if request.thinking.display == "omitted" else "separate")
    if config.format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": config.format.schema_, "strict": True}}
    if isinstance(request, MessagesRequest):
        body["max_tokens"] = request.max_tokens
        for name in ("temperature", "top_p", "top_k"):
            if getattr(request, name) is not None:
                body[name] = getattr(request, name)
        if request.stop_sequences:
            body["stop"] = list(request.stop_sequences)
    else:
        body["max_tokens"] = 1  # counting: the prompt is what matters
    return body


def _prefill(messages: list[Message]) -> str | None:
    """The text of a last assistant message (a prefill: the response continues it), or None. A message with a
    tool use is a turn that ended, not a prefill."""
    last = messages[-1] if messages else None
    if last is None or last.role != "assistant":
        return None
    if isinstance(last.content, str):
        return last.content or None
    if any(isinstance(block, ToolUseBlock) for block in last.content):
        return None
    return "".join(block.text for block in last.content if isinstance(block, TextBlock)) or None


def _messages(message: Message, index: int) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI messages: tool results become tool messages (before the user's text, as
    Anthropic orders them), tool uses become tool calls; thinking blocks sent back are not part of the prompt."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise InvalidRequest(f"messages.{index}: tool_use blocks belong to assistant messages",
                                     param=f"messages.{index}.content")
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise InvalidRequest(f"messages.{index}: tool_result blocks belong to user messages",
                                     param=f"messages.{index}.content")
            result = _text(block.content)
            out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                        "content": f"Error: {result}" if block.is_error else result})
    if message.role == "assistant":
        if texts or calls:
            out.append({"role": "assistant", "content": "\n".join(texts) or None,
                        **({"tool_calls": calls} if calls else {})})
    elif texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out
