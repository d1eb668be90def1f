"""Pruning: old rows and ticks go, and readers that needed them reset instead of skipping."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from ticking import take_tick

import pgfeed
from pgfeed.core.durations import parse_duration
from pgfeed.errors import UsageError
from pgfeed.reader import PRUNED
from pgfeed.retention import prune


def _age_everything(conn: psycopg.Connection[Any]) -> None:
    conn.execute("UPDATE pgfeed.ticks SET taken_at = taken_at - interval '2 days'")


def test_prune_deletes_old_rows_and_ticks_and_raises_the_floor(
    stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    for i in range(5):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
    old = take_tick(pgfeed_conn)
    _age_everything(pgfeed_conn)
    pgfeed.append(pgfeed_conn, stream, {"id": "kept"})
    take_tick(pgfeed_conn)
    result = prune(pgfeed_conn, 86400)
    assert result.floor_tick == old.tick
    assert result.events_deleted == 5
    assert result.ticks_deleted == old.tick - 1
    left = pgfeed_conn.execute("SELECT payload FROM pgfeed.events").fetchall()
    assert left == [({"id": "kept"},)]
    floors = pgfeed_conn.execute("SELECT DISTINCT floor_tick FROM pgfeed.streams").fetchall()
    assert floors == [(old.tick,)]
    assert prune(pgfeed_conn, 86400).events_deleted == 0  # idempotent


async def test_a_reader_older_than_the_floor_resets_then_reads_what_is_kept(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    pgfeed.append(pgfeed_conn, stream, {"id": "old"})
    start = str(take_tick(pgfeed_conn))
    pgfeed.append(pgfeed_conn, stream, {"id": "lost"})
    take_tick(pgfeed_conn)
    _age_everything(pgfeed_conn)
    pgfeed.append(pgfeed_conn, stream, {"id": "kept"})
    take_tick(pgfeed_conn)
    prune(pgfeed_conn, 86400)
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, start, until="now")
        batches = [b async for b in sub]
    assert resets == [PRUNED]
    assert batches[0].reset
    assert [r.payload["id"] for b in batches for r in b.rows] == ["kept"]


async def test_a_running_reader_overtaken_by_a_prune_resets(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    for i in range(30):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
        take_tick(pgfeed_conn)  # many ticks
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=5, queue_batches=1, tick_window=3) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, "earliest")
        first = await asyncio.wait_for(sub.__anext__(), 5)
        assert [r.payload["id"] for r in first.rows][:1] == [0]
        _age_everything(pgfeed_conn)
        pgfeed.append(pgfeed_conn, stream, {"id": "kept"})
        take_tick(pgfeed_conn)
        prune(pgfeed_conn, 86400)
        seen: list[Any] = []
        while "kept" not in seen:
            batch = await asyncio.wait_for(sub.__anext__(), 5)
            if batch.reset:
                seen.append("RESET")
            seen.extend(r.payload["id"] for r in batch.rows)
    assert resets == [PRUNED]
    assert seen[-2:] == ["RESET", "kept"]


def test_prune_cli(pgfeed_dsn: str, stream: str) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "pgfeed_cli", "--dsn", pgfeed_dsn, "prune", "--older-than", "7d"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("pruned 0 events")
    bad = subprocess.run(
        [sys.executable, "-m", "pgfeed_cli", "--dsn", pgfeed_dsn, "prune", "--older-than", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "pgfeed: error: invalid duration 'soon': expected a number and a unit ms, s, m, h or d, e.g. 7d, 90m or 50ms"
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("1.5h", 5400)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "7 weeks", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


def test_a_ticker_role_prunes_and_protects_every_role_s_consumers(
    stream: str, pgfeed_conn: psycopg.Connection[Any], pgfeed_dsn: str, make_role: Callable[[], str]
) -> None:
    """The daemon under `pgfeed grant ticker` keeps retention on, and its
    prune sees (and protects) saved positions of other roles, which the
    ticker role itself may not read (row-level security would hide them)."""
    from pgfeed import admin

    ticker, reader = make_role(), make_role()
    admin.grant_ticker(pgfeed_conn, ticker)
    admin.grant_reader(pgfeed_conn, reader)
    pgfeed.append(pgfeed_conn, stream, {"id": 0})
    first = take_tick(pgfeed_conn)
    with psycopg.connect(make_conninfo(pgfeed_dsn, user=reader), autocommit=True) as conn:  # a consumer of another role
        conn.execute(
            "INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('billing', %s, %s)",
            (stream, str(first.tick)),
        )
    for i in range(1, 4):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
        take_tick(pgfeed_conn)
    _age_everything(pgfeed_conn)
    take_tick(pgfeed_conn)
    with psycopg.connect(make_conninfo(pgfeed_dsn, user=ticker), autocommit=True) as conn:
        held = prune(conn, 86400)
    assert held.held_by_consumers
    assert held.floor_tick == first.tick
    assert held.events_deleted == 1  # what billing delivered; the 3 rows after its position stay
    left = pgfeed_conn.execute("SELECT payload ->> 'id' FROM pgfeed.events ORDER BY seq").fetchall()
    assert left == [("1",), ("2",), ("3",)]
