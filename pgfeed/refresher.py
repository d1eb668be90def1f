"""How a reader learns the newest tick: one read-only round trip
(``pgfeed.read_live_v4``) whenever it is woken (a NOTIFY on the ticks
channel, a subscription that needs a fresh tick) and at least every
``poll_interval`` (every 0.2 s while the listener is down): the notifications
are only hints, the poll covers any that were lost.

The same round trip brings the ticks since the last one known (they fill the
tick cache), the current incarnation of every followed stream, and the rows
from the known head to the newest tick for subscriptions standing exactly at
the known head (the prefetch: a caught-up reader reads the new ticks' rows
without a second query, however many ticks were taken since it last woke).
It also checks that the database is still the history the reader read
(:meth:`Refresher.refresh`); if not, every subscription resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection

import psycopg

from pgfeed import store
from pgfeed.aio import Signal
from pgfeed.core.backoff import Backoff
from pgfeed.core.cursor import Cursor, StreamMeta
from pgfeed.core.lag import TickClock
from pgfeed.core.positions import Position, Tick
from pgfeed.core.tickcache import TickCache
from pgfeed.errors import PermissionDenied, PgfeedError, translate
from pgfeed.log import get_logger
from pgfeed.options import ReaderOptions
from pgfeed.ranges import RangeReader
from pgfeed.ticker import Borrow

log = get_logger("pgfeed.reader")

#: How long a woken refresh waits for range reads in flight (seconds).
LIVE_READ_GRACE = 0.005


class Refresher:
    """The newest tick a reader knows (:attr:`head`), the streams' current
    incarnations (:attr:`metas`), and the loop that keeps them fresh.

    ``cursors()`` lists the subscriptions to refresh for (their streams and
    read positions); ``on_history_changed(reason)`` resets them all.
    """

    def __init__(
        self,
        borrow: Borrow,
        options: ReaderOptions,
        ticks: TickCache[store.StoredRow],
        ranges: RangeReader,
        cursors: Callable[[], Collection[Cursor]],
        on_history_changed: Callable[[str], None],
    ) -> None:
        self._borrow = borrow
        self._options = options
        self._ticks = ticks
        self._ranges = ranges
        self._cursors = cursors
        self._on_history_changed = on_history_changed
        self.head: Tick | None = None
        self.metas: dict[str, StreamMeta] = {}
        #: Why this database cannot be trusted (see :meth:`refresh`); then nothing is delivered.
        self.broken: str | None = None
        #: Fired whenever :attr:`head` may have moved.
        self.changed = Signal()
        #: When each newer head was learned: how long a position has trailed (:meth:`lag`).
        self.clock = TickClock()
        self._wakeups = Signal()

    def wake(self) -> None:
        """Refresh now (or as soon as the refresh in progress is done)."""
        self._wakeups.fire()

    def notified(self, payload: str) -> None:
        """A NOTIFY on the ticks channel (payload: the new tick's id)."""
        head = self.head.id if self.head is not None else -1
        if not payload.isdigit() or int(payload) > head:
            self.wake()

    async def run(self, listening: Callable[[], bool]) -> None:
        """Refresh on every wake-up and every poll interval, until cancelled."""
        backoff = Backoff()
        seen = self._wakeups.fired
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with the event, and close() would hang.
            poll = self._options.poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll if listening() else min(poll, 0.2)):
                    await self._wakeups.wait_fired(seen)
            seen = self._wakeups.fired  # this refresh answers every wake-up so far
            if not self._cursors():
                continue
            # Let reads in flight finish first, so the subscriptions stand at
            # the head and this refresh can carry their next rows.
            await self._ranges.settle(LIVE_READ_GRACE)
            try:
                await self.refresh()
                backoff.reset()
            except PgfeedError as exc:
                delay = backoff.next_delay()
                # A missing grant is not transient and not this loop's to report:
                # every subscription's own read fails with it, once, to its caller.
                report = log.debug if isinstance(exc, PermissionDenied) else log.warning
                report("reading the newest tick failed; retrying", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                self.wake()

    async def refresh(self, extra: Collection[str] = ()) -> tuple[Tick, dict[str, StreamMeta]]:
        """Learn the newest tick (read-only), for the followed streams and
        ``extra``. Subscriptions standing exactly at the known head get the
        rows up to the newest tick in the same round trip."""
        cursors = self._cursors()
        names = sorted({*(c.stream for c in cursors), *extra})
        started_at = self.head
        known = started_at.id if started_at is not None else None
        # Standing at the known head, or about to: rows read by the previous
        # refresh take it there without a query (its subscription has not
        # planned them yet: this refresh began first).
        caught_up = {
            c.stream
            for c in cursors
            if c.stands_at(known) or (c.fetch is not None and self._ticks.prefetched_to(c.stream, c.fetch) == known)
        }
        after = [known if known is not None and name in caught_up else -1 for name in names]
        try:
            async with self._borrow() as conn:
                live = await store.read_live(conn, known, names, after, self._options.batch_size)
        except psycopg.Error as exc:
            raise translate(exc, "reading the newest tick") from None
        head = live.head
        if head is None:
            raise PgfeedError("pgfeed.ticks is empty: run `pgfeed migrate` (it takes the first tick)")
        if live.server_xmax < head.snapshot.xmax:
            # Restored into a new cluster: its xids are below the restored
            # ticks', so every new transaction would look long covered.
            self.broken = (
                f"this database's transaction ids ({live.server_xmax}) are behind its newest tick {head.id} "
                f"({head.snapshot.xmax}): it is not the database the ticks were taken on (restored into a new "
                "cluster?); pgfeed refuses to deliver or confirm anything on it"
            )
            log.error("history changed; refusing to read", reason=self.broken)
            raise PgfeedError(self.broken)
        self._check_history(live.ticks, head, started_at)
        self._ticks.remember_prefetched(known, head.id, live.prefetched)
        self._ticks.add(live.ticks)
        self._publish(head, live.metas, names)
        return head, live.metas

    def _check_history(self, ticks: list[Tick], head: Tick, known: Tick | None) -> None:
        """Ticks are immutable: one we saw as another tick (snapshot, seq
        bounds or fingerprint), or a head behind the one this read started
        from, means the database is not the one we were reading (a lagging
        standby promoted, a restore). Never skip: reset loudly. (Concurrent
        reads may finish out of order: each is compared with its own
        starting point, not with the newest head.)"""
        reason = None
        if known is not None and head.id < known.id:
            reason = f"the newest tick went back from {known.id} to {head.id}"
        changed = self._ticks.changed(ticks)
        if changed is not None:
            reason = f"tick {changed.id} is not the tick this reader saw"
        if reason is None:
            return
        reason = f"the database's history changed ({reason}): failover to a standby that lagged, or a restore"
        log.error("history changed; every subscription resets", reason=reason)
        self._ticks.clear()
        self.head = None
        self.clock = TickClock()
        self._on_history_changed(reason)

    def _publish(self, tick: Tick, metas: dict[str, StreamMeta], names: Collection[str]) -> None:
        self._ticks.add([tick])
        if self.head is None or tick.id >= self.head.id:
            self.head = tick
            self.metas.update(metas)
            for name in names:
                if name not in metas:
                    self.metas.pop(name, None)
            self.clock.learned(tick.id, time.monotonic())
            delivered = [c.delivered.covered_tick for c in self._cursors() if c.delivered is not None]
            self.clock.forget_through(min(delivered, default=tick.id))
        self.changed.fire()

    def lag(self, delivered: Position, since: float) -> tuple[int, float] | None:
        """How far ``delivered`` trails the newest tick: in ticks, and in seconds
        since this reader learned of the first one past it (at most since
        ``since``, a ``time.monotonic()``); None before the first tick."""
        now = time.monotonic()
        found = self.clock.lag(delivered.covered_tick, now)
        if found is None:
            return None
        ticks, seconds = found
        return ticks, min(seconds, max(0.0, now - since))

    async def wait_for_work(self, cursor: Cursor) -> tuple[Tick, dict[str, StreamMeta]]:
        """Wait until ``cursor`` has something past its read position, or a
        reset to deliver (re-checked at each wake-up: a reset moves the position)."""
        await self.changed.wait_until(lambda: self.head is not None and cursor.has_work(self.head.id))
        assert self.head is not None
        return self.head, self.metas

    async def wait_tick_after(self, tick_id: int) -> None:
        await self.changed.wait_until(lambda: self.head is not None and self.head.id > tick_id)
