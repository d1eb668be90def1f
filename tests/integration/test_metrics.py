"""Prometheus metrics against a real server: `pgfeed daemon --metrics-port`
scraped over HTTP and parsed with prometheus_client's parser, and a reader's
opt-in ReaderCollector."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.request
from typing import Any

import psycopg
import pytest
from helpers import PGFEED
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo
from ticking import daemon, take_tick

import pgfeed
from pgfeed import admin
from pgfeed.errors import HandlerFailed, PgfeedError, UsageError
from pgfeed.metrics import ReaderCollector

Conn = psycopg.Connection[Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: The only labels pgfeed's series carry (le: a histogram's buckets).
LABELS = {"stream", "consumer", "le"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(port: int) -> tuple[Samples, float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return parse(text), time.monotonic() - started


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape_until(port: int, condition: Any, what: str, timeout: float = 30) -> Samples:
    """Scrape until ``condition(samples)`` holds (the state under test), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples, _ = scrape(port)
            if condition(samples):
                return samples
        except (OSError, KeyError):
            pass  # not serving yet, or the series is not there yet
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not show within {timeout:g}s")
        time.sleep(0.05)


def test_the_daemon_serves_its_metrics_and_the_databases(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    admin.create_stream(pgfeed_conn, "audit")
    for n in range(4):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    early = take_tick(pgfeed_conn)
    pgfeed_conn.execute(
        "INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('slow', 'orders', %s)", (str(early),)
    )
    for n in range(4, 10):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    port = free_port()
    blocker = psycopg.connect(pgfeed_dsn)
    try:
        with daemon(pgfeed_dsn, "--metrics-port", str(port), "--metrics-timeout", "1s") as proc:
            samples = scrape_until(
                port,
                lambda s: value(s, "pgfeed_stream_pending_rows", stream="orders") == 0,
                "the daemon ticking the rows",
            )
            assert value(samples, "pgfeed_ticker_leading") == 1
            head = pgfeed_conn.execute("SELECT max(id) FROM pgfeed.ticks").fetchone()[0]  # type: ignore[index]
            pgfeed_conn.execute(
                "INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('done', 'orders', %s)", (str(head),)
            )
            pgfeed.append(blocker, "orders", {"n": "held"})  # its transaction stays open
            for n in range(10, 12):
                pgfeed.append(pgfeed_conn, "orders", {"n": n})
            samples = scrape_until(
                port,
                lambda s: (
                    value(s, "pgfeed_stream_pending_rows", stream="orders") == 0
                    and value(s, "pgfeed_stream_rows", stream="orders") == 12
                ),
                "the two later rows ticked",
            )
            # Scraped again: the process's counters are read before the database, so a tick
            # the database showed may be missing from the same scrape's counters.
            samples, _ = scrape(port)
            assert value(samples, "pgfeed_scrape_ok") == 1
            assert value(samples, "pgfeed_ticker_lease_live") == 1
            assert value(samples, "pgfeed_ticker_leader_changes_total") == 1
            ticks = value(samples, "pgfeed_ticker_ticks_total")
            observed = value(samples, "pgfeed_tick_duration_seconds_count")
            assert ticks >= 2
            assert ticks - 1 <= observed <= ticks  # observed just after the count moved
            assert value(samples, "pgfeed_ticker_checks_total") >= ticks
            assert 0 <= value(samples, "pgfeed_ticker_heartbeat_age_seconds") < 3  # renewed every lease/3 (2s lease)
            assert value(samples, "pgfeed_tick_id") >= head
            assert value(samples, "pgfeed_tick_lag_seconds") == 0
            assert value(samples, "pgfeed_stream_rows", stream="audit") == 0
            size = pgfeed_conn.execute(
                "SELECT pg_total_relation_size('pgfeed.events_' || id) FROM pgfeed.streams WHERE name = 'orders'"
            ).fetchone()[0]  # type: ignore[index]
            assert value(samples, "pgfeed_stream_bytes", stream="orders") == size
            assert value(samples, "pgfeed_stream_rows_written_per_second", stream="orders") == 12 / 60
            assert value(samples, "pgfeed_stream_open_writers", stream="orders") == 1
            assert value(samples, "pgfeed_stream_open_writers", stream="audit") == 0
            assert value(samples, "pgfeed_stream_open_writer_committed_after_rows", stream="orders") == 2
            assert value(samples, "pgfeed_stream_open_writer_age_seconds", stream="orders") > 0
            assert value(samples, "pgfeed_consumer_lag_rows", stream="orders", consumer="slow") == 12 - 4
            assert value(samples, "pgfeed_consumer_lag_seconds", stream="orders", consumer="slow") > 0
            assert value(samples, "pgfeed_consumer_lag_rows", stream="orders", consumer="done") == 2
            assert value(samples, "pgfeed_oldest_transaction_age_seconds") > 0
            for name, labels in samples:
                if name.startswith("pgfeed_"):
                    assert {k for k, _ in labels} <= LABELS, (name, labels)

            # A database that does not answer in time: the scrape still returns, within the timeout.
            with psycopg.connect(pgfeed_dsn) as locker:
                locker.execute("LOCK TABLE pgfeed.positions IN ACCESS EXCLUSIVE MODE")
                samples, took = scrape(port)
                assert value(samples, "pgfeed_scrape_ok") == 0
                assert took < 1 + 2  # the 1 s timeout, and some slack for a busy machine
                assert value(samples, "pgfeed_ticker_leading") == 1  # the process's own metrics stay
                assert ("pgfeed_consumer_lag_rows", (("consumer", "slow"), ("stream", "orders"))) not in samples
                locker.rollback()
            samples, _ = scrape(port)
            assert value(samples, "pgfeed_scrape_ok") == 1, proc_stderr(proc)
    finally:
        blocker.close()


def proc_stderr(proc: Any) -> str:
    proc.terminate()
    return str(proc.communicate(timeout=20)[1])


def test_a_metrics_port_in_use_is_one_line(pgfeed_dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [PGFEED, "--dsn", pgfeed_dsn, "daemon", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"pgfeed: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]


def test_a_role_without_pg_monitor_gets_the_ticker_metrics_only(
    pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Any
) -> None:
    role = make_role()
    admin.grant_ticker(pgfeed_conn, role)
    port = free_port()
    with daemon(make_conninfo(pgfeed_dsn, user=role), "--metrics-port", str(port)) as proc:
        samples = scrape_until(port, lambda s: value(s, "pgfeed_ticker_leading") == 1, "the daemon leading")
        assert value(samples, "pgfeed_scrape_ok") == 0
        assert ("pgfeed_ticker_lease_live", ()) not in samples
    assert proc.stderr is not None
    warned = [line for line in proc.stderr.read().splitlines() if "cannot read the database" in line]
    assert len(warned) == 1, warned  # once, not at every scrape
    assert "pg_monitor" in warned[0]


# -- reader side ----------------------------------------------------------------
async def test_a_reader_collector_counts_what_the_application_took(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    for n in range(5):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    tick = take_tick(pgfeed_conn)
    # A consumer saved before this incarnation of the stream: it resets.
    pgfeed_conn.execute("INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('old', 'orders', '1')")
    registry = CollectorRegistry()
    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off", batch_size=2, handler_retries=0) as reader:
        metrics = ReaderCollector(reader, registry=registry)
        sub = metrics.track(await reader.subscribe("orders", "earliest", until=str(tick), consumer="billing"))
        batches = 0
        async for batch in sub:
            metrics.observe(batch, consumer="billing")
            batches += 1
        assert batches == 3  # 2 + 2 + 1 rows
        got: list[int] = []
        await reader.on("orders", metrics.handler(lambda b: got.extend(r.payload["n"] for r in b), consumer="cb"))
        await reader.wait_for("orders", str(tick), timeout=30)
        async with await reader.subscribe("orders", consumer="old", until=str(tick)) as old:
            async for batch in old:
                metrics.observe(batch, consumer="old")

        def fail(batch: pgfeed.Batch) -> None:
            raise RuntimeError("boom")

        await reader.on("orders", fail, consumer="failing")
        with pytest.raises(HandlerFailed):
            await reader.wait_for("orders", str(tick), timeout=30)
        deadline = time.monotonic() + 30
        while ("pgfeed_reader_handler_failures_total", (("stream", "orders"),)) not in parse(
            generate_latest(registry).decode()
        ):
            assert time.monotonic() < deadline, "the on_error hook did not run"
            await asyncio.sleep(0.01)

        samples = parse(generate_latest(registry).decode())
        assert got == [0, 1, 2, 3, 4]
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == 5
        assert value(samples, "pgfeed_reader_batches_delivered_total", stream="orders", consumer="billing") == 3
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="cb") == 5
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="old") == 5
        for consumer in ("billing", "cb", "old"):
            assert (
                value(samples, "pgfeed_reader_delivery_latency_seconds_count", stream="orders", consumer=consumer) == 5
            )
        assert (
            "pgfeed_reader_delivery_latency_seconds_count",
            (("consumer", "failing"), ("stream", "orders")),
        ) not in samples
        assert value(samples, "pgfeed_reader_lag_ticks", stream="orders", consumer="billing") == 0
        assert not any(name.endswith("_reconnects_total") for name, _ in samples)  # it cannot see them
        assert value(samples, "pgfeed_reader_resets_total", stream="orders") == 1
        assert value(samples, "pgfeed_reader_handler_failures_total", stream="orders") == 1
        assert value(samples, "pgfeed_reader_position_tick", stream="orders", consumer="billing") == tick.tick
        for name, labels in samples:
            assert {k for k, _ in labels} <= LABELS, (name, labels)

        # Served over HTTP only when asked.
        server = metrics.serve(0, "127.0.0.1")
        try:
            http, _ = await asyncio.to_thread(scrape, server.server_port)
        finally:
            server.shutdown()
            server.server_close()
        assert value(http, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == 5
        with pytest.raises(PgfeedError, match="no registry"):
            ReaderCollector(reader, registry=None).serve(0)


def test_a_reader_collector_on_the_threaded_reader(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    tick = take_tick(pgfeed_conn)
    registry = CollectorRegistry()
    with pgfeed.Reader(pgfeed_dsn, ticker="off") as reader:
        metrics = ReaderCollector(reader, registry=registry)
        metrics.watch("orders")
        assert ("pgfeed_reader_position_tick", (("consumer", ""), ("stream", "orders"))) not in parse(
            generate_latest(registry).decode()
        )
        reader.on("orders", metrics.handler(lambda b: None))
        reader.wait_for("orders", str(tick), timeout=30)
        samples = parse(generate_latest(registry).decode())
    assert value(samples, "pgfeed_reader_position_tick", stream="orders", consumer="") == tick.tick
    assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="") == 1


# -- a reader's own metrics (metrics=) ---------------------------------------------------
async def _scrape_until(registry: CollectorRegistry, condition: Any, what: str, timeout: float = 30) -> Samples:
    """Scrape ``registry`` until ``condition(samples)`` holds (the state under test), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parse(generate_latest(registry).decode())
        try:
            if condition(samples):
                return samples
        except KeyError:
            pass  # the series is not there yet
        assert time.monotonic() < deadline, f"{what} did not show within {timeout:g}s"
        await asyncio.sleep(0.02)


async def test_a_reader_counts_what_it_delivers_into_the_applications_registry(
    pgfeed_dsn: str, pgfeed_conn: Conn
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    for n in range(5):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
    first = take_tick(pgfeed_conn)
    registry = CollectorRegistry()
    gate = asyncio.Event()
    taken: list[int] = []

    async def slow(batch: pgfeed.Batch) -> None:
        taken.extend(r.payload["n"] for r in batch)
        await gate.wait()

    async with pgfeed.AsyncReader(
        pgfeed_dsn, ticker="off", batch_size=2, poll_interval=0.05, metrics=registry
    ) as reader:
        await reader.on("orders", lambda batch: None, consumer="billing")
        async with await reader.subscribe("orders", until=str(first)) as sub:
            anonymous = [len(batch) async for batch in sub]
        await reader.wait_for("orders", str(first))
        samples = parse(generate_latest(registry).decode())
        assert anonymous == [2, 2, 1]
        for consumer in ("billing", ""):
            labels = {"stream": "orders", "consumer": consumer}
            assert value(samples, "pgfeed_reader_rows_delivered_total", **labels) == 5
            assert value(samples, "pgfeed_reader_batches_delivered_total", **labels) == 3
            assert value(samples, "pgfeed_reader_delivery_latency_seconds_count", **labels) == 5
            assert value(samples, "pgfeed_reader_delivery_latency_seconds_sum", **labels) > 0
        assert value(samples, "pgfeed_reader_position_tick", stream="orders", consumer="billing") == first.tick
        assert value(samples, "pgfeed_reader_lag_ticks", stream="orders", consumer="billing") == 0
        assert value(samples, "pgfeed_reader_lag_seconds", stream="orders", consumer="billing") == 0
        # The anonymous subscription ended: its position is no longer reported.
        assert ("pgfeed_reader_position_tick", (("consumer", ""), ("stream", "orders"))) not in samples
        assert value(samples, "pgfeed_reader_listener_reconnects_total") == 0
        assert value(samples, "pgfeed_reader_pool_reconnects_total") == 0
        for name, labels_ in samples:
            assert {k for k, _ in labels_} <= LABELS, (name, labels_)

        # A consumer whose handler holds its batch trails the head: in ticks, and in seconds.
        await reader.on("orders", slow, consumer="slow")
        await _scrape_until(
            registry,
            lambda s: value(s, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="slow") == 2,
            "the slow consumer's first batch",
        )
        for n in range(5, 8):
            pgfeed.append(pgfeed_conn, "orders", {"n": n})
        second = take_tick(pgfeed_conn)
        samples = await _scrape_until(
            registry,
            lambda s: (
                value(s, "pgfeed_reader_lag_ticks", stream="orders", consumer="billing") == 0
                and value(s, "pgfeed_reader_position_tick", stream="orders", consumer="billing") == second.tick
            ),
            "the billing consumer at the second tick",
        )
        behind = value(samples, "pgfeed_reader_position_tick", stream="orders", consumer="slow")
        assert behind < first.tick  # its first batch is in hand, not delivered
        assert value(samples, "pgfeed_reader_lag_ticks", stream="orders", consumer="slow") == second.tick - behind
        assert value(samples, "pgfeed_reader_lag_seconds", stream="orders", consumer="slow") > 0
        assert taken == [0, 1]
        gate.set()
        await reader.wait_for("orders", str(second))
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="slow") == 8
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == 8
        assert value(samples, "pgfeed_reader_lag_seconds", stream="orders", consumer="slow") == 0


async def test_a_reader_counts_resets_and_reconnects(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    first = take_tick(pgfeed_conn)
    registry = CollectorRegistry()
    async with pgfeed.AsyncReader(pgfeed_dsn, ticker="off", poll_interval=0.05, metrics=registry) as reader:
        await reader.on("orders", lambda batch: None, consumer="billing")
        await reader.wait_for("orders", str(first))
        samples = parse(generate_latest(registry).decode())
        assert ("pgfeed_reader_resets_total", (("stream", "orders"),)) not in samples

        # A forced reset: the stream dropped and recreated under the reader.
        admin.drop_stream(pgfeed_conn, "orders")
        admin.create_stream(pgfeed_conn, "orders")
        pgfeed.append(pgfeed_conn, "orders", {"n": 2})
        await reader.wait_for("orders", str(take_tick(pgfeed_conn)))
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "pgfeed_reader_resets_total", stream="orders") == 1
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == 2

        # Its backends killed: the listener and the read pool each lose one connection, and it goes on.
        killed = pgfeed_conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"pgfeed reader pid={os.getpid()} %",),
        ).fetchone()
        assert killed == (2,)
        samples = await _scrape_until(
            registry,
            lambda s: (
                value(s, "pgfeed_reader_listener_reconnects_total") == 1
                and value(s, "pgfeed_reader_pool_reconnects_total") == 1
            ),
            "both reconnects",
        )
        pgfeed.append(pgfeed_conn, "orders", {"n": 3})
        await reader.wait_for("orders", str(take_tick(pgfeed_conn)))
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "pgfeed_reader_listener_reconnects_total") == 1
        assert value(samples, "pgfeed_reader_pool_reconnects_total") == 1
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == 3
        assert value(samples, "pgfeed_reader_resets_total", stream="orders") == 1


def test_the_threaded_reader_keeps_counting_across_reopens(pgfeed_dsn: str, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    registry = CollectorRegistry()
    reader = pgfeed.Reader(pgfeed_dsn, ticker="off", metrics=registry)
    for n in range(2):
        pgfeed.append(pgfeed_conn, "orders", {"n": n})
        tick = take_tick(pgfeed_conn)
        with reader:
            reader.on("orders", lambda batch: None, consumer="billing")  # resumes where it stopped
            reader.wait_for("orders", str(tick), timeout=30)
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "pgfeed_reader_rows_delivered_total", stream="orders", consumer="billing") == n + 1
    # A registry takes one of the two ways in, in one line.
    with pytest.raises(UsageError, match="not both"), pgfeed.Reader(pgfeed_dsn) as other:
        ReaderCollector(other, registry=registry)
    collected = CollectorRegistry()
    with pgfeed.Reader(pgfeed_dsn) as other:
        ReaderCollector(other, registry=collected)
    with pytest.raises(UsageError, match="not both"):
        pgfeed.AsyncReader(pgfeed_dsn, metrics=collected)
