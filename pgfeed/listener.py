"""The reader's listener: one autocommit connection of its own, outside the
pool, that LISTENs on the ticks channel (and the ticker's lease channel when
the reader runs a ticker) and turns notifications into wake-ups. It carries
the reader's name (:mod:`pgfeed.naming`), renamed at connect and at each probe.

A notification is only a hint: the refresher reads the newest tick itself,
and polls when notifications stop. The connection is proven alive with a
NOTIFY to itself every ``probe_interval`` (a half-open connection hears
nothing, forever); a hot standby refuses LISTEN, and then the reader follows
by polling alone. Reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from pgfeed.aio import Signal
from pgfeed.connect import cut_connection
from pgfeed.core.backoff import Backoff
from pgfeed.errors import one_line
from pgfeed.log import get_logger
from pgfeed.naming import SessionName
from pgfeed.options import ReaderOptions
from pgfeed.queries import query, template
from pgfeed.ticker import LEASE_CHANNEL, TICKS_CHANNEL

log = get_logger("pgfeed.reader")

#: How long a listener refused LISTEN (a hot standby) waits before trying again (seconds).
STANDBY_RETRY = 60.0


class Listener:
    """LISTEN for ticks: ``on_tick(payload)`` for each tick notification,
    ``on_lease()`` for each on the lease channel (only LISTENed to when given),
    ``on_connected()`` each time LISTEN is live again (catch up then:
    notifications may have been missed meanwhile), ``on_lost()`` each time
    its connection is lost."""

    def __init__(
        self,
        options: ReaderOptions,
        on_tick: Callable[[str], None],
        on_connected: Callable[[], None],
        name: SessionName,
        on_lost: Callable[[], None],
    ) -> None:
        self._options = options
        self._name = name
        self._on_lost = on_lost
        self._on_tick = on_tick
        self._on_connected = on_connected
        #: Whether notifications are live now (else the refresher polls faster).
        self.listening = False
        self._up = False  # LISTEN was live once, or refused for good: subscriptions may start
        self._state = Signal()

    async def ready(self) -> None:
        """Wait (at most ``probe_timeout``) until the listener LISTENs on the
        ticks channel, so that a catch-up starts after notifications are live."""
        try:
            async with asyncio.timeout(self._options.probe_timeout):
                await self._state.wait_until(lambda: self._up)
        except TimeoutError:
            log.warning("listener not ready; relying on polling until it is")

    def _came_up(self) -> None:
        self._up = True
        self._state.fire()

    async def run(self, conninfo: str, on_lease: Callable[[], None] | None = None) -> None:
        """Listen until cancelled, reconnecting with backoff."""
        backoff = Backoff()
        probe = f"pgfeed_v2_probe_{os.getpid()}_{id(self)}"
        channels = [probe, TICKS_CHANNEL] + ([LEASE_CHANNEL] if on_lease is not None else [])
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10)
            except (psycopg.Error, OSError) as exc:
                delay = backoff.next_delay()
                log.warning("listener cannot connect; retrying", error=one_line(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            try:
                await self._name.apply(conn)
                for channel in channels:
                    await conn.execute(template("listen").format(sql.Identifier(channel)))
                log.info("listener connected")
                self.listening = True
                self._came_up()
                # LISTEN is live: now catch up (a notification is only a hint).
                self._on_connected()
                backoff.reset()
                await self._follow(conn, probe, on_lease)
            except (psycopg.errors.FeatureNotSupported, psycopg.errors.ReadOnlySqlTransaction) as exc:
                # A hot standby refuses LISTEN: follow by polling instead.
                self._came_up()
                log.info("LISTEN refused (a hot standby?); following by polling", error=one_line(exc))
                await asyncio.sleep(STANDBY_RETRY)  # then try again: the standby may have been promoted
            except (psycopg.Error, OSError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("listener lost; reconnecting", error=one_line(exc), retry_in=round(delay, 3))
                self.listening = False
                self._on_lost()
                await asyncio.sleep(delay)
            finally:
                self.listening = False
                await conn.close()

    async def _follow(
        self, conn: psycopg.AsyncConnection[Any], probe: str, on_lease: Callable[[], None] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self._options.probe_interval
        while True:
            async for note in conn.notifies(timeout=max(0.01, next_probe - loop.time())):
                if note.channel == TICKS_CHANNEL:
                    self._on_tick(note.payload)
                elif note.channel == LEASE_CHANNEL and on_lease is not None:
                    on_lease()
            if loop.time() >= next_probe:
                await self._probe(conn, probe)
                await self._name.apply(conn)  # what the reader follows may have changed
                next_probe = loop.time() + self._options.probe_interval

    async def _probe(self, conn: psycopg.AsyncConnection[Any], probe: str) -> None:
        """Prove the connection answers: a NOTIFY to ourselves within ``probe_timeout``.

        On timeout the socket is shut down rather than the query cancelled:
        a cancel request to a backend that does not answer would itself hang.
        """
        timeout = self._options.probe_timeout
        task = asyncio.ensure_future(conn.execute(query("notify_self"), (probe,)))
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if task in done:
            task.result()
            return
        cut_connection(conn)
        await asyncio.wait({task}, timeout=timeout)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the connection is being replaced anyway
        raise TimeoutError(f"the listener's connection did not answer a probe within {timeout:g}s")
