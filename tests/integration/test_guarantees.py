"""The reader's guarantees, each against a real server under adversarial load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from ticking import daemon
from workloads import (
    Workload,
    append_end_marker,
    assert_exactly_once,
    assert_positions_increase,
    committed_order,
    ids_of,
    start_reader_process,
)

import pgfeed
from pgfeed import admin
from pgfeed.testing import TestServer


@pytest.fixture(
    params=[
        pytest.param("embedded", id="embedded-ticker"),
        pytest.param("daemon", id="daemon-readonly-reader", marks=pytest.mark.slow),
    ]
)
def reader_dsn(
    request: pytest.FixtureRequest, pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any], make_role: Callable[[], str]
) -> Iterator[str]:
    """Where the readers under test connect. ``embedded``: as the owner, the
    readers tick themselves. ``daemon``: `pgfeed daemon` ticks, and the readers
    run as a role with only `pgfeed grant reader` and
    ``default_transaction_read_only = on``: they must need no write at all."""
    if request.param == "embedded":
        yield pgfeed_dsn
        return
    role = make_role()
    admin.grant_reader(pgfeed_conn, role)
    with daemon(pgfeed_dsn):
        yield make_conninfo(pgfeed_dsn, user=role, options="-c default_transaction_read_only=on")


def test_concurrent_writers_two_live_readers_and_a_catch_up_reader_agree(
    pgfeed_dsn: str, reader_dsn: str, stream: str, tmp_path: Path
) -> None:
    live_a = start_reader_process(reader_dsn, stream, "earliest", tmp_path, "live_a")
    live_b = start_reader_process(reader_dsn, stream, "now", tmp_path, "live_b")
    work = Workload(pgfeed_dsn, stream, writers=16, transactions=12, long_transactions=2, long_seconds=3.0)
    work.run()
    append_end_marker(pgfeed_dsn, stream)
    rows_a = live_a.wait(60)
    rows_b = live_b.wait(60)
    catch_up = start_reader_process(reader_dsn, stream, "earliest", tmp_path, "catch_up")
    rows_c = catch_up.wait(60)

    assert len(work.committed) > 100
    assert sorted(committed_order(pgfeed_dsn, stream)) == sorted(work.committed)
    for rows in (rows_a, rows_b, rows_c):
        assert_exactly_once(ids_of(rows), work.committed)
        assert_positions_increase(rows)
    # One order everywhere, and the same token for the same row everywhere.
    assert rows_a == rows_b == rows_c


async def _collect(reader: pgfeed.AsyncReader, stream: str, since: str = "earliest") -> tuple[list[Any], Any]:
    sub = await reader.subscribe(stream, since)
    got: list[Any] = []

    async def run() -> None:
        async for batch in sub:
            got.extend(batch.rows)
            if any(isinstance(r.payload, dict) and r.payload.get("end") for r in batch.rows):
                return

    return got, asyncio.create_task(run())


def _backend_pids(dsn: str, app: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()", (app,)
            ).fetchall()
        ]


async def test_killed_reader_backends_lose_and_repeat_nothing(pgfeed_dsn: str, reader_dsn: str, stream: str) -> None:
    app_dsn = psycopg.conninfo.make_conninfo(reader_dsn, application_name="pgfeed-victim")
    async with pgfeed.AsyncReader(app_dsn, poll_interval=0.5, probe_interval=0.5) as reader:
        got, task = await _collect(reader, stream)
        work = Workload(pgfeed_dsn, stream, writers=6, transactions=25, long_transactions=0)
        writers = threading.Thread(target=work.run)
        writers.start()
        killed = 0
        while writers.is_alive():
            await asyncio.sleep(0.3)
            pids = _backend_pids(pgfeed_dsn, "pgfeed-victim")
            with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
                for pid in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed += len(pids)
        writers.join()
        append_end_marker(pgfeed_dsn, stream)
        await asyncio.wait_for(task, 60)
    assert killed >= 3
    delivered = [r.payload["id"] for r in got if "id" in r.payload]
    assert_exactly_once(delivered, work.committed)
    assert [r.position for r in got] == sorted(r.position for r in got)


@pytest.mark.restart
async def test_postgres_restart_mid_stream_recovers_without_loss_or_duplicates(
    pgfeed_server: TestServer, pgfeed_dsn: str, reader_dsn: str, stream: str
) -> None:
    if not pgfeed_server.can_restart:
        pytest.skip(f"this test restarts the server; {pgfeed_server.source} cannot be restarted by the tests")
    async with pgfeed.AsyncReader(reader_dsn, poll_interval=0.5, probe_interval=0.5) as reader:
        got, task = await _collect(reader, stream)
        work = Workload(pgfeed_dsn, stream, writers=4, transactions=40, long_transactions=0, tolerate_disconnects=True)
        writers = threading.Thread(target=work.run)
        writers.start()
        # Restart mid-stream: once rows flow, and again once more came after the first restart.
        await rows_delivered(got, 1)
        await asyncio.to_thread(pgfeed_server.restart, "fast")
        await rows_delivered(got, len(got) + 1)
        await asyncio.to_thread(pgfeed_server.restart, "immediate")
        writers.join()
        append_end_marker(pgfeed_dsn, stream)
        await asyncio.wait_for(task, 90)
    # After a crash the table is the truth: an acknowledged commit must be in it,
    # and the reader must have delivered exactly what it holds.
    in_table = committed_order(pgfeed_dsn, stream)
    assert set(work.committed) <= set(in_table)
    delivered = [r.payload["id"] for r in got if "id" in r.payload]
    assert_exactly_once(delivered, in_table)
    assert [r.position for r in got] == sorted(r.position for r in got)


async def test_long_write_transaction_elsewhere_does_not_delay_the_stream(
    pgfeed_dsn: str, reader_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    hold = float(os.environ.get("PGFEED_TEST_LONG_TX_SECONDS", "30"))
    pgfeed_conn.execute("CREATE TABLE other (x int)")
    blocker = psycopg.connect(pgfeed_dsn)
    blocker.execute("INSERT INTO other VALUES (1)")  # an open write transaction, held for `hold` seconds
    try:
        async with pgfeed.AsyncReader(reader_dsn) as reader:
            sub = await reader.subscribe(stream, "now")
            latencies = []
            started = time.monotonic()
            async with await psycopg.AsyncConnection.connect(pgfeed_dsn, autocommit=True) as writer:
                while time.monotonic() - started < hold:
                    await pgfeed.append(writer, stream, {"at": time.time()})
                    committed = time.monotonic()
                    batch = await asyncio.wait_for(sub.__anext__(), 10)
                    latencies.append(time.monotonic() - committed)
                    assert len(batch.rows) == 1
                    await asyncio.sleep(0.25)
        assert blocker.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        blocker.rollback()
        blocker.close()
    latencies.sort()
    assert len(latencies) >= hold * 2
    assert latencies[-1] < 1.0, f"slowest delivery {latencies[-1]:.3f}s while another transaction was open"


async def test_long_transaction_on_the_stream_delays_only_its_own_rows(
    pgfeed_dsn: str, reader_dsn: str, stream: str
) -> None:
    long_tx = psycopg.connect(pgfeed_dsn)
    pgfeed.append(long_tx, stream, {"id": "long"})
    try:
        async with pgfeed.AsyncReader(reader_dsn) as reader:
            sub = await reader.subscribe(stream, "earliest")
            with psycopg.connect(pgfeed_dsn, autocommit=True) as other:
                pgfeed.append(other, stream, {"id": "after"})
            first = await asyncio.wait_for(sub.__anext__(), 5)
            assert [r.payload["id"] for r in first.rows] == ["after"]
            long_tx.commit()
            batch = await asyncio.wait_for(sub.__anext__(), 5)
            assert [r.payload["id"] for r in batch.rows] == ["long"]
            # Appended first, committed last: ordered by its commit, after the row it waited behind.
            assert batch.rows[0].position > first.rows[0].position
            assert batch.rows[0].position.tick > first.position.tick
    finally:
        long_tx.close()


async def test_a_lost_notification_is_covered_by_the_poll(
    reader_dsn: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    admin.create_stream(pgfeed_conn, "quiet", notify_mode="poll")
    async with pgfeed.AsyncReader(reader_dsn, poll_interval=0.3) as reader:
        sub = await reader.subscribe("quiet", "now")
        pgfeed.append(pgfeed_conn, "quiet", {"id": 1})
        batch = await asyncio.wait_for(sub.__anext__(), 5)
        assert [r.payload for r in batch.rows] == [{"id": 1}]


async def test_half_open_listener_is_detected_and_replaced(pgfeed_dsn: str, reader_dsn: str, stream: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs to SIGSTOP a server backend (run as root or as the server's user)")
    app_dsn = psycopg.conninfo.make_conninfo(reader_dsn, application_name="pgfeed-frozen")
    async with pgfeed.AsyncReader(app_dsn, poll_interval=30, probe_interval=0.3, probe_timeout=0.5) as reader:
        sub = await reader.subscribe(stream, "now")
        listener = _listener_pids(pgfeed_dsn, "pgfeed-frozen")
        assert listener, "the listener's backend was not found"
        pid = listener[0]
        os.kill(pid, signal.SIGSTOP)  # the connection stays open but nothing answers: half-open
        try:
            # The probe times out and the listener reconnects: a new backend LISTENs.
            deadline = time.monotonic() + 10
            while not (set(_listener_pids(pgfeed_dsn, "pgfeed-frozen")) - {pid}):
                assert time.monotonic() < deadline, "the listener was not replaced"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
                pgfeed.append(conn, stream, {"id": "after-freeze"})
            batch = await asyncio.wait_for(sub.__anext__(), 5)
            # Delivered by a notification on the new listener, long before the 30 s poll.
            assert time.monotonic() - started < 3
            assert [r.payload["id"] for r in batch.rows] == ["after-freeze"]
        finally:
            os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _listener_pids(dsn: str, application_name: str) -> list[int]:
    """The backends of a reader's listener (its last statement a LISTEN or a probe)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND (query ILIKE '%%pg_notify%%' OR query ILIKE 'LISTEN%%')",
            (application_name,),
        ).fetchall()
    return [int(r[0]) for r in rows]


async def rows_delivered(got: list[Any], n: int, timeout: float = 30) -> None:
    """Wait until ``got`` holds ``n`` rows."""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} rows delivered after {timeout:g}s"
        await asyncio.sleep(0.05)
