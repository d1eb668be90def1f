"""Tick fingerprints and the tokens that carry them, against a real server
(issue 9): a reader notices another history by the fingerprints of the ticks
it saw, and a position token proves what it names or is refused in one line.

The multi-server scenarios (failover, restore) are in tests/multiserver."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import psycopg
import pytest
from ticking import take_tick

import pgfeed
from pgfeed import admin
from pgfeed.core.cursor import OLDER_INCARNATION
from pgfeed.core.positions import PositionToken
from pgfeed.core.tokens import token_check
from pgfeed.errors import TokenError


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


# -- tokens that do not name a point of the stream are refused ---------------

Conn = psycopg.Connection[Any]


async def _read(dsn: str, stream: str, since: str, **options: Any) -> list[pgfeed.Row]:
    """Every row of ``stream`` after ``since`` up to now (raises what subscribe raises)."""
    async with pgfeed.AsyncReader(dsn, **options) as reader:
        sub = await reader.subscribe(stream, since, until="now")
        return [r async for b in sub for r in b.rows]


async def _refused(dsn: str, stream: str, token: str, match: str) -> str:
    """``token`` is refused by subscribe and by wait_for, in one line, before anything is delivered."""
    async with pgfeed.AsyncReader(dsn) as reader:
        with pytest.raises(TokenError, match=match) as refused:
            await reader.subscribe(stream, token)
        assert reader.position(stream) is None, "no subscription: nothing delivered"
        await reader.subscribe(stream, "now")
        with pytest.raises(TokenError, match=match):
            await reader.wait_for(stream, token, timeout=5)
    message = str(refused.value)
    assert "\n" not in message
    return message


def _interleaved(conn: Conn) -> None:
    """Streams ``a`` and ``b`` written by the same transactions, so that their
    rows share ticks and interleave in seq order."""
    admin.create_stream(conn, "a")
    admin.create_stream(conn, "b")
    for i in range(3):
        with conn.transaction():
            pgfeed.append(conn, "a", {"id": f"a{i}.0"})
            pgfeed.append(conn, "b", {"id": f"b{i}"})
            pgfeed.append(conn, "a", {"id": f"a{i}.1"})
        take_tick(conn)


async def test_a_made_up_partial_token_is_refused_instead_of_skipping_the_rest_of_its_tick(
    pgfeed_dsn: str, pgfeed_conn: Conn
) -> None:
    _interleaved(pgfeed_conn)
    rows = await _read(pgfeed_dsn, "a", "earliest")
    tick = rows[0].position.tick
    message = await _refused(pgfeed_dsn, "a", f"{tick}.999999999", "names no row of stream 'a'")
    assert f"resume from {tick - 1} to read tick {tick} whole" in message
    # A partial token pgfeed printed, bare (as 0.2.dev saved them), names a row: accepted.
    assert await _read(pgfeed_dsn, "a", str(rows[0].position)) == rows[1:]


async def test_a_token_of_another_stream_is_refused_checked_or_partial(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    _interleaved(pgfeed_conn)
    a = await _read(pgfeed_dsn, "a", "earliest")
    b = await _read(pgfeed_dsn, "b", "earliest")
    # b's first row sits between a's first two in seq order: read as a cut
    # on a, its token would skip a's first row.
    assert a[0].seq < b[0].seq < a[1].seq
    await _refused(pgfeed_dsn, "a", b[0].token, "does not belong to stream 'a' on this database")
    await _refused(pgfeed_dsn, "a", str(b[0].position), "names no row of stream 'a'")
    # Complete: b's check of the same tick is not a's.
    complete = PositionToken(pgfeed.Position(b[-1].position.tick), b[-1].check)
    await _refused(pgfeed_dsn, "a", str(complete), "does not belong")


async def test_a_token_of_a_dropped_and_recreated_stream_of_the_same_name_is_refused(
    pgfeed_dsn: str, pgfeed_conn: Conn
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append_many(pgfeed_conn, "orders", [{"id": i} for i in range(3)])
    old = await _read(pgfeed_dsn, "orders", "earliest")
    admin.drop_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"id": "new"})
    message = await _refused(pgfeed_dsn, "orders", old[0].token, "does not belong to stream 'orders'")
    assert "an earlier incarnation of this one" in message
    assert "resume from 'earliest' or from a token of this stream" in message
    # The same position, bare: older than the incarnation, so a reset to its start (as before).
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe("orders", str(old[0].position), until="now")
        got = [r.payload["id"] async for b in sub for r in b.rows]
    assert got == ["new"]
    assert resets == [OLDER_INCARNATION]


async def test_a_hand_altered_check_and_a_malformed_suffix_are_refused(
    pgfeed_dsn: str, stream: str, pgfeed_conn: Conn
) -> None:
    pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(3)])
    rows = await _read(pgfeed_dsn, stream, "earliest")
    token = rows[0].token
    altered = token[:-1] + ("0" if token[-1] != "0" else "1")
    await _refused(pgfeed_dsn, stream, altered, "does not belong to stream 'orders'")
    for malformed in (token + "0", token[:-1], token.replace("~", "~~"), token[:-1] + "G", token + "~abcdef"):
        await _refused(pgfeed_dsn, stream, malformed, "malformed position token.*expected TICK, TICK.SEQ, TICK~CHECK")


async def test_checked_tokens_resume_exactly_and_a_bare_complete_token_still_works(
    pgfeed_dsn: str, stream: str, pgfeed_conn: Conn
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(7)])
    take_tick(pgfeed_conn)
    pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(7, 10)])
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=3) as reader:
        sub = await reader.subscribe(stream, until="now")
        batches = [b async for b in sub]
    rows = [r for b in batches for r in b.rows]
    assert [r.payload["id"] for r in rows] == list(range(10))
    # From every batch's token (partial ones inside the 7-row tick included) and every row's.
    for b in batches:
        assert "~" in b.token
        assert await _read(pgfeed_dsn, stream, b.token, batch_size=4) == rows[rows.index(b.rows[-1]) + 1 :]
    for i, r in enumerate(rows):
        assert await _read(pgfeed_dsn, stream, r.token) == rows[i + 1 :]
    # A bare complete token: not verified, still a cut.
    first_tick = rows[0].position.tick
    assert await _read(pgfeed_dsn, stream, str(first_tick)) == rows[7:]
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        await reader.on(stream, lambda batch: None, since="earliest")
        assert await reader.wait_for(stream, rows[-1].token, timeout=10) >= rows[-1].position


# -- saved consumer positions carry their tick's fingerprint ------------------


def _saved(conn: Conn, consumer: str) -> tuple[str, int | None, int | None]:
    """(token, tick_fp, the fingerprint of that tick now) of a saved position."""
    row = conn.execute(
        "SELECT p.token, p.tick_fp, t.fp FROM pgfeed.positions p"
        " LEFT JOIN pgfeed.ticks t ON t.id = split_part(p.token, '.', 1)::bigint WHERE p.consumer = %s",
        (consumer,),
    ).fetchone()
    assert row is not None
    return str(row[0]), row[1], row[2]


async def _consume(dsn: str, stream: str, consumer: str, resets: list[str]) -> list[Any]:
    """Every row up to now as ``consumer`` (its position saved on close)."""
    async with pgfeed.AsyncReader(dsn, batch_size=2) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, consumer=consumer, until="now")
        return [r.payload["id"] async for b in sub for r in b.rows]


@pytest.mark.parametrize(
    ("meanwhile", "resumed", "reset"),
    [
        # Nothing happened: exactly the rest.
        (None, [4, 5], None),
        # Saved on a history the database no longer has (a failover to a standby
        # that lagged: its tick with that id is another): repeat, never skip.
        (
            "UPDATE pgfeed.positions SET tick_fp = tick_fp # 1",
            [0, 1, 2, 3, 4, 5],
            "the database's history changed since this consumer saved its position",
        ),
        # Saved by pgfeed 0.2.dev (or where the reader did not know the fingerprint): unverified.
        ("UPDATE pgfeed.positions SET tick_fp = NULL", [4, 5], None),
    ],
)
async def test_a_consumer_position_is_saved_with_its_ticks_fingerprint_and_checked_when_resumed(
    pgfeed_dsn: str, stream: str, pgfeed_conn: Conn, meanwhile: str | None, resumed: list[int], reset: str | None
) -> None:
    pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(4)])
    resets: list[str] = []
    assert await _consume(pgfeed_dsn, stream, "billing", resets) == [0, 1, 2, 3]
    token, saved_fp, fp = _saved(pgfeed_conn, "billing")
    assert "~" not in token, "saved bare: SQL parses it (prune, status)"
    assert saved_fp is not None
    assert saved_fp == fp
    if meanwhile is not None:
        pgfeed_conn.execute(meanwhile)
    pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(4, 6)])
    assert await _consume(pgfeed_dsn, stream, "billing", resets) == resumed
    assert len(resets) == (reset is not None)
    if reset is not None:
        assert reset in resets[0]
    _, saved_fp, fp = _saved(pgfeed_conn, "billing")
    assert saved_fp == fp, "saved again, on this history"
