"""Log lines as text (default) or as JSON objects, one per line (``gallama run --log-format json``).

A record may carry structured fields in ``extra={"fields": {...}}`` (the gateway's request log does): in JSON
they become keys of the object, in text the message already says them.
"""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the record's fields, and the
    exception's traceback as one string when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: int, json_lines: bool) -> None:
    """The root logger's handler and format; uvicorn's own loggers follow it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
