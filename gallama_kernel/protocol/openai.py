"""OpenAI request models, validated strictly: an unknown field is refused, never ignored.

Fields that plugins declare through ``register_request_fields`` are accepted and land in ``extensions``.
Fields of the OpenAI protocol that gallama cannot honour yet are refused with a 400 that names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .errors import InvalidRequest


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
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

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: ``auto`` when tools are given, ``none`` otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        names = [tool.function.name for tool in self.tools or []]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidRequest(f"Tool names must be unique; repeated: {', '.join(duplicates)}.", param="tools")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names '{choice.function.name}', which is not in tools "
                                 f"({', '.join(names)}).", param="tool_choice")
        given = [name for name in ("regex_pattern", "regex_prefix_pattern", "grammar") if getattr(self, name)]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise InvalidRequest(f"Only one output constraint per request; got {' and '.join(given)}.",
                                 param=given[1])


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

    @model_validator(mode="after")
    def _plugin_fields(self, info: ValidationInfo) -> EmbeddingRequest:
        """Overrides the chat requests' check: no plugin field applies here, every unknown field is a 400."""
        for name in self.model_extra or {}:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_field")
        return self

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


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "TextPart", "StreamOptions", "NamedToolChoice",
               "ResponseFormat", "JsonSchemaFormat"}


def error_param(loc: tuple[int | str, ...]) -> str | None:
    """``messages.0.content`` from a pydantic location, without union member tags (``str``, ``list[...]``)."""
    kept = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(kept) or None


def validate_request(model: type[_Strict], body: Any, fields: dict[str, Any]) -> Any:
    """Validate a decoded JSON body, turning pydantic errors into a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        request = model.model_validate(body, context={"fields": fields})
    except ValidationError as error:
        first = error.errors()[0]
        param = error_param(first["loc"])
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg']}", param=param) from None
    request.refuse_unsupported()
    return request
