"""API keys: the key file, ``gallama keys``, authentication, reloading, header parsing and quotas."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from gallama_kernel.keys import (
    KEY_PREFIX,
    KEYS_FILE,
    Admission,
    AmbiguousKeyError,
    KeyConfigError,
    KeyFile,
    KeyStore,
    Principal,
    QuotaTracker,
    Refusal,
    UnknownKeyError,
    check_key_name,
    hash_key,
    token_from_headers,
)
from gallama_kernel.keys_cli import keys_group


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("GALLAMA_HOME_PATH", str(folder))
    monkeypatch.delenv("GALLAMA_API_KEYS", raising=False)
    monkeypatch.delenv("GALLAMA_ADMIN_KEY", raising=False)
    return folder


def invoke(*args: str) -> object:
    return CliRunner().invoke(keys_group, list(args), catch_exceptions=False)


def add(*args: str) -> tuple[str, str]:
    """Run ``gallama keys add`` and return (key, id)."""
    result = invoke("add", *args)
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    key_id = next(word for word in result.stderr.split() if word.startswith("key_"))
    return key, key_id


def listed() -> list[dict]:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- gallama keys -----------------------------------------------------------------------------------------

def test_add_prints_the_key_once_and_stores_only_its_hash(home: Path) -> None:
    result = invoke("add", "laptop")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith(KEY_PREFIX) and len(key) > 40 and "\n" not in key
    assert "cannot be shown again" in result.stderr
    path = home / KEYS_FILE
    text = path.read_text()
    assert key not in text and key.removeprefix(KEY_PREFIX) not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p.name for p in home.iterdir() if p.name.startswith(f".{KEYS_FILE}.") and p.suffix != ".lock"]
    [record] = json.loads(text)["keys"]
    assert record["name"] == "laptop" and record["scope"] == "inference" and record["models"] is None
    assert record["id"] in result.stderr
    assert key not in invoke("list").output and key not in json.dumps(listed())


def test_add_with_scope_models_and_quotas_then_list(home: Path) -> None:
    _key, key_id = add("ci", "--admin", "--model", "qwen-7b", "--model", "org/llama", "--max-concurrent", "2",
                       "--tokens-per-minute", "5000")
    [row] = listed()
    assert row == {"id": key_id, "name": "ci", "scope": "admin", "models": ["qwen-7b", "org/llama"],
                   "max_concurrent": 2, "tokens_per_minute": 5000, "created": row["created"], "source": "file"}
    assert isinstance(row["created"], int) and row["created"] > 1_700_000_000
    assert "hash" not in row
    table = CliRunner().invoke(keys_group, ["list"], env={"COLUMNS": "200"}).stdout
    for shown in (key_id, "ci", "admin", "qwen-7b", "2 concurrent", "5000 tokens/min", "UTC"):
        assert shown in table
    assert "sha256" not in table


def test_list_shows_environment_keys_without_their_values(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALLAMA_API_KEYS", "first-secret, second-secret,,")
    monkeypatch.setenv("GALLAMA_ADMIN_KEY", "admin-secret")
    rows = listed()
    assert [(r["id"], r["scope"], r["source"]) for r in rows] == [
        ("env:GALLAMA_ADMIN_KEY", "admin", "environment"),
        ("env:GALLAMA_API_KEYS[0]", "inference", "environment"),
        ("env:GALLAMA_API_KEYS[1]", "inference", "environment")]
    output = invoke("list").output + json.dumps(rows)
    assert "secret" not in output


def test_list_with_no_keys_says_the_server_is_open(home: Path) -> None:
    result = invoke("list")
    assert result.exit_code == 0 and "without a key" in result.stderr
    assert listed() == []


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/name", "semi;colon", "ü"])
def test_add_refuses_bad_names(home: Path, name: str) -> None:
    result = invoke("add", name)
    assert result.exit_code == 2 and "refused" in result.stderr
    assert not (home / KEYS_FILE).exists()


def test_add_refuses_bad_models_and_limits(home: Path) -> None:
    assert invoke("add", "x", "--model", "../etc").exit_code == 2
    assert invoke("add", "x", "--max-concurrent", "0").exit_code == 2
    assert invoke("add", "x", "--tokens-per-minute", "-5").exit_code == 2
    assert not (home / KEYS_FILE).exists()


@pytest.mark.parametrize("name", ["a", "A.b_c-9", "x" * 64, ".dot"])
def test_valid_names(name: str) -> None:
    assert check_key_name(name) == name


def test_revoke_by_id_and_by_name(home: Path) -> None:
    _, first = add("one")
    _, second = add("two")
    result = invoke("revoke", first)
    assert result.exit_code == 0 and first in result.stderr
    assert [r["id"] for r in listed()] == [second]
    assert invoke("revoke", "two").exit_code == 0
    assert listed() == []
    assert stat.S_IMODE((home / KEYS_FILE).stat().st_mode) == 0o600


def test_revoke_unknown_is_exit_1(home: Path) -> None:
    add("one")
    result = invoke("revoke", "nobody")
    assert result.exit_code == 1 and "no key has the id or name 'nobody'" in result.stderr
    assert len(listed()) == 1


def test_revoke_refuses_a_shared_name_and_lists_the_ids(home: Path) -> None:
    _, first = add("shared")
    _, second = add("shared")
    result = invoke("revoke", "shared")
    assert result.exit_code == 1
    assert first in result.stderr and second in result.stderr
    assert len(listed()) == 2
    assert invoke("revoke", second).exit_code == 0
    assert [r["id"] for r in listed()] == [first]


def test_revoke_an_environment_key_explains(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GALLAMA_ADMIN_KEY", "admin-secret")
    result = invoke("revoke", "env:GALLAMA_ADMIN_KEY")
    assert result.exit_code == 1 and "GALLAMA_ADMIN_KEY" in result.stderr and "admin-secret" not in result.output


def test_cli_reports_a_malformed_file(home: Path) -> None:
    home.mkdir(parents=True)
    (home / KEYS_FILE).write_text("{not json")
    for args in (("list",), ("add", "x"), ("revoke", "x")):
        result = invoke(*args)
        assert result.exit_code == 2 and "not valid JSON" in result.stderr
    assert (home / KEYS_FILE).read_text() == "{not json"


def test_concurrent_adds_lose_nothing(home: Path) -> None:
    key_file = KeyFile(home)
    threads = [threading.Thread(target=key_file.add, args=(f"k{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.name for r in key_file.read()) == [f"k{i}" for i in range(8)]


# -- the key file ---------------------------------------------------------------------------------------

def test_key_file_api(home: Path) -> None:
    key_file = KeyFile(home)
    assert key_file.read() == [] and not key_file.exists()
    key, record = key_file.add("svc", models=["a", "a", "b"], max_concurrent=3, now=lambda: 1234.9)
    assert record.models == ("a", "b") and record.created == 1234 and record.max_concurrent == 3
    assert record.hash == hash_key(key) and "hash" not in repr(record) and record.hash not in repr(record)
    assert key_file.read() == [record]
    assert key_file.find(record.id) == record == key_file.find("svc")
    with pytest.raises(UnknownKeyError):
        key_file.find("other")
    key_file.add("svc")
    with pytest.raises(AmbiguousKeyError) as raised:
        key_file.find("svc")
    assert record.id in raised.value.ids


@pytest.mark.parametrize("content, problem", [
    ("[]", "expected an object"),
    ('{"version": 2, "keys": []}', "version 2"),
    ('{"version": 1, "keys": [1]}', "expected an object"),
    ('{"version": 1, "keys": [{"id": "key_000000000000"}]}', "missing"),
])
def test_malformed_key_files_are_refused(home: Path, content: str, problem: str) -> None:
    home.mkdir(parents=True)
    (home / KEYS_FILE).write_text(content)
    with pytest.raises(KeyConfigError, match=problem):
        KeyFile(home).read()


def test_bad_records_are_refused(home: Path) -> None:
    key_file = KeyFile(home)
    _, record = key_file.add("ok")
    good = record.to_json()
    for change in ({"scope": "root"}, {"hash": "md5:00"}, {"id": "../x"}, {"name": "a b"}, {"models": []},
                   {"max_concurrent": 0}, {"tokens_per_minute": True}, {"created": "yesterday"}, {"extra": 1}):
        (home / KEYS_FILE).write_text(json.dumps({"version": 1, "keys": [{**good, **change}]}))
        with pytest.raises(KeyConfigError):
            key_file.read()
    (home / KEYS_FILE).write_text(json.dumps({"version": 1, "keys": [good, good]}))
    with pytest.raises(KeyConfigError, match="twice"):
        key_file.read()


# -- authentication -------------------------------------------------------------------------------------

def test_environment_keys(home: Path) -> None:
    store = KeyStore(home, " one , two,", "boss")
    assert store.configured and store.admin_configured
    first = store.authenticate("one")
    assert first is not None and first.key_id == "env:GALLAMA_API_KEYS[0]" and first.scope == "inference"
    assert first.models is None and first.max_concurrent is None and first.tokens_per_minute is None
    assert store.authenticate("two").key_id == "env:GALLAMA_API_KEYS[1]"  # type: ignore[union-attr]
    boss = store.authenticate("boss")
    assert boss is not None and boss.is_admin and boss.key_id == "env:GALLAMA_ADMIN_KEY"
    for wrong in ("", None, "three", "one ", "ONE", "boss2", "one,two"):
        assert store.authenticate(wrong) is None


def test_no_keys_anywhere_is_not_configured(home: Path) -> None:
    store = KeyStore(home, None, None)
    assert not store.configured and not store.admin_configured and store.principals() == []
    assert store.authenticate("anything") is None
    assert not KeyStore(home, " , ", "").configured


def test_file_keys(home: Path) -> None:
    key_file = KeyFile(home)
    key, record = key_file.add("laptop", models=["qwen"], max_concurrent=2, tokens_per_minute=100)
    admin_key, admin_record = key_file.add("ops", admin=True)
    store = KeyStore(home, "env-key", None)
    assert store.configured and store.admin_configured
    principal = store.authenticate(key)
    assert principal == Principal(record.id, "laptop", "inference", frozenset({"qwen"}), 2, 100)
    assert principal.may_use("qwen") and not principal.may_use("llama") and not principal.is_admin
    admin = store.authenticate(admin_key)
    assert admin is not None and admin.key_id == admin_record.id and admin.is_admin and admin.may_use("llama")
    assert store.authenticate(key[:-1]) is None and store.authenticate(record.hash) is None
    assert store.authenticate(hash_key(key).removeprefix("sha256:")) is None
    assert [p.key_id for p in store.principals()] == ["env:GALLAMA_API_KEYS[0]", record.id, admin_record.id]


def test_scopes() -> None:
    inference = Principal("key_a", "a", "inference")
    admin = Principal("key_b", "b", "admin")
    assert inference.allows("inference") and not inference.allows("admin") and not inference.is_admin
    assert admin.allows("inference") and admin.allows("admin") and admin.is_admin


def test_only_inference_keys_is_not_admin_configured(home: Path) -> None:
    store = KeyStore(home, "one", None)
    assert store.configured and not store.admin_configured


def test_added_and_revoked_keys_take_effect_without_a_new_store(home: Path) -> None:
    clock = Clock()
    key_file = KeyFile(home)
    old_key, old_record = key_file.add("old")
    store = KeyStore(home, None, None, clock=clock)
    assert store.authenticate(old_key) is not None
    new_key, _ = key_file.add("new")
    key_file.revoke(old_record.id)
    # checked at most once a second: within the second the old set still holds
    assert store.authenticate(new_key) is None and store.authenticate(old_key) is not None
    clock.advance(1.0)
    assert store.authenticate(new_key) is not None and store.authenticate(old_key) is None


def test_real_clock_reload(home: Path) -> None:
    store = KeyStore(home, None, None, reload_interval_s=0.0)
    assert not store.configured
    key, record = KeyFile(home).add("late")
    assert store.configured and store.authenticate(key).key_id == record.id  # type: ignore[union-attr]


def test_reload_sees_a_rewrite_with_the_same_size_and_mtime(home: Path) -> None:
    key_file = KeyFile(home)
    first, _ = key_file.add("aaaa")
    store = KeyStore(home, None, None, reload_interval_s=0.0)
    info = key_file.path.stat()
    second = "gk-" + "b" * 43
    key_file.write([dataclasses.replace(record, hash=hash_key(second)) for record in key_file.read()])
    os.utime(key_file.path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert key_file.path.stat().st_size == info.st_size
    assert store.authenticate(second) is not None and store.authenticate(first) is None


def test_malformed_file_keeps_the_last_good_keys_and_warns_once(home: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    key_file = KeyFile(home)
    key, _ = key_file.add("kept")
    store = KeyStore(home, None, None, reload_interval_s=0.0)
    key_file.path.write_text('{"version": 1, "keys": [')
    with caplog.at_level(logging.WARNING, logger="gallama_kernel.keys"):
        for _ in range(3):
            assert store.authenticate(key) is not None
            assert store.configured
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not valid JSON" in warnings[0].getMessage()
    assert key not in caplog.text
    with pytest.raises(KeyConfigError):
        key_file.add("refused")  # adding to a broken file would drop the keys it holds
    key_file.path.unlink()
    other, _ = key_file.add("fresh")
    assert store.authenticate(other) is not None and store.authenticate(key) is None


def test_a_broken_file_at_start_requires_keys(home: Path) -> None:
    home.mkdir(parents=True)
    (home / KEYS_FILE).write_text("garbage")
    store = KeyStore(home, None, None)
    assert store.configured and store.authenticate("garbage") is None


def test_revoking_the_last_key_does_not_open_the_server(home: Path) -> None:
    key_file = KeyFile(home)
    _, record = key_file.add("only")
    store = KeyStore(home, None, None, reload_interval_s=0.0)
    key_file.revoke(record.id)
    assert store.configured and store.principals() == []
    result = invoke("list")
    assert result.exit_code == 0 and "refused while" in result.stderr
    key_file.path.unlink()
    assert not store.configured


def test_keys_are_not_logged(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="gallama_kernel.keys"):
        key, record = KeyFile(home).add("quiet")
        store = KeyStore(home, "env-secret-value", "admin-secret-value", reload_interval_s=0.0)
        store.authenticate(key)
        store.authenticate("wrong-secret-value")
    assert key not in caplog.text and record.hash not in caplog.text and "secret-value" not in caplog.text


# -- headers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, token", [
    ({"Authorization": "Bearer gk-abc"}, "gk-abc"),
    ({"authorization": "bearer gk-abc"}, "gk-abc"),
    ({"AUTHORIZATION": "BEARER   gk-abc  "}, "gk-abc"),
    ({"x-api-key": "gk-abc"}, "gk-abc"),
    ({"X-Api-Key": " gk-abc "}, "gk-abc"),
    ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "gk-abc"}, "gk-abc"),
    ({"Authorization": "Bearer", "x-api-key": "gk-abc"}, "gk-abc"),
    ({}, None),
    ({"Authorization": ""}, None),
    ({"Authorization": "Bearer"}, None),
    ({"Authorization": "Bearer    "}, None),
    ({"Authorization": "gk-abc"}, None),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
    ({"x-api-key": ""}, None),
    ({"x-api-key": "   "}, None),
])
def test_token_from_headers(headers: dict[str, str], token: str | None) -> None:
    assert token_from_headers(headers) == token


# -- quotas ---------------------------------------------------------------------------------------------

def test_concurrency_refusal_and_release() -> None:
    tracker = QuotaTracker(clock=Clock())
    key = Principal("key_a", "a", "inference", max_concurrent=2)
    first, second = tracker.admit(key), tracker.admit(key)
    assert isinstance(first, Admission) and isinstance(second, Admission)
    refused = tracker.admit(key)
    assert isinstance(refused, Refusal)
    assert refused.limit == "max_concurrent" and refused.value == 2 and refused.retry_after == 1
    assert "max_concurrent=2" in refused.message and refused.headers == {"Retry-After": "1"}
    assert tracker.usage("key_a") == {"in_flight": 2, "tokens_last_minute": 0}
    first.finish(10)
    assert isinstance(tracker.admit(key), Admission)
    assert isinstance(tracker.admit(Principal("key_b", "b", "inference", max_concurrent=1)), Admission)


def test_finish_is_idempotent() -> None:
    tracker = QuotaTracker(clock=Clock())
    key = Principal("key_a", "a", "inference", max_concurrent=1, tokens_per_minute=1000)
    admission = tracker.admit(key)
    assert isinstance(admission, Admission)
    blocker = tracker.admit(Principal("key_a", "a", "inference", max_concurrent=5))
    assert isinstance(blocker, Admission)  # the same key, two in flight
    admission.finish(100)
    admission.finish(100)
    admission.finish()
    assert tracker.usage("key_a") == {"in_flight": 1, "tokens_last_minute": 100}
    assert isinstance(tracker.admit(key), Refusal)  # the second finish did not free the other slot


def test_tokens_per_minute_refusal_and_retry_after() -> None:
    clock = Clock(0.0)
    tracker = QuotaTracker(clock=clock)
    key = Principal("key_a", "laptop", "inference", tokens_per_minute=100)

    def run(tokens: int) -> None:
        admission = tracker.admit(key)
        assert isinstance(admission, Admission)
        admission.finish(tokens)

    run(40)              # t=0
    clock.advance(10.5)
    run(50)              # t=10.5: 90 tokens
    clock.advance(9.5)
    run(30)              # t=20: 120 tokens, admitted while under the limit
    refused = tracker.admit(key)
    assert isinstance(refused, Refusal) and refused.limit == "tokens_per_minute" and refused.value == 100
    # under 100 once the 40 of t=0 expire (80 left), at t=60: 40 s from now
    assert refused.retry_after == 40 and refused.headers == {"Retry-After": "40"}
    assert "tokens_per_minute=100" in refused.message and "laptop" in refused.message
    assert tracker.usage("key_a") == {"in_flight": 0, "tokens_last_minute": 120}
    clock.advance(39.5)
    refused = tracker.admit(key)
    assert isinstance(refused, Refusal) and refused.retry_after == 1
    clock.advance(0.5)
    assert isinstance(tracker.admit(key), Admission)
    assert tracker.usage("key_a") == {"in_flight": 1, "tokens_last_minute": 80}


def test_retry_after_counts_every_entry_needed() -> None:
    clock = Clock(0.0)
    tracker = QuotaTracker(clock=clock)
    key = Principal("key_a", "a", "inference", tokens_per_minute=100)
    admissions = [tracker.admit(key) for _ in range(3)]  # all admitted: no tokens counted yet
    for admission in admissions:
        assert isinstance(admission, Admission)
        admission.finish(60)
        clock.advance(5)
    # t=15, entries at 0, 5, 10 of 60 each: 180; under 100 after two expire (t=65)
    refused = tracker.admit(key)
    assert isinstance(refused, Refusal) and refused.retry_after == 50


def test_window_expiry_forgets_idle_keys() -> None:
    clock = Clock(0.0)
    tracker = QuotaTracker(clock=clock)
    key = Principal("key_a", "a", "inference", tokens_per_minute=10)
    admission = tracker.admit(key)
    assert isinstance(admission, Admission)
    admission.finish(10)
    clock.advance(59.9)
    assert isinstance(tracker.admit(key), Refusal)
    clock.advance(0.1)
    assert tracker.usage("key_a") == {"in_flight": 0, "tokens_last_minute": 0}
    assert tracker._keys == {}


def test_per_key_state_stays_bounded() -> None:
    clock = Clock(0.0)
    tracker = QuotaTracker(clock=clock)
    key = Principal("key_a", "a", "inference")
    for _ in range(5000):
        admission = tracker.admit(key)
        assert isinstance(admission, Admission)
        admission.finish(1)
        clock.advance(0.05)  # 20 requests a second for 250 s
    assert len(tracker._keys["key_a"].spent) <= 61
    assert tracker.usage("key_a")["tokens_last_minute"] in range(1180, 1221)


def test_keys_without_limits_are_always_admitted() -> None:
    tracker = QuotaTracker(clock=Clock())
    key = Principal("key_a", "a", "inference")
    admissions = [tracker.admit(key) for _ in range(100)]
    assert all(isinstance(a, Admission) for a in admissions)
    for admission in admissions:
        admission.finish(10**6)  # type: ignore[union-attr]
    assert isinstance(tracker.admit(key), Admission)
    assert tracker.usage("key_a")["tokens_last_minute"] == 10**8


def test_tracker_is_thread_safe() -> None:
    tracker = QuotaTracker()
    key = Principal("key_a", "a", "inference", max_concurrent=4)
    admitted: list[int] = []

    def worker() -> None:
        for _ in range(500):
            result = tracker.admit(key)
            if isinstance(result, Admission):
                admitted.append(1)
                result.finish(1)
                result.finish(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.usage("key_a") == {"in_flight": 0, "tokens_last_minute": len(admitted)}
