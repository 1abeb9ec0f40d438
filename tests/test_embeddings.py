"""``/v1/embeddings`` end to end: a chat model and the embedded embedding model (all-MiniLM-L6-v2) behind one
gateway, each in its worker process, called with the official openai client."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest
from conftest import RunningServer
from openai import OpenAI

EMBEDDER = "all-minilm-l6-v2"
CHAT = "smollm2"
CAT = "A cat is sleeping on the warm windowsill."
CAT_PARAPHRASE = "On the sunny window ledge, a kitten naps."
UNRELATED = "Quarterly tax filings are due at the end of the month."


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory):
    server = RunningServer(tmp_path_factory.mktemp("embeddings"), "-id", f"model_id={CHAT} max_concurrent_requests=2",
                           "-id", f"model_id={EMBEDDER}")
    yield server
    server.stop()


@pytest.fixture()
def client(both: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{both.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def healthy(server: RunningServer) -> None:
    state = server.health()
    assert state["status"] == "ok", state
    assert state["models"][EMBEDDER]["context_length"] == 256


def test_both_models_are_served(client: OpenAI, both: RunningServer) -> None:
    assert {m.id for m in client.models.list().data} == {CHAT, EMBEDDER}
    healthy(both)


def test_one_text(client: OpenAI) -> None:
    reply = client.embeddings.create(model=EMBEDDER, input=CAT)  # the client asks for base64 and decodes it
    assert reply.model == EMBEDDER and reply.object == "list"
    [item] = reply.data
    assert item.index == 0 and item.object == "embedding" and len(item.embedding) == 384
    assert math.sqrt(sum(v * v for v in item.embedding)) == pytest.approx(1.0, abs=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 2


def test_similarity_through_a_list(client: OpenAI) -> None:
    reply = client.embeddings.create(model=EMBEDDER, input=[CAT, CAT, CAT_PARAPHRASE, UNRELATED],
                                     encoding_format="float")
    cat, again, paraphrase, unrelated = (item.embedding for item in sorted(reply.data, key=lambda d: d.index))
    assert cosine(cat, again) == pytest.approx(1.0, abs=1e-5)
    assert cosine(cat, unrelated) < 0.5
    assert cosine(cat, paraphrase) > cosine(cat, unrelated) + 0.2


def test_base64_equals_float(both: RunningServer, client: OpenAI) -> None:
    body = {"model": EMBEDDER, "input": [CAT, UNRELATED]}
    floats = httpx.post(f"{both.base_url}/v1/embeddings", json=body, timeout=60).json()["data"]
    packed = httpx.post(f"{both.base_url}/v1/embeddings", json={**body, "encoding_format": "base64"},
                        timeout=60).json()["data"]
    for as_float, as_base64 in zip(floats, packed, strict=True):
        raw = base64.b64decode(as_base64["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(as_float["embedding"], abs=1e-6)
    decoded = client.embeddings.create(model=EMBEDDER, input=CAT).data[0].embedding
    assert decoded == pytest.approx(floats[0]["embedding"], abs=1e-6)


def test_dimensions_the_model_cannot_produce_is_400(client: OpenAI, both: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDER, input=CAT, dimensions=128)
    assert caught.value.body["param"] == "dimensions"
    healthy(both)


def test_chat_with_the_embedding_model_is_400(client: OpenAI, both: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert caught.value.body["param"] == "model"
    assert f"'{EMBEDDER}' serves embeddings only" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBEDDER, prompt="hi", max_tokens=4)
    healthy(both)


def test_embeddings_from_the_chat_model_is_400(client: OpenAI, both: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=CHAT, input=CAT)
    assert caught.value.body["param"] == "model"
    assert f"'{CHAT}' does not serve embeddings" in caught.value.body["message"]
    healthy(both)


@pytest.mark.parametrize("body", [{"input": ""}, {"input": []}, {"input": ["ok", ""]}, {"input": ["x"] * 2049},
                                  {"input": [1, 2]}, {"input": "x", "nonsense": 1}, {"input": "word " * 300}])
def test_bad_input_is_400_and_the_server_stays_healthy(both: RunningServer, body: dict) -> None:
    response = httpx.post(f"{both.base_url}/v1/embeddings", json={"model": EMBEDDER, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(("input", "nonsense"))
    healthy(both)


def test_the_chat_model_still_chats(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
