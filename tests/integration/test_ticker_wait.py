"""The ticker's wait in the server (``pgfeed.await_change_v4``): while
nothing changes it waits in one statement per idle interval, and ends as soon
as a row may have become visible since the newest tick, so that a row written
after a quiet spell is ticked within milliseconds while writers only INSERT."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from ticking import take_tick

import pgfeed
from pgfeed import admin
from pgfeed.ticker import Ticker

Conn = psycopg.Connection[Any]

WAIT = "SELECT pgfeed.await_change_v4(%s, 1)"


class Waiter:
    """``await_change_v4(timeout_ms)`` on a connection of its own, in a thread."""

    def __init__(self, dsn: str, timeout_ms: int) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.pid = self.conn.info.backend_pid
        self.result: tuple[bool, float] | None = None
        self.thread = threading.Thread(target=self._run, args=(timeout_ms,))
        self.thread.start()

    def _run(self, timeout_ms: int) -> None:
        t0 = time.monotonic()
        row = self.conn.execute(WAIT, (timeout_ms,)).fetchone()
        assert row is not None
        self.result = (bool(row[0]), time.monotonic() - t0)

    def wait_until_waiting(self, observer: Conn) -> None:
        """Bounded: until its backend runs the wait (the state under test)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = observer.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (self.pid,)).fetchone()
            if row and row[0] == "active" and "await_change_v4" in row[1]:
                return
            time.sleep(0.005)
        raise AssertionError("the wait never started")

    def join(self) -> tuple[bool, float]:
        self.thread.join(30)
        self.conn.close()
        assert self.result is not None, "the wait did not return"
        return self.result


def test_with_nothing_new_it_waits_out_its_timeout(pgfeed_conn: Conn, stream: str) -> None:
    pgfeed.append(pgfeed_conn, stream, {"n": 1})
    take_tick(pgfeed_conn)
    t0 = time.monotonic()
    assert pgfeed_conn.execute(WAIT, (200,)).fetchone() == (False,)
    assert time.monotonic() - t0 >= 0.2


def test_a_row_committed_since_the_newest_tick_ends_it_at_once(pgfeed_conn: Conn, stream: str) -> None:
    take_tick(pgfeed_conn)
    pgfeed.append(pgfeed_conn, stream, {"n": 1})
    t0 = time.monotonic()
    assert pgfeed_conn.execute(WAIT, (10_000,)).fetchone() == (True,)
    assert time.monotonic() - t0 < 5


def test_a_commit_during_the_wait_ends_it(pgfeed_dsn: str, pgfeed_conn: Conn, stream: str) -> None:
    take_tick(pgfeed_conn)
    waiter = Waiter(pgfeed_dsn, 20_000)
    waiter.wait_until_waiting(pgfeed_conn)
    pgfeed.append(pgfeed_conn, stream, {"n": 1})
    changed, seconds = waiter.join()
    assert changed
    assert seconds < 10, "it should end at the commit, not at its timeout"


def test_a_transaction_the_tick_saw_running_ends_it_when_it_commits(
    pgfeed_dsn: str, pgfeed_conn: Conn, stream: str
) -> None:
    # Its commit does not move the event sequence: the wait must look at the
    # transactions the newest tick listed as running.
    with psycopg.connect(pgfeed_dsn) as writer:
        pgfeed.append(writer, stream, {"n": 1})
        take_tick(pgfeed_conn)
        waiter = Waiter(pgfeed_dsn, 20_000)
        waiter.wait_until_waiting(pgfeed_conn)
        assert waiter.thread.is_alive(), "nothing is visible yet: still waiting"
        writer.commit()
        changed, seconds = waiter.join()
    assert changed
    assert seconds < 10


async def ticks_rows(ticker: Ticker, conn: Conn, stream: str, rows: int = 3) -> None:
    """Run ``ticker`` while ``rows`` rows are appended one by one: each gets a tick."""
    task = asyncio.create_task(ticker.run())
    try:
        for n in range(rows):
            seq = pgfeed.append(conn, stream, {"n": n})
            await until_ticked(conn, seq, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ticker.close()


async def test_on_a_schema_without_the_wait_the_ticker_polls(pgfeed_dsn: str, pgfeed_conn: Conn, stream: str) -> None:
    # A daemon of this release against a database not yet migrated to 0008.
    pgfeed_conn.execute("DROP FUNCTION pgfeed.await_change_v4(integer, integer)")
    ticker = Ticker(pgfeed_dsn, lease=2)
    await ticks_rows(ticker, pgfeed_conn, stream)
    assert not ticker._server_waits, "it found the wait missing and fell back"


async def test_a_ticker_role_that_may_not_wait_still_ticks(
    pgfeed_dsn: str, pgfeed_conn: Conn, stream: str, make_role: Any
) -> None:
    # `pgfeed grant ticker` of an earlier release granted the tick, not the wait.
    role = make_role()
    admin.grant_ticker(pgfeed_conn, role)
    pgfeed_conn.execute(
        sql.SQL("REVOKE EXECUTE ON FUNCTION pgfeed.await_change_v4(integer, integer) FROM {}").format(
            sql.Identifier(role)
        )
    )
    ticker = Ticker(make_conninfo(pgfeed_dsn, user=role), lease=2)
    await ticks_rows(ticker, pgfeed_conn, stream)
    assert not ticker._server_waits


async def test_a_poll_longer_than_the_statement_timeout_is_cut_to_the_wait(
    pgfeed_dsn: str, pgfeed_conn: Conn, stream: str
) -> None:
    # interval 2 s, lease 3 s: the statement timeout (lease / 3) is 1 s, the
    # wait 0.5 s (lease / 6); a 2 s poll must not outlast it.
    ticker = Ticker(pgfeed_dsn, lease=3, interval=2, idle_interval=5)
    task = asyncio.create_task(ticker.run())
    try:
        seq = pgfeed.append(pgfeed_conn, stream, {"n": 0})
        await until_ticked(pgfeed_conn, seq, task)
        checks = ticker.stats.checks
        deadline = time.monotonic() + 10
        while ticker.stats.checks < checks + 3 and time.monotonic() < deadline:  # three idle waits
            await asyncio.sleep(0.05)
        assert ticker.stats.checks >= checks + 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ticker.close()
    assert ticker.stats.reconnects == 0, "a wait outlasted the statement timeout"
    assert ticker._server_waits


async def until_ticked(conn: Conn, seq: int, task: asyncio.Task[None]) -> None:
    """Bounded: until a tick covers the row of ``seq`` (the state under test)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if task.done():
            task.result()  # the ticker failed: say why
            raise AssertionError("the ticker stopped")
        if conn.execute("SELECT 1 FROM pgfeed.ticks WHERE seq_hi >= %s", (seq,)).fetchone():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no tick covered seq {seq} within 10 s")


def test_the_inlined_fingerprint_is_the_one_0007_defined(pgfeed_conn: Conn, stream: str) -> None:
    # Ticks keep one fingerprint whatever release took them: _tick_fp_v4
    # (0008, inlined into the tick) must give _tick_fp_v3's values.
    for n in range(20):
        pgfeed.append(pgfeed_conn, stream, {"n": n})
        take_tick(pgfeed_conn)
    args = "t.id, t.snap, t.seq_lo, t.seq_hi, t.taken_at, t.term, t.system_id"
    row = pgfeed_conn.execute(
        f"SELECT count(*), count(*) FILTER (WHERE t.fp = pgfeed._tick_fp_v3({args})"  # noqa: S608  # constants
        f" AND t.fp = pgfeed._tick_fp_v4({args})) FROM pgfeed.ticks t"
    ).fetchone()
    assert row is not None
    assert row[0] > 20
    assert row[1] == row[0]
