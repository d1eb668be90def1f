"""`pgfeed capture` / `uncapture`: row triggers appending table changes, against a real server."""

import json
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import psycopg
import pytest
from helpers import Run, one_line_error
from psycopg import sql

from pgfeed import admin
from pgfeed.errors import UsageError

Conn = psycopg.Connection[Any]


@pytest.fixture
def changes(pgfeed_conn: Conn) -> int:
    """Stream ``changes``, and a table ``public.orders`` to capture; the stream's id."""
    pgfeed_conn.execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text NOT NULL, amount numeric, note text)"
    )
    return admin.create_stream(pgfeed_conn, "changes")


def events(conn: Conn, stream: str = "changes") -> list[dict[str, Any]]:
    return [r[0] for r in event_rows(conn, stream)]


def event_rows(conn: Conn, stream: str = "changes") -> list[tuple[Any, ...]]:
    """(payload, key, xid) in append order."""
    return conn.execute(
        "SELECT e.payload, e.key, e.xid::text FROM pgfeed.events e JOIN pgfeed.streams s ON s.id = e.stream_id"
        " WHERE s.name = %s ORDER BY e.seq",
        (stream,),
    ).fetchall()


def capture_triggers(conn: Conn) -> list[tuple[str, str]]:
    """(table, trigger) of every pgfeed capture trigger in the database, partitions' clones included."""
    rows = conn.execute(
        "SELECT t.tgrelid::regclass::text, t.tgname FROM pg_trigger t"
        " WHERE t.tgfoid IN ('pgfeed.capture_v1()'::regprocedure, 'pgfeed.capture_v2()'::regprocedure)"
        " ORDER BY 1, 2"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def test_insert_update_delete(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    result = pgfeed_cmd("capture", "public.orders", "--stream", "changes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "capturing public.orders into changes (key: id)\n"

    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new', 9.50, NULL)")
    pgfeed_conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
    pgfeed_conn.execute("DELETE FROM orders WHERE id = 1")
    row_new = {"id": 1, "status": "new", "amount": 9.50, "note": None}
    row_paid = {**row_new, "status": "paid"}
    assert events(pgfeed_conn) == [
        {"op": "insert", "table": "public.orders", "key": {"id": 1}, "row": row_new},
        {"op": "update", "table": "public.orders", "key": {"id": 1}, "row": row_paid},
        {"op": "delete", "table": "public.orders", "key": {"id": 1}, "row": row_paid},
    ]
    assert [json.loads(r[1]) for r in event_rows(pgfeed_conn)] == [{"id": 1}] * 3


def test_changes_belong_to_the_writers_transaction(pgfeed_dsn: str, pgfeed_conn: Conn, changes: int) -> None:
    admin.create_stream(pgfeed_conn, "loud", notify_mode="immediate")
    admin.capture(pgfeed_conn, "public", "orders", "loud")
    with psycopg.connect(pgfeed_dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgfeed_v2_wake")
        listener.execute("LISTEN pgfeed_test_done")  # the end of what to collect, in order after the wake-ups
        with pgfeed_conn.transaction():
            pgfeed_conn.execute("INSERT INTO orders SELECT g, 'bulk' FROM generate_series(1, 100) g")
            pgfeed_conn.execute("UPDATE orders SET note = 'x' WHERE id <= 10")
        with suppress(psycopg.errors.UniqueViolation), pgfeed_conn.transaction():
            pgfeed_conn.execute("INSERT INTO orders VALUES (1000, 'rolled back')")
            pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'duplicate key')")
        pgfeed_conn.execute("NOTIFY pgfeed_test_done")
        got = []
        for n in listener.notifies(timeout=10):
            if n.channel == "pgfeed_test_done":
                break
            got.append((n.channel, n.payload))
        else:
            raise AssertionError("the end-of-test notification never came")
    assert got == [("pgfeed_v2_wake", "")]  # one wake-up for 110 rows, no row data in it
    rows = event_rows(pgfeed_conn, "loud")
    assert len(rows) == 110
    assert len({r[2] for r in rows}) == 1
    assert [r[0]["key"]["id"] for r in rows] == list(range(1, 101)) + list(range(1, 11))
    assert pgfeed_conn.execute("SELECT count(*) FROM orders").fetchone() == (100,)


def test_columns_limit_the_row(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    result = pgfeed_cmd("capture", "orders", "--stream", "changes", "--columns", "status, AMOUNT")
    assert result.exit_code == 0, result.output
    pgfeed_conn.execute("INSERT INTO orders VALUES (7, 'new', 1, 'secret')")
    pgfeed_conn.execute("DELETE FROM orders")
    assert events(pgfeed_conn) == [
        {"op": "insert", "table": "public.orders", "key": {"id": 7}, "row": {"status": "new", "amount": 1}},
        {"op": "delete", "table": "public.orders", "key": {"id": 7}, "row": {"status": "new", "amount": 1}},
    ]


def test_columns_may_include_the_key(pgfeed_conn: Conn, changes: int) -> None:
    admin.capture(pgfeed_conn, "public", "orders", "changes", columns=["id", "status"])
    pgfeed_conn.execute("INSERT INTO orders VALUES (7, 'new', 1, 'secret')")
    pgfeed_conn.execute("ALTER TABLE orders RENAME COLUMN id TO n")
    pgfeed_conn.execute("UPDATE orders SET n = 8")
    assert [(e["key"], e.get("old_key"), e["row"]) for e in events(pgfeed_conn)] == [
        ({"id": 7}, None, {"id": 7, "status": "new"}),
        ({"n": 8}, {"n": 7}, {"n": 8, "status": "new"}),
    ]


def test_ops_limit_the_operations(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    result = pgfeed_cmd("capture", "orders", "--stream", "changes", "--ops", "delete, INSERT")
    assert result.exit_code == 0, result.output
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    pgfeed_conn.execute("DELETE FROM orders")
    assert [e["op"] for e in events(pgfeed_conn)] == ["insert", "delete"]

    result = pgfeed_cmd("capture", "orders", "--stream", "changes", "--ops", "update")  # replaces the settings
    assert result.exit_code == 0, result.output
    assert capture_triggers(pgfeed_conn) == [("orders", f"pgfeed_capture_{changes}")]
    pgfeed_conn.execute("INSERT INTO orders VALUES (2, 'new')")
    pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    assert [e["op"] for e in events(pgfeed_conn)] == ["insert", "delete", "update"]


def test_bad_arguments_change_nothing(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE VIEW orders_view AS SELECT * FROM orders")
    cases = [
        (("capture", "nosuch", "--stream", "changes"), 1, "unknown table public.nosuch"),
        (("capture", "other.orders", "--stream", "changes"), 1, "unknown table other.orders"),
        (("capture", "orders; DROP TABLE orders", "--stream", "changes"), 1, "unknown table"),
        (("capture", '"Orders"', "--stream", "changes"), 1, 'unknown table public."Orders"'),
        (("capture", "orders_view", "--stream", "changes"), 1, "not a table"),
        (("capture", "a.b.c", "--stream", "changes"), 2, "invalid table name"),
        (("capture", "orders", "--stream", "changes", "--columns", "status,nosuch"), 1, "no column 'nosuch'"),
        (("capture", "orders", "--stream", "changes", "--columns", "status,"), 2, "invalid column list"),
        (("capture", "orders", "--stream", "changes", "--key", "nosuch"), 1, "no column 'nosuch'"),
        (("capture", "orders", "--stream", "changes", "--ops", "merge"), 2, "invalid operations 'merge'"),
        (("capture", "orders", "--stream", "changes", "--ops", ""), 2, "invalid operations"),
        (("capture", "orders", "--stream", "changes", "--ops", "insert,,delete"), 2, "invalid operations"),
        (("capture", "orders", "--stream", "nosuch"), 1, "unknown stream 'nosuch'"),
        (("capture", "orders", "--stream", "Bad-Name"), 2, "invalid stream name"),
        (("uncapture", "nosuch", "--stream", "changes"), 1, "unknown table public.nosuch"),
        (("uncapture", "orders", "--stream", "nosuch"), 1, "unknown stream 'nosuch'"),
    ]
    for args, code, message in cases:
        result = pgfeed_cmd(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in one_line_error(result), args
    assert capture_triggers(pgfeed_conn) == []
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    assert events(pgfeed_conn) == []


def test_a_table_without_primary_key_needs_key(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE audit (tenant text, n int, what text)")
    refused = pgfeed_cmd("capture", "audit", "--stream", "changes")
    assert refused.exit_code == 1
    line = one_line_error(refused)
    assert "public.audit has no primary key" in line
    assert "--key" in line
    assert capture_triggers(pgfeed_conn) == []

    result = pgfeed_cmd("capture", "audit", "--stream", "changes", "--key", "tenant,n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "capturing public.audit into changes (key: tenant, n)\n"
    pgfeed_conn.execute("INSERT INTO audit VALUES ('acme', 3, 'login')")
    assert events(pgfeed_conn) == [
        {
            "op": "insert",
            "table": "public.audit",
            "key": {"tenant": "acme", "n": 3},
            "row": {"tenant": "acme", "n": 3, "what": "login"},
        }
    ]


def test_composite_primary_key_in_index_order(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE lines (a int, b text, qty int, PRIMARY KEY (b, a))")
    assert admin.capture(pgfeed_conn, "public", "lines", "changes") == ["b", "a"]
    pgfeed_conn.execute("INSERT INTO lines VALUES (1, 'x', 5)")
    assert events(pgfeed_conn)[0]["key"] == {"a": 1, "b": "x"}


def test_uncapture(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    assert pgfeed_cmd("capture", "orders", "--stream", "changes").exit_code == 0
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    result = pgfeed_cmd("uncapture", "public.orders", "--stream", "changes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "removed capture of public.orders into changes\n"
    assert capture_triggers(pgfeed_conn) == []
    pgfeed_conn.execute("INSERT INTO orders VALUES (2, 'new')")
    assert len(events(pgfeed_conn)) == 1
    again = pgfeed_cmd("uncapture", "orders", "--stream", "changes")
    assert again.exit_code == 0, again.output
    assert again.stdout == "there was no capture of public.orders into changes\n"


def test_one_table_into_two_streams(pgfeed_conn: Conn, changes: int) -> None:
    admin.create_stream(pgfeed_conn, "audit")
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    admin.capture(pgfeed_conn, "public", "orders", "audit", columns=["status"], ops=["delete"])
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    pgfeed_conn.execute("DELETE FROM orders")
    assert [e["op"] for e in events(pgfeed_conn)] == ["insert", "delete"]
    assert events(pgfeed_conn, "audit") == [
        {"op": "delete", "table": "public.orders", "key": {"id": 1}, "row": {"status": "new"}}
    ]
    assert admin.uncapture(pgfeed_conn, "public", "orders", "audit")
    assert capture_triggers(pgfeed_conn) == [
        ("orders", f"pgfeed_capture_{changes}"),
        ("orders", f"pgfeed_capture_{changes}_truncate"),
    ]


def test_dropping_the_stream_removes_its_captures(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    pgfeed_conn.execute('CREATE TABLE "Mixed" (id int PRIMARY KEY)')
    admin.capture(pgfeed_conn, "public", "Mixed", "changes")
    admin.create_stream(pgfeed_conn, "kept")
    admin.capture(pgfeed_conn, "public", "orders", "kept")
    result = pgfeed_cmd("stream", "drop", "changes", "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "dropped stream changes",
        'removed capture of public."Mixed" into changes',
        "removed capture of public.orders into changes",
    ]
    kept = admin.stream_id(pgfeed_conn, "kept")
    assert capture_triggers(pgfeed_conn) == [
        ("orders", f"pgfeed_capture_{kept}"),
        ("orders", f"pgfeed_capture_{kept}_truncate"),
    ]
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'still works')")
    pgfeed_conn.execute('INSERT INTO "Mixed" VALUES (1)')
    assert len(events(pgfeed_conn, "kept")) == 1


def test_capture_does_not_change_the_tables_behaviour(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute(
        "CREATE FUNCTION upper_status() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN NEW.status := upper(NEW.status); RETURN NEW; END $$"
    )
    pgfeed_conn.execute(
        "CREATE TRIGGER a_upper BEFORE INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION upper_status()"
    )
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    cur = pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new'), (2, 'new') RETURNING id, status")
    assert cur.fetchall() == [(1, "NEW"), (2, "NEW")]
    assert cur.rowcount == 2
    cur = pgfeed_conn.execute("UPDATE orders SET status = 'paid' WHERE id = 2 RETURNING status")
    assert cur.fetchall() == [("PAID",)]
    assert pgfeed_conn.execute("DELETE FROM orders WHERE id = 3").rowcount == 0
    with pytest.raises(psycopg.errors.NotNullViolation):
        pgfeed_conn.execute("INSERT INTO orders VALUES (4, NULL)")
    assert pgfeed_conn.execute("SELECT id, status FROM orders ORDER BY id").fetchall() == [(1, "NEW"), (2, "PAID")]
    assert [(e["op"], e["row"]["status"]) for e in events(pgfeed_conn)] == [
        ("insert", "NEW"),
        ("insert", "NEW"),
        ("update", "PAID"),
    ]
    assert pgfeed_conn.execute("SHOW search_path").fetchone() == ('"$user", public',)


def test_a_failing_append_fails_the_writers_statement(pgfeed_conn: Conn) -> None:
    pgfeed_conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    admin.create_stream(pgfeed_conn, "small", max_payload_bytes=200)
    admin.capture(pgfeed_conn, "public", "notes", "small")
    pgfeed_conn.execute("INSERT INTO notes VALUES (1, 'short')")
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="exceeds the limit of 200 bytes for stream 'small'"):
        pgfeed_conn.execute("INSERT INTO notes VALUES (2, %s)", ("x" * 500,))
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        pgfeed_conn.execute("UPDATE notes SET body = %s", ("y" * 500,))
    assert pgfeed_conn.execute("SELECT id, body FROM notes").fetchall() == [(1, "short")]
    assert len(events(pgfeed_conn, "small")) == 1


@pytest.fixture
def plain_role(pgfeed_server: Any) -> Iterator[str]:
    """A login role with no pgfeed grants (roles are cluster-wide: unique name, dropped after)."""
    role = f"app_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_role_without_pgfeed_grants_can_write_a_captured_table(
    pgfeed_server: Any, pgfeed_dsn: str, pgfeed_conn: Conn, changes: int, plain_role: str
) -> None:
    r = sql.Identifier(plain_role)
    pgfeed_conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {}").format(r))
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    dbname = pgfeed_conn.info.dbname
    try:
        with psycopg.connect(pgfeed_server.dsn_for(dbname, user=plain_role), autocommit=True) as app:
            app.execute("INSERT INTO orders VALUES (1, 'new')")
            app.execute("UPDATE orders SET status = 'paid'")
            app.execute("DELETE FROM orders")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT pgfeed.append('changes', '1'::jsonb)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT count(*) FROM pgfeed.events")
    finally:
        pgfeed_conn.execute(sql.SQL("DROP OWNED BY {}").format(r))
    assert [e["op"] for e in events(pgfeed_conn)] == ["insert", "update", "delete"]


def test_quoted_mixed_case_names(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute('CREATE SCHEMA "Shop"')
    pgfeed_conn.execute('CREATE TABLE "Shop"."Order Lines" ("LineId" int PRIMARY KEY, "Qty" int, note text)')
    result = pgfeed_cmd("capture", '"Shop"."Order Lines"', "--stream", "changes", "--columns", '"Qty"')
    assert result.exit_code == 0, result.output
    assert result.stdout == 'capturing "Shop"."Order Lines" into changes (key: "LineId")\n'
    pgfeed_conn.execute('INSERT INTO "Shop"."Order Lines" VALUES (1, 2, \'n\')')
    assert events(pgfeed_conn) == [
        {"op": "insert", "table": '"Shop"."Order Lines"', "key": {"LineId": 1}, "row": {"Qty": 2}}
    ]
    unquoted = pgfeed_cmd("capture", "Shop.Order Lines", "--stream", "changes")
    assert unquoted.exit_code == 1
    assert 'unknown table shop."order lines"' in one_line_error(unquoted)
    removed = pgfeed_cmd("uncapture", '"Shop"."Order Lines"', "--stream", "changes")
    assert removed.stdout == 'removed capture of "Shop"."Order Lines" into changes\n'
    assert capture_triggers(pgfeed_conn) == []


def test_partitioned_table(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute(
        "CREATE TABLE measures (id int, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)"
    )
    pgfeed_conn.execute(
        "CREATE TABLE measures_2024 PARTITION OF measures FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    assert admin.capture(pgfeed_conn, "public", "measures", "changes") == ["id", "day"]
    pgfeed_conn.execute(
        "CREATE TABLE measures_2025 PARTITION OF measures FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
    )
    pgfeed_conn.execute("INSERT INTO measures VALUES (1, '2024-05-01', 10), (2, '2025-05-01', 20)")
    assert [(e["op"], e["table"], e["partition"], e["key"]) for e in events(pgfeed_conn)] == [
        ("insert", "public.measures", "public.measures_2024", {"id": 1, "day": "2024-05-01"}),
        ("insert", "public.measures", "public.measures_2025", {"id": 2, "day": "2025-05-01"}),
    ]
    assert admin.uncapture(pgfeed_conn, "public", "measures", "changes")
    assert capture_triggers(pgfeed_conn) == []


def test_python_api_checks_its_arguments(pgfeed_conn: Conn, changes: int) -> None:
    with pytest.raises(UsageError, match="invalid operations"):
        admin.capture(pgfeed_conn, "public", "orders", "changes", ops=[])
    with pytest.raises(UsageError, match="invalid operations"):
        admin.capture(pgfeed_conn, "public", "orders", "changes", ops=["insert", "merge"])
    assert capture_triggers(pgfeed_conn) == []


# -- capture that a mirror can trust (issue 7) --------------------------------------
def test_the_payload_key_is_an_object_and_the_event_key_its_json_text(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE lines (a int, b text, qty int, PRIMARY KEY (b, a))")
    admin.capture(pgfeed_conn, "public", "lines", "changes")
    pgfeed_conn.execute("INSERT INTO lines VALUES (1, 'x', 5)")
    [(payload, key, _)] = event_rows(pgfeed_conn)
    assert payload["key"] == {"a": 1, "b": "x"}
    assert isinstance(payload["key"], dict)
    assert key == '{"a": 1, "b": "x"}'  # jsonb's text: one spelling per key, for keyed lookups
    found = pgfeed_conn.execute(
        "SELECT count(*) FROM pgfeed.events WHERE stream_id = %s AND key = %s::jsonb::text",
        (changes, json.dumps({"b": "x", "a": 1})),
    ).fetchone()
    assert found == (1,)


def test_an_update_of_the_key_carries_the_old_key(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE lines (a int, b text, qty int, PRIMARY KEY (a, b))")
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    admin.capture(pgfeed_conn, "public", "lines", "changes")
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new'), (2, 'new')")
    pgfeed_conn.execute("INSERT INTO lines VALUES (1, 'x', 5)")
    pgfeed_conn.execute("UPDATE orders SET id = id + 10")  # a multi-row key update
    pgfeed_conn.execute("UPDATE lines SET b = 'y', qty = 6")  # one column of a composite key
    pgfeed_conn.execute("UPDATE orders SET status = 'paid' WHERE id = 11")  # the key stays: no old_key
    got = [(e["op"], e["key"], e.get("old_key")) for e in events(pgfeed_conn)[3:]]
    assert got == [
        ("update", {"id": 11}, {"id": 1}),
        ("update", {"id": 12}, {"id": 2}),
        ("update", {"a": 1, "b": "y"}, {"a": 1, "b": "x"}),
        ("update", {"id": 11}, None),
    ]
    assert "old_key" not in events(pgfeed_conn)[-1]
    assert [json.loads(r[1]) for r in event_rows(pgfeed_conn)[3:5]] == [{"id": 11}, {"id": 12}]  # the new key


def test_upserts(pgfeed_conn: Conn, changes: int) -> None:
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    pgfeed_conn.execute(
        "INSERT INTO orders VALUES (1, 'again'), (2, 'fresh')"
        " ON CONFLICT (id) DO UPDATE SET status = excluded.status || '!'"
    )
    pgfeed_conn.execute("INSERT INTO orders VALUES (2, 'ignored') ON CONFLICT DO NOTHING")
    assert [(e["op"], e["key"]["id"], e["row"]["status"]) for e in events(pgfeed_conn)] == [
        ("insert", 1, "new"),
        ("update", 1, "again!"),
        ("insert", 2, "fresh"),
    ]


def test_truncate_is_an_event(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    assert pgfeed_cmd("capture", "orders", "--stream", "changes").exit_code == 0
    pgfeed_conn.execute('CREATE TABLE "Other" (id int PRIMARY KEY)')
    admin.capture(pgfeed_conn, "public", "Other", "changes")
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    pgfeed_conn.execute('TRUNCATE orders, "Other"')
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'again')")
    rows = event_rows(pgfeed_conn)
    assert [r[0] for r in rows[1:3]] == [
        {"op": "truncate", "table": "public.orders"},
        {"op": "truncate", "table": 'public."Other"'},
    ]
    assert [r[1] for r in rows[1:3]] == [None, None]  # no key
    assert rows[3][0]["op"] == "insert"
    # Not captured when left out of --ops; an empty table truncates as well.
    assert pgfeed_cmd("capture", "orders", "--stream", "changes", "--ops", "insert,update,delete").exit_code == 0
    pgfeed_conn.execute("TRUNCATE orders")
    assert len(events(pgfeed_conn)) == 4
    assert pgfeed_cmd("capture", "orders", "--stream", "changes", "--ops", "truncate").exit_code == 0
    pgfeed_conn.execute("INSERT INTO orders VALUES (5, 'not captured')")
    pgfeed_conn.execute("TRUNCATE orders")
    assert events(pgfeed_conn)[4:] == [{"op": "truncate", "table": "public.orders"}]
    assert admin.uncapture(pgfeed_conn, "public", "orders", "changes")  # a TRUNCATE-only capture is a capture
    pgfeed_conn.execute("TRUNCATE orders")
    assert len(events(pgfeed_conn)) == 5


def test_truncate_of_a_partitioned_table_and_of_one_partition(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE m (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    pgfeed_conn.execute("CREATE TABLE m24 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pgfeed_conn.execute("CREATE TABLE m25 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    admin.capture(pgfeed_conn, "public", "m", "changes")
    pgfeed_conn.execute("TRUNCATE m24")
    assert events(pgfeed_conn) == [{"op": "truncate", "table": "public.m", "partition": "public.m24"}]
    pgfeed_conn.execute("TRUNCATE m")
    got = events(pgfeed_conn)[1:]
    assert got[0] == {"op": "truncate", "table": "public.m"}  # drop every row of the capture
    assert sorted(e["partition"] for e in got[1:]) == ["public.m24", "public.m25"]  # each partition's own trigger
    assert {(t, n) for t, n in capture_triggers(pgfeed_conn)} == {
        ("m", f"pgfeed_capture_{changes}"),
        ("m", f"pgfeed_capture_{changes}_truncate"),
        ("m24", f"pgfeed_capture_{changes}"),
        ("m24", f"pgfeed_capture_{changes}_truncate"),
        ("m25", f"pgfeed_capture_{changes}"),
        ("m25", f"pgfeed_capture_{changes}_truncate"),
    }
    assert admin.uncapture(pgfeed_conn, "public", "m", "changes")
    assert capture_triggers(pgfeed_conn) == []


def test_partitions_with_other_attribute_numbers(pgfeed_conn: Conn, changes: int) -> None:
    """A partition's columns may sit at other attribute numbers than its parent's
    (created after a column was dropped, or attached): names come from the parent."""
    pgfeed_conn.execute(
        "CREATE TABLE m (gone int, id int, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)"
    )
    pgfeed_conn.execute("ALTER TABLE m DROP COLUMN gone")
    pgfeed_conn.execute("CREATE TABLE m24 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pgfeed_conn.execute("CREATE TABLE loose (v text, day date NOT NULL, id int NOT NULL)")
    pgfeed_conn.execute("ALTER TABLE m ATTACH PARTITION loose FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    numbers = pgfeed_conn.execute(
        "SELECT attrelid::regclass::text, attnum FROM pg_attribute WHERE attname = 'id' AND attrelid IN"
        " ('m'::regclass, 'm24'::regclass, 'loose'::regclass) ORDER BY 1"
    ).fetchall()
    assert len({n for _, n in numbers}) == 3  # what this test is about
    admin.capture(pgfeed_conn, "public", "m", "changes", columns=["v"])
    pgfeed_conn.execute("INSERT INTO m VALUES (1, '2024-05-01', 'a'), (2, '2025-05-01', 'b')")
    pgfeed_conn.execute("ALTER TABLE m RENAME COLUMN v TO w")
    pgfeed_conn.execute("UPDATE m SET w = w || '!', day = '2025-06-01' WHERE id = 1")  # moves to another partition
    assert [(e["op"], e["partition"], e["key"], e["row"]) for e in events(pgfeed_conn)] == [
        ("insert", "public.m24", {"id": 1, "day": "2024-05-01"}, {"v": "a"}),
        ("insert", "public.loose", {"id": 2, "day": "2025-05-01"}, {"v": "b"}),
        ("delete", "public.m24", {"id": 1, "day": "2024-05-01"}, {"w": "a"}),
        ("insert", "public.loose", {"id": 1, "day": "2025-06-01"}, {"w": "a!"}),
    ]


def test_renamed_columns_are_followed(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE lines (a int, b text, qty int, PRIMARY KEY (a, b))")
    admin.capture(pgfeed_conn, "public", "orders", "changes", columns=["status", "amount"])
    admin.capture(pgfeed_conn, "public", "lines", "changes")  # every column
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new', 2)")
    pgfeed_conn.execute("ALTER TABLE orders RENAME COLUMN id TO order_id")
    pgfeed_conn.execute("ALTER TABLE orders RENAME COLUMN status TO state")
    pgfeed_conn.execute("ALTER TABLE orders RENAME TO purchases")
    pgfeed_conn.execute("ALTER TABLE lines RENAME COLUMN b TO code")
    pgfeed_conn.execute("UPDATE purchases SET state = 'paid'")
    pgfeed_conn.execute("INSERT INTO lines VALUES (1, 'x', 5)")
    pgfeed_conn.execute("DELETE FROM purchases")
    assert events(pgfeed_conn)[1:] == [
        {"op": "update", "table": "public.purchases", "key": {"order_id": 1}, "row": {"state": "paid", "amount": 2}},
        {"op": "insert", "table": "public.lines", "key": {"a": 1, "code": "x"}, "row": {"a": 1, "code": "x", "qty": 5}},
        {"op": "delete", "table": "public.purchases", "key": {"order_id": 1}, "row": {"state": "paid", "amount": 2}},
    ]


def test_added_dropped_and_retyped_columns_of_a_full_capture(pgfeed_conn: Conn, changes: int) -> None:
    admin.capture(pgfeed_conn, "public", "orders", "changes")
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new', 2, 'n')")
    pgfeed_conn.execute("ALTER TABLE orders ADD COLUMN extra int DEFAULT 7, DROP COLUMN note")
    pgfeed_conn.execute("ALTER TABLE orders ALTER COLUMN amount TYPE text")
    pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    assert events(pgfeed_conn)[-1]["row"] == {"id": 1, "status": "paid", "amount": "2", "extra": 7}


def test_a_dropped_key_or_listed_column_fails_writes_loudly(pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, tag text)")
    admin.capture(pgfeed_conn, "public", "orders", "changes", columns=["status", "note"])
    admin.capture(pgfeed_conn, "public", "notes", "changes", key=["tag"])
    pgfeed_conn.execute("ALTER TABLE orders DROP COLUMN amount")  # not captured: fine
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new', 'n')")
    pgfeed_conn.execute("ALTER TABLE orders DROP COLUMN note")
    pgfeed_conn.execute("ALTER TABLE notes DROP COLUMN tag")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as dropped:
        pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    assert str(dropped.value).splitlines()[0] == (
        "pgfeed: capture of public.orders into stream 'changes': its column note was dropped from the table;"
        " run pgfeed capture again or uncapture"
    )
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="its key column tag was dropped"):
        pgfeed_conn.execute("INSERT INTO notes VALUES (1, 'x')")
    assert pgfeed_conn.execute("SELECT status FROM orders").fetchall() == [("new",)]
    assert len(events(pgfeed_conn)) == 1
    # Capturing again resolves the columns anew.
    with pytest.raises(UsageError, match="no column 'note'"):
        admin.capture(pgfeed_conn, "public", "orders", "changes", columns=["status", "note"])
    admin.capture(pgfeed_conn, "public", "orders", "changes", columns=["status"])
    pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    assert events(pgfeed_conn)[-1]["row"] == {"status": "paid"}


def test_skip_unchanged(pgfeed_cmd: Run, pgfeed_conn: Conn, changes: int) -> None:
    pgfeed_conn.execute("ALTER TABLE orders ADD COLUMN doc json")  # no equality operator: compared as JSON
    admin.create_stream(pgfeed_conn, "every")
    admin.capture(pgfeed_conn, "public", "orders", "every")  # the default: every UPDATE appends
    result = pgfeed_cmd("capture", "orders", "--stream", "changes", "--columns", "status", "--skip-unchanged")
    assert result.exit_code == 0, result.output
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new', 1, 'n', '{}')")
    pgfeed_conn.execute("UPDATE orders SET note = 'other', amount = 2")  # no captured column changed
    pgfeed_conn.execute("UPDATE orders SET status = status")
    pgfeed_conn.execute("UPDATE orders SET id = 2")  # the key changed
    pgfeed_conn.execute("UPDATE orders SET status = 'paid'")
    assert [(e["op"], e["key"], e["row"]) for e in events(pgfeed_conn)] == [
        ("insert", {"id": 1}, {"status": "new"}),
        ("update", {"id": 2}, {"status": "new"}),
        ("update", {"id": 2}, {"status": "paid"}),
    ]
    assert len(events(pgfeed_conn, "every")) == 5

    admin.capture(pgfeed_conn, "public", "orders", "every", skip_unchanged=True)  # all columns
    pgfeed_conn.execute("UPDATE orders SET status = status, doc = '{}'")
    pgfeed_conn.execute("UPDATE orders SET doc = '{\"a\": 1}'")
    assert [e["row"]["doc"] for e in events(pgfeed_conn, "every")[5:]] == [{"a": 1}]


def test_a_capture_of_the_previous_release_keeps_working_until_captured_again(pgfeed_conn: Conn, changes: int) -> None:
    # As `pgfeed capture` of the previous release installed it.
    pgfeed_conn.execute(
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW"
            " EXECUTE FUNCTION pgfeed.capture_v1('changes', '[\"id\"]', 'null')"
        ).format(sql.Identifier(f"pgfeed_capture_{changes}"))
    )
    pgfeed_conn.execute("INSERT INTO orders VALUES (1, 'new')")
    assert events(pgfeed_conn)[-1]["key"] == {"id": 1}
    assert admin.list_streams(pgfeed_conn)  # nothing else broke
    admin.capture(pgfeed_conn, "public", "orders", "changes")  # replaces it
    assert capture_triggers(pgfeed_conn) == [
        ("orders", f"pgfeed_capture_{changes}"),
        ("orders", f"pgfeed_capture_{changes}_truncate"),
    ]
    functions = pgfeed_conn.execute(
        "SELECT DISTINCT tgfoid::regprocedure::text FROM pg_trigger WHERE tgrelid = 'orders'::regclass"
    ).fetchall()
    assert functions == [("pgfeed.capture_v2()",)]
    pgfeed_conn.execute("UPDATE orders SET id = 2")
    assert events(pgfeed_conn)[-1]["old_key"] == {"id": 1}
    # uncapture and stream drop find a previous release's trigger too.
    pgfeed_conn.execute("CREATE TABLE old_one (id int PRIMARY KEY)")
    pgfeed_conn.execute(
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT ON old_one FOR EACH ROW"
            " EXECUTE FUNCTION pgfeed.capture_v1('changes', '[\"id\"]', 'null')"
        ).format(sql.Identifier(f"pgfeed_capture_{changes}"))
    )
    assert admin.uncapture(pgfeed_conn, "public", "old_one", "changes")
    pgfeed_conn.execute(
        sql.SQL(
            "CREATE TRIGGER {} AFTER INSERT ON old_one FOR EACH ROW"
            " EXECUTE FUNCTION pgfeed.capture_v1('changes', '[\"id\"]', 'null')"
        ).format(sql.Identifier(f"pgfeed_capture_{changes}"))
    )
    assert admin.drop_stream(pgfeed_conn, "changes") == ["public.old_one", "public.orders"]
    assert capture_triggers(pgfeed_conn) == []


def test_a_writer_cannot_attach_capture_v2(
    pgfeed_server: Any, pgfeed_conn: Conn, changes: int, plain_role: str
) -> None:
    """capture_v2 is SECURITY DEFINER: a writer (here of another stream) must
    not be able to attach it to a table of its own to append anywhere."""
    admin.create_stream(pgfeed_conn, "mine")
    admin.grant_writer(pgfeed_conn, plain_role, ["mine"])
    r = sql.Identifier(plain_role)
    pgfeed_conn.execute(sql.SQL("CREATE SCHEMA own AUTHORIZATION {}").format(r))
    try:
        with psycopg.connect(pgfeed_server.dsn_for(pgfeed_conn.info.dbname, user=plain_role), autocommit=True) as app:
            app.execute("CREATE TABLE own.t (id int PRIMARY KEY)")
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match=r"permission denied for function pgfeed\.capture_v2"
            ):
                app.execute(
                    "CREATE TRIGGER t AFTER INSERT ON own.t FOR EACH ROW"
                    " EXECUTE FUNCTION pgfeed.capture_v2('changes', '{\"key\": [1]}')"
                )
    finally:
        pgfeed_conn.execute(sql.SQL("DROP OWNED BY {}").format(r))
