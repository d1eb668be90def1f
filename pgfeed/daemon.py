"""``pgfeed daemon``: the database's ticker as a service, plus retention.

Run one or more (for availability; exactly one ticks, see
:mod:`pgfeed.ticker`). The daemon takes precedence over tickers embedded in
readers. It heartbeats through the lease row, prunes on a schedule (never
past a saved consumer position unless told to), reconnects with backoff, and
stops cleanly on SIGTERM/SIGINT, resigning the lease so that another daemon
takes over at once. With ``metrics_port`` it serves Prometheus metrics (its
ticker's, and the database's read at scrape time, see :mod:`pgfeed.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from pgfeed.connect import aconnect
from pgfeed.errors import NotMigrated, PgfeedError, translate
from pgfeed.log import get_logger
from pgfeed.queries import query
from pgfeed.ticker import Ticker

log = get_logger("pgfeed.daemon")


@dataclass(frozen=True)
class DaemonOptions:
    """How the daemon ticks and prunes."""

    lease: float = 10.0
    interval: float = 0.001
    idle_interval: float = 0.05
    #: Keep events and ticks this long (seconds); None keeps everything.
    retention: float | None = 7 * 86400.0
    #: How often retention runs (seconds).
    prune_every: float = 60.0
    #: Prune past saved consumer positions (those consumers then reset).
    prune_consumers: bool = False
    #: Serve Prometheus metrics on this port (0: any free port; None: no metrics).
    metrics_port: int | None = None
    #: The address the metrics server listens on.
    metrics_addr: str = "0.0.0.0"  # noqa: S104  # scraped from other hosts
    #: How long one scrape may spend reading the database (seconds).
    metrics_timeout: float = 5.0


async def check_database(conninfo: str) -> None:
    """Fail at once, in one line, on a bad DSN or an unmigrated database."""
    conn = await aconnect(conninfo, doing="starting the daemon")
    try:
        cur = await conn.execute(query("has_ticker_schema"))
        row = await cur.fetchone()
        if not row or not row[0]:
            raise NotMigrated("the pgfeed schema is missing or predates the ticker: run `pgfeed migrate`")
    except psycopg.Error as exc:
        raise translate(exc, "checking the database") from None
    finally:
        await conn.close()


async def run_daemon(conninfo: str, options: DaemonOptions | None = None) -> None:
    """Tick and prune until SIGTERM/SIGINT (or cancellation)."""
    options = options or DaemonOptions()
    await check_database(conninfo)
    metrics = _Metrics(conninfo, options) if options.metrics_port is not None else None
    ticker = Ticker(
        conninfo,
        kind="daemon",
        lease=options.lease,
        interval=options.interval,
        idle_interval=options.idle_interval,
        on_tick=metrics.ticker.on_tick if metrics is not None else None,
    )
    if metrics is not None:
        metrics.start(ticker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(ticker.run(), name="pgfeed-ticker")]
    if options.retention is not None:
        tasks.append(asyncio.create_task(_retention(conninfo, ticker, options), name="pgfeed-retention"))
    log.info("daemon started", holder=ticker.holder, lease=options.lease, retention=options.retention)
    waiter = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in [*tasks, waiter]:
            t.cancel()
        await asyncio.gather(*tasks, waiter, return_exceptions=True)
        await ticker.close()
        if metrics is not None:
            metrics.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        log.info("daemon stopped", ticks=ticker.stats.ticks)


class _Metrics:
    """The daemon's metrics server: its ticker's collector and the database's."""

    def __init__(self, conninfo: str, options: DaemonOptions) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        from pgfeed.metrics import DatabaseCollector, TickerCollector

        self.options = options
        self.registry = CollectorRegistry()
        self.ticker = TickerCollector()
        self.database = DatabaseCollector(conninfo, timeout=options.metrics_timeout)
        ProcessCollector(registry=self.registry)
        self.server: Any = None

    def start(self, ticker: Ticker) -> None:
        from pgfeed.metrics import serve

        self.ticker.attach(ticker)
        self.registry.register(self.ticker)
        self.registry.register(self.database)
        assert self.options.metrics_port is not None
        self.server = serve(self.registry, self.options.metrics_port, self.options.metrics_addr)
        log.info(
            "serving metrics",
            url=f"http://{self.options.metrics_addr}:{self.server.server_port}/metrics",
            port=self.server.server_port,
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.database.close()


async def _retention(conninfo: str, ticker: Ticker, options: DaemonOptions) -> None:
    """Prune while leading (one pruner per database, like one ticker)."""
    assert options.retention is not None
    while True:
        await asyncio.sleep(options.prune_every)
        if not ticker.leading:
            continue
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                cur = await conn.execute(
                    query("prune"), (timedelta(seconds=options.retention), not options.prune_consumers, False)
                )
                row = await cur.fetchone()
            if row and (row[1] or row[2]):
                log.info("pruned", floor_tick=row[0], ticks_deleted=row[1], events_deleted=row[2])
            if row and row[3]:
                log.warning("retention held back by a saved consumer position", floor_tick=row[0])
        except psycopg.errors.InsufficientPrivilege as exc:
            log.warning("this role may not prune; retention is off", error=str(exc).splitlines()[0])
            return
        except psycopg.Error as exc:
            log.warning("pruning failed; retrying later", error=str(translate(exc, "pruning")))
        except PgfeedError as exc:
            log.warning("pruning failed; retrying later", error=str(exc))
