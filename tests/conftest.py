"""Shared test setup. The real-PostgreSQL fixtures come from the pgfeed.testing plugin."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from pgfeed.testing import TestServer, drop_database


@pytest.fixture
def fresh_db(pgfeed_server: TestServer) -> Iterator[str]:
    """Name of an empty database: pgfeed never migrated into it."""
    name = f"pgfeed_fresh_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_database(pgfeed_server, name)
