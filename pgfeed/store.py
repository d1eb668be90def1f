"""The reader's queries: ticks and range reads. Thin async I/O, no decisions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from pgfeed.core.positions import Snapshot, Tick


class StoredRow(NamedTuple):
    """A row as read from a stream partition."""

    xid: int
    seq: int
    created_at: datetime
    key: str | None
    payload: Any


@dataclass(frozen=True)
class StreamMeta:
    """The current incarnation of a stream and how much of it is retained."""

    id: int
    created_tick: int
    floor_tick: int = 0

    @property
    def first_tick(self) -> int:
        """The oldest position the stream can still be read from."""
        return max(self.created_tick, self.floor_tick)


AConn = psycopg.AsyncConnection[Any]

_TICKS = "SELECT id, snap::text FROM pgfeed.ticks WHERE id >= %s AND id <= %s ORDER BY id"

_ROW_COLUMNS = "e.xid::text::bigint, e.seq, e.created_at, e.key, e.payload"

# One round trip: the stream's floor, then two ordered index range scans —
# transactions still running at the start tick (every xid of which is below
# every xid of the second part), then the xids assigned after it. The floor is
# read in the same snapshot as the rows: if a prune committed before that
# snapshot the floor says so; if after, the rows are whole.
_ROWS = f"""
SELECT r.*, f.floor_tick
  FROM (SELECT floor_tick FROM pgfeed.streams WHERE id = %(sid)s) f
  LEFT JOIN LATERAL (
    (SELECT {_ROW_COLUMNS} FROM pgfeed.events e
      WHERE e.stream_id = %(sid)s AND e.xid = ANY(%(running)s::text[]::xid8[])
        AND (e.xid, e.seq) > (%(after_xid)s::text::xid8, %(after_seq)s)
      ORDER BY e.xid, e.seq LIMIT %(limit)s)
    UNION ALL
    (SELECT {_ROW_COLUMNS} FROM pgfeed.events e
      WHERE e.stream_id = %(sid)s
        AND e.xid >= %(lo)s::text::xid8 AND e.xid < %(hi)s::text::xid8
        AND pg_visible_in_snapshot(e.xid, %(snap)s::pg_snapshot)
        AND (e.xid, e.seq) > (%(after_xid)s::text::xid8, %(after_seq)s)
      ORDER BY e.xid, e.seq LIMIT %(limit)s)
  ) r ON true
"""  # noqa: S608  # a constant column list, no user input


_TICK_READ = "SELECT * FROM pgfeed.tick_read_v1(%s::text[], %s::bigint[], %s::integer)"

#: Rows of the interval ending at the new tick, per stream: (rows, floor tick).
Prefetched = dict[str, tuple[list[StoredRow], int]]


async def tick_and_read(
    conn: AConn, streams: Sequence[str], after_ticks: Sequence[int], limit: int
) -> tuple[Tick, dict[str, StreamMeta], Prefetched]:
    """Take (or share) a tick covering every commit so far; read the current
    incarnation of ``streams``; and, for each stream whose ``after`` is the
    tick just before the new one, the rows of ``(after, tick]`` (at most
    ``limit + 1``) with the stream's floor."""
    cur = await conn.execute(_TICK_READ, (list(streams), list(after_ticks), limit), binary=True)
    found = await cur.fetchall()
    head = found[0]
    tick = Tick(int(head[0]), Snapshot.parse(head[1]))
    metas = {name: StreamMeta(int(v[0]), int(v[1]), int(v[2])) for name, v in json.loads(head[2]).items()}
    prefetched: Prefetched = {}
    for _, _, _, name, x, s, c, k, p, floor in found[1:]:
        rows, _ = prefetched.setdefault(name, ([], int(floor)))
        if x is not None:
            rows.append(StoredRow(x, s, c, k, p))
    for rows, _ in prefetched.values():
        rows.sort()  # two ordered parts, as in fetch_rows
    return tick, metas, prefetched


async def load_position(conn: AConn, consumer: str, stream: str) -> str | None:
    """The token saved by this role for ``consumer`` on ``stream``, if any."""
    cur = await conn.execute(
        "SELECT token FROM pgfeed.positions WHERE owner = current_user AND consumer = %s AND stream = %s",
        (consumer, stream),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def save_positions(conn: AConn, rows: Sequence[tuple[str | None, str, str]]) -> None:
    """Upsert ``(consumer, stream, token)`` rows for this role, in one transaction."""
    async with conn.transaction():
        for consumer, stream, token in rows:
            await conn.execute(
                "INSERT INTO pgfeed.positions (consumer, stream, token) VALUES (%s, %s, %s)"
                " ON CONFLICT (owner, consumer, stream) DO UPDATE SET token = excluded.token, updated_at = now()",
                (consumer, stream, token),
            )


async def head_tick_id(conn: AConn) -> int:
    """The newest tick's id (0 before the first tick)."""
    cur = await conn.execute("SELECT coalesce(max(id), 0) FROM pgfeed.ticks")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def fetch_ticks(conn: AConn, first: int, last: int) -> list[Tick]:
    """Ticks ``first..last`` inclusive, ascending."""
    cur = await conn.execute(_TICKS, (first, last))
    return [Tick(int(i), Snapshot.parse(s)) for i, s in await cur.fetchall()]


async def fetch_rows(
    conn: AConn,
    stream_id: int,
    start: Snapshot,
    end: Snapshot,
    limit: int,
    after: tuple[int, int] = (0, 0),
) -> tuple[list[StoredRow], int | None]:
    """The first ``limit`` rows, in ``(xid, seq)`` order after ``after``, whose
    xid is visible in ``end`` and not in ``start``; and the stream's floor
    tick as of that read (None if the stream no longer exists)."""
    running = [str(x) for x in sorted(start.xip) if end.visible(x) and x >= after[0]]
    cur = await conn.execute(
        _ROWS,
        {
            "sid": stream_id,
            "after_xid": after[0],
            "after_seq": after[1],
            "limit": limit,
            "running": running,
            "lo": start.xmax,
            "hi": max(end.xmax, start.xmax),
            "snap": str(end),
        },
        binary=True,
    )
    found = await cur.fetchall()
    if not found:
        return [], None
    rows = [StoredRow(x, s, c, k, p) for x, s, c, k, p, _ in found if x is not None]
    if running:  # two ordered parts; already in order without them
        rows.sort()
    return rows[:limit], int(found[0][5])
