"""A subscription: one stream read in order onto a bounded queue of batches.

Its task waits for the refresher's newest tick, reads the next batch
(:mod:`pgfeed.ranges`) and queues it; a slow consumer only slows itself, and
memory is bounded by ``queue_batches * batch_size`` rows. Every decision
(where to start, what a reset is, where ``until`` cuts, how far delivery got)
is the :class:`~pgfeed.core.cursor.Cursor`'s; this module does the waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg

from pgfeed.aio import Signal, stop
from pgfeed.core.backoff import Backoff
from pgfeed.core.cursor import Cursor, Interrupted, Spec, StreamMeta, newest_named
from pgfeed.core.positions import Position, PositionToken
from pgfeed.core.tickcache import TickCache
from pgfeed.errors import PgfeedError, UnknownStream, translate
from pgfeed.listener import Listener
from pgfeed.log import get_logger
from pgfeed.ranges import RangeReader
from pgfeed.refresher import Refresher
from pgfeed.resolver import Resolver, Since
from pgfeed.saver import PositionSaver
from pgfeed.store import SavedPosition, StoredRow

log = get_logger("pgfeed.reader")

#: How long resolving "now" may wait for the ticker (seconds).
NOW_TIMEOUT = 30.0


class Row(NamedTuple):
    """One delivered change (a named tuple: cheap to build by the million)."""

    stream: str
    position: Position
    payload: Any
    key: str | None
    created_at: datetime
    xid: int
    seq: int
    #: The check of :attr:`token` (see :class:`~pgfeed.core.positions.PositionToken`);
    #: None when the reader did not know its tick's fingerprint.
    check: str | None = None

    @property
    def token(self) -> str:
        """The position token after this row (``TICK.SEQ~CHECK``); resume
        with ``since=token``. Its check lets a reader refuse it on another
        stream or another history."""
        return str(PositionToken(self.position, self.check))


@dataclass(frozen=True)
class Batch:
    """Rows delivered together, in stream order, and the position after them.

    ``reset`` is true on the first batch after the reader could not prove
    continuity (stream dropped and recreated, or the starting position belongs
    to a previous incarnation): drop anything derived from earlier batches.
    """

    stream: str
    rows: list[Row]
    position: Position
    reset: bool = False
    #: The check of :attr:`token`; None when the reader did not know its tick's fingerprint.
    check: str | None = None

    @property
    def token(self) -> str:
        """The token of :attr:`position` with its check (``TICK[.SEQ]~CHECK``):
        what to save to resume after this batch with ``since=token``."""
        return str(PositionToken(self.position, self.check))

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Feed:
    """All a subscription uses of its reader."""

    refresher: Refresher
    ranges: RangeReader
    resolver: Resolver
    listener: Listener
    saver: PositionSaver
    #: The ticks the reader knows, with their fingerprints (for tokens' checks).
    ticks: TickCache[StoredRow]
    #: Fired whenever a subscription's delivered position moves (or it stops).
    delivered: Signal
    #: ``on_reset(stream, reason)`` before a reset batch is queued.
    on_reset: Callable[[str, str], Awaitable[None]]
    #: ``on_closed(subscription)`` once it is closed.
    on_closed: Callable[[Subscription], None]
    #: ``on_taken(subscription, batch)`` when a batch is handed to the consumer.
    on_taken: Callable[[Subscription, Batch], None]


class Subscription:
    """An ordered stream of :class:`Batch` for one stream; use ``async for``.

    Taking the next batch acknowledges the previous one: the subscription's
    :attr:`position` (what ``wait_for`` and ``Reader.position`` report) then
    moves past it. Made by :meth:`AsyncReader.subscribe <pgfeed.reader.AsyncReader.subscribe>`.
    """

    def __init__(
        self,
        feed: Feed,
        stream: str,
        since: Since,
        until: Since | None,
        queue_batches: int,
        consumer: str | None = None,
    ) -> None:
        self._feed = feed
        self.stream = stream
        self.consumer = consumer
        self._since = since
        self._until = until
        self.cursor = Cursor(stream, self._moved)
        #: Batches tagged with the epoch they were read in; a reset bumps the
        #: epoch, so a batch that got in after it (its put was waiting for
        #: room) is dropped instead of delivered from the old history.
        self._queue: asyncio.Queue[tuple[int, Batch] | None] = asyncio.Queue(maxsize=max(1, queue_batches))
        self._task: asyncio.Task[None] | None = None
        self._started = Signal()
        self._ready = False  # started, or failed to
        self._failure: BaseException | None = None
        self._closed = False
        self._started_at: float | None = None  # time.monotonic() once started

    # -- consumer side ---------------------------------------------------
    @property
    def position(self) -> Position | None:
        """How far this subscription has delivered (None before it started)."""
        return self.cursor.delivered

    @property
    def saved(self) -> SavedPosition | None:
        """What saving a consumer's :attr:`position` writes: its bare token and
        the fingerprint of its tick as this reader saw it (None if unknown)."""
        pos = self.cursor.delivered
        if pos is None:
            return None
        tick = self._feed.ticks.get(pos.tick)
        return SavedPosition(str(pos), tick.fp if tick is not None else None)

    def lag(self) -> tuple[int, float] | None:
        """How far the delivered position trails the newest tick this reader
        knows: in ticks, and in seconds since the reader learned of the first
        tick not delivered yet (at most since the subscription started);
        ``(0, 0.0)`` when caught up, None before it started."""
        pos = self.cursor.delivered
        if pos is None or self._started_at is None:
            return None
        return self._feed.refresher.lag(pos, self._started_at)

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self

    async def __anext__(self) -> Batch:
        self.cursor.ack()
        while True:
            if self._closed and self._queue.empty():
                raise StopAsyncIteration
            item = await self._queue.get()
            if item is None:
                self._closed = True
                if self._failure is not None:
                    raise self._failure
                raise StopAsyncIteration
            epoch, batch = item
            if self.cursor.take(epoch, batch.position):
                self._feed.on_taken(self, batch)
                return batch

    def _moved(self) -> None:
        self._feed.delivered.fire()
        self._feed.saver.moved(self)

    async def close(self) -> None:
        """Stop this subscription; other subscriptions are unaffected."""
        self._closed = True
        if self._task is not None:
            await stop([self._task])
        self._feed.on_closed(self)
        # Wake a consumer waiting in __anext__: the subscription has ended.
        self._drain_queue()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- producer side ---------------------------------------------------
    async def start(self) -> None:
        """Resolve ``since``/``until`` and begin pulling. Idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pgfeed-subscription-{self.stream}")
        await self._started.wait_until(lambda: self._ready)
        if self._failure is not None:
            raise self._failure

    def _now_started(self) -> None:
        self._started_at = time.monotonic()
        self._ready = True
        self._started.fire()

    async def _run(self) -> None:
        try:
            await self._resolve_start()
        except BaseException as exc:
            self._failure = exc
            self._now_started()
            await self._queue.put(None)
            return
        self._now_started()
        backoff = Backoff()
        while not self._closed:
            try:
                done = await self._pump_once()
                backoff.reset()
                if done:
                    await self._queue.put(None)
                    return
            except psycopg.OperationalError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "read failed; retrying", stream=self.stream, error=str(exc).strip(), retry_in=round(delay, 3)
                )
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = translate(exc, f"reading stream {self.stream!r}") if isinstance(exc, psycopg.Error) else exc
                log.error("subscription failed", stream=self.stream, error=str(err))
                self._failure = err
                await self._queue.put(None)
                return

    async def _resolve_start(self) -> None:
        feed = self._feed
        saved = await feed.saver.load(self.consumer, self.stream) if self.consumer is not None else None
        if saved is not None:
            log.info("resuming from the saved position", stream=self.stream, consumer=self.consumer, token=saved.token)
            self._since = saved.token
        head, metas = await feed.refresher.refresh([self.stream])
        meta = metas.get(self.stream)
        if meta is None:
            raise UnknownStream(f"unknown stream {self.stream!r}: create it with `pgfeed stream create {self.stream}`")
        try:
            async with asyncio.timeout(NOW_TIMEOUT):
                since = await feed.resolver.spec(self._since)
                until = await feed.resolver.spec(self._until) if self._until is not None else None
        except TimeoutError:
            raise PgfeedError(
                f"no tick covered the present within {NOW_TIMEOUT:g}s: is a ticker running "
                "(`pgfeed daemon`, or a reader whose role may tick)?"
            ) from None
        wanted = newest_named(since, until)
        known = feed.refresher.head
        if wanted is not None and (known is None or known.id < wanted):
            head, metas = await feed.refresher.refresh([self.stream])
        head = feed.refresher.head or head
        start: Spec
        distrust = None
        if saved is not None:
            start, distrust = await feed.resolver.resume(self.stream, saved, head.id, meta)
        else:
            start = await feed.resolver.prove(self.stream, since, head.id, meta, "since")
        stop = await feed.resolver.prove(self.stream, until, head.id, meta, "until") if until is not None else None
        self.cursor.start(start, stop, head.id, meta, distrust)
        await feed.listener.ready()

    def _reset(self, reason: str) -> None:
        """The cursor was reset: what was queued belongs to the old history."""
        meta = self.cursor.meta
        log.warning(
            "continuity lost; resetting", stream=self.stream, stream_id=meta.id if meta else None, reason=reason
        )
        self._drain_queue()

    def history_changed(self, reason: str) -> None:
        """The database is not the history we read (see Refresher.refresh)."""
        if self.cursor.history_changed(reason):
            self._reset(reason)

    def _drain_queue(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self.cursor.forget_queued()

    async def _deliver(self, rows: list[Row], end: Position, meta: StreamMeta) -> None:
        """Queue a batch (the reset batch first fires ``on_reset``)."""
        check = self._feed.ticks.check(end.tick, meta.id, meta.created_tick)
        epoch, reason = self.cursor.queue(end)
        if reason is not None:
            await self._feed.on_reset(self.stream, reason)
        await self._queue.put((epoch, Batch(self.stream, rows, end, reset=reason is not None, check=check)))

    async def _pump_once(self) -> bool:
        """One planning step; return True when ``until`` is reached."""
        feed, cursor = self._feed, self.cursor
        if cursor.finished:
            return True
        head, metas = await feed.refresher.wait_for_work(cursor)
        meta = metas.get(self.stream)
        if meta is None:
            if cursor.lose_stream():
                log.warning("stream dropped; waiting for it to be recreated", stream=self.stream)
            await feed.refresher.wait_tick_after(head.id)
            return False
        reason = cursor.follow(meta)
        if reason is not None:
            self._reset(reason)
        assert cursor.fetch is not None
        if cursor.at_head(head.id):
            if cursor.pending_reset is not None:
                # Nothing to read yet (a recreated stream, no tick since): the
                # consumer must still learn of the break now, not at the next row.
                await self._deliver([], cursor.fetch, meta)
            return False
        epoch = cursor.epoch
        try:
            planned = await feed.ranges.plan(self.stream, meta.id, cursor.fetch, head)
            if epoch != cursor.epoch:
                return False  # reset while reading: the read belongs to the old history
        except Interrupted as why:
            # Pruned or dropped under us: discard the read, let a fresh tick tell.
            log.info("read interrupted; waiting for a fresh tick", stream=self.stream, reason=str(why))
            feed.refresher.wake()
            await feed.refresher.wait_tick_after(head.id)
            return False
        planned_rows, end = cursor.cut(planned)
        # Nothing was awaited since the epoch check: the tick cache still
        # holds the ticks this read used (a history change clears it and
        # bumps the epoch). One check per distinct tick.
        checks = {t: feed.ticks.check(t, meta.id, meta.created_tick) for t in {p.tick for p, _ in planned_rows}}
        rows = [
            Row(self.stream, pos, r.payload, r.key, r.created_at, r.xid, r.seq, checks[pos.tick])
            for pos, r in planned_rows
        ]
        if cursor.read(end, bool(rows)):
            await self._deliver(rows, end, meta)
        return False
