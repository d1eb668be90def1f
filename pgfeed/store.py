"""The reader's queries: ticks and range reads. Thin async I/O, no decisions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from pgfeed.core.cursor import StreamMeta, TickFacts
from pgfeed.core.positions import Position, Snapshot, Tick
from pgfeed.core.tickcache import Prefetched
from pgfeed.core.tokens import CommitToken
from pgfeed.errors import FutureToken
from pgfeed.queries import query


class StoredRow(NamedTuple):
    """A row as read from a stream partition."""

    xid: int
    seq: int
    created_at: datetime
    key: str | None
    payload: Any


AConn = psycopg.AsyncConnection[Any]


def _tick(i: Any, snap: str, lo: Any, hi: Any, fp: Any) -> Tick:
    return Tick(int(i), Snapshot.parse(snap), _int(lo), _int(hi), _int(fp))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


#: ``known`` for a reader that has no head yet: no tick list, just the head.
NO_TICKS = 2**62


@dataclass(frozen=True)
class Live:
    """What a woken reader learns in one read-only round trip."""

    ticks: list[Tick]  # from the reader's known head on (inclusive), ascending
    head: Tick | None  # the newest tick (None: no tick yet)
    metas: dict[str, StreamMeta]
    prefetched: dict[str, Prefetched[StoredRow]]  # rows from the known head to the newest, per stream
    server_xmax: int = 0  # the server's current snapshot xmax


async def read_live(
    conn: AConn, known: int | None, streams: Sequence[str], after_ticks: Sequence[int], limit: int
) -> Live:
    """Ticks from ``known`` on (at most 1,000), the newest tick and the current
    incarnation of ``streams``; for each stream whose ``after`` is ``known``,
    when the newest tick is among those ticks, the rows from ``known`` to the
    newest tick (the first ``limit + 1`` in seq order) with the stream's
    floor. Reads only."""
    cur = await conn.execute(
        query("read_live"), (NO_TICKS if known is None else known, list(streams), list(after_ticks), limit), binary=True
    )
    found = await cur.fetchall()
    ticks: list[Tick] = []
    head: Tick | None = None
    metas: dict[str, StreamMeta] = {}
    prefetched: dict[str, tuple[list[StoredRow], int]] = {}
    server_xmax = 0
    for tick_id, snap, meta_json, name, x, s, c, k, p, floor, lo, hi, horizon, fp in found:
        if name is not None:
            rows, _ = prefetched.setdefault(name, ([], int(floor)))
            if x is not None:
                rows.append(StoredRow(x, s, c, k, p))
        elif meta_json is not None:
            if tick_id is not None:
                head = _tick(tick_id, snap, lo, hi, fp)
            server_xmax = int(horizon)
            metas = {
                n: StreamMeta(int(v[0]), int(v[1]), int(v[2]), str(v[3])) for n, v in json.loads(meta_json).items()
            }
        else:
            ticks.append(_tick(tick_id, snap, lo, hi, fp))
    by_stream = {name: Prefetched(rows, floor) for name, (rows, floor) in prefetched.items()}
    return Live(ticks, head, metas, by_stream, server_xmax)


class SavedPosition(NamedTuple):
    """A named consumer's saved position: its token (bare: SQL parses it for
    pruning and status) and the fingerprint of its tick as the consumer saw
    it (None: saved before migration 0007, or not known)."""

    token: str
    tick_fp: int | None = None


async def load_position(conn: AConn, consumer: str, stream: str) -> SavedPosition | None:
    """The position saved by this role for ``consumer`` on ``stream``, if any."""
    cur = await conn.execute(query("load_position"), (consumer, stream))
    row = await cur.fetchone()
    return SavedPosition(str(row[0]), _int(row[1])) if row else None


async def save_positions(conn: AConn, rows: Sequence[tuple[str | None, str, SavedPosition]]) -> None:
    """Upsert ``(consumer, stream, position)`` rows for this role, in one transaction."""
    async with conn.transaction():
        for consumer, stream, saved in rows:
            await conn.execute(query("save_position"), (consumer, stream, saved.token, saved.tick_fp))


async def consumer_heartbeats(conn: AConn, pairs: Sequence[tuple[str, str]]) -> None:
    """``pgfeed.consumer_heartbeat_v2`` for each ``(consumer, stream)``, in one statement."""
    await conn.execute(
        query("consumer_heartbeats"), ([consumer for consumer, _ in pairs], [stream for _, stream in pairs])
    )


async def set_application_name(conn: AConn, name: str) -> None:
    """Name the session (``pg_stat_activity.application_name``) until it ends."""
    await conn.execute(query("set_application_name"), (name,))


async def head_tick_id(conn: AConn) -> int:
    """The newest tick's id (0 before the first tick)."""
    cur = await conn.execute(query("head_tick_id"))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def resolve_token(conn: AConn, token: str) -> int | None:
    """The newest tick's id if it covers commit token ``token`` (see
    ``pgfeed.resolve_token_v2``), else None; FutureToken for a token from the future."""
    try:
        cur = await conn.execute(query("resolve_token"), (token,))
        row = await cur.fetchone()
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.RaiseException) as exc:
        if "in the future" in str(exc) or "beyond anything" in str(exc):
            raise FutureToken(f"commit token {token} names a transaction this database has not started") from None
        raise
    return None if row is None or row[0] is None else int(row[0])


async def snapshot_token(conn: AConn) -> CommitToken:
    """A commit token covering every transaction that has ended so far."""
    cur = await conn.execute(query("snapshot_token"))
    row = await cur.fetchone()
    token = CommitToken.parse(str(row[0])) if row else None
    assert token is not None
    return token


async def tick_facts(conn: AConn, stream_id: int, pos: Position) -> TickFacts:
    """What the database holds of tick ``pos.tick`` for a token of stream
    ``stream_id`` at ``pos`` (see :func:`pgfeed.core.cursor.prove_token`)."""
    seq = None if pos.complete else pos.seq
    cur = await conn.execute(query("tick_facts"), {"sid": stream_id, "seq": seq, "tick": pos.tick})
    row = await cur.fetchone()
    assert row is not None
    exists, fp, names_row, floor = row
    return TickFacts(bool(exists), _int(fp), bool(names_row), _int(floor) or 0)


async def fetch_ticks(conn: AConn, first: int, last: int) -> list[Tick]:
    """Ticks ``first..last`` inclusive, ascending."""
    cur = await conn.execute(query("fetch_ticks"), (first, last))
    return [_tick(*row) for row in await cur.fetchall()]


async def fetch_rows(
    conn: AConn, stream_id: int, start: Tick, end: Tick, limit: int, after_seq: int = 0
) -> tuple[list[StoredRow], int | None]:
    """The first ``limit`` rows, in seq order after ``after_seq``, of interval
    ``(start, end]``; and the stream's floor tick as of that read (None if the
    stream no longer exists)."""
    cur = await conn.execute(
        query("fetch_rows"),
        {
            "sid": stream_id,
            "a": str(start.snapshot),
            "a_lo": start.seq_lo,
            "b": str(end.snapshot),
            "b_hi": end.seq_hi,
            "after": after_seq,
            "limit": limit,
        },
        binary=True,
    )
    found = await cur.fetchall()
    if not found:
        return [], None
    rows = [StoredRow(x, s, c, k, p) for x, s, c, k, p, _ in found if x is not None]
    return rows, int(found[0][5])
