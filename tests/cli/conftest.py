"""Fixtures for the tests of the ``pgfeed`` command, against the real test server."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from helpers import Run, make_role, run_cli

from pgfeed import admin

__all__ = ["make_role"]  # a fixture, shared with other test folders through helpers


@pytest.fixture
def pgfeed_cmd(pgfeed_dsn: str) -> Run:
    """The CLI in this process against the test database: ``pgfeed_cmd("stream", "list")``."""

    def run(*args: str, **kwargs: Any) -> Any:
        return run_cli(pgfeed_dsn, *args, **kwargs)

    return run


@pytest.fixture
def stream(pgfeed_conn: psycopg.Connection[Any]) -> str:
    """Stream ``orders``, empty."""
    admin.create_stream(pgfeed_conn, "orders")
    return "orders"
