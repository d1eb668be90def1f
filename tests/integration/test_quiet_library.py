"""Nothing pgfeed does appears on the host program's stdout or stderr unless the
program configures logging; then the events arrive through stdlib logging."""

from __future__ import annotations

import subprocess
import sys

from pgfeed.testing import TestServer

#: A host program: migrates, opens a reader, appends and waits for the row,
#: then drops and recreates the stream under the reader (a reset: warnings)
#: and closes it; then the same with the threaded reader.
PROGRAM = """
import asyncio
import logging
import sys

import psycopg

import pgfeed
from pgfeed import admin, migrator

dsn, mode = sys.argv[1:]
if mode == "basic":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


async def main() -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrator.migrate(conn)
        admin.create_stream(conn, "orders")
    payloads = []
    reset = asyncio.Event()
    reader = pgfeed.AsyncReader(dsn, poll_interval=0.2)
    reader.on("orders", lambda batch: payloads.extend(row.payload for row in batch))
    reader.on_reset(lambda stream, reason: reset.set())
    async with reader:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await pgfeed.append(conn, "orders", {"id": 1})
            token = await pgfeed.commit_token(conn)
        await reader.wait_for("orders", token, timeout=30)
        assert payloads == [{"id": 1}], payloads
        with psycopg.connect(dsn, autocommit=True) as conn:
            admin.drop_stream(conn, "orders")
            admin.create_stream(conn, "orders")
        await asyncio.wait_for(reset.wait(), 30)


asyncio.run(main())

with pgfeed.Reader(dsn) as reader:  # the threaded reader too
    reader.on("orders", lambda batch: None, since="earliest")
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            pgfeed.append(conn, "orders", {"id": 2})
        reader.wait_for("orders", pgfeed.commit_token(conn), timeout=30)
"""


#: A host program whose readers' backends are killed again and again: each
#: time it waits (read-your-writes) until its reader delivers a new row, so the
#: pools lost connections and replaced them. With logging configured
#: ("basic"), it also has a pool of its own, one of whose connections is killed.
KILLS_PROGRAM = """
import asyncio
import logging
import sys

import psycopg
from psycopg_pool import ConnectionPool

import pgfeed
from pgfeed import admin, migrator

dsn, mode = sys.argv[1:]
if mode == "basic":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
KILL = (
    "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> ALL(%s)"
)


def kill_and_write(conn, n, spare=()):
    (killed,) = conn.execute(KILL, (list(spare),)).fetchone()
    assert killed >= 2, killed  # at least the listener and a pooled connection
    pgfeed.append(conn, "orders", n)
    return pgfeed.commit_token(conn)


async def main(conn):
    async with pgfeed.AsyncReader(dsn, poll_interval=0.2) as reader:
        await reader.on("orders", lambda batch: None, since="now")
        for n in range(3):
            await reader.wait_for("orders", kill_and_write(conn, n), timeout=60)


with psycopg.connect(dsn, autocommit=True) as conn:
    migrator.migrate(conn)
    admin.create_stream(conn, "orders")
    asyncio.run(main(conn))
    with pgfeed.Reader(dsn, poll_interval=0.2) as reader:
        reader.on("orders", lambda batch: None, since="now")
        for n in range(3):
            reader.wait_for("orders", kill_and_write(conn, n), timeout=60)
    if mode == "basic":
        with ConnectionPool(dsn, min_size=1, max_size=1, name="the-app", open=True) as pool:
            try:
                with pool.connection() as own:
                    conn.execute("SELECT pg_terminate_backend(%s, 10000)", (own.info.backend_pid,))
                    own.execute("SELECT 1")
            except psycopg.OperationalError:
                pass
"""


def host_program(dsn: str, mode: str, program: str = PROGRAM) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", program, dsn, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_without_logging_configured_nothing_is_printed(pgfeed_server: TestServer, fresh_db: str) -> None:
    done = host_program(pgfeed_server.dsn_for(fresh_db), "quiet")
    assert (done.stdout, done.stderr) == ("", "")


def test_with_basic_config_the_events_arrive_with_their_key_values(pgfeed_server: TestServer, fresh_db: str) -> None:
    done = host_program(pgfeed_server.dsn_for(fresh_db), "basic")
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert any(line.startswith("INFO pgfeed.migrate: migration applied version=1 name=") for line in lines), lines
    assert "INFO pgfeed.reader: reader opened" in lines
    warnings = [line for line in lines if line.startswith("WARNING pgfeed.reader: ")]
    assert warnings, lines
    assert all("stream=orders" in line for line in warnings), warnings


def test_killed_backends_print_nothing_without_logging_configured(pgfeed_server: TestServer, fresh_db: str) -> None:
    """psycopg_pool's warnings about pgfeed's pools ("discarding closed
    connection") reached Python's last-resort handler on stderr."""
    done = host_program(pgfeed_server.dsn_for(fresh_db), "quiet", KILLS_PROGRAM)
    assert (done.stdout, done.stderr) == ("", "")


def test_with_logging_configured_pgfeeds_pool_records_arrive_as_pgfeed_pool(
    pgfeed_server: TestServer, fresh_db: str
) -> None:
    done = host_program(pgfeed_server.dsn_for(fresh_db), "basic", KILLS_PROGRAM)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    ours = [line for line in lines if line.startswith("WARNING pgfeed.pool: discarding closed connection")]
    assert ours, lines
    # The application's own pool still logs as psycopg_pool does: nothing of it is moved or lost.
    theirs = [line for line in lines if line.startswith("WARNING psycopg.pool: ")]
    assert len(theirs) == 1, theirs
    assert theirs[0].startswith("WARNING psycopg.pool: discarding closed connection: <psycopg.Connection [BAD]")
