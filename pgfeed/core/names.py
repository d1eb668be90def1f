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


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def split_identifiers(text: str, sep: str) -> list[str] | None:
    """Split ``text`` at ``sep`` into SQL identifiers, read as PostgreSQL reads them.

    Outside double quotes, ASCII letters fold to lower case and spaces around
    a name are dropped; inside, everything is kept and ``""`` is one quote.
    Returns ``None`` if a quote is left open or a name is empty.
    """
    parts: list[str] = []
    segments: list[tuple[str, bool]] = []  # (text, quoted) pieces of the current name
    buf = ""
    quoted = False
    i = 0

    def end_segment() -> None:
        nonlocal buf
        if buf or quoted:
            segments.append((buf, quoted))
        buf = ""

    def end_part() -> bool:
        if segments and not segments[0][1]:
            segments[0] = (segments[0][0].lstrip(), False)
        if segments and not segments[-1][1]:
            segments[-1] = (segments[-1][0].rstrip(), False)
        name = "".join(t if q else t.translate(_ASCII_LOWER) for t, q in segments)
        segments.clear()
        parts.append(name)
        return bool(name)

    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1 : i + 2] == '"':
                buf += '"'
                i += 1
            elif ch == '"':
                end_segment()
                quoted = False
            else:
                buf += ch
        elif ch == '"':
            end_segment()
            quoted = True
        elif ch == sep:
            end_segment()
            if not end_part():
                return None
        else:
            buf += ch
        i += 1
    if quoted:
        return None
    end_segment()
    return parts if end_part() else None


def parse_qualified_table(text: str) -> tuple[str, str]:
    """Split ``SCHEMA.TABLE`` (or ``TABLE``, meaning ``public``) into its parts.

    Names are read as SQL reads them: ``Shop.Orders`` is ``shop.orders``;
    double quotes keep capitals, spaces and dots: ``"Shop"."Order Lines"``.
    """
    parts = split_identifiers(text, ".")
    if parts is None or len(parts) > 2:
        raise UsageError(f"invalid table name {text!r}: expected TABLE or SCHEMA.TABLE")
    if len(parts) == 1:
        return "public", parts[0]
    return parts[0], parts[1]


_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")


def quote_name(name: str) -> str:
    """``name`` as a user would type it: bare if SQL reads it back unchanged, else double-quoted."""
    if _PLAIN_IDENTIFIER.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def format_qualified_table(schema: str, table: str) -> str:
    """The inverse of :func:`parse_qualified_table`: ``shop."Order Lines"``."""
    return f"{quote_name(schema)}.{quote_name(table)}"


def parse_column_list(text: str | None) -> list[str] | None:
    """Split a comma-separated column list; ``None`` or empty means "all columns".

    Names are read as SQL reads them (see :func:`parse_qualified_table`):
    ``id,"CustomerId"``.
    """
    if text is None or not text.strip():
        return None
    cols = split_identifiers(text, ",")
    if cols is None:
        raise UsageError(f"invalid column list {text!r}: expected names separated by commas, e.g. id,status")
    return cols
