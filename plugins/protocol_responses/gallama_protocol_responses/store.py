"""Stored responses: an SQLite database under ``GALLAMA_HOME_PATH`` (``responses.sqlite3``), shared by every
worker process, so a response created by one model's worker continues on another's and survives a restart.

Each row keeps the response body, the conversation it ended (chat messages, for ``previous_response_id``) and the
key that created it (a response is visible to that key only; without keys, to everyone). Bounded: at most
:data:`MAX_ROWS` responses, :data:`MAX_BYTES` of them in all, none older than :data:`MAX_AGE_S`; the oldest go
first. One connection per call, WAL mode and a busy timeout: writers of several processes wait for each other
instead of failing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from gallama_kernel.plugin import gallama_home

MAX_ROWS = 10_000
MAX_BYTES = 512 * 1024 * 1024
MAX_AGE_S = 30 * 24 * 3600
FILE = "responses.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    owner TEXT NOT NULL,
    body TEXT NOT NULL,
    history TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""


class Store:
    def __init__(self, path: Path | None = None, max_rows: int = MAX_ROWS, max_bytes: int = MAX_BYTES,
                 max_age_s: float = MAX_AGE_S) -> None:
        self.path = path if path is not None else gallama_home() / FILE
        self.max_rows, self.max_bytes, self.max_age_s = max_rows, max_bytes, max_age_s
        self._ready = False

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)  # other users may not read conversations
            os.close(fd)
        connection = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        if not self._ready:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)
            self._ready = True
        return connection

    def put(self, response: dict[str, Any], history: list[dict[str, Any]], owner: str) -> None:
        body, kept = json.dumps(response, ensure_ascii=False), json.dumps(history, ensure_ascii=False)
        size = len(body) + len(kept)
        connection = self._connect()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                               (response["id"], time.time(), owner, body, kept, size))
            self._prune(connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    def _prune(self, connection: sqlite3.Connection) -> None:
        connection.execute("DELETE FROM responses WHERE created < ?", (time.time() - self.max_age_s,))
        count, total = connection.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM responses").fetchone()
        while count > self.max_rows or total > self.max_bytes:
            oldest = connection.execute("SELECT id, size FROM responses ORDER BY created LIMIT 1").fetchone()
            if oldest is None:
                return
            connection.execute("DELETE FROM responses WHERE id = ?", (oldest[0],))
            count, total = count - 1, total - oldest[1]

    def get(self, response_id: str, owner: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        connection = self._connect()
        try:
            row = connection.execute("SELECT body, history, owner, created FROM responses WHERE id = ?",
                                     (response_id,)).fetchone()
        finally:
            connection.close()
        if row is None or row[2] != owner or row[3] < time.time() - self.max_age_s:
            return None
        return json.loads(row[0]), json.loads(row[1])

    def delete(self, response_id: str, owner: str) -> bool:
        connection = self._connect()
        try:
            cursor = connection.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
            return cursor.rowcount > 0
        finally:
            connection.close()
