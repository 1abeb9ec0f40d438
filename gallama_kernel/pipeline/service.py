"""Serving logic of the OpenAI endpoints: plan, render, tokenize, check limits, stream, shape responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..backend import GenerationEvent, GenerationRequest, SamplingParams
from ..plugins import PluginHost
from ..protocol.errors import InvalidRequest
from ..protocol.openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from .models import ModelRegistry, ServedModel
from .plan import Delta, RequestPlan, ResponseTransformer


def sampling_from(request: SamplingFields) -> SamplingParams:
    defaults = SamplingParams()
    chosen = {name: getattr(request, name) for name in SamplingParams.__dataclass_fields__}
    return SamplingParams(**{k: (v if v is not None else getattr(defaults, k)) for k, v in chosen.items()})


def token_budget(model: ServedModel, prompt_tokens: int, requested: int | None) -> int:
    """Completion tokens allowed; a request that cannot fit the context is a 400 naming both numbers."""
    limit = model.backend.context_length
    if requested is None:
        if prompt_tokens >= limit:
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens, but the prompt has "
                                 f"{prompt_tokens} tokens.", param="messages", code="context_length_exceeded")
        return limit - prompt_tokens
    if prompt_tokens + requested > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion).",
            param="max_tokens", code="context_length_exceeded")
    return requested


def usage(event: GenerationEvent) -> dict[str, Any]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }


@dataclass
class Prepared:
    """One request ready for its backend."""

    model: ServedModel
    generation: GenerationRequest
    transformers: list[ResponseTransformer] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    echo: str = ""

    @property
    def id(self) -> str:
        return self.generation.request_id

    async def events(self) -> AsyncIterator[GenerationEvent]:
        stream = self.model.backend.stream(self.generation)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    def transform(self, delta: Delta, final: bool = False) -> list[Delta]:
        deltas = [delta] if delta else []
        for transformer in self.transformers:
            produced: list[Delta] = []
            for item in deltas:
                produced.extend(transformer.feed(item))
            if final:
                produced.extend(transformer.finish())
            deltas = produced
        return deltas


class ChatService:
    """Everything between a validated request and the JSON/SSE payloads the router sends."""

    def __init__(self, registry: ModelRegistry, host: PluginHost) -> None:
        self.registry = registry
        self.host = host

    # -- chat ------------------------------------------------------------------------------------------
    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        model = self.registry.get(request.model)
        messages = [self._message_dict(m) for m in request.messages]
        plan = RequestPlan(messages=messages, leading_prompt=request.leading_prompt or "", stop=request.stop_list)
        self.host.pm.hook.prepare_request(request=request, plan=plan)
        prompt = model.renderer.render(plan.messages, **plan.template_vars) + plan.leading_prompt
        tokens = model.backend.tokenize(prompt)
        generation = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_tokens=tokens,
            max_tokens=token_budget(model, len(tokens), request.token_limit),
            sampling=sampling_from(request), stop=plan.stop)
        transformers = [t for group in self.host.pm.hook.response_transformers(request=request) if group
                        for t in group]
        return Prepared(model, generation, transformers)

    @staticmethod
    def _message_dict(message: Any) -> dict[str, Any]:
        role = "system" if message.role == "developer" else message.role
        data: dict[str, Any] = {"role": role, "content": message.text}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(message, key) is not None:
                data[key] = getattr(message, key)
        return data

    async def chat_completion(self, prepared: Prepared) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        last = GenerationEvent("", 0)
        async for event in prepared.events():
            last = event
            for delta in prepared.transform({"content": event.text} if event.text else {},
                                            final=event.finish_reason is not None):
                _merge(message, delta)
        return {
            "id": prepared.id, "object": "chat.completion", "created": prepared.created,
            "model": prepared.model.name,
            "choices": [{"index": 0, "message": message, "finish_reason": last.finish_reason,
                         "logprobs": None}],
            "usage": usage(last),
        }

    async def chat_chunks(self, prepared: Prepared, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(delta: Delta, finish: str | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {
                "id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
                "model": prepared.model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return body

        yield chunk({"role": "assistant", "content": ""})
        async for event in prepared.events():
            final = event.finish_reason is not None
            for delta in prepared.transform({"content": event.text} if event.text else {}, final=final):
                yield chunk(delta)
            if final:
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield {"id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
                           "model": prepared.model.name, "choices": [], "usage": usage(event)}

    # -- legacy completions ----------------------------------------------------------------------------
    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        model = self.registry.get(request.model)
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = list(prompt)  # type: ignore[arg-type]
            vocab = model.backend.vocab_size
            if vocab is not None and any(not 0 <= t < vocab for t in tokens):
                raise InvalidRequest(f"Token ids must lie in 0..{vocab - 1}.", param="prompt")
            text = model.backend.detokenize(tokens)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt  # type: ignore[assignment]
            tokens = model.backend.tokenize(str(text))
        if not tokens:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        generation = GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}", prompt_tokens=tokens,
            max_tokens=token_budget(model, len(tokens), request.max_tokens),
            sampling=sampling_from(request), stop=request.stop_list)
        return Prepared(model, generation, echo=str(text) if request.echo else "")

    def _completion_body(self, prepared: Prepared, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": prepared.id, "object": "text_completion", "created": prepared.created,
            "model": prepared.model.name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    async def completion(self, prepared: Prepared) -> dict[str, Any]:
        parts = [prepared.echo]
        last = GenerationEvent("", 0)
        async for event in prepared.events():
            parts.append(event.text)
            last = event
        body = self._completion_body(prepared, "".join(parts), last.finish_reason)
        body["usage"] = usage(last)
        return body

    async def completion_chunks(self, prepared: Prepared, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        if prepared.echo:
            yield self._completion_body(prepared, prepared.echo, None)
        async for event in prepared.events():
            if event.text or event.finish_reason:
                yield self._completion_body(prepared, event.text, event.finish_reason)
            if event.finish_reason and include_usage:
                body = self._completion_body(prepared, "", None)
                body["choices"] = []
                body["usage"] = usage(event)
                yield body


def _merge(message: dict[str, Any], delta: Delta) -> None:
    for key, value in delta.items():
        if isinstance(value, str) and isinstance(message.get(key), str):
            message[key] += value
        else:
            message[key] = value
