"""Serving logic of ``/v1/embeddings``, and the check that keeps embedding-only models out of the chat endpoints."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Sequence
from typing import Any

from ..protocol.errors import InvalidRequest
from ..protocol.openai import EmbeddingRequest
from .models import ModelRegistry, ServedModel


def require_chat(model: ServedModel, endpoint: str) -> None:
    """A 400 naming ``model`` when it serves embeddings only (``endpoint`` is the path the client used)."""
    capabilities = model.backend.capabilities
    if not capabilities.chat:
        use = " Use /v1/embeddings with it." if capabilities.embeddings else ""
        raise InvalidRequest(f"The model '{model.name}' serves embeddings only; it cannot be used with "
                             f"{endpoint}.{use}", param="model", code="model_not_supported")


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """The vector as JSON floats, or (``"base64"``) as base64 of little-endian float32 values, like OpenAI."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


async def create_embeddings(registry: ModelRegistry, request: EmbeddingRequest) -> dict[str, Any]:
    """Embed the request's texts with its model and shape OpenAI's response.

    A chat model, a ``dimensions`` the model cannot produce, or a text longer than the model's context is a
    400; texts are never truncated silently. ``usage`` counts the tokens the model read (special tokens
    included).
    """
    model = registry.get(request.model)
    backend = model.backend
    if not backend.capabilities.embeddings:
        raise InvalidRequest(f"The model '{model.name}' does not serve embeddings (it is a chat model); "
                             "use an embedding model with /v1/embeddings.", param="model",
                             code="model_not_supported")
    if request.dimensions is not None and not backend.supports_dimensions(request.dimensions):
        raise InvalidRequest(f"The model '{model.name}' cannot produce embeddings of {request.dimensions} "
                             "dimensions.", param="dimensions")
    texts = request.texts
    counts = await asyncio.to_thread(lambda: [len(backend.tokenize(text)) for text in texts])
    limit = backend.context_length
    for index, count in enumerate(counts):
        if count > limit:
            where = "the input" if isinstance(request.input, str) else f"input item {index}"
            raise InvalidRequest(f"This model's maximum context length is {limit} tokens, but {where} has "
                                 f"{count} tokens.", param="input", code="context_length_exceeded")
    vectors = await backend.embed(texts, dimensions=request.dimensions)
    tokens = sum(counts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": index, "embedding": encode_vector(vector, request.encoding_format)}
                 for index, vector in enumerate(vectors)],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
