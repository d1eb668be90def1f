"""Running pgfeed's statements on a caller's connection, whatever its row factory."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row


def tuples(
    conn: psycopg.Connection[Any], query: str | bytes | sql.Composed, params: tuple[Any, ...] = ()
) -> psycopg.Cursor[tuple[Any, ...]]:
    """Run ``query`` on a tuple-row cursor: the caller's connection may have any
    row factory (``dict_row``, ...), and pgfeed reads its rows by position."""
    return conn.cursor(row_factory=tuple_row).execute(query, params)
