"""Edge cases found in review: each once lost a row, hung, or spun."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from ticking import take_tick

import pgfeed
from pgfeed.reader import PRUNED
from pgfeed.retention import prune


async def test_rows_of_the_transaction_that_creates_the_stream_are_delivered(
    pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(pgfeed_dsn) as creator:
        creator.execute("CREATE TABLE unrelated (x int)")  # the transaction has an xid already
        with psycopg.connect(pgfeed_dsn, autocommit=True) as other:
            other.execute("CREATE TABLE bump (x int)")  # a later xid finishes meanwhile
        creator.execute("SELECT pgfeed.create_stream_v1('born')")
        pgfeed.append(creator, "born", {"id": "seed"})
        creator.commit()
    pgfeed.append(pgfeed_conn, "born", {"id": "later"})
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        sub = await reader.subscribe("born", "earliest", until="now")
        got = [r.payload["id"] async for b in sub for r in b.rows]
    assert got == ["seed", "later"]


async def test_a_partial_position_at_the_prune_cut_resets_instead_of_spinning(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(10)])
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=4) as reader:
        sub = await reader.subscribe(stream, "earliest", until="now")
        partial = (await anext(sub)).position
        await sub.close()
    assert not partial.complete
    pgfeed.append(pgfeed_conn, stream, {"id": "kept"})
    take_tick(pgfeed_conn)
    pgfeed_conn.execute(
        "UPDATE pgfeed.ticks SET taken_at = taken_at - interval '2 days' WHERE id <= %s", (partial.tick,)
    )
    assert prune(pgfeed_conn, 86400).floor_tick == partial.tick
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, str(partial), until="now")
        got = [r.payload["id"] async for b in sub for r in b.rows]
    assert resets == [PRUNED]
    assert got == ["kept"]


async def test_catch_up_survives_a_tick_cache_smaller_than_the_window(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    for i in range(30):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
        take_tick(pgfeed_conn)
    async with pgfeed.AsyncReader(pgfeed_dsn, tick_window=5) as reader:
        reader._ticks.limit = 4
        sub = await reader.subscribe(stream, "earliest", until="now")
        got = [r.payload["id"] async for b in sub for r in b.rows]
    assert got == list(range(30))


async def test_ticks_are_shared_by_snapshot_not_by_clock(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    # As if the server clock had stepped back an hour.
    pgfeed_conn.execute("UPDATE pgfeed.ticks SET taken_at = taken_at + interval '1 hour'")
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        sub = await reader.subscribe(stream, "now")
        pgfeed.append(pgfeed_conn, stream, {"id": 1})
        batch = await asyncio.wait_for(sub.__anext__(), 5)
        assert [r.payload["id"] for r in batch.rows] == [1]


async def test_close_wakes_a_consumer_waiting_for_the_next_batch(pgfeed_dsn: str, stream: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        sub = await reader.subscribe(stream, "now")

        async def consume() -> int:
            return len([b async for b in sub])

        waiting = asyncio.create_task(consume())
        for _ in range(3):  # let it reach the empty queue: no I/O on the way
            await asyncio.sleep(0)
        assert not waiting.done()
        await sub.close()
        assert await asyncio.wait_for(waiting, 3) == 0


def test_ticks_refuse_repeatable_read_and_commit_token_copes(pgfeed_dsn: str, stream: str) -> None:
    with psycopg.connect(pgfeed_dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction, match="READ COMMITTED"):
            conn.execute("SELECT * FROM pgfeed.tick_v1()")
    rr = psycopg.conninfo.make_conninfo(pgfeed_dsn, options="-c default_transaction_isolation=repeatable\\ read")
    with psycopg.connect(rr) as conn:
        pgfeed.append(conn, stream, {"id": 1})
        conn.commit()
        token = pgfeed.commit_token(conn)
        assert str(token).startswith("s")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
