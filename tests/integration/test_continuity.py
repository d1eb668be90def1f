"""Tick fingerprints and the tokens that carry them, against a real server
(issue 9): a reader notices another history by the fingerprints of the ticks
it saw, and a position token proves what it names or is refused in one line.

The multi-server scenarios (failover, restore) are in tests/multiserver."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

import pgfeed


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
