"""What a reader remembers of the ticks it fetched, and of the rows it read
together with the newest one; shared by every subscription of the reader.

Ticks are immutable, so a cached tick is never stale; the cache only bounds
memory (:meth:`TickCache.add` evicts the lowest ids) and tells when the
database is no longer the one the ticks came from (:meth:`TickCache.changed`).
Pure: the reader fetches, this module remembers and decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pgfeed.core.positions import Position, Tick
from pgfeed.core.tokens import token_check

R = TypeVar("R")

#: How many ticks back from the head a commit token is looked up in the cache.
COVERING_RUN = 256


@dataclass(frozen=True)
class Prefetched(Generic[R]):
    """The rows of one stream from the reader's known head to the newest tick
    (the first ``limit + 1`` in seq order), read in the same round trip as that
    tick, with the stream's floor as of that read."""

    rows: Sequence[R]
    floor: int


@dataclass
class TickCache(Generic[R]):
    """Ticks already fetched, by id, and the rows prefetched with the newest one."""

    ticks: dict[int, Tick] = field(default_factory=dict)
    limit: int = 200_000
    #: (stream, the known head a read started from) -> the newest tick it
    #: found and the rows between the two.
    prefetched: dict[tuple[str, int], tuple[int, Prefetched[R]]] = field(default_factory=dict)

    def get(self, tick_id: int) -> Tick | None:
        return self.ticks.get(tick_id)

    def check(self, tick_id: int, stream_id: int, created_tick: int) -> str | None:
        """The check of position tokens at tick ``tick_id`` of the stream
        incarnation ``(stream_id, created_tick)``; None when the tick or its
        fingerprint is not known here (the token is then printed bare)."""
        tick = self.ticks.get(tick_id)
        if tick is None or tick.fp is None:
            return None
        return token_check(stream_id, created_tick, tick.fp)

    def add(self, ticks: Sequence[Tick]) -> None:
        """Remember ``ticks``; past ``limit``, forget the lowest ids down to half of it."""
        for t in ticks:
            self.ticks[t.id] = t
        if len(self.ticks) > self.limit:
            for key in sorted(self.ticks)[: len(self.ticks) - self.limit // 2]:
                del self.ticks[key]

    def clear(self) -> None:
        """Forget everything (the database's history changed)."""
        self.ticks.clear()
        self.prefetched.clear()

    def first_missing(self, first: int, last: int) -> int | None:
        """The lowest id in ``first..last`` not cached, or None."""
        return next((i for i in range(first, last + 1) if i not in self.ticks), None)

    def run(self, first: int, last: int) -> list[Tick] | None:
        """Ticks ``first..last`` if all are cached, else None."""
        out = [self.ticks.get(i) for i in range(first, last + 1)]
        return None if any(t is None for t in out) else [t for t in out if t is not None]

    def complete(self, first: int, missing: int, fetched: Sequence[Tick], last: int) -> list[Tick] | None:
        """Ticks ``first..last``: the cached ``first..missing-1`` then ``fetched``
        (which must be exactly ``missing..last``, else None: pruned meanwhile).
        Assembles before caching ``fetched``: adding may evict the lowest ids,
        which are exactly the ones a catching-up read needs."""
        if [t.id for t in fetched] != list(range(missing, last + 1)):
            return None
        known = [self.ticks[i] for i in range(first, missing)]
        self.add(fetched)
        return known + list(fetched)

    def run_to(self, head: Tick) -> list[Tick]:
        """The cached contiguous run of ticks ending at ``head`` (at most
        :data:`COVERING_RUN` of them, ``head`` itself whatever the cache holds)."""
        first = head.id
        while first - 1 in self.ticks and head.id - first < COVERING_RUN - 1:
            first -= 1
        return self.run(first, head.id) or [head]

    def changed(self, ticks: Sequence[Tick]) -> Tick | None:
        """The first of ``ticks`` cached as another tick: ticks are immutable,
        so the database is not the one they were read from. Another snapshot
        or other seq bounds tell; so do two known fingerprints that differ
        (a promoted standby can take a tick with the same id and snapshot
        on a quiet system; the fingerprint covers its time and term too)."""
        for t in ticks:
            seen = self.ticks.get(t.id)
            if seen is not None and not same_tick(seen, t):
                return t
        return None

    def remember_prefetched(self, known: int | None, head: int, found: dict[str, Prefetched[R]]) -> None:
        """Keep the rows read with tick ``head`` from ``known`` (the head the
        read started from), and the earlier reads that end at ``known`` (a
        subscription that has not planned them yet goes on with these)."""
        if known is None or head <= known:
            return
        kept = {k: v for k, v in self.prefetched.items() if v[0] == known}
        kept.update({(name, known): (head, rows) for name, rows in found.items()})
        self.prefetched = kept

    def prefetched_for(self, stream: str, pos: Position) -> tuple[list[Tick], Prefetched[R]] | None:
        """The ticks after ``pos`` up to the newest tick a read from there
        found, and the rows prefetched between them: only from a complete
        position, and only while every one of those ticks is cached."""
        entry = self._prefetched_from(stream, pos)
        if entry is None:
            return None
        window = self.run(pos.tick + 1, entry[0])
        return None if window is None else (window, entry[1])

    def prefetched_to(self, stream: str, pos: Position) -> int | None:
        """The tick the rows prefetched from ``pos`` reach (None: none were)."""
        entry = self._prefetched_from(stream, pos)
        return None if entry is None else entry[0]

    def _prefetched_from(self, stream: str, pos: Position) -> tuple[int, Prefetched[R]] | None:
        """The read kept from ``pos`` (only a complete position starts one)."""
        return self.prefetched.get((stream, pos.tick)) if pos.complete else None


def same_tick(a: Tick, b: Tick) -> bool:
    """Whether ``a`` and ``b`` (same id) are one tick: same snapshot and seq
    bounds, and the same fingerprint when both are known (a tick taken
    before migration 0007, or read by a query that does not select it, has
    none)."""
    if (a.snapshot, a.seq_lo, a.seq_hi) != (b.snapshot, b.seq_lo, b.seq_hi):
        return False
    return a.fp is None or b.fp is None or a.fp == b.fp
