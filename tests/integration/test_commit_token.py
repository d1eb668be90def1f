"""commit_token() names nothing but what the connection just committed, and a
committed write is never reported as failed. Against a real server: ticks are
taken by hand (``take_tick``) so that what a token covers is decided, not raced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from ticking import take_tick

import pgfeed
from pgfeed import admin
from pgfeed.errors import CommitTokenUnavailable, UsageError

Conn = psycopg.Connection[Any]


class CallerFailed(Exception):
    """Raised inside a transaction block to make psycopg roll it back."""


@pytest.fixture
def stream(pgfeed_conn: Conn) -> str:
    admin.create_stream(pgfeed_conn, "orders")
    return "orders"


@pytest.fixture
def writer(pgfeed_dsn: str) -> Iterator[Conn]:
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        yield conn


def resolves_to(conn: Conn, token: pgfeed.CommitToken) -> int | None:
    """The tick the server resolves ``token`` to now; None while no tick covers it."""
    row = conn.execute("SELECT pgfeed.resolve_token_v2(%s)", (str(token),)).fetchone()
    assert row is not None
    return None if row[0] is None else int(row[0])


def append_then_fail(conn: Conn, stream: str) -> None:
    with conn.transaction():
        pgfeed.append(conn, stream, "rolled back")
        raise CallerFailed


def plain_sql_append(conn: Conn, stream: str, payload: str) -> None:
    """An append the writer module never sees (another driver would do the same)."""
    conn.execute("SELECT pgfeed.append(%s, to_jsonb(%s::text))", (stream, payload))


def delivered_after(pgfeed_dsn: str, stream: str, token: pgfeed.CommitToken) -> list[Any]:
    """What a reader (which never ticks) has delivered once ``wait_for(token)`` returned."""
    got: list[Any] = []
    with pgfeed.Reader(pgfeed_dsn, ticker="off") as reader:
        reader.on(stream, lambda batch: got.extend(row.payload for row in batch), since="earliest")
        reader.wait_for(stream, token, timeout=15)
        return list(got)


def test_a_later_plain_sql_transaction_is_what_the_token_covers(
    pgfeed_dsn: str, pgfeed_conn: Conn, writer: Conn, stream: str
) -> None:
    pgfeed.append(writer, stream, "A")  # its own transaction, committed; no token taken for it
    take_tick(pgfeed_conn)  # A is delivered from here on
    plain_sql_append(writer, stream, "B")
    token = pgfeed.commit_token(writer)

    # The token must wait for B: A's transaction is long covered, B's is not yet.
    assert resolves_to(pgfeed_conn, token) is None
    tick = take_tick(pgfeed_conn)
    assert resolves_to(pgfeed_conn, token) == tick.tick
    assert delivered_after(pgfeed_dsn, stream, token) == ["A", "B"]


def test_a_rolled_back_append_is_not_what_the_next_commit_gets(
    pgfeed_dsn: str, pgfeed_conn: Conn, writer: Conn, stream: str
) -> None:
    with pytest.raises(CallerFailed):
        append_then_fail(writer, stream)
    plain_sql_append(writer, stream, "B")
    token = pgfeed.commit_token(writer)

    assert resolves_to(pgfeed_conn, token) is None  # B is not in any tick yet
    tick = take_tick(pgfeed_conn)
    assert resolves_to(pgfeed_conn, token) == tick.tick
    assert delivered_after(pgfeed_dsn, stream, token) == ["B"]


@pytest.mark.parametrize("autocommit", [True, False])
def test_commit_token_leaves_the_connection_idle(pgfeed_dsn: str, stream: str, autocommit: bool) -> None:
    with psycopg.connect(pgfeed_dsn, autocommit=autocommit) as conn:
        with conn.transaction():
            pgfeed.append(conn, stream, 1)
        for _ in range(2):
            assert isinstance(pgfeed.commit_token(conn), pgfeed.CommitToken)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with conn.transaction(), pytest.raises(UsageError, match="after COMMIT"):
            pgfeed.commit_token(conn)


def kill(pgfeed_conn: Conn, pid: int) -> None:
    """Terminate backend ``pid`` from another connection; returns once it is gone."""
    row = pgfeed_conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
    assert row == (True,)


def test_a_backend_killed_after_commit_is_a_committed_write_without_a_token(
    pgfeed_dsn: str, pgfeed_conn: Conn, writer: Conn, stream: str
) -> None:
    with writer.transaction():
        pgfeed.append(writer, stream, "committed")
    kill(pgfeed_conn, writer.info.backend_pid)

    for _ in range(2):  # the second call knows the connection is gone: still the same answer
        with pytest.raises(CommitTokenUnavailable) as caught:
            pgfeed.commit_token(writer)
        message = str(caught.value)
        assert message.startswith("the write is committed"), message
        assert "\n" not in message
        assert "another connection" in message
    # As the message says: a token from another connection covers the write.
    token = pgfeed.commit_token(pgfeed_conn)
    take_tick(pgfeed_conn)
    assert delivered_after(pgfeed_dsn, stream, token) == ["committed"]


async def test_an_async_connection_killed_after_commit(pgfeed_dsn: str, pgfeed_conn: Conn, stream: str) -> None:
    async with await psycopg.AsyncConnection.connect(pgfeed_dsn, autocommit=True) as conn:
        async with conn.transaction():
            await pgfeed.append(conn, stream, "committed")
        kill(pgfeed_conn, conn.info.backend_pid)
        for _ in range(2):
            with pytest.raises(CommitTokenUnavailable, match=r"^the write is committed"):
                await pgfeed.commit_token(conn)
