"""``POST /v1/embeddings`` in-process: the kernel's app with the embedding backend and a stand-in chat model,
called over ASGI on one event loop. Request validation, response shape, base64, limits, refusals."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gallama_backend_embedding.backend import EmbeddingBackend
from gallama_kernel.api.app import create_app
from gallama_kernel.config import ModelSpec, build_spec
from gallama_kernel.pipeline.models import ModelRegistry, ServedModel
from gallama_kernel.plugins import create_host
from gallama_kernel.testing import DummyBackend

EMBEDDER = "all-minilm-l6-v2"


class EchoChat(DummyBackend):
    """A chat backend that answers "ok": enough to show which endpoints a chat model may use."""

    name = "echo"
    reply = "ok"

    @property
    def context_length(self) -> int:
        return 100_000


@pytest.fixture(scope="module")
def api(loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """``api(method, path, json)`` → httpx response, served by the kernel app in this process."""
    embedder = EmbeddingBackend(build_spec({"model_id": EMBEDDER}, {}, "test"))
    embedder.load()
    registry = ModelRegistry()
    registry.add(ServedModel(EMBEDDER, embedder, aliases=["minilm"]))
    registry.add(ServedModel("chat", EchoChat(ModelSpec(model_id="chat"))))
    app = create_app(registry, create_host(allow="embedding"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    def call(path: str, body: Any) -> httpx.Response:
        return loop.run_until_complete(client.post(path, json=body))

    yield call
    loop.run_until_complete(client.aclose())
    registry.close()


def embeddings(api: Any, **body: Any) -> httpx.Response:
    return api("/v1/embeddings", {"model": EMBEDDER, **body})


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_one_text(api: Any) -> None:
    response = embeddings(api, input="hello world", user="someone")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == EMBEDDER
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert math.sqrt(sum(v * v for v in item["embedding"])) == pytest.approx(1.0, abs=1e-5)


def test_a_list_keeps_its_order_and_an_alias_works(api: Any) -> None:
    texts = ["hello world", "a cat on a mat", "hello world"]
    body = api("/v1/embeddings", {"model": "minilm", "input": texts}).json()
    assert body["model"] == EMBEDDER
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    first, second, third = (item["embedding"] for item in body["data"])
    assert first == pytest.approx(third, abs=1e-6) and first != pytest.approx(second, abs=1e-3)
    assert body["usage"]["prompt_tokens"] == 4 + 7 + 4


def test_base64_is_little_endian_float32_of_the_same_vector(api: Any) -> None:
    floats = embeddings(api, input="a cat on a mat", encoding_format="float").json()["data"][0]["embedding"]
    packed = embeddings(api, input="a cat on a mat", encoding_format="base64").json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert len(raw) == 384 * 4
    assert list(struct.unpack("<384f", raw)) == pytest.approx(floats, abs=1e-6)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "empty list"),
    ({"input": ["fine", ""]}, "input.1", "item 1"),
    ({"input": [1, 2, 3]}, "input", "Token-id input"),
    ({"input": [[1, 2], [3]]}, "input", "Token-id input"),
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "x", "dimensions": 128}, "dimensions", "cannot produce embeddings of 128"),
    ({"input": "x", "stream": True}, "stream", "Unrecognized request argument"),
    ({"input": "x", "artifact": True}, "artifact", "needs the plugin package"),
    ({"input": "word " * 300}, "input", "maximum context length is 256 tokens, but the input has 302"),
    ({"input": ["short", "word " * 300]}, "input", "input item 1 has 302 tokens"),
])
def test_bad_requests_are_400_naming_the_field(api: Any, body: dict[str, Any], param: str, words: str) -> None:
    error = error_of(embeddings(api, **body))
    assert error["param"] == param
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_the_full_size_is_an_accepted_dimensions(api: Any) -> None:
    assert len(embeddings(api, input="x", dimensions=384).json()["data"][0]["embedding"]) == 384


def test_a_missing_model_is_404(api: Any) -> None:
    response = api("/v1/embeddings", {"model": "nope", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_embeddings_from_a_chat_model_are_refused(api: Any) -> None:
    error = error_of(api("/v1/embeddings", {"model": "chat", "input": "x"}))
    assert error["param"] == "model" and "'chat' does not serve embeddings" in error["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/v1/completions", {"prompt": "hi"}),
])
def test_chat_with_an_embedding_model_is_refused(api: Any, path: str, body: dict[str, Any]) -> None:
    error = error_of(api(path, {"model": EMBEDDER, **body}))
    assert error["param"] == "model" and error["code"] == "model_not_supported"
    assert f"'{EMBEDDER}' serves embeddings only" in error["message"] and path in error["message"]


def test_the_chat_model_still_chats(api: Any) -> None:
    response = api("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "ok"
