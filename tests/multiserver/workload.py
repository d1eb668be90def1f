"""Writers and followers for the multi-server tests, and what they saw."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg

import pgfeed


class Writers:
    """``count`` threads appending ``{"w": n, "i": i, "phase": phase}`` rows
    to ``stream`` on ``dsn``, one to three rows per transaction, some rolled
    back, until :meth:`stop`, ``per_writer`` transactions each, or the server
    goes away. ``committed`` holds the ids of rows whose COMMIT returned."""

    def __init__(self, dsn: str, stream: str, phase: str, count: int = 8, per_writer: int | None = None) -> None:
        self.dsn, self.stream, self.phase = dsn, stream, phase
        self.per_writer = per_writer
        self.committed: list[tuple[str, int, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(n,), daemon=True) for n in range(count)]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def _write(self, n: int) -> None:
        rng = random.Random(n)
        i = 0
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.is_set() and (self.per_writer is None or i < self.per_writer):
                    rows = [{"w": n, "i": i + k, "phase": self.phase} for k in range(rng.randint(1, 3))]
                    rollback = rng.random() < 0.1
                    with contextlib.suppress(_Rollback), conn.transaction():
                        pgfeed.append_many(conn, self.stream, rows)
                        if rollback:
                            raise _Rollback
                    i += len(rows)
                    if not rollback:
                        with self._lock:
                            self.committed += [(self.phase, r["w"], r["i"]) for r in rows]
        except (psycopg.Error, pgfeed.PgfeedError) as exc:  # the server stopped under us: that is the test
            self.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 60) -> None:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), "a writer did not finish in time"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.committed)


class _Rollback(Exception):
    pass


def row_id(row: pgfeed.Row | dict[str, Any]) -> tuple[str, int, int]:
    payload = row.payload if isinstance(row, pgfeed.Row) else row
    return (payload["phase"], payload["w"], payload["i"])


@dataclass
class Follower:
    """An :class:`~pgfeed.AsyncReader` following one stream, recording every
    batch: ``rows`` is what it holds since its last reset (what a cache built
    from the feed would contain), ``delivered`` every row it ever delivered."""

    name: str
    dsn: str
    stream: str
    since: str = "earliest"
    options: dict[str, Any] = field(default_factory=dict)
    #: A named consumer: resumes from its saved position (pgfeed.positions).
    consumer: str | None = None
    rows: list[pgfeed.Row] = field(default_factory=list)
    delivered: list[pgfeed.Row] = field(default_factory=list)
    reset_batches: int = 0
    reset_reasons: list[str] = field(default_factory=list)
    #: (reset, rows, position) of every batch taken.
    batches: list[tuple[bool, int, str]] = field(default_factory=list)
    #: The token of the last batch taken (with its check): what a consumer saves to resume.
    token: str = ""
    #: When set, the consumer takes one batch, then waits for it before taking more.
    gate: asyncio.Event | None = None
    reader: pgfeed.AsyncReader | None = None
    sub: Any = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> Follower:
        opts = {"ticker": "off", "poll_interval": 0.2, "probe_interval": 1.0, "probe_timeout": 2.0, **self.options}
        self.reader = pgfeed.AsyncReader(self.dsn, **opts)
        self.reader.on_reset(lambda stream, reason: self.reset_reasons.append(reason))
        await self.reader.open()
        try:
            self.sub = await self.reader.subscribe(self.stream, since=self.since, consumer=self.consumer)
        except BaseException:
            await self.reader.close()
            raise
        self._task = asyncio.create_task(self._consume(), name=f"follower-{self.name}")
        return self

    async def _consume(self) -> None:
        async for batch in self.sub:
            self.batches.append((batch.reset, len(batch.rows), str(batch.position)))
            self.token = batch.token
            if batch.reset:
                self.reset_batches += 1
                self.rows = []
            self.rows += [r for r in batch.rows if "end" not in r.payload]
            self.delivered += [r for r in batch.rows if "end" not in r.payload]
            if self.gate is not None:
                await self.gate.wait()

    async def wait_for(self, token: Any, timeout: float = 30) -> pgfeed.Position:
        assert self.reader is not None
        try:
            return await self.reader.wait_for(self.stream, token, timeout=timeout)
        except pgfeed.WaitTimeout as exc:
            raise AssertionError(f"{self.summary()}: {exc}") from None

    @property
    def failure(self) -> BaseException | None:
        """Why the consuming task stopped, if it did."""
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # kept in .failure
                await self._task

    @property
    def ids(self) -> list[tuple[str, int, int]]:
        return [row_id(r) for r in self.rows]

    def summary(self) -> str:
        return (
            f"{self.name}: holds {len(self.rows)} rows, delivered {len(self.delivered)} in all, "
            f"{self.reset_batches} reset batch(es) {self.reset_reasons}"
            + (f"; its consumer failed: {self.failure!r}" if self.failure else "")
        )


def stored_rows(dsn: str, stream: str) -> list[tuple[str, int, int]]:
    """The ids of every row of ``stream`` in the table (no order)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT e.payload FROM pgfeed.events e JOIN pgfeed.streams s ON s.id = e.stream_id"
            " WHERE s.name = %s AND NOT e.payload ? 'end'",
            (stream,),
        ).fetchall()
    return [row_id(p) for (p,) in found]


def end_marker(dsn: str, stream: str) -> pgfeed.CommitToken:
    """Append an end marker in its own transaction; its commit token."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            pgfeed.append(conn, stream, {"end": True})
        return pgfeed.commit_token(conn)


def assert_in_order(follower: Follower) -> None:
    """Positions strictly increase within what the follower holds."""
    positions = [r.position for r in follower.rows]
    assert all(a < b for a, b in itertools.pairwise(positions)), f"{follower.name}: out of order"


async def poll_async(condition: Any, timeout: float, what: str, every: float = 0.02) -> None:
    """Bounded polling of real state from a coroutine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        await asyncio.sleep(every)
