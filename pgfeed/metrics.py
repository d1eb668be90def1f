"""Prometheus metrics: the daemon's (its ticker, and the database as
``pgfeed status`` reads it, at scrape time) and, opt-in, a reader's.

Labels are stream and consumer names only, never tokens, keys or pids, so a
series exists per stream and per (stream, consumer): low cardinality.
docs/operating.md lists every metric with sample alerts.

Daemon: ``pgfeed daemon --metrics-port N`` serves :class:`TickerCollector`
(what this process's ticker did) and :class:`DatabaseCollector` (ticker
lease, streams, consumers' lag, open writers; one bounded round of queries
per scrape) on ``http://ADDR:N/metrics``.

Reader (opt-in, no HTTP server unless asked): ``AsyncReader(dsn,
metrics=registry)`` (or ``Reader``; ``metrics=True``: the default registry)
registers :class:`ReaderMetrics` in the application's registry and counts
what it delivers, resets, handler failures and reconnects by itself, with
each subscription's position and lag. :class:`ReaderCollector` is the same
metrics wired by hand through the public API (``observe``, ``handler``,
``track``). To serve a registry the application exposes nowhere else:
:func:`serve`.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg.conninfo import make_conninfo

from pgfeed import status as status_lib
from pgfeed.core.health import Status, Thresholds, age
from pgfeed.errors import PgfeedError, UsageError
from pgfeed.log import get_logger

log = get_logger("pgfeed.metrics")

#: Tick durations: a tick is one short transaction.
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, math.inf)
#: Delivery latency, from append to delivery.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)


class _TickerLike(Protocol):
    @property
    def leading(self) -> bool: ...

    stats: Any


class TickerCollector:
    """What this process's ticker did: ticks taken and their duration, checks,
    leader changes, reconnects, whether it leads. Pass :meth:`on_tick` as the
    ticker's ``on_tick`` (it reads the duration of the tick just taken)."""

    def __init__(self) -> None:
        self._ticker: _TickerLike | None = None
        self.durations = Histogram(
            "pgfeed_tick_duration_seconds",
            "Duration of the ticks this process took (one tick_v2 call that wrote a tick).",
            buckets=TICK_BUCKETS,
            registry=None,
        )

    def attach(self, ticker: _TickerLike) -> None:
        self._ticker = ticker

    def on_tick(self, tick_id: int) -> None:
        if self._ticker is not None:
            self.durations.observe(self._ticker.stats.last_tick_seconds)

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._ticker))

    def _families(self, ticker: _TickerLike | None) -> Iterator[Metric]:
        stats = ticker.stats if ticker is not None else None
        for name, doc, attr in (
            ("pgfeed_ticker_ticks", "Ticks this process took.", "ticks"),
            (
                "pgfeed_ticker_checks",
                "Checks for a change this process made while leading (tick_v2 or await_change_v4 calls).",
                "checks",
            ),
            ("pgfeed_ticker_leader_changes", "Times this process took the ticker lease.", "leader_changes"),
            ("pgfeed_ticker_reconnects", "Times this process's ticker lost its connection.", "reconnects"),
        ):
            family = CounterMetricFamily(name, doc)
            if stats is not None:
                family.add_metric([], float(getattr(stats, attr)))
            yield family
        leading = GaugeMetricFamily("pgfeed_ticker_leading", "1 while this process holds the ticker lease.")
        if ticker is not None:
            leading.add_metric([], 1.0 if ticker.leading else 0.0)
        yield leading
        if ticker is not None:
            yield from self.durations.collect()


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class DatabaseCollector:
    """The database as ``pgfeed status`` sees it, read at scrape time.

    One connection, kept between scrapes (replaced after a failure), and one
    REPEATABLE READ transaction per scrape, cancelled after ``timeout``
    seconds: a slow or unreachable database makes ``pgfeed_scrape_ok`` 0, it
    never hangs the scrape. Needs the schema owner or a role granted
    ``pg_monitor`` (see :mod:`pgfeed.status`).
    """

    def __init__(self, conninfo: str, *, timeout: float = 5.0) -> None:
        ms = max(1, int(timeout * 1000))
        self.conninfo = make_conninfo(
            conninfo,
            connect_timeout=str(max(1, math.ceil(timeout))),
            options=f"-c statement_timeout={ms}",
            application_name="pgfeed metrics",
        )
        self.timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._failing: str | None = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def describe(self) -> Iterable[Metric]:
        return []  # names come from the database at scrape time; nothing to clash with

    def _read(self) -> Status:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=True)
        conn = self._conn
        timer = threading.Timer(self.timeout, conn.cancel_safe)
        timer.start()
        try:
            # Every open writer counts, however young (long_xact=0).
            return status_lib.gather(conn, thresholds=Thresholds(long_xact=0.0))
        finally:
            timer.cancel()

    def collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        st: Status | None = None
        with self._lock:
            try:
                st = self._read()
                if self._failing is not None:
                    log.info("metrics: the database answers again")
                self._failing = None
            except (PgfeedError, psycopg.Error, OSError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if why != self._failing:
                    log.warning("metrics: cannot read the database's status", error=why)
                self._failing = why
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
        ok = GaugeMetricFamily("pgfeed_scrape_ok", "1 when the database status was read within the timeout.")
        ok.add_metric([], 0.0 if st is None else 1.0)
        took = GaugeMetricFamily("pgfeed_scrape_duration_seconds", "How long reading the database status took.")
        took.add_metric([], time.monotonic() - started)
        families: list[Metric] = [ok, took]
        if st is not None:
            families += list(database_families(st))
        return families


def database_families(st: Status) -> Iterator[Metric]:
    """The metric families of a :class:`~pgfeed.core.health.Status`."""
    now, t = st.now, st.ticker

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        return family

    yield gauge("pgfeed_ticker_lease_live", "1 while some ticker (daemon or reader) holds a live lease.", float(t.live))
    yield gauge("pgfeed_ticker_term", "The ticker lease's term (bumped by every change of leader).", float(t.term))
    yield gauge(
        "pgfeed_ticker_heartbeat_age_seconds",
        "Seconds since the lease holder last renewed (NaN: never).",
        _nan(age(now, t.heartbeat_at)),
    )
    yield gauge("pgfeed_tick_id", "The newest tick's id.", float(t.head_tick or 0))
    yield gauge(
        "pgfeed_tick_age_seconds",
        "Seconds since the newest tick was taken (NaN: none).",
        _nan(age(now, t.head_taken_at)),
    )
    yield gauge("pgfeed_ticks_per_second", "Ticks per second over the last minute, by any ticker.", t.ticks_per_second)
    waiting = [
        max(s.pending_since, t.head_taken_at) if t.head_taken_at else s.pending_since
        for s in st.streams
        if s.pending_rows and s.pending_since is not None
    ]
    yield gauge(
        "pgfeed_tick_lag_seconds",
        "How long committed rows have waited for a tick: since the oldest was appended, at most since the newest "
        "tick (0: none waits).",
        max((age(now, w) or 0.0 for w in waiting), default=0.0),
    )
    per_stream: list[tuple[str, str, Callable[[Any], float]]] = [
        ("pgfeed_stream_rows", "Rows the stream holds.", lambda s: s.rows),
        ("pgfeed_stream_bytes", "Bytes on disk of the stream's partition, indexes included.", lambda s: s.bytes),
        (
            "pgfeed_stream_rows_written_per_second",
            "Rows appended per second over the last minute.",
            lambda s: s.rows_per_second,
        ),
        (
            "pgfeed_stream_last_append_age_seconds",
            "Seconds since the newest row was appended (NaN: empty).",
            lambda s: _nan(age(now, s.last_append)),
        ),
        ("pgfeed_stream_pending_rows", "Committed rows no tick covers yet.", lambda s: s.pending_rows),
        (
            "pgfeed_stream_open_writers",
            "Open transactions that wrote to the stream: their rows are delivered when they commit.",
            lambda s: len(s.writers),
        ),
        (
            "pgfeed_stream_open_writer_age_seconds",
            "How long the oldest open transaction that wrote to the stream has been open (0: none).",
            lambda s: max((age(now, w.session.xact_start) or 0.0 for w in s.writers), default=0.0),
        ),
        (
            "pgfeed_stream_open_writer_committed_after_rows",
            "Rows of later transactions committed while the oldest open writer stayed open "
            "(its rows will follow them).",
            lambda s: max((w.committed_after or 0 for w in s.writers), default=0),
        ),
    ]
    for name, doc, value in per_stream:
        family = GaugeMetricFamily(name, doc, labels=["stream"])
        for s in st.streams:
            family.add_metric([s.name], float(value(s)))
        yield family
    # Consumers of the same name under several roles share a series: the worst of them.
    seen: dict[tuple[str, str], list[tuple[float | None, float | None, float | None]]] = {}
    for c in st.consumers:
        seen.setdefault((c.stream, c.consumer), []).append((c.lag_rows, c.lag_seconds, age(now, c.last_seen)))
    worst = {key: [_nan(_max_known(v[i] for v in values)) for i in range(3)] for key, values in seen.items()}
    for i, (name, doc) in enumerate(
        (
            ("pgfeed_consumer_lag_rows", "Rows after the consumer's saved position (NaN: it cannot resume)."),
            (
                "pgfeed_consumer_lag_seconds",
                "Seconds since the oldest row the consumer has not delivered was appended (0: caught up).",
            ),
            ("pgfeed_consumer_last_seen_age_seconds", "Seconds since the consumer moved or sent a heartbeat."),
        )
    ):
        family = GaugeMetricFamily(name, doc, labels=["stream", "consumer"])
        for (stream, consumer), values in sorted(worst.items()):
            family.add_metric([stream, consumer], values[i])
        yield family
    sessions = [h for h in st.xmin_holders if h.kind == "session"]
    yield gauge(
        "pgfeed_oldest_transaction_age_seconds",
        "How long the oldest transaction holding back the xmin horizon has been open (0: none).",
        max((h.age_seconds or 0.0 for h in sessions), default=0.0),
    )
    yield gauge(
        "pgfeed_xmin_horizon_age_xids",
        "How many transactions old the oldest xmin held back (sessions, prepared transactions, slots) is.",
        float(max((h.xmin_age or 0 for h in st.xmin_holders), default=0)),
    )


def _max_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Any:  # noqa: S104  # a metrics port is meant to be scraped
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread;
    returns the server (``server.server_port`` is the port, ``shutdown()`` stops it)."""
    try:
        server, _ = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise PgfeedError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    return server


# -- reader side -------------------------------------------------------------------
class _ReaderLike(Protocol):
    def position(self, stream: str) -> Any: ...

    def on_reset(self, fn: Callable[[str, str], Any]) -> None: ...

    def on_error(self, fn: Callable[[str, Any], Any]) -> None: ...


class ReaderMetrics:
    """A reader process's metrics: what was delivered, resets, handler
    failures, reconnects, and the position and lag of the subscriptions it
    tracks, read at scrape time. One implementation for both ways in:
    ``AsyncReader(..., metrics=registry)`` (see :func:`reader_metrics`) and
    :class:`ReaderCollector`.

    Counted on the readers' event loops, collected on the scraping thread.
    ``connections``: whether the reconnect counters are reported (a
    :class:`ReaderCollector`, which sees only the public API, cannot count them).
    """

    def __init__(self, *, connections: bool) -> None:
        self._connections = connections
        self._lock = threading.Lock()
        self._tracked: dict[int, Any] = {}  # id(subscription) -> subscription
        self.rows = Counter(
            "pgfeed_reader_rows_delivered",
            "Rows delivered to the application (handed to an on() handler or an iterating consumer).",
            ["stream", "consumer"],
            registry=None,
        )
        self.batches = Counter(
            "pgfeed_reader_batches_delivered",
            "Batches delivered to the application.",
            ["stream", "consumer"],
            registry=None,
        )
        self.latency = Histogram(
            "pgfeed_reader_delivery_latency_seconds",
            "Delivery latency of each row, measured from append time: from its created_at (the server's clock at "
            "the start of the appending transaction) to its delivery (this host's clock).",
            ["stream", "consumer"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.resets = Counter(
            "pgfeed_reader_resets",
            "Resets of subscriptions (continuity could not be proven).",
            ["stream"],
            registry=None,
        )
        self.failures = Counter(
            "pgfeed_reader_handler_failures",
            "on() handlers that kept failing until their subscription stopped.",
            ["stream"],
            registry=None,
        )
        self.listener_reconnects = Counter(
            "pgfeed_reader_listener_reconnects",
            "Times a reader's listener lost its connection (it reconnects with backoff).",
            registry=None,
        )
        self.pool_reconnects = Counter(
            "pgfeed_reader_pool_reconnects",
            "Connections of a reader's read pool found broken (a lost backend); each is replaced.",
            registry=None,
        )

    # -- what the readers report ---------------------------------------------------
    def observe(self, batch: Any, consumer: str | None = None) -> None:
        """Count ``batch`` as delivered to ``consumer`` and observe each row's latency."""
        labels = (batch.stream, consumer or "")
        self.batches.labels(*labels).inc()
        rows = list(batch)
        if rows:
            self.rows.labels(*labels).inc(len(rows))
            now = datetime.now(UTC)
            hist = self.latency.labels(*labels)
            for row in rows:
                hist.observe(max(0.0, (now - row.created_at).total_seconds()))

    def reset(self, stream: str, reason: str = "") -> None:
        """A subscription of ``stream`` reset (an ``on_reset`` hook)."""
        self.resets.labels(stream).inc()

    def failure(self, stream: str, error: Any = None) -> None:
        """An ``on()`` handler of ``stream`` stopped its subscription (an ``on_error`` hook)."""
        self.failures.labels(stream).inc()

    def track(self, subscription: Any) -> Any:
        """Report this subscription's delivered position and lag (labelled with
        its consumer) until :meth:`untrack`; returns it."""
        with self._lock:
            self._tracked[id(subscription)] = subscription
        return subscription

    def untrack(self, subscription: Any) -> None:
        with self._lock:
            self._tracked.pop(id(subscription), None)

    # -- prometheus_client ---------------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        return [*self._gauges(include=False), *self._counters()]

    def collect(self) -> Iterable[Metric]:
        return [*self._gauges(include=True), *self._counters()]

    def _counters(self) -> list[Metric]:
        counted: list[Counter | Histogram] = [self.rows, self.batches, self.latency, self.resets, self.failures]
        if self._connections:
            counted += [self.listener_reconnects, self.pool_reconnects]
        return [family for metric in counted for family in metric.collect()]

    def _positions(self) -> dict[tuple[str, str], tuple[Any, tuple[int, float] | None]]:
        """(stream, consumer) -> the least delivered position of its tracked
        subscriptions and the greatest lag (None: unknown)."""
        with self._lock:
            tracked = list(self._tracked.values())
        found: dict[tuple[str, str], tuple[Any, tuple[int, float] | None]] = {}
        for sub in tracked:
            pos = sub.position
            if pos is None:
                continue
            lag = sub.lag() if hasattr(sub, "lag") else None
            key = (sub.stream, getattr(sub, "consumer", None) or "")
            if key in found:
                other, other_lag = found[key]
                lags = [known for known in (lag, other_lag) if known is not None]
                pos, lag = min(pos, other), max(lags) if lags else None
            found[key] = (pos, lag)
        return found

    def _gauges(self, *, include: bool) -> list[GaugeMetricFamily]:
        labels = ["stream", "consumer"]
        position = GaugeMetricFamily(
            "pgfeed_reader_position_tick",
            "The tick of the delivered position (a partial position inside tick n reports n - 1).",
            labels=labels,
        )
        lag_ticks = GaugeMetricFamily(
            "pgfeed_reader_lag_ticks",
            "Ticks between the delivered position and the newest tick this reader knows (0: caught up).",
            labels=labels,
        )
        lag_seconds = GaugeMetricFamily(
            "pgfeed_reader_lag_seconds",
            "Seconds since this reader learned of the first tick it has not delivered (0: caught up).",
            labels=labels,
        )
        if include:
            for key, (pos, lag) in sorted(self._positions().items()):
                position.add_metric(list(key), float(pos.covered_tick))
                if lag is not None:
                    lag_ticks.add_metric(list(key), float(lag[0]))
                    lag_seconds.add_metric(list(key), lag[1])
        return [position, lag_ticks, lag_seconds]


#: The reader metrics of this process, one per registry, shared by every reader given that registry.
_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, ReaderMetrics] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def reader_metrics(option: CollectorRegistry | bool | None) -> ReaderMetrics | None:
    """The :class:`ReaderMetrics` a reader's ``metrics=`` option names (True:
    ``prometheus_client.REGISTRY``; None or False: none), registered in that
    registry the first time: every reader of the process given the same
    registry counts into the same series."""
    if option is None or option is False:
        return None
    registry = REGISTRY if option is True else option
    with _SHARED_LOCK:
        metrics = _SHARED.get(registry)
        if metrics is None:
            metrics = ReaderMetrics(connections=True)
            _register(registry, metrics)
            _SHARED[registry] = metrics
        return metrics


def _register(registry: CollectorRegistry, metrics: ReaderMetrics) -> None:
    try:
        registry.register(metrics)
    except ValueError as exc:
        raise UsageError(
            f"cannot register a reader's metrics: {exc}: a registry takes the metrics of a reader's metrics= "
            "or of one ReaderCollector, not both"
        ) from None


class ReaderCollector(ReaderMetrics):
    """Metrics of a reader (:class:`~pgfeed.AsyncReader` or
    :class:`~pgfeed.Reader`) wired by the application through the public API;
    prefer ``AsyncReader(..., metrics=registry)``, which counts every batch
    delivered, reconnects included, by itself. Use one or the other.

    ``registry``: where to register (default ``prometheus_client.REGISTRY``,
    the application's; None: not registered). Nothing is served unless
    :meth:`serve` is called. It reports the metrics of :class:`ReaderMetrics`
    but the reconnects, per stream (and consumer):

    * the delivered position's tick and lag, for every subscription passed
      to :meth:`track`, and the position for every stream passed to
      :meth:`watch` (``reader.position``);
    * rows and batches delivered and the append-to-delivery latency, for the
      batches passed to :meth:`observe` (or handled by a :meth:`handler`);
    * resets and handler failures (``on_reset``/``on_error`` hooks).
    """

    def __init__(self, reader: _ReaderLike, *, registry: CollectorRegistry | None = REGISTRY) -> None:
        super().__init__(connections=False)
        self._reader = reader
        self._registry = registry
        self._watched: set[str] = set()
        if registry is not None:
            _register(registry, self)
        reader.on_reset(self.reset)
        reader.on_error(self.failure)

    def watch(self, stream: str) -> None:
        """Report ``reader.position(stream)`` (consumer label empty)."""
        with self._lock:
            self._watched.add(stream)

    def observe(self, batch: Any, consumer: str | None = None) -> None:
        """Count ``batch`` as delivered (call it once the application handled it)."""
        super().observe(batch, consumer)
        self.watch(batch.stream)

    def handler(self, fn: Callable[[Any], Any], consumer: str | None = None) -> Callable[[Any], Any]:
        """``fn`` for ``reader.on(...)``, counting each batch once ``fn`` returned."""
        if inspect.iscoroutinefunction(fn):

            async def counted_async(batch: Any) -> Any:
                result = await fn(batch)
                self.observe(batch, consumer)
                return result

            return counted_async

        def counted(batch: Any) -> Any:
            result = fn(batch)
            self.observe(batch, consumer)
            return result

        return counted

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:  # noqa: S104
        """Serve the registry this collector is in on ``http://addr:port/metrics``."""
        if self._registry is None:
            raise PgfeedError("this ReaderCollector is in no registry: pass registry= to serve it")
        return serve(self._registry, port, addr)

    def _positions(self) -> dict[tuple[str, str], tuple[Any, tuple[int, float] | None]]:
        found = super()._positions()
        with self._lock:
            watched = sorted(self._watched)
        for stream in watched:
            if (stream, "") in found:
                continue
            try:
                pos = self._reader.position(stream)
            except PgfeedError:
                continue  # closed or forked reader: nothing to report
            if pos is not None:
                found[(stream, "")] = (pos, None)
        return found
