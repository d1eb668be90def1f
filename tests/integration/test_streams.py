"""`pgfeed stream create/list/drop` and `pgfeed.create_stream_v1` against a real server."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from helpers import Run, one_line_error
from ticking import take_tick

from pgfeed import admin
from pgfeed.core.names import STREAM_NAME_RULE
from pgfeed.errors import StreamExists


def streams(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int, str]]:
    """name -> (id, max_payload_bytes, notify_mode)."""
    rows = conn.execute("SELECT name, id, max_payload_bytes, notify_mode FROM pgfeed.streams").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def pgfeed_relations(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgfeed'"
    ).fetchall()
    return {r[0] for r in rows}


def all_relations(conn: psycopg.Connection[Any]) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


# -- create / list / drop -------------------------------------------------------


def test_create_list_drop(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    created = pgfeed_cmd("stream", "create", "orders")
    assert created.exit_code == 0, created.output
    assert created.stdout == "created stream orders\n"
    sid = streams(pgfeed_conn)["orders"][0]
    assert f"events_{sid}" in pgfeed_relations(pgfeed_conn)
    assert streams(pgfeed_conn)["orders"] == (sid, 1048576, "ticker")

    with pgfeed_conn.transaction():
        pgfeed_conn.execute("SELECT pgfeed.append('orders', '{\"id\": 1}'::jsonb)")
        pgfeed_conn.execute("SELECT pgfeed.append('orders', '{\"id\": 2}'::jsonb)")

    listed = pgfeed_cmd("stream", "list")
    assert listed.exit_code == 0, listed.output
    header, *lines = listed.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "ROWS", "HEAD", "NOTIFY"]
    by_name = {line.split()[0]: line.split() for line in lines}
    assert set(by_name) == {"caches", "orders"}
    assert by_name["orders"][1] == "2"
    assert by_name["caches"][1] == "0"
    assert by_name["orders"][3] == "ticker"

    take_tick(pgfeed_conn)  # what the ticker does once rows commit
    as_json = pgfeed_cmd("stream", "list", "--json")
    assert as_json.exit_code == 0, as_json.output
    infos = {i["name"]: i for i in json.loads(as_json.stdout)}
    assert set(infos) == {"caches", "orders"}
    orders = infos["orders"]
    assert orders["rows"] == 2
    assert orders["notify_mode"] == "ticker"
    assert orders["max_payload_bytes"] == 1048576
    assert orders["id"] == sid
    assert orders["last_append"] is not None
    # The head is a position token that covers both committed rows.
    head = int(orders["head"])
    snap = pgfeed_conn.execute("SELECT snap::text FROM pgfeed.ticks WHERE id = %s", (head,)).fetchone()
    assert snap is not None
    visible = pgfeed_conn.execute(
        "SELECT count(*) FROM pgfeed.events WHERE stream_id = %s AND pg_visible_in_snapshot(xid, %s::pg_snapshot)",
        (sid, snap[0]),
    ).fetchone()
    assert visible == (2,)
    # Listing takes no tick (readers never write): the earlier table's head is at most the later one.
    assert 0 < int(by_name["orders"][2]) <= head
    assert by_name["orders"][2] == by_name["caches"][2]

    refused = pgfeed_cmd("stream", "drop", "orders")
    assert refused.exit_code != 0
    assert "--yes" in one_line_error(refused)
    assert "orders" in streams(pgfeed_conn)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events WHERE stream_id = %s", (sid,)).fetchone() == (2,)

    dropped = pgfeed_cmd("stream", "drop", "orders", "--yes")
    assert dropped.exit_code == 0, dropped.output
    assert dropped.stdout == "dropped stream orders\n"
    assert "orders" not in streams(pgfeed_conn)
    assert f"events_{sid}" not in pgfeed_relations(pgfeed_conn)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (0,)


def test_empty_list_json_is_valid(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    assert pgfeed_cmd("stream", "drop", "caches", "--yes").exit_code == 0
    result = pgfeed_cmd("stream", "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_creating_an_existing_stream_says_so_and_changes_nothing(
    pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    assert pgfeed_cmd("stream", "create", "orders", "--max-payload-bytes", "500").exit_code == 0
    pgfeed_conn.execute("SELECT pgfeed.append('orders', '1'::jsonb)")
    before = streams(pgfeed_conn)
    relations = pgfeed_relations(pgfeed_conn)
    ticks = pgfeed_conn.execute("SELECT count(*) FROM pgfeed.ticks").fetchone()

    again = pgfeed_cmd("stream", "create", "orders", "--notify", "poll")
    assert again.exit_code == 0, again.output
    assert again.stdout == ""
    assert "orders" in again.stderr
    assert "already exists" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert streams(pgfeed_conn) == before
    assert pgfeed_relations(pgfeed_conn) == relations
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.ticks").fetchone() == ticks
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (1,)


def test_create_options(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    assert pgfeed_cmd("stream", "create", "small", "--max-payload-bytes", "100").exit_code == 0
    assert pgfeed_cmd("stream", "create", "quiet", "--notify", "poll").exit_code == 0
    assert pgfeed_cmd("stream", "create", "loud", "--notify", "immediate").exit_code == 0
    got = streams(pgfeed_conn)
    assert got["small"][1:] == (100, "ticker")
    assert got["quiet"][1:] == (1048576, "poll")
    assert got["loud"][1:] == (1048576, "immediate")
    infos = {i["name"]: i for i in json.loads(pgfeed_cmd("stream", "list", "--json").stdout)}
    assert infos["quiet"]["notify_mode"] == "poll"
    assert infos["small"]["max_payload_bytes"] == 100


BAD_CREATE_OPTIONS = [
    ("--max-payload-bytes", "0"),
    ("--max-payload-bytes", "-5"),
    ("--max-payload-bytes", "lots"),
    ("--max-payload-bytes", "4294967296"),
    ("--notify", "sometimes"),
]


def test_bad_create_options_create_nothing(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    before = all_relations(pgfeed_conn)
    for args in BAD_CREATE_OPTIONS:
        result = pgfeed_cmd("stream", "create", "orders", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        assert "orders" not in streams(pgfeed_conn)
        assert all_relations(pgfeed_conn) == before


def test_drop_unknown_stream(pgfeed_cmd: Run) -> None:
    line = one_line_error(pgfeed_cmd("stream", "drop", "nosuch", "--yes"))
    assert "nosuch" in line


def test_drop_then_recreate_gets_a_new_incarnation(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    assert pgfeed_cmd("stream", "create", "orders").exit_code == 0
    pgfeed_conn.execute("SELECT pgfeed.append('orders', '1'::jsonb)")
    old_id = streams(pgfeed_conn)["orders"][0]
    assert pgfeed_cmd("stream", "drop", "orders", "--yes").exit_code == 0
    assert pgfeed_cmd("stream", "create", "orders").exit_code == 0
    new_id = streams(pgfeed_conn)["orders"][0]
    assert new_id != old_id
    infos = {i["name"]: i for i in json.loads(pgfeed_cmd("stream", "list", "--json").stdout)}
    assert infos["orders"]["rows"] == 0


# -- the name rule ------------------------------------------------------------

BAD_NAMES = [
    "Orders",
    "ORDERS",
    "order-lines",
    "order lines",
    "it's",
    '"orders"',
    "orders;",
    "",
    "a" * 64,
    "café",
    "ｏｒｄｅｒｓ",
    "1orders",
    "_orders",
    "orders\n",
    "x'); DROP TABLE pgfeed.streams; --",
    'x"; DROP SCHEMA pgfeed CASCADE; --',
    "orders; DROP TABLE pgfeed.streams",
]


def test_bad_names_are_refused_by_the_cli(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    before_streams = streams(pgfeed_conn)
    before = all_relations(pgfeed_conn)
    for name in BAD_NAMES:
        for args in (("stream", "create", name), ("stream", "drop", name, "--yes")):
            result = pgfeed_cmd(*args)
            assert result.exit_code == 2, (name, result.output)
            line = one_line_error(result)
            assert STREAM_NAME_RULE in line
            assert repr(name) in line
    assert streams(pgfeed_conn) == before_streams
    assert all_relations(pgfeed_conn) == before


def test_bad_names_are_refused_by_sql(pgfeed_conn: psycopg.Connection[Any]) -> None:
    before = all_relations(pgfeed_conn)
    for name in BAD_NAMES:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            pgfeed_conn.execute("SELECT pgfeed.create_stream_v1(%s)", (name,))
        assert "invalid stream name" in str(err.value)
        assert err.value.diag.message_hint is not None
        assert "63" in err.value.diag.message_hint
    assert set(streams(pgfeed_conn)) == {"caches"}
    assert all_relations(pgfeed_conn) == before


def test_sql_null_name_is_refused(pgfeed_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="NULL"):
        pgfeed_conn.execute("SELECT pgfeed.create_stream_v1(NULL)")


def test_longest_name_works(pgfeed_cmd: Run, pgfeed_conn: psycopg.Connection[Any]) -> None:
    name = "s" + "0123456789" * 6 + "_x"
    assert len(name) == 63
    result = pgfeed_cmd("stream", "create", name)
    assert result.exit_code == 0, result.output
    assert name in streams(pgfeed_conn)
    pgfeed_conn.execute("SELECT pgfeed.append(%s, '{}'::jsonb)", (name,))
    infos = {i["name"]: i for i in json.loads(pgfeed_cmd("stream", "list", "--json").stdout)}
    assert infos[name]["rows"] == 1
    assert pgfeed_cmd("stream", "drop", name, "--yes").exit_code == 0


def test_sql_create_of_an_existing_stream_is_refused_cleanly(pgfeed_conn: psycopg.Connection[Any]) -> None:
    pgfeed_conn.execute("SELECT pgfeed.create_stream_v1('orders')")
    before = all_relations(pgfeed_conn)
    with pytest.raises(psycopg.errors.DuplicateObject, match="orders"):
        pgfeed_conn.execute("SELECT pgfeed.create_stream_v1('orders')")
    assert all_relations(pgfeed_conn) == before


def test_sql_create_checks_its_options(pgfeed_conn: psycopg.Connection[Any]) -> None:
    before = all_relations(pgfeed_conn)
    for args in [(0, "immediate"), (-1, "poll"), (None, "immediate"), (100, "sometimes"), (100, None)]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid"):
            pgfeed_conn.execute("SELECT pgfeed.create_stream_v1('orders', %s, %s)", args)
        assert all_relations(pgfeed_conn) == before
        assert "orders" not in streams(pgfeed_conn)


def test_concurrent_creates_make_one_stream(pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    barrier = threading.Barrier(4)

    def create() -> str:
        with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
            barrier.wait()
            try:
                admin.create_stream(conn, "orders")
                return "created"
            except StreamExists:
                return "exists"

    with ThreadPoolExecutor(4) as pool:
        outcomes = sorted(pool.map(lambda _: create(), range(4)))
    assert outcomes == ["created", "exists", "exists", "exists"]
    partitions = {f"events_{sid}" for sid, _, _ in streams(pgfeed_conn).values()}
    assert len(partitions) == 2  # caches and orders
    assert {r for r in pgfeed_relations(pgfeed_conn) if r.startswith("events_") and "seq" not in r} == partitions
