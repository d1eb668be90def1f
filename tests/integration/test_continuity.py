"""Tick fingerprints and the tokens that carry them, against a real server
(issue 9): a reader notices another history by the fingerprints of the ticks
it saw, and a position token proves what it names or is refused in one line.

The multi-server scenarios (failover, restore) are in tests/multiserver."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import psycopg
from ticking import take_tick

import pgfeed
from pgfeed.core.tokens import token_check


def _head(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT max(id) FROM pgfeed.ticks").fetchone()
    assert row is not None
    return int(row[0])


async def test_a_tick_with_the_same_snapshot_and_another_fingerprint_resets_every_subscription(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    # What a promoted standby can do on a quiet system: take a tick with an id
    # the reader saw and the same snapshot; its fingerprint (time, term) differs.
    pgfeed.append(pgfeed_conn, stream, {"id": "before"})
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn, poll_interval=0.1) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, "earliest")
        first = await asyncio.wait_for(anext(sub), 10)
        assert [r.payload["id"] for r in first.rows] == ["before"]
        head = _head(pgfeed_conn)
        for _ in range(500):
            if reader._refresher.head is not None and reader._refresher.head.id == head:
                break
            await asyncio.sleep(0.01)
        assert reader._ticks.get(head) is not None
        pgfeed_conn.execute("UPDATE pgfeed.ticks SET fp = fp # 1 WHERE id = %s", (head,))
        reader._refresher.wake()
        again = await asyncio.wait_for(anext(sub), 10)
    assert again.reset
    assert [r.payload["id"] for r in again.rows] == ["before"]
    assert len(resets) == 1
    assert f"tick {head} is not the tick this reader saw" in resets[0]
    assert "history changed" in resets[0]


TOKEN = re.compile(r"[0-9]+(\.[0-9]+)?~[0-9a-f]{6}")


async def test_rows_and_batches_carry_tokens_with_a_check_of_the_stream_and_the_tick(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(5)])
    take_tick(pgfeed_conn)
    pgfeed.append(pgfeed_conn, stream, {"id": 5})
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=4) as reader:
        sub = await reader.subscribe(stream, until="now")
        batches = [b async for b in sub]
    rows = [r for b in batches for r in b.rows]
    assert [r.payload["id"] for r in rows] == list(range(6))
    incarnation = pgfeed_conn.execute("SELECT id, created_tick FROM pgfeed.streams WHERE name = %s", (stream,))
    sid, created = incarnation.fetchone() or (0, 0)
    for r in rows:
        assert TOKEN.fullmatch(r.token), r.token
        fp = pgfeed_conn.execute("SELECT fp FROM pgfeed.ticks WHERE id = %s", (r.position.tick,)).fetchone()
        assert fp is not None
        assert r.token == f"{r.position}~{token_check(sid, created, fp[0])}"
    for b in batches:
        assert TOKEN.fullmatch(b.token), b.token
        assert b.token.startswith(f"{b.position}~")
    assert batches[0].token == rows[3].token, "a batch ending inside a tick: its last row's token"
    assert batches[-1].token.split("~")[0] == str(batches[-1].position)
