"""The demo's message protocol: JSON lines, one object each.

Children write to the parent on their stdout: ``ready`` (with the reader's
start ``position``), ``wrote`` (``n``, ``seq``, commit ``token``), ``done``,
``row`` (a delivered row, its ``seq`` and ``lag_ms``), ``caught_up``,
``notice`` and ``error``. The parent writes to a child's stdin: ``go`` to
the writer, ``{"wait_for": TOKEN}`` to a reader; closing stdin means stop.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any

#: The stream the demo writes to and reads from.
STREAM = "demo"

#: Environment variable carrying the connection string to the children
#: (not argv, which any local user can read with ``ps``).
CONNINFO_ENV = "PGFEED_DEMO_CONNINFO"

CATCH_UP_TIMEOUT = 10.0  # seconds for each reader to reach the writer's last token

Message = dict[str, Any]


class Emitter:
    """JSON lines to the parent; thread-safe. If the parent is gone, exit."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, ValueError):
                os._exit(0)  # the parent is gone: nobody is left to report to


def row_message(row: Any) -> Message:
    from pgfeed import rows

    message = rows.to_json(row)
    payload = message["payload"]
    sent = payload.get("t") if isinstance(payload, dict) else None
    lag = round((time.time() - sent) * 1000, 3) if isinstance(sent, int | float) else None
    return {"type": "row", **message, "seq": row.seq, "lag_ms": lag}


def wait_for_token(line: bytes | str) -> str:
    """The token of a ``{"wait_for": TOKEN}`` command from the parent."""
    return str(json.loads(line)["wait_for"])


def caught_up_message(position: object, started: float) -> Message:
    return {"type": "caught_up", "position": str(position), "waited_ms": round((time.monotonic() - started) * 1000, 1)}
