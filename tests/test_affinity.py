"""Cache-affine routing through the real ``gallama run`` (two replicas of the embedded SmolLM2, one slot each):
conversations stay on the replica holding their prefix (the worker reports the previous prompt as cached), sessions
are sticky, a saturated replica overflows to the other one, and hostile bodies get the answers they got before."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import RunningServer
from openai import OpenAI

SPEC = "model_id=smollm2 max_concurrent_requests=1 max_seq_len=2048"
SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."}
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]
QUESTIONS = ["Name a fruit.", "Name another one.", "Which of the two is sweeter?", "Why?"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    server = RunningServer(tmp_path_factory.mktemp("affinity"), "-id", SPEC, "-id", SPEC)
    yield server
    server.stop()


def client_for(server: RunningServer, **headers: str) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120,
                  default_headers=headers or None)


def counters(server: RunningServer) -> list[dict[str, int]]:
    """Per replica: its affinity counters and restarts, from /health."""
    keys = ("affinity_hits", "affinity_misses", "affinity_overflows", "restarts")
    return [{k: r[k] for k in keys} for r in server.health()["models"]["smollm2"]["replicas"]]


def delta(before: list[dict[str, int]], after: list[dict[str, int]], key: str) -> list[int]:
    return [b[key] - a[key] for a, b in zip(before, after, strict=True)]


def test_interleaved_conversations_keep_their_replica_and_their_cache(pair):
    client = client_for(pair)
    before = counters(pair)
    histories = {name: [SYSTEM] for name in ("apples", "planets")}
    previous: dict[str, int] = {}
    for turn, question in enumerate(QUESTIONS):
        for name, history in histories.items():
            history.append({"role": "user", "content": f"About {name}: {question}"})
            reply = client.chat.completions.create(model="smollm2", messages=history, max_tokens=12, temperature=0)
            usage = reply.usage
            assert usage is not None
            if turn:
                cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
                assert cached >= previous[name], f"{name} turn {turn + 1}: {cached} cached of {previous[name]}"
            previous[name] = usage.prompt_tokens
            history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    after = counters(pair)
    turns = len(QUESTIONS)
    assert sorted(delta(before, after, "affinity_hits")) == [turns - 1, turns - 1], "each replica served one"
    assert sum(delta(before, after, "affinity_misses")) == 2 and sum(delta(before, after, "affinity_overflows")) == 0
    health = pair.health()["models"]["smollm2"]
    assert health["routing"] == "affinity"
    assert health["affinity_hits"] == sum(r["affinity_hits"] for r in health["replicas"])
    metrics = httpx.get(f"{pair.base_url}/metrics").text
    for index, replica in enumerate(after):
        assert f'gallama_affinity_hits_total{{model="smollm2",replica="{index}"}} {float(replica["affinity_hits"])}' \
            in metrics


def test_a_session_header_is_sticky_whatever_the_prompt(pair):
    client = client_for(pair, **{"x-session-id": "session-one"})
    before = counters(pair)
    for n in range(4):
        client.chat.completions.create(model="smollm2", max_tokens=2, temperature=0,
                                       messages=[{"role": "user", "content": f"Unrelated prompt number {n}."}])
    hits, misses = delta(before, counters(pair), "affinity_hits"), delta(before, counters(pair), "affinity_misses")
    home = hits.index(3)
    assert hits[1 - home] == 0 and misses[1 - home] == 0, "all four on one replica"
    assert misses[home] + hits[home] == 4


def test_anthropic_user_id_and_previous_response_id_are_sticky(pair):
    before = counters(pair)
    for n in range(3):
        reply = httpx.post(f"{pair.base_url}/v1/messages", timeout=60, json={
            "model": "smollm2", "max_tokens": 2, "metadata": {"user_id": "user-7"},
            "messages": [{"role": "user", "content": f"Different question {n}?"}]})
        assert reply.status_code == 200, reply.text
    hits = delta(before, counters(pair), "affinity_hits")
    assert sorted(hits) == [0, 2]
    before = counters(pair)
    previous = None
    for n in range(3):
        body = {"model": "smollm2", "max_output_tokens": 4, "input": f"Say a word, number {n}."}
        if previous is not None:
            body["previous_response_id"] = previous
        reply = httpx.post(f"{pair.base_url}/v1/responses", timeout=60, json=body)
        assert reply.status_code == 200, reply.text
        previous = reply.json()["id"]
        if n:
            usage = reply.json()["usage"]
            assert usage["input_tokens_details"]["cached_tokens"] > 0
    hits = delta(before, counters(pair), "affinity_hits")
    assert sorted(hits) == [0, 2], "each next response goes where the previous one was produced"


def test_a_saturated_replica_overflows_to_the_other(pair):
    session = {"x-session-id": "busy-session"}
    client = client_for(pair, **session)
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi."}], max_tokens=1)
    before = counters(pair)
    stream = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=400, stream=True)
    try:
        next(iter(stream))  # its replica's only slot is taken now
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hello?"}],
                                               max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        stream.close()
    after = counters(pair)
    hits, overflows = delta(before, after, "affinity_hits"), delta(before, after, "affinity_overflows")
    home = hits.index(1)
    assert overflows == [1 if r != home else 0 for r in range(2)], "the second request went to the other replica"


def test_hostile_bodies_get_the_same_answers_as_before(pair):
    url = f"{pair.base_url}/v1/chat/completions"
    json_type = {"content-type": "application/json"}

    def error_of(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert error_of(httpx.post(url, content=b"{not json", headers=json_type), 400)["type"] == "invalid_request_error"
    assert "JSON object" in error_of(httpx.post(url, json=[1, 2]), 400)["message"]
    assert error_of(httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=json_type),
                    400)["code"] == "body_too_deep"
    for messages in ("not a list", [1, 2], [{"role": "user", "content": {"x": [[[[1]]]]}}]):
        error = error_of(httpx.post(url, json={"model": "smollm2", "messages": messages}), 400)
        assert error["param"].startswith("messages")
    deep: list = []
    inner = deep
    for _ in range(90):
        inner.append([])
        inner = inner[0]
    error_of(httpx.post(url, json={"model": "smollm2", "messages": [{"role": "user", "content": deep}]}), 400)
    big = "word " * 850_000  # over MAX_REQUEST_CHARS, under the body limit
    error = error_of(httpx.post(url, timeout=60, json={"model": "smollm2", "messages": [
        {"role": "user", "content": big}]}), 400)
    assert error["param"] == "messages.0.content"
    completions = f"{pair.base_url}/v1/completions"
    assert error_of(httpx.post(completions, json={"model": "smollm2", "prompt": []}), 400)["param"] == "prompt"
    error_of(httpx.post(completions, json={"model": "smollm2", "prompt": [1, {"a": 2}] * 1000}), 400)
    odd = {"x-session-id": "\"quoted\" {json} " + "s" * 60_000}
    reply = httpx.post(url, headers=odd, timeout=60, json={"model": "smollm2", "max_tokens": 2, "messages": [
        {"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    time.sleep(0.2)
    assert all(r["restarts"] == 0 for r in counters(pair))
    assert pair.health()["status"] == "ok"
