"""Handler failures never count as delivered: retried on the same batch, then the subscription stops."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import psycopg
import pytest

import pgfeed
from pgfeed.errors import HandlerFailed, UsageError


def append(conn: psycopg.Connection[Any], stream: str, *ids: object) -> str:
    """One row per id, each in its own transaction (autocommit); the commit token of the last."""
    for i in ids:
        pgfeed.append(conn, stream, {"id": i})
    return str(pgfeed.commit_token(conn))


def saved_token(conn: psycopg.Connection[Any], consumer: str, stream: str) -> str | None:
    row = conn.execute(
        "SELECT token FROM pgfeed.positions WHERE consumer = %s AND stream = %s", (consumer, stream)
    ).fetchone()
    return None if row is None else str(row[0])


class Flaky:
    """A handler that raises its first ``failures`` calls for each batch holding ``poison``
    (every call for it when ``failures`` is None), recording every call."""

    def __init__(self, reader: pgfeed.AsyncReader, stream: str, poison: object, failures: int | None) -> None:
        self.reader, self.stream, self.poison, self.failures = reader, stream, poison, failures
        self.calls: list[tuple[pgfeed.Position, list[object], pgfeed.Position | None]] = []
        self.failed = 0

    async def __call__(self, batch: pgfeed.Batch) -> None:
        ids = [r.payload["id"] for r in batch]
        # What the reader reports as delivered while the handler holds the batch.
        self.calls.append((batch.position, ids, self.reader.position(self.stream)))
        if self.poison in ids and (self.failures is None or self.failed < self.failures):
            self.failed += 1
            raise ValueError(f"handler refuses {ids}")


async def test_a_handler_that_fails_n_times_gets_the_same_batch_n_plus_1_times_then_moves_on(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn, handler_retries=3) as reader:
        handler = Flaky(reader, stream, poison=1, failures=3)
        errors: list[tuple[str, HandlerFailed]] = []
        reader.on_error(lambda s, e: errors.append((s, e)))
        sub = await reader.on(stream, handler, since="now")
        start = sub.position
        token = append(pgfeed_conn, stream, 1)
        reached = await reader.wait_for(stream, token, timeout=15)
        after = append(pgfeed_conn, stream, 2)
        await reader.wait_for(stream, after, timeout=15)
    tries = [c for c in handler.calls if 1 in c[1]]
    assert len(tries) == 4, handler.calls  # 3 failures, then the success
    assert len({(pos, tuple(ids)) for pos, ids, _ in tries}) == 1, "not the same batch each time"
    assert [seen for _, _, seen in tries] == [start] * 4, "the position moved while the batch was failing"
    assert tries[0][0] <= reached
    later = [ids for _, ids, _ in handler.calls[4:]]
    assert later == [[2]], "the handler did not move on to the next batch"
    assert errors == []


async def test_a_handler_that_always_fails_stops_its_subscription_before_the_batch(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgfeed")
    errors: list[tuple[str, HandlerFailed]] = []
    got_error = asyncio.Event()

    def on_error(s: str, exc: HandlerFailed) -> None:
        errors.append((s, exc))
        got_error.set()

    async with pgfeed.AsyncReader(pgfeed_dsn, handler_retries=2, save_interval=0.05) as reader:
        reader.on_error(on_error)
        handler = Flaky(reader, stream, poison=2, failures=None)
        sub = await reader.on(stream, handler, since="now", consumer="billing")
        start = sub.position
        first = append(pgfeed_conn, stream, 1)
        before = await reader.wait_for(stream, first, timeout=15)
        second = append(pgfeed_conn, stream, 2)
        with pytest.raises(HandlerFailed) as failed:
            await reader.wait_for(stream, second, timeout=15)
        await asyncio.wait_for(got_error.wait(), 5)
        assert reader.position(stream) == before
        assert sub.position == before
        assert await reader.wait_for(stream, first, timeout=5) == before  # delivered already: fine
        # An iterator has no handler: it is unaffected and gets both rows.
        seen: list[object] = []
        async with await reader.subscribe(stream, str(start)) as iterated:
            async with asyncio.timeout(15):
                async for batch in iterated:
                    seen.extend(r.payload["id"] for r in batch)
                    if 2 in seen:
                        break
        assert seen == [1, 2]
    poisoned = [c for c in handler.calls if 2 in c[1]]
    assert len(poisoned) == 3  # the call and handler_retries=2 retries
    assert failed.value.stream == stream
    assert failed.value.position == before
    assert failed.value.batch_position is not None
    assert failed.value.batch_position > before
    assert failed.value.attempts == 3
    assert isinstance(failed.value.__cause__, ValueError)
    assert "failed 3 times" in str(failed.value)
    assert len(errors) == 1
    assert errors[0][0] == stream
    assert errors[0][1] is failed.value
    assert any("kept failing; its subscription stopped" in r.getMessage() for r in caplog.records)
    assert sum("retrying the same batch" in r.getMessage() for r in caplog.records) == 2
    # The saved consumer position stays before the failed batch...
    saved = saved_token(pgfeed_conn, "billing", stream)
    assert saved is not None
    assert pgfeed.Position.parse(saved) == before
    # ...so the same consumer, with a handler that works, resumes with that row.
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        rows: list[object] = []
        await reader.on(stream, lambda b: rows.extend(r.payload["id"] for r in b), consumer="billing")
        await reader.wait_for(stream, second, timeout=15)
    assert rows == [2]


async def test_a_handler_started_again_replaces_the_failed_one(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn, handler_retries=0) as reader:
        handler = Flaky(reader, stream, poison=1, failures=None)
        sub = await reader.on(stream, handler, since="now")
        start = sub.position
        token = append(pgfeed_conn, stream, 1)
        with pytest.raises(HandlerFailed):
            await reader.wait_for(stream, token, timeout=15)
        assert len(handler.calls) == 1  # handler_retries=0: no retry
        rows: list[object] = []
        await reader.on(stream, lambda b: rows.extend(r.payload["id"] for r in b), since=str(start))
        later = append(pgfeed_conn, stream, 2)
        await reader.wait_for(stream, later, timeout=15)
    assert rows == [1, 2]


def test_the_threaded_reader_surfaces_a_failing_sync_handler(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    calls: list[list[object]] = []
    failed = threading.Event()
    seen: list[tuple[str, HandlerFailed]] = []

    def handler(batch: pgfeed.Batch) -> None:
        calls.append([r.payload["id"] for r in batch])
        if len(calls) <= 2:
            raise RuntimeError("not yet")

    def poison(batch: pgfeed.Batch) -> None:
        raise RuntimeError("never")

    with pgfeed.Reader(pgfeed_dsn, handler_retries=2) as reader:
        reader.on_error(lambda s, e: (seen.append((s, e)), failed.set()))
        reader.on(stream, handler, since="now")
        token = append(pgfeed_conn, stream, 1)
        reader.wait_for(stream, token, timeout=15)
        assert calls == [[1], [1], [1]]
        reader.on(stream, poison, since="now")
        token = append(pgfeed_conn, stream, 2)
        with pytest.raises(HandlerFailed, match="failed 3 times"):
            reader.wait_for(stream, token, timeout=15)
        assert failed.wait(5)
    assert [s for s, _ in seen] == [stream]


def test_handler_retries_is_checked_once() -> None:
    with pytest.raises(UsageError, match="invalid handler_retries -1: expected an integer of at least 0"):
        pgfeed.AsyncReader("", handler_retries=-1)
    with pytest.raises(UsageError, match="invalid handler_retries -1"):
        pgfeed.Reader("", handler_retries=-1)
    assert pgfeed.AsyncReader("", handler_retries=0).options.handler_retries == 0
