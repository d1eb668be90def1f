"""Roles and security with real LOGIN roles: `pgfeed grant writer|reader`, then
connect as those roles and try everything they must and must not be able to do."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from pgfeed_cli.main import cli
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import make_conninfo
from ticking import daemon

import pgfeed
from pgfeed import admin
from pgfeed.errors import PermissionDenied
from pgfeed.testing import TestServer

Conn = psycopg.Connection[Any]
PGFEED = str(Path(sys.executable).parent / "pgfeed")
SECRET = "s3cr3t-do-not-broadcast"


def run(dsn: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--dsn", dsn, *args])


@pytest.fixture
def connect_as(pgfeed_dsn: str) -> Iterator[Callable[[str], Conn]]:
    """Autocommit connections to the test database as a given role."""
    opened: list[Conn] = []

    def connect(role: str) -> Conn:
        conn = psycopg.connect(make_conninfo(pgfeed_dsn, user=role), autocommit=True)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def streams(pgfeed_conn: Conn) -> dict[str, int]:
    """Two streams besides the built-in caches: name -> id."""
    return {name: admin.create_stream(pgfeed_conn, name) for name in ("orders", "other")}


def denied(conn: Conn, statement: str, params: tuple[Any, ...] | None = None, *, part: int | None = None) -> str:
    """Run ``statement`` expecting a permission error; return its message.
    With ``part``, ``{part}`` in it names that stream id's partition (write ``{{}}`` for ``{}``)."""
    query: Any = statement.encode()
    if part is not None:
        query = sql.SQL(statement).format(part=sql.Identifier("pgfeed", f"events_{part}"))  # type: ignore[arg-type]
    with pytest.raises(pgerrors.InsufficientPrivilege) as info, conn.transaction():
        conn.execute(query, params)
    return str(info.value)


def grant_ok(dsn: str, *args: str) -> None:
    result = run(dsn, "grant", *args)
    assert result.exit_code == 0, result.output


# -- writers ---------------------------------------------------------------------
def test_writer_appends_to_granted_streams_only(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    role = make_role()
    grant_ok(pgfeed_dsn, "writer", role, "--stream", "orders")
    w = connect_as(role)

    with w.transaction():
        w.execute("SELECT pgfeed.append('orders', %s::jsonb)", ('{"via": "sql"}',))
        w.execute("SELECT pgfeed.append_many('orders', ARRAY['{\"via\": \"sql-many\"}'::jsonb])")
        pgfeed.append(w, "orders", {"via": "python"}, key="k1")
        pgfeed.append_many(w, "orders", [{"via": "python-many"}])
    assert pgfeed.commit_token(w).snapshot is not None  # a writer may take tokens: the snapshot after its COMMIT
    rows = pgfeed_conn.execute(
        "SELECT payload ->> 'via', key FROM pgfeed.events WHERE stream_id = %s ORDER BY seq", (streams["orders"],)
    ).fetchall()
    assert rows == [("sql", None), ("sql-many", None), ("python", "k1"), ("python-many", None)]

    message = denied(w, "SELECT pgfeed.append('other', '{}'::jsonb)")
    assert "row-level security policy" in message  # the events_append policy: no writer grant for 'other'
    denied(w, "SELECT pgfeed.append_many_v1('other', ARRAY['{}'::jsonb])")
    with pytest.raises(PermissionDenied, match="permission denied while appending to 'other'"):
        pgfeed.append(w, "other", {"x": 1})
    with pytest.raises(PermissionDenied):
        pgfeed.invalidate(w, "some_cache", ["k"])  # caches is a stream like any other
    assert pgfeed_conn.execute(
        "SELECT count(*) FROM pgfeed.events WHERE stream_id <> %s", (streams["orders"],)
    ).fetchone() == (0,)


def test_writer_of_all_streams_gets_streams_created_later(
    pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Callable[[], str], connect_as: Any
) -> None:
    role = make_role()
    grant_ok(pgfeed_dsn, "writer", role)
    assert run(pgfeed_dsn, "stream", "create", "later").exit_code == 0
    w = connect_as(role)
    with w.transaction():
        pgfeed.append(w, "later", {"n": 1})
        pgfeed.append(w, "caches", {"n": 2})
        pgfeed.invalidate(w, "users", None)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (3,)


def test_writer_cannot_read_create_alter_or_drop(
    pgfeed_dsn: str, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    role = make_role()
    grant_ok(pgfeed_dsn, "writer", role)
    w = connect_as(role)
    sid = streams["orders"]
    with w.transaction():
        pgfeed.append(w, "orders", {"secret": SECRET})

    denied(w, "SELECT * FROM pgfeed.events")
    denied(w, "SELECT * FROM {part}", part=sid)
    denied(w, "SELECT * FROM pgfeed.positions")
    denied(w, "UPDATE {part} SET payload = '{{}}'", part=sid)
    denied(w, "DELETE FROM {part}", part=sid)
    denied(w, "TRUNCATE {part}", part=sid)
    # Only key and payload are writable: a row's xid and seq are the feed's order.
    denied(w, "INSERT INTO {part} (key, payload, xid) VALUES (NULL, '{{}}', '1'::xid8)", part=sid)
    denied(w, "INSERT INTO {part} (key, payload, seq) VALUES (NULL, '{{}}', 1)", part=sid)
    # Through the parent (as append_v2 does) only the writer's columns, never a forged xid or seq.
    denied(w, "INSERT INTO pgfeed.events (stream_id, payload, xid) VALUES (%s, '{}', '1'::xid8)", (streams["orders"],))
    denied(w, "INSERT INTO pgfeed.events (stream_id, payload, seq) VALUES (%s, '{}', 1)", (streams["orders"],))
    denied(w, "INSERT INTO pgfeed.ticks VALUES (999999, pg_current_snapshot(), now())")
    denied(w, "SELECT pgfeed.create_stream_v1('sneaky')")
    denied(w, "SELECT * FROM pgfeed._take_tick_v1()")
    denied(w, "DROP TABLE {part}", part=sid)
    denied(w, "ALTER TABLE {part} ADD COLUMN x int", part=sid)
    denied(w, "DELETE FROM pgfeed.streams")
    denied(w, "UPDATE pgfeed.streams SET max_payload_bytes = 2147483647")
    denied(w, "CREATE TABLE pgfeed.mine (x int)")
    denied(w, "SELECT setval('pgfeed.event_seq', 1)")

    as_writer = make_conninfo(pgfeed_dsn, user=role)
    for args in (["stream", "create", "sneaky"], ["stream", "drop", "orders", "--yes"], ["grant", "writer", role]):
        result = run(as_writer, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("pgfeed: error: permission denied"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_writer_cannot_reach_other_streams_through_the_capture_trigger(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    """capture_v1 is SECURITY DEFINER: a writer limited to one stream must not
    be able to attach it to a table of its own to append anywhere."""
    role = make_role()
    grant_ok(pgfeed_dsn, "writer", role, "--stream", "orders")
    pgfeed_conn.execute(sql.SQL("CREATE SCHEMA own AUTHORIZATION {}").format(sql.Identifier(role)))
    w = connect_as(role)
    w.execute("CREATE TABLE own.t (id int PRIMARY KEY)")
    message = denied(
        w,
        "CREATE TRIGGER t AFTER INSERT ON own.t FOR EACH ROW"
        " EXECUTE FUNCTION pgfeed.capture_v1('other', '[\"id\"]', 'null')",
    )
    assert "capture_v1" in message


def test_captured_table_needs_no_pgfeed_privileges_to_write(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    pgfeed_conn.execute("CREATE TABLE public.accounts (id int PRIMARY KEY, balance int)")
    assert run(pgfeed_dsn, "capture", "public.accounts", "--stream", "orders").exit_code == 0
    role = make_role()
    pgfeed_conn.execute(sql.SQL("GRANT INSERT ON public.accounts TO {}").format(sql.Identifier(role)))
    app = connect_as(role)
    app.execute("INSERT INTO public.accounts VALUES (1, 10)")
    denied(app, "SELECT pgfeed.append('orders', '{}'::jsonb)")
    row = pgfeed_conn.execute("SELECT payload FROM pgfeed.events WHERE stream_id = %s", (streams["orders"],)).fetchone()
    assert row is not None
    assert row[0]["row"] == {"id": 1, "balance": 10}


# -- readers ---------------------------------------------------------------------
def test_reader_reads_but_cannot_write_tick_or_change_anything(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "orders", {"n": 1})
    role = make_role()
    grant_ok(pgfeed_dsn, "reader", role)
    r = connect_as(role)

    assert r.execute("SELECT payload FROM pgfeed.events").fetchall() == [({"n": 1},)]
    assert r.execute("SELECT count(*) FROM pgfeed.ticks").fetchone()[0] >= 1  # type: ignore[index]
    assert {n for (n,) in r.execute("SELECT name FROM pgfeed.streams")} == {"caches", "orders", "other"}
    live = r.execute("SELECT tick_id FROM pgfeed.read_live_v4(0, ARRAY['orders'], ARRAY[0::bigint], 10)").fetchall()
    assert live
    assert r.execute("SELECT pgfeed.resolve_token_v2('x1')").fetchone() is not None
    denied(r, "SELECT id FROM pgfeed.tick_v1()")
    denied(r, "SELECT id FROM pgfeed.tick_v2(1)")
    denied(r, "SELECT * FROM pgfeed.ticker_claim_v2('me', 'reader', 1000)")

    sid = streams["orders"]
    denied(r, "SELECT pgfeed.append('orders', '{}'::jsonb)")
    denied(r, "SELECT pgfeed.append_v1('orders', '{}'::jsonb)")
    denied(r, "SELECT pgfeed.append_many('orders', ARRAY['{}'::jsonb])")
    denied(r, "SELECT pgfeed.invalidate_v1('c', NULL)")
    with pytest.raises(PermissionDenied):
        pgfeed.append(r, "orders", {"n": 2})
    denied(r, "INSERT INTO pgfeed.events (stream_id, xid, payload) VALUES (%s, '1'::xid8, '{}')", (streams["orders"],))
    denied(r, "INSERT INTO {part} (key, payload) VALUES (NULL, '{{}}')", part=sid)
    denied(r, "UPDATE {part} SET xid = '1'::xid8", part=sid)
    denied(r, "DELETE FROM {part}", part=sid)
    denied(r, "INSERT INTO pgfeed.ticks VALUES (999999, pg_current_snapshot(), now())")
    denied(r, "DELETE FROM pgfeed.ticks")
    denied(r, "DROP TABLE {part}", part=sid)
    denied(r, "DROP TABLE pgfeed.events")
    denied(r, "ALTER TABLE pgfeed.events ADD COLUMN x int")
    denied(r, "ALTER TABLE {part} DISABLE ROW LEVEL SECURITY", part=sid)
    denied(r, "TRUNCATE pgfeed.events")
    denied(r, "SELECT pgfeed.create_stream_v1('sneaky')")
    denied(r, "DELETE FROM pgfeed.streams")
    denied(r, "SELECT * FROM pgfeed.role_grants")
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (1,)

    as_reader = make_conninfo(pgfeed_dsn, user=role)
    for args in (["append", "orders", "{}"], ["stream", "drop", "orders", "--yes"], ["stream", "create", "x"]):
        result = run(as_reader, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("pgfeed: error: permission denied"), result.stderr


def test_reader_role_can_tail_a_stream(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str]
) -> None:
    """The shipped reader needs nothing beyond `pgfeed grant reader`."""
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, "orders", [{"n": 1}, {"n": 2}])
    role = make_role()
    grant_ok(pgfeed_dsn, "reader", role)
    # A reader-only role cannot tick: the daemon (as the owner) does.
    reader_dsn = make_conninfo(pgfeed_dsn, user=role, options="-c default_transaction_read_only=on")
    with daemon(pgfeed_dsn):
        proc = subprocess.run(
            [PGFEED, "--dsn", reader_dsn, "tail", "orders", "--no-follow"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert [line.count('"n":') for line in proc.stdout.splitlines()] == [1, 1]


def test_positions_of_one_reader_are_invisible_to_another(
    pgfeed_dsn: str, make_role: Callable[[], str], connect_as: Any
) -> None:
    alice, bob = make_role(), make_role()
    grant_ok(pgfeed_dsn, "reader", alice)
    grant_ok(pgfeed_dsn, "reader", bob)
    a, b = connect_as(alice), connect_as(bob)
    a.execute("INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('worker', 'orders', '5')")
    b.execute("INSERT INTO pgfeed.positions (consumer, stream, token) VALUES ('worker', 'orders', '7')")

    assert a.execute("SELECT owner, token FROM pgfeed.positions").fetchall() == [(alice, "5")]
    assert b.execute("SELECT owner, token FROM pgfeed.positions").fetchall() == [(bob, "7")]
    assert b.execute("UPDATE pgfeed.positions SET token = '0' WHERE owner = %s", (alice,)).rowcount == 0
    assert b.execute("DELETE FROM pgfeed.positions WHERE owner = %s", (alice,)).rowcount == 0
    denied(b, "INSERT INTO pgfeed.positions (owner, consumer, stream, token) VALUES (%s, 'x', 'orders', '9')", (alice,))
    denied(b, "UPDATE pgfeed.positions SET owner = %s", (alice,))
    assert a.execute("SELECT token FROM pgfeed.positions").fetchall() == [("5",)]
    denied(b, "ALTER TABLE pgfeed.positions DISABLE ROW LEVEL SECURITY")


# -- catalog-wide properties -----------------------------------------------------
def test_every_security_definer_function_pins_search_path(pgfeed_conn: Conn) -> None:
    rows = pgfeed_conn.execute(
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgfeed' AND p.prosecdef"
    ).fetchall()
    assert len(rows) >= 3  # _take_tick_v1, tick_v1, capture_v1 at least
    for name, config in rows:
        settings = dict(item.split("=", 1) for item in config or [])
        assert "search_path" in settings, f"{name} is SECURITY DEFINER without a pinned search_path"
        path = [p.strip() for p in settings["search_path"].split(",")]
        # Nothing a user can create objects in; pg_temp explicitly last.
        assert path[-1] == "pg_temp", (name, path)
        assert set(path) <= {"pg_catalog", "pg_temp", "pgfeed"}, (name, path)


def test_public_can_execute_nothing_in_schema_pgfeed(pgfeed_conn: Conn) -> None:
    """A NULL ACL means the default, which lets PUBLIC execute a function."""
    rows = pgfeed_conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'pgfeed' AND (p.proacl IS NULL OR EXISTS ("
        "   SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))"
    ).fetchall()
    assert rows == []
    tables = pgfeed_conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'pgfeed' AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)"
    ).fetchall()
    assert tables == []


def test_no_notify_payload_carries_row_data(
    pgfeed_dsn: str, pgfeed_conn: Conn, streams: dict[str, int], make_role: Callable[[], str], connect_as: Any
) -> None:
    """Any role may LISTEN on any channel, even one without pgfeed privileges."""
    outsider = connect_as(make_role())
    admin.create_stream(pgfeed_conn, "loud", notify_mode="immediate")
    channel = "pgfeed_v2_wake"
    outsider.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    pgfeed_conn.execute("CREATE TABLE public.people (id int PRIMARY KEY, name text)")
    admin.capture(pgfeed_conn, "public", "people", "loud")
    with pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "loud", {"secret": SECRET}, key=SECRET)
        pgfeed.append(pgfeed_conn, "loud", {"again": SECRET})
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, "loud", [{"s": SECRET}], [SECRET])
    with pgfeed_conn.transaction():
        pgfeed_conn.execute("INSERT INTO public.people VALUES (1, %s)", (SECRET,))
    notes = list(outsider.notifies(timeout=10, stop_after=3))
    notes += outsider.notifies(timeout=0.2)  # and nothing more
    assert [(n.channel, n.payload) for n in notes] == [(channel, "")] * 3  # one per transaction, folded
    # Every notify in pgfeed's SQL uses the constant empty payload.
    sources = pgfeed_conn.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'pgfeed'"
    ).fetchall()
    calls = [(name, m.group(0)) for name, src in sources for m in re.finditer(r"(?i)pg_notify\s*\([^;]*", src)]
    assert calls, "no pg_notify call found: the check below would prove nothing"
    # Constant empty payloads, except the ticker's tick id (a counter, no row data).
    allowed = [
        r"pg_notify\s*\(\s*'pgfeed_v1_'\s*\|\|\s*s\.id\s*,\s*''\s*\)",
        r"pg_notify\s*\(\s*'pgfeed_v2_(wake|ticker)'\s*,\s*''\s*\)",
        r"pg_notify\s*\(\s*'pgfeed_v2_ticks'\s*,\s*\(coalesce\(last_id, 0\) \+ 1\)::text\s*\)",
    ]
    for name, call in calls:
        assert any(re.fullmatch("(?is)" + a, call) for a in allowed), (name, call)
    assert not any(re.search(r"(?i)\bNOTIFY\s+\w", src) for _, src in sources)


# -- grant errors ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["writer", "reader"])
def test_grant_to_an_unknown_role_is_one_line(pgfeed_dsn: str, pgfeed_conn: Conn, kind: str) -> None:
    for role in ("pgfeed_nobody", 'x"; DROP TABLE pgfeed.streams; --'):
        result = run(pgfeed_dsn, "grant", kind, role)
        assert result.exit_code == 1, result.output  # a well-formed command that fails
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("pgfeed: error: unknown role"), lines[0]
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.role_grants").fetchone() == (0,)
    assert pgfeed_conn.execute("SELECT to_regclass('pgfeed.streams') IS NOT NULL").fetchone() == (True,)


def test_grant_errors_for_streams(pgfeed_dsn: str, make_role: Callable[[], str]) -> None:
    role = make_role()
    unknown = run(pgfeed_dsn, "grant", "writer", role, "--stream", "nosuch")
    assert unknown.exit_code == 1
    assert (
        unknown.stderr.strip() == "pgfeed: error: unknown stream 'nosuch': create it with `pgfeed stream create nosuch`"
    )
    invalid = run(pgfeed_dsn, "grant", "writer", role, "--stream", "Bad-Name")
    assert invalid.exit_code == 2
    assert invalid.stderr.startswith("pgfeed: error: invalid stream name")


def test_grants_are_idempotent(pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Callable[[], str]) -> None:
    role = make_role()
    for _ in range(2):
        grant_ok(pgfeed_dsn, "writer", role)
        grant_ok(pgfeed_dsn, "writer", role, "--stream", "caches")
        grant_ok(pgfeed_dsn, "reader", role)
    rows = pgfeed_conn.execute(
        "SELECT kind, stream_id IS NULL FROM pgfeed.role_grants WHERE role_oid = to_regrole(%s) ORDER BY 1, 2", (role,)
    ).fetchall()
    assert rows == [("reader", True), ("writer", False), ("writer", True)]


def drop_role(server: TestServer, dsn: str, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_dropped_writer_role_does_not_break_stream_creation(
    pgfeed_server: TestServer, pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Callable[[], str]
) -> None:
    role = make_role()
    admin.grant_writer(pgfeed_conn, role)
    drop_role(pgfeed_server, pgfeed_dsn, role)
    admin.create_stream(pgfeed_conn, "after_drop")


def test_a_new_role_with_a_dropped_writers_name_inherits_nothing(
    pgfeed_server: TestServer, pgfeed_dsn: str, pgfeed_conn: Conn, make_role: Callable[[], str]
) -> None:
    role = make_role()
    admin.grant_writer(pgfeed_conn, role)
    drop_role(pgfeed_server, pgfeed_dsn, role)
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    admin.create_stream(pgfeed_conn, "after_drop")
    assert pgfeed_conn.execute(
        "SELECT has_column_privilege(%s, 'pgfeed.events_' || pgfeed.streams.id, 'payload', 'INSERT')"
        " FROM pgfeed.streams WHERE name = 'after_drop'",
        (role,),
    ).fetchone() == (False,)
