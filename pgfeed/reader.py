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

This module is the facade: :class:`AsyncReader` wires the parts, each in a
module of its own: :mod:`pgfeed.subscription` (a stream onto a queue, its
decisions in :mod:`pgfeed.core.cursor`), :mod:`pgfeed.refresher` (the newest
tick), :mod:`pgfeed.ranges` (range reads), :mod:`pgfeed.listener` (LISTEN),
:mod:`pgfeed.resolver` (commit tokens and "now"), :mod:`pgfeed.saver`
(consumer positions), :mod:`pgfeed.handlers` (:meth:`AsyncReader.on`) and
:mod:`pgfeed.invalidation` (cache invalidations) and :mod:`pgfeed.naming`
(connections named after what the reader follows, for ``pgfeed status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgfeed.aio import Signal, call, stop
from pgfeed.connect import aconnect, resolve, with_keepalives
from pgfeed.core.cursor import PRUNED, Cursor
from pgfeed.core.invalidation import CACHES_STREAM
from pgfeed.core.names import check_stream_name
from pgfeed.core.positions import Position, PositionToken
from pgfeed.core.tickcache import TickCache
from pgfeed.core.tokens import CommitToken
from pgfeed.errors import (
    FutureToken,
    HandlerFailed,
    PgfeedError,
    ReaderClosed,
    TickerUnavailable,
    UsageError,
    WaitTimeout,
    forked_error,
    translate,
)
from pgfeed.handlers import ErrorHook, Handler, Handlers, reached
from pgfeed.heartbeat import Heartbeats
from pgfeed.invalidation import Invalidations, Invalidator
from pgfeed.listener import Listener
from pgfeed.log import get_logger
from pgfeed.naming import SessionName
from pgfeed.options import OPTION_NAMES, ReaderOptions
from pgfeed.queries import query
from pgfeed.ranges import RangeReader
from pgfeed.refresher import Refresher
from pgfeed.resolver import Resolver, Since
from pgfeed.saver import PositionSaver
from pgfeed.store import StoredRow
from pgfeed.subscription import Batch, Feed, Row, Subscription
from pgfeed.ticker import Ticker

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pgfeed.cache import AsyncCache
    from pgfeed.metrics import ReaderMetrics

log = get_logger("pgfeed.reader")

Token = str | Position | CommitToken
ResetCallback = Callable[[str, str], Any]

#: What close() forgot in a forked child: kept referenced so that nothing in
#: the child ever finalises the parent's connections.
_INHERITED: list[object] = []


def metrics_for(options: ReaderOptions) -> ReaderMetrics | None:
    """The metrics ``options.metrics`` asks for (see
    :func:`pgfeed.metrics.reader_metrics`); prometheus_client is imported only then."""
    if not options.metrics:
        return None
    from pgfeed.metrics import reader_metrics

    return reader_metrics(options.metrics)


class AsyncReader:
    """A reader for one process. Open it once, subscribe many times.

    ``conninfo``: where to connect (``None``: the same resolution as the CLI —
    ``PGFEED_DSN``, libpq's environment, then the embedded server, see
    :func:`pgfeed.connect.resolve`).

    The options are those of :class:`~pgfeed.options.ReaderOptions` (see it
    for what each means: polling, probes, batching, ``handler_retries``, the
    ``max_connections`` budget, the embedded ticker, consumer ``heartbeat``),
    given as keywords or as ``options=``; keywords that differ from their
    default replace the fields of ``options``. Every value is checked there,
    once.

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
        heartbeat: float | None = ReaderOptions.heartbeat,
        metrics: CollectorRegistry | bool | None = ReaderOptions.metrics,
    ) -> None:
        # Every keyword named like a ReaderOptions field (a test keeps the two in step).
        given = {name: value for name, value in locals().items() if name in OPTION_NAMES}
        self.options = ReaderOptions.merge(options, given)
        self._metrics = metrics_for(self.options)
        self._conninfo_arg = conninfo
        self._conninfo = ""
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._ticker: Ticker | None = None
        self._open = False
        self._pid: int | None = None  # the process that opened this reader
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: set[Subscription] = set()
        self._pending_callbacks: list[tuple[str, Handler, Since, str | None]] = []
        self._reset_callbacks: list[ResetCallback] = []
        self._cache_subscription: Subscription | None = None
        self._name = SessionName()
        # The parts, wired once; each borrows pooled connections through _borrow.
        ticks: TickCache[StoredRow] = TickCache()
        self._ticks = ticks
        self._ranges = RangeReader(self._borrow, self.options, ticks)
        self._refresher = Refresher(
            self._borrow, self.options, ticks, self._ranges, self._cursors, self._history_changed
        )
        self._resolver = Resolver(self._borrow, self._refresher, ticks)
        self._listener = Listener(
            self.options, self._refresher.notified, self._listener_connected, self._name, self._listener_lost
        )
        self._saver = PositionSaver(self._borrow, self.options.save_interval)
        self._delivered = Signal()  # some subscription's delivered position moved
        self._handlers = Handlers(self.options.handler_retries, self._delivered.fire)
        self._invalidations = Invalidations()
        self._feed = Feed(
            self._refresher,
            self._ranges,
            self._resolver,
            self._listener,
            self._saver,
            ticks,
            self._delivered,
            self._fire_reset,
            self._subscription_closed,
            self._batch_taken,
        )
        if self._metrics is not None:
            self._handlers.error_hooks.append(self._handler_failed)

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> AsyncReader:
        """Connect the pool and start the listener and ticker."""
        if self._open:
            return self
        if self._conninfo_arg is None:
            self._conninfo = (await asyncio.to_thread(resolve, None)).conninfo
        else:
            self._conninfo = self._conninfo_arg
        self._conninfo = self._name.start(with_keepalives(self._conninfo))
        # One plain connection first: a wrong DSN fails at once with a clear
        # message instead of after the pool's retries.
        probe = await aconnect(self._conninfo, doing="opening the reader")
        self._name.adopt(probe)
        await probe.close()

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            # Ticks must be durable before anything is delivered from them.
            # The reader's few queries run thousands of times: prepare them at
            # once and keep one generic plan instead of planning every call.
            await conn.execute(query("set_synchronous_commit_on"))
            await conn.execute(query("set_read_committed_default"))
            await conn.execute(query("set_generic_plans"))
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
            self._ticker = Ticker(self._conninfo, kind="reader", lease=self.options.ticker_lease, borrow=self._borrow)
        # The ticker has no connection to hear a resignation on while it follows: the listener does.
        on_lease = self._ticker.poke if self._ticker is not None else None
        self._tasks = [
            asyncio.create_task(self._listener.run(self._conninfo, on_lease), name="pgfeed-listener"),
            asyncio.create_task(self._refresher.run(lambda: self._listener.listening), name="pgfeed-refresher"),
            asyncio.create_task(self._saver.run(), name="pgfeed-position-saver"),
        ]
        if self._ticker is not None:
            self._tasks.append(asyncio.create_task(self._run_ticker(self._ticker), name="pgfeed-embedded-ticker"))
        if self.options.heartbeat is not None:
            beats = Heartbeats(self._borrow, self.options.heartbeat, self._named_consumers)
            self._tasks.append(asyncio.create_task(beats.run(), name="pgfeed-consumer-heartbeat"))
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
            _INHERITED.append((self._pool, self._tasks, self._ticker, set(self._subscriptions)))
            self._open, self._pid, self._pool, self._ticker = False, None, None, None
            self._tasks, self._handlers.tasks = [], set()
            self._subscriptions.clear()
            return
        if not self._open:
            return
        self._open = False
        for sub in list(self._subscriptions):
            await sub.close()
        # Everything that moves or saves positions stops before the last save:
        # a handler finishing its batch would move a position after it, and a
        # periodic save cut short puts its positions back for it.
        await stop([*self._tasks, *self._handlers.tasks])
        try:
            await self._saver.save()
        except PgfeedError as exc:
            log.warning(
                "could not save consumer positions on close; the rows delivered since the last save come again",
                error=str(exc),
            )
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

    @contextlib.asynccontextmanager
    async def _borrow(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection, for one query or a few (every part borrows
        through here), named after what this reader follows now."""
        assert self._pool is not None, "the reader is not open"
        async with self._pool.connection() as conn:
            try:
                await self._name.apply(conn)
                yield conn
            finally:
                if conn.broken and self._metrics is not None:
                    self._metrics.pool_reconnects.inc()  # the pool replaces it

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

        A position token is verified against the database first: one with a
        check (``row.token``, ``batch.token``) must belong to this stream's
        current incarnation and this database's history, and a partial one
        (``n.seq``) must name a row of the stream in tick ``n``; otherwise
        :class:`TokenError`, before anything is delivered. A bare token
        (``"41"``) is not verified against history. A token whose tick was
        pruned, or a bare one older than the stream's incarnation, resets
        instead (``on_reset``, ``batch.reset``).
        Raises :class:`UnknownStream`, :class:`TokenError` or
        :class:`FutureToken` at once.
        """
        self._require_open()
        check_stream_name(stream)
        if consumer is not None and (not isinstance(consumer, str) or not consumer or len(consumer) > 200):
            raise UsageError(f"invalid consumer name {consumer!r}: expected 1-200 characters")
        sub = Subscription(self._feed, stream, since, until, self.options.queue_batches, consumer)
        self._subscriptions.add(sub)
        self._name_connections()
        if self._metrics is not None:
            self._metrics.track(sub)
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
        self, stream: str, fn: Handler, since: Since, consumer: str | None = None
    ) -> Subscription:
        sub = await self.subscribe(stream, since, consumer=consumer)
        self._handlers.start(sub, fn)
        return sub

    def on_error(self, fn: ErrorHook) -> None:
        """Call ``fn(stream, error)`` when an :meth:`on` handler failed
        ``handler_retries + 1`` times on one batch and its subscription
        stopped (``error`` is a :class:`~pgfeed.errors.HandlerFailed`; its
        ``__cause__`` is what the handler raised)."""
        self._handlers.error_hooks.append(fn)

    def on_reset(self, fn: ResetCallback) -> None:
        """Call ``fn(stream, reason)`` whenever continuity cannot be proven; it
        runs before the first batch after the break is delivered."""
        self._reset_callbacks.append(fn)

    async def on_invalidate(self, cache_name: str, fn: Invalidator) -> None:
        """Call ``fn(keys)`` for every invalidation of ``cache_name`` from now
        on; ``keys`` is None for "invalidate everything" and after any reset."""
        self._require_open()
        self._invalidations.add(cache_name, fn)
        if self._cache_subscription is None:
            self._cache_subscription = await self._start_callback(CACHES_STREAM, self._invalidations.dispatch, "now")

    async def cache(self, cache_name: str) -> AsyncCache[Any]:
        """A per-process cache for ``cache_name``, invalidated through this
        reader, whose fills cannot race invalidations; see :mod:`pgfeed.cache`."""
        from pgfeed.cache import AsyncCache

        return await AsyncCache[Any](self, cache_name).start()

    def position(self, stream: str) -> Position | None:
        """How far this process has delivered ``stream`` (the least advanced of
        its subscriptions, those stopped by a failing handler included), or
        None if it does not follow it."""
        self._check_process()
        subs = [*self._subscriptions, *(sub for sub, _ in self._handlers.failed)]
        positions = [s.position for s in subs if s.stream == stream and s.position is not None]
        return min(positions) if positions else None

    async def wait_for(self, stream: str, token: Token, timeout: float = 10.0) -> Position:
        """Return once this process has delivered ``stream`` up to ``token``.

        ``token`` is a position token (``row.token``, ``"41"``) or a commit
        token from :func:`pgfeed.commit_token` (``"x1234"``, ``"s..."``), which
        is resolved to the first tick covering that commit. Event-driven; no
        query at all when a commit token is already covered. A position token
        given as text is verified as ``since=`` is (one query when it carries
        a seq, or a check of a tick this reader has not cached): one of another
        stream or history, or naming no row, raises :class:`TokenError`.
        Refuses at once a token beyond anything the database has issued
        (:class:`FutureToken`) and a stream this process does not follow;
        rides out lost connections and server restarts; raises
        :class:`WaitTimeout` after ``timeout`` seconds, and
        :class:`HandlerFailed` when an :meth:`on` handler of the stream
        stopped before ``token`` (it will never be delivered here).
        Raises only :class:`PgfeedError` subclasses.
        """
        self._require_open()
        if self._refresher.broken is not None:
            raise PgfeedError(self._refresher.broken)
        commit = token if isinstance(token, CommitToken) else None
        if isinstance(token, str):
            commit = CommitToken.parse(token)
        named = None
        if commit is None:
            named = PositionToken(token) if isinstance(token, Position) else PositionToken.parse(str(token))
        target = named.position if named is not None else None
        if not any(s.stream == stream for s in self._subscriptions) and self._handlers.failure(stream, None) is None:
            raise UsageError(f"this reader does not follow stream {stream!r}: subscribe to it before waiting")
        try:
            async with asyncio.timeout(timeout):
                if commit is not None:
                    target = await self._resolver.commit(commit)
                meta = self._refresher.metas.get(stream)
                if isinstance(token, str) and named is not None and meta is not None:
                    await self._resolver.check(stream, named, meta)
                assert target is not None
                current = self.position(stream)
                if current is not None and current >= target:
                    return current
                head = self._refresher.head
                if head is None or head.id < target.tick:
                    newest = await self._resolver.newest_tick_id()
                    if target.tick > newest:
                        raise FutureToken(
                            f"position {target} is beyond anything this database has issued (newest tick {newest})"
                        )
                    self._refresher.wake()
                await self._delivered.wait_until(
                    lambda: reached(self.position(stream), target) or self._handlers.failure(stream, target) is not None
                )
                failed = self._handlers.failure(stream, target)
                if failed is not None and not reached(self.position(stream), target):
                    raise failed
        except TimeoutError:
            raise WaitTimeout(
                f"timed out after {timeout:g}s waiting for stream {stream!r} to reach {target or commit}; "
                f"delivered up to {self.position(stream)}"
            ) from None
        pos = self.position(stream)
        assert pos is not None
        return pos

    # -- internals --------------------------------------------------------
    def _subscription_closed(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)
        self._name_connections()
        if self._metrics is not None:
            self._metrics.untrack(sub)

    # -- metrics (see pgfeed.metrics.ReaderMetrics), when asked for ----------
    def _batch_taken(self, sub: Subscription, batch: Batch) -> None:
        if self._metrics is not None:
            self._metrics.observe(batch, sub.consumer)

    def _listener_lost(self) -> None:
        if self._metrics is not None:
            self._metrics.listener_reconnects.inc()

    async def _handler_failed(self, stream: str, error: HandlerFailed) -> None:
        if self._metrics is not None:
            self._metrics.failure(stream, error)

    def _name_connections(self) -> None:
        """The connections say what this reader follows now (see :mod:`pgfeed.naming`)."""
        self._name.follow((s.stream, s.consumer) for s in self._subscriptions)

    def _named_consumers(self) -> list[tuple[str, str]]:
        return [(s.consumer, s.stream) for s in self._subscriptions if s.consumer is not None]

    def _cursors(self) -> list[Cursor]:
        return [s.cursor for s in self._subscriptions]

    def _history_changed(self, reason: str) -> None:
        for sub in self._subscriptions:
            sub.history_changed(reason)

    def _listener_connected(self) -> None:
        # Catch up, and let the ticker claim in case a resignation came while not listening.
        self._refresher.wake()
        if self._ticker is not None:
            self._ticker.poke()

    async def _fire_reset(self, stream: str, reason: str) -> None:
        log.warning("reset", stream=stream, reason=reason)
        if self._metrics is not None:
            self._metrics.reset(stream, reason)
        for fn in self._reset_callbacks:
            try:
                await call(fn, stream, reason)
            except Exception:
                log.exception("reset callback failed", stream=stream)

    async def _run_ticker(self, ticker: Ticker) -> None:
        """The embedded ticker: campaigns beside any daemon; steps aside for good
        when this role or server may not tick (a daemon or another reader does)."""
        try:
            await ticker.run()
        except TickerUnavailable as exc:
            log.info("this reader will not tick; it follows the ticks of a daemon or another reader", reason=str(exc))
        except PgfeedError as exc:
            log.error("embedded ticker stopped", error=str(exc))


__all__ = ["PRUNED", "AsyncReader", "Batch", "ResetCallback", "Row", "Since", "Subscription", "Token"]
