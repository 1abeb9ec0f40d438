"""Mixture of agents: ``"mixture_of_agents": {"agents": ["model-a", "model-b"]}`` on a chat request.

The conversation goes to every agent model at once (non-streamed, without the request's output constraints:
agents answer freely); then the requested model writes the final answer with their replies in its system
prompt, under the request's own constraints, streamed if asked. An agent that fails is reported in the
response's ``mixture_of_agents`` list (``error`` instead of ``content``) and left out; the answer goes on.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response

from ..api.http_input import unless_disconnected
from ..api.streaming import EventStream
from ..protocol.errors import APIError, InvalidRequest
from ..protocol.limits import MAX_MIXTURE_AGENTS
from .pool import shorten

if TYPE_CHECKING:
    from ..keys import Principal
    from .access import CallRecord
    from .app import Gateway
    from .pool import ModelGroup

FIELD = "mixture_of_agents"
AGENT_DROPS = ("stream", "stream_options", FIELD, "tools", "tool_choice", "parallel_tool_calls", "response_format",
               "regex_pattern", "regex_prefix_pattern", "grammar")
INSTRUCTIONS = ("Other assistants have answered the user's latest message. Their replies follow, each under "
                "its name. Use what is correct and useful in them, fix what is wrong, and write the best "
                "final answer yourself; do not mention the other assistants.")


def _agents(body: dict[str, Any]) -> list[str]:
    spec = body.get(FIELD)
    agents = spec.get("agents") if isinstance(spec, dict) else None
    if (not isinstance(spec, dict) or set(spec) - {"agents"} or not isinstance(agents, list) or not agents
            or not all(isinstance(a, str) for a in agents)):
        raise InvalidRequest(f"'{FIELD}' must be {{\"agents\": [model names]}}.", param=FIELD)
    if len(agents) > MAX_MIXTURE_AGENTS:
        raise InvalidRequest(f"'{FIELD}' asks {len(agents)} agents; the limit is {MAX_MIXTURE_AGENTS}.",
                             param=f"{FIELD}.agents", code="too_many_agents")
    return agents


async def _ask(gateway: Gateway, name: str, body: dict[str, Any], principal: Principal | None,
               record: CallRecord | None) -> dict[str, Any]:
    """One agent's reply as a report entry: ``{"model", "content", "usage"}`` or ``{"model", "error"}``. Its
    tokens count towards the request's (``record``); the caller's key must allow the agent's model too."""
    try:
        group = gateway.pool.get(name)
        gateway.access.check_model(principal, [group.name, *group.aliases], name)
        worker = gateway.pick(group)
        payload = {k: v for k, v in body.items() if k not in AGENT_DROPS} | {"model": name}
        response = await gateway.forward(worker, "/v1/chat/completions", json.dumps(payload).encode(), False,
                                         record)
        data = json.loads(bytes(response.body))
        if response.status_code != 200:
            message = data.get("error", {}).get("message") if isinstance(data, dict) else None
            return {"model": name, "error": shorten(str(message or f"HTTP {response.status_code}"))}
        return {"model": group.name, "content": data["choices"][0]["message"].get("content") or "",
                "usage": data.get("usage")}
    except APIError as error:
        return {"model": name, "error": shorten(error.message)}
    except (ValueError, KeyError, IndexError) as error:
        return {"model": name, "error": f"unreadable reply: {error}"}


def _with_replies(messages: list[Any], replies: list[dict[str, Any]]) -> list[Any]:
    text = INSTRUCTIONS + "".join(f"\n\n[{r['model']}]\n{r['content']}" for r in replies if "content" in r)
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        first["content"] = f"{content}\n\n{text}" if content else text
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


async def serve(gateway: Gateway, request: Request, body: dict[str, Any], group: ModelGroup,
                principal: Principal | None = None, record: CallRecord | None = None) -> Response:
    agents = _agents(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("Invalid value for 'messages': a list is required.", param="messages")
    # the agents' requests are cancelled (their generations aborted) when the client leaves
    replies = await unless_disconnected(request, asyncio.gather(*(_ask(gateway, name, body, principal, record)
                                                                         for name in agents)))
    final = {k: v for k, v in body.items() if k != FIELD} | {"messages": _with_replies(messages, replies)}
    worker = gateway.pick(group)
    raw = json.dumps(final).encode()
    if body.get("stream") is True:
        response = await gateway.forward(worker, "/v1/chat/completions", raw, True, record)
        if not isinstance(response, EventStream):
            return response
        report = {"object": "chat.completion.chunk", "model": group.name, "choices": [], FIELD: replies}

        async def with_report() -> Any:
            try:
                yield f"data: {json.dumps(report)}\n\n".encode()
                async for piece in response.events:
                    yield piece
            finally:
                await response.events.aclose()  # type: ignore[attr-defined]  # releases the worker's stream

        return EventStream(with_report(), status_code=response.status_code, ended_by=gateway.shutdown_notice)
    response = await unless_disconnected(request, gateway.forward(worker, "/v1/chat/completions", raw, False,
                                                                  record))
    if response.status_code != 200:
        return response
    data = json.loads(bytes(response.body))
    data[FIELD] = replies
    return Response(json.dumps(data), media_type="application/json")
