"""Read the state of a pgfeed database: the ticker, streams, consumers, the
sessions that follow or hold something back. Sync psycopg, read-only.

:func:`gather` returns a :class:`~pgfeed.core.health.Status` (the dataclasses
and every decision — consumer states, problems, formatting — live in
:mod:`pgfeed.core.health`); :func:`check` is ``pgfeed check``'s verdict.

Privileges: the schema owner, or a role granted ``pg_monitor`` (PostgreSQL's
monitoring role: ``GRANT pg_monitor TO monitoring``). The counts come from
``SECURITY DEFINER`` functions of migration 0006 that return aggregates only
(saved positions of every role, despite their row-level security); sessions
are read from ``pg_stat_activity`` and ``pg_locks`` as the caller, who sees
other users' sessions with ``pg_monitor`` (or ``pg_read_all_stats``) only.
All of it is read in one REPEATABLE READ READ ONLY transaction, so the
numbers agree with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgfeed.core.health import (
    ConsumerStatus,
    Session,
    Status,
    StreamStatus,
    Thresholds,
    TickerStatus,
    Writer,
    XminHolder,
    age,
    check_problems,
    consumer_state,
    lag_seconds,
    reset_reason,
    widen_xid,
)
from pgfeed.core.names import check_stream_name
from pgfeed.errors import MigrationError, NotMigrated, PermissionDenied, PgfeedError, UnknownStream, translate
from pgfeed.execute import tuples
from pgfeed.queries import query, template

Conn = psycopg.Connection[Any]

#: The window of "rows/s recently" (seconds).
RECENT = 60.0

__all__ = [
    "CheckResult",
    "ConsumerStatus",
    "Session",
    "Status",
    "StreamStatus",
    "Thresholds",
    "TickerStatus",
    "Writer",
    "XminHolder",
    "check",
    "expected_version",
    "gather",
]


def _sessions(statement: sql.SQL) -> sql.Composed:
    """``statement`` with its ``{columns}`` filled with a session's columns."""
    return statement.format(columns=template("session_columns"))


def _q(conn: Conn, statement: str | sql.Composed, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return tuples(conn, statement, params).fetchall()


def _error(exc: psycopg.Error, doing: str) -> PgfeedError:
    if isinstance(exc, psycopg.errors.UndefinedFunction) and "status_" in str(exc):
        return NotMigrated("the pgfeed schema predates `pgfeed status` (migration 0006): run `pgfeed migrate`")
    err = translate(exc, doing)
    if isinstance(err, PermissionDenied):
        return PermissionDenied(
            f"{err}; reading pgfeed's status needs the schema owner or a role granted pg_monitor "
            "(GRANT pg_monitor TO <role>)"
        )
    return err


#: The schema version from which the database can say why ticks cannot continue.
HISTORY_CHECKED = 7


def schema_version(conn: Conn) -> int | None:
    """The newest applied migration; None when pgfeed is not installed."""
    row = _q(conn, query("has_schema_version"))
    if not row or not row[0][0]:
        return None
    found = _q(conn, query("schema_version"))
    return None if found[0][0] is None else int(found[0][0])


def expected_version() -> int:
    """The newest migration this pgfeed ships."""
    from pgfeed.migrator import load_migrations

    return max((m.version for m in load_migrations()), default=0)


def _session(row: Sequence[Any], reference: int) -> Session:
    pid, datname, usename, app, addr, started, xact, state, query, xid, xmin_age = row
    return Session(
        pid=int(pid),
        datname=datname,
        usename=usename,
        application_name=app,
        client_addr=addr,
        backend_start=started,
        xact_start=xact,
        state=state,
        query=query,
        backend_xid=None if xid is None else widen_xid(int(xid), reference),
        xmin_age=None if xmin_age is None else int(xmin_age),
    )


def gather(
    conn: Conn,
    streams: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    *,
    sessions: bool = True,
) -> Status:
    """The status of the database ``conn`` is connected to.

    ``streams``: only these streams and their consumers (:class:`UnknownStream`
    for one that does not exist). ``sessions=False`` leaves out
    ``pg_stat_activity`` (pgfeed sessions, open writers, xmin holders).
    Raises :class:`NotMigrated` on a database without migration 0006 and
    :class:`PermissionDenied` naming the grant it needs.
    """
    thresholds = thresholds or Thresholds()
    names = None if streams is None else [check_stream_name(s) for s in streams]
    try:
        with conn.transaction():
            conn.execute(query("set_transaction_repeatable_read_only"))
            conn.execute(query("set_local_jit_off"))
            return _gather(conn, names, thresholds, sessions)
    except psycopg.Error as exc:
        raise _error(exc, "reading pgfeed's status") from None


def _gather(conn: Conn, names: list[str] | None, thresholds: Thresholds, with_sessions: bool) -> Status:
    version = schema_version(conn)
    if version is None:
        raise NotMigrated()
    (trow,) = _q(conn, query("status_ticker"))
    now: datetime = trow[0]
    reference = int(str(trow[-1]))
    ticker = TickerStatus(
        term=int(trow[1]),
        holder=trow[2],
        kind=trow[3],
        backend_pid=trow[4],
        started_at=trow[5],
        heartbeat_at=trow[6],
        expires_at=trow[7],
        live=bool(trow[8]),
        head_tick=None if trow[9] is None else int(trow[9]),
        head_taken_at=trow[10],
        ticks_last_minute=int(trow[11]),
        history_break=_q(conn, query("history_break"))[0][0] if version >= HISTORY_CHECKED else None,
    )
    srows = _q(conn, query("status_streams"), (names, RECENT))
    found = {r[1] for r in srows}
    missing = [n for n in names or [] if n not in found]
    if missing:
        raise UnknownStream(f"unknown stream {missing[0]!r}: create it with `pgfeed stream create {missing[0]}`")
    stream_list = [
        StreamStatus(
            id=int(r[0]),
            name=r[1],
            notify_mode=r[3],
            max_payload_bytes=int(r[4]),
            created_tick=int(r[5]),
            floor_tick=int(r[6]),
            created_at=r[7],
            rows=int(r[8]),
            bytes=int(r[9]),
            recent_rows=int(r[10]),
            oldest_kept=r[11],
            last_append=r[12],
            pending_rows=int(r[13]),
            pending_since=r[14],
            captures=tuple(r[15] or ()),
            head=ticker.head_tick,
            recent_window=RECENT,
        )
        for r in srows
    ]
    partitions = {int(r[2]): r[1] for r in srows if r[2] is not None}
    status = Status(now=now, schema_version=version, ticker=ticker, streams=stream_list, consumers=[])
    notes: list[str] = []
    session_list: list[Session] = []
    holders: list[XminHolder] = []
    if with_sessions:
        stream_list = _with_writers(conn, now, stream_list, partitions, reference, thresholds, notes)
        session_list = [_session(r, reference) for r in _q(conn, _sessions(template("pgfeed_sessions")))]
        holders = _xmin_holders(conn, now, reference, thresholds, notes)
    consumers = _consumers(conn, names, status, session_list, thresholds)
    return replace(
        status, streams=stream_list, consumers=consumers, sessions=session_list, xmin_holders=holders, notes=notes
    )


def _with_writers(
    conn: Conn,
    now: datetime,
    streams: list[StreamStatus],
    partitions: dict[int, str],
    reference: int,
    thresholds: Thresholds,
    notes: list[str],
) -> list[StreamStatus]:
    """Name the open transactions that wrote to each stream (holdback blame)."""
    if not partitions:
        return streams
    by_name = {s.name: s for s in streams}
    found: list[tuple[str, Session]] = []
    hidden = False
    for row in _q(conn, _sessions(template("stream_writers")), (list(partitions),)):
        session = _session(row[1:], reference)
        if session.query == "<insufficient privilege>" or session.usename is None:
            hidden = True
        elif session.backend_xid is None:
            continue  # locked the partition but wrote nothing (yet)
        open_for = age(now, session.xact_start)
        if open_for is not None and open_for < thresholds.long_xact:
            continue
        found.append((partitions[int(row[0])], session))
    if hidden:
        notes.append(
            "some sessions that wrote to a stream are hidden from this role: grant it pg_monitor to see who they are"
        )
    counted: dict[tuple[int, int], int] = {}
    pairs = [(by_name[n].id, s.backend_xid) for n, s in found if s.backend_xid is not None]
    if pairs:
        for sid, x, n in _q(
            conn,
            query("status_committed_after"),
            ([p[0] for p in pairs], [str(p[1]) for p in pairs]),
        ):
            counted[(int(sid), int(x))] = int(n)
    writers: dict[str, list[Writer]] = {}
    for name, session in found:
        key = (by_name[name].id, session.backend_xid or -1)
        writers.setdefault(name, []).append(Writer(name, session, counted.get(key)))
    return [replace(s, writers=tuple(writers.get(s.name, ()))) for s in streams]


def _xmin_holders(
    conn: Conn, now: datetime, reference: int, thresholds: Thresholds, notes: list[str]
) -> list[XminHolder]:
    out = []
    for row in _q(conn, _sessions(template("xmin_sessions")), (thresholds.long_xact,)):
        s = _session(row, reference)
        out.append(XminHolder("session", str(s.pid), s.xmin_age, age(now, s.xact_start), s))
    for kind, name, xmin_age, seconds in _q(conn, query("xmin_others"), (thresholds.long_xact,)):
        out.append(XminHolder(kind, name, None if xmin_age is None else int(xmin_age), seconds))
    if any(h.session is not None and h.session.usename is None for h in out):
        notes.append("some old transactions are hidden from this role: grant it pg_monitor to see who they are")
    return out


def _consumers(
    conn: Conn, names: list[str] | None, status: Status, sessions: list[Session], thresholds: Thresholds
) -> list[ConsumerStatus]:
    out = []
    for owner, consumer, stream, token, updated, seen, seen_by, sid, created, floor, rows, oldest, taken in _q(
        conn, query("status_consumers"), (names,)
    ):
        reason = reset_reason(
            token, stream_exists=sid is not None, created_tick=created, floor_tick=floor, head=status.ticker.head_tick
        )
        lag_rows = None if rows is None or reason is not None else int(rows)
        lag = lag_seconds(status.now, lag_rows, oldest, taken)
        held = tuple(
            s
            for s in sessions
            if s.app is not None
            and s.app.kind == "reader"
            and s.app.holds(consumer, stream)
            and s.usename in (None, owner)
        )
        last_seen = max([t for t in (updated, seen) if t is not None], default=None)
        state = consumer_state(
            reason=reason,
            gone=sid is None,
            lag_rows=lag_rows,
            lag_seconds=lag,
            last_seen_age=age(status.now, last_seen),
            held=bool(held),
            max_lag=thresholds.lag_limit(consumer),
            seen_within=thresholds.seen_within,
        )
        out.append(
            ConsumerStatus(
                owner=str(owner),
                consumer=consumer,
                stream=stream,
                token=token,
                updated_at=updated,
                seen_at=seen,
                seen_by=seen_by,
                lag_rows=lag_rows,
                lag_seconds=lag,
                state=state,
                reason=reason,
                held_by=held,
            )
        )
    return out


@dataclass(frozen=True)
class CheckResult:
    """``pgfeed check``'s verdict: the problems (none: healthy) and the status read."""

    problems: list[str]
    status: Status | None


def check(conn: Conn, thresholds: Thresholds | None = None, streams: Sequence[str] | None = None) -> CheckResult:
    """Liveness/readiness: the schema at this pgfeed's version, a live ticker,
    no consumer (of ``streams``, default all) past its lag threshold. A
    database that cannot be reached raises (:class:`~pgfeed.errors.ConnectError`)
    before this is called."""
    thresholds = thresholds or Thresholds()
    try:
        expected = expected_version()
    except MigrationError as exc:
        return CheckResult([str(exc)], None)
    try:
        version = schema_version(conn)
    except psycopg.Error as exc:
        raise _error(exc, "reading the schema version") from None
    if version != expected:
        if version is None:
            return CheckResult(["the pgfeed schema is not installed in this database: run `pgfeed migrate`"], None)
        newer = version > expected
        return CheckResult(
            [
                f"the pgfeed schema is at version {version}, this pgfeed expects {expected}: "
                + ("upgrade pgfeed" if newer else "run `pgfeed migrate`")
            ],
            None,
        )
    status = gather(conn, streams, thresholds, sessions=False)
    return CheckResult(check_problems(status, thresholds, expected_version=expected), status)
