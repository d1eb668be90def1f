"""Consumer heartbeats, opt-in (``heartbeat=`` seconds): a reader says its
named consumers are alive even when their position does not move.

Every ``heartbeat`` seconds, one statement on a pooled connection calls
``pgfeed.consumer_heartbeat_v2(consumer, stream)`` for each named consumer
the reader follows: it sets ``seen_at`` and ``seen_by`` (the session's
application name, client address and backend pid) on the role's own row of
``pgfeed.positions``, so ``pgfeed status`` tells a live consumer on a quiet
stream from a dead one. One small UPDATE per consumer per interval; nothing
before a consumer's first saved position. A role that may not call it, a
read-only session or a hot standby turns the heartbeats off for good (one
warning); any other failure is retried at the next interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import psycopg

from pgfeed import store
from pgfeed.errors import one_line
from pgfeed.log import get_logger
from pgfeed.ticker import Borrow

log = get_logger("pgfeed.reader")

#: What retrying cannot fix: a missing grant, a schema before 0006, a read-only session or server.
_FOR_GOOD = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.ReadOnlySqlTransaction,
)


class Heartbeats:
    """Sends the heartbeats of ``consumers()`` (``(consumer, stream)`` pairs) every ``interval`` seconds."""

    def __init__(self, borrow: Borrow, interval: float, consumers: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._borrow = borrow
        self._interval = interval
        self._consumers = consumers

    async def run(self) -> None:
        """Beat until cancelled, or until this role or server cannot."""
        while True:
            await asyncio.sleep(self._interval)
            pairs = sorted(set(self._consumers()))
            if not pairs:
                continue
            try:
                async with self._borrow() as conn:
                    await store.consumer_heartbeats(conn, pairs)
            except _FOR_GOOD as exc:
                log.warning(
                    "consumer heartbeats off: this role, session or schema cannot send them "
                    "(the role needs EXECUTE on pgfeed.consumer_heartbeat_v2)",
                    error=one_line(exc),
                )
                return
            except psycopg.Error as exc:
                log.info("consumer heartbeat failed; retrying", error=one_line(exc))
