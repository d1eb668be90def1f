"""How far a subscription trails the newest tick, as its reader can tell
without a query: in ticks, and in seconds since the reader learned of the
first tick it has not delivered (on the reader's own clock). Pure.

The refresher records when it learned of each newer head
(:meth:`TickClock.learned`) and drops what no open subscription can ask about
(:meth:`TickClock.forget_through`); past ``limit`` entries the older half is
thinned, keeping the oldest entry, so a subscription stuck at the back keeps
its exact lag and the others may be told up to a few heads late.

A metrics scrape reads it from another thread without a lock: the entry list
is only ever appended to, or replaced by a new list, never changed in place.
"""

from __future__ import annotations

from bisect import bisect_right

#: (tick id, when the reader learned of it).
Entry = tuple[int, float]


def _tick_id(entry: Entry) -> int:
    return entry[0]


class TickClock:
    """When the reader learned of each newer head, on its own clock."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = max(limit, 4)
        self._entries: list[Entry] = []

    def learned(self, tick_id: int, now: float) -> None:
        """The newest tick is ``tick_id`` as of ``now`` (ignored unless newer than the last)."""
        entries = self._entries
        if entries and tick_id <= entries[-1][0]:
            return
        if len(entries) < self._limit:
            entries.append((tick_id, now))
            return
        half = len(entries) // 2
        self._entries = [entries[0], *entries[2:half:2], *entries[half:], (tick_id, now)]

    def forget_through(self, tick_id: int) -> None:
        """No position covering ``tick_id`` or less will be asked about (the
        newest entry is kept: a subscription starting behind needs it)."""
        entries = self._entries
        drop = min(bisect_right(entries, tick_id, key=_tick_id), len(entries) - 1)
        if drop > 0:
            self._entries = entries[drop:]

    def lag(self, covered: int, now: float) -> tuple[int, float] | None:
        """How many ticks a position covering tick ``covered`` trails the newest
        one learned, and for how long the reader has known of the first tick
        past it (0, 0.0 when it has none to deliver); None before any tick."""
        entries = self._entries
        if not entries:
            return None
        newest, _ = entries[-1]
        if covered >= newest:
            return 0, 0.0
        _, since = entries[bisect_right(entries, covered, key=_tick_id)]
        return newest - covered, max(0.0, now - since)
