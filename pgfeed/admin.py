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
        row = tuples(conn, "SELECT id FROM pgfeed.streams WHERE name = %s", (name,)).fetchone()
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
                # create_stream_v2 takes a tick, at READ COMMITTED whatever the session's default.
                tuples(conn, "SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            if tuples(conn, "SELECT 1 FROM pgfeed.streams WHERE name = %s", (name,)).fetchone():
                raise StreamExists(f"stream {name!r} already exists; nothing changed")
            row = tuples(
                conn, "SELECT pgfeed.create_stream_v2(%s, %s, %s)", (name, max_payload_bytes, notify_mode)
            ).fetchone()
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
        raise StreamExists(f"stream {name!r} already exists; nothing changed") from None
    except psycopg.Error as exc:
        raise translate(exc, f"creating stream {name!r}") from None
    assert row is not None
    return int(row[0])


def _head(conn: Conn) -> int:
    """The newest tick (read-only: ticks are the ticker's business)."""
    row = tuples(conn, "SELECT coalesce(max(id), 0) FROM pgfeed.ticks").fetchone()
    assert row is not None
    return int(row[0])


def list_streams(conn: Conn) -> list[StreamInfo]:
    """Every stream with its row count, last append time and the head: a
    position token covering every row committed when the list was taken."""
    try:
        head = str(_head(conn))
        streams = tuples(
            conn, "SELECT id, name, notify_mode, max_payload_bytes FROM pgfeed.streams ORDER BY name"
        ).fetchall()
        result = []
        for sid, name, mode, max_bytes in streams:
            count, last = tuples(
                # Through the parent table: readers may read it, not the partitions.
                conn,
                "SELECT count(*), max(created_at)::text FROM pgfeed.events WHERE stream_id = %s",
                (sid,),
            ).fetchone() or (0, None)
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
            row = tuples(conn, "SELECT id FROM pgfeed.streams WHERE name = %s FOR UPDATE", (name,)).fetchone()
            if row is None:
                raise UnknownStream(f"unknown stream {name!r}: nothing dropped")
            sid = int(row[0])
            captured = _captured_tables(conn, sid)
            for schema, table in captured:
                _drop_capture(conn, sid, _table_oid(conn, schema, table)[0])
            conn.execute(sql.SQL("DROP TABLE {}").format(_partition(sid)))
            conn.execute("DELETE FROM pgfeed.streams WHERE id = %s", (sid,))
    except PgfeedError:
        raise
    except psycopg.Error as exc:
        raise translate(exc, f"dropping stream {name!r}") from None
    return [format_qualified_table(schema, table) for schema, table in captured]


def _role_exists(conn: Conn, role: str) -> None:
    if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
        raise UsageError(f"unknown role {role!r}: create it first (CREATE ROLE ...)")


def _record_grant(conn: Conn, role: str, kind: str, sid: int | None) -> None:
    """Remember a grant (by role oid) so that streams created later inherit "all streams" grants."""
    conn.execute(
        "INSERT INTO pgfeed.role_grants (role_oid, kind, stream_id)"
        " SELECT oid, %s, %s FROM pg_roles WHERE rolname = %s ON CONFLICT DO NOTHING",
        (kind, sid, role),
    )


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
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgfeed TO {}").format(r))
            conn.execute(sql.SQL("GRANT SELECT ON pgfeed.streams TO {}").format(r))
            conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE pgfeed.event_seq TO {}").format(r))
            # append_v2 inserts through the parent table; the events_append
            # policy limits it to the granted streams.
            conn.execute(sql.SQL("GRANT INSERT (stream_id, key, payload) ON pgfeed.events TO {}").format(r))
            conn.execute(sql.SQL("GRANT SELECT ON pgfeed.role_grants TO {}").format(r))
            conn.execute(
                sql.SQL(
                    "GRANT EXECUTE ON FUNCTION pgfeed.append_v2(text, jsonb, text),"
                    " pgfeed.append_many_v2(text, jsonb[], text[]), pgfeed.append(text, jsonb, text),"
                    " pgfeed.append_many(text, jsonb[], text[]), pgfeed.invalidate_v2(text, text[]),"
                    " pgfeed.commit_token_v2(), pgfeed.commit_token(),"
                    # The previous release's writers, during a rolling upgrade.
                    " pgfeed.append_v1(text, jsonb, text), pgfeed.append_many_v1(text, jsonb[], text[]),"
                    " pgfeed.invalidate_v1(text, text[]), pgfeed.tick_v1() TO {}"
                ).format(r)
            )
            targets = (
                ids
                if ids is not None
                else [int(row[0]) for row in conn.execute("SELECT id FROM pgfeed.streams").fetchall()]
            )
            for sid in targets:
                conn.execute(sql.SQL("GRANT INSERT (key, payload) ON {} TO {}").format(_partition(sid), r))
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
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgfeed TO {}").format(r))
            conn.execute(
                sql.SQL("GRANT SELECT ON pgfeed.streams, pgfeed.ticks, pgfeed.events, pgfeed.ticker TO {}").format(r)
            )
            conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON pgfeed.positions TO {}").format(r))
            conn.execute(
                sql.SQL(
                    "GRANT EXECUTE ON FUNCTION pgfeed.read_live_v2(bigint, text[], bigint[], integer),"
                    " pgfeed.read_live_v3(bigint, text[], bigint[], integer),"
                    " pgfeed.interval_rows_v2(bigint, pg_snapshot, bigint, pg_snapshot, bigint, bigint, integer),"
                    " pgfeed.resolve_token_v2(text) TO {}"
                ).format(r)
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
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgfeed TO {}").format(r))
            conn.execute(sql.SQL("GRANT SELECT ON pgfeed.ticker TO {}").format(r))
            conn.execute(
                sql.SQL(
                    "GRANT EXECUTE ON FUNCTION pgfeed.tick_v2(bigint, boolean),"
                    " pgfeed.ticker_claim_v2(text, text, integer), pgfeed.ticker_renew_v2(bigint, integer),"
                    " pgfeed.ticker_resign_v2(bigint), pgfeed.prune_v2(interval, boolean, boolean) TO {}"
                ).format(r)
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
    rows = tuples(
        conn,
        "SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE t.tgname IN (%s, %s) AND t.tgparentid = 0"
        # This release's function, and the previous release's, whose triggers
        # keep working until the table is captured again.
        "   AND t.tgfoid IN ('pgfeed.capture_v2()'::regprocedure, 'pgfeed.capture_v1()'::regprocedure)"
        # A partition's own TRUNCATE trigger belongs to its captured ancestor's capture.
        "   AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a JOIN pg_trigger p"
        "                    ON p.tgrelid = a.relid AND p.tgname = t.tgname WHERE a.relid <> c.oid)"
        " ORDER BY 1, 2",
        (_trigger_name(sid), _truncate_trigger_name(sid)),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _tree(conn: Conn, oid: int) -> list[sql.Identifier]:
    """Table ``oid`` and, for a partitioned table, every partition below it."""
    rows = tuples(
        conn,
        "SELECT n.nspname, c.relname FROM (SELECT %s::oid AS relid, 0 AS level"
        "  UNION SELECT relid, level FROM pg_partition_tree(%s)) t"
        " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY t.level, 1, 2",
        (oid, oid),
    ).fetchall()
    return [sql.Identifier(str(r[0]), str(r[1])) for r in rows]


def _drop_capture(conn: Conn, sid: int, oid: int) -> None:
    """Drop the triggers of the capture into stream ``sid`` from table ``oid``
    and from its partitions (TRUNCATE triggers are not cloned: each has its own;
    dropping the row trigger drops its clones)."""
    rows = tuples(
        conn,
        "SELECT t.tgname, n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE t.tgname IN (%s, %s) AND t.tgparentid = 0"
        "   AND (t.tgrelid = %s OR t.tgrelid IN (SELECT relid FROM pg_partition_tree(%s)))",
        (_trigger_name(sid), _truncate_trigger_name(sid), oid, oid),
    ).fetchall()
    for name, schema, table in rows:
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), sql.Identifier(schema, table)))


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
    row = tuples(
        conn,
        "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
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
            attnums = {
                str(r[0]): int(r[1])
                for r in tuples(
                    conn,
                    "SELECT attname, attnum FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                    (oid,),
                ).fetchall()
            }
            if key is None:
                key = [
                    str(r[0])
                    for r in tuples(
                        conn,
                        "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
                        " ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)"
                        " WHERE i.indrelid = %s AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
                        (oid,),
                    ).fetchall()
                ]
                if not key:
                    raise UsageError(f"table {shown} has no primary key: name the key columns with --key a,b")
            for col in [*key, *(columns or [])]:
                if col not in attnums:
                    raise UsageError(f"table {shown} has no column {col!r}")
            # The arguments of pgfeed.capture_v2 (see migrations/0005_capture.sql).
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
                    sql.SQL(
                        "CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW EXECUTE FUNCTION pgfeed.capture_v2({})"
                    ).format(
                        sql.Identifier(_trigger_name(sid)),
                        sql.SQL(" OR ").join(sql.SQL(o.upper()) for o in row_ops),
                        target,
                        args,
                    )
                )
            if "truncate" in ops:
                # Statement triggers are not cloned to partitions, and TRUNCATE
                # of one partition fires only that partition's triggers.
                for rel in _tree(conn, oid):
                    conn.execute(
                        sql.SQL(
                            "CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT"
                            " EXECUTE FUNCTION pgfeed.capture_v2({})"
                        ).format(sql.Identifier(_truncate_trigger_name(sid)), rel, args)
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
