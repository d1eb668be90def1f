"""The sync reader, for threaded and WSGI workers.

It is not a second implementation: :class:`Reader` runs an
:class:`~pgfeed.reader.AsyncReader` on an event loop in a background thread and
forwards each call to it. Callbacks given to :meth:`Reader.on` run on
background threads; iterating a :class:`SyncSubscription` blocks the caller.

Every call that crosses to the loop thread is bounded: by the call's own
timeout plus :data:`CALL_MARGIN` (``wait_for``, ``next(timeout)``), otherwise
by the reader's ``call_timeout`` (default :data:`CALL_TIMEOUT`). On expiry it
raises :class:`~pgfeed.errors.WaitTimeout`; nothing but a
:class:`~pgfeed.errors.PgfeedError` leaves a public method.

Forked processes: a reader belongs to the process that opened it. In a child
forked after ``open()`` (gunicorn ``--preload``, Celery prefork) every call
raises :class:`~pgfeed.errors.ForkedReader` at once, except ``close()``, which
only forgets the parent's loop and connections without touching them; the
reader can then be opened again in the child. Open readers after the fork:
gunicorn ``post_fork``/``post_worker_init``, Celery ``worker_process_init``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from pgfeed.core.names import check_stream_name
from pgfeed.core.positions import Position
from pgfeed.errors import (
    ForkedReader,
    HandlerFailed,
    PgfeedError,
    ReaderClosed,
    UsageError,
    WaitTimeout,
    forked_error,
    one_line,
    translate,
)
from pgfeed.options import OPTION_NAMES, ReaderOptions, check_positive
from pgfeed.reader import AsyncReader, Batch, ResetCallback, Since, Subscription, Token, metrics_for

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pgfeed.cache import Cache

T = TypeVar("T")

#: Seconds a call without a timeout of its own (open, close, subscribe,
#: position, ...) may take before it raises WaitTimeout; ``call_timeout=``.
CALL_TIMEOUT = 30.0
#: Seconds a call with a timeout of its own is given beyond it, so that the
#: loop's own, more precise WaitTimeout arrives first.
CALL_MARGIN = 1.0
#: Seconds between checks, during a wait without a bound, that the loop thread still runs.
_ALIVE_CHECK = 1.0

_Callback = tuple[str, Callable[[Batch], Any], Since, str | None]


class _End(enum.Enum):
    """What a subscription's next batch is once it has ended."""

    END = enum.auto()


class _LoopThread:
    """An event loop in a daemon thread. Stopping it runs ``asyncio.run``'s
    cleanup (cancel what is left, shut down async generators and the default
    executor) and closes the loop."""

    def __init__(self) -> None:
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._serve, name="pgfeed-reader", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._started.set()
        await self._stop.wait()

    def start(self, bound: float) -> None:
        try:
            self.thread.start()
        except RuntimeError as exc:  # out of threads
            raise PgfeedError(f"cannot start the reader's background thread: {exc}") from None
        if not self._started.wait(bound):
            raise WaitTimeout(f"the reader's event loop did not start within {bound:g}s (call_timeout)")

    def stop(self, bound: float) -> bool:
        """Ask the loop to finish; False if its thread is still running after ``bound`` seconds."""
        if self.thread.ident is None:
            return True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        self.thread.join(bound)
        return not self.thread.is_alive()

    def run(self, what: str, fn: Callable[[], Awaitable[T]], bound: float | None, why: str) -> T:
        """``await fn()`` on the loop; wait at most ``bound`` seconds (None: as
        long as the loop thread lives). Raises only :class:`PgfeedError`."""
        assert self._loop is not None

        async def call() -> T:
            return await fn()

        coro = call()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:
            coro.close()
            raise ReaderClosed(f"the reader was closed before {what}") from None
        deadline = None if bound is None else time.monotonic() + bound
        while not future.done():
            if not self.thread.is_alive():
                future.cancel()
                raise ReaderClosed(f"the reader's event loop stopped while {what}")
            remaining = _ALIVE_CHECK if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                future.cancel()
                raise WaitTimeout(
                    f"{what} did not finish within {bound:g}s ({why}): the reader's event loop is not answering; "
                    "is an async callback blocking it?"
                )
            concurrent.futures.wait([future], timeout=min(remaining, _ALIVE_CHECK))
        try:
            return future.result()
        except PgfeedError:
            raise
        except concurrent.futures.CancelledError:
            raise ReaderClosed(f"the reader was closed while {what}") from None
        except psycopg.Error as exc:
            raise translate(exc, what) from None
        except Exception as exc:
            raise PgfeedError(f"{what} failed: {type(exc).__name__}: {one_line(exc)}") from exc


@dataclass(frozen=True)
class _Opened:
    """One open period of a :class:`Reader`: its loop, its AsyncReader, the process it belongs to."""

    loop: _LoopThread
    reader: AsyncReader
    pid: int


#: Loops and readers inherited through a fork and forgotten by close() in the
#: child: kept referenced so that nothing in the child ever finalises them.
_INHERITED: list[_Opened] = []
_READERS: weakref.WeakSet[Reader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread of the parent at the fork stays held forever in the child.
    for reader in list(_READERS):
        reader._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncSubscription:
    """Blocking twin of :class:`~pgfeed.reader.Subscription`: ``for batch in sub``.

    Iteration ends when the subscription or its reader is closed.
    """

    def __init__(self, reader: Reader, opened: _Opened, inner: Subscription) -> None:
        self._reader = reader
        self._opened = opened
        self._inner = inner
        self._pending: asyncio.Future[Batch] | None = None
        self.stream = inner.stream

    @property
    def position(self) -> Position | None:
        """How far this subscription has delivered."""
        self._reader._check_process()
        return self._inner.position

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.next(timeout=None)
        assert batch is not None
        return batch

    def next(self, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none arrives within ``timeout`` seconds
        (None: wait as long as it takes). Raises StopIteration when the
        subscription or its reader has been closed."""

        async def take(_: AsyncReader) -> Batch | _End | None:
            try:
                async with asyncio.timeout(timeout):
                    return await asyncio.shield(self._next_task())
            except TimeoutError:
                return None
            except StopAsyncIteration:
                return _End.END

        try:
            got = self._reader._wait(f"taking the next batch of {self.stream!r}", take, timeout, opened=self._opened)
        except ReaderClosed:
            raise StopIteration from None
        if got is _End.END:
            raise StopIteration
        return got

    def _next_task(self) -> asyncio.Future[Batch]:
        # One __anext__ at a time, shielded: a next() that times out leaves it
        # running, and the following next() takes its batch.
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._inner.__anext__())
            # Retrieved here so that an end nobody waits for is not logged as lost.
            self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._pending

    def close(self) -> None:
        """Stop this subscription (nothing to do once its reader is closed, or in a forked child)."""

        async def close(_: AsyncReader) -> None:
            await self._inner.close()

        with contextlib.suppress(ReaderClosed, ForkedReader):
            self._reader._call(f"closing the subscription to {self.stream!r}", close, opened=self._opened)

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reader:
    """Blocking twin of :class:`~pgfeed.reader.AsyncReader`, same methods. Use
    ``with Reader(dsn) as reader:``, one per process, opened after any fork.

    The options are those of :class:`~pgfeed.options.ReaderOptions` (see it
    for what each means), given as keywords or as ``options=``; keywords that
    differ from their default replace the fields of ``options``.
    ``call_timeout``: seconds a call without a timeout of its own may wait for
    the background thread (see :data:`CALL_TIMEOUT`).

    A closed reader can be opened again; each open starts a fresh AsyncReader
    with the same options. ``on_reset`` callbacks stay registered across
    opens; :meth:`on` callbacks registered while the reader is not open start
    at the next successful :meth:`open`, while subscriptions, callbacks
    started on an open reader and ``on_invalidate`` end with :meth:`close`.
    """

    def __init__(
        self,
        conninfo: str | None = None,
        *,
        options: ReaderOptions | None = None,
        call_timeout: float = CALL_TIMEOUT,
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
        metrics_for(self.options)  # registered now: a clash is refused here, not at open()
        check_positive("call_timeout", call_timeout)
        self.call_timeout = call_timeout
        self._conninfo = conninfo
        self._lock = threading.Lock()  # open, close and what must happen before or after them
        self._opened: _Opened | None = None
        self._reset_callbacks: list[ResetCallback] = []
        self._error_callbacks: list[Callable[[str, HandlerFailed], Any]] = []
        self._callbacks: list[_Callback] = []  # on() while not open: started by the next open()
        _READERS.add(self)

    # -- crossing to the loop thread ------------------------------------
    def _check_process(self) -> _Opened | None:
        """The current open period, None if closed; ForkedReader if it belongs to another process."""
        opened = self._opened
        if opened is not None and opened.pid != os.getpid():
            raise forked_error("Reader", opened.pid)
        return opened

    def _current(self, opened: _Opened | None) -> _Opened:
        current = self._check_process()
        if current is None:
            raise ReaderClosed("the reader is not open: use `with Reader(...)` or call open()")
        if opened is not None and opened is not current:
            raise ReaderClosed("the reader was closed after this subscription was made")
        if threading.current_thread() is current.loop.thread:
            raise UsageError(
                "a Reader method was called on the reader's own event loop (from an async callback?), "
                "where it would wait for itself: use a sync callback, which runs on a worker thread"
            )
        return current

    def _call(self, what: str, fn: Callable[[AsyncReader], Awaitable[T]], *, opened: _Opened | None = None) -> T:
        """``await fn(async_reader)`` on the loop thread, bounded by ``call_timeout``."""
        current = self._current(opened)
        return current.loop.run(what, lambda: fn(current.reader), self.call_timeout, "call_timeout")

    def _wait(
        self,
        what: str,
        fn: Callable[[AsyncReader], Awaitable[T]],
        timeout: float | None,
        *,
        opened: _Opened | None = None,
    ) -> T:
        """Like :meth:`_call`, bounded by ``timeout`` plus :data:`CALL_MARGIN` (None: unbounded)."""
        current = self._current(opened)
        bound = None if timeout is None else max(timeout, 0.0) + CALL_MARGIN
        return current.loop.run(what, lambda: fn(current.reader), bound, f"its timeout plus {CALL_MARGIN:g}s")

    def _make_async(self) -> AsyncReader:
        reader = AsyncReader(self._conninfo, options=self.options)
        for fn in self._reset_callbacks:
            reader.on_reset(fn)
        for hook in self._error_callbacks:
            reader.on_error(hook)
        for stream, callback, since, consumer in self._callbacks:
            reader.on(stream, callback, since=since, consumer=consumer)
        return reader

    # -- lifecycle -------------------------------------------------------
    def open(self) -> Reader:
        """Start a background loop and connect (again, after :meth:`close`)."""
        with self._lock:
            if self._check_process() is not None:
                return self
            loop = _LoopThread()

            async def start() -> AsyncReader:
                return await self._make_async().open()

            try:
                loop.start(self.call_timeout)
                reader = loop.run("opening the reader", start, self.call_timeout, "call_timeout")
            except BaseException:
                # A loop that does not stop at once is left to finish on its own (a daemon thread).
                loop.stop(CALL_MARGIN)
                raise
            self._opened = _Opened(loop, reader, os.getpid())
            self._callbacks.clear()
        return self

    def close(self) -> None:
        """Stop everything, the background thread, and close its event loop.

        In a process forked after :meth:`open`, only forgets the parent's loop
        and connections (never touching them); the reader can be opened again.
        """
        opened = self._opened
        if opened is not None and opened.pid != os.getpid():
            _INHERITED.append(opened)
            self._opened = None
            return
        with self._lock:
            if self._opened is None:
                return
            opened = self._current(None)
            self._opened = None  # from now on, calls raise ReaderClosed
            deadline = time.monotonic() + self.call_timeout
            failure: PgfeedError | None = None
            try:
                opened.loop.run("closing the reader", opened.reader.close, self.call_timeout, "call_timeout")
            except PgfeedError as exc:
                failure = exc
            if not opened.loop.stop(max(deadline - time.monotonic(), 0.0)) and failure is None:
                failure = WaitTimeout(
                    f"closing the reader did not finish within {self.call_timeout:g}s (call_timeout): "
                    "a callback is still running"
                )
            if failure is not None:
                raise failure

    def __enter__(self) -> Reader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------
    def subscribe(
        self, stream: str, since: Since = "earliest", *, until: Since | None = None, consumer: str | None = None
    ) -> SyncSubscription:
        """See :meth:`AsyncReader.subscribe`."""
        opened = self._current(None)

        async def subscribe(reader: AsyncReader) -> Subscription:
            return await reader.subscribe(stream, since, until=until, consumer=consumer)

        inner = self._call(f"subscribing to {stream!r}", subscribe, opened=opened)
        return SyncSubscription(self, opened, inner)

    def on(
        self,
        stream: str,
        fn: Callable[[Batch], Any] | None = None,
        *,
        since: Since = "earliest",
        consumer: str | None = None,
    ) -> Any:
        """See :meth:`AsyncReader.on`; a sync ``fn`` runs on a worker thread, an
        async one on the reader's event loop (it must not block). A raising
        ``fn`` gets the same batch again, up to ``handler_retries`` times, then
        its subscription stops (:meth:`on_error`, ``wait_for`` raises
        :class:`~pgfeed.errors.HandlerFailed`).

        On an open reader it starts at once and returns the
        :class:`SyncSubscription`; otherwise (or as a decorator) ``fn`` is
        registered and starts at the next :meth:`open`.
        """
        if fn is None:

            def register(f: Callable[[Batch], Any]) -> Callable[[Batch], Any]:
                self.on(stream, f, since=since, consumer=consumer)
                return f

            return register
        with self._lock:
            opened = self._check_process()
            if opened is None:
                check_stream_name(stream)
                self._callbacks.append((stream, fn, since, consumer))
                return fn

        async def start(reader: AsyncReader) -> Subscription:
            sub: Subscription = await reader.on(stream, fn, since=since, consumer=consumer)
            return sub

        return SyncSubscription(self, opened, self._call(f"starting a callback on {stream!r}", start, opened=opened))

    def on_reset(self, fn: ResetCallback) -> None:
        """See :meth:`AsyncReader.on_reset`; stays registered across reopens."""
        self._keep(self._reset_callbacks, fn, "a reset callback", lambda reader: reader.on_reset(fn))

    def on_error(self, fn: Callable[[str, HandlerFailed], Any]) -> None:
        """See :meth:`AsyncReader.on_error`: ``fn(stream, error)`` once an
        :meth:`on` handler kept failing on a batch and its subscription
        stopped; a sync ``fn`` runs on a worker thread. Stays registered
        across reopens."""
        self._keep(self._error_callbacks, fn, "an error callback", lambda reader: reader.on_error(fn))

    def _keep(self, kept: list[Any], fn: Any, what: str, register: Callable[[AsyncReader], None]) -> None:
        """Remember ``fn`` for every later open, and register it now if open."""
        with self._lock:
            opened = self._check_process()
            kept.append(fn)

        async def now(reader: AsyncReader) -> None:
            register(reader)

        if opened is not None:
            self._call(f"registering {what}", now, opened=opened)

    def on_invalidate(self, cache_name: str, fn: Callable[[list[str] | None], Any]) -> None:
        """See :meth:`AsyncReader.on_invalidate`."""
        self._call(
            f"registering an invalidation callback for {cache_name!r}", lambda r: r.on_invalidate(cache_name, fn)
        )

    def cache(self, cache_name: str) -> Cache[Any]:
        """A per-process cache for ``cache_name``, invalidated through this
        reader (see :mod:`pgfeed.cache`); usable from any thread."""
        from pgfeed.cache import Cache

        return Cache[Any](self, cache_name)

    def position(self, stream: str) -> Position | None:
        """See :meth:`AsyncReader.position` (None while the reader is not open)."""
        if self._check_process() is None:
            return None

        async def position(reader: AsyncReader) -> Position | None:
            return reader.position(stream)

        return self._call(f"reading the position of {stream!r}", position)

    def wait_for(self, stream: str, token: Token, timeout: float = 10.0) -> Position:
        """See :meth:`AsyncReader.wait_for`; never blocks longer than ``timeout``
        plus :data:`CALL_MARGIN`."""
        return self._wait(f"waiting for {stream!r}", lambda r: r.wait_for(stream, token, timeout), timeout)
