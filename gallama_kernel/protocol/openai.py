"""OpenAI request models, validated strictly: an unknown field is refused, never ignored.

Fields that plugins declare through ``register_request_fields`` are accepted and land in ``extensions``.
Fields of the OpenAI protocol that change nothing about the output (``metadata``, ``store``, ``service_tier``…)
are accepted without effect; those that would change it and that gallama cannot honour are refused with a 400
that names them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import InvalidRequest


class PromptCacheBreakpoint(BaseModel):
    """A caching hint on a content part: accepted without effect (gallama reuses cached prefixes by itself)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class RefusalPart(BaseModel):
    """What an assistant said instead of an answer: rendered as its text."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["refusal"]
    refusal: str


class OtherPart(BaseModel):
    """A part gallama cannot read (image, audio, file) or does not know: kept so that the request's check can
    refuse it, naming where it is."""

    model_config = ConfigDict(extra="allow")
    type: str


def _part_tag(value: Any) -> str:
    """The model that reads a content part, by its ``type``: errors then name that part's fields only."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextPart", "refusal": "RefusalPart"}.get(str(kind), "OtherPart")


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[RefusalPart, Tag("RefusalPart")]
    | Annotated[OtherPart, Tag("OtherPart")],
    Discriminator(_part_tag),
]

UNREADABLE_PARTS = {"image_url": "images", "input_audio": "audio input", "file": "files"}
"""Content part types of OpenAI's protocol that would change the output and that gallama cannot read."""


class CalledFunction(BaseModel):
    """The function of an earlier call. ``parsed_arguments`` is the openai SDK's parse of ``arguments``: a copy,
    not rendered."""

    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str | dict[str, Any]
    parsed_arguments: Any = None


class ToolCall(BaseModel):
    """A call an assistant made earlier. ``index`` is the position of a streamed call, which the openai SDK's
    stream helper leaves on the calls it accumulates; the list order says the same."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction
    index: int | None = None

    def history(self) -> dict[str, Any]:
        """The call as the prompt renders it (OpenAI's request shape, without the SDK's copies)."""
        call: dict[str, Any] = {"type": "function",
                                "function": {"name": self.function.name, "arguments": self.function.arguments}}
        return call if self.id is None else {"id": self.id, **call}


class AudioRef(BaseModel):
    """An earlier audio answer by id. gallama never answers with audio, so there is nothing to render."""

    model_config = ConfigDict(extra="forbid")
    id: str


ROLE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset({"name"}),
    "developer": frozenset({"name"}),
    "user": frozenset({"name"}),
    "assistant": frozenset({"name", "tool_calls", "function_call", "refusal", "audio", "annotations", "parsed",
                            "reasoning_content"}),
    "tool": frozenset({"name", "tool_call_id"}),
    "function": frozenset({"name"}),
}
"""Optional message fields by role (OpenAI's message shapes, plus ``name`` everywhere)."""

MESSAGE_FIELDS = frozenset().union(*ROLE_FIELDS.values())


class ChatMessage(BaseModel):
    """A message in any of OpenAI's shapes, including what the openai SDK sends back from its own responses.

    Fields that carry nothing to generate from are accepted and not rendered: ``parsed`` (a copy of
    ``content``), ``annotations``, ``audio`` (an id), ``reasoning_content`` (past reasoning is not re-rendered).
    Fields that carry conversation are rendered: an assistant's ``refusal`` is its text, the deprecated
    ``function_call`` is a tool call, and a ``role: "function"`` message is that function's result.
    """

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: CalledFunction | None = None
    refusal: str | None = None
    audio: AudioRef | None = None
    annotations: list[dict[str, Any]] | None = None
    parsed: Any = None
    reasoning_content: str | None = None

    @property
    def text(self) -> str:
        """What the message says: its text, an assistant's refusal parts in place, then its ``refusal``."""
        if self.content is None:
            said = ""
        elif isinstance(self.content, str):
            said = self.content
        else:
            said = "".join(part.text if isinstance(part, TextPart) else part.refusal
                           for part in self.content if isinstance(part, TextPart | RefusalPart))
        if self.refusal:
            return f"{said}\n{self.refusal}" if said else self.refusal
        return said

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls, the deprecated ``function_call`` included (a call without an id)."""
        calls = list(self.tool_calls or [])
        if self.function_call is not None:
            calls.append(ToolCall(function=self.function_call))
        return calls

    def refuse_unsupported(self, where: str) -> None:
        """Refuse fields of another role's shape and content parts gallama cannot read, naming where they are."""
        allowed = ROLE_FIELDS[self.role]
        for name in sorted(MESSAGE_FIELDS):
            if name not in allowed and getattr(self, name) is not None:
                raise InvalidRequest(f"Unrecognized field '{where}.{name}': a '{self.role}' message has no '{name}'.",
                                     param=f"{where}.{name}", code="unknown_field")
        if self.role == "function" and not self.name:
            raise InvalidRequest(f"A 'function' message needs the function's 'name' ({where}).",
                                 param=f"{where}.name")
        for index, part in enumerate(self.content if isinstance(self.content, list) else []):
            _refuse_part(part, self.role, f"{where}.content.{index}")


def _refuse_part(part: TextPart | RefusalPart | OtherPart, role: str, where: str) -> None:
    if isinstance(part, RefusalPart) and role != "assistant":
        raise InvalidRequest(f"A 'refusal' content part belongs in assistant messages only ({where}).", param=where)
    if not isinstance(part, OtherPart):
        return
    if part.type in UNREADABLE_PARTS:
        raise InvalidRequest(f"Content parts of type '{part.type}' ({where}) are not supported by this server: it "
                             f"cannot read {UNREADABLE_PARTS[part.type]}. Send text instead.", param=where,
                             code="unsupported_content")
    raise InvalidRequest(f"Invalid value for '{where}.type': unknown content part type '{part.type}'.",
                         param=f"{where}.type", code="invalid_value")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


FEATURE_FIELDS = {
    "artifact": "gallama-feature-artifact",
    "thinking_template": "gallama-feature-thinking",
    "return_thinking": "gallama-feature-thinking",
}
"""Request fields of gallama's feature plugins: without the plugin, the 400 names the package to install."""

UNHONOURED_FIELDS = {
    "audio": "audio output is not supported by this server.",
    "prediction": "predicted outputs are not supported by this server.",
    "web_search_options": "this server has no web search.",
    "verbosity": "this server does not support verbosity hints.",
    "moderation": "this server does not run moderation.",
    "functions": "the deprecated 'functions' are not supported; send 'tools' instead.",
    "function_call": "the deprecated 'function_call' is not supported; send 'tool_choice' instead.",
}
"""OpenAI request fields that would change the output and that gallama cannot honour (unless a plugin declares
them): a 400 that says so. ``null`` asks for nothing and is accepted."""


class _Strict(BaseModel):
    """Common behaviour: plugin fields go to ``extensions``; anything else unknown is a 400."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    _extensions: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def extensions(self) -> dict[str, Any]:
        """Values of plugin-declared fields, validated against their declared types."""
        return self._extensions

    @model_validator(mode="after")
    def _plugin_fields(self, info: ValidationInfo) -> _Strict:
        declared = (info.context or {}).get("fields", {})
        for name, value in (self.model_extra or {}).items():
            if name not in declared and name in UNHONOURED_FIELDS:
                if value is None:
                    continue
                raise InvalidRequest(f"'{name}' cannot be honoured: {UNHONOURED_FIELDS[name]}", param=name,
                                     code="unsupported_parameter")
            if name not in declared and name in FEATURE_FIELDS:
                package = FEATURE_FIELDS[name]
                raise InvalidRequest(f"The field '{name}' needs the plugin package '{package}', which is not "
                                     f"installed or is disabled (pip install {package}; see `gallama plugins`).",
                                     param=name, code="plugin_required")
            if name not in declared:
                raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                     code="unknown_field")
            try:
                self._extensions[name] = TypeAdapter(declared[name].annotation).validate_python(value)
            except ValidationError as error:
                raise InvalidRequest(f"Invalid value for '{name}': {error.errors()[0]['msg']}", param=name) from None
        return self

    def refuse_unsupported(self) -> None:
        """Refuse OpenAI options this server does not honour, naming them."""
        if getattr(self, "n", 1) != 1:
            raise InvalidRequest("Only n=1 is supported.", param="n")
        if getattr(self, "logprobs", None) not in (None, False, 0):
            raise InvalidRequest("logprobs are not supported.", param="logprobs")
        if getattr(self, "top_logprobs", None):
            raise InvalidRequest("top_logprobs are not supported.", param="top_logprobs")
        if getattr(self, "logit_bias", None):
            raise InvalidRequest("logit_bias is not supported.", param="logit_bias")


class SamplingFields(_Strict):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_words: str | list[str] | None = Field(default=None, description="gallama: alias of stop.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def stop_list(self) -> list[str]:
        found: list[str] = []
        for value in (self.stop, self.stop_words):
            if isinstance(value, str):
                found.append(value)
            elif value:
                found.extend(value)
        return [s for s in dict.fromkeys(found) if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class PromptCacheOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


MAX_REASONING_BUDGET = 1_000_000
"""Largest ``reasoning_budget`` accepted (beyond any context a model has; ``max_tokens`` bounds it anyway)."""
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                         "raise_exception", "strftime_now", "documents", "tool_choice"})
"""Template variables the kernel sets itself: ``chat_template_kwargs`` may not replace them."""


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``.

    ``metadata``, ``store``, ``service_tier``, ``prompt_cache_key``, ``prompt_cache_retention``,
    ``prompt_cache_options`` and ``safety_identifier`` (like ``user``) concern storage, billing, caching or abuse
    tracking on OpenAI's side: they change nothing about the output, so they are validated and accepted without
    effect.
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    leading_prompt: str | None = Field(default=None, description="gallama: text that opens the assistant turn.")
    regex_pattern: str | None = Field(default=None, description="gallama: a regex the whole output matches.")
    regex_prefix_pattern: str | None = Field(
        default=None, description="gallama: a regex the output starts with; free text follows.")
    grammar: str | None = Field(default=None, description="gallama: a Lark grammar the output follows.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None, description="How much a reasoning model reasons: a reasoning budget (none: no reasoning).")
    reasoning_budget: int | None = Field(
        default=None, ge=0, le=MAX_REASONING_BUDGET,
        description="gallama: most tokens a reasoning model's reasoning may use (0: no reasoning).")
    include_reasoning: bool = Field(
        default=True, description="Whether a reasoning model's reasoning is returned (reasoning_content).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra variables for the model's chat template (e.g. enable_thinking: false).")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in value or {}:
            if not name.isidentifier() or name in RESERVED_TEMPLATE_VARIABLES:
                raise ValueError(f"'{name}' cannot be set: chat_template_kwargs names template variables, other "
                                 f"than {', '.join(sorted(RESERVED_TEMPLATE_VARIABLES))}")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: ``auto`` when tools are given. Without tools it is ``none`` whatever was asked:
        ``auto`` then constrains nothing (and ``required`` or a named function are refused)."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for index, message in enumerate(self.messages):
            message.refuse_unsupported(f"messages.{index}")
        if self.modalities and "audio" in self.modalities:
            raise InvalidRequest("Audio output (modalities 'audio') is not supported by this server.",
                                 param="modalities", code="unsupported_value")
        self._refuse_tool_choice()
        given = [name for name in ("regex_pattern", "regex_prefix_pattern", "grammar") if getattr(self, name)]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise InvalidRequest(f"Only one output constraint per request; got {' and '.join(given)}.",
                                 param=given[1])

    def _refuse_tool_choice(self) -> None:
        """A choice that demands a call needs tools to call; ``auto`` or ``none`` without tools asks nothing."""
        names = [tool.function.name for tool in self.tools or []]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidRequest(f"Tool names must be unique; repeated: {', '.join(duplicates)}.", param="tools")
        choice = self.tool_choice
        if not names and choice not in (None, "none", "auto"):
            asked = f"naming '{choice.function.name}'" if isinstance(choice, NamedToolChoice) else f"'{choice}'"
            raise InvalidRequest(f"tool_choice {asked} needs tools, and the request has none.", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names '{choice.function.name}', which is not in tools "
                                 f"({', '.join(names)}).", param="tool_choice")


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported.", param="suffix")
        if self.best_of not in (None, 1):
            raise InvalidRequest("Only best_of=1 is supported.", param="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("The prompt is empty: give a text or a list of token ids.", param="prompt")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise InvalidRequest("Only one prompt per request is supported.", param="prompt")


MAX_EMBEDDING_INPUTS = 2048
"""Most texts one embeddings request may carry (OpenAI's limit)."""


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``: ``input`` is a text or a list of texts; token-id input is refused."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, strict=True)
    user: str | None = None

    @property
    def texts(self) -> list[str]:
        """The input as a list of texts (after :meth:`refuse_unsupported`)."""
        return [self.input] if isinstance(self.input, str) else [str(text) for text in self.input]

    def refuse_unsupported(self) -> None:
        given = self.input
        if isinstance(given, str):
            if not given:
                raise InvalidRequest("'input' must not be an empty string.", param="input")
            return
        if not given:
            raise InvalidRequest("'input' must not be an empty list.", param="input")
        if not all(isinstance(item, str) for item in given):
            raise InvalidRequest("Token-id input is not supported by this server; send the text instead.",
                                 param="input", code="unsupported_input")
        if len(given) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts; got {len(given)}.",
                                 param="input")
        for index, text in enumerate(given):
            if not text:
                raise InvalidRequest(f"'input' item {index} is an empty string.", param=f"input.{index}")


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextPart", "RefusalPart", "OtherPart",
               "StreamOptions", "NamedToolChoice", "ResponseFormat", "JsonSchemaFormat"}


def _path(loc: tuple[int | str, ...]) -> list[str]:
    return [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]


def error_param(loc: tuple[int | str, ...]) -> str | None:
    """``messages.0.content`` from a pydantic location, without union member tags (``str``, ``list[...]``)."""
    return ".".join(_path(loc)) or None


def _most_specific(errors: list[Any]) -> Any:
    """The error deepest in the body: a union reports each member that failed, and the member that got
    furthest (a content part, not ``str``) is the one the client meant."""
    return max(errors, key=lambda error: len(_path(error["loc"])))


def validate_request(model: type[_Strict], body: Any, fields: dict[str, Any]) -> Any:
    """Validate a decoded JSON body, turning pydantic errors into a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        request = model.model_validate(body, context={"fields": fields})
    except ValidationError as error:
        first = _most_specific(error.errors())
        param = error_param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized field '{param}'.", param=param, code="unknown_field") from None
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param) from None
    request.refuse_unsupported()
    return request
