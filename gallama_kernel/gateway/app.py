"""The gateway: one address for every model. Routes each request by its ``model`` to a worker process,
proxies streams chunk by chunk as they arrive, and manages models at run time.

Endpoints besides the OpenAI ones: ``POST /add_model`` (one spec or a list; ``?wait=true`` answers once
loaded), ``POST /remove_model`` (drains in-flight requests first), ``GET /list_loaded_models`` (state of
every model and replica). Keys, quotas, request ids and the request log: see access.py. ``/health`` is 503 while
no model can serve or one has failed (``/health/live``: 200 while the process runs); ``/v1/models`` lists the
models that can serve now. Each replica takes at most its slots plus ``max_queue`` requests; beyond, a 429 with
``Retry-After``. Which replica serves a request: affinity.py (the one holding its prefix or session, while it has a
free slot), keyed from the body parsed here and the ``x-session-id`` header.

Hostile input (limits in protocol/limits.py): every POST takes only ``application/json`` (else 415: a web page
cannot post ``text/plain`` or a form cross-site to a local gateway); bodies are bounded while they arrive
(``GALLAMA_MAX_BODY_BYTES``: 413; ``GALLAMA_BODY_TIMEOUT_S``: 408) and their JSON nesting before parsing (400); a
lone-surrogate ``\\u`` escape is a 400. ``/add_model`` refuses names that are not plain (or ``org/name``) and model
paths the in-tree backend cannot load (a device, FIFO, folder or non-GGUF file for llama_cpp) before a worker
starts. ``/health`` needs no key, so it shows no pids or ports. On shutdown, open streams end with an error event.

Plugin routes (``register_routes``) are relayed to workers, and plugin request fields documented: plugin_routes.py.
The chat web page (``GET /ui``, ``GET /`` redirecting there) is served here, from package data: webui/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware

from .. import __version__, webui
from ..api.documents import BODY_MODELS, body_schema
from ..api.errors import install_error_handlers, render_error
from ..api.http_input import (
    INLINE_PARSE_BYTES,
    check_content_type,
    parse_json,
    read_body,
    read_json,
    unless_disconnected,
)
from ..api.streaming import EventStream
from ..config import ConfigError, ModelSpec, build_spec, check_model_path, check_served_name, load_model_config
from ..keys import KeyStore
from ..pipeline.chat import CALLER_HEADER, USAGE_HEADER
from ..plugins import PluginHost
from ..protocol.errors import APIError, InvalidRequest, ServiceUnavailable, TooManyRequests, error_body
from . import affinity, mixture, plugin_routes
from .access import REQUEST_ID_HEADER, Access, CallRecord, RequestLog, printable, record_of
from .metrics import CONTENT_TYPE, Metrics
from .pool import Pool, Worker
from .upstream import UpstreamClient, UpstreamError, UpstreamResponse

log = logging.getLogger("gallama.gateway")

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_QUEUE = 64
"""Requests a replica may hold beyond its slots (waiting for one); more: 429 (``GALLAMA_MAX_QUEUE``)."""
USAGE_COMMENT = b": usage "
"""A worker ends each stream with this SSE comment and the request's usage as JSON, for the gateway's quotas,
metrics and log; the gateway does not relay it."""
GATEWAY_KEEP_ALIVE_S = 30.0
WORKER_HEALTH_TIMEOUT_S = 5.0
STREAM_SHUTDOWN_GRACE_S = 2.0
"""On shutdown, open streams get this long to finish; then they end with an error event (uvicorn's graceful
shutdown, ``timeout_graceful_shutdown`` in cli.py, must be longer)."""
SHUTTING_DOWN = error_body("The server is shutting down; the stream was ended early.", "server_error",
                           code="server_shutting_down")


class LoadFailed(APIError):
    """A model in ``/add_model?wait=true`` did not load: the backend refused the spec (or could not load it)."""

    status = 422
    type = "invalid_request_error"


class Gateway:
    """The pool plus the HTTP clients that talk to its workers."""

    def __init__(self, pool: Pool, home: Any, access: Access | None = None, max_queue: int = MAX_QUEUE,
                 host: PluginHost | None = None) -> None:
        self.pool = pool
        self.backends = host.backends if host is not None else None  # specs are checked against their declarations
        self.home = home
        self.access = access if access is not None else Access(KeyStore(home, None, None))
        self.max_queue = max_queue
        self.metrics = Metrics()
        # proxied requests and health checks (see upstream.py). Idle connections to workers are dropped by this
        # side first (workers keep them WORKER_KEEP_ALIVE_S): never a request written into a connection the worker
        # is closing
        self.upstream = UpstreamClient(GATEWAY_KEEP_ALIVE_S, pool.worker_secret)
        self.stopping: asyncio.Event | None = None

    def begin_shutdown(self) -> None:
        """The server stops: open streams end (after :data:`STREAM_SHUTDOWN_GRACE_S`) with an error event.
        Call on the event loop."""
        if self.stopping is None:
            self.stopping = asyncio.Event()
        self.stopping.set()

    async def shutdown_notice(self) -> bytes:
        """Wait for :meth:`begin_shutdown` and the grace period; the bytes that end a relayed stream then."""
        if self.stopping is None:
            self.stopping = asyncio.Event()
        await self.stopping.wait()
        await asyncio.sleep(STREAM_SHUTDOWN_GRACE_S)
        return f"\n\ndata: {json.dumps(SHUTTING_DOWN)}\n\ndata: [DONE]\n\n".encode()

    def authorize(self, request: Request, scope: str) -> Any:
        """The key of ``request`` if it may act in ``scope`` (401/403 otherwise; ``None`` when no key is
        configured), named in the request's log record."""
        principal = self.access.authorize(request.headers, scope)
        record = record_of(request.scope)
        if record is not None and principal is not None:
            record.key_id = principal.key_id
        return principal

    def check_admin(self, request: Request) -> None:
        """401/403 unless the request carries an admin key (when any key is configured)."""
        self.authorize(request, "admin")

    def pick(self, group: Any, key: affinity.Key | None = None) -> Worker:
        """The replica for the next request of ``group`` (with routing ``key``: see affinity.py); 429 when every
        replica's slots and queue are full."""
        worker = self.pool.pick(group, key)
        if worker.slots and worker.outstanding >= worker.slots + self.max_queue:
            raise TooManyRequests(f"The model '{group.name}' is busy: {worker.outstanding} requests are running or "
                                  f"waiting on each replica (limit {worker.slots} running + {self.max_queue} "
                                  "waiting). Retry shortly.", code="queue_full", headers={"Retry-After": "1"})
        return worker

    def route_key(self, path: str, request: Request, body: Any) -> affinity.Key | None:
        """The routing key of a request to ``path`` (``None`` when routing is by load only)."""
        if self.pool.routing != affinity.AFFINITY:
            return None
        return affinity.request_key(path, request.headers, body)

    def on_head(self, group: Any, worker: Worker, key: affinity.Key | None) -> Callable[[bytes], bool] | None:
        """What reads the start of the answer: a ``/v1/responses`` answer's id is filed under ``worker`` (true once
        found)."""
        if key is None or not key.answers_response:
            return None
        return lambda head: group.router.learn_answer(worker.replica, head)

    def specs_from(self, body: Any) -> list[ModelSpec]:
        """Validate ``/add_model`` bodies: one spec object or a list of them (keys as in ``-id``)."""
        items = body if isinstance(body, list) else [body]
        if not items or not all(isinstance(item, dict) for item in items):
            raise InvalidRequest("Send a model spec object or a list of them.")
        config = load_model_config(self.home)
        specs = []
        for index, item in enumerate(items):
            try:
                spec = build_spec(item, config, f"model {index}", self.backends)
            except (ConfigError, ValidationError) as error:
                raise InvalidRequest(str(error), param="model_id") from None
            specs.append(checked_spec(spec, f"model {index}"))
        return specs

    # -- proxying ------------------------------------------------------------------------------------------
    def forward(self, worker: Worker, path: str, body: bytes, stream: bool,
                record: CallRecord | None = None, method: str = "POST",
                headers: dict[str, str] | None = None,
                on_head: Callable[[bytes], bool] | None = None) -> asyncio.Task[Response]:
        """Send ``body`` to ``worker`` (``path`` may carry a query string); the response (SSE included) goes back
        as it arrives. Its usage is added to ``record``; ``on_head`` reads the start of a successful answer (a
        JSON body's first bytes; a stream's first pieces, until it returns true).

        The request counts among the worker's outstanding ones from this call on, not from when the returned task
        first runs: the next request picked in the same turn of the event loop must see it (affinity.py sends a
        request to its replica only below its slots); a task cancelled before it ran gives its count back."""
        worker.outstanding += 1
        started = released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                worker.outstanding -= 1

        def begin() -> None:
            nonlocal started
            started = True

        task = asyncio.ensure_future(self._forward(worker, path, body, record, method, headers, on_head, begin,
                                                   release))
        task.add_done_callback(lambda _: None if started else release())
        return task

    async def _forward(self, worker: Worker, path: str, body: bytes, record: CallRecord | None, method: str,
                       headers: dict[str, str] | None, on_head: Callable[[bytes], bool] | None,
                       begin: Callable[[], None], release: Callable[[], None]) -> Response:
        begin()
        try:
            sent = {**({REQUEST_ID_HEADER: record.request_id} if record is not None else {}), **(headers or {})}
            upstream = await self.upstream.request(method, "127.0.0.1", worker.port or 0, path, body,
                                                   headers=sent or None)
        except UpstreamError as error:
            release()
            raise ServiceUnavailable(f"The model '{worker.spec.name}' is unavailable ({error}); it is being "
                                     "restarted.", code="worker_unavailable") from None
        except BaseException:
            release()
            raise
        content_type = upstream.headers.get("content-type", "application/json")
        if not content_type.startswith("text/event-stream"):
            try:
                data = await upstream.read()
            except UpstreamError:
                raise ServiceUnavailable(f"The worker serving '{worker.spec.name}' failed during the request.",
                                         code="worker_failed") from None
            finally:
                upstream.close()
                release()
            if on_head is not None and upstream.status == 200:
                on_head(data[:affinity.RESPONSE_HEAD_BYTES])
            if record is not None and upstream.status == 200:
                reported = upstream.headers.get(USAGE_HEADER)  # a protocol plugin's report (pipeline/chat.py)
                with contextlib.suppress(ValueError, AttributeError):
                    record.count(json.loads(reported) if reported else json.loads(data).get("usage"))
            return Response(data, status_code=upstream.status, media_type=content_type)

        head = on_head if upstream.status == 200 else None
        heads = 4  # pieces read for it at most

        async def relay() -> AsyncIterator[bytes]:
            nonlocal head, heads
            try:
                async for piece in upstream.pieces():
                    if head is not None:
                        heads -= 1
                        if head(piece[:affinity.RESPONSE_HEAD_BYTES]) or not heads:
                            head = None
                    if piece.startswith(USAGE_COMMENT):  # the worker's report for this side only
                        if record is not None:
                            with contextlib.suppress(ValueError):
                                record.count(json.loads(piece[len(USAGE_COMMENT):]))
                        continue
                    if record is not None and piece.startswith(b"data: {") and not _opening_chunk(piece):
                        record.chunk()
                    yield piece
            except UpstreamError as error:
                log.warning("the worker serving %s failed during a stream: %s", worker.spec.name, error)
                failure = error_body(f"The worker serving '{worker.spec.name}' failed during the stream; it is "
                                     "being restarted.", "server_error", code="worker_failed")
                yield f"\n\ndata: {json.dumps(failure)}\n\ndata: [DONE]\n\n".encode()
            finally:
                upstream.close()  # unless read to the end; on client disconnect: the worker cancels the generation
                release()

        return EventStream(relay(), status_code=upstream.status, ended_by=self.shutdown_notice)

    async def close(self) -> None:
        self.upstream.close()
        await self.pool.close()


def _opening_chunk(piece: bytes) -> bool:
    """A chat stream's first chunk (the role, no text yet): it goes out before generation starts."""
    return b'"role":"assistant","content":""' in piece and b'"finish_reason":null' in piece


def checked_spec(spec: ModelSpec, source: str) -> ModelSpec:
    """``spec`` if its served name is plain (:func:`check_served_name`) and its model path is one its backend can
    load (:func:`check_model_path`: a FIFO or device never reaches a worker); else :class:`InvalidRequest`."""
    try:
        for name in (spec.name, *spec.aliases):
            check_served_name(name, f"{source}: model name")
        check_model_path(spec.model_path or spec.model_id, spec.backend)
    except ConfigError as error:
        raise InvalidRequest(str(error), param="model_id", code="invalid_model") from None
    return spec


def create_gateway(pool: Pool, home: Any, access: Access | None = None, initial: list[ModelSpec] | None = None,
                   on_ready: Callable[[list[Any]], None] | None = None, max_queue: int = MAX_QUEUE,
                   cors_origins: list[str] | None = None, host: PluginHost | None = None) -> FastAPI:
    """The gateway app; ``initial`` models are loaded before it accepts connections (a failure aborts start), then
    ``on_ready`` gets their groups. ``access``: keys and quotas (default: the key file under ``home`` only).
    ``cors_origins``: the origins whose pages may call it (preflights answered, headers set); none by default.
    ``host``: the plugins the workers load (the same selection): their request fields are documented and their
    routes relayed (see plugin_routes.py)."""
    gateway = Gateway(pool, home, access, max_queue, host)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if initial:
            try:
                for index, spec in enumerate(initial):
                    checked_spec(spec, f"-id {index + 1}")
            except InvalidRequest as error:
                await gateway.close()
                raise RuntimeError(error.message) from None
            groups = pool.add(initial)
            await pool.wait_loaded(groups)
            failed = [f"{g.name}: {w.error}" for g in groups for w in g.workers if w.state == "failed"]
            if failed:
                await gateway.close()
                raise RuntimeError("could not load " + "; ".join(failed))
            if on_ready is not None:
                on_ready(groups)
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="gallama", version=__version__, lifespan=lifespan)
    app.state.gateway = gateway
    install_error_handlers(app)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key", REQUEST_ID_HEADER,
                                          "anthropic-version", "openai-organization", "openai-project"],
                           expose_headers=[REQUEST_ID_HEADER, "retry-after"], max_age=600)
    # outermost: every request has an id, a log line and its metrics, preflights too
    app.add_middleware(RequestLog, observers=[gateway.metrics.observe])

    async def route(request: Request, path: str) -> Response:
        principal = gateway.authorize(request, "inference")  # before the body is read
        record = record_of(request.scope)
        check_content_type(request)
        raw = await read_body(request)
        # a large body is parsed in a thread: other clients' streams keep flowing through this loop meanwhile
        body = parse_json(raw) if len(raw) <= INLINE_PARSE_BYTES else await asyncio.to_thread(parse_json, raw)
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        name = body.get("model")
        if not isinstance(name, str):
            raise InvalidRequest("Invalid value for 'model': a model name is required.", param="model")
        group = pool.get(name)
        gateway.access.check_model(principal, [group.name, *group.aliases], name)
        if record is not None:
            record.model = printable(group.name)
        gateway.access.admit(principal, record)
        stream = body.get("stream") is True
        if path == "/v1/chat/completions" and "mixture_of_agents" in body:
            return await mixture.serve(gateway, request, body, group, principal, record)
        worker = gateway.pick(group, gateway.route_key(path, request, body))
        if stream:
            return await gateway.forward(worker, path, raw, stream, record)
        return await unless_disconnected(request, gateway.forward(worker, path, raw, stream, record))

    def endpoint(path: str) -> Any:
        async def proxied(request: Request) -> Response:
            return await route(request, path)

        return proxied

    for path in PROXIED:  # documented with the workers' request schemas, plugin fields included
        app.add_api_route(path, endpoint(path), methods=["POST"], name=path.strip("/").replace("/", "_"),
                          openapi_extra=body_schema(BODY_MODELS[path], host))

    def card(group: Any) -> dict[str, Any]:
        return {"id": group.name, "object": "model", "created": group.created, "owned_by": "gallama",
                "aliases": group.aliases, "backend": group.spec.backend, "state": group.state,
                "replicas": len(group.workers)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The models that can serve now (a ready replica), and that the caller's key may use."""
        principal = gateway.authorize(request, "inference")
        return {"object": "list", "data": [card(g) for g in pool.all() if g.state == "ready"
                                           and gateway.access.visible(principal, [g.name, *g.aliases])]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        principal = gateway.authorize(request, "inference")
        group = pool.get(model)
        gateway.access.check_model(principal, [group.name, *group.aliases], model)
        return card(group)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Readiness: 200 when every model (but those being removed) has a ready replica and no replica has
        failed; else 503, with the same body saying which."""
        models: dict[str, Any] = {}
        for group in pool.all():
            replicas = await asyncio.gather(*(_worker_health(gateway, w) for w in group.workers))
            models[group.name] = {**_merge_health(group.state, replicas), "routing": pool.routing}
        ok = all(m["status"] == "ok" for m in models.values())
        kept = [m for m in models.values() if m["status"] != "removing"]
        failed = any(r.get("status") in ("failed", "unreachable") for m in kept for r in m["replicas"])
        ready = bool(kept) and all(m["status"] == "ok" for m in kept) and not failed
        return JSONResponse({"status": "ok" if ok else "degraded", "models": models},
                            status_code=200 if ready else 503)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """Liveness: 200 while the gateway process answers."""
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of the gateway and its workers (admin scope once keys exist)."""
        gateway.check_admin(request)
        replicas = []
        for group in pool.all():
            healths = await asyncio.gather(*(_worker_health(gateway, w) for w in group.workers))
            replicas += [(group.name, w.replica, w.state, w.restarts, h) for w, h in zip(group.workers, healths,
                                                                                      strict=True)]
        return Response(gateway.metrics.render(replicas), media_type=CONTENT_TYPE)

    @app.get("/list_loaded_models")
    async def list_loaded(request: Request) -> dict[str, Any]:
        gateway.check_admin(request)
        return {"models": [g.describe() for g in pool.all()]}

    @app.post("/add_model")
    async def add_model(request: Request, wait: bool = False) -> JSONResponse:
        gateway.check_admin(request)
        specs = gateway.specs_from(await read_json(request))
        groups = pool.add(specs)
        if not wait:
            return JSONResponse({"models": [g.describe() for g in groups]}, status_code=202)
        await pool.wait_loaded(groups)
        failed = [f"{g.name}: {w.error or 'failed'}" for g in groups for w in g.workers if w.state == "failed"]
        if failed:  # the backend refused the spec at load (gpus on a CPU build, say): the spec is what to change
            raise LoadFailed("Could not load " + "; ".join(failed) + " (listed as failed until /remove_model)",
                             param="model_id", code="model_load_failed")
        return JSONResponse({"models": [g.describe() for g in groups]})

    @app.post("/remove_model")
    async def remove_model(request: Request) -> dict[str, Any]:
        gateway.check_admin(request)
        body = await read_json(request)
        names = body.get("model_name") if isinstance(body, dict) else None
        names = [names] if isinstance(names, str) else names
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidRequest("Give 'model_name': a name or a list of names.", param="model_name")
        for name in names:
            pool.get(name)  # 404 before anything is removed
        removed = await asyncio.gather(*(pool.remove(n) for n in names))
        return {"removed": [g.name for g in removed]}

    if host is not None:
        _relay_plugin_routes(app, gateway, host)
    webui.install(app)  # after the plugins' routes: a path a plugin serves stays theirs
    return app


def check_plugin_routes(host: PluginHost, home: Any) -> None:
    """Learn the plugins' routes as ``gallama run``'s gateway would (nothing is served): a route it would not relay
    is recorded against its plugin, for ``gallama plugins``."""
    create_gateway(Pool({}), home, host=host)


def _relay_plugin_routes(app: FastAPI, gateway: Gateway, host: PluginHost) -> None:
    """Add the plugins' routes to ``app``, each relayed to a worker, and their operations to its OpenAPI
    document (see plugin_routes.py for the rule)."""
    taken = {(route.path, method) for route in app.routes if isinstance(route, APIRoute)
             for method in route.methods or ()}
    taken |= {("/openapi.json", "GET"), ("/docs", "GET"), ("/redoc", "GET"), ("/docs/oauth2-redirect", "GET")}
    found = plugin_routes.discover(host, taken)

    def relay(route: plugin_routes.PluginRoute) -> Any:
        async def relayed(request: Request) -> Response:
            try:
                return await serve(request)
            except APIError as error:  # in the route's own error format (the app's handlers answer OpenAI's)
                rendered = render_error(host.error_formats, route.error_format, error.status, error.body())
                headers = {**(error.headers or {}), **({"connection": "close"} if error.status in (408, 413)
                                                       else {})}
                return JSONResponse(rendered, status_code=error.status, headers=headers or None)

        async def serve(request: Request) -> Response:
            principal = gateway.authorize(request, route.scope)
            record = record_of(request.scope)
            raw = b""
            body: Any = None
            name = request.query_params.get("model")
            if request.method in plugin_routes.BODY_METHODS:
                check_content_type(request)
                raw = await read_body(request)
                if raw:
                    body = parse_json(raw) if len(raw) <= INLINE_PARSE_BYTES else await asyncio.to_thread(parse_json,
                                                                                                           raw)
                    if isinstance(body, dict) and isinstance(body.get("model"), str):
                        name = body["model"]
            if name is not None:
                group = gateway.pool.get(name)
                gateway.access.check_model(principal, [group.name, *group.aliases], name)
            else:
                group = next((g for g in gateway.pool.all() if g.state == "ready"), None)
                if group is None:
                    raise ServiceUnavailable("No model is ready to serve this route yet.", code="no_model_ready")
            if record is not None:
                record.model = printable(group.name)
            gateway.access.admit(principal, record)
            target = request.scope.get("raw_path") or request.url.path.encode()
            if request.scope.get("query_string"):
                target += b"?" + request.scope["query_string"]
            key = gateway.route_key(request.url.path, request, body) if request.method == "POST" else None
            worker = gateway.pick(group, key)
            caller = {CALLER_HEADER: principal.key_id if principal is not None else ""}
            reply = gateway.forward(worker, target.decode("latin-1"), raw, False, record, method=request.method,
                                    headers=caller, on_head=gateway.on_head(group, worker, key))
            return await unless_disconnected(request, reply)

        return relayed

    for route in found.routes:
        app.add_api_route(route.path, relay(route), methods=sorted(route.methods), name=f"{route.plugin}:{route.name}",
                          include_in_schema=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in found.paths.items():
                document.setdefault("paths", {}).setdefault(path, {}).update(operations)
            if found.schemas:
                document.setdefault("components", {}).setdefault("schemas", {}).update(found.schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _worker_health(gateway: Gateway, worker: Worker) -> dict[str, Any]:
    # no pid or port: /health needs no key; /list_loaded_models (behind the admin key) has them
    base = {k: v for k, v in worker.describe().items() if k not in ("pid", "port")}
    if worker.state != "ready":
        return {**base, "status": worker.state}
    reply: UpstreamResponse | None = None
    with contextlib.suppress(UpstreamError, TimeoutError, ValueError, AttributeError):
        async with asyncio.timeout(WORKER_HEALTH_TIMEOUT_S):
            reply = await gateway.upstream.get("127.0.0.1", worker.port or 0, "/health")
            models = json.loads(await reply.read()).get("models", {})
        return {**base, **next(iter(models.values()), {"status": "failed"})}
    if reply is not None:
        reply.close()
    return {**base, "status": "unreachable"}


def _merge_health(state: str, replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's health: its state, counters summed over replicas, and the replicas themselves."""
    merged: dict[str, Any] = {"status": "ok" if state == "ready" else state, "replicas": replicas}
    for key in ("slots", "busy", "waiting", "steps", "affinity_hits", "affinity_misses", "affinity_overflows"):
        values = [r[key] for r in replicas if isinstance(r.get(key), int)]
        if values:
            merged[key] = sum(values)
    lengths = {r["context_length"] for r in replicas if "context_length" in r}
    if len(lengths) == 1:
        merged["context_length"] = lengths.pop()
    return merged
