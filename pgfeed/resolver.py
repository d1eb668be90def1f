"""Turning what a caller names into positions: commit tokens (the first tick
that covers the commit), ``"now"`` (a position covering everything committed
before the call), and the newest tick id a token is checked against. Rides out
lost connections (the caller bounds the wait)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg

from pgfeed import store
from pgfeed.core.backoff import Backoff
from pgfeed.core.cursor import (
    Interrupted,
    Spec,
    StreamMeta,
    TickFacts,
    named_token,
    needs_proof,
    prove_token,
    saved_position_distrusted,
)
from pgfeed.core.positions import Position, PositionToken
from pgfeed.core.tickcache import TickCache
from pgfeed.core.tokens import CommitToken, first_covering
from pgfeed.errors import PgfeedError, one_line, translate
from pgfeed.log import get_logger
from pgfeed.refresher import Refresher
from pgfeed.ticker import Borrow

log = get_logger("pgfeed.reader")

Since = str | Position
T = TypeVar("T")


class Resolver:
    """Resolves commit tokens and ``"now"`` against the reader's ticks."""

    def __init__(self, borrow: Borrow, refresher: Refresher, ticks: TickCache[store.StoredRow]) -> None:
        self._borrow = borrow
        self._refresher = refresher
        self._ticks = ticks

    async def spec(self, spec: Since | CommitToken) -> Since:
        """``"now"`` and commit tokens as positions; other specs unchanged."""
        if spec == "now":
            return await self.now()
        commit = spec if isinstance(spec, CommitToken) else CommitToken.parse(spec) if isinstance(spec, str) else None
        if commit is not None:
            return await self.commit(commit)
        assert not isinstance(spec, CommitToken)
        return spec

    async def now(self) -> Position:
        """A position covering every transaction committed before this call."""
        token = await self.retrying(store.snapshot_token, "reading the current snapshot")
        return await self.commit(token)

    async def commit(self, commit: CommitToken) -> Position:
        """The position of the first tick covering ``commit``: wait (the caller
        bounds it) until a tick does, refusing a token from the future. No
        query when the newest tick this reader knows covers it already."""
        while True:
            head = self._refresher.head
            if head is not None and commit.covered_by(head.snapshot):
                # The first covering tick among those this reader knows (ticks
                # come in contiguous runs). An older covering tick may exist;
                # waiting for a later one is stricter, never wrong.
                found = first_covering(self._ticks.run_to(head), commit)
                assert found is not None
                return Position(found.id)
            tick_id = await self.retrying(lambda conn: store.resolve_token(conn, str(commit)), "resolving a token")
            if tick_id is not None:
                return Position(tick_id)
            # The ticker has yet to take the covering tick; its NOTIFY wakes us.
            await self._refresher.wait_tick_after(head.id if head is not None else -1)

    async def prove(self, stream: str, spec: Spec, head: int, meta: StreamMeta, what: str) -> Spec:
        """``spec`` as a parsed position token once proven to name a point of
        ``stream``'s current incarnation ``meta`` in this database's history
        (:func:`~pgfeed.core.cursor.prove_token`: :class:`TokenError` if not,
        :class:`FutureToken` beyond the newest tick ``head``); ``"earliest"``
        and ``"now"`` unchanged. One query for a token with a check or a seq,
        none when it is complete and its tick's fingerprint is cached."""
        named = named_token(spec, head, what)
        if named is None:
            return spec
        await self.check(stream, named, meta)
        return named

    async def check(self, stream: str, named: PositionToken, meta: StreamMeta) -> None:
        """:class:`TokenError` unless ``named`` names a point of ``stream``'s
        current incarnation ``meta`` (or its tick is not in the database)."""
        if needs_proof(named):
            prove_token(stream, named, meta, await self.tick_facts(meta, named.position))

    async def resume(
        self, stream: str, saved: store.SavedPosition, head: int, meta: StreamMeta
    ) -> tuple[PositionToken, str | None]:
        """A consumer's saved position, and why it cannot be trusted (a reset
        reason, see :func:`~pgfeed.core.cursor.saved_position_distrusted`) or
        None. :class:`FutureToken` beyond the newest tick ``head`` (a standby
        that has not replayed it yet)."""
        named = named_token(saved.token, head, "saved position")
        assert named is not None
        if saved.tick_fp is None and not needs_proof(named):
            return named, None
        facts = await self.tick_facts(meta, named.position)
        return named, saved_position_distrusted(named.position, saved.tick_fp, meta, facts)

    async def tick_facts(self, meta: StreamMeta, pos: Position) -> TickFacts:
        """What the database holds of ``pos``'s tick for stream incarnation ``meta``."""
        cached = self._ticks.get(pos.tick)
        if pos.complete and cached is not None and cached.fp is not None:
            return TickFacts(exists=True, fp=cached.fp, floor_tick=meta.floor_tick)
        return await self.retrying(lambda conn: store.tick_facts(conn, meta.id, pos), "checking a position token")

    async def newest_tick_id(self) -> int:
        """The newest tick's id, read from the database."""
        return await self.retrying(store.head_tick_id, "checking a token")

    async def retrying(self, query: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], doing: str) -> T:
        """Run ``query`` on a pooled connection, retrying with backoff on a lost
        connection until the caller's timeout; other errors become PgfeedError."""
        backoff = Backoff()
        while True:
            try:
                async with self._borrow() as conn:
                    return await query(conn)
            except (psycopg.OperationalError, OSError) as exc:
                delay = backoff.next_delay()
                log.info("query failed; retrying", doing=doing, error=one_line(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            except psycopg.Error as exc:
                raise translate(exc, doing) from None
            except Interrupted as exc:
                raise PgfeedError(f"{doing} failed: {exc}") from None
