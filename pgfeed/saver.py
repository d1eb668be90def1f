"""Named consumers' positions: loaded when a subscription starts, saved in
``pgfeed.positions`` (per role) every ``save_interval`` and when the reader
closes. After a crash, up to ``save_interval`` of rows are delivered again
(at-least-once across restarts).

Saves run one at a time, and a save that fails or is cancelled (the reader
closing while a periodic save waits for a row lock) puts its positions back
for the next one: the last save, on close, writes every position that moved.

A position is saved as a bare token (SQL parses it: retention, status) with
the fingerprint of its tick as the reader saw it (``tick_fp``): a consumer
resumed on a database whose tick has another fingerprint resets instead of
skipping (see :func:`pgfeed.core.cursor.saved_position_distrusted`)."""

from __future__ import annotations

import asyncio
from typing import Protocol

import psycopg

from pgfeed import store
from pgfeed.errors import PgfeedError, translate
from pgfeed.log import get_logger
from pgfeed.ticker import Borrow

log = get_logger("pgfeed.reader")


class Consumer(Protocol):
    """What is saved of a subscription: who reads which stream, how far."""

    @property
    def consumer(self) -> str | None: ...

    @property
    def stream(self) -> str: ...

    @property
    def saved(self) -> store.SavedPosition | None: ...


class PositionSaver:
    """Loads and saves the delivered positions of named consumers."""

    def __init__(self, borrow: Borrow, interval: float) -> None:
        self._borrow = borrow
        self._interval = interval
        self._unsaved: set[Consumer] = set()  # consumers whose delivered position is not saved yet
        self._saving = asyncio.Lock()  # one save at a time: each writes what no other save holds

    def moved(self, sub: Consumer) -> None:
        """``sub``'s delivered position moved: save it with the next batch."""
        if sub.consumer is not None:
            self._unsaved.add(sub)

    async def load(self, consumer: str, stream: str) -> store.SavedPosition | None:
        """The position this role saved for ``consumer`` on ``stream``, if any."""
        try:
            async with self._borrow() as conn:
                return await store.load_position(conn, consumer, stream)
        except psycopg.Error as exc:
            raise translate(exc, f"loading the saved position of consumer {consumer!r}") from None

    async def save(self) -> None:
        """Write the delivered position of every consumer that moved.

        Waits for a save in progress first. On any failure, cancellation
        included, the positions it was writing go back to the next save."""
        async with self._saving:
            if not self._unsaved:
                return
            batch, self._unsaved = self._unsaved, set()
            try:
                rows = [(s.consumer, s.stream, saved) for s in batch if s.consumer and (saved := s.saved) is not None]
                async with self._borrow() as conn:
                    await store.save_positions(conn, rows)
            except BaseException as exc:
                self._unsaved |= batch  # the next save writes them (their newest position then)
                if isinstance(exc, psycopg.Error):
                    raise translate(exc, "saving consumer positions") from None
                raise

    async def run(self) -> None:
        """Save every ``interval`` until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.save()
            except PgfeedError as exc:
                log.warning("could not save consumer positions; retrying", error=str(exc))
