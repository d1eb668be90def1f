"""A woken reader's one round trip (``pgfeed.read_live_v4``): the rows of
every tick taken since it last woke come with the newest tick, so that under
load, when ticks outpace wake-ups, a caught-up reader still reads once per
wake-up."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from ticking import take_tick

import pgfeed
from pgfeed import store

Conn = psycopg.Connection[Any]

LIVE = "SELECT tick_id, stream, seq FROM pgfeed.read_live_v4(%s, ARRAY[%s], ARRAY[%s::bigint], %s)"


def prefetched_seqs(conn: Conn, known: int, stream: str, after: int, limit: int = 100) -> list[int]:
    return [seq for _, name, seq in conn.execute(LIVE, (known, stream, after, limit)) if name and seq is not None]


def test_the_rows_of_every_tick_since_the_known_head_come_with_the_newest(pgfeed_conn: Conn, stream: str) -> None:
    known = take_tick(pgfeed_conn).tick
    seqs = []
    for i in range(3):
        seqs.append(pgfeed.append(pgfeed_conn, stream, {"i": i}))
        take_tick(pgfeed_conn)
    assert prefetched_seqs(pgfeed_conn, known, stream, known) == seqs
    assert prefetched_seqs(pgfeed_conn, known + 1, stream, known + 1) == seqs[1:]
    assert prefetched_seqs(pgfeed_conn, known, stream, known - 1) == [], "only streams standing at the known head"
    assert prefetched_seqs(pgfeed_conn, known, stream, known, limit=1) == seqs[:2], "limit + 1 rows"


def test_nothing_is_prefetched_when_the_listed_ticks_do_not_reach_the_newest(pgfeed_conn: Conn, stream: str) -> None:
    known = take_tick(pgfeed_conn).tick
    seq = pgfeed.append(pgfeed_conn, stream, {"i": 0})
    for _ in range(999):
        take_tick(pgfeed_conn)
    rows = pgfeed_conn.execute(LIVE, (known, stream, known, 10)).fetchall()
    assert [r[2] for r in rows if r[1] is not None] == [None, seq], "the head is the 1,000th tick listed"
    take_tick(pgfeed_conn)  # the list holds at most 1,000 ticks from the known head
    rows = pgfeed_conn.execute(LIVE, (known, stream, known, 10)).fetchall()
    assert len([r for r in rows if r[1] is None]) == 1000 + 1, "1,000 listed ticks and the head"
    assert [r for r in rows if r[1] is not None] == []


async def test_a_reader_woken_after_several_ticks_reads_them_in_one_round_trip(
    pgfeed_dsn: str, pgfeed_conn: Conn, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_reads = []
    real_fetch_rows = store.fetch_rows

    async def counting_fetch_rows(*args: Any, **kwargs: Any) -> Any:
        range_reads.append(args[2:4])
        return await real_fetch_rows(*args, **kwargs)

    monkeypatch.setattr(store, "fetch_rows", counting_fetch_rows)
    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off") as reader:
        sub = await reader.subscribe(stream, since="now")
        # Rows first, a tick each, until one is read with no range read: the
        # subscription then stands at the head and the refreshes woken while
        # the reader started (listener connected, the first ticks) are done.
        start = None
        for i in range(-10, 0):
            range_reads.clear()
            pgfeed.append(pgfeed_conn, stream, {"i": i})
            take_tick(pgfeed_conn)
            start = (await anext(aiter(sub))).position.tick
            if not range_reads:
                break
        assert start is not None
        assert not range_reads, "every single-tick wake-up needed a range read"
        # Blocking calls: the reader's loop does not run until they are done,
        # so it wakes once to three new ticks (each with a row).
        expected = []
        for i in range(3):
            seq = pgfeed.append(pgfeed_conn, stream, {"i": i})
            expected.append((take_tick(pgfeed_conn).tick, seq))
        rows: list[pgfeed.Row] = []
        async for batch in sub:
            rows += batch.rows
            if len(rows) >= 3:
                break
    assert [(r.position.tick, r.position.seq) for r in rows] == expected
    assert all(r.position.tick > start for r in rows)
    assert range_reads == [], "the rows came with the newest tick, in the wake-up's one round trip"
