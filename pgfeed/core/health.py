"""What ``pgfeed status`` and ``pgfeed check`` decide and print. No I/O.

:mod:`pgfeed.status` reads the database into the dataclasses below; this
module turns them into consumer states, health problems (each a one-line
reason), a text report and a JSON document. Every age is measured on the
server's clock (``Status.now``), never the client's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from typing import Any

from pgfeed.core.durations import parse_duration
from pgfeed.core.positions import Position
from pgfeed.errors import TokenError, UsageError

#: Consumer states, in the order a report sorts them (worst first).
STATES = ("stalled", "reset pending", "gone", "live", "idle")

#: ``application_name`` of pgfeed's sessions:
#: ``pgfeed <kind> [pid=<pid>] [<stream>,...[,+<n>]] [consumer=<name>]``.
APP_PREFIX = "pgfeed"
#: PostgreSQL keeps the first NAMEDATALEN - 1 bytes of an application_name.
APP_NAME_BYTES = 63
#: Ends a consumer name cut to fit in an application_name.
CUT_MARK = "\u2026"

#: How long rows may wait for a tick, whoever ticks, before the ticker counts as dead (seconds).
DEFAULT_MAX_TICK_AGE = 30.0
#: How far behind a consumer may be before it counts as stalled (seconds).
DEFAULT_MAX_LAG = 300.0
#: Open transactions younger than this are not named as holding anything back (seconds).
DEFAULT_LONG_XACT = 30.0
#: A consumer seen (moved, or heartbeat) within this is live (seconds).
DEFAULT_SEEN_WITHIN = 60.0


@dataclass(frozen=True)
class Thresholds:
    """When ``status`` and ``check`` call something unhealthy (seconds)."""

    max_lag: float = DEFAULT_MAX_LAG
    #: Per-consumer ``max_lag``, by consumer name.
    lag_overrides: dict[str, float] = field(default_factory=dict)
    max_tick_age: float = DEFAULT_MAX_TICK_AGE
    long_xact: float = DEFAULT_LONG_XACT
    seen_within: float = DEFAULT_SEEN_WITHIN

    def lag_limit(self, consumer: str) -> float:
        """The lag threshold of ``consumer``."""
        return self.lag_overrides.get(consumer, self.max_lag)


def parse_max_lag(values: Iterable[str], default: float = DEFAULT_MAX_LAG) -> tuple[float, dict[str, float]]:
    """``--max-lag`` values: ``DURATION`` (every consumer) or ``CONSUMER=DURATION``
    (one consumer; the last ``=`` splits, so names may hold one). Later values win."""
    overall = default
    overrides: dict[str, float] = {}
    for text in values:
        name, sep, duration = text.rpartition("=")
        seconds = parse_duration(duration)
        if not sep:
            overall = seconds
        elif not name:
            raise UsageError(f"invalid --max-lag {text!r}: expected DURATION or CONSUMER=DURATION, e.g. billing=10m")
        else:
            overrides[name] = seconds
    return overall, overrides


def check_lag_overrides(thresholds: Thresholds, consumers: Iterable[str], *, some_streams: bool = False) -> None:
    """:class:`UsageError` when a per-consumer ``--max-lag`` names no consumer
    among ``consumers`` (those of the streams reported: ``some_streams``):
    a typo would otherwise silently leave the real consumer at the default."""
    known = sorted(set(consumers))
    unknown = sorted(name for name in thresholds.lag_overrides if name not in known)
    if not unknown:
        return
    where = "of the streams shown" if some_streams else "saved in this database"
    listed = f"the consumers {where} are {', '.join(known)}" if known else f"no consumer is {where}"
    raise UsageError(f"--max-lag names unknown consumer {unknown[0]!r}: {listed}")


# -- what the database says ------------------------------------------------------
@dataclass(frozen=True)
class AppName:
    """A parsed pgfeed ``application_name``."""

    kind: str
    streams: tuple[str, ...] = ()
    consumer: str | None = None
    #: The process id of the program that named the session (None: not said).
    pid: int | None = None
    #: How many followed streams were left out to fit (``+n``).
    more_streams: int = 0
    #: True when the consumer name was cut to fit: :attr:`consumer` is how it begins.
    consumer_cut: bool = False

    def holds(self, consumer: str, stream: str) -> bool:
        """Whether the session says it reads ``stream`` as ``consumer`` (an
        empty stream list, or one that had to leave streams out, covers any)."""
        if self.consumer is None:
            return False
        named = consumer.startswith(self.consumer) if self.consumer_cut else consumer == self.consumer
        return named and (not self.streams or self.more_streams > 0 or stream in self.streams)


def make_application_name(
    kind: str, streams: Sequence[str] = (), consumer: str | None = None, *, pid: int | None = None
) -> str:
    """``pgfeed reader pid=4711 orders,audit consumer=billing``, within the 63
    bytes PostgreSQL keeps: what does not fit is left out visibly, never cut
    silently. The streams go first (the last ones become ``+n``), then the
    consumer name is cut and ends with :data:`CUT_MARK`."""
    head = f"{APP_PREFIX} {kind}" + ("" if pid is None else f" pid={pid}")
    tail = "" if consumer is None else f" consumer={consumer}"
    for shown in range(len(streams), -1, -1):
        left_out = len(streams) - shown
        listed = [*streams[:shown], *([f"+{left_out}"] if left_out else [])]
        text = head + (" " + ",".join(listed) if listed else "") + tail
        if len(text.encode()) <= APP_NAME_BYTES:
            return text
    assert consumer is not None  # the head alone always fits
    text = head + (f" +{len(streams)}" if streams else "") + " consumer="
    room = APP_NAME_BYTES - len(text.encode()) - len(CUT_MARK.encode())
    return text + consumer.encode()[:room].decode(errors="ignore") + CUT_MARK


def parse_application_name(name: str | None) -> AppName | None:
    """The parts of a name made by :func:`make_application_name`; None for
    anything else (``pgfeed ticker`` parses as kind ``ticker``)."""
    if not name:
        return None
    words = name.split(" ")
    if len(words) < 2 or words[0] != APP_PREFIX or not words[1]:
        return None
    rest = words[2:]
    pid = None
    if rest and rest[0].startswith("pid=") and rest[0][4:].isdigit():
        pid = int(rest[0][4:])
        rest = rest[1:]
    streams: list[str] = []
    more = 0
    if rest and not rest[0].startswith("consumer="):
        for item in rest[0].split(","):
            if item.startswith("+") and item[1:].isdigit():
                more += int(item[1:])
            elif item:
                streams.append(item)
        rest = rest[1:]
    consumer = None
    cut = False
    if rest and rest[0].startswith("consumer="):
        # A consumer name may hold spaces: it runs to the end.
        consumer = " ".join(rest).removeprefix("consumer=")
        cut = consumer.endswith(CUT_MARK)
        consumer = consumer.removesuffix(CUT_MARK)
    return AppName(words[1], tuple(streams), consumer or None, pid, more, cut)


def widen_xid(xid32: int, reference: int) -> int:
    """A 32-bit xid (``pg_stat_activity.backend_xid``) as the 64-bit xid8 it
    stands for, given a recent xid8 at or after it (the server's snapshot xmax)."""
    epoch, low = divmod(reference, 2**32)
    if xid32 > low:
        epoch -= 1
    return max(epoch, 0) * 2**32 + xid32


@dataclass(frozen=True)
class Session:
    """A backend as ``pg_stat_activity`` shows it to the caller (None: hidden
    from this role; grant it ``pg_monitor`` to see other users' sessions)."""

    pid: int
    datname: str | None = None
    usename: str | None = None
    application_name: str | None = None
    client_addr: str | None = None
    backend_start: datetime | None = None
    xact_start: datetime | None = None
    state: str | None = None
    query: str | None = None
    #: The session's transaction id, widened to 64 bits (None: it has none).
    backend_xid: int | None = None
    #: How many transactions old the horizon it holds back is: the older of
    #: its snapshot's xmin and its own xid (None: it holds neither).
    xmin_age: int | None = None

    @property
    def app(self) -> AppName | None:
        """Its parsed pgfeed application name, if it has one."""
        return parse_application_name(self.application_name)


@dataclass(frozen=True)
class TickerStatus:
    """The ticker lease and the newest tick."""

    term: int = 0
    holder: str | None = None
    kind: str | None = None
    backend_pid: int | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    expires_at: datetime | None = None
    live: bool = False
    head_tick: int | None = None
    head_taken_at: datetime | None = None
    ticks_last_minute: int = 0
    #: Why no tick can be taken on this database (a restore that needs
    #: ``pgfeed repair --after-restore``); None when ticks can continue.
    history_break: str | None = None

    @property
    def ticks_per_second(self) -> float:
        """Ticks per second over the last minute."""
        return self.ticks_last_minute / 60.0


@dataclass(frozen=True)
class Writer:
    """An open transaction that wrote to a stream (it holds a RowExclusiveLock
    on the stream's partition): its rows are delivered when it commits, after
    the ``committed_after`` rows of later transactions that committed first."""

    stream: str
    session: Session
    committed_after: int | None = None


@dataclass(frozen=True)
class StreamStatus:
    """One stream: settings, size, write rate, backlog, captures, open writers."""

    id: int
    name: str
    notify_mode: str
    max_payload_bytes: int
    created_tick: int
    floor_tick: int
    created_at: datetime | None
    rows: int
    bytes: int
    #: Rows appended within ``recent_window`` seconds.
    recent_rows: int
    oldest_kept: datetime | None
    last_append: datetime | None
    #: Committed rows no tick covers yet (the ticker's backlog).
    pending_rows: int
    #: When the oldest of those was appended.
    pending_since: datetime | None
    captures: tuple[str, ...] = ()
    head: int | None = None
    recent_window: float = 60.0
    writers: tuple[Writer, ...] = ()

    @property
    def rows_per_second(self) -> float:
        """Rows appended per second over ``recent_window``."""
        return self.recent_rows / self.recent_window


@dataclass(frozen=True)
class ConsumerStatus:
    """A saved consumer position (one role's consumer on one stream) and how it is doing."""

    owner: str
    consumer: str
    stream: str
    token: str
    updated_at: datetime | None
    seen_at: datetime | None
    seen_by: str | None
    #: Rows after the position (None: not computable: gone, unreadable token, pruned tick).
    lag_rows: int | None
    #: Seconds since the oldest undelivered row was appended (at most since the position's tick).
    lag_seconds: float | None
    state: str
    #: Why the state is "reset pending" or "gone", or why lag is unknown.
    reason: str | None = None
    #: pgfeed sessions that name this consumer in their application_name.
    held_by: tuple[Session, ...] = ()

    @property
    def last_seen(self) -> datetime | None:
        """The later of its last move and its last heartbeat."""
        seen = [t for t in (self.updated_at, self.seen_at) if t is not None]
        return max(seen) if seen else None


@dataclass(frozen=True)
class ReaderPosition:
    """A saved consumer that a live reader holds: where it is, how far behind."""

    consumer: str
    stream: str
    token: str
    lag_rows: int | None
    lag_seconds: float | None
    state: str


@dataclass(frozen=True)
class LiveReader:
    """A process following streams now, as its sessions' application names say
    (see :func:`make_application_name`)."""

    #: Its process id on its host (None: its sessions' names do not say).
    pid: int | None
    #: Its client address (None: a local socket, or hidden from this role).
    host: str | None
    usename: str | None
    application_names: tuple[str, ...]
    streams: tuple[str, ...]
    #: How many more streams it follows than :attr:`streams` (left out of its names to fit).
    more_streams: int
    #: The consumers its names carry (a cut name ends with :data:`CUT_MARK`).
    consumers: tuple[str, ...]
    #: The pids of its backends.
    backends: tuple[int, ...]
    #: The saved consumers it holds, with their position and lag.
    positions: tuple[ReaderPosition, ...] = ()


@dataclass(frozen=True)
class XminHolder:
    """Something holding back the xmin horizon (vacuum of pruned rows, the
    lease and position rows): an old transaction, a prepared transaction or a
    replication slot."""

    kind: str  # "session", "prepared" or "slot"
    name: str
    xmin_age: int | None
    age_seconds: float | None = None
    session: Session | None = None


@dataclass(frozen=True)
class Status:
    """Everything ``pgfeed status`` reports, as of ``now`` (the server's clock)."""

    now: datetime
    schema_version: int | None
    ticker: TickerStatus
    streams: list[StreamStatus]
    consumers: list[ConsumerStatus]
    sessions: list[Session] = field(default_factory=list)
    xmin_holders: list[XminHolder] = field(default_factory=list)
    #: Why the report is incomplete (a privilege it lacks), if it is.
    notes: list[str] = field(default_factory=list)

    @property
    def readers(self) -> list[Session]:
        """The sessions that say they are pgfeed readers."""
        return [s for s in self.sessions if s.app is not None and s.app.kind == "reader"]

    @property
    def pending_rows(self) -> int:
        return sum(s.pending_rows for s in self.streams)


def live_readers(status: Status) -> list[LiveReader]:
    """The reader sessions grouped by process: by the pid their names carry
    (by name when they carry none), client address and user."""
    groups: dict[tuple[str | None, str | None, int | str | None], list[tuple[Session, AppName]]] = {}
    for s in status.sessions:
        app = s.app
        if app is not None and app.kind == "reader":
            who = app.pid if app.pid is not None else s.application_name
            groups.setdefault((s.client_addr, s.usename, who), []).append((s, app))
    out = []
    for (host, user, _), members in groups.items():
        apps = [app for _, app in members]
        backends = {s.pid for s, _ in members}
        out.append(
            LiveReader(
                pid=apps[0].pid,
                host=host,
                usename=user,
                application_names=tuple(sorted({s.application_name or "" for s, _ in members})),
                streams=tuple(sorted({stream for app in apps for stream in app.streams})),
                more_streams=max(app.more_streams for app in apps),
                consumers=tuple(
                    sorted({app.consumer + (CUT_MARK if app.consumer_cut else "") for app in apps if app.consumer})
                ),
                backends=tuple(sorted(backends)),
                positions=tuple(
                    ReaderPosition(c.consumer, c.stream, c.token, c.lag_rows, c.lag_seconds, c.state)
                    for c in status.consumers
                    if any(h.pid in backends for h in c.held_by)
                ),
            )
        )
    return sorted(out, key=lambda r: (r.host or "", r.pid or 0, r.backends))


# -- decisions --------------------------------------------------------------
def age(now: datetime, then: datetime | None) -> float | None:
    """Seconds from ``then`` to ``now`` (never negative), None without ``then``."""
    if then is None:
        return None
    return max(0.0, (now - then).total_seconds())


def reset_reason(
    token: str, *, stream_exists: bool, created_tick: int | None, floor_tick: int | None, head: int | None
) -> str | None:
    """Why a reader resuming from saved ``token`` will reset (or cannot resume), or None.

    The same tests as the reader's: a position older than the stream's
    current incarnation, or pruned past (a partial position needs its
    interval), or beyond the newest tick (the database was replaced)."""
    if not stream_exists:
        return "the stream no longer exists"
    try:
        pos = Position.parse(token)
    except TokenError as exc:
        return f"the saved token cannot be resumed: {exc}"
    if created_tick is not None and pos.tick < created_tick:
        return "the saved position is older than the stream's current incarnation (dropped and recreated)"
    if floor_tick is not None and (pos.tick < floor_tick or (not pos.complete and pos.tick <= floor_tick)):
        return "the saved position is older than what the stream still holds (pruned)"
    if head is not None and pos.tick > head:
        return f"the saved position is beyond the newest tick {head} (was the database replaced?)"
    return None


def lag_seconds(
    now: datetime, lag_rows: int | None, oldest_undelivered: datetime | None, position_taken_at: datetime | None
) -> float | None:
    """How long the oldest undelivered row has waited: since it was appended,
    but not before the position's tick was taken (every row after a tick
    committed after it, so a long transaction's early append time does not
    count); 0 when caught up."""
    if lag_rows is None:
        return None
    if lag_rows == 0:
        return 0.0
    known = [t for t in (oldest_undelivered, position_taken_at) if t is not None]
    return age(now, max(known)) if known else None


def consumer_state(
    *,
    reason: str | None,
    gone: bool,
    lag_rows: int | None,
    lag_seconds: float | None,
    last_seen_age: float | None,
    held: bool,
    max_lag: float,
    seen_within: float,
) -> str:
    """``gone`` (its stream was dropped), ``reset pending`` (it will reset when
    it resumes), ``stalled`` (behind by more than ``max_lag``), ``live`` (a
    session holds it, or it moved or sent a heartbeat within ``seen_within``),
    else ``idle``."""
    if gone:
        return "gone"
    if reason is not None:
        return "reset pending"
    if lag_rows and lag_seconds is not None and lag_seconds > max_lag:
        return "stalled"
    if held or (last_seen_age is not None and last_seen_age <= seen_within):
        return "live"
    return "idle"


def ticker_refusal(ticker: TickerStatus) -> str | None:
    """One line when the ticker refuses to tick on this database (a restore
    that needs ``pgfeed repair --after-restore``); None when ticks can continue."""
    if ticker.history_break is None:
        return None
    return f"ticker refuses to tick: {ticker.history_break}"


def ticker_problem(status: Status, thresholds: Thresholds) -> str | None:
    """One line when the ticker refuses to tick (:func:`ticker_refusal`) or
    committed rows wait for a tick that nobody takes: no live lease and the
    newest tick older than ``max_tick_age`` (dead), or a live lease but rows
    waiting longer than that (stuck). None otherwise: an idle database
    without a ticker is healthy."""
    t = status.ticker
    refusal = ticker_refusal(t)
    if refusal is not None:
        return refusal
    pending = status.pending_rows
    if pending == 0:
        return None
    last = age(status.now, t.head_taken_at)
    last_text = "no tick was ever taken" if last is None else f"the newest tick ({t.head_tick}) is {fmt_age(last)} old"
    if not t.live:
        if last is not None and last <= thresholds.max_tick_age:
            return None
        beat = age(status.now, t.heartbeat_at)
        who = f"; last holder {t.holder!r}, heartbeat {fmt_age(beat)} ago" if t.holder and beat is not None else ""
        return (
            f"ticker dead: no live lease{who}, {last_text} and {pending} committed rows wait for one; "
            "start `pgfeed daemon`"
        )
    since = [s.pending_since for s in status.streams if s.pending_rows and s.pending_since is not None]
    waited = age(status.now, max([*since, *([t.head_taken_at] if t.head_taken_at else [])], default=status.now))
    if waited is not None and waited > thresholds.max_tick_age:
        return (
            f"ticker stuck: {t.kind} {t.holder!r} holds the lease (term {t.term}) but {pending} committed rows "
            f"have waited {fmt_age(waited)} for a tick; {last_text}"
        )
    return None


def consumer_problems(status: Status, thresholds: Thresholds) -> list[str]:
    """One line per stalled consumer."""
    out = []
    for c in status.consumers:
        if c.state == "stalled" and c.lag_seconds is not None:
            out.append(
                f"consumer {c.consumer!r} (role {c.owner}) on stream {c.stream!r} is stalled: {c.lag_rows} rows, "
                f"{fmt_age(c.lag_seconds)} behind (max {fmt_age(thresholds.lag_limit(c.consumer))})"
            )
    return out


def problems(status: Status, thresholds: Thresholds) -> list[str]:
    """Everything that makes ``pgfeed status`` exit non-zero, one line each."""
    ticker = ticker_problem(status, thresholds)
    return ([ticker] if ticker else []) + consumer_problems(status, thresholds)


def check_problems(status: Status, thresholds: Thresholds, *, expected_version: int) -> list[str]:
    """What ``pgfeed check`` fails on: the schema not at ``expected_version``,
    no live ticker (stricter than ``status``: even with nothing pending), a
    consumer past its lag threshold."""
    out = []
    if status.schema_version != expected_version:
        out.append(
            f"the pgfeed schema is at version {status.schema_version or 0}, this pgfeed expects "
            f"{expected_version}: run `pgfeed migrate`"
        )
    t = status.ticker
    refusal = ticker_refusal(t)
    if refusal is not None:
        out.append(refusal)
    elif not t.live:
        beat = age(status.now, t.heartbeat_at)
        last = f" (last holder {t.holder!r}, heartbeat {fmt_age(beat)} ago)" if t.holder and beat is not None else ""
        out.append(f"no live ticker: nobody holds the ticker lease{last}; start `pgfeed daemon`")
    else:
        stuck = ticker_problem(status, thresholds)
        if stuck:
            out.append(stuck)
    return out + consumer_problems(status, thresholds)


def one_line(found: Sequence[str]) -> str:
    """Problems as the one line a probe or script reads."""
    if len(found) <= 1:
        return "".join(found)
    return f"{found[0]} (and {len(found) - 1} more: {'; '.join(found[1:])})"


def check_summary(status: Status) -> str:
    """The line ``pgfeed check`` prints when healthy."""
    t = status.ticker
    who = f"{t.kind} {t.holder!r}, term {t.term}" if t.live else "none"
    return (
        f"ok: schema version {status.schema_version}, ticker {who}, {len(status.streams)} streams, "
        f"{len(status.consumers)} consumers within their lag"
    )


# -- formatting ----------------------------------------------------------------
def fmt_age(seconds: float | None) -> str:
    """``850ms``, ``4.2s``, ``3m12s``, ``5h02m``, ``3d04h``; ``-`` for None."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n: int) -> str:
    """``812 B``, ``96 kB``, ``3.4 MB``, ``1.2 GB`` (powers of 1024)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "kB") else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    lines = [list(header), *[list(r) for r in rows]]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def _who(s: Session) -> str:
    parts = [p for p in (s.application_name or None, s.usename, s.client_addr) if p]
    return f"pid {s.pid}" + (f" ({', '.join(parts)})" if parts else "")


def _query(text: str | None, limit: int = 80) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def format_ticker(status: Status) -> list[str]:
    t = status.ticker
    now = status.now
    if t.live:
        lines = [
            f"ticker: {t.kind} {t.holder!r} (backend pid {t.backend_pid}), term {t.term}, leading since "
            f"{fmt_age(age(now, t.started_at))} ago; heartbeat {fmt_age(age(now, t.heartbeat_at))} ago, "
            f"lease expires in {fmt_age(max(0.0, (t.expires_at - now).total_seconds()) if t.expires_at else None)}"
        ]
    elif t.holder:
        lines = [
            f"ticker: NONE: the lease is free (last holder {t.kind} {t.holder!r}, term {t.term}, heartbeat "
            f"{fmt_age(age(now, t.heartbeat_at))} ago)"
        ]
    else:
        lines = ["ticker: NONE: no ticker has ever held the lease"]
    if t.history_break is not None:
        lines.append(f"  REFUSES TO TICK: {t.history_break}")
    if t.head_tick is None:
        lines.append("  no tick yet")
    else:
        lines.append(
            f"  newest tick {t.head_tick}, {fmt_age(age(now, t.head_taken_at))} ago; "
            f"{t.ticks_per_second:.2f} ticks/s over the last minute; "
            f"{status.pending_rows} committed rows wait for a tick"
        )
    return lines


def _lag_text(c: ConsumerStatus) -> tuple[str, str]:
    return ("-" if c.lag_rows is None else str(c.lag_rows), fmt_age(c.lag_seconds))


def format_text(status: Status, thresholds: Thresholds) -> str:
    """The report ``pgfeed status`` prints on a terminal."""
    now = status.now
    out = [f"pgfeed status at {now.isoformat(timespec='seconds')} (schema version {status.schema_version})"]
    out += format_ticker(status)
    out.append("")
    if status.streams:
        out.append("streams:")
        rows = [
            (
                s.name,
                str(s.rows),
                fmt_bytes(s.bytes),
                f"{s.rows_per_second:.2f}",
                str(s.head if s.head is not None else "-"),
                fmt_age(age(now, s.last_append)),
                s.notify_mode,
                str(s.max_payload_bytes),
                str(s.pending_rows),
                fmt_age(age(now, s.oldest_kept)),
                ",".join(s.captures) or "-",
            )
            for s in status.streams
        ]
        out += _table(
            (
                "NAME",
                "ROWS",
                "SIZE",
                "ROWS/S",
                "HEAD",
                "LAST APPEND",
                "NOTIFY",
                "MAX PAYLOAD",
                "PENDING",
                "OLDEST KEPT",
                "CAPTURES",
            ),
            rows,
        )
    else:
        out.append("streams: none")
    out.append("")
    if status.consumers:
        out.append("consumers:")
        crow = []
        for c in status.consumers:
            lag_rows, lag = _lag_text(c)
            crow.append(
                (
                    c.consumer,
                    c.owner,
                    c.stream,
                    c.token,
                    lag_rows,
                    lag,
                    fmt_age(age(now, c.last_seen)),
                    "yes" if c.seen_at else "-",
                    c.state + (f" ({c.reason})" if c.reason else ""),
                )
            )
        out += _table(
            ("CONSUMER", "ROLE", "STREAM", "POSITION", "LAG ROWS", "LAG", "LAST SEEN", "HEARTBEAT", "STATE"), crow
        )
    else:
        out.append("consumers: none saved")
    out.append("")
    out += format_live_readers(status)
    writers = [w for s in status.streams for w in s.writers]
    if writers:
        out.append("")
        out.append("open transactions that wrote to a stream (their rows come when they commit):")
        for w in writers:
            s = w.session
            after = "" if w.committed_after is None else f"; {w.committed_after} rows of later transactions committed"
            out.append(
                f"  {w.stream}: {_who(s)} {s.state or '?'} for {fmt_age(age(now, s.xact_start))}, "
                f"xid {s.backend_xid}{after}; query: {_query(s.query)}"
            )
    if status.xmin_holders:
        out.append("")
        out.append(f"holding back the xmin horizon (open for more than {fmt_age(thresholds.long_xact)}):")
        for h in status.xmin_holders:
            detail = f"{_who(h.session)} {h.session.state or '?'}" if h.session else f"{h.kind} {h.name}"
            out.append(
                f"  {detail}: xmin {h.xmin_age} transactions old"
                + (f", for {fmt_age(h.age_seconds)}" if h.age_seconds is not None else "")
                + (f"; query: {_query(h.session.query)}" if h.session else "")
            )
    for note in status.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def format_live_readers(status: Status) -> list[str]:
    """The live readers: one line per process and saved consumer it holds."""
    readers = live_readers(status)
    if not readers:
        return ["live readers: none (no session named 'pgfeed reader ...')"]
    rows = []
    for r in readers:
        follows = ",".join(r.streams) + (f",+{r.more_streams}" if r.more_streams else "")
        who = (str(r.pid) if r.pid is not None else "-", r.host or "local", r.usename or "-")
        end = ",".join(map(str, r.backends))
        for p in r.positions:
            lag_rows, lag = ("-" if p.lag_rows is None else str(p.lag_rows), fmt_age(p.lag_seconds))
            rows.append((*who, follows or "-", f"{p.consumer} ({p.stream})", p.token, lag_rows, lag, end))
        if not r.positions:
            rows.append((*who, follows or "-", ",".join(r.consumers) or "-", "-", "-", "-", end))
    sessions = sum(len(r.backends) for r in readers)
    return [
        f"live readers: {len(readers)} processes, {sessions} sessions",
        *_table(("PID", "HOST", "USER", "STREAMS", "CONSUMER", "POSITION", "LAG ROWS", "LAG", "BACKENDS"), rows),
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def to_json(status: Status, thresholds: Thresholds) -> dict[str, Any]:
    """The complete report as JSON-ready data: every field, ages in seconds,
    the consumers' states and the problems that decide the exit code."""
    now = status.now
    doc: dict[str, Any] = _jsonable(status)
    t = status.ticker
    doc["ticker"].update(
        heartbeat_age=age(now, t.heartbeat_at),
        head_age=age(now, t.head_taken_at),
        expires_in=None if t.expires_at is None else (t.expires_at - now).total_seconds(),
        ticks_per_second=t.ticks_per_second,
        pending_rows=status.pending_rows,
    )
    for out, s in zip(doc["streams"], status.streams, strict=True):
        out.update(
            rows_per_second=s.rows_per_second,
            last_append_age=age(now, s.last_append),
            oldest_kept_age=age(now, s.oldest_kept),
        )
    for out, c in zip(doc["consumers"], status.consumers, strict=True):
        out.update(
            last_seen=_jsonable(c.last_seen),
            last_seen_age=age(now, c.last_seen),
            max_lag=thresholds.lag_limit(c.consumer),
        )
    doc["readers"] = _jsonable(live_readers(status))
    found = problems(status, thresholds)
    doc["healthy"] = not found
    doc["problems"] = found
    return doc
