"""Delivered rows as JSON: the one rendering used by ``pgfeed tail``, the demo and tests.

A JSON-lines feed is one object per line: a row (:func:`to_json`), or, before
the first row after a break in continuity, a reset marker (:func:`reset_to_json`)
telling the consumer to drop whatever it derived from the lines before.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgfeed.reader import Row


def to_json(row: Row) -> dict[str, Any]:
    """``row`` as a JSON object: ``stream``, ``position`` (the token after the
    row: resume with ``since=`` it), ``created_at`` (ISO 8601), ``key``, ``payload``;
    and, for a captured TRUNCATE, ``truncate``: the table whose every row is gone
    (a reset of that one table, for consumers that only look at the top level)."""
    doc = {
        "stream": row.stream,
        "position": row.token,
        "created_at": row.created_at.isoformat(),
        "key": row.key,
        "payload": row.payload,
    }
    table = truncated_table(row)
    if table is not None:
        doc["truncate"] = table
    return doc


def truncated_table(row: Row) -> str | None:
    """The table a captured TRUNCATE event (``{"op": "truncate", "table": ...}``) emptied, else None."""
    p = row.payload
    if isinstance(p, dict) and p.get("op") == "truncate" and isinstance(p.get("table"), str):
        return str(p["table"])
    return None


def reset_to_json(stream: str, reason: str | None = None) -> dict[str, Any]:
    """The marker written before a batch with ``reset`` set: ``{"stream", "reset": true}``
    plus the ``reason`` given to ``on_reset`` callbacks when it is known."""
    marker: dict[str, Any] = {"stream": stream, "reset": True}
    if reason is not None:
        marker["reason"] = reason
    return marker


def to_jsonl(obj: dict[str, Any]) -> str:
    """One compact JSON line (without the newline) for :func:`to_json` or :func:`reset_to_json`."""
    return json.dumps(obj, separators=(",", ":"))


def row_to_jsonl(row: Row) -> str:
    """``row`` as one JSON line (without the newline)."""
    return to_jsonl(to_json(row))


__all__ = ["reset_to_json", "row_to_jsonl", "to_json", "to_jsonl", "truncated_table"]
