"""Cache invalidations through a reader: the functions registered per cache
name, called for every invalidation row of the ``caches`` stream (decoded by
:mod:`pgfeed.core.invalidation`), and for every cache at once after a reset."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgfeed.aio import call
from pgfeed.core.invalidation import decode

if TYPE_CHECKING:
    from pgfeed.subscription import Batch

#: Called with the keys to drop, or None for the whole cache.
Invalidator = Callable[[list[str] | None], Any]


class Invalidations:
    """The invalidators of one reader, by cache name."""

    def __init__(self) -> None:
        self._by_cache: dict[str, list[Invalidator]] = {}

    def add(self, cache_name: str, fn: Invalidator) -> None:
        self._by_cache.setdefault(cache_name, []).append(fn)

    async def dispatch(self, batch: Batch) -> None:
        """The handler of the ``caches`` subscription: a reset invalidates every
        cache (what was missed is unknown), then each row its own."""
        if batch.reset:
            for fns in self._by_cache.values():
                for fn in fns:
                    await call(fn, None)
        for row in batch.rows:
            wanted = decode(row.payload)
            for fn in self._by_cache.get(wanted.cache, []):
                await call(fn, None if wanted.keys is None else list(wanted.keys))  # each its own list
