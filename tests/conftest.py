"""Shared test setup. The real-PostgreSQL fixtures come from the pgfeed.testing plugin."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from helpers import Run, run_cli
from psycopg import sql

if TYPE_CHECKING:  # imported by pytest as a plugin below, which must come first to rewrite its asserts
    from pgfeed.testing import TestServer

# The plugin is opt-in: installing pgfeed does not load it into every pytest run.
# An environment installed from an older pgfeed still has the pytest11 entry
# point that loaded it already, and pytest refuses to load it twice.
if "pgfeed.testing" not in {ep.value for ep in entry_points(group="pytest11")}:
    pytest_plugins = ["pgfeed.testing"]


#: Folders whose tests build several servers or many processes: marked slow,
#: so that .ci/run's second pass (another PostgreSQL major) can leave them out.
SLOW_FOLDERS = ("stress", "multiserver")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(part in SLOW_FOLDERS for part in item.path.parts):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def stream(pgfeed_conn: psycopg.Connection[Any]) -> str:
    """Stream ``orders``, empty."""
    from pgfeed import admin

    admin.create_stream(pgfeed_conn, "orders")
    return "orders"


@pytest.fixture
def pgfeed_cmd(pgfeed_dsn: str) -> Run:
    """The CLI in this process against the test database: ``pgfeed_cmd("stream", "list")``."""

    def run(*args: str, **kwargs: Any) -> Any:
        return run_cli(pgfeed_dsn, *args, **kwargs)

    return run


@pytest.fixture
def make_role(pgfeed_server: TestServer, pgfeed_dsn: str) -> Iterator[Callable[[], str]]:
    """Create LOGIN roles; each is stripped of its privileges and dropped afterwards."""
    created: list[str] = []

    def make() -> str:
        name = f"pgfeed_role_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        created.append(name)
        return name

    yield make
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        existing = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (created,))}
        for role in existing:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        for role in existing:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def fresh_db(pgfeed_server: TestServer) -> Iterator[str]:
    """Name of an empty database: pgfeed never migrated into it."""
    from pgfeed.testing import drop_database

    name = f"pgfeed_fresh_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(pgfeed_server, name)
