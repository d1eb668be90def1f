"""The embedded reader (asyncio): one LISTEN connection per process, a small
pool for range reads, any number of subscriptions.

How a reader stays gap-free (the argument itself is in
:mod:`pgfeed.core.positions`):

* The reader never takes ticks: one ticker per database does (``pgfeed
  daemon``, or the :class:`~pgfeed.ticker.Ticker` this reader runs when its
  role may tick and nobody else does, ``ticker="auto"``). The reader learns
  of new ticks by LISTEN on the ticker's channel plus a fallback poll of
  ``pgfeed.ticks``, so it needs only SELECT (and works on a hot standby, by
  polling).
* The listener LISTENs first, then wakes the refresher, so a catch-up always
  starts after the subscription is live (notifications are only hints).
  Every delivery decision comes from rows read after the tick committed.
* Each subscription pulls batches from its own position up to the newest tick
  and puts them on a bounded queue: a slow consumer only slows itself, and
  memory is bounded by ``queue_batches * batch_size`` rows per subscription.
* A subscription's position moves only when the consumer has taken the next
  batch (or the callback returned), so ``position()`` and ``wait_for`` speak
  of what was delivered, not of what was read ahead.
* Reconnects of any connection retry from the last position with backoff;
  nothing is skipped or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from pgfeed import store
from pgfeed.connect import aconnect, resolve, with_keepalives
from pgfeed.core.backoff import Backoff
from pgfeed.core.names import check_stream_name
from pgfeed.core.positions import NeedTicks, Planned, Position, Tick, plan_window, read_step
from pgfeed.core.tokens import CommitToken, first_covering
from pgfeed.errors import (
    ForkedReader,
    FutureToken,
    HandlerFailed,
    PermissionDenied,
    PgfeedError,
    ReaderClosed,
    TokenError,
    UnknownStream,
    UsageError,
    WaitTimeout,
    translate,
)
from pgfeed.log import get_logger
from pgfeed.options import OPTION_NAMES, ReaderOptions
from pgfeed.ticker import LEASE_CHANNEL, TICKS_CHANNEL, Ticker, TickerUnavailable
from pgfeed.writer import CACHES_STREAM

if TYPE_CHECKING:
    from pgfeed.cache import AsyncCache

log = get_logger("pgfeed.reader")

Since = str | Position
Token = str | Position | CommitToken
T = TypeVar("T")
#: How long a woken ticker waits for range reads in flight (seconds).
LIVE_READ_GRACE = 0.005
PRUNED = "the position is older than what the stream still holds (pruned)"
#: How long resolving "now" may wait for the ticker (seconds).
NOW_TIMEOUT = 30.0


def _pruned_past(pos: Position, meta: store.StreamMeta) -> bool:
    """Whether a prune removed rows that reading on from ``pos`` needs: the
    intervals up to the floor are gone, so a complete position must be at the
    floor or later, and a partial one (inside interval n) after it."""
    return pos.tick < meta.floor_tick or (not pos.complete and pos.tick <= meta.floor_tick)


class _Signal:
    """Wakes every waiter on each :meth:`fire`; each waiter re-checks its own condition."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        fired, self._event = self._event, asyncio.Event()
        fired.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()


class _Interrupted(Exception):
    """A read that cannot be trusted (pruned or dropped meanwhile); retried after a fresh tick."""


ResetCallback = Callable[[str, str], Any]


class Row(NamedTuple):
    """One delivered change (a named tuple: cheap to build by the million)."""

    stream: str
    position: Position
    payload: Any
    key: str | None
    created_at: datetime
    xid: int
    seq: int

    @property
    def token(self) -> str:
        """The position token after this row; resume with ``since=token``."""
        return str(self.position)


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

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class _TickCache:
    """Ticks already fetched, shared by every subscription of the reader."""

    ticks: dict[int, Tick] = field(default_factory=dict)
    limit: int = 200_000

    def add(self, ticks: list[Tick]) -> None:
        for t in ticks:
            self.ticks[t.id] = t
        if len(self.ticks) > self.limit:
            for key in sorted(self.ticks)[: len(self.ticks) - self.limit // 2]:
                del self.ticks[key]

    def first_missing(self, first: int, last: int) -> int | None:
        """The lowest id in ``first..last`` not cached, or None."""
        return next((i for i in range(first, last + 1) if i not in self.ticks), None)

    def run(self, first: int, last: int) -> list[Tick] | None:
        """Ticks ``first..last`` if all are cached, else None."""
        out = [self.ticks.get(i) for i in range(first, last + 1)]
        return None if any(t is None for t in out) else [t for t in out if t is not None]


class Subscription:
    """An ordered stream of :class:`Batch` for one stream; use ``async for``.

    Taking the next batch acknowledges the previous one: the subscription's
    :attr:`position` (what ``wait_for`` and ``Reader.position`` report) then
    moves past it.
    """

    def __init__(
        self,
        reader: AsyncReader,
        stream: str,
        since: Since,
        until: Since | None,
        queue_batches: int,
        consumer: str | None = None,
    ) -> None:
        self._reader = reader
        self.stream = stream
        self.consumer = consumer
        self._since = since
        self._until_spec = until
        self._until: Position | None = None
        #: Batches tagged with the epoch they were read in; a reset bumps the
        #: epoch, so a batch that got in after it (its put was waiting for
        #: room) is dropped instead of delivered from the old history.
        self._queue: asyncio.Queue[tuple[int, Batch] | None] = asyncio.Queue(maxsize=max(1, queue_batches))
        self._fetch: Position | None = None  # read-ahead position
        self._acked: Position | None = None  # delivered position
        self._outstanding: list[Position] = []
        self._idle_target: Position | None = None
        self._handed: Batch | None = None
        self._meta: store.StreamMeta | None = None
        self._pending_reset: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._epoch = 0  # bumped by every reset: a read begun before it is discarded

    # -- consumer side ---------------------------------------------------
    @property
    def position(self) -> Position | None:
        """How far this subscription has delivered (None before it started)."""
        return self._acked

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self

    async def __anext__(self) -> Batch:
        self._ack()
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
            if epoch == self._epoch:
                self._handed = batch
                return batch

    def _ack(self) -> None:
        if self._handed is None:
            return
        batch, self._handed = self._handed, None
        self._outstanding.remove(batch.position)
        self._advance(batch.position)
        if not self._outstanding and self._idle_target is not None:
            self._advance(self._idle_target)
            self._idle_target = None

    def _advance(self, pos: Position) -> None:
        if self._acked is None or pos > self._acked:
            self._acked = pos
            self._reader._positions_changed()
            if self.consumer is not None:
                self._reader._unsaved.add(self)

    async def close(self) -> None:
        """Stop this subscription; other subscriptions are unaffected."""
        self._closed = True
        if self._task is not None:
            await _stop([self._task])
        self._reader._subscriptions.discard(self)
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
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure

    async def _run(self) -> None:
        try:
            await self._resolve_start()
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
            await self._queue.put(None)
            return
        self._ready.set()
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
        reader = self._reader
        if self.consumer is not None:
            saved = await reader._load_position(self.consumer, self.stream)
            if saved is not None:
                log.info("resuming from the saved position", stream=self.stream, consumer=self.consumer, token=saved)
                self._since = saved
        head, metas = await reader._tick_now([self.stream])
        meta = metas.get(self.stream)
        if meta is None:
            raise UnknownStream(f"unknown stream {self.stream!r}: create it with `pgfeed stream create {self.stream}`")
        self._meta = meta
        try:
            async with asyncio.timeout(NOW_TIMEOUT):
                self._since = await reader._resolve_spec(self._since)
                if self._until_spec is not None:
                    self._until_spec = await reader._resolve_spec(self._until_spec)
        except TimeoutError:
            raise PgfeedError(
                f"no tick covered the present within {NOW_TIMEOUT:g}s: is a ticker running "
                "(`pgfeed daemon`, or a reader whose role may tick)?"
            ) from None
        wanted = [p.tick for p in (self._since, self._until_spec) if isinstance(p, Position)]
        if wanted and (reader._head is None or reader._head.id < max(wanted)):
            head, metas = await reader._tick_now([self.stream])
        head = reader._head or head
        start = self._parse_since(self._since, head, meta, "since")
        if start.tick < meta.created_tick:
            self._pending_reset = "the starting position is older than this stream's current incarnation"
            start = Position(meta.first_tick)
        elif _pruned_past(start, meta):
            self._pending_reset = PRUNED
            start = Position(meta.first_tick)
        self._fetch = start
        self._acked = start
        if self._until_spec is not None:
            self._until = self._parse_since(self._until_spec, head, meta, "until")
        await reader._listener_ready()

    def _parse_since(self, spec: Since, head: Tick, meta: store.StreamMeta, what: str) -> Position:
        if isinstance(spec, Position):
            pos = spec
        elif spec == "earliest":
            return Position(meta.first_tick)
        elif spec == "now":
            return Position(head.id)
        elif isinstance(spec, str):
            pos = Position.parse(spec)
        else:
            raise TokenError(f"invalid {what} {spec!r}: expected 'earliest', 'now' or a position token")
        if pos.tick > head.id:
            raise FutureToken(f"position {pos} is beyond anything this database has issued (newest tick {head.id})")
        return pos

    def _check_stream(self, metas: dict[str, store.StreamMeta]) -> bool:
        """Follow a drop/recreate or a prune past our position; False while the stream is missing."""
        meta = metas.get(self.stream)
        if meta is None:
            if self._meta is not None:
                log.warning("stream dropped; waiting for it to be recreated", stream=self.stream)
                self._meta = None
            return False
        assert self._fetch is not None
        if self._meta is None or meta.id != self._meta.id:
            self._reset_to(meta, "the stream was dropped and recreated")
        elif _pruned_past(self._fetch, meta):
            self._reset_to(meta, PRUNED)
        self._meta = meta
        return True

    def _history_changed(self, reason: str) -> None:
        """The database is not the history we read (see AsyncReader._check_history)."""
        if self._meta is not None and self._fetch is not None:
            self._reset_to(self._meta, reason)

    def _reset_to(self, meta: store.StreamMeta, reason: str) -> None:
        """Continuity is lost: forget what was read ahead and restart at the stream's first tick."""
        log.warning("continuity lost; resetting", stream=self.stream, stream_id=meta.id, reason=reason)
        self._epoch += 1
        self._pending_reset = reason
        self._fetch = Position(meta.first_tick)
        self._drain_queue()
        # No delivered position until the consumer has taken the reset batch:
        # wait_for must not return before the consumer knows of the break.
        self._acked = None

    def _drain_queue(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._outstanding.clear()
        self._idle_target = None
        self._handed = None

    async def _deliver(self, rows: list[Row], end: Position) -> None:
        """Queue a batch (the reset batch first fires ``on_reset``)."""
        epoch = self._epoch
        reason, self._pending_reset = self._pending_reset, None
        if reason is not None:
            await self._reader._fire_reset(self.stream, reason)
        self._outstanding.append(end)
        await self._queue.put((epoch, Batch(self.stream, rows, end, reset=reason is not None)))

    async def _pump_once(self) -> bool:
        """One planning step; return True when ``until`` is reached."""
        reader = self._reader
        assert self._fetch is not None
        if self._until is not None and self._fetch >= self._until:
            return True
        head, metas = await reader._wait_head(self)
        if not self._check_stream(metas):
            await reader._wait_tick_after(head.id)
            return False
        assert self._meta is not None
        assert self._fetch is not None
        if self._fetch.complete and self._fetch.tick >= head.id:
            if self._pending_reset is not None:
                # Nothing to read yet (a recreated stream, no tick since): the
                # consumer must still learn of the break now, not at the next row.
                await self._deliver([], self._fetch)
            return False
        epoch = self._epoch
        try:
            planned = await reader._plan(self.stream, self._meta.id, self._fetch, head)
            if epoch != self._epoch:
                return False  # reset while reading: the read belongs to the old history
        except _Interrupted as why:
            # Pruned or dropped under us: discard the read, let a fresh tick tell.
            log.info("read interrupted; waiting for a fresh tick", stream=self.stream, reason=str(why))
            reader._wake.set()
            await reader._wait_tick_after(head.id)
            return False
        end = planned.end
        assert end is not None
        if self._until is not None and end > self._until:
            planned = Planned([(p, r) for p, r in planned.rows if p <= self._until], self._until)
            end = self._until
        rows = [Row(self.stream, pos, r.payload, r.key, r.created_at, r.xid, r.seq) for pos, r in planned.rows]
        self._fetch = end
        if rows or self._pending_reset:
            await self._deliver(rows, end)
        elif self._outstanding or self._handed is not None:
            self._idle_target = end
        else:
            self._advance(end)
        return False


class AsyncReader:
    """A reader for one process. Open it once, subscribe many times.

    ``conninfo``: where to connect (``None``: the same resolution as the CLI —
    ``PGFEED_DSN``, libpq's environment, then the embedded server, see
    :func:`pgfeed.connect.resolve`).

    The options are those of :class:`~pgfeed.options.ReaderOptions` (see it
    for what each means: polling, probes, batching, ``handler_retries``, the
    ``max_connections`` budget, the embedded ticker), given as keywords or as
    ``options=``; keywords that differ from their default replace the fields
    of ``options``. Every value is checked there, once.

    Use ``async with AsyncReader(...) as reader:``, in the process that uses
    it (after any fork: a reader used in a child raises
    :class:`~pgfeed.errors.ForkedReader`); callbacks given to :meth:`on` run
    on the event loop (async) or in a worker thread (sync).
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        options: ReaderOptions | None = None,
        poll_interval: float = ReaderOptions.poll_interval,
        probe_interval: float = ReaderOptions.probe_interval,
        probe_timeout: float = ReaderOptions.probe_timeout,
        batch_size: int = ReaderOptions.batch_size,
        queue_batches: int = ReaderOptions.queue_batches,
        tick_window: int = ReaderOptions.tick_window,
        pool_size: int | None = ReaderOptions.pool_size,
        max_connections: int = ReaderOptions.max_connections,
        save_interval: float = ReaderOptions.save_interval,
        ticker: str = ReaderOptions.ticker,
        ticker_lease: float = ReaderOptions.ticker_lease,
        handler_retries: int = ReaderOptions.handler_retries,
    ) -> None:
        # Every keyword named like a ReaderOptions field (a test keeps the two in step).
        given = {name: value for name, value in locals().items() if name in OPTION_NAMES}
        self.options = ReaderOptions.merge(options, given)
        self._broken: str | None = None  # why this database cannot be trusted (see _tick_now)
        self._ticker: Ticker | None = None
        self._conninfo_arg = conninfo
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._subscriptions: set[Subscription] = set()
        self._ticks = _TickCache()
        self._head: Tick | None = None
        self._metas: dict[str, store.StreamMeta] = {}
        self._head_changed = _Signal()
        self._wake = asyncio.Event()
        self._positions = _Signal()
        self._listening = False
        self._listener_up = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._reset_callbacks: list[ResetCallback] = []
        self._error_callbacks: list[Callable[[str, HandlerFailed], Any]] = []
        #: Callback subscriptions stopped by a failing handler, with why: they
        #: hold their stream's delivered position back (see position()).
        self._failed: list[tuple[Subscription, HandlerFailed]] = []
        self._invalidators: dict[str, list[Callable[[list[str] | None], Any]]] = {}
        self._cache_subscription: Subscription | None = None
        self._pending_callbacks: list[tuple[str, Callable[[Batch], Any], Since, str | None]] = []
        self._unsaved: set[Subscription] = set()  # consumers whose delivered position is not saved yet
        #: Rows read together with the newest tick: (stream, tick before it) -> (rows, floor).
        self._prefetched: dict[tuple[str, int], tuple[list[store.StoredRow], int]] = {}
        self._reads = 0  # range reads in flight
        self._reads_done = _Signal()
        self._open = False
        self._pid: int | None = None  # the process that opened this reader
        self._conninfo = ""

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> AsyncReader:
        """Connect the pool and start the listener and ticker."""
        if self._open:
            return self
        if self._conninfo_arg is None:
            self._conninfo = (await asyncio.to_thread(resolve, None)).conninfo
        else:
            self._conninfo = self._conninfo_arg
        self._conninfo = with_keepalives(self._conninfo)
        # One plain connection first: a wrong DSN fails at once with a clear
        # message instead of after the pool's retries.
        probe = await aconnect(self._conninfo, doing="opening the reader")
        await probe.close()

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            # Ticks must be durable before anything is delivered from them.
            # The reader's few queries run thousands of times: prepare them at
            # once and keep one generic plan instead of planning every call.
            await conn.execute("SET synchronous_commit = on")
            await conn.execute("SET default_transaction_isolation = 'read committed'")
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            conn.prepare_threshold = 0

        self._pool = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.options.read_connections,
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name="pgfeed-reader",
        )
        try:
            await self._pool.open(wait=True, timeout=15)
        except psycopg.Error as exc:
            await self._pool.close()
            raise translate(exc, "opening the reader's connection pool") from None
        except Exception as exc:
            await self._pool.close()
            raise PgfeedError(f"cannot connect the reader: {exc}") from None
        self._open = True
        self._pid = os.getpid()
        if self.options.ticker == "auto":
            # It follows through the pool, within max_connections; only a leader holds one more.
            self._ticker = Ticker(
                self._conninfo, kind="reader", lease=self.options.ticker_lease, borrow=self._pool.connection
            )
        self._tasks = [
            asyncio.create_task(self._listen(), name="pgfeed-listener"),
            asyncio.create_task(self._refresh_loop(), name="pgfeed-refresher"),
            asyncio.create_task(self._save_loop(), name="pgfeed-position-saver"),
        ]
        if self._ticker is not None:
            self._tasks.append(asyncio.create_task(self._run_ticker(self._ticker), name="pgfeed-embedded-ticker"))
        log.info("reader opened")
        pending, self._pending_callbacks = self._pending_callbacks, []
        try:
            for stream, fn, since, consumer in pending:
                await self._start_callback(stream, fn, since, consumer)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop every subscription, the listener and the pool.

        In a process forked after :meth:`open`, only forgets the parent's
        connections and tasks, never touching them (closing a connection
        would end the parent's session); the reader can then be opened again.
        """
        if self._pid is not None and self._pid != os.getpid():
            _INHERITED.append((self._pool, self._tasks, self._ticker, self._subscriptions))
            self._open, self._pid, self._pool, self._ticker = False, None, None, None
            self._tasks, self._subscriptions, self._callback_tasks = [], set(), set()
            return
        if not self._open:
            return
        self._open = False
        for sub in list(self._subscriptions):
            await sub.close()
        try:
            await self._save_positions()
        except PgfeedError as exc:
            log.warning("could not save consumer positions on close", error=str(exc))
        self._wake.set()
        await _stop([*self._tasks, *self._callback_tasks])
        if self._ticker is not None:
            await self._ticker.close()
            self._ticker = None
        if self._pool is not None:
            await self._pool.close()
        log.info("reader closed")

    async def __aenter__(self) -> AsyncReader:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_process(self) -> None:
        """ForkedReader if this reader was opened in another process (a fork's parent)."""
        if self._pid is not None and self._pid != os.getpid():
            raise forked_error("AsyncReader", self._pid)

    def _require_open(self) -> None:
        self._check_process()
        if not self._open:
            raise ReaderClosed("the reader is not open: use `async with AsyncReader(...)` or call open()")

    # -- public API ------------------------------------------------------
    async def subscribe(
        self, stream: str, since: Since = "earliest", *, until: Since | None = None, consumer: str | None = None
    ) -> Subscription:
        """Subscribe to ``stream`` from ``since`` (``"earliest"``, ``"now"`` or a
        token) and return a started :class:`Subscription` yielding batches.

        With ``until`` (``"now"`` or a token) iteration ends once that
        position is delivered. With ``consumer``, the delivered position is
        saved in ``pgfeed.positions`` (per role, every ``save_interval`` and on
        close) and a later subscription with the same name resumes from it,
        ignoring ``since``: after a crash, up to ``save_interval`` of rows are
        delivered again (at-least-once across restarts; make handlers
        idempotent or keep your own token in your own transaction).
        Raises :class:`UnknownStream`, :class:`TokenError` or
        :class:`FutureToken` at once.
        """
        self._require_open()
        check_stream_name(stream)
        if consumer is not None and (not isinstance(consumer, str) or not consumer or len(consumer) > 200):
            raise UsageError(f"invalid consumer name {consumer!r}: expected 1-200 characters")
        sub = Subscription(self, stream, since, until, self.options.queue_batches, consumer)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            await sub.close()
            raise
        return sub

    def on(
        self,
        stream: str,
        fn: Callable[[Batch], Any] | None = None,
        *,
        since: Since = "earliest",
        consumer: str | None = None,
    ) -> Any:
        """Call ``fn(batch)`` for every batch of ``stream``, in order, one at a
        time. A sync ``fn`` runs in a worker thread; an async one on the loop.

        A batch counts as delivered only once ``fn`` returned. If ``fn``
        raises, it is called again with the same batch, with backoff, up to
        ``handler_retries`` times (make it idempotent); then the subscription
        stops before that batch: its position (and a named consumer's saved
        position) stays before it, every :meth:`on_error` hook gets
        ``(stream, HandlerFailed)``, :meth:`wait_for` on the stream raises
        :class:`~pgfeed.errors.HandlerFailed` for anything past it, and the
        failure is logged. Call ``on()`` again (with the same ``consumer`` it
        resumes from the saved position) once the cause is fixed.

        Before :meth:`open`, registers ``fn`` to start when the reader opens
        (``open()`` raises if the stream is unknown); usable as a decorator::

            @reader.on("orders", since="now")
            async def handle(batch): ...

        On an open reader it returns a task; await it to get the
        :class:`Subscription` (and any error, e.g. :class:`UnknownStream`).
        """
        check_stream_name(stream)
        if fn is None:

            def register(f: Callable[[Batch], Any]) -> Callable[[Batch], Any]:
                self.on(stream, f, since=since, consumer=consumer)
                return f

            return register
        self._check_process()
        if not self._open:
            self._pending_callbacks.append((stream, fn, since, consumer))
            return fn
        return asyncio.ensure_future(self._start_callback(stream, fn, since, consumer))

    async def _start_callback(
        self, stream: str, fn: Callable[[Batch], Any], since: Since, consumer: str | None = None
    ) -> Subscription:
        sub = await self.subscribe(stream, since, consumer=consumer)
        # A handler started again on this stream and consumer replaces the one that failed.
        self._failed = [(s, e) for s, e in self._failed if (s.stream, s.consumer) != (stream, consumer)]
        self._spawn_consumer(sub, fn)
        return sub

    def _spawn_consumer(self, sub: Subscription, fn: Callable[[Batch], Any]) -> None:
        async def consume() -> None:
            try:
                async for batch in sub:
                    # The next __anext__ acknowledges this batch: reached only once fn took it.
                    await self._handle(sub, fn, batch)
            except HandlerFailed as exc:
                await self._handler_failed(sub, exc)
            except PgfeedError as exc:
                log.error("subscription stopped; its callback gets no more batches", stream=sub.stream, error=str(exc))

        task = asyncio.create_task(consume(), name=f"pgfeed-callback-{sub.stream}")
        self._callback_tasks.add(task)
        task.add_done_callback(self._callback_tasks.discard)

    async def _handle(self, sub: Subscription, fn: Callable[[Batch], Any], batch: Batch) -> None:
        """``fn(batch)``, retried with backoff on the same batch up to
        ``handler_retries`` times; then :class:`HandlerFailed`."""
        backoff = Backoff()
        attempts = 0
        while True:
            attempts += 1
            try:
                await _call(fn, batch)
                return
            except Exception as exc:
                if attempts > self.options.handler_retries:
                    raise HandlerFailed(
                        f"the handler of stream {sub.stream!r} failed {attempts} times on the batch up to "
                        f"{batch.position}: {type(exc).__name__}: {_one_line(exc)}; its subscription stopped at "
                        f"{sub.position} (the batch counts as not delivered)",
                        stream=sub.stream,
                        position=sub.position,
                        batch_position=batch.position,
                        attempts=attempts,
                    ) from exc
                delay = backoff.next_delay()
                log.warning(
                    "subscriber callback failed; retrying the same batch",
                    stream=sub.stream,
                    batch=str(batch.position),
                    attempt=attempts,
                    retry_in=round(delay, 3),
                    error=f"{type(exc).__name__}: {_one_line(exc)}",
                )
                await asyncio.sleep(delay)

    async def _handler_failed(self, sub: Subscription, exc: HandlerFailed) -> None:
        """Stop ``sub`` before the batch its handler could not take and say so."""
        log.error("subscriber callback kept failing; its subscription stopped", stream=sub.stream, error=str(exc))
        self._failed.append((sub, exc))
        # Closing never acknowledges the batch in hand: the position (and what
        # a consumer saves from it) stays before it.
        await sub.close()
        self._positions_changed()  # wait_for on this stream now raises
        for hook in self._error_callbacks:
            try:
                await _call(hook, sub.stream, exc)
            except Exception:
                log.exception("on_error hook failed", stream=sub.stream)

    def on_error(self, fn: Callable[[str, HandlerFailed], Any]) -> None:
        """Call ``fn(stream, error)`` when an :meth:`on` handler failed
        ``handler_retries + 1`` times on one batch and its subscription
        stopped (``error`` is a :class:`~pgfeed.errors.HandlerFailed`; its
        ``__cause__`` is what the handler raised)."""
        self._error_callbacks.append(fn)

    def _handler_failure(self, stream: str, target: Position | None) -> HandlerFailed | None:
        """The failure that keeps ``stream`` from ever being delivered up to ``target``."""
        for sub, exc in self._failed:
            if sub.stream == stream and (target is None or not _reached(sub.position, target)):
                return exc
        return None

    def on_reset(self, fn: ResetCallback) -> None:
        """Call ``fn(stream, reason)`` whenever continuity cannot be proven; it
        runs before the first batch after the break is delivered."""
        self._reset_callbacks.append(fn)

    async def on_invalidate(self, cache_name: str, fn: Callable[[list[str] | None], Any]) -> None:
        """Call ``fn(keys)`` for every invalidation of ``cache_name`` from now
        on; ``keys`` is None for "invalidate everything" and after any reset."""
        self._require_open()
        self._invalidators.setdefault(cache_name, []).append(fn)
        if self._cache_subscription is None:
            self._cache_subscription = await self._start_callback(CACHES_STREAM, self._dispatch_invalidations, "now")

    async def cache(self, cache_name: str) -> AsyncCache[Any]:
        """A per-process cache for ``cache_name``, invalidated through this
        reader, whose fills cannot race invalidations; see :mod:`pgfeed.cache`."""
        from pgfeed.cache import AsyncCache

        return await AsyncCache[Any](self, cache_name).start()

    async def _dispatch_invalidations(self, batch: Batch) -> None:
        if batch.reset:
            for fns in self._invalidators.values():
                for fn in fns:
                    await _call(fn, None)
        for row in batch.rows:
            payload = row.payload if isinstance(row.payload, dict) else {}
            for fn in self._invalidators.get(str(payload.get("cache")), []):
                keys = payload.get("keys")
                await _call(fn, list(keys) if isinstance(keys, list) else None)

    def position(self, stream: str) -> Position | None:
        """How far this process has delivered ``stream`` (the least advanced of
        its subscriptions, those stopped by a failing handler included), or
        None if it does not follow it."""
        self._check_process()
        subs = [*self._subscriptions, *(sub for sub, _ in self._failed)]
        positions = [s.position for s in subs if s.stream == stream and s.position is not None]
        return min(positions) if positions else None

    async def wait_for(self, stream: str, token: Token, timeout: float = 10.0) -> Position:
        """Return once this process has delivered ``stream`` up to ``token``.

        ``token`` is a position token (``row.token``, ``"41"``) or a commit
        token from :func:`pgfeed.commit_token` (``"x1234"``, ``"s..."``), which
        is resolved to the first tick covering that commit. Event-driven; no
        query at all when the token is already covered. Refuses at once a
        token beyond anything the database has issued (:class:`FutureToken`)
        and a stream this process does not follow; rides out lost connections
        and server restarts; raises :class:`WaitTimeout` after ``timeout``
        seconds, and :class:`HandlerFailed` when an :meth:`on` handler of the
        stream stopped before ``token`` (it will never be delivered here).
        Raises only :class:`PgfeedError` subclasses.
        """
        self._require_open()
        if self._broken is not None:
            raise PgfeedError(self._broken)
        commit = token if isinstance(token, CommitToken) else None
        if isinstance(token, str):
            commit = CommitToken.parse(token)
        target = None if commit is not None else (token if isinstance(token, Position) else Position.parse(str(token)))
        if not any(s.stream == stream for s in self._subscriptions) and self._handler_failure(stream, None) is None:
            raise UsageError(f"this reader does not follow stream {stream!r}: subscribe to it before waiting")
        try:
            async with asyncio.timeout(timeout):
                if commit is not None:
                    target = await self._resolve_commit(commit)
                assert target is not None
                current = self.position(stream)
                if current is not None and current >= target:
                    return current
                if self._head is None or self._head.id < target.tick:
                    newest = await self._retrying(store.head_tick_id, "checking a token")
                    if target.tick > newest:
                        raise FutureToken(
                            f"position {target} is beyond anything this database has issued (newest tick {newest})"
                        )
                    self._wake.set()
                await self._positions.wait_until(
                    lambda: _reached(self.position(stream), target) or self._handler_failure(stream, target) is not None
                )
                failed = self._handler_failure(stream, target)
                if failed is not None and not _reached(self.position(stream), target):
                    raise failed
        except TimeoutError:
            raise WaitTimeout(
                f"timed out after {timeout:g}s waiting for stream {stream!r} to reach {target or commit}; "
                f"delivered up to {self.position(stream)}"
            ) from None
        pos = self.position(stream)
        assert pos is not None
        return pos

    async def _resolve_commit(self, commit: CommitToken) -> Position:
        """The position of the first tick covering ``commit``: wait (the caller
        bounds it) until a tick does, refusing a token from the future. No
        query when the newest tick this reader knows covers it already."""
        while True:
            head = self._head
            if head is not None and commit.covered_by(head.snapshot):
                # The first covering tick among those this reader knows (ticks
                # come in contiguous runs). An older covering tick may exist;
                # waiting for a later one is stricter, never wrong.
                first = head.id
                while first - 1 in self._ticks.ticks and head.id - first < 255:
                    first -= 1
                found = first_covering(self._ticks.run(first, head.id) or [head], commit)
                assert found is not None
                return Position(found.id)
            tick_id = await self._retrying(lambda conn: store.resolve_token(conn, str(commit)), "resolving a token")
            if tick_id is not None:
                return Position(tick_id)
            # The ticker has yet to take the covering tick; its NOTIFY wakes us.
            seen = head.id if head is not None else -1

            def newer(seen: int = seen) -> bool:
                return self._head is not None and self._head.id > seen

            await self._head_changed.wait_until(newer)

    async def _resolve_spec(self, spec: Since | CommitToken) -> Since:
        """``"now"`` and commit tokens as positions; other specs unchanged."""
        if spec == "now":
            return await self._now()
        commit = spec if isinstance(spec, CommitToken) else CommitToken.parse(spec) if isinstance(spec, str) else None
        if commit is not None:
            return await self._resolve_commit(commit)
        assert not isinstance(spec, CommitToken)
        return spec

    async def _now(self) -> Position:
        """A position covering every transaction committed before this call."""
        token = await self._retrying(store.snapshot_token, "reading the current snapshot")
        return await self._resolve_commit(token)

    async def _retrying(self, query: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], doing: str) -> T:
        """Run ``query`` on a pooled connection, retrying with backoff on a lost
        connection until the caller's timeout; other errors become PgfeedError."""
        assert self._pool is not None
        backoff = Backoff()
        while True:
            try:
                async with self._pool.connection() as conn:
                    return await query(conn)
            except (psycopg.OperationalError, OSError) as exc:
                delay = backoff.next_delay()
                log.info("query failed; retrying", doing=doing, error=_one_line(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            except psycopg.Error as exc:
                raise translate(exc, doing) from None
            except _Interrupted as exc:
                raise PgfeedError(f"{doing} failed: {exc}") from None

    # -- internals: positions -------------------------------------------
    async def _load_position(self, consumer: str, stream: str) -> str | None:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                return await store.load_position(conn, consumer, stream)
        except psycopg.Error as exc:
            raise translate(exc, f"loading the saved position of consumer {consumer!r}") from None

    async def _save_positions(self) -> None:
        """Write the delivered position of every consumer that moved."""
        if not self._unsaved or self._pool is None:
            return
        batch, self._unsaved = self._unsaved, set()
        rows = [(s.consumer, s.stream, str(s.position)) for s in batch if s.consumer and s.position is not None]
        try:
            async with self._pool.connection() as conn:
                await store.save_positions(conn, rows)
        except psycopg.Error as exc:
            self._unsaved |= batch  # try again next time
            raise translate(exc, "saving consumer positions") from None

    async def _save_loop(self) -> None:
        while self._open:
            await asyncio.sleep(self.options.save_interval)
            try:
                await self._save_positions()
            except PgfeedError as exc:
                log.warning("could not save consumer positions; retrying", error=str(exc))

    def _positions_changed(self) -> None:
        self._positions.fire()

    async def _fire_reset(self, stream: str, reason: str) -> None:
        log.warning("reset", stream=stream, reason=reason)
        for fn in self._reset_callbacks:
            try:
                await _call(fn, stream, reason)
            except Exception:
                log.exception("reset callback failed", stream=stream)

    # -- internals: ticks ------------------------------------------------
    def _stream_names(self) -> list[str]:
        return sorted({s.stream for s in self._subscriptions})

    async def _run_ticker(self, ticker: Ticker) -> None:
        """The embedded ticker: campaigns beside any daemon; steps aside for good
        when this role or server may not tick (a daemon or another reader does)."""
        try:
            await ticker.run()
        except TickerUnavailable as exc:
            log.info("this reader will not tick; it follows the ticks of a daemon or another reader", reason=str(exc))
        except PgfeedError as exc:
            log.error("embedded ticker stopped", error=str(exc))

    async def _tick_now(self, extra: list[str]) -> tuple[Tick, dict[str, store.StreamMeta]]:
        """Learn the newest tick (read-only). Subscriptions standing exactly at
        the reader's head get the next interval's rows in the same round trip."""
        assert self._pool is not None
        names = sorted({*self._stream_names(), *extra})
        started_at = self._head
        known = started_at.id if started_at is not None else None
        caught_up = {s.stream for s in self._subscriptions if known is not None and s._fetch == Position(known)}
        after = [known if known is not None and name in caught_up else -1 for name in names]
        try:
            async with self._pool.connection() as conn:
                live = await store.read_live(conn, known, names, after, self.options.batch_size)
        except psycopg.Error as exc:
            raise translate(exc, "reading the newest tick") from None
        head = live.head
        if head is None:
            raise PgfeedError("pgfeed.ticks is empty: run `pgfeed migrate` (it takes the first tick)")
        if live.server_xmax < head.snapshot.xmax:
            # Restored into a new cluster: its xids are below the restored
            # ticks', so every new transaction would look long covered.
            self._broken = (
                f"this database's transaction ids ({live.server_xmax}) are behind its newest tick {head.id} "
                f"({head.snapshot.xmax}): it is not the database the ticks were taken on (restored into a new "
                "cluster?); pgfeed refuses to deliver or confirm anything on it"
            )
            log.error("history changed; refusing to read", reason=self._broken)
            raise PgfeedError(self._broken)
        self._check_history(live.ticks, head, started_at)
        if known is not None and head.id == known + 1:
            self._prefetched = {(name, known): found for name, found in live.prefetched.items()}
        self._ticks.add(live.ticks)
        self._publish(head, live.metas)
        return head, live.metas

    def _check_history(self, ticks: list[Tick], head: Tick, known: Tick | None) -> None:
        """Ticks are immutable: one we saw with another snapshot, or a head
        behind the one this read started from, means the database is not the
        one we were reading (a lagging standby promoted, a restore). Never
        skip: reset loudly. (Concurrent reads may finish out of order: each is
        compared with its own starting point, not with the newest head.)"""
        reason = None
        if known is not None and head.id < known.id:
            reason = f"the newest tick went back from {known.id} to {head.id}"
        for t in ticks:
            seen = self._ticks.ticks.get(t.id)
            if seen is not None and seen.snapshot != t.snapshot:
                reason = f"tick {t.id} now has another snapshot"
                break
        if reason is None:
            return
        reason = f"the database's history changed ({reason}): failover to a standby that lagged, or a restore"
        log.error("history changed; every subscription resets", reason=reason)
        self._ticks = _TickCache()
        self._prefetched = {}
        self._head = None
        for sub in self._subscriptions:
            sub._history_changed(reason)

    def _publish(self, tick: Tick, metas: dict[str, store.StreamMeta]) -> None:
        self._ticks.add([tick])
        if self._head is None or tick.id >= self._head.id:
            self._head = tick
            self._metas.update(metas)
            for name in self._stream_names():
                if name not in metas:
                    self._metas.pop(name, None)
        self._head_changed.fire()

    async def _refresh_loop(self) -> None:
        backoff = Backoff()
        while self._open:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event, and close() would hang.
            poll = self.options.poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll if self._listening else min(poll, 0.2)):
                    await self._wake.wait()
            self._wake.clear()
            if not self._subscriptions:
                continue
            if self._reads:
                # Let reads in flight finish first, so the subscriptions stand at
                # the head and this refresh can carry their next rows.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LIVE_READ_GRACE):
                        await self._reads_done.wait_until(lambda: self._reads == 0)
            try:
                await self._tick_now([])
                backoff.reset()
            except PgfeedError as exc:
                delay = backoff.next_delay()
                # A missing grant is not transient and not this loop's to report:
                # every subscription's own read fails with it, once, to its caller.
                report = log.debug if isinstance(exc, PermissionDenied) else log.warning
                report("reading the newest tick failed; retrying", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                self._wake.set()

    async def _wait_head(self, sub: Subscription) -> tuple[Tick, dict[str, store.StreamMeta]]:
        """Wait until ``sub`` has something past its read position, or a reset
        to deliver (re-checked at each wake-up: a reset moves the position)."""

        def ready() -> bool:
            pos = sub._fetch
            if self._head is None or pos is None:
                return False
            return sub._pending_reset is not None or not pos.complete or self._head.id > pos.tick

        await self._head_changed.wait_until(ready)
        assert self._head is not None
        return self._head, self._metas

    async def _wait_tick_after(self, tick_id: int) -> None:
        await self._head_changed.wait_until(lambda: self._head is not None and self._head.id > tick_id)

    async def _ticks_between(self, conn: psycopg.AsyncConnection[Any], first: int, last: int) -> list[Tick]:
        missing = self._ticks.first_missing(first, last)
        if missing is None:
            cached = self._ticks.run(first, last)
            assert cached is not None
            return cached
        fetched = await store.fetch_ticks(conn, missing, last)
        if [t.id for t in fetched] != list(range(missing, last + 1)):
            raise _Interrupted(f"ticks {missing}..{last} are no longer all in pgfeed.ticks (pruned)")
        # Assemble before caching: adding may evict the lowest ids, which
        # are exactly the ones a catching-up read needs.
        known = [self._ticks.ticks[i] for i in range(first, missing)]
        self._ticks.add(fetched)
        return known + fetched

    async def _plan(self, stream: str, stream_id: int, pos: Position, head: Tick) -> Planned[store.StoredRow]:
        """Drive one :func:`read_step` with real queries."""
        assert self._pool is not None
        ready = self._prefetched.get((stream, pos.tick)) if pos.complete and head.id == pos.tick + 1 else None
        if ready is not None and len(ready[0]) <= self.options.batch_size:
            rows, kept_from = ready
            if kept_from > pos.tick:
                raise _Interrupted(f"the stream was pruned up to tick {kept_from}")
            return plan_window([head], rows, self.options.batch_size)
        steps = read_step(pos, head.id, self.options.batch_size, self.options.tick_window)
        start_tick = pos.tick if pos.complete else pos.tick - 1
        self._reads += 1
        try:
            return await self._drive(steps, stream_id, start_tick)
        finally:
            self._reads -= 1
            self._reads_done.fire()

    async def _drive(
        self, steps: Generator[Any, Any, Planned[Any]], stream_id: int, start_tick: int
    ) -> Planned[store.StoredRow]:
        """Run a :func:`read_step` generator against the database."""
        assert self._pool is not None
        async with self._pool.connection() as conn:
            reply: Any = None
            try:
                while True:
                    request = steps.send(reply)
                    if isinstance(request, NeedTicks):
                        reply = await self._ticks_between(conn, request.first, request.last)
                    else:
                        reply, floor = await store.fetch_rows(
                            conn, stream_id, request.start, request.end, request.limit, request.after_seq
                        )
                        if floor is None:
                            raise _Interrupted("the stream was dropped")
                        if floor > start_tick:
                            raise _Interrupted(f"the stream was pruned up to tick {floor}")
            except StopIteration as done:
                planned: Planned[store.StoredRow] = done.value
                return planned

    # -- internals: listener ---------------------------------------------
    async def _listener_ready(self) -> None:
        """Wait (bounded) until the listener LISTENs on the ticks channel, so
        that a catch-up starts after notifications are live."""
        try:
            async with asyncio.timeout(self.options.probe_timeout):
                await self._listener_up.wait()
        except TimeoutError:
            log.warning("listener not ready; relying on polling until it is")

    async def _listen(self) -> None:
        backoff = Backoff()
        probe = f"pgfeed_v2_probe_{os.getpid()}_{id(self)}"
        while self._open:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True, connect_timeout=10)
            except (psycopg.Error, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("listener cannot connect; retrying", error=_one_line(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(probe)))
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(TICKS_CHANNEL)))
                if self._ticker is not None:  # it has no connection to hear a resignation on while it follows
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(LEASE_CHANNEL)))
                log.info("listener connected")
                self._listening = True
                self._listener_up.set()
                # LISTEN is live: now catch up (a notification is only a hint),
                # and let the ticker claim, in case a resignation came while not listening.
                self._wake.set()
                if self._ticker is not None:
                    self._ticker.poke()
                backoff.reset()
                await self._follow(conn, probe)
            except (psycopg.errors.FeatureNotSupported, psycopg.errors.ReadOnlySqlTransaction) as exc:
                # A hot standby refuses LISTEN: follow by polling instead.
                self._listener_up.set()
                log.info("LISTEN refused (a hot standby?); following by polling", error=_one_line(exc))
                await asyncio.sleep(60)  # then try again: the standby may have been promoted
            except (psycopg.Error, OSError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("listener lost; reconnecting", error=_one_line(exc), retry_in=round(delay, 3))
                self._listening = False
                await asyncio.sleep(delay)
            finally:
                self._listening = False
                await conn.close()

    async def _follow(self, conn: psycopg.AsyncConnection[Any], probe: str) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.options.probe_interval
        while self._open:
            async for note in conn.notifies(timeout=max(0.01, next_probe - loop.time())):
                if note.channel == TICKS_CHANNEL:
                    head = self._head.id if self._head is not None else -1
                    if not note.payload.isdigit() or int(note.payload) > head:
                        self._wake.set()
                elif note.channel == LEASE_CHANNEL and self._ticker is not None:
                    self._ticker.poke()
            if loop.time() >= next_probe:
                await self._probe(conn, probe)
                next_probe = loop.time() + self.options.probe_interval

    async def _probe(self, conn: psycopg.AsyncConnection[Any], probe: str) -> None:
        """Prove the connection answers: a NOTIFY to ourselves within ``probe_timeout``.

        On timeout the socket is shut down rather than the query cancelled:
        a cancel request to a backend that does not answer would itself hang.
        """
        task = asyncio.ensure_future(conn.execute("SELECT pg_notify(%s, '')", (probe,)))
        done, _ = await asyncio.wait({task}, timeout=self.options.probe_timeout)
        if task in done:
            task.result()
            return
        with contextlib.suppress(OSError):
            socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
        await asyncio.wait({task}, timeout=self.options.probe_timeout)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the connection is being replaced anyway
        raise TimeoutError(f"the listener's connection did not answer a probe within {self.options.probe_timeout:g}s")


#: What close() forgot in a forked child: kept referenced so that nothing in
#: the child ever finalises the parent's connections.
_INHERITED: list[object] = []


def forked_error(kind: str, pid: int) -> ForkedReader:
    """The one-line error for a reader used in a process it was not opened in."""
    return ForkedReader(
        f"this {kind} was opened in process {pid} before a fork; open a reader in each worker process after "
        "the fork (gunicorn: post_fork / post_worker_init, uvicorn: the app's lifespan, Celery: "
        "worker_process_init)"
    )


async def _stop(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if a
    cancellation was swallowed (a library may catch it while cleaning up)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if isinstance(result, Awaitable):
        return await result
    return result


def _reached(pos: Position | None, target: Position) -> bool:
    return pos is not None and pos >= target


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
