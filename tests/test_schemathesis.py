"""Generated requests for every operation of the gateway's OpenAPI document (schemathesis): never a 5xx, never a
crash. At least 1,000 cases in all; the server is checked alive and ready afterwards."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import RunningServer
from hypothesis import HealthCheck, given, settings

CASES_PER_OPERATION = 250
MINIMUM_CASES = 1000
sent: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory):
    home: Path = tmp_path_factory.mktemp("fuzz-home")
    # a short context bounds what a generated request can make the model do; the admin key keeps generated
    # requests from adding or removing models (they get 401s, which is what they must get)
    server = RunningServer(home, "-id", "model_id=smollm2 max_concurrent_requests=2 max_seq_len=256",
                           env={"GALLAMA_ADMIN_KEY": "fuzz-admin-key"})
    try:
        yield server
    finally:
        server.stop()


def test_no_generated_request_gets_a_5xx(fuzzed: RunningServer) -> None:
    # each operation's strategy driven here (schemathesis's own pytest loader needs pytest internals that
    # pytest 9 no longer has)
    api = schemathesis.openapi.from_url(f"{fuzzed.base_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10, [f"{o.method} {o.path}" for o in operations]
    problems: list[tuple] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=CASES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            # a generated model name is almost never served: most cases name the served model, so that they
            # reach validation, preparation and generation instead of stopping at model_not_found
            if isinstance(case.body, dict) and "model" in case.body and sum(sent.values()) % 8:
                case.body["model"] = "smollm2"
            if case.path_parameters and "model" in case.path_parameters and sum(sent.values()) % 2:
                case.path_parameters["model"] = "smollm2"
            response = case.call(timeout=120)
            key = f"{case.method} {case.path}"
            sent[key] = sent.get(key, 0) + 1
            if response.status_code >= 500:
                problems.append((key, case.body, response.status_code, response.text[:300]))
            elif response.status_code >= 400:
                error = response.json().get("error", {})  # the OpenAI error shape
                if not isinstance(error.get("message"), str):
                    problems.append((key, case.body, response.status_code, response.text[:300]))

        call()
    assert not problems, problems[:5]


def test_enough_cases_ran_and_the_server_is_intact(fuzzed: RunningServer) -> None:
    total = sum(sent.values())
    print("schemathesis cases:", total, sent)
    assert total >= MINIMUM_CASES, sent
    assert fuzzed.process.poll() is None
    assert httpx.get(f"{fuzzed.base_url}/health", timeout=10).status_code == 200
    reply = httpx.post(f"{fuzzed.base_url}/v1/chat/completions", timeout=60,
                       json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert reply.status_code == 200
