"""Every public entry point works on the caller's connection whatever its row
factory (tuple_row, dict_row) and under a repeatable-read default isolation:
pgfeed must not depend on how the application configured its connections."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row, tuple_row

import pgfeed
from pgfeed import admin, migrator, retention, status

REPEATABLE_READ = "-c default_transaction_isolation=repeatable\\ read"
CONFIGS = {
    "tuple_row": (tuple_row, None),
    "dict_row": (dict_row, None),
    "repeatable_read": (tuple_row, REPEATABLE_READ),
    "dict_row_repeatable_read": (dict_row, REPEATABLE_READ),
}


@pytest.fixture(params=list(CONFIGS))
def app_dsn(request: pytest.FixtureRequest, pgfeed_dsn: str) -> str:
    """The test database's DSN with the configuration's server options."""
    _, options = CONFIGS[request.param]
    return make_conninfo(pgfeed_dsn, options=options) if options else pgfeed_dsn


@pytest.fixture
def app_conn(request: pytest.FixtureRequest, app_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection configured as an application might."""
    factory, _ = CONFIGS[request.node.callspec.params["app_dsn"]]
    with psycopg.connect(app_dsn, autocommit=True, row_factory=factory) as conn:
        yield conn


def test_sync_entry_points(app_dsn: str, app_conn: psycopg.Connection[Any], make_role: Any) -> None:
    shown = app_conn.cursor(row_factory=tuple_row).execute("SHOW default_transaction_isolation").fetchone()
    assert shown == ("repeatable read" if "repeatable" in app_dsn else "read committed",)
    migrator.migrate(app_conn)
    assert migrator.status(app_conn).pending == []
    sid = admin.create_stream(app_conn, "orders")
    assert admin.stream_id(app_conn, "orders") == sid
    assert {s.name for s in admin.list_streams(app_conn)} >= {"caches", "orders"}
    role = make_role()
    admin.grant_writer(app_conn, role, ["orders"])
    admin.grant_writer(app_conn, role)  # every stream, present and future
    admin.grant_reader(app_conn, role)
    with app_conn.transaction():
        assert isinstance(pgfeed.append(app_conn, "orders", {"id": 1}), int)
        assert pgfeed.append_many(app_conn, "orders", [{"id": 2}, {"id": 3}]) == 2
        assert isinstance(pgfeed.invalidate(app_conn, "users", ["1"]), int)
    assert isinstance(pgfeed.commit_token(app_conn), pgfeed.CommitToken)
    assert status.schema_version(app_conn) == status.expected_version()
    assert [s.name for s in status.gather(app_conn, ["orders"], sessions=False).streams] == ["orders"]
    status.check(app_conn, streams=["orders"])
    retention.prune(app_conn, 3600, dry_run=True)
    assert admin.drop_stream(app_conn, "orders") is not None


async def test_async_entry_points(app_dsn: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    async with await psycopg.AsyncConnection.connect(app_dsn, row_factory=dict_row) as conn:
        assert isinstance(await pgfeed.append(conn, "orders", {"id": 1}), int)
        assert await pgfeed.append_many(conn, "orders", [{"id": 2}]) == 1
        assert isinstance(await pgfeed.invalidate(conn, "users", None), int)
        await conn.commit()
        token = await pgfeed.commit_token(conn)
    # The readers use their own connections from the same DSN (its server options included).
    async with pgfeed.AsyncReader(app_dsn) as reader:
        got: list[int] = []
        await reader.on("orders", lambda b: got.extend(r.payload["id"] for r in b.rows))
        await reader.wait_for("orders", token, timeout=10)
        assert got == [1, 2]
    with pgfeed.Reader(app_dsn) as sync_reader:
        got_sync: list[int] = []
        sync_reader.on("orders", lambda b: got_sync.extend(r.payload["id"] for r in b.rows))
        sync_reader.wait_for("orders", str(token), timeout=10)
        assert got_sync == [1, 2]
