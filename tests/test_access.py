"""Keys, scopes, quotas, CORS, queue limits, readiness and request records, end to end through ``gallama run``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import GALLAMA, RunningServer
from openai import OpenAI

SMALL = "max_concurrent_requests=2 max_seq_len=2048"
HI = [{"role": "user", "content": "Hi"}]
LONG = {"regex_pattern": "(ab ){300}"}  # a stream that outlasts the checks made while it runs
API_KEY, ADMIN_KEY = "inference-key-7f3a", "admin-key-91c2"


def keys(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GALLAMA_HOME_PATH": str(home)}
    return subprocess.run([str(GALLAMA), "keys", *args], env=env, capture_output=True, text=True, timeout=60)


def client(server: RunningServer, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def chat(server: RunningServer, key: str | None = None, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": "alpha", "messages": HI, "max_tokens": 4, **body})


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("access-home")


@pytest.fixture(scope="module")
def file_keys(home: Path) -> dict[str, str]:
    made = {}
    for name, args in {"beta-only": ["--model", "beta"], "one-at-a-time": ["--max-concurrent", "1"],
                       "frugal": ["--tokens-per-minute", "40"]}.items():
        done = keys(home, "add", name, *args)
        assert done.returncode == 0, done.stderr
        made[name] = done.stdout.strip()
    return made


@pytest.fixture(scope="module")
def guarded(home: Path, file_keys: dict[str, str]):
    server = RunningServer(home, "-id", f"model_id=smollm2 model_name=alpha {SMALL}",
                           "-id", f"model_id=smollm2 model_name=beta aliases=b {SMALL}", "--log-format", "json",
                           env={"GALLAMA_API_KEYS": f"other,{API_KEY}", "GALLAMA_ADMIN_KEY": ADMIN_KEY})
    try:
        yield server
    finally:
        server.stop()


def test_inference_needs_a_known_key_in_either_header(guarded: RunningServer) -> None:
    missing = chat(guarded)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "not-a-key").chat.completions.create(model="alpha", messages=HI, max_tokens=2)
    reply = client(guarded, API_KEY).chat.completions.create(model="alpha", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content is not None
    anthropic_style = httpx.post(f"{guarded.base_url}/v1/chat/completions", headers={"x-api-key": API_KEY},
                                 json={"model": "alpha", "messages": HI, "max_tokens": 2}, timeout=60)
    assert anthropic_style.status_code == 200
    assert httpx.get(f"{guarded.base_url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded.base_url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{guarded.base_url}/health/live").status_code == 200


def test_administration_needs_the_admin_scope(guarded: RunningServer) -> None:
    base = guarded.base_url
    as_inference = httpx.get(f"{base}/list_loaded_models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert as_inference.status_code == 403 and as_inference.json()["error"]["code"] == "insufficient_scope"
    assert httpx.get(f"{base}/list_loaded_models").status_code == 401
    removal = httpx.post(f"{base}/remove_model", json={"model_name": "beta"},
                         headers={"Authorization": f"Bearer {API_KEY}"})
    assert removal.status_code == 403
    assert httpx.get(f"{base}/list_loaded_models", headers={"x-api-key": ADMIN_KEY}).status_code == 200
    as_admin = client(guarded, ADMIN_KEY).chat.completions.create(model="alpha", messages=HI, max_tokens=2)
    assert as_admin.choices  # an admin key may also do inference


def test_a_key_limited_to_models_sees_and_uses_only_those(guarded: RunningServer, file_keys: dict[str, str]) -> None:
    limited = client(guarded, file_keys["beta-only"])
    assert [m.id for m in limited.models.list().data] == ["beta"]
    assert limited.chat.completions.create(model="b", messages=HI, max_tokens=2).choices  # by its alias too
    with pytest.raises(openai.PermissionDeniedError) as refused:
        limited.chat.completions.create(model="alpha", messages=HI, max_tokens=2)
    assert refused.value.body["code"] == "model_not_allowed"
    mixture = chat(guarded, file_keys["beta-only"], model="beta", mixture_of_agents={"agents": ["alpha"]})
    assert mixture.status_code == 200
    assert "may not use" in mixture.json()["mixture_of_agents"][0]["error"]  # no way around it through agents
    assert {m.id for m in client(guarded, API_KEY).models.list().data} == {"alpha", "beta"}


def test_keys_added_and_revoked_take_effect_without_a_restart(guarded: RunningServer, home: Path) -> None:
    added = keys(home, "add", "late-comer")
    new_key = added.stdout.strip()
    assert added.returncode == 0 and new_key.startswith("gk-")
    wait_for(lambda: chat(guarded, new_key).status_code == 200, timeout=10)
    listed = keys(home, "list", "--json")
    assert new_key not in listed.stdout and "late-comer" in listed.stdout
    assert keys(home, "revoke", "late-comer").returncode == 0
    wait_for(lambda: chat(guarded, new_key).status_code == 401, timeout=10)
    assert new_key not in (home / "keys.json").read_text()


def test_quotas_refuse_with_retry_after_and_name_the_limit(guarded: RunningServer, file_keys: dict[str, str]) -> None:
    single = file_keys["one-at-a-time"]
    with httpx.stream("POST", f"{guarded.base_url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {single}"},
                      json={"model": "alpha", "messages": HI, "max_tokens": 900, "stream": True, **LONG}) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # held: a dropped line iterator closes the response
        next(lines)
        second = chat(guarded, single)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "max_concurrent_exceeded" and "1" in second.json()["error"]["message"]
        assert int(second.headers["retry-after"]) >= 1
    wait_for(lambda: chat(guarded, single).status_code == 200, timeout=10)  # released when the stream ended

    frugal = file_keys["frugal"]
    # tokens counted as it finishes: LONG writes hundreds of them (its shortest output needs that many)
    assert chat(guarded, frugal, max_tokens=900, **LONG).status_code == 200
    over = chat(guarded, frugal)
    assert over.status_code == 429 and over.json()["error"]["code"] == "tokens_per_minute_exceeded"
    assert "40" in over.json()["error"]["message"] and 1 <= int(over.headers["retry-after"]) <= 60
    streamed_over = httpx.post(f"{guarded.base_url}/v1/chat/completions", headers={"x-api-key": frugal},
                               json={"model": "alpha", "messages": HI, "stream": True}, timeout=60)
    assert streamed_over.status_code == 429


def test_workers_answer_only_their_gateway(guarded: RunningServer) -> None:
    listing = httpx.get(f"{guarded.base_url}/list_loaded_models", headers={"x-api-key": ADMIN_KEY}).json()
    ports = [r["port"] for m in listing["models"] for r in m["replicas"]]
    assert ports
    for port in ports:
        direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "alpha", "messages": HI, "max_tokens": 2}, timeout=30)
        assert direct.status_code == 403 and direct.json()["error"]["code"] == "worker_port"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 403


def test_every_request_has_an_id_and_one_json_log_line_without_keys(guarded: RunningServer) -> None:
    mine = httpx.post(f"{guarded.base_url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "trace-42.a"},
                      json={"model": "alpha", "messages": HI, "max_tokens": 3})
    assert mine.headers["x-request-id"] == "trace-42.a"
    generated = chat(guarded, API_KEY)
    assert generated.headers["x-request-id"].startswith("req_")
    forged = httpx.get(f"{guarded.base_url}/health", headers={"x-request-id": "bad id\twith tab"})
    assert forged.headers["x-request-id"].startswith("req_")
    with httpx.stream("POST", f"{guarded.base_url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}", "x-request-id": "stream-7"},
                      json={"model": "alpha", "messages": HI, "max_tokens": 3, "stream": True}) as streamed:
        body = streamed.read()
    assert b": usage" not in body and body.rstrip().endswith(b"data: [DONE]")  # the worker's report stays inside

    def lines() -> list[dict]:
        found = []
        for line in guarded.log.read_text().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))  # every log line is one JSON object
        return found

    wait_for(lambda: any(e.get("request_id") == "stream-7" for e in lines()), timeout=10)
    entries = {e["request_id"]: e for e in lines() if e.get("event") == "request"}
    plain = entries["trace-42.a"]
    assert plain["status"] == 200 and plain["model"] == "alpha" and plain["key"] == "env:GALLAMA_API_KEYS[1]"
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] > 0 and plain["duration_ms"] > 0
    assert entries["stream-7"]["completion_tokens"] > 0  # from the stream's usage, which the client did not ask for
    text = guarded.log.read_text()
    assert API_KEY not in text and ADMIN_KEY not in text


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("open-home")
    server = RunningServer(home, "-id", "model_id=smollm2 model_name=alpha max_concurrent_requests=1 max_seq_len=2048",
                           "--cors-origin", "http://app.example", env={"GALLAMA_MAX_QUEUE": "0"})
    try:
        yield server
    finally:
        server.stop()


def test_cors_answers_allowed_origins_only(open_server: RunningServer) -> None:
    url = f"{open_server.base_url}/v1/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(url, headers={"Origin": "http://app.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    foreign = httpx.options(url, headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in foreign.headers
    simple = httpx.get(f"{open_server.base_url}/v1/models", headers={"Origin": "http://app.example"})
    assert simple.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.get(f"{open_server.base_url}/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # an open server (no key) ignores the key OpenAI clients always send
    assert client(open_server, "sk-anything").chat.completions.create(model="alpha", messages=HI, max_tokens=2)


def test_a_full_queue_is_a_429_with_retry_after(open_server: RunningServer) -> None:
    url = f"{open_server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, timeout=120, json={"model": "alpha", "messages": HI, "max_tokens": 900,
                                                      "stream": True, **LONG}) as busy:
        assert busy.status_code == 200
        lines = busy.iter_lines()  # held: a dropped line iterator closes the response
        next(lines)
        refused = httpx.post(url, json={"model": "alpha", "messages": HI, "max_tokens": 2}, timeout=60)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["retry-after"] == "1"
    wait_for(lambda: httpx.post(url, json={"model": "alpha", "messages": HI, "max_tokens": 2},
                                timeout=60).status_code == 200, timeout=20)


def test_readiness_follows_the_models_and_liveness_the_process(open_server: RunningServer) -> None:
    base = open_server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    added = httpx.post(f"{base}/add_model", json={"model_id": "smollm2", "model_name": "late", "max_seq_len": 2048})
    assert added.status_code == 202
    loading = httpx.get(f"{base}/health")
    assert loading.status_code == 503 and loading.json()["models"]["late"]["status"] == "loading"
    assert "late" not in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    wait_for(lambda: httpx.get(f"{base}/health").status_code == 200)
    assert "late" in [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]

    pid = next(r["pid"] for m in httpx.get(f"{base}/list_loaded_models").json()["models"] if m["model_name"] == "late"
               for r in m["replicas"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=20)
    assert httpx.get(f"{base}/health/live").status_code == 200
    wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, timeout=90)  # restarted
    assert httpx.post(f"{base}/remove_model", json={"model_name": "late"}).status_code == 200


@pytest.mark.parametrize(("env", "host", "said"), [
    ({}, "127.0.0.1", "none configured"),
    ({}, "0.0.0.0", "anyone who can reach this address can use the models and manage them"),
    ({"GALLAMA_ADMIN_KEY": ADMIN_KEY}, "192.168.1.5", "can use the models. Set"),
    ({"GALLAMA_API_KEYS": API_KEY}, "0.0.0.0", "inference and administration need an API key"),
])
def test_the_start_says_who_may_call(tmp_path: Path, capsys: pytest.CaptureFixture[str], env: dict[str, str],
                                     host: str, said: str) -> None:
    from gallama_kernel.cli import _say_who_may_call
    from gallama_kernel.keys import KeyStore

    store = KeyStore(tmp_path, env.get("GALLAMA_API_KEYS"), env.get("GALLAMA_ADMIN_KEY"))
    _say_who_may_call(store, host)
    printed = " ".join(capsys.readouterr().err.split())
    assert said in printed
    assert ("warning" in printed) == (host != "127.0.0.1" and "GALLAMA_API_KEYS" not in env)


def test_concurrent_clients_of_one_key_do_not_leak_slots(guarded: RunningServer, file_keys: dict[str, str]) -> None:
    single = file_keys["one-at-a-time"]
    statuses: list[int] = []

    def call() -> None:
        statuses.append(chat(guarded, single).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 429} and 200 in statuses
    wait_for(lambda: chat(guarded, single).status_code == 200, timeout=10)  # every slot came back


def scrape(server: RunningServer, key: str | None = ADMIN_KEY) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    reply = httpx.get(f"{server.base_url}/metrics", headers={"x-api-key": key} if key else {}, timeout=30)
    assert reply.status_code == 200, reply.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent_and_need_the_admin_scope(guarded: RunningServer) -> None:
    assert httpx.get(f"{guarded.base_url}/metrics").status_code == 401
    assert httpx.get(f"{guarded.base_url}/metrics", headers={"x-api-key": API_KEY}).status_code == 403
    before = scrape(guarded)
    beta = client(guarded, API_KEY)
    usages = [beta.chat.completions.create(model="beta", messages=HI, max_tokens=3).usage for _ in range(3)]
    streamed = list(beta.chat.completions.create(model="beta", messages=HI, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    usages.append(streamed[-1].usage)
    assert chat(guarded, API_KEY, model="beta", max_tokens=-1).status_code == 400
    after = scrape(guarded)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("gallama_requests_total", route=route, model="beta", status="200") == 4
    assert delta("gallama_requests_total", route=route, model="beta", status="400") == 1
    assert delta("gallama_tokens_total", model="beta", kind="prompt") == sum(u.prompt_tokens for u in usages)
    assert delta("gallama_tokens_total", model="beta", kind="generated") == sum(u.completion_tokens for u in usages)
    assert delta("gallama_time_to_first_token_seconds_count", model="beta") == 1
    assert delta("gallama_inter_token_seconds_count", model="beta") >= 1
    assert value(after, "gallama_slots", model="beta", replica="0") == 2
    assert value(after, "gallama_busy_slots", model="beta", replica="0") == 0
    assert value(after, "gallama_replica_ready", model="alpha", replica="0", state="ready") == 1
    assert value(after, "gallama_worker_restarts_total", model="alpha", replica="0") == 0
    assert delta("gallama_engine_steps_total", model="beta", replica="0") > 0
    assert ("gallama_grammar_compilations_total", (("model", "alpha"), ("replica", "0"))) in after


def test_slow_clients_are_cut_off_while_others_are_served(open_server: RunningServer) -> None:
    import socket

    port = int(open_server.base_url.rsplit(":", 1)[1])
    dribblers = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    closed_at: list[float] = []
    started = time.monotonic()

    def dribble(sock: socket.socket) -> None:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 200
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(2)
        except OSError:
            closed_at.append(time.monotonic() - started)

    threads = [threading.Thread(target=dribble, args=(sock,), daemon=True) for sock in dribblers]
    for thread in threads:
        thread.start()
    time.sleep(3)
    served = time.monotonic()
    reply = httpx.post(f"{open_server.base_url}/v1/chat/completions", timeout=30,
                       json={"model": "alpha", "messages": HI, "max_tokens": 2})
    assert reply.status_code == 200 and time.monotonic() - served < 10  # the dribblers hold nobody up
    for thread in threads:
        thread.join(timeout=30)
    assert len(closed_at) == len(dribblers), "every slow head was cut off"
    assert max(closed_at) < 20  # HEADER_TIMEOUT_S (10 s) after connecting, plus a byte's wait
    for sock in dribblers:
        sock.close()
