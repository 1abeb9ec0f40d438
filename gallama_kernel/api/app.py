"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .. import __version__
from ..pipeline.chat import ChatPipeline
from ..pipeline.models import ModelRegistry
from ..pipeline.service import ChatService
from ..plugins import PluginHost
from .errors import install_error_handlers
from .openai_routes import build_router


def create_app(registry: ModelRegistry, host: PluginHost) -> FastAPI:
    """An app serving ``registry``'s models, with plugin routes added; closing it closes the models."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        registry.close()

    app = FastAPI(title="gallama", version=__version__, lifespan=lifespan)
    app.state.registry = registry
    app.state.plugins = host
    install_error_handlers(app, host.error_formats)
    service = ChatService(registry, host)
    app.state.chat_pipeline = ChatPipeline(service)  # for protocol plugins' routes (pipeline/chat.py)
    app.include_router(build_router(service, host))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        models = {m.name: m.backend.health() for m in registry.all()}
        ok = all(state.get("status") == "ok" for state in models.values())
        return {"status": "ok" if ok else "degraded", "models": models}

    host.call_each("register_routes", app=app)
    return app
