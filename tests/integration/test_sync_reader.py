"""The threaded Reader in real processes: forks, bounded calls, reopening, typed options."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import select
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pgfeed
from pgfeed import admin
from pgfeed.errors import ConnectError, ForkedReader, PgfeedError, ReaderClosed, UsageError, WaitTimeout
from pgfeed.options import ReaderOptions
from pgfeed.sync import CALL_MARGIN, CALL_TIMEOUT
from pgfeed.testing import TestServer, drop_database

#: How late a bounded call may return on a busy machine, beyond its bound.
SLACK = 1.0


def append(conn: psycopg.Connection[Any], stream: str, *ids: object) -> str:
    """Append one row per id (autocommit: one transaction each); the commit token of the last."""
    for i in ids:
        pgfeed.append(conn, stream, {"id": i})
    return str(pgfeed.commit_token(conn))


def in_child(body: Callable[[], None], timeout: float = 20.0) -> str:
    """Run ``body`` in a child made by ``os.fork()`` and return its report:
    "ok", or the exception it raised. The child is killed after ``timeout``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_fd)
            try:
                body()
                report = "ok"
            except BaseException as exc:
                report = f"{type(exc).__name__}: {exc}"
            os.write(write_fd, report.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(deadline - time.monotonic(), 0.0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked child did not finish within {timeout:g}s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


def backends(conn: psycopg.Connection[Any]) -> set[int]:
    """The other sessions connected to this test's database."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return {int(r[0]) for r in rows}


def collector() -> tuple[list[Any], Callable[[pgfeed.Batch], None]]:
    got: list[Any] = []
    return got, lambda batch: got.extend(r.payload["id"] for r in batch.rows)


# -- fork safety -----------------------------------------------------------
def test_a_reader_inherited_through_fork_fails_at_once_and_the_parent_keeps_working(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    got, on_batch = collector()
    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on(stream, on_batch, since="now")
        sub = reader.subscribe(stream, "now")
        token = append(pgfeed_conn, stream, "before")
        before_fork = backends(pgfeed_conn)
        parent = os.getpid()

        def child() -> None:
            started = time.monotonic()
            with pytest.raises(ForkedReader) as caught:
                reader.wait_for(stream, token, timeout=4)
            assert time.monotonic() - started < 1
            message = str(caught.value)
            assert "\n" not in message
            assert f"opened in process {parent} before a fork" in message
            assert "post_fork / post_worker_init" in message
            assert "worker_process_init" in message
            calls: list[Callable[[], object]] = [
                lambda: reader.position(stream),
                lambda: sub.next(timeout=4),
                lambda: sub.position,
                lambda: reader.subscribe(stream),
                lambda: reader.on(stream, on_batch),
                lambda: reader.on_reset(print),
                reader.open,
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(ForkedReader):
                    call()
                assert time.monotonic() - started < 1
            started = time.monotonic()
            sub.close()
            reader.close()
            gc.collect()  # nothing inherited may be finalised: it would close the parent's sessions
            assert time.monotonic() - started < 1
            with pytest.raises(ReaderClosed):
                reader.wait_for(stream, token, timeout=1)

        assert in_child(child) == "ok"
        sub.close()  # unconsumed, it would hold the stream's position back
        reader.wait_for(stream, token, timeout=10)
        token = append(pgfeed_conn, stream, "after")
        reader.wait_for(stream, token, timeout=10)
        assert got == ["before", "after"]
        lost = before_fork - backends(pgfeed_conn)
        assert not lost, f"sessions of the parent's reader ended after the child closed its copy: {lost}"


def test_a_reader_opened_in_the_child_after_the_fork_delivers(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    token = append(pgfeed_conn, stream, 1, 2, 3)
    with pgfeed.Reader(pgfeed_dsn) as inherited:
        inherited.subscribe(stream, "earliest")

        def child() -> None:
            got_fresh, on_fresh = collector()
            with pgfeed.Reader(pgfeed_dsn) as fresh:
                fresh.on(stream, on_fresh, since="earliest")
                fresh.wait_for(stream, token, timeout=10)
            assert got_fresh == [1, 2, 3]
            # The inherited one, once closed in the child, opens again there.
            inherited.close()
            got, on_batch = collector()
            inherited.on(stream, on_batch, since="earliest")
            with inherited:
                inherited.wait_for(stream, token, timeout=10)
            assert got == [1, 2, 3]

        assert in_child(child) == "ok"
        assert inherited.position(stream) is not None


# -- bounded calls ---------------------------------------------------------
def test_calls_are_bounded_when_an_async_callback_blocks_the_loop(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    admin.create_stream(pgfeed_conn, "audit")
    entered, release = threading.Event(), threading.Event()

    async def blocking(batch: pgfeed.Batch) -> None:
        entered.set()
        release.wait(60)  # a blocking call in an async callback: the loop stands still

    with pgfeed.Reader(pgfeed_dsn) as reader:
        other = reader.subscribe("audit", "now")
        reader.on(stream, blocking, since="now")
        token = append(pgfeed_conn, stream, 1)
        assert entered.wait(10)
        try:
            started = time.monotonic()
            with pytest.raises(WaitTimeout, match="not answering"):
                reader.wait_for(stream, token, timeout=0.5)
            assert 0.5 + CALL_MARGIN <= time.monotonic() - started < 0.5 + CALL_MARGIN + SLACK
            reader.call_timeout = 0.5  # only now: opening on a busy machine may take longer
            started = time.monotonic()
            with pytest.raises(WaitTimeout, match=r"within 0\.5s \(call_timeout\)"):
                reader.position(stream)
            assert 0.5 <= time.monotonic() - started < 0.5 + SLACK
            started = time.monotonic()
            with pytest.raises(WaitTimeout):
                other.next(timeout=0.2)
            assert 0.2 + CALL_MARGIN <= time.monotonic() - started < 0.2 + CALL_MARGIN + SLACK
        finally:
            reader.call_timeout = CALL_TIMEOUT
            release.set()
        reader.wait_for(stream, token, timeout=10)


def test_a_reader_method_called_on_its_own_loop_is_refused(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    errors: list[BaseException] = []
    called = threading.Event()

    async def on_batch(batch: pgfeed.Batch) -> None:
        try:
            reader.position(stream)
        except BaseException as exc:
            errors.append(exc)
        called.set()

    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on(stream, on_batch, since="now")
        append(pgfeed_conn, stream, 1)
        assert called.wait(10)
    assert len(errors) == 1
    assert isinstance(errors[0], UsageError)
    assert "own event loop" in str(errors[0])


def test_driver_errors_are_translated(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    with pgfeed.Reader(pgfeed_dsn, poll_interval=60) as reader:
        reader.subscribe(stream, "now")  # never consumed: wait_for cannot succeed
        token = append(pgfeed_conn, stream, 1)
        pgfeed_conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        # A raw psycopg error (AdminShutdown) would fail this: only PgfeedError may escape.
        with pytest.raises(PgfeedError):
            reader.wait_for(stream, token, timeout=1)


# -- lifecycle ---------------------------------------------------------------
def test_a_closed_reader_opens_again_with_a_new_loop(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    reader = pgfeed.Reader(pgfeed_dsn)
    with pytest.raises(ReaderClosed, match="not open"):
        reader.subscribe(stream)
    assert reader.position(stream) is None
    resets: list[str] = []
    reader.on_reset(lambda s, reason: resets.append(s))
    got, on_batch = collector()
    ended = threading.Event()

    with reader:
        reader.on(stream, on_batch, since="earliest")
        sub = reader.subscribe(stream, "now")
        first = reader._opened
        assert first is not None

        def iterate() -> None:
            for _ in sub:
                pass
            ended.set()

        consumer = threading.Thread(target=iterate)
        consumer.start()
        token = append(pgfeed_conn, stream, 1)
        reader.wait_for(stream, token, timeout=10)
    consumer.join(10)
    assert ended.is_set(), "iterating a subscription did not end when its reader closed"
    assert not first.loop.thread.is_alive()
    assert first.loop._loop is not None
    assert first.loop._loop.is_closed()
    with pytest.raises(StopIteration):
        sub.next(timeout=1)
    with pytest.raises(ReaderClosed):
        reader.wait_for(stream, token, timeout=1)
    assert reader.position(stream) is None

    reader.on(stream, on_batch, since="earliest")  # registered while closed: starts at the next open
    with reader:
        assert reader._opened is not first
        token = append(pgfeed_conn, stream, 2)
        reader.wait_for(stream, token, timeout=10)
        admin.drop_stream(pgfeed_conn, stream)
        admin.create_stream(pgfeed_conn, stream)
        token = append(pgfeed_conn, stream, 3)
        reader.wait_for(stream, token, timeout=10)
    assert got == [1, 1, 2, 3]
    assert resets == [stream]  # registered before the first open, still there after a reopen


def test_callbacks_registered_before_a_failed_open_start_at_the_next_open(
    pgfeed_server: TestServer, pgfeed_template: str
) -> None:
    name = f"pgfeed_later_{uuid.uuid4().hex[:12]}"
    reader = pgfeed.Reader(pgfeed_server.dsn_for(name), call_timeout=20)
    payloads: list[Any] = []
    reader.on("caches", lambda batch: payloads.extend(r.payload for r in batch.rows), since="earliest")
    with pytest.raises(ConnectError):
        reader.open()
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(pgfeed_template))
        )
    try:
        with reader, psycopg.connect(pgfeed_server.dsn_for(name), autocommit=True) as conn:
            pgfeed.invalidate(conn, "users", ["a"])
            reader.wait_for("caches", str(pgfeed.commit_token(conn)), timeout=10)
        assert payloads == [{"cache": "users", "keys": ["a"]}]
    finally:
        drop_database(pgfeed_server, name)


def test_position_from_many_threads_while_rows_flow_and_subscriptions_change(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    admin.create_stream(pgfeed_conn, "audit")
    got, on_batch = collector()
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[list[pgfeed.Position]] = [[] for _ in range(6)]

    def poll(mine: list[pgfeed.Position]) -> None:
        try:
            while not stop.is_set():
                pos = reader.position(stream)
                if pos is not None:
                    mine.append(pos)
        except BaseException as exc:
            errors.append(exc)

    def churn() -> None:
        # Adds and removes subscriptions (of another stream, so that the
        # position of this one stays monotonic): the set position() reads changes under it.
        try:
            while not stop.is_set():
                reader.subscribe("audit", "earliest").close()
        except BaseException as exc:
            errors.append(exc)

    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on(stream, on_batch, since="now")
        threads = [threading.Thread(target=poll, args=(mine,)) for mine in seen]
        threads.append(threading.Thread(target=churn))
        for t in threads:
            t.start()
        try:
            token = append(pgfeed_conn, stream, *range(200))
            reader.wait_for(stream, token, timeout=30)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not errors, errors[:3]
    assert got == list(range(200))
    for mine in seen:
        assert mine == sorted(mine), "a delivered position went backwards"
    assert any(len(set(mine)) > 1 for mine in seen), "no thread saw the position move"


# -- typed options -----------------------------------------------------------
def test_reader_keywords_are_the_options_fields() -> None:
    fields = {f.name: f for f in dataclasses.fields(ReaderOptions)}
    params = inspect.signature(pgfeed.Reader).parameters
    assert set(params) - set(fields) == {"conninfo", "options", "call_timeout"}
    for name, f in fields.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == f.default, name
        assert params[name].annotation == f.type, name
    accepted = set(inspect.signature(pgfeed.AsyncReader).parameters) - {"conninfo", "options"}
    assert accepted == set(fields), "AsyncReader and ReaderOptions must name the same options"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"poll_interval": 0}, "invalid poll_interval 0: expected a positive number of seconds"),
        ({"probe_timeout": float("nan")}, "invalid probe_timeout nan: expected a positive number of seconds"),
        ({"batch_size": 2.5}, "invalid batch_size 2.5: expected a positive integer"),
        ({"queue_batches": True}, "invalid queue_batches True: expected a positive integer"),
        ({"pool_size": -1}, "invalid pool_size -1: expected a positive integer"),
        ({"ticker_lease": "10"}, "invalid ticker_lease '10': expected a positive number of seconds"),
        ({"ticker": "on"}, "invalid ticker 'on': expected 'auto' (tick here when no daemon does) or 'off'"),
        ({"heartbeat": 0}, "invalid heartbeat 0: expected a positive number of seconds"),
        (
            {"metrics": "yes"},
            "invalid metrics 'yes': expected a prometheus_client.CollectorRegistry, True (the default registry) "
            "or None",
        ),
    ],
)
def test_invalid_options_are_refused_in_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        ReaderOptions(**kwargs)
    assert str(caught.value) == message
    with pytest.raises(UsageError, match=message.split(":")[0]):
        pgfeed.Reader("", **kwargs)


def test_keywords_replace_the_fields_of_options() -> None:
    reader = pgfeed.Reader("", options=ReaderOptions(batch_size=5, poll_interval=2.0), poll_interval=0.5)
    assert reader.options == ReaderOptions(batch_size=5, poll_interval=0.5)
    with pytest.raises(UsageError, match="invalid call_timeout 0"):
        pgfeed.Reader("", call_timeout=0)


def test_the_options_reach_the_async_reader(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    append(pgfeed_conn, stream, 1, 2, 3, 4, 5)
    with pgfeed.Reader(pgfeed_dsn, options=ReaderOptions(batch_size=2)) as reader:
        sub = reader.subscribe(stream, "earliest")
        sizes: list[int] = []
        while sum(sizes) < 5:
            batch = sub.next(timeout=10)
            assert batch is not None
            sizes.append(len(batch))
    assert sum(sizes) == 5
    assert max(sizes) == 2
