"""Serving logic of the OpenAI endpoints: plan, render, tokenize, check limits, stream, shape responses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..backend import GenerationEvent, GenerationRequest, SamplingParams
from ..grammar import Grammar, GrammarError
from ..grammar.closing import Closer
from ..grammar.tool_formats import FORMATS
from ..plugins import PluginHost
from ..protocol import limits
from ..protocol.errors import InvalidRequest
from ..protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from . import constraints, reasoning, tools, truncation
from .embeddings import require_chat
from .models import ModelRegistry, ServedModel
from .plan import SEGMENT, Delta, GenerationPass, RequestPlan, ResponseTransformer


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


_SURROGATE = re.compile("[\ud800-\udfff]")
T = TypeVar("T")
_PREPARE_POOL = concurrent.futures.ThreadPoolExecutor(limits.PREPARE_THREADS, thread_name_prefix="gallama-prepare")


def _over(what: str, value: int, limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(f"{what}: {value}, over the limit of {limit}.", param=param, code="request_too_large")


def check_text(fields: dict[str, Any]) -> None:
    """Count the characters of every string in ``fields`` (name -> value; keys of dicts count too) against
    :data:`~gallama_kernel.protocol.limits.MAX_REQUEST_CHARS`, and refuse lone surrogates (which no tokenizer
    can encode) naming where they are. Iterative: a deeply nested schema cannot exhaust the stack."""
    total = 0
    stack: list[tuple[str, Any]] = list(fields.items())
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            total += len(value)
            if total > limits.MAX_REQUEST_CHARS:
                raise _over("Characters of text in the request", total, limits.MAX_REQUEST_CHARS, path)
            if not value.isascii() and _SURROGATE.search(value):
                raise InvalidRequest(f"'{path}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                                     "which is not text.", param=path)
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"{path}.{key}", item))
                if isinstance(key, str):
                    stack.append((f"{path}.{key}", key))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}.{index}", item) for index, item in enumerate(value))


def check_stops(stops: list[str]) -> None:
    if len(stops) > limits.MAX_STOP_STRINGS:
        raise _over("Number of stop strings", len(stops), limits.MAX_STOP_STRINGS, "stop")
    for index, stop in enumerate(stops):
        if len(stop) > limits.MAX_STOP_CHARS:
            raise _over(f"Characters of stop string {index}", len(stop), limits.MAX_STOP_CHARS, f"stop.{index}")


def check_chat_limits(request: ChatCompletionRequest) -> None:
    """The size limits of :mod:`~gallama_kernel.protocol.limits`, before any text reaches native code."""
    if len(request.messages) > limits.MAX_MESSAGES:
        raise _over("Number of messages", len(request.messages), limits.MAX_MESSAGES, "messages")
    if request.tools and len(request.tools) > limits.MAX_TOOLS:
        raise _over("Number of tools", len(request.tools), limits.MAX_TOOLS, "tools")
    check_stops(request.stop_list)
    check_text({"messages": [m.model_dump(exclude_none=True) for m in request.messages],
                "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
                "leading_prompt": request.leading_prompt or "", "stop": request.stop_list,
                "chat_template_kwargs": request.chat_template_kwargs or {}})


async def off_loop(work: Callable[[], T]) -> T:
    """Run ``work`` (a request's preparation) in a preparation thread, within
    :data:`~gallama_kernel.protocol.limits.PREPARE_BUDGET_S`: past it the request is a 400 and the thread's
    result, when it comes, is dropped (a prepared request holds no engine resources). Its errors are raised
    here as they are (an :class:`InvalidRequest` stays a 400)."""
    future = asyncio.get_running_loop().run_in_executor(_PREPARE_POOL, work)
    try:
        return await asyncio.wait_for(asyncio.shield(future), limits.PREPARE_BUDGET_S)
    except TimeoutError:
        future.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: never logged
        raise InvalidRequest(f"Preparing this request took longer than its budget of {limits.PREPARE_BUDGET_S:g} s "
                             "(rendering, tokenizing and compiling its constraints); send a smaller request.",
                             code="preparation_budget_exceeded") from None
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


def usage(event: GenerationEvent) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }
    if event.reasoning_tokens:
        body["completion_tokens_details"] = {"reasoning_tokens": event.reasoning_tokens}
    return body


def _with_passes(event: GenerationEvent, passes: GenerationEvent) -> GenerationEvent:
    """The answer's final event with the passes' tokens added (they count as reasoning tokens)."""
    return GenerationEvent(event.text, event.completion_tokens + passes.completion_tokens, event.finish_reason,
                           prompt_tokens=event.prompt_tokens + passes.prompt_tokens,
                           cached_tokens=event.cached_tokens + passes.cached_tokens,
                           reasoning_tokens=passes.completion_tokens, stop_sequence=event.stop_sequence)


def _with_unasked(event: GenerationEvent, unasked: reasoning.UnaskedReasoning,
                  count: truncation.Count) -> GenerationEvent:
    """The answer's final event with the tokens of the reasoning block it opened counted as reasoning tokens."""
    syntax = unasked.syntax
    tokens = min(event.completion_tokens, count(syntax.start + syntax.lead + unasked.reasoning + syntax.end))
    return dataclasses.replace(event, reasoning_tokens=event.reasoning_tokens + tokens)


def _has_output(message: dict[str, Any]) -> bool:
    return any(value for key, value in message.items() if key != "role")


@dataclass
class PreparedPass:
    """A :class:`GenerationPass` with its compiled grammar."""

    spec: GenerationPass
    grammar: Grammar | None


@dataclass
class Prepared:
    """One request ready for its backend.

    With ``passes``, ``generation`` is the answer as prepared before them; it is rebuilt from ``plan`` once
    they have run (their output is part of its prompt).
    """

    model: ServedModel
    generation: GenerationRequest
    transformers: list[ResponseTransformer] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    echo: str = ""
    tool_mode: str | None = None  # "auto" (calls or an answer) or "calls"; None: no function calling
    constraint_after: str | None = None
    plan: RequestPlan | None = None
    passes: list[PreparedPass] = field(default_factory=list)
    requested_tokens: int | None = None
    answer_reserve: int = 1  # tokens passes that share max_tokens leave the answer (see reasoning.answer_reserve)
    closer: Closer | None = None  # the answer grammar's closer: the answer cannot be cut off (see truncation)
    output_closed: bool = False  # the answer reached max_tokens and was closed with its grammar's shortest ending
    unasked: reasoning.UnaskedReasoning | None = None  # reads a reasoning block the free answer may open unasked
    emit_interval_s: float = math.inf  # set for streams from the backend's stream_interval_s
    final_usage: dict[str, Any] | None = None  # a stream's usage once it finished (asked for or not)
    stop_sequence: str | None = None  # the stop string that ended the answer, once it finished

    def streaming(self) -> Prepared:
        """Mark the response as streamed: text is emitted as the backend's stream interval allows."""
        self.emit_interval_s = self.model.backend.stream_interval_s
        return self

    @property
    def grammar(self) -> Grammar | None:
        return self.generation.grammar

    @property
    def id(self) -> str:
        return self.generation.request_id

    async def events(self, generation: GenerationRequest | None = None,
                     each_token: bool = False) -> AsyncIterator[GenerationEvent]:
        """The backend's events; ``each_token``: one event per token, streamed or not (the truncation guard
        checkpoints between events, so that its closing point depends on the tokens alone, not on timing)."""
        interval = 0.0 if each_token else self.emit_interval_s
        request = dataclasses.replace(generation or self.generation, emit_interval_s=interval)
        stream = self.model.backend.stream(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    def render(self, opening: str = "") -> list[int]:
        """Prompt tokens of the plan as it stands, followed by ``opening``."""
        assert self.plan is not None
        return prompt_tokens(self.model, self.plan, opening)

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

    def annotate(self, delta: Delta) -> Delta:
        """A delta the kernel sends by itself (opening, closing), passed to the transformers' ``annotate``."""
        for transformer in self.transformers:
            annotate = getattr(transformer, "annotate", None)
            if annotate is not None:
                delta = annotate(delta)
        return delta


class ChatService:
    """Everything between a validated request and the JSON/SSE payloads the router sends."""

    def __init__(self, registry: ModelRegistry, host: PluginHost) -> None:
        self.registry = registry
        self.host = host

    # -- chat ------------------------------------------------------------------------------------------
    async def prepare_chat_async(self, request: ChatCompletionRequest) -> Prepared:
        """:meth:`prepare_chat` in a preparation thread, within the preparation budget (see :func:`off_loop`)."""
        return await off_loop(lambda: self.prepare_chat(request))

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        """Plugin hooks, rendering, tokenization, constraint compile and limit checks: blocking work, which the
        event loop hands to :meth:`prepare_chat_async`."""
        model = self.registry.get(request.model)
        require_chat(model, "/v1/chat/completions")
        check_chat_limits(request)
        messages = [self._message_dict(m) for m in request.messages]
        plan = RequestPlan(messages=messages, leading_prompt=request.leading_prompt or "", stop=request.stop_list,
                           constraint=constraints.from_request(request, model.tool_format.name))
        plan.template_vars.update(request.chat_template_kwargs or {})
        self._present_tools(model, request, plan)
        self.host.prepare_request(request, plan)
        asked = reasoning.ReasoningRequest.of(request)
        outcome = reasoning.plan_reasoning(model.reasoning, asked, plan, model.renderer, model.name)
        grammar = self._grammar(model, plan.constraint, plan.constraint_after)
        passes = [PreparedPass(p, self._grammar(model, p.constraint)) for p in plan.passes]
        tokens = prompt_tokens(model, plan)
        if passes:  # the first pass's prompt must fit before the response starts
            token_budget(model, len(prompt_tokens(model, plan, passes[0].spec.opening)), None)
        max_tokens = token_budget(model, len(tokens), request.token_limit)
        closer = truncation.closer_for(grammar)
        shortest = 0
        if closer is not None and plan.constraint is not None:
            shortest = truncation.shortest_tokens(closer, counter(model), requested=request.token_limit,
                                                  room=model.backend.context_length - len(tokens),
                                                  param=plan.constraint.param)
        generation = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}", prompt_tokens=tokens, max_tokens=max_tokens,
            sampling=sampling_from(request), stop=plan.stop, grammar=grammar)
        transformers = self.host.response_transformers(request, plan)
        tool_mode = None
        if plan.constraint is not None and plan.constraint.kind == "tools":
            tool_mode = "auto" if plan.constraint.choice == "auto" else "calls"
        return Prepared(model, generation, transformers, tool_mode=tool_mode, constraint_after=plan.constraint_after,
                        plan=plan, passes=passes, requested_tokens=request.token_limit,
                        answer_reserve=reasoning.answer_reserve(max_tokens, shortest), closer=closer,
                        unasked=reasoning.UnaskedReasoning(model.reasoning, asked.include and asked.wanted)
                        if outcome == "may_open" and model.reasoning is not None else None)

    @staticmethod
    def _grammar(model: ServedModel, constraint: constraints.Constraint | None,
                 after: str | None = None) -> Grammar | None:
        if constraint is None:
            return None
        grammar = constraints.compile_constraint(constraint, after)
        try:
            model.backend.validate_grammar(grammar)
        except GrammarError as error:  # the backend knows the grammar, the request field is known here
            error.param = error.param or constraint.param
            raise
        return grammar

    @staticmethod
    def _present_tools(model: ServedModel, request: ChatCompletionRequest, plan: RequestPlan) -> None:
        """Show the tools to the model (its own template when it knows tools, else the generic format) and
        render earlier calls and results."""
        offered = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        choice = request.effective_tool_choice
        name = choice if isinstance(choice, str) else choice.function.name
        if tools.template_knows_tools(model.renderer.source if model.renderer.uses_model_template else None):
            plan.messages = tools.template_history(plan.messages)
            if offered and name != "none":
                plan.template_vars["tools"] = offered
            return
        plan.messages = tools.render_history(plan.messages, model.tool_format)
        if offered and name != "none":
            plan.messages = tools.add_system_text(plan.messages,
                                                  tools.tool_system_prompt(offered, name, model.tool_format))

    @staticmethod
    def _message_dict(message: ChatMessage) -> dict[str, Any]:
        """The message as templates and the tool history read it: ``developer`` is ``system``, the deprecated
        ``function`` result is a ``tool`` result and ``function_call`` a tool call; fields that carry nothing to
        generate from (``parsed``, ``annotations``, ``audio``, past ``reasoning_content``) are left out."""
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        data: dict[str, Any] = {"role": role, "content": message.text}
        calls = message.calls
        if calls:
            data["tool_calls"] = [call.history() for call in calls]
        for key in ("name", "tool_call_id"):
            if getattr(message, key) is not None:
                data[key] = getattr(message, key)
        return data

    async def _passes(self, prepared: Prepared) -> AsyncIterator[tuple[Delta, GenerationEvent | None]]:
        """Run the plan's passes in order; yield the deltas shown to the client, then ``({}, totals)`` with
        the passes' token counts. Afterwards ``prepared.generation`` is the answer, rebuilt from the plan."""
        assert prepared.plan is not None
        totals = GenerationEvent("", 0)
        shared = 0  # tokens of passes that come out of max_tokens
        for index, item in enumerate(prepared.passes):
            spec = item.spec
            tokens = prepared.render(spec.opening)
            room = token_budget(prepared.model, len(tokens), None)  # a 400 only when no room is left at all
            most = min(room, spec.max_tokens) if spec.max_tokens is not None else room
            if spec.shares_max_tokens:
                total = prepared.requested_tokens - shared if prepared.requested_tokens is not None else room
                most = min(most, total - prepared.answer_reserve)
            parts: list[str] = []
            if most > 0:
                generation = GenerationRequest(
                    request_id=f"{prepared.id}-pass{index}", prompt_tokens=tokens, max_tokens=most,
                    sampling=prepared.generation.sampling, stop=spec.stop, grammar=item.grammar)
                if spec.opening and spec.show_opening and spec.show_as != "hidden":
                    yield {spec.show_as: spec.opening}, None
                async for event in prepared.events(generation):
                    parts.append(event.text)
                    if event.text and spec.show_as != "hidden":
                        yield {spec.show_as: event.text}, None
                    if event.finish_reason is not None:
                        totals.prompt_tokens += event.prompt_tokens
                        totals.completion_tokens += event.completion_tokens
                        totals.cached_tokens += event.cached_tokens
                        shared += event.completion_tokens if spec.shares_max_tokens else 0
            if spec.done is not None:
                keep_order(prepared.plan, spec.done, "".join(parts))
        tokens = prepared.render()
        room = token_budget(prepared.model, len(tokens), None)  # the prompt was checked with the pass's text
        requested = prepared.requested_tokens
        prepared.generation = GenerationRequest(
            request_id=prepared.id, prompt_tokens=tokens,
            max_tokens=room if requested is None else max(1, min(room, requested - shared)),
            sampling=prepared.generation.sampling, stop=prepared.plan.stop, grammar=prepared.generation.grammar)
        yield {}, totals

    async def _deltas(self, prepared: Prepared) -> AsyncIterator[tuple[list[Delta], GenerationEvent, str | None]]:
        """(deltas, event, finish_reason) per generation event: passes first, then the answer with tool calls
        parsed, transformers applied, and the finished output checked against its grammar."""
        reasoning: GenerationEvent | None = None
        if prepared.passes:
            async for delta, totals in self._passes(prepared):
                if totals is not None:
                    reasoning = totals
                elif delta:  # a visible pass: no transformer reads it, but each may annotate it
                    yield [prepared.annotate(delta)], GenerationEvent("", 0), None
        calls = None
        constraint = prepared.plan.constraint if prepared.plan is not None else None
        if prepared.tool_mode and constraint is not None:
            calls = FORMATS[constraint.format].reader(constraint.tools, may_answer=prepared.tool_mode == "auto",
                                                      after=prepared.constraint_after)
        text: list[str] = []
        guard = None
        if prepared.closer is not None:
            guard = truncation.TruncationGuard(prepared.closer, prepared.generation.max_tokens,
                                               counter(prepared.model))
        async for event in prepared.events(each_token=guard is not None):
            if guard is not None:
                event = guard.event(event)
            final = event.finish_reason is not None
            text.append(event.text)
            if calls is not None:
                raw = calls.feed(event.text) + (calls.finish() if final else [])
            elif prepared.unasked is not None:
                raw = prepared.unasked.feed(event.text) + (prepared.unasked.finish() if final else [])
                if final and prepared.unasked.opened:
                    event = await asyncio.to_thread(_with_unasked, event, prepared.unasked, counter(prepared.model))
            else:
                raw = [{"content": event.text}] if event.text else []
            deltas = [out for delta in raw for out in prepared.transform(delta)]
            if final:
                deltas += prepared.transform({}, final=True)
            finish: str | None = event.finish_reason
            closed = final and guard is not None and guard.closed
            if closed:
                prepared.output_closed = True
            if final and (finish == "stop" or closed):
                if prepared.grammar is not None:  # a new grammar's parser takes ~0.1 s to build: not on the loop
                    await asyncio.to_thread(constraints.check_output, prepared.grammar, "".join(text))
                if calls is not None and calls.calls:
                    finish = "tool_calls"
            if final and reasoning is not None:
                event = _with_passes(event, reasoning)
            if final:
                prepared.stop_sequence = event.stop_sequence
            yield deltas, event, finish

    async def chat_completion(self, prepared: Prepared) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        last, finish = GenerationEvent("", 0), None
        async for deltas, event, reason in self._deltas(prepared):
            for delta in deltas:
                if delta.pop(SEGMENT, False) and _has_output(messages[-1]):
                    messages.append({"role": "assistant", "content": ""})
                merge_delta(messages[-1], delta)
            if reason is not None:
                last, finish = event, reason
        choices = []
        for index, message in enumerate(messages):
            if message.get("tool_calls") and not message["content"]:
                message["content"] = None
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None,
                            **({"output_closed": True} if prepared.output_closed else {})})
        return {
            "id": prepared.id, "object": "chat.completion", "created": prepared.created,
            "model": prepared.model.name, "choices": choices, "usage": usage(last),
        }

    async def chat_chunks(self, prepared: Prepared, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        prepared.streaming()

        def chunk(delta: Delta, finish: str | None = None) -> dict[str, Any]:
            delta.pop(SEGMENT, None)
            body: dict[str, Any] = {
                "id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
                "model": prepared.model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return body

        yield chunk(prepared.annotate({"role": "assistant", "content": ""}))
        async for deltas, event, finish in self._deltas(prepared):
            for delta in deltas:
                yield chunk(delta)
            if finish is not None:
                prepared.final_usage = usage(event)
                last = chunk(prepared.annotate({}), finish)
                if prepared.output_closed:
                    last["choices"][0]["output_closed"] = True
                yield last
                if include_usage:
                    yield {"id": prepared.id, "object": "chat.completion.chunk", "created": prepared.created,
                           "model": prepared.model.name, "choices": [], "usage": usage(event)}

    # -- legacy completions ----------------------------------------------------------------------------
    async def prepare_completion_async(self, request: CompletionRequest) -> Prepared:
        """:meth:`prepare_completion` in a preparation thread, within the preparation budget."""
        return await off_loop(lambda: self.prepare_completion(request))

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        """Limit checks and tokenization; ``prompt`` text is the client's, never read as control tokens."""
        model = self.registry.get(request.model)
        require_chat(model, "/v1/completions")
        prompt = request.prompt
        if isinstance(prompt, list) and not prompt:
            raise InvalidRequest("The prompt is empty: give a text or a list of token ids.", param="prompt")
        if isinstance(prompt, list) and len(prompt) > limits.MAX_PROMPT_ITEMS:
            raise _over("Items of the prompt list", len(prompt), limits.MAX_PROMPT_ITEMS, "prompt")
        check_stops(request.stop_list)
        check_text({"prompt": prompt if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)],
                    "stop": request.stop_list})
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = list(prompt)  # type: ignore[arg-type]
            vocab = model.backend.vocab_size
            if vocab is not None and any(not 0 <= t < vocab for t in tokens):
                raise InvalidRequest(f"Token ids must lie in 0..{vocab - 1}.", param="prompt")
            text = model.backend.detokenize(tokens)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt  # type: ignore[assignment]
            tokens = model.backend.tokenize_prompt([(str(text), False)])
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
        prepared.streaming()
        if prepared.echo:
            yield self._completion_body(prepared, prepared.echo, None)
        async for event in prepared.events():
            if event.finish_reason:
                prepared.final_usage = usage(event)
            if event.text or event.finish_reason:
                yield self._completion_body(prepared, event.text, event.finish_reason)
            if event.finish_reason and include_usage:
                body = self._completion_body(prepared, "", None)
                body["choices"] = []
                body["usage"] = usage(event)
                yield body


def counter(model: ServedModel) -> truncation.Count:
    """Tokens of a text as ``model`` would write it (plain text, no BOS)."""
    backend = model.backend

    def count(text: str) -> int:
        try:
            return len(backend.tokenize_plain(text, add_special=False))
        except NotImplementedError:
            return len(backend.tokenize(text, add_special=False))
    return count


def keep_order(plan: RequestPlan, done: Callable[[RequestPlan, str], None], text: str) -> None:
    """Apply a pass's ``done`` to its ``text``; what it appends to ``plan.leading_prompt`` once the prompt has a
    continuation goes to the end of the continuation instead, after the earlier passes' output."""
    before = plan.leading_prompt
    done(plan, text)
    added = plan.leading_prompt[len(before):] if plan.leading_prompt.startswith(before) else ""
    if plan.continuation and added:
        plan.continuation.append((added, False))
        plan.leading_prompt = before


def prompt_tokens(model: ServedModel, plan: RequestPlan, opening: str = "") -> list[int]:
    """Tokens of the plan's prompt followed by ``opening``: the client's text (messages, tools,
    ``leading_prompt``) never becomes control tokens (see :meth:`PromptRenderer.render_segments`)."""
    segments = model.renderer.render_segments(plan.messages, leading_prompt=plan.leading_prompt,
                                              **plan.template_vars)
    return model.backend.tokenize_prompt([*segments, *plan.continuation, *([(opening, True)] if opening else [])])


def merge_delta(message: dict[str, Any], delta: Delta) -> None:
    """Accumulate a streamed delta into a message: text concatenates, tool calls merge by ``index``."""
    for key, value in delta.items():
        if key == "tool_calls":
            calls = message.setdefault("tool_calls", [])
            for part in value:
                index = part["index"]
                if index == len(calls):
                    calls.append({"id": part.get("id"), "type": part.get("type", "function"),
                                  "function": {"name": "", "arguments": ""}})
                function = calls[index]["function"]
                for field_name, piece in part.get("function", {}).items():
                    function[field_name] = function.get(field_name, "") + piece
        elif isinstance(value, str) and isinstance(message.get(key), str):
            message[key] += value
        else:
            message[key] = value
