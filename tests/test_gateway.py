"""Several models behind one gateway, with real worker processes and the real model: routing, replicas and
balancing, model management while serving, a killed worker recovered, disconnects, mixture of agents."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from conftest import RunningServer
from openai import OpenAI

from gallama_kernel.cores import machine_cores

SMALL = "max_concurrent_requests=2 max_seq_len=2048"
HI = [{"role": "user", "content": "Say hello."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake."}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    home = tmp_path_factory.mktemp("gateway")
    server = RunningServer(home, "-id", f"model_id=smollm2 model_name=alpha {SMALL}",
                           "-id", f"model_id=smollm2 model_name=alpha {SMALL}",
                           "-id", f"model_id=smollm2 model_name=beta aliases=b {SMALL}")
    yield server
    server.stop()


def client_for(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def loaded(server: RunningServer) -> dict[str, dict]:
    return {m["model_name"]: m for m in httpx.get(f"{server.base_url}/list_loaded_models").json()["models"]}


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_models_are_listed_and_routed_by_name(gateway):
    client = client_for(gateway)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"alpha", "beta"}
    for name in ("alpha", "beta", "b"):
        reply = client.chat.completions.create(model=name, messages=HI, max_tokens=4, temperature=0)
        assert reply.model == ("beta" if name == "b" else name)
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", json={"model": "gamma", "messages": HI})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_replicas_share_the_load(gateway):
    client = client_for(gateway)
    before = [r["steps"] for r in gateway.health()["models"]["alpha"]["replicas"]]
    threads = [threading.Thread(target=client.chat.completions.create,
                                kwargs={"model": "alpha", "messages": STORY, "max_tokens": 24}) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = [r["steps"] for r in gateway.health()["models"]["alpha"]["replicas"]]
    assert len(after) == 2
    assert all(b > a for a, b in zip(before, after, strict=True)), "both replicas served requests"


def test_stream_is_proxied_as_generated_and_disconnect_cancels(gateway):
    client = client_for(gateway)
    stream = client.chat.completions.create(model="beta", messages=STORY, max_tokens=400, stream=True)
    arrivals = []
    for _chunk in stream:
        arrivals.append(time.monotonic())
        if len(arrivals) == 12:
            break
    stream.close()
    assert arrivals[-1] - arrivals[1] > 0.02, "chunks arrive one by one, not in one buffered burst"
    steps = lambda: gateway.health()["models"]["beta"]["steps"]  # noqa: E731
    wait_for(lambda: gateway.health()["models"]["beta"]["busy"] == 0, 10)
    settled = steps()
    time.sleep(0.5)
    assert steps() == settled, "the worker stopped generating after the client left"


def test_busy_workers_split_the_cores_and_one_alone_takes_them_all(gateway):
    """The gateway's core board (gallama_kernel.cores): while a replica of alpha and beta both decode, their
    compute threads together fit the cores; once beta's stream ends, alpha's next steps use every core."""
    cores = machine_cores()
    client = client_for(gateway)
    streams = {name: client.chat.completions.create(model=name, messages=STORY, max_tokens=1000, stream=True)
               for name in ("alpha", "beta")}
    seen: list[int] = []

    def threads_of(model: str) -> list[int]:
        return [r["threads"] for r in gateway.health()["models"][model]["replicas"] if r.get("busy")]

    def both_share() -> bool:
        for stream in streams.values():
            next(stream, None)  # keep both streams flowing
        busy = threads_of("alpha") + threads_of("beta")
        seen[:] = busy
        return len(busy) == 2 and sum(busy) <= max(cores, 2)

    try:
        wait_for(both_share, 60)
        assert all(n >= 1 for n in seen)
    finally:
        streams["beta"].close()
    wait_for(lambda: gateway.health()["models"]["beta"]["busy"] == 0, 10)

    def alone_takes_all() -> bool:
        next(streams["alpha"], None)
        return threads_of("alpha") == [cores]

    try:
        wait_for(alone_takes_all, 60)
    finally:
        streams["alpha"].close()


def test_add_and_remove_models_while_serving(gateway):
    base = gateway.base_url
    added = httpx.post(f"{base}/add_model?wait=true", timeout=120,
                       json={"model_id": "smollm2", "model_name": "gamma", "max_concurrent_requests": 1,
                             "max_seq_len": 1024})
    assert added.status_code == 200, added.text
    assert added.json()["models"][0]["state"] == "ready"
    client = client_for(gateway)
    assert client.chat.completions.create(model="gamma", messages=HI, max_tokens=4).model == "gamma"
    again = httpx.post(f"{base}/add_model", json={"model_id": "smollm2", "model_name": "gamma"})
    assert again.status_code == 409
    bad = httpx.post(f"{base}/add_model", json={"model_id": "smollm2", "model_name": "delta", "cache_quant": "Q3"})
    assert bad.status_code == 400
    # removing drains: a stream running on gamma completes
    results: list[str | None] = []

    def long_stream() -> None:
        finish = None
        for chunk in client.chat.completions.create(model="gamma", messages=STORY, max_tokens=60, stream=True):
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        results.append(finish)

    thread = threading.Thread(target=long_stream)
    thread.start()
    wait_for(lambda: loaded(gateway)["gamma"]["replicas"][0]["outstanding"] == 1, 20)
    removed = httpx.post(f"{base}/remove_model", json={"model_name": "gamma"}, timeout=120)
    thread.join()
    assert removed.status_code == 200 and removed.json() == {"removed": ["gamma"]}
    assert results == ["length"], "the in-flight stream finished before its worker stopped"
    assert "gamma" not in loaded(gateway)
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "gamma", "messages": HI}).status_code == 404
    assert httpx.post(f"{base}/remove_model", json={"model_name": "gamma"}).status_code == 404


def test_killed_worker_is_restarted_and_others_keep_serving(gateway):
    client = client_for(gateway)
    victim = loaded(gateway)["beta"]["replicas"][0]
    events: list[str] = []

    def doomed_stream() -> None:
        try:
            for chunk in client.chat.completions.create(model="beta", messages=STORY, max_tokens=400, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    events.append("content")
        except Exception as error:  # the openai client raises on an in-band error event
            events.append(f"error: {error}")

    thread = threading.Thread(target=doomed_stream)
    thread.start()
    wait_for(lambda: events.count("content") >= 3, 30)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(30)
    assert events[-1].startswith("error") and "restarted" in events[-1]
    # the other model is unaffected
    assert client.chat.completions.create(model="alpha", messages=HI, max_tokens=4).choices[0].message.content
    wait_for(lambda: loaded(gateway)["beta"]["state"] == "ready", 90)
    replica = loaded(gateway)["beta"]["replicas"][0]
    assert replica["restarts"] == 1 and replica["pid"] != victim["pid"]
    assert client.chat.completions.create(model="beta", messages=HI, max_tokens=4).choices[0].message.content


def test_mixture_of_agents(gateway):
    client = client_for(gateway)
    body = {"mixture_of_agents": {"agents": ["alpha", "beta", "nobody"]}}
    reply = client.chat.completions.create(model="alpha", messages=HI, max_tokens=16, temperature=0, extra_body=body)
    report = reply.model_extra["mixture_of_agents"]
    assert [r["model"] for r in report] == ["alpha", "beta", "nobody"]
    assert "content" in report[0] and "content" in report[1]
    assert "error" in report[2], "a failing agent is reported, not fatal"
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="alpha", messages=HI, max_tokens=16, temperature=0,
                                                 stream=True, extra_body=body))
    assert chunks[0].model_extra["mixture_of_agents"][0]["model"] == "alpha"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    bad = httpx.post(f"{gateway.base_url}/v1/chat/completions",
                     json={"model": "alpha", "messages": HI, "mixture_of_agents": {"agents": "alpha"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "mixture_of_agents"


def test_admin_key_guards_model_management(tmp_path):
    server = RunningServer(tmp_path, "-id", f"model_id=smollm2 {SMALL}", env={"GALLAMA_ADMIN_KEY": "s3cret"})
    try:
        base = server.base_url
        assert httpx.get(f"{base}/list_loaded_models").status_code == 401
        assert httpx.post(f"{base}/remove_model", json={"model_name": "smollm2"}).status_code == 401
        ok = httpx.get(f"{base}/list_loaded_models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        reply = client_for(server).chat.completions.create(model="smollm2", messages=HI, max_tokens=2)
        assert reply.choices[0].message.content is not None, "the OpenAI endpoints stay open"
    finally:
        server.stop()


def test_the_plugin_selection_reaches_every_worker(tmp_path):
    server = RunningServer(tmp_path, "-id", f"model_id=smollm2 {SMALL}", "--disable-plugin", "artifact")
    try:
        body = {"model": "smollm2", "messages": HI, "max_tokens": 2}
        refused = httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "artifact": "Yes"}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "plugin_required"  # not loaded there
        thinking = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                              json={**body, "thinking_template": "<think>{problem}</think>"})
        assert thinking.status_code != 400 or thinking.json()["error"]["param"] != "thinking_template"
    finally:
        server.stop()
