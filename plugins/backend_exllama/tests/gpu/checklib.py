"""What the GPU check's Python scripts share: progress lines, the report, the running server's address.

The check runs under hard time limits and may be killed at any moment, so everything a script learns goes into
``$OUT/report.md`` as soon as it is known (one line at a time, appended and flushed), never at the end.
Progress lines go to file descriptor 3 when the driver script opened it (its stdout: short, timestamped), and
to stdout either way (the phase's log).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

START = float(os.environ.get("START") or time.time())  # the driver's start, for "+Ns" stamps


def _channel() -> Any:
    try:
        return os.fdopen(3, "w", buffering=1, closefd=False)
    except OSError:  # not started by the driver script: no progress channel
        return None


PROGRESS = _channel()


def progress(message: str) -> None:
    """A timestamped line on the driver's stdout and in the phase log."""
    line = f"[{time.strftime('%H:%M:%S')} +{time.time() - START:.0f}s] {message}"
    print(line, flush=True)
    if PROGRESS is not None:
        with contextlib.suppress(OSError):  # the driver went away: the log still has the line
            PROGRESS.write(line + "\n")


def report(line: str) -> None:
    """Append ``line`` to the report at once (``$REPORT``, else ``$OUT/report.md``)."""
    path = os.environ.get("REPORT") or str(Path(os.environ.get("OUT", "/tmp/gpu-out")) / "report.md")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(line + "\n")


def server_state(path: str) -> dict[str, Any]:
    """What ``server.py start`` wrote: ``base_url``, ``model``, ``backend``, ``pid``."""
    return json.loads(Path(path).read_text())


def fail(message: str) -> None:
    progress(f"error: {message}")
    report(f"- error: {message}")
    sys.exit(1)
