"""What a reader process holds: its connections, and the process it was opened in."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
from test_handlers import append
from test_sync_reader import in_child

import pgfeed
from pgfeed import admin
from pgfeed.errors import ForkedReader


@pytest.fixture
def stream(pgfeed_conn: psycopg.Connection[Any]) -> str:
    admin.create_stream(pgfeed_conn, "orders")
    return "orders"


def backends(conn: psycopg.Connection[Any]) -> set[int]:
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return {int(pid) for (pid,) in rows}


# -- forks -------------------------------------------------------------------
async def test_an_async_reader_used_in_a_forked_child_fails_at_once_and_the_parent_keeps_working(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        got: list[object] = []
        await reader.on(stream, lambda b: got.extend(r.payload["id"] for r in b), since="now")
        before = backends(pgfeed_conn)
        parent = os.getpid()

        def child() -> None:
            with pytest.raises(ForkedReader) as caught:
                reader.position(stream)
            message = str(caught.value)
            assert f"opened in process {parent} before a fork" in message
            assert "post_worker_init" in message
            # Coroutine methods refuse before their first await: no event loop needed.
            for call in (reader.wait_for(stream, "1", timeout=1), reader.subscribe(stream)):
                with pytest.raises(ForkedReader):
                    call.send(None)
            with pytest.raises(ForkedReader):
                reader.on(stream, print)
            # close() in the child forgets the parent's connections without touching them.
            with pytest.raises(StopIteration):
                reader.close().send(None)
            assert reader.position(stream) is None  # closed now, no longer inherited

        assert in_child(child) == "ok"
        token = append(pgfeed_conn, stream, "after the fork")
        await reader.wait_for(stream, token, timeout=15)
        assert got == ["after the fork"]
        assert before <= backends(pgfeed_conn), "the child's close() ended a connection of the parent"
