"""The reader's API contracts: tokens, wait_for, resets, backpressure, batching, caches, sync twin."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from ticking import take_tick

import pgfeed
from pgfeed import admin
from pgfeed.errors import FutureToken, TokenError, UnknownStream, UsageError, WaitTimeout

WRITE_AND_PRINT_TOKEN = """
import sys, psycopg, pgfeed
with psycopg.connect(sys.argv[1]) as conn:
    pgfeed.append(conn, "orders", {"id": "from-another-process"})
    conn.commit()
    print(pgfeed.commit_token(conn))
"""


async def test_wait_for_a_token_from_another_process(pgfeed_dsn: str, stream: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn, poll_interval=60) as reader:
        got: list[Any] = []
        await reader.on(stream, lambda batch: got.extend(batch.rows), since="now")
        out = subprocess.run(
            [sys.executable, "-c", WRITE_AND_PRINT_TOKEN, pgfeed_dsn], capture_output=True, text=True, check=True
        )
        token = out.stdout.strip()
        started = time.monotonic()
        assert pgfeed.CommitToken.parse(token) is not None
        reached = await reader.wait_for(stream, token, timeout=5)
        assert time.monotonic() - started < 2
        assert [r.payload["id"] for r in got] == ["from-another-process"]
        assert reader.position(stream) == reached


async def test_wait_for_refuses_a_future_token_at_once(pgfeed_dsn: str, stream: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        await reader.subscribe(stream, "now")
        started = time.monotonic()
        with pytest.raises(FutureToken, match="beyond anything this database has issued"):
            await reader.wait_for(stream, "999999", timeout=30)
        assert time.monotonic() - started < 1
        with pytest.raises(TokenError, match="malformed position token"):
            await reader.wait_for(stream, "not-a-token", timeout=1)
        with pytest.raises(UsageError, match="does not follow stream"):
            await reader.wait_for("caches", "1", timeout=1)


async def test_wait_for_times_out_with_a_clear_error(pgfeed_dsn: str, stream: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        await reader.subscribe(stream, "now")  # never consumed: nothing is delivered
        with psycopg.connect(pgfeed_dsn) as conn:
            pgfeed.append(conn, stream, {"id": 1})
            conn.commit()
            token = pgfeed.commit_token(conn)
        with pytest.raises(WaitTimeout, match=r"timed out after 0\.5s waiting for stream 'orders'"):
            await reader.wait_for(stream, token, timeout=0.5)


async def test_subscribe_refuses_bad_starts(pgfeed_dsn: str, stream: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        with pytest.raises(UnknownStream, match="unknown stream 'nope'"):
            await reader.subscribe("nope")
        with pytest.raises(FutureToken):
            await reader.subscribe(stream, "123456789")
        with pytest.raises(TokenError):
            await reader.subscribe(stream, "yesterday")


async def test_tokens_resume_exactly_and_mean_the_same_everywhere(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(10)])
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=3) as reader:
        sub = await reader.subscribe(stream, until="now")
        first = [r async for b in sub for r in b.rows]
    assert [r.payload["id"] for r in first] == list(range(10))
    middle = first[4].token
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=4) as reader:
        sub = await reader.subscribe(stream, middle, until="now")
        rest = [r async for b in sub for r in b.rows]
    assert [r.token for r in rest] == [r.token for r in first[5:]]


async def test_a_big_transaction_is_split_into_bounded_batches_in_order(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(2500)])
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=1000) as reader:
        sub = await reader.subscribe(stream, until="now")
        batches = [b async for b in sub]
    assert [len(b) for b in batches] == [1000, 1000, 500]
    ids = [r.payload["id"] for b in batches for r in b.rows]
    assert ids == list(range(2500))
    # The batches of one transaction share a tick; positions inside it are partial.
    assert len({r.position.tick for b in batches for r in b.rows}) == 1
    assert not batches[0].position.complete
    assert batches[-1].position.complete


async def test_a_slow_subscriber_gets_backpressure_and_loses_nothing(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=10, queue_batches=2) as reader:
        slow = await reader.subscribe(stream, "now")
        fast_rows: list[Any] = []
        await reader.on(stream, lambda b: fast_rows.extend(b.rows), since="now")
        for chunk in range(20):
            with pgfeed_conn.transaction():
                pgfeed.append_many(pgfeed_conn, stream, [{"id": chunk * 10 + i} for i in range(10)])
        deadline = time.monotonic() + 10
        while len(fast_rows) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [r.payload["id"] for r in fast_rows] == list(range(200))
        # The slow one took nothing, and read ahead at most its queue (2 batches)
        # plus the one waiting for room: 30 of the 200 rows.
        assert slow.position is not None
        assert all(r.position > slow.position for r in fast_rows)
        assert slow.cursor.fetch is not None
        read_ahead = [r for r in fast_rows if r.position <= slow.cursor.fetch]
        assert 0 < len(read_ahead) <= 30, f"the slow subscription read {len(read_ahead)} rows ahead"
        slow_ids = []
        while len(slow_ids) < 200:
            batch = await asyncio.wait_for(slow.__anext__(), 5)
            slow_ids.extend(r.payload["id"] for r in batch.rows)
        assert slow_ids == list(range(200))


async def test_drop_and_recreate_fires_reset_before_new_rows(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    events: list[Any] = []
    async with pgfeed.AsyncReader(pgfeed_dsn, poll_interval=0.2) as reader:
        reader.on_reset(lambda s, reason: events.append(("reset", s, reason)))
        sub = await reader.subscribe(stream, "earliest")
        pgfeed.append(pgfeed_conn, stream, {"id": "old"})
        batch = await asyncio.wait_for(sub.__anext__(), 5)
        events.extend(("row", r.payload["id"]) for r in batch.rows)
        admin.drop_stream(pgfeed_conn, stream)
        admin.create_stream(pgfeed_conn, stream)
        pgfeed.append(pgfeed_conn, stream, {"id": "new"})
        batch = await asyncio.wait_for(sub.__anext__(), 5)
        assert batch.reset  # the first batch after the break, empty or not
        events.extend(("row", r.payload["id"]) for r in batch.rows)
        while ("row", "new") not in events:
            batch = await asyncio.wait_for(sub.__anext__(), 5)
            assert not batch.reset
            events.extend(("row", r.payload["id"]) for r in batch.rows)
    assert events == [("row", "old"), ("reset", stream, "the stream was dropped and recreated"), ("row", "new")]


async def test_a_token_from_a_previous_incarnation_resets(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    pgfeed.append(pgfeed_conn, stream, {"id": "old"})
    old_token = str(take_tick(pgfeed_conn))
    admin.drop_stream(pgfeed_conn, stream)
    admin.create_stream(pgfeed_conn, stream)
    pgfeed.append(pgfeed_conn, stream, {"id": "new"})
    resets: list[str] = []
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        reader.on_reset(lambda s, reason: resets.append(reason))
        sub = await reader.subscribe(stream, old_token, until="now")
        batches = [b async for b in sub]
    assert resets == ["the starting position is older than this stream's current incarnation"]
    assert batches[0].reset
    assert [r.payload["id"] for b in batches for r in b.rows] == ["new"]


async def test_cache_invalidation_reaches_other_processes(
    pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    seen: list[tuple[str, Any]] = []
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        await reader.on_invalidate("users", lambda keys: seen.append(("users", keys)))
        await reader.on_invalidate("rooms", lambda keys: seen.append(("rooms", keys)))
        pgfeed.invalidate(pgfeed_conn, "users", ["@a:x", "@b:x"])
        pgfeed.invalidate(pgfeed_conn, "rooms", None)
        pgfeed.invalidate(pgfeed_conn, "other", ["z"])
        deadline = time.monotonic() + 5
        while len(seen) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert seen == [("users", ["@a:x", "@b:x"]), ("rooms", None)]


def test_sync_reader_runs_callbacks_on_a_background_thread(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    threads: set[str] = set()
    rows: list[Any] = []
    done = threading.Event()

    def on_batch(batch: pgfeed.Batch) -> None:
        threads.add(threading.current_thread().name)
        rows.extend(batch.rows)
        if len(rows) >= 3:
            done.set()

    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on(stream, on_batch, since="now")
        for i in range(3):
            pgfeed.append(pgfeed_conn, stream, {"id": i})
        token = pgfeed.commit_token(pgfeed_conn)
        reader.wait_for(stream, token, timeout=5)
        assert done.wait(5)
        sub = reader.subscribe(stream, "earliest", until=token)
        assert [r.payload["id"] for b in sub for r in b.rows] == [0, 1, 2]
    assert [r.payload["id"] for r in rows] == [0, 1, 2]
    assert threading.main_thread().name not in threads


def test_sync_subscription_next_with_timeout(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with pgfeed.Reader(pgfeed_dsn) as reader, reader.subscribe(stream, "now") as sub:
        assert sub.next(timeout=0.2) is None
        pgfeed.append(pgfeed_conn, stream, {"id": 7})
        batch = sub.next(timeout=5)
        assert batch is not None
        assert [r.payload["id"] for r in batch.rows] == [7]


async def test_decorator_form_starts_with_the_reader(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    pgfeed.append(pgfeed_conn, stream, {"id": "before"})
    reader = pgfeed.AsyncReader(pgfeed_dsn)
    got: list[Any] = []

    @reader.on(stream, since="earliest")
    async def handle(batch: pgfeed.Batch) -> None:
        got.extend(r.payload["id"] for r in batch.rows)

    async with reader:
        token = pgfeed.commit_token(pgfeed_conn)
        await reader.wait_for(stream, token, timeout=5)
    assert got == ["before"]

    broken = pgfeed.AsyncReader(pgfeed_dsn)
    broken.on("nosuch", handle)
    with pytest.raises(UnknownStream):
        await broken.open()


def test_sync_decorator_form(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    reader = pgfeed.Reader(pgfeed_dsn)
    got: list[Any] = []

    @reader.on(stream, since="now")
    def handle(batch: pgfeed.Batch) -> None:
        got.extend(r.payload["id"] for r in batch.rows)

    with reader:
        pgfeed.append(pgfeed_conn, stream, {"id": 1})
        reader.wait_for(stream, pgfeed.commit_token(pgfeed_conn), timeout=5)
    assert got == [1]


async def test_a_named_consumer_resumes_where_it_stopped(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    for i in range(6):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
    async with pgfeed.AsyncReader(pgfeed_dsn, batch_size=3) as reader:
        sub = await reader.subscribe(stream, "earliest", consumer="billing")
        first = await asyncio.wait_for(sub.__anext__(), 5)
        await asyncio.wait_for(sub.__anext__(), 5)  # takes the second batch: the first is delivered
    assert [r.payload["id"] for r in first.rows] == [0, 1, 2]
    saved = pgfeed_conn.execute(
        "SELECT owner = current_user, token FROM pgfeed.positions WHERE consumer = 'billing' AND stream = %s",
        (stream,),
    ).fetchall()
    assert saved == [(True, str(first.position))]
    pgfeed.append(pgfeed_conn, stream, {"id": 6})
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        sub = await reader.subscribe(stream, "now", consumer="billing", until="now")  # since is ignored
        rest = [r.payload["id"] async for b in sub for r in b.rows]
    assert rest == [3, 4, 5, 6]
    with pytest.raises(UsageError, match="invalid consumer name"):
        async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
            await reader.subscribe(stream, consumer="")


async def _poll(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Await until ``condition()`` (sync or async) is true: the state under test, bounded."""
    deadline = time.monotonic() + timeout
    while not (await condition() if asyncio.iscoroutinefunction(condition) else condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:g}s"
        await asyncio.sleep(0.01)


async def test_close_saves_the_position_a_slowed_periodic_save_carried(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    """A periodic save in flight when close() starts (held up by a lock on the
    consumer's row) must not take the last position with it when cancelled."""

    def saved() -> str | None:
        row = pgfeed_conn.execute("SELECT token FROM pgfeed.positions WHERE consumer = 'billing'").fetchone()
        return None if row is None else str(row[0])

    def blocked_since(pid: int, started: Any = None) -> bool:
        """Some statement (that began after ``started``) waits for backend ``pid``'s lock."""
        row = pgfeed_conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
            " AND query_start > coalesce(%s::timestamptz, '-infinity')",
            (pid, started),
        ).fetchone()
        return row is not None and row[0] > 0

    pgfeed.append(pgfeed_conn, stream, {"id": 1})
    first = take_tick(pgfeed_conn)
    reader = await pgfeed.AsyncReader(pgfeed_dsn, ticker="off", save_interval=0.02).open()
    try:
        await reader.on(stream, lambda batch: None, consumer="billing")
        await reader.wait_for(stream, str(first))
        await _poll(lambda: saved() == str(first), "the first periodic save")
        async with await psycopg.AsyncConnection.connect(pgfeed_dsn) as locker:
            await locker.execute("SELECT FROM pgfeed.positions WHERE consumer = 'billing' FOR UPDATE")
            pgfeed.append(pgfeed_conn, stream, {"id": 2})
            second = take_tick(pgfeed_conn)
            await reader.wait_for(stream, str(second))
            # The periodic save of `second` now waits for the row lock.
            await _poll(lambda: blocked_since(locker.info.backend_pid), "a periodic save waiting")
            started = pgfeed_conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
            closing = asyncio.create_task(reader.close())
            # Release the lock only once close() has finished, or waits for the lock itself.
            await _poll(lambda: closing.done() or blocked_since(locker.info.backend_pid, started), "close() saving")
            await locker.rollback()
            await closing
    finally:
        await reader.close()
    assert saved() == str(second)
