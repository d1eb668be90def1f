"""`pgfeed status` and `pgfeed check` against a real server: lag counted against
what was written and delivered, a stalled consumer, a dead daemon, an open
transaction named with the rows committed after it, roles, exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import PGFEED, JsonLines, one_line_error, run_cli
from psycopg import sql
from psycopg.conninfo import make_conninfo
from ticking import daemon, take_tick

import pgfeed
from pgfeed import admin, migrator, status
from pgfeed.core.health import Status, Thresholds
from pgfeed.errors import NotMigrated, PermissionDenied, UnknownStream
from pgfeed.testing import TestServer

Conn = psycopg.Connection[Any]


def by_name(st: Status) -> dict[str, Any]:
    return {s.name: s for s in st.streams}


def consumers(st: Status) -> dict[tuple[str, str], Any]:
    return {(c.owner, c.consumer): c for c in st.consumers}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (the state under test), bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def save_position(conn: Conn, consumer: str, stream: str, token: str) -> None:
    conn.execute(
        "INSERT INTO pgfeed.positions (consumer, stream, token) VALUES (%s, %s, %s)"
        " ON CONFLICT (owner, consumer, stream) DO UPDATE SET token = excluded.token",
        (consumer, stream, token),
    )


# -- streams and consumers while writers and consumers run ------------------------
async def test_lag_is_what_was_written_minus_what_was_delivered(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "audit", notify_mode="immediate", max_payload_bytes=4096)
    pgfeed_conn.execute("CREATE TABLE public.accounts (id int PRIMARY KEY, balance int)")
    admin.capture(pgfeed_conn, "public", "accounts", "audit")
    total = 300
    written, half, go = threading.Event(), threading.Event(), threading.Event()
    tokens: list[str] = []

    def write() -> None:
        with psycopg.connect(pgfeed_dsn, autocommit=True) as w:
            for n in range(0, total, 2):
                if n == total // 2:
                    half.set()
                    go.wait(30)
                with w.transaction():
                    pgfeed.append_many(w, "orders", [{"n": n}, {"n": n + 1}])
                tokens.append(str(pgfeed.commit_token(w)))
            for i in range(3):
                w.execute("INSERT INTO public.accounts VALUES (%s, 0)", (i,))
        written.set()

    async def gather() -> Status:
        def run() -> Status:
            with psycopg.connect(pgfeed_dsn, autocommit=True) as c:
                return status.gather(c)

        return await asyncio.to_thread(run)

    with daemon(pgfeed_dsn):
        fast_rows: list[int] = []
        slow_seen: list[list[int]] = []
        async with (
            pgfeed.AsyncReader(pgfeed_dsn, ticker="off", batch_size=25, save_interval=0.05) as fast_reader,
            pgfeed.AsyncReader(pgfeed_dsn, ticker="off", batch_size=25, save_interval=0.05) as slow_reader,
        ):
            fast = await fast_reader.subscribe("orders", "earliest", consumer="fast")
            slow = await slow_reader.subscribe("orders", "earliest", consumer="slow")

            async def follow() -> None:
                async for batch in fast:
                    fast_rows.extend(r.payload["n"] for r in batch)

            follower = asyncio.create_task(follow())
            writer = threading.Thread(target=write)
            writer.start()
            # The slow consumer takes three batches: the third is in hand, not delivered.
            for _ in range(3):
                batch = await slow.__anext__()
                slow_seen.append([r.payload["n"] for r in batch])
            slow_delivered = [n for b in slow_seen[:2] for n in b]
            # Half way, the writer waits: status counts exactly what was written.
            assert await asyncio.to_thread(half.wait, 30)
            st = await gather()
            assert by_name(st)["orders"].rows == total // 2
            assert {c.consumer for c in st.consumers} <= {"fast", "slow"}
            for c in st.consumers:
                assert c.lag_rows is not None, c
                assert 0 <= c.lag_rows <= total // 2, c
            go.set()
            # Status while rows keep coming: every count is bounded by what was written.
            while not written.is_set():
                st = await gather()
                orders = by_name(st)["orders"]
                assert 0 < orders.rows <= total
                for c in st.consumers:
                    assert c.lag_rows is not None, c
                    assert 0 <= c.lag_rows <= orders.rows, c
                await asyncio.sleep(0)
            writer.join()
            await fast_reader.wait_for("orders", tokens[-1], timeout=30)
            follower.cancel()
            slow_position = slow.position
            # Saved by the readers' periodic save (every 50 ms). Not left to close(): a close
            # that races a periodic save in flight cancels it and keeps the older position
            # (AsyncReader.close, reader.py), which would make this test flaky.
            deadline = time.monotonic() + 30
            while dict(pgfeed_conn.execute("SELECT consumer, token FROM pgfeed.positions").fetchall()) != {
                "fast": str(fast.position),  # it moves on over ticks without its rows (audit's)
                "slow": str(slow.position),
            }:
                assert time.monotonic() < deadline, "the readers did not save their positions"
                await asyncio.sleep(0.01)
        # Both readers closed.

        st = await gather()
    assert fast_rows == list(range(total))
    assert slow_delivered == list(range(len(slow_delivered)))
    assert 0 < len(slow_delivered) < total

    orders, audit = by_name(st)["orders"], by_name(st)["audit"]
    assert (orders.rows, orders.recent_rows, orders.pending_rows) == (total, total, 0)
    assert orders.rows_per_second == total / 60
    part = pgfeed_conn.execute("SELECT pg_total_relation_size(%s::regclass)", (f"pgfeed.events_{orders.id}",))
    assert orders.bytes == part.fetchone()[0]  # type: ignore[index]
    head = pgfeed_conn.execute("SELECT max(id) FROM pgfeed.ticks").fetchone()
    assert orders.head == st.ticker.head_tick == head[0]  # type: ignore[index]
    assert (orders.notify_mode, orders.max_payload_bytes, orders.captures) == ("ticker", 1048576, ())
    assert (audit.rows, audit.notify_mode, audit.max_payload_bytes) == (3, "immediate", 4096)
    assert audit.captures == ("public.accounts",)
    first, last = pgfeed_conn.execute(
        "SELECT min(created_at), max(created_at) FROM pgfeed.events WHERE stream_id = %s", (orders.id,)
    ).fetchone()  # type: ignore[misc]
    assert (orders.oldest_kept, orders.last_append) == (first, last)

    t = st.ticker
    assert (t.live, t.kind) == (True, "daemon")
    assert "daemon" in (t.holder or "")
    in_last_minute = pgfeed_conn.execute(
        "SELECT count(*) FROM pgfeed.ticks WHERE taken_at > %s::timestamptz - interval '1 minute'", (st.now,)
    ).fetchone()
    assert t.ticks_last_minute == in_last_minute[0] > 0  # type: ignore[index]

    found = consumers(st)
    me = pgfeed_conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    fast_c, slow_c = found[(me, "fast")], found[(me, "slow")]
    assert (fast_c.lag_rows, fast_c.lag_seconds, fast_c.state) == (0, 0.0, "live")
    assert slow_c.token == str(slow_position)
    assert slow_c.lag_rows == total - len(slow_delivered)
    assert slow_c.state == "live"  # it moved moments ago; far from the 5 minute threshold
    # Lag in seconds: since the oldest row it has not delivered was appended,
    # but not before the tick of its position was taken.
    oldest, taken = pgfeed_conn.execute(
        "SELECT (SELECT min(created_at) FROM pgfeed.events"
        "         WHERE stream_id = %s AND NOT (payload->>'n')::int = ANY(%s)),"
        " (SELECT taken_at FROM pgfeed.ticks WHERE id = %s)",
        (orders.id, slow_delivered, slow_position.tick if slow_position else 0),
    ).fetchone()  # type: ignore[misc]
    assert slow_c.lag_seconds == (st.now - max(oldest, taken)).total_seconds()

    # The command prints the same, in JSON and as text, and exits 0.
    out = run_cli(pgfeed_dsn, "status", "--json", "orders")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert [s["name"] for s in doc["streams"]] == ["orders"]
    assert {(c["consumer"], c["lag_rows"]) for c in doc["consumers"]} == {("fast", 0), ("slow", slow_c.lag_rows)}
    assert (doc["healthy"], doc["problems"]) == (True, [])
    text = run_cli(pgfeed_dsn, "status")
    assert text.exit_code == 0
    line = next(li for li in text.stdout.splitlines() if li.strip().startswith("slow "))
    assert line.split()[:5] == ["slow", me, "orders", slow_c.token, str(slow_c.lag_rows)]
    assert "public.accounts" in text.stdout


# -- a stalled consumer ------------------------------------------------------------
def test_a_stalled_consumer_fails_status_with_one_line(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    for n in range(5):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    caught_up = take_tick(pgfeed_conn)
    save_position(pgfeed_conn, "stuck", "orders", str(caught_up))
    for n in range(5, 8):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    head = take_tick(pgfeed_conn)
    save_position(pgfeed_conn, "current", "orders", str(head))
    # Ten minutes pass (as far as the rows and ticks are concerned).
    pgfeed_conn.execute("UPDATE pgfeed.events SET created_at = created_at - interval '10 minutes'")
    pgfeed_conn.execute("UPDATE pgfeed.ticks SET taken_at = taken_at - interval '10 minutes'")

    st = status.gather(pgfeed_conn)
    found = {c.consumer: c for c in st.consumers}
    assert (found["stuck"].lag_rows, found["stuck"].state) == (3, "stalled")
    assert 600 <= (found["stuck"].lag_seconds or 0) < 660
    assert (found["current"].lag_rows, found["current"].state) == (0, "live")

    result = run_cli(pgfeed_dsn, "status")
    line = one_line_error_after_report(result)
    assert re.fullmatch(
        r"pgfeed: error: unhealthy: consumer 'stuck' \(role \w+\) on stream 'orders' is stalled: "
        r"3 rows, 10m0\ds behind \(max 5m00s\)",
        line,
    ), line
    assert "stuck" in result.stdout  # the report came first
    assert run_cli(pgfeed_dsn, "status", "--max-lag", "20m").exit_code == 0
    assert run_cli(pgfeed_dsn, "status", "--max-lag", "stuck=20m").exit_code == 0
    assert run_cli(pgfeed_dsn, "status", "--max-lag", "20m", "--max-lag", "stuck=1m").exit_code == 1
    doc = json.loads(run_cli(pgfeed_dsn, "status", "--json").stdout)
    assert doc["healthy"] is False
    assert [c["state"] for c in doc["consumers"]] == ["live", "stalled"]  # by stream, then consumer name

    # check: no ticker at all, and the stalled consumer.
    check = run_cli(pgfeed_dsn, "check")
    assert one_line_error(check, 1).startswith(
        "pgfeed: error: unhealthy: no live ticker: nobody holds the ticker lease"
    )
    assert "(and 1 more: consumer 'stuck'" in check.stderr


def test_max_lag_for_an_unknown_consumer_is_a_usage_error(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "audit")
    head = str(take_tick(pgfeed_conn))
    save_position(pgfeed_conn, "mailer", "orders", head)
    save_position(pgfeed_conn, "billing", "orders", head)
    save_position(pgfeed_conn, "archive", "audit", head)

    for command in (["status"], ["status", "--json"], ["status", "--check"], ["check"]):
        line = one_line_error(run_cli(pgfeed_dsn, *command, "--max-lag", "billing=1h", "--max-lag", "typo=1s"), 2)
        assert line == (
            "pgfeed: error: --max-lag names unknown consumer 'typo': "
            "the consumers saved in this database are archive, billing, mailer"
        ), (command, line)
    # Naming streams narrows what is known: archive follows audit only.
    line = one_line_error(run_cli(pgfeed_dsn, "status", "orders", "--max-lag", "archive=1m"), 2)
    assert line.endswith("unknown consumer 'archive': the consumers of the streams shown are billing, mailer")
    assert run_cli(pgfeed_dsn, "status", "--max-lag", "billing=1h", "--max-lag", "archive=1m").exit_code == 0
    known = run_cli(pgfeed_dsn, "check", "--max-lag", "mailer=1h")  # past the usage check: no ticker runs here
    assert one_line_error(known, 1).startswith("pgfeed: error: unhealthy: no live ticker")


def test_max_lag_for_a_consumer_in_an_empty_database(pgfeed_dsn: str) -> None:
    line = one_line_error(run_cli(pgfeed_dsn, "status", "--max-lag", "typo=1s"), 2)
    assert line == "pgfeed: error: --max-lag names unknown consumer 'typo': no consumer is saved in this database"


def one_line_error_after_report(result: Any) -> str:
    """The one stderr line of an unhealthy status (which printed its report first)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def test_a_consumer_whose_stream_was_dropped_or_pruned_past(pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    old = take_tick(pgfeed_conn)
    save_position(pgfeed_conn, "old", "orders", str(old))
    save_position(pgfeed_conn, "ancient", "orders", "12.1.7")
    save_position(pgfeed_conn, "lost", "nowhere", "3")
    admin.drop_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "orders")
    found = {c.consumer: c for c in status.gather(pgfeed_conn).consumers}
    assert (found["old"].state, found["old"].lag_rows) == ("reset pending", None)
    assert "incarnation" in (found["old"].reason or "")
    assert found["ancient"].state == "reset pending"
    assert "0.1" in (found["ancient"].reason or "")
    assert (found["lost"].state, found["lost"].reason) == ("gone", "the stream no longer exists")
    with pytest.raises(UnknownStream, match="'nowhere'"):
        status.gather(pgfeed_conn, ["orders", "nowhere"])
    assert [c.consumer for c in status.gather(pgfeed_conn, ["orders"]).consumers] == [
        "ancient",
        "old",
    ]


# -- a dead daemon -----------------------------------------------------------------
def test_a_dead_daemon_with_rows_waiting(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    with daemon(pgfeed_dsn) as proc:
        ok = run_cli(pgfeed_dsn, "check")
        assert ok.exit_code == 0, ok.output
        assert ok.stdout.startswith("ok: schema version ")
        assert re.search(rf"ticker daemon 'daemon \S+ pid {proc.pid}', term \d+", ok.stdout), ok.stdout
        st = status.gather(pgfeed_conn)
        assert st.ticker.live
        assert f"pid {proc.pid}" in (st.ticker.holder or "")
        proc.kill()
        proc.wait()
    wait_until(
        lambda: not pgfeed_conn.execute("SELECT expires_at > clock_timestamp() FROM pgfeed.ticker").fetchone()[0],  # type: ignore[index]
        "the killed daemon's lease expiring",
    )
    assert status.gather(pgfeed_conn).pending_rows == 0
    assert run_cli(pgfeed_dsn, "status").exit_code == 0  # nothing waits: an idle feed needs no ticker
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    pgfeed.append(pgfeed_conn, "orders", {"n": 2})
    st = status.gather(pgfeed_conn)
    assert (st.pending_rows, by_name(st)["orders"].pending_rows, st.ticker.live) == (2, 2, False)
    # The newest tick is seconds old: within --max-tick-age (30s) it is not dead yet ...
    assert run_cli(pgfeed_dsn, "status").exit_code == 0
    # ... but it is past a tighter threshold, and once the tick is old.
    line = one_line_error_after_report(run_cli(pgfeed_dsn, "status", "--max-tick-age", "1ms"))
    assert line.startswith("pgfeed: error: unhealthy: ticker dead: no live lease; last holder 'daemon ")
    assert "and 2 committed rows wait for one; start `pgfeed daemon`" in line
    pgfeed_conn.execute("UPDATE pgfeed.ticks SET taken_at = taken_at - interval '1 hour'")
    assert "ticker dead" in one_line_error_after_report(run_cli(pgfeed_dsn, "status"))
    check = run_cli(pgfeed_dsn, "check")
    assert "no live ticker" in one_line_error(check, 1)
    # A tick taken (here by hand) covers the rows: healthy again.
    take_tick(pgfeed_conn)
    assert run_cli(pgfeed_dsn, "status").exit_code == 0


# -- holdback ------------------------------------------------------------------------
def test_an_open_transaction_is_named_with_the_rows_committed_after_it(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "other")
    pgfeed.append(pgfeed_conn, "orders", {"n": "before"})
    blocker = psycopg.connect(make_conninfo(pgfeed_dsn, application_name="billing job"))
    snapshot = psycopg.connect(make_conninfo(pgfeed_dsn, application_name="report"))
    try:
        # A transaction of its own (not autocommit), left open after appending.
        blocker_xid = blocker.execute("SELECT pg_current_xact_id()::text").fetchone()[0]  # type: ignore[index]
        pgfeed.append(blocker, "orders", {"n": "held"})
        for n in range(3):
            pgfeed.append(pgfeed_conn, "orders", {"n": n})
        pgfeed.append(pgfeed_conn, "other", {"n": 0})
        snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        snapshot.execute("SELECT count(*) FROM pg_class")

        st = status.gather(pgfeed_conn, thresholds=Thresholds(long_xact=0))
        (w,) = by_name(st)["orders"].writers
        assert by_name(st)["other"].writers == ()
        assert w.session.pid == blocker.info.backend_pid
        assert w.session.application_name == "billing job"
        assert w.session.state == "idle in transaction"
        assert w.session.backend_xid == int(blocker_xid)
        assert "pgfeed.append" in (w.session.query or "")
        assert w.committed_after == 3
        holders = {h.session.pid: h for h in st.xmin_holders if h.session}
        assert {blocker.info.backend_pid, snapshot.info.backend_pid} <= set(holders)
        assert holders[snapshot.info.backend_pid].session.application_name == "report"  # type: ignore[union-attr]

        text = run_cli(pgfeed_dsn, "status", "--long-xact", "0s")
        assert text.exit_code == 0, text.output
        assert re.search(
            rf"orders: pid {blocker.info.backend_pid} \(billing job, \w+(, [0-9a-f.:]+)?\) idle in transaction for "
            rf"\S+, xid {blocker_xid}; 3 rows of later transactions committed; query: SELECT pgfeed\.append",
            text.stdout,
        ), text.stdout
        assert f"pid {snapshot.info.backend_pid} (report" in text.stdout
        # Younger than the default 30 s: not named.
        assert by_name(status.gather(pgfeed_conn))["orders"].writers == ()
    finally:
        pids = [blocker.info.backend_pid, snapshot.info.backend_pid]
        blocker.close()
        snapshot.close()
    wait_until(
        lambda: not pgfeed_conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall(),
        "the closed sessions ending",
    )
    st = status.gather(pgfeed_conn, thresholds=Thresholds(long_xact=0))
    assert by_name(st)["orders"].writers == ()
    assert not set(pids) & {h.session.pid for h in st.xmin_holders if h.session}


# -- roles, readers, heartbeats ---------------------------------------------------------
def test_a_monitoring_role_sees_every_roles_consumers_and_the_live_readers(
    pgfeed_dsn: str, pgfeed_conn: Conn, pgfeed_server: TestServer, make_role: Callable[[], str]
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    head = take_tick(pgfeed_conn)
    save_position(pgfeed_conn, "own", "orders", str(head))
    worker, monitor, nobody = make_role(), make_role(), make_role()
    admin.grant_reader(pgfeed_conn, worker)
    # `pgfeed grant reader` does not grant the heartbeat yet (admin.py); readers granted before 0006 have it.
    pgfeed_conn.execute(
        sql.SQL("GRANT EXECUTE ON FUNCTION pgfeed.consumer_heartbeat_v2(text, text) TO {}").format(
            sql.Identifier(worker)
        )
    )
    pgfeed_conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(monitor)))
    app = "pgfeed reader orders consumer=billing"
    with psycopg.connect(make_conninfo(pgfeed_dsn, user=worker, application_name=app), autocommit=True) as w:
        assert w.execute("SELECT pgfeed.consumer_heartbeat_v2('billing', 'orders')").fetchone() == (False,)
        save_position(w, "billing", "orders", str(head))
        assert w.execute("SELECT pgfeed.consumer_heartbeat_v2('billing', 'orders')").fetchone() == (True,)
        assert w.execute("SELECT consumer FROM pgfeed.positions").fetchall() == [("billing",)]  # RLS holds
        with psycopg.connect(make_conninfo(pgfeed_dsn, user=monitor), autocommit=True) as m:
            st = status.gather(m)
        found = consumers(st)
        billing = found[(worker, "billing")]
        assert "own" in {c for _, c in found}
        assert billing.lag_rows == 0
        assert billing.seen_at is not None
        assert billing.updated_at is not None
        assert billing.seen_at >= billing.updated_at
        assert re.fullmatch(rf"{app} @\S+ pid {w.info.backend_pid}", billing.seen_by or ""), billing.seen_by
        assert [s.pid for s in billing.held_by] == [w.info.backend_pid]
        assert billing.state == "live"
        assert [s.pid for s in st.readers] == [w.info.backend_pid]
        assert st.readers[0].usename == worker
    # Without pg_monitor (or the owner) nothing is shown, in one line saying what to grant.
    with (
        psycopg.connect(make_conninfo(pgfeed_dsn, user=nobody), autocommit=True) as n,
        pytest.raises(PermissionDenied, match="pg_monitor"),
    ):
        status.gather(n)
    denied = run_cli(make_conninfo(pgfeed_dsn, user=nobody), "status")
    assert "GRANT pg_monitor TO" in one_line_error(denied, 1)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Await until ``condition()`` (the state under test), bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        await asyncio.sleep(0.02)


async def _status(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `pgfeed status` command, off the event loop (the readers under test keep running)."""
    return await asyncio.to_thread(
        subprocess.run, [PGFEED, "--dsn", dsn, "status", *args], capture_output=True, text=True, timeout=60
    )


async def test_an_embedded_reader_is_a_live_reader_in_status(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "audit")
    for n in range(3):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    head = take_tick(pgfeed_conn)
    me = os.getpid()
    name = f"pgfeed reader pid={me} audit,orders consumer=billing"

    def sessions() -> dict[int, str]:
        """This process's reader backends and their names."""
        found = pgfeed_conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"pgfeed reader pid={me}%",),
        ).fetchall()
        return dict(found)

    def saved() -> str | None:
        row = pgfeed_conn.execute("SELECT token FROM pgfeed.positions WHERE consumer = 'billing'").fetchone()
        return None if row is None else str(row[0])

    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off", probe_interval=0.1, save_interval=0.02) as reader:
        await reader.on("orders", lambda batch: None, consumer="billing")
        await reader.subscribe("audit", "now")
        await reader.wait_for("orders", str(head))
        # The listener and the read connection: the pooled one renamed when borrowed, the listener at a probe.
        await _until(lambda: list(sessions().values()) == [name] * 2, "both connections named")
        await _until(lambda: saved() == str(head), "the position saved")
        backends = sorted(sessions())
        host = pgfeed_conn.execute(
            "SELECT host(client_addr) FROM pg_stat_activity WHERE pid = %s", (backends[0],)
        ).fetchone()[0]  # type: ignore[index]
        out = await _status(pgfeed_dsn, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert [r for r in doc["readers"] if r["pid"] == me] == [
            {
                "pid": me,
                "host": host,
                "usename": pgfeed_conn.info.user,
                "application_names": [name],
                "streams": ["audit", "orders"],
                "more_streams": 0,
                "consumers": ["billing"],
                "backends": backends,
                "positions": [
                    {
                        "consumer": "billing",
                        "stream": "orders",
                        "token": str(head),
                        "lag_rows": 0,
                        "lag_seconds": 0.0,
                        "state": "live",
                    }
                ],
            }
        ]
        (billing,) = [c for c in doc["consumers"] if c["consumer"] == "billing"]
        assert sorted(s["pid"] for s in billing["held_by"]) == backends
        text = await _status(pgfeed_dsn)
        assert text.returncode == 0, text.stderr
        row = next(line.split() for line in text.stdout.splitlines() if line.strip().startswith(str(me)))
        user, streams = pgfeed_conn.info.user, "audit,orders"
        held = [str(me), host or "local", user, streams, "billing", "(orders)", str(head), "0", "0ms"]
        assert row == [*held, ",".join(map(str, backends))]
    await _until(lambda: sessions() == {}, "the backends of the closed reader gone")  # they exit after close
    doc = json.loads((await _status(pgfeed_dsn, "--json")).stdout)
    assert [r for r in doc["readers"] if r["pid"] == me] == []


async def test_a_reader_keeps_the_application_name_the_dsn_gives(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")

    def named(app: str) -> list[tuple[str, str]]:
        found = pgfeed_conn.execute(
            "SELECT application_name, query FROM pg_stat_activity WHERE application_name LIKE %s ORDER BY pid",
            (app,),
        ).fetchall()
        return [(str(a), str(q)) for a, q in found]

    dsn = make_conninfo(pgfeed_dsn, application_name="billing-app")
    async with pgfeed.AsyncReader(dsn, ticker="off", probe_interval=0.1) as reader:
        await reader.subscribe("orders", consumer="billing")
        # The listener has probed since: its renaming (had it been wrong) came right after.
        await _until(lambda: any("pg_notify" in q for _, q in named("billing-app")), "a probe of the listener")
        assert len(named("billing-app")) == 2
        assert named(f"pgfeed reader pid={os.getpid()}%") == []


async def test_a_reader_sends_heartbeats_when_asked(
    pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    head = take_tick(pgfeed_conn)

    def seen(consumer: str) -> tuple[Any, Any]:
        row = pgfeed_conn.execute(
            "SELECT seen_at, seen_by FROM pgfeed.positions WHERE consumer = %s", (consumer,)
        ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off", save_interval=0.02) as reader:
        await reader.on("orders", lambda batch: None, consumer="billing")
        await reader.wait_for("orders", str(head))
        assert "pgfeed-consumer-heartbeat" not in {t.get_name() for t in asyncio.all_tasks()}  # off by default
    assert seen("billing") == (None, None)
    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off", save_interval=0.02, heartbeat=0.05) as reader:
        await reader.subscribe("orders", consumer="billing")  # resumes at the head of a quiet stream
        await _until(lambda: seen("billing")[0] is not None, "a heartbeat")
        first, by = seen("billing")
        await _until(lambda: seen("billing")[0] > first, "the next heartbeat")
        assert by.startswith(f"pgfeed reader pid={os.getpid()} orders consumer=billing @"), by
        with psycopg.connect(pgfeed_dsn, autocommit=True) as c:
            (billing,) = status.gather(c).consumers
        assert (billing.state, billing.lag_rows, billing.seen_at is not None) == ("live", 0, True)

    # A role that may not send them: off for good, in one warning; delivery goes on.
    role = make_role()
    admin.grant_reader(pgfeed_conn, role)
    pgfeed_conn.execute(
        sql.SQL("REVOKE EXECUTE ON FUNCTION pgfeed.consumer_heartbeat_v2(text, text) FROM {}").format(
            sql.Identifier(role)
        )
    )
    caplog.set_level(logging.INFO, logger="pgfeed")
    dsn = make_conninfo(pgfeed_dsn, user=role)
    async with pgfeed.AsyncReader(dsn, ticker="off", save_interval=0.02, heartbeat=0.02) as reader:
        await reader.on("orders", lambda batch: None, consumer="search")
        await _until(lambda: any("heartbeats off" in r.getMessage() for r in caplog.records), "the warning")
        pgfeed.append(pgfeed_conn, "orders", {"n": 2})
        await reader.wait_for("orders", str(take_tick(pgfeed_conn)))
    warned = [r for r in caplog.records if "heartbeat" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert warned[0].levelno == logging.WARNING
    assert "EXECUTE on pgfeed.consumer_heartbeat_v2" in warned[0].getMessage()


# -- check exit codes --------------------------------------------------------------------
def test_check_exit_codes(pgfeed_server: TestServer, fresh_db: str, tmp_path: Path) -> None:
    fresh = pgfeed_server.dsn_for(fresh_db)
    line = one_line_error(run_cli(fresh, "check"), 1)
    assert line == "pgfeed: error: unhealthy: the pgfeed schema is not installed in this database: run `pgfeed migrate`"
    shipped = migrator.load_migrations()
    before_status = [m for m in shipped if m.version < 6]  # 0006 installs what status reads
    for m in before_status:
        shutil.copy(migrator.migrations_dir() / f"{m.version:04d}_{m.name}.sql", tmp_path)
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrator.migrate(conn, directory=tmp_path)
        with pytest.raises(NotMigrated, match="0006"):
            status.gather(conn)
    line = one_line_error(run_cli(fresh, "check"), 1)
    assert line == (
        f"pgfeed: error: unhealthy: the pgfeed schema is at version {before_status[-1].version}, "
        f"this pgfeed expects {shipped[-1].version}: run `pgfeed migrate`"
    )
    unreachable = one_line_error(run_cli(make_conninfo(fresh, port="1", host="127.0.0.1"), "check"), 1)
    assert "127.0.0.1" in unreachable or "connect" in unreachable
    assert one_line_error(run_cli(fresh, "status", "Bad-Name"), 2).startswith("pgfeed: error: invalid value")


def test_status_of_an_unknown_stream(pgfeed_dsn: str) -> None:
    line = one_line_error(run_cli(pgfeed_dsn, "status", "nope"), 1)
    assert line == "pgfeed: error: unknown stream 'nope': create it with `pgfeed stream create nope`"


def test_watch_reports_until_sigterm(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    proc = subprocess.Popen(
        [PGFEED, "--dsn", pgfeed_dsn, "status", "--watch", "0.1", "--json", "orders"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = JsonLines(proc)
        (first,) = lines.take(1)
        assert first["streams"][0]["rows"] == 0
        pgfeed.append(pgfeed_conn, "orders", {"n": 1})
        deadline = time.monotonic() + 15
        while lines.take(1)[0]["streams"][0]["rows"] != 1:  # a later report sees the row
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
