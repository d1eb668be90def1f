"""The sync reader, for threaded and WSGI workers.

It is not a second implementation: :class:`Reader` runs an
:class:`~pgfeed.reader.AsyncReader` on an event loop in a background thread and
forwards each call to it. Callbacks given to :meth:`Reader.on` run on
background threads; iterating a :class:`SyncSubscription` blocks the caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from pgfeed.core.positions import Position
from pgfeed.reader import AsyncReader, Batch, ResetCallback, Since, Subscription

T = TypeVar("T")


class SyncSubscription:
    """Blocking twin of :class:`~pgfeed.reader.Subscription`: ``for batch in sub``."""

    def __init__(self, reader: Reader, inner: Subscription) -> None:
        self._reader = reader
        self._inner = inner
        self.stream = inner.stream

    @property
    def position(self) -> Position | None:
        """How far this subscription has delivered."""
        return self._inner.position

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.next(timeout=None)
        assert batch is not None
        return batch

    def next(self, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none arrives within ``timeout`` seconds.
        Raises StopIteration when the subscription has ended."""

        async def get() -> Batch | None:
            try:
                return await asyncio.wait_for(asyncio.shield(self._next_task()), timeout)
            except TimeoutError:
                return None

        try:
            return self._reader._call(get())
        except StopAsyncIteration:
            raise StopIteration from None

    def _next_task(self) -> asyncio.Future[Batch]:
        pending: asyncio.Future[Batch] | None = getattr(self, "_pending", None)
        if pending is None or pending.done():
            pending = asyncio.ensure_future(self._inner.__anext__())
            self._pending = pending
        return pending

    def close(self) -> None:
        """Stop this subscription."""
        self._reader._call(self._inner.close())

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reader:
    """Blocking twin of :class:`~pgfeed.reader.AsyncReader`, same arguments and
    methods. Use ``with Reader(dsn) as reader:``."""

    def __init__(self, conninfo: str | None = None, **options: Any) -> None:
        self._async = AsyncReader(conninfo, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pgfeed-reader", daemon=True)
        self._started = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def open(self) -> Reader:
        """Start the background loop and connect."""
        if not self._started:
            self._thread.start()
            self._started = True
        self._call(self._async.open())
        return self

    def close(self) -> None:
        """Stop everything and the background thread."""
        if not self._started:
            return
        try:
            self._call(self._async.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._started = False

    def __enter__(self) -> Reader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(
        self, stream: str, since: Since = "earliest", *, until: Since | None = None, consumer: str | None = None
    ) -> SyncSubscription:
        """See :meth:`AsyncReader.subscribe`."""
        return SyncSubscription(self, self._call(self._async.subscribe(stream, since, until=until, consumer=consumer)))

    def on(
        self,
        stream: str,
        fn: Callable[[Batch], Any] | None = None,
        *,
        since: Since = "earliest",
        consumer: str | None = None,
    ) -> Any:
        """See :meth:`AsyncReader.on`; ``fn`` runs on a background thread.

        On an open reader it starts at once and returns the
        :class:`SyncSubscription`; before :meth:`open` (or as a decorator)
        it is registered and starts when the reader opens.
        """
        if fn is None:

            def register(f: Callable[[Batch], Any]) -> Callable[[Batch], Any]:
                self.on(stream, f, since=since, consumer=consumer)
                return f

            return register
        if not self._started:
            self._async.on(stream, fn, since=since, consumer=consumer)
            return fn

        async def start() -> Subscription:
            task: asyncio.Future[Subscription] = self._async.on(stream, fn, since=since, consumer=consumer)
            return await task

        return SyncSubscription(self, self._call(start()))

    def on_reset(self, fn: ResetCallback) -> None:
        """See :meth:`AsyncReader.on_reset`."""
        self._async.on_reset(fn)

    def on_invalidate(self, cache_name: str, fn: Callable[[list[str] | None], Any]) -> None:
        """See :meth:`AsyncReader.on_invalidate`."""
        self._call(self._async.on_invalidate(cache_name, fn))

    def position(self, stream: str) -> Position | None:
        """See :meth:`AsyncReader.position`."""
        return self._async.position(stream)

    def wait_for(self, stream: str, token: str | Position, timeout: float = 10.0) -> Position:
        """See :meth:`AsyncReader.wait_for`."""
        return self._call(self._async.wait_for(stream, token, timeout))
