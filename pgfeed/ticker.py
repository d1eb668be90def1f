"""The ticker: one per database takes every tick.

Every process that may tick (``pgfeed daemon``, and readers with
``ticker="auto"`` when their role is allowed to) runs a :class:`Ticker`. They
elect one leader through the lease row ``pgfeed.ticker``:

* a claim succeeds only on an expired lease (or, for a daemon, over a reader),
  and bumps the lease's *term*;
* the leader renews (heartbeats) every ``lease / 3`` and ticks with
  ``pgfeed.tick_v2(term)``, which checks the term under a row lock in the same
  transaction as the tick insert: a deposed leader's tick is refused;
* a leader that cannot renew in time (dead, stopped, half-open) is replaced
  within ``lease`` plus one claim interval; a clean stop resigns at once.

Why a lease row and not an advisory lock: session advisory locks leak
through transaction-mode poolers (PgBouncer), vanish silently with a dropped
connection while the old holder keeps working, and do not survive a failover
at all; a lease row with server-side timestamps behaves the same through any
pooler and is replicated with the ticks it fences. Correctness does not rest
on the election anyway: ticks are serialised by the tick lock whoever takes
them (see docs/design.md); the lease keeps their volume to one ticker's
cadence.

Connections: the leader holds one of its own (LISTEN for wake-ups, a
statement timeout shorter than the lease). A daemon keeps it while it follows
too; a candidate given ``borrow=`` (a reader's embedded ticker, which borrows
from the reader's pool) holds none while it follows: it claims through a
borrowed connection every ``lease / 3``, or at once when its owner, who
LISTENs on ``pgfeed_v2_ticker``, calls :meth:`Ticker.poke` on a resignation.
So a reader process keeps 2 connections while another process ticks, 3 while
it ticks itself.

The leader asks for a tick every ``interval`` while rows keep arriving; a
tick is only written when some row became visible, and carries one NOTIFY
(``pgfeed_v2_ticks``, payload the tick id). When nothing changed it waits in
the server (``pgfeed.await_change_v4``, one statement per ``idle_interval``),
which checks every ``interval`` for a second after the last tick, then every
:data:`IDLE_POLL`, and returns as soon as something changed: a row written
after a quiet spell is ticked within a few milliseconds, with writers that
only INSERT. (On a schema before 0008 it sleeps instead, backing off
geometrically to ``idle_interval``; writers of ``immediate`` streams wake it
at once through ``pgfeed_v2_wake``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from pgfeed.connect import connect_error, cut_connection, with_keepalives
from pgfeed.core.backoff import Backoff
from pgfeed.errors import NotMigrated, PgfeedError, UsageError, one_line, translate
from pgfeed.errors import TickerUnavailable as TickerUnavailable  # re-exported: its former home
from pgfeed.log import get_logger
from pgfeed.queries import query, template

log = get_logger("pgfeed.ticker")

TICKS_CHANNEL = "pgfeed_v2_ticks"
WAKE_CHANNEL = "pgfeed_v2_wake"
LEASE_CHANNEL = "pgfeed_v2_ticker"

#: How often the server-side wait checks once no tick was taken for
#: :data:`FAST_FOR` seconds (each check wakes a backend: about 25 us of CPU).
IDLE_POLL = 0.01
FAST_FOR = 1.0

Kind = Literal["daemon", "reader"]
#: Lends a connection for one statement or two (a reader's ``pool.connection``).
Borrow = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class _Superseded(Exception):
    """tick_v2 refused this ticker's term (PF001)."""


@dataclass
class TickerStats:
    """What a ticker did; read it for status and metrics."""

    ticks: int = 0
    checks: int = 0
    leader_changes: int = 0
    reconnects: int = 0
    last_tick: int | None = None
    last_tick_seconds: float = 0.0
    tick_durations: list[float] = field(default_factory=list)


class Ticker:
    """A ticker candidate; :meth:`run` until cancelled, then :meth:`close`.

    ``borrow``: campaign through borrowed connections while following, and
    keep a connection of its own only while leading; the owner should then
    call :meth:`poke` on every notification of ``pgfeed_v2_ticker`` (a
    resignation), or a follower takes over a resigned lease only at its next
    claim (``lease / 3``). Without it the candidate keeps its connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        kind: Kind = "daemon",
        holder: str | None = None,
        lease: float = 10.0,
        interval: float = 0.001,
        idle_interval: float = 0.05,
        on_tick: Callable[[int], Any] | None = None,
        borrow: Borrow | None = None,
    ) -> None:
        if kind not in ("daemon", "reader"):
            raise UsageError(f"invalid ticker kind {kind!r}: expected 'daemon' or 'reader'")
        for name, value in (("lease", lease), ("interval", interval), ("idle_interval", idle_interval)):
            if not value > 0:
                raise UsageError(f"invalid ticker {name} {value!r}: expected a positive number of seconds")
        if idle_interval < interval:
            raise UsageError(f"ticker idle_interval {idle_interval:g}s is shorter than its interval {interval:g}s")
        self.conninfo = with_keepalives(conninfo)
        self.kind: Kind = kind
        self.holder = holder or f"{kind} {socket.gethostname()} pid {os.getpid()}"
        self.lease = lease
        self.interval = interval
        self.idle_interval = idle_interval
        self.on_tick = on_tick
        self.term: int | None = None
        self.stats = TickerStats()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._closed = False
        self._borrow = borrow
        self._poked = asyncio.Event()
        self._server_waits = True  # False on a schema without await_change_v4 (before 0008)
        self._last_tick_at = 0.0

    def poke(self) -> None:
        """Campaign now: the lease may have been resigned (a follower with ``borrow``)."""
        self._poked.set()

    @property
    def leading(self) -> bool:
        """True while this candidate holds the lease."""
        return self.term is not None

    # -- lifecycle -------------------------------------------------------
    async def run(self) -> None:
        """Campaign and tick until cancelled; reconnect with backoff.

        Raises :class:`TickerUnavailable` when this role or server cannot
        tick at all, and :class:`NotMigrated` on a database without the ticker
        schema; every other failure is retried."""
        backoff = Backoff()
        while not self._closed:
            if self.term is None and self._borrow is not None:
                try:
                    await self._campaign(self._borrow, backoff)
                except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                    delay = backoff.next_delay()
                    log.warning("ticker cannot campaign; retrying", error=one_line(exc), retry_in=round(delay, 3))
                    await asyncio.sleep(delay)
                continue
            try:
                conn = await self._connect()
            except PgfeedError as exc:
                delay = backoff.next_delay()
                log.warning("ticker cannot connect; retrying", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            try:
                await self._session(conn, backoff)
            except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                # Keep the term: the next session renews it first, which
                # succeeds only if nobody took the lease meanwhile (the fence
                # holds), so a dropped connection costs a reconnect, not a
                # lease-long outage.
                self.stats.reconnects += 1
                delay = backoff.next_delay()
                log.warning("ticker connection lost; reconnecting", error=one_line(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
            finally:
                self._conn = None
                await conn.close()

    async def close(self) -> None:
        """Resign the lease if held (so that another candidate takes over at
        once) and stop. Safe to call after cancelling :meth:`run`."""
        self._closed = True
        term, self.term = self.term, None
        if term is None:
            return
        try:
            async with asyncio.timeout(5), self._short_connection() as c:
                await c.execute(query("ticker_resign"), (term,))
            log.info("ticker resigned", term=term)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("ticker could not resign; the lease expires on its own", term=term, error=one_line(exc))

    @contextlib.asynccontextmanager
    async def _short_connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A borrowed connection, or else one of its own for this one use."""
        if self._borrow is not None:
            async with self._borrow() as conn:
                yield conn
            return
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
            yield conn

    # -- internals -------------------------------------------------------
    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise connect_error(exc, "connecting the ticker") from None
        try:
            # A tick is durable before anyone is told of it; a statement that
            # hangs (lock, half-open link) is cut before the lease runs out.
            await conn.execute(query("set_synchronous_commit_on"))
            await conn.execute(query("set_read_committed_default"))
            # The tick's statements run thousands of times: one generic plan
            # each, not a custom plan made at every call (measured: an empty
            # check 150 -> 135 us of server CPU, a tick 600 -> 515 us).
            await conn.execute(query("set_generic_plans"))
            await conn.execute(
                template("set_statement_timeout").format(sql.Literal(max(1, int(self.lease * 1000 / 3))))
            )
            await conn.execute(query("set_application_name_ticker"))
            conn.prepare_threshold = 0
            for channel in (WAKE_CHANNEL, LEASE_CHANNEL):
                await conn.execute(template("listen").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            await conn.close()
            if isinstance(exc, psycopg.OperationalError):
                raise connect_error(exc, "preparing the ticker's connection") from None
            raise translate(exc, "preparing the ticker's connection") from None
        self._conn = conn
        return conn

    async def _campaign(self, borrow: Borrow, backoff: Backoff) -> None:
        """Follow without a connection of its own: claim through a borrowed
        one every ``lease / 3`` (or at once when poked); return once leading."""
        while not self._closed and self.term is None:
            self._poked.clear()
            async with borrow() as conn:
                await self._claim(conn)
            backoff.reset()
            if self.term is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.lease / 3 * random.uniform(0.8, 1.2)):
                        await self._poked.wait()

    async def _session(self, conn: psycopg.AsyncConnection[Any], backoff: Backoff) -> None:
        loop = asyncio.get_running_loop()
        delay = self.interval
        changed = True  # check at once
        self._server_waits = True  # the schema or the grants may have changed since the last session
        renew_at = 0.0  # renew first: the lease row then names this connection's backend
        while not self._closed:
            if self.term is None and self._borrow is not None:
                return  # deposed: follow again without this connection
            if self.term is None:
                if await self._claim(conn):
                    renew_at = loop.time() + self.lease / 3
                    delay = self.interval
                    changed = True  # a new leader checks at once
                    backoff.reset()
                    continue
                # Someone else leads: try again when the lease could have run
                # out, or at once when its holder resigns.
                await self._wait(conn, self.lease / 3 * random.uniform(0.8, 1.2))
                backoff.reset()
                continue
            if loop.time() >= renew_at:
                if not await self._renew(conn):
                    continue
                renew_at = loop.time() + self.lease / 3
            if changed and await self._tick(conn):
                backoff.reset()
                delay = self.interval
                await self._wait(conn, delay)
                continue
            backoff.reset()
            if self.term is None:
                continue  # deposed while ticking: campaign now, not after a wait
            if self._server_waits:
                changed = await self._await_change(conn)
            else:
                delay = min(delay * 2, self.idle_interval)
                await self._wait(conn, delay)
                changed = True

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        row = await self._one(
            conn,
            query("ticker_claim"),
            (self.holder, self.kind, int(self.lease * 1000)),
        )
        if row is None:
            return False
        self.term = int(row[0])
        self.stats.leader_changes += 1
        log.info("ticker leads", term=self.term, holder=self.holder)
        return True

    async def _renew(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        assert self.term is not None
        row = await self._one(conn, query("ticker_renew"), (self.term, int(self.lease * 1000)))
        if row is None or not row[0]:
            self._lost("another ticker took the lease")
            return False
        return True

    async def _tick(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        assert self.term is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.stats.checks += 1
        try:
            row = await self._one(conn, query("tick"), (self.term,))
        except _Superseded:
            self._lost("another ticker took the lease")
            return False
        if row is None:
            return False
        took = loop.time() - started
        self._last_tick_at = loop.time()
        self.stats.ticks += 1
        self.stats.last_tick = int(row[0])
        self.stats.last_tick_seconds = took
        if self.on_tick is not None:
            self.on_tick(int(row[0]))
        return True

    async def _await_change(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Wait in the server until some row may have become visible (True)
        or ``idle_interval`` passed (False); see the module's docstring."""
        loop = asyncio.get_running_loop()
        fast = loop.time() - self._last_tick_at < FAST_FOR
        # Well inside the statement timeout (lease / 3), whatever idle_interval says.
        timeout = min(self.idle_interval, self.lease / 6)
        poll = min(timeout, self.interval if fast else max(self.interval, IDLE_POLL))
        self.stats.checks += 1
        try:
            row = await self._one(conn, query("await_change"), (round(timeout * 1000), max(1, round(poll * 1000))))
        except NotMigrated:
            self._server_waits = False
            log.info("the schema predates await_change_v4 (0008): the ticker polls instead; run `pgfeed migrate`")
            return True
        except TickerUnavailable as exc:
            # A role granted `ticker` by an earlier release may tick but not wait.
            self._server_waits = False
            log.warning("the ticker cannot wait in the server, so it polls: run `pgfeed grant ticker`", error=str(exc))
            return True
        return bool(row[0]) if row is not None else True

    async def _one(self, conn: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...]) -> Any:
        try:
            async with asyncio.timeout(self.lease / 3 + 1):
                cur = await conn.execute(statement, params)
                return await cur.fetchone()
        except TimeoutError:
            cut_connection(conn)
            raise
        except (pgerrors.InsufficientPrivilege, pgerrors.ReadOnlySqlTransaction) as exc:
            raise TickerUnavailable(f"this role or server cannot tick: {one_line(exc)}") from None
        except (pgerrors.UndefinedFunction, pgerrors.UndefinedTable):
            raise NotMigrated(
                "the pgfeed schema predates the ticker (pgfeed.ticker_claim_v2 missing): run `pgfeed migrate`"
            ) from None
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            # pgfeed's own SQLSTATEs arrive as whatever class psycopg maps
            # their class to: match the code, not the class.
            if exc.sqlstate == "PF001":  # superseded: fenced off
                raise _Superseded from None
            if exc.sqlstate in ("PF002", "PF004"):  # another history: restored, not repaired
                raise PgfeedError(_primary(exc)) from None
            raise translate(exc, "ticking") from None

    async def _wait(self, conn: psycopg.AsyncConnection[Any], seconds: float) -> None:
        """Sleep up to ``seconds``; a wake-up or resign notification ends it early."""
        async for _ in conn.notifies(timeout=seconds, stop_after=1):
            break

    def _lost(self, why: str) -> None:
        if self.term is not None:
            log.info("ticker no longer leads", term=self.term, reason=why)
        self.term = None


def _primary(exc: psycopg.Error) -> str:
    diag = exc.diag.message_primary or one_line(exc)
    return diag.removeprefix("pgfeed: ")
