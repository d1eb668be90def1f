"""Range reads: drive one :func:`~pgfeed.core.positions.read_step` with real
queries on a pooled connection (ticks from the shared tick cache when it has
them), or plan straight from the rows prefetched with the newest tick."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from typing import Any

from pgfeed import store
from pgfeed.aio import Signal
from pgfeed.core.cursor import Interrupted, plan_prefetched
from pgfeed.core.positions import NeedTicks, Planned, Position, Tick, read_step
from pgfeed.core.tickcache import TickCache
from pgfeed.options import ReaderOptions
from pgfeed.ticker import Borrow


class RangeReader:
    """Reads the rows of a stream from a position towards a tick."""

    def __init__(self, borrow: Borrow, options: ReaderOptions, ticks: TickCache[store.StoredRow]) -> None:
        self._borrow = borrow
        self._options = options
        self._ticks = ticks
        self._in_flight = 0
        self._done = Signal()

    async def settle(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the reads in flight to finish."""
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._done.wait_until(lambda: self._in_flight == 0)

    async def plan(self, stream: str, stream_id: int, pos: Position, head: Tick) -> Planned[store.StoredRow]:
        """The next batch of ``stream`` after ``pos``; :class:`Interrupted`
        when it was pruned or dropped meanwhile."""
        limit = self._options.batch_size
        planned = plan_prefetched(pos, self._ticks.prefetched_for(stream, pos), limit)
        if planned is not None:
            return planned
        steps = read_step(pos, head.id, limit, self._options.tick_window)
        self._in_flight += 1
        try:
            return await self._drive(steps, stream_id, pos.covered_tick)
        finally:
            self._in_flight -= 1
            self._done.fire()

    async def _drive(
        self, steps: Generator[Any, Any, Planned[Any]], stream_id: int, start_tick: int
    ) -> Planned[store.StoredRow]:
        """Run a :func:`read_step` generator against the database."""
        async with self._borrow() as conn:
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
                            raise Interrupted("the stream was dropped")
                        if floor > start_tick:
                            raise Interrupted(f"the stream was pruned up to tick {floor}")
            except StopIteration as done:
                planned: Planned[store.StoredRow] = done.value
                return planned

    async def _ticks_between(self, conn: store.AConn, first: int, last: int) -> list[Tick]:
        missing = self._ticks.first_missing(first, last)
        if missing is None:
            cached = self._ticks.run(first, last)
            assert cached is not None
            return cached
        found = self._ticks.complete(first, missing, await store.fetch_ticks(conn, missing, last), last)
        if found is None:
            raise Interrupted(f"ticks {missing}..{last} are no longer all in pgfeed.ticks (pruned)")
        return found
