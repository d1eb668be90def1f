"""Per-process caches that pgfeed invalidates: fills cannot race invalidations.

A cache is bound to a cache name. Writers invalidate keys in their own
transaction with :func:`pgfeed.invalidate` (``conn, cache_name, keys``; ``None``
for the whole cache); every process's reader hands those keys to the caches
bound to that name, which drop them. A reset of the ``caches`` stream clears
every cache.

The race it closes: a miss starts a fill (``SELECT``), a writer commits and
invalidates the key, the invalidation arrives, and only then does the fill,
holding the old row, store it — a stale entry that no later invalidation will
remove. Each fill takes a stamp before it loads; an invalidation of its key
(or of the whole cache) after the stamp means the loaded value is returned to
its caller but not stored.

``get(key, loader, after=token)`` serves read-your-writes: it first waits until
this process has applied every invalidation up to ``token`` (a commit token of
the writing transaction), so what it returns is at least as new as that write.

:class:`AsyncCache` goes with :class:`~pgfeed.reader.AsyncReader`
(``await reader.cache(name)``), :class:`Cache` with the threaded
:class:`~pgfeed.sync.Reader` (``reader.cache(name)`` or
``pgfeed.Cache(reader, name)``). Both are safe to use from any thread: the
entries are guarded by a lock. Keys are strings, as :func:`pgfeed.invalidate`
sends them (other keys are matched by ``str(key)``). Values enter only through
a loader, never by assignment, so that every stored value has a stamp.

A cache belongs to its reader's process: in a child forked after the reader
opened, where no invalidation would ever reach the inherited entries, reading
it raises :class:`~pgfeed.errors.ForkedReader` at once, like the reader.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pgfeed.core.invalidation import CACHES_STREAM
from pgfeed.errors import ReaderClosed, UsageError

if TYPE_CHECKING:
    from pgfeed.reader import AsyncReader, Token
    from pgfeed.sync import Reader

V = TypeVar("V")
_MISSING: Any = object()


@dataclass
class _Fill(Generic[V]):
    """One fill in progress: the caller sets ``value`` once it has loaded it."""

    stamp: int
    value: V = _MISSING


class _Entries(Generic[V]):
    """The values and stamps of one cache; every method takes the lock.

    Each invalidation gets the next number of a counter; a fill's stamp is
    the counter when it started. A fill is stored only if no invalidation of
    its key, and no clear, has a number above its stamp. Per-key numbers are
    kept only while fills are in flight (none can compare with them after).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, V] = {}
        self._counter = 0
        self._invalidated: dict[str, int] = {}  # key -> number of its latest invalidation
        self._cleared = 0  # number of the latest clear
        self._fills = 0

    def lookup(self, key: str) -> tuple[bool, V | None]:
        with self._lock:
            if key in self._values:
                return True, self._values[key]
            return False, None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._values)

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def invalidate(self, keys: list[str] | None) -> None:
        """Drop ``keys`` (None: everything) and refuse fills stamped before now."""
        with self._lock:
            self._counter += 1
            if keys is None:
                self._cleared = self._counter
                self._values.clear()
                self._invalidated.clear()
                return
            for key in keys:
                self._values.pop(key, None)
                if self._fills:
                    self._invalidated[key] = self._counter

    @contextmanager
    def filling(self, key: str) -> Iterator[_Fill[V]]:
        """Stamp a fill of ``key``; on exit, store the value set on it unless
        ``key`` was invalidated (or the cache cleared) meanwhile."""
        with self._lock:
            self._fills += 1
            fill: _Fill[V] = _Fill(self._counter)
        try:
            yield fill
        finally:
            with self._lock:
                self._fills -= 1
                fresh = self._invalidated.get(key, 0) <= fill.stamp and self._cleared <= fill.stamp
                if fill.value is not _MISSING and fresh:
                    self._values[key] = fill.value
                if not self._fills:
                    self._invalidated.clear()


class _Base(Generic[V]):
    def __init__(self, cache_name: str, check_process: Callable[[], object]) -> None:
        if not isinstance(cache_name, str) or not cache_name:
            raise UsageError(f"invalid cache name {cache_name!r}: expected a non-empty string")
        self.cache_name = cache_name
        self._entries: _Entries[V] = _Entries()
        #: The reader's: ForkedReader in a process forked after it opened,
        #: where no invalidation ever reaches this copy of the entries.
        self._check_process = check_process

    async def _invalidated(self, keys: list[str] | None) -> None:
        # Async: runs on the reader's loop at once, with no hop to a worker thread.
        self._entries.invalidate(None if keys is None else [str(k) for k in keys])

    def __contains__(self, key: object) -> bool:
        self._check_process()
        return self._entries.lookup(str(key))[0]

    def __getitem__(self, key: object) -> V:
        self._check_process()
        found, value = self._entries.lookup(str(key))
        if not found:
            raise KeyError(key)
        return value  # type: ignore[return-value]  # found: a stored V

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """The keys cached now."""
        return self._entries.keys()

    def discard(self, key: object) -> None:
        """Drop ``key`` in this process only (other processes keep theirs: use
        :func:`pgfeed.invalidate` to drop it everywhere)."""
        self._entries.invalidate([str(key)])

    def clear(self) -> None:
        """Drop everything in this process only."""
        self._entries.invalidate(None)


class AsyncCache(_Base[V]):
    """A per-process cache for ``cache_name`` fed by an open
    :class:`~pgfeed.reader.AsyncReader`; make it with ``await reader.cache(name)``
    (or construct it and ``await cache.start()``). Lives as long as the
    reader stays open."""

    def __init__(self, reader: AsyncReader, cache_name: str) -> None:
        super().__init__(cache_name, reader._check_process)
        self._reader = reader
        self._started = False

    async def start(self) -> AsyncCache[V]:
        """Register with the reader's invalidations (idempotent)."""
        if not self._started:
            await self._reader.on_invalidate(self.cache_name, self._invalidated)
            self._started = True
        return self

    async def get(
        self,
        key: object,
        loader: Callable[[Any], V | Awaitable[V]] | None = None,
        *,
        after: Token | None = None,
        timeout: float = 10.0,
    ) -> V | None:
        """The value of ``key``: cached, else ``loader(key)`` (sync or async),
        stored unless ``key`` was invalidated while it loaded; None on a miss
        without a loader. With ``after`` (a commit token), first waits up to
        ``timeout`` seconds until every invalidation up to it is applied here
        (read-your-writes); raises what :meth:`AsyncReader.wait_for` raises,
        and :class:`~pgfeed.errors.ForkedReader` at once in a process forked
        after the reader opened (its entries there are never invalidated)."""
        self._check_process()
        if not self._started or not self._reader._open:
            raise ReaderClosed("this cache's reader is not open (or the cache was not started): make a new cache")
        if after is not None:
            await self._reader.wait_for(CACHES_STREAM, after, timeout)
        name = str(key)
        found, value = self._entries.lookup(name)
        if found or loader is None:
            return value
        with self._entries.filling(name) as fill:
            loaded = loader(key)
            fill.value = await loaded if inspect.isawaitable(loaded) else loaded
        return fill.value


class Cache(_Base[V]):
    """The threaded twin of :class:`AsyncCache`, fed by an open
    :class:`~pgfeed.sync.Reader`: ``reader.cache(name)`` or ``Cache(reader,
    name)``. Registers at once; lives until the reader is closed."""

    def __init__(self, reader: Reader, cache_name: str) -> None:
        super().__init__(cache_name, reader._check_process)
        self._reader = reader
        reader.on_invalidate(cache_name, self._invalidated)
        self._opened = reader._opened

    def get(
        self,
        key: object,
        loader: Callable[[Any], V] | None = None,
        *,
        after: Token | None = None,
        timeout: float = 10.0,
    ) -> V | None:
        """See :meth:`AsyncCache.get`; ``loader`` runs in the calling thread."""
        self._check_process()
        if self._reader._opened is not self._opened:
            raise ReaderClosed("this cache's reader was closed after the cache was made: make a new cache")
        if after is not None:
            self._reader.wait_for(CACHES_STREAM, after, timeout)
        name = str(key)
        found, value = self._entries.lookup(name)
        if found or loader is None:
            return value
        with self._entries.filling(name) as fill:
            fill.value = loader(key)
        return fill.value
