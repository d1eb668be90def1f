"""Stream administration: create, list, drop, grant, capture. Sync, for the CLI
and for deployment scripts; every identifier goes through ``sql.Identifier``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgfeed.core.names import check_stream_name, format_qualified_table
from pgfeed.errors import PermissionDenied, PgfeedError, StreamExists, UnknownStream, UsageError, translate
from pgfeed.execute import tuples
from pgfeed.queries import query, template

Conn = psycopg.Connection[Any]
NotifyMode = Literal["ticker", "immediate", "poll"]
NOTIFY_MODES = ("ticker", "immediate", "poll")
DEFAULT_MAX_PAYLOAD = 1_048_576
#: The largest per-stream limit (the column is a PostgreSQL integer).
MAX_MAX_PAYLOAD = 2**31 - 1


@dataclass(frozen=True)
class StreamInfo:
    """One row of ``pgfeed stream list``."""

    name: str
    id: int
    rows: int
    head: str
    last_append: str | None
    notify_mode: str
    max_payload_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _partition(stream_id: int) -> sql.Identifier:
    return sql.Identifier("pgfeed", f"events_{stream_id}")


def stream_id(conn: Conn, name: str) -> int:
    """The id of stream ``name``; :class:`UnknownStream` if there is none."""
    check_stream_name(name)
    try:
        row = tuples(conn, query("stream_id"), (name,)).fetchone()
    except psycopg.Error as exc:
        raise translate(exc, f"looking up stream {name!r}") from None
    if row is None:
        raise UnknownStream(f"unknown stream {name!r}: create it with `pgfeed stream create {name}`")
    return int(row[0])


def create_stream(
    conn: Conn, name: str, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, notify_mode: NotifyMode = "ticker"
) -> int:
    """Create a stream and return its id; :class:`StreamExists` if it exists (nothing changes)."""
    check_stream_name(name)
    if notify_mode not in NOTIFY_MODES:
        raise UsageError(f"invalid notify mode {notify_mode!r}: expected one of {', '.join(NOTIFY_MODES)}")
    if not isinstance(max_payload_bytes, int) or not 0 < max_payload_bytes <= MAX_MAX_PAYLOAD:
        raise UsageError(
            f"invalid max payload {max_payload_bytes!r}: expected a number of bytes from 1 to {MAX_MAX_PAYLOAD}"
        )
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    try:
        with conn.transaction():
            if fresh:
                tuples(conn, query("set_transaction_read_committed"))
            if tuples(conn, query("stream_id"), (name,)).fetchone():
                raise StreamExists(f"stream {name!r} already exists; nothing changed")
            row = tuples(conn, query("create_stream"), (name, max_payload_bytes, notify_mode)).fetchone()
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
        raise StreamExists(f"stream {name!r} already exists; nothing changed") from None
    except psycopg.Error as exc:
        raise translate(exc, f"creating stream {name!r}") from None
    assert row is not None
    return int(row[0])


def _head(conn: Conn) -> int:
    """The newest tick (read-only: ticks are the ticker's business)."""
    row = tuples(conn, query("head_tick_id")).fetchone()
    assert row is not None
    return int(row[0])


def list_streams(conn: Conn) -> list[StreamInfo]:
    """Every stream with its row count, last append time and the head: a
    position token covering every row committed when the list was taken."""
    try:
        head = str(_head(conn))
        streams = tuples(conn, query("list_streams")).fetchall()
        result = []
        for sid, name, mode, max_bytes in streams:
            count, last = tuples(conn, query("stream_rows"), (sid,)).fetchone() or (0, None)
            result.append(StreamInfo(name, sid, int(count), head, last, mode, max_bytes))
        return result
    except psycopg.Error as exc:
        raise translate(exc, "listing streams") from None


def drop_stream(conn: Conn, name: str) -> list[str]:
    """Drop a stream, all its rows and its table captures; return the captured
    tables (``schema.table``) whose capture was removed. Readers following it reset."""
    check_stream_name(name)
    try:
        with conn.transaction():
            row = tuples(conn, query("lock_stream"), (name,)).fetchone()
            if row is None:
                raise UnknownStream(f"unknown stream {name!r}: nothing dropped")
            sid = int(row[0])
            captured = _captured_tables(conn, sid)
            for schema, table in captured:
                _drop_capture(conn, sid, _table_oid(conn, schema, table)[0])
            conn.execute(template("drop_partition").format(_partition(sid)))
            conn.execute(query("delete_stream"), (sid,))
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"dropping stream {name!r}") from None
    return [format_qualified_table(schema, table) for schema, table in captured]


def _role_exists(conn: Conn, role: str) -> None:
    if not conn.execute(query("role_exists"), (role,)).fetchone():
        raise UsageError(f"unknown role {role!r}: create it first (CREATE ROLE ...)")


def _record_grant(conn: Conn, role: str, kind: str, sid: int | None) -> None:
    """Remember a grant (by role oid) so that streams created later inherit "all streams" grants."""
    conn.execute(query("record_grant"), (kind, sid, role))


def _grant(conn: Conn, role: sql.Identifier, *grants: sql.SQL) -> None:
    """Run GRANT templates (``... TO {}``) for ``role``, in order."""
    for grant in grants:
        conn.execute(grant.format(role))


def grant_writer(conn: Conn, role: str, streams: list[str] | None = None) -> None:
    """Let ``role`` append to ``streams`` (all streams, present and future, when None).

    A writer may call the append functions and take commit tokens; it cannot
    read events, create, alter or drop anything.
    """
    ids = [stream_id(conn, s) for s in streams] if streams else None
    r = sql.Identifier(role)
    try:
        with conn.transaction():
            _role_exists(conn, role)
            _grant(
                conn,
                r,
                template("grant_schema_usage"),
                template("grant_writer_streams"),
                template("grant_writer_sequence"),
                template("grant_writer_events"),
                template("grant_writer_role_grants"),
                template("grant_writer_functions"),
            )
            targets = (
                ids if ids is not None else [int(row[0]) for row in tuples(conn, query("all_stream_ids")).fetchall()]
            )
            for sid in targets:
                conn.execute(template("grant_writer_partition").format(_partition(sid), r))
            for sid_or_all in ids if ids is not None else [None]:
                _record_grant(conn, role, "writer", sid_or_all)
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"granting writer to {role!r}") from None


def grant_reader(conn: Conn, role: str) -> None:
    """Let ``role`` read every stream and keep its own saved positions.

    A reader cannot append, alter, drop or tick: it only reads (and writes
    its own saved positions, for named consumers). Something else must tick:
    ``pgfeed daemon``, or a process whose role has :func:`grant_ticker`.
    """
    r = sql.Identifier(role)
    try:
        with conn.transaction():
            _role_exists(conn, role)
            _grant(
                conn,
                r,
                template("grant_schema_usage"),
                template("grant_reader_tables"),
                template("grant_reader_positions"),
                template("grant_reader_functions"),
            )
            _record_grant(conn, role, "reader", None)
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"granting reader to {role!r}") from None


def grant_ticker(conn: Conn, role: str) -> None:
    """Let ``role`` run the ticker (``pgfeed daemon``, or a reader's embedded
    ticker): campaign for the lease, take ticks, and prune (the daemon's
    ``--retention``: ``pgfeed.prune_v2`` runs as the schema owner, so it sees
    and protects every role's saved positions). Ticks only record snapshots;
    the role gains no access to any stream's rows, but pruning deletes old
    ones: grant it to the roles your daemons run as."""
    r = sql.Identifier(role)
    try:
        with conn.transaction():
            _role_exists(conn, role)
            _grant(
                conn,
                r,
                template("grant_schema_usage"),
                template("grant_ticker_lease"),
                template("grant_ticker_functions"),
            )
            _record_grant(conn, role, "ticker", None)
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"granting ticker to {role!r}") from None


def _trigger_name(sid: int) -> str:
    """The row trigger of the capture into stream ``sid``."""
    return f"pgfeed_capture_{sid}"


def _truncate_trigger_name(sid: int) -> str:
    """The statement-level TRUNCATE trigger of the capture into stream ``sid``
    (on the captured table and, for a partitioned table, on each partition)."""
    return f"pgfeed_capture_{sid}_truncate"


def _captured_tables(conn: Conn, sid: int) -> list[tuple[str, str]]:
    """(schema, table) of every table captured into stream ``sid``; the clones of
    a partitioned table's triggers on its partitions are not listed."""
    rows = tuples(conn, query("captured_tables"), (_trigger_name(sid), _truncate_trigger_name(sid))).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _tree(conn: Conn, oid: int) -> list[sql.Identifier]:
    """Table ``oid`` and, for a partitioned table, every partition below it."""
    rows = tuples(conn, query("table_tree"), (oid, oid)).fetchall()
    return [sql.Identifier(str(r[0]), str(r[1])) for r in rows]


def _drop_capture(conn: Conn, sid: int, oid: int) -> None:
    """Drop the triggers of the capture into stream ``sid`` from table ``oid``
    and from its partitions (TRUNCATE triggers are not cloned: each has its own;
    dropping the row trigger drops its clones)."""
    triggers = (_trigger_name(sid), _truncate_trigger_name(sid))
    rows = tuples(conn, query("capture_triggers"), (*triggers, oid, oid)).fetchall()
    for name, schema, table in rows:
        conn.execute(template("drop_trigger").format(sql.Identifier(name), sql.Identifier(schema, table)))


CAPTURE_OPS = ("insert", "update", "delete", "truncate")
_ROW_OPS = ("insert", "update", "delete")


def _check_ops(ops: list[str] | None) -> list[str]:
    if ops is None:
        return list(CAPTURE_OPS)
    bad = [o for o in ops if o not in CAPTURE_OPS]
    if bad or not ops:
        raise UsageError(
            f"invalid operations {','.join(ops)!r}: expected a non-empty subset of {','.join(CAPTURE_OPS)}"
        )
    return [o for o in CAPTURE_OPS if o in ops]


def _table_oid(conn: Conn, schema: str, table: str) -> tuple[int, str]:
    """The oid and relkind (``r`` table, ``p`` partitioned) of ``schema.table``."""
    row = tuples(conn, query("table_oid"), (schema, table)).fetchone()
    shown = format_qualified_table(schema, table)
    if row is None:
        raise UsageError(f"unknown table {shown}: no such table (quote names with capitals: '\"Orders\"')")
    if row[1] not in ("r", "p"):
        raise UsageError(f"cannot capture {shown}: it is not a table (only tables and partitioned tables)")
    return int(row[0]), str(row[1])


def capture(
    conn: Conn,
    schema: str,
    table: str,
    stream: str,
    *,
    columns: list[str] | None = None,
    key: list[str] | None = None,
    ops: list[str] | None = None,
    skip_unchanged: bool = False,
) -> list[str]:
    """Capture the changes of ``schema.table`` into ``stream``, in the writer's
    own transaction (triggers running ``pgfeed.capture_v2``; docs/capture.md).

    Each changed row appends ``{"op", "table", "key": {key columns}, "row":
    {fields}}`` (``row`` holds ``columns`` only when given; a delete carries
    the old row); an update that changes the key adds ``"old_key"``; a
    TRUNCATE appends ``{"op": "truncate", "table"}``. ``table`` is quoted as
    PostgreSQL quotes it (``shop."Orders"``). The event's key (the ``key``
    column) is the key object as JSON text. ``ops`` is a subset of insert,
    update, delete, truncate (default all). ``skip_unchanged``: an update that
    changes neither the key nor a captured column appends nothing.

    Columns are bound by attribute number: renaming one is followed, dropping
    a key or listed column makes writes to the table fail with a one-line
    error naming the capture until it is captured again. Capturing the same
    table into the same stream again replaces the previous settings (and a
    capture of the previous release). Returns the key columns used. A table
    without a primary key needs ``key``.
    """
    ops = _check_ops(ops)
    sid = stream_id(conn, stream)
    shown = format_qualified_table(schema, table)
    try:
        with conn.transaction():
            oid, kind = _table_oid(conn, schema, table)
            attnums = {str(r[0]): int(r[1]) for r in tuples(conn, query("table_columns"), (oid,)).fetchall()}
            if key is None:
                key = [str(r[0]) for r in tuples(conn, query("primary_key"), (oid,)).fetchall()]
                if not key:
                    raise UsageError(f"table {shown} has no primary key: name the key columns with --key a,b")
            for col in [*key, *(columns or [])]:
                if col not in attnums:
                    raise UsageError(f"table {shown} has no column {col!r}")
            # The arguments of pgfeed.capture_v2 (see pgfeed/migrations/0005_capture.sql).
            options = [o for o, on in (("skip_unchanged", skip_unchanged), ("partitioned", kind == "p")) if on]
            args = sql.SQL(", ").join(
                sql.Literal(a)
                for a in (
                    stream,
                    "{" + ",".join(str(attnums[c]) for c in key) + "}",
                    "*" if columns is None else "{" + ",".join(str(attnums[c]) for c in columns) + "}",
                    ",".join(options),
                    json.dumps({"key": key, "columns": columns}),
                )
            )
            _drop_capture(conn, sid, oid)
            row_ops = [o for o in ops if o in _ROW_OPS]
            target = sql.Identifier(schema, table)
            if row_ops:
                conn.execute(
                    template("create_capture_trigger").format(
                        sql.Identifier(_trigger_name(sid)),
                        sql.SQL(" OR ").join(sql.SQL(o.upper()) for o in row_ops),
                        target,
                        args,
                    )
                )
            if "truncate" in ops:
                for rel in _tree(conn, oid):  # each partition has its own (see create_truncate_trigger)
                    conn.execute(
                        template("create_truncate_trigger").format(
                            sql.Identifier(_truncate_trigger_name(sid)), rel, args
                        )
                    )
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"capturing {shown}") from None
    return key


def uncapture(conn: Conn, schema: str, table: str, stream: str) -> bool:
    """Remove the capture of ``schema.table`` into ``stream`` (its row and
    TRUNCATE triggers, partitions' included); return whether there was one."""
    sid = stream_id(conn, stream)
    try:
        with conn.transaction():
            oid, _ = _table_oid(conn, schema, table)
            found = (schema, table) in _captured_tables(conn, sid)
            if found:
                _drop_capture(conn, sid, oid)
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"uncapturing {format_qualified_table(schema, table)}") from None
    return found


__all__ = [
    "CAPTURE_OPS",
    "NOTIFY_MODES",
    "PermissionDenied",
    "StreamInfo",
    "capture",
    "create_stream",
    "drop_stream",
    "grant_reader",
    "grant_ticker",
    "grant_writer",
    "list_streams",
    "stream_id",
    "uncapture",
]
