"""The request schemas of the inference routes for OpenAPI documents: the workers' (which serve them) and the
gateway's (which relays them), with the fields plugins declared."""

from __future__ import annotations

from typing import Any

from ..plugins import PluginHost
from ..protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node


def body_schema(model: Any, host: PluginHost | None = None) -> dict[str, Any]:
    """The request schema for the OpenAPI document (the worker's, and the gateway's for the routes it relays),
    with the fields plugins declared (given ``host``)."""
    schema = model.model_json_schema()
    schema = _inline_refs(schema, schema.pop("$defs", {}))
    for field in host.request_fields.values() if host is not None else ():
        schema.setdefault("properties", {})[field.name] = {"description": f"{field.description} ({field.plugin})"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


BODY_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
               "/v1/embeddings": EmbeddingRequest}
"""The request model of each inference route, for documents that describe them without serving them."""
