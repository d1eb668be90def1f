"""Validation of user-supplied names before anything touches the database."""

from __future__ import annotations

import re

from pgfeed.errors import InvalidStreamName, UsageError

STREAM_NAME_RULE = (
    "a stream name is 1-63 characters: a lower-case ASCII letter, then lower-case ASCII letters, digits or _"
)
_STREAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def check_stream_name(name: str) -> str:
    """Return ``name`` if it is a valid stream name, else raise :class:`InvalidStreamName`."""
    if not isinstance(name, str) or _STREAM_NAME.fullmatch(name) is None:
        raise InvalidStreamName(f"invalid stream name {name!r}: {STREAM_NAME_RULE}")
    return name


def parse_qualified_table(text: str) -> tuple[str, str]:
    """Split ``SCHEMA.TABLE`` (or ``TABLE``, meaning ``public``) into its parts.

    Double quotes may wrap a part that holds dots or capitals, as in SQL.
    """
    parts: list[str] = []
    buf = ""
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1 : i + 2] == '"':
                buf += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                buf += ch
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append(buf)
            buf = ""
        else:
            buf += ch.lower()
        i += 1
    parts.append(buf)
    if quoted or len(parts) > 2 or any(not p for p in parts):
        raise UsageError(f"invalid table name {text!r}: expected TABLE or SCHEMA.TABLE")
    if len(parts) == 1:
        return "public", parts[0]
    return parts[0], parts[1]


def parse_column_list(text: str | None) -> list[str] | None:
    """Split a comma-separated column list; ``None`` or empty means "all columns"."""
    if text is None or not text.strip():
        return None
    cols = [c.strip() for c in text.split(",")]
    if any(not c for c in cols):
        raise UsageError(f"invalid column list {text!r}: expected names separated by commas, e.g. id,status")
    return cols
