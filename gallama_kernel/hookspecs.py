"""Every extension point of gallama.

A plugin implements any of these with ``@gallama_kernel.hookimpl``. Hooks are called once per process
(``register_*``) or once per request (``prepare_request``, ``response_transformers``) — never per token.

Cost rules: a per-request hook runs on a preparation thread before the first token, inside the request's
preparation budget, so it must not block on I/O or do work that grows with anything but the request itself; what
runs per token is the transformer objects ``response_transformers`` returns, and their ``feed`` must stay cheap
(no parsing of the whole text so far on every delta). Registration hooks run once per process at start.

Order, the same for every hook: pluggy's. Implementations marked ``tryfirst=True`` run first and
``trylast=True`` last; among the rest, the plugin registered last runs first (entry-point plugins register in the
order Python's package metadata lists them, so a plugin that must come before or after another says so with
``tryfirst`` / ``trylast``). Each ``prepare_request`` sees the plan as the implementations before it left it;
transformers are fed in the order they are returned, the first implementation's first. ``wrapper=True`` is
honoured on the per-request hooks and refused on the registration hooks (the plugin is then not loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

from . import PROJECT_NAME

if TYPE_CHECKING:
    import click
    from fastapi import FastAPI

    from .backend import Backend
    from .pipeline.plan import RequestPlan, ResponseTransformer
    from .protocol.openai import ChatCompletionRequest

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

SCOPE_KEY = "x-gallama-scope"
ADMIN_SCOPE: dict[str, Any] = {SCOPE_KEY: "admin"}
"""``openapi_extra`` of a plugin route that only admin keys may call (``register_routes``)."""
ERROR_FORMAT_KEY = "x-gallama-error-format"


def error_format(name: str) -> dict[str, Any]:
    """``openapi_extra`` of a route whose errors leave in the format ``name`` (``register_error_formats``);
    merge it with :data:`ADMIN_SCOPE` when both apply: ``{**ADMIN_SCOPE, **error_format("x")}``."""
    return {ERROR_FORMAT_KEY: name}


@hookspec
def register_backends(register: Callable[[str, type[Backend]], None]) -> None:
    """Register inference backends.

    :param register: call ``register(name, BackendClass)``; ``name`` is what ``backend=`` selects in a model's
        configuration (``llama_cpp``, ``exllama``, ``embedding``). A name registered twice is an error.
    """


@hookspec
def register_request_fields(register: Callable[[str, Any, str], None]) -> None:
    """Declare extension fields that requests may carry (``artifact``, ``thinking_template`` …).

    :param register: call ``register(field_name, python_type, description)``. Requests with fields that no
        plugin declared and that are not part of the OpenAI protocol are refused with a 400 naming the field.
        Declared fields are validated against ``python_type`` and reach ``prepare_request`` in
        ``request.extensions``. They belong to chat requests: on ``/v1/completions`` and ``/v1/embeddings``,
        which run no plugin hooks, they are refused with a 400 rather than accepted without effect.
    """


@hookspec
def prepare_request(request: ChatCompletionRequest, plan: RequestPlan) -> None:
    """Shape how one chat request is served, once per request, before the prompt is rendered.

    :param request: the validated request (read it; plugin fields are in ``request.extensions``).
    :param plan: the mutable plan: ``plan.messages`` (edit or add system prompts), ``plan.leading_prompt``
        (text placed at the start of the assistant turn, not returned), ``plan.stop`` (stop strings),
        ``plan.constraint`` (the output constraint from the request fields; replace it, for example with
        ``Constraint.custom``), ``plan.constraint_after`` (free text up to this marker comes first),
        ``plan.passes`` (generations that run before the answer, such as hidden thinking).
        Raise ``gallama_kernel.protocol.errors.InvalidRequest`` to refuse the request with a 400.
    """


@hookspec
def response_transformers(request: ChatCompletionRequest, plan: RequestPlan) -> list[ResponseTransformer] | None:
    """Return transformer objects for one request, or ``None``.

    :param request: the validated request.
    :param plan: the request's plan after every ``prepare_request`` (read it; ``plan.state`` holds values
        plugins left for themselves). An implementation may omit this parameter.
    :return: objects with ``feed(delta) -> list[Delta]`` and ``finish() -> list[Delta]`` (optionally
        ``annotate(delta) -> Delta`` for the chunks the kernel sends itself); they reshape the delta stream
        (artifact metadata, rewritten text). A delta with ``SEGMENT: True`` opens a new choice in a non-streamed
        response. Called once per request; the transformers themselves run per delta, pluggy is not involved
        per token.
    """


@hookspec
def register_routes(app: FastAPI) -> None:
    """Add HTTP endpoints to the server. Called once per process.

    The routes are served by the worker processes (each calls this hook on the app that serves its models) and
    reached on the gateway's address: the gateway calls it too, once per plugin on a blank app, only to learn the
    routes and their OpenAPI operations, and relays each request to a worker, the one serving the model the JSON
    body (or the ``model`` query parameter) names, else the first ready one. Bodies must be JSON. An inference
    key is needed once keys exist; ``openapi_extra=ADMIN_SCOPE`` asks for an admin key. A path and method the
    gateway already serves is not relayed (recorded as this plugin's error). In a worker,
    ``served_backend(request.app, name)`` gives the backend serving a model.

    :param app: the FastAPI application, before it starts serving. Use ``app.include_router`` or decorators
        (HTTP routes only: the gateway relays no mounted application or websocket).
    """


@hookspec
def register_error_formats(register: Callable[[str, Callable[[int, dict[str, Any]], dict[str, Any]]], None]) -> None:
    """Declare error formats: the shape errors take on the routes of another protocol. Called once per process.

    :param register: call ``register(name, render)``; ``render(status, body)`` gets the HTTP status and the
        error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``) and returns the body to
        send instead. A route opts in with ``openapi_extra=error_format(name)``; every error of that route then
        leaves in that shape, the gateway's own (401, 403, 404, 413, 415, 429, 503) included. ``render`` must not
        raise; a name registered twice is an error.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``gallama`` command line.

    :param cli: the top-level click group; call ``cli.add_command(command)``.
    """


@hookspec
def register_models(register: Callable[[str, dict[str, Any]], None]) -> None:
    """Add models to the catalog that ``gallama download`` and ``gallama list available`` use.

    :param register: call ``register(name, entry)``; ``entry`` has the format of ``gallama_kernel/catalog.yaml``
        (``kind``, ``description``, ``default_quant``, ``backends: {backend: {repo, revision, quants: {"4.0":
        {revision | repo | file}}}}``). ``name`` becomes a folder under ``GALLAMA_HOME_PATH/models`` and a
        ``model_config.yaml`` entry, so it must be a plain name; a malformed entry or a name already in the catalog
        is an error recorded against the plugin.
    """
