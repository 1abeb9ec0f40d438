"""The stored responses' bounds, owners and sharing between processes (store.py)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from gallama_protocol_responses.store import Store


def response(index: int, text: str = "x") -> dict:
    return {"id": f"resp_{index}", "object": "response", "output_text": text}


def test_rows_beyond_the_count_go_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.sqlite3", max_rows=3)
    for index in range(5):
        store.put(response(index), [{"role": "user", "content": str(index)}], "")
    assert [store.get(f"resp_{i}", "") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.get("resp_4", "")[1] == [{"role": "user", "content": "4"}]


def test_rows_beyond_the_size_or_the_age_go(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.sqlite3", max_bytes=3000)
    for index in range(4):
        store.put(response(index, "y" * 1000), [], "")
    assert store.get("resp_0", "") is None and store.get("resp_3", "") is not None
    aged = Store(tmp_path / "aged.sqlite3", max_age_s=0.2)
    aged.put(response(1), [], "")
    time.sleep(0.3)
    assert aged.get("resp_1", "") is None


def test_a_response_belongs_to_the_key_that_stored_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.sqlite3")
    store.put(response(1), [], "key-a")
    assert store.get("resp_1", "key-b") is None and not store.delete("resp_1", "key-b")
    assert store.get("resp_1", "key-a") is not None and store.delete("resp_1", "key-a")
    assert (tmp_path / "r.sqlite3").stat().st_mode & 0o777 == 0o600


def _writer(path: str, start: int) -> None:
    store = Store(Path(path))
    for index in range(start, start + 50):
        store.put(response(index), [], "")


def test_several_processes_write_one_store(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    Store(path).put(response(-1), [], "")
    writers = [multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), n * 100))
               for n in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    store = Store(path)
    assert all(store.get(f"resp_{n * 100 + i}", "") is not None for n in range(3) for i in range(50))
