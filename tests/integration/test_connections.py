"""What a reader process holds: its connections, and the process it was opened in."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from helpers import PGFEED, JsonLines
from psycopg import conninfo as pg_conninfo
from test_handlers import append
from test_sync_reader import in_child
from ticking import daemon, wait_for_leader

import pgfeed
from pgfeed import admin
from pgfeed.connect import LIBPQ_ENV
from pgfeed.errors import ForkedReader


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


# -- connections ---------------------------------------------------------------
STREAMS = ("s_one", "s_two", "s_three")

#: A reader process following 3 streams with 2 callback subscriptions each; a
#: JSON line per delivered row (after "ready"), until stdin closes.
READER_PROCESS = """
import asyncio, json, sys
import pgfeed

async def main(dsn, streams):
    async with pgfeed.AsyncReader(dsn, ticker_lease=3) as reader:
        for stream in streams:
            for sub in ("a", "b"):
                async def show(batch, stream=stream, sub=sub):
                    for row in batch:
                        print(json.dumps({"stream": stream, "sub": sub, "id": row.payload["id"]}), flush=True)
                await reader.on(stream, show, since="now")
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.read)

asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""


@pytest.fixture
def streams(pgfeed_conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    for name in STREAMS:
        admin.create_stream(pgfeed_conn, name)
    return STREAMS


def reader_backends(conn: psycopg.Connection[Any], pid: int) -> tuple[int, bool]:
    """(backends of this database that process ``pid`` holds, whether its ticker
    leads): its TCP connections, as the OS lists them, matched to the backends'
    client ports. A connection opened for a moment (a claim, a probe) counts
    too, if it is open when sampled."""
    ports = [c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == "ESTABLISHED"]
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND client_port = ANY(%s)),"
        "       EXISTS (SELECT 1 FROM pgfeed.ticker WHERE holder LIKE %s AND expires_at > clock_timestamp())",
        (ports, f"% pid {pid}"),
    ).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


def run_and_count(dsn: str, conn: psycopg.Connection[Any], rounds: int = 40) -> tuple[list[int], list[bool], int]:
    """Start the reader process, write to every stream while sampling its
    backends; (counts, leading at each sample, rows it delivered)."""
    if conn.info.host.startswith("/"):
        pytest.skip("counts a process's connections through their TCP ports: needs a server reached over TCP")
    proc = subprocess.Popen(
        [sys.executable, "-c", READER_PROCESS, dsn, *STREAMS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = JsonLines(proc)
        assert lines.take(1, timeout=30) == [{"ready": True}]
        counts: list[int] = []
        leading: list[bool] = []
        for i in range(rounds):
            for stream in STREAMS:
                pgfeed.append(conn, stream, {"id": i})
            count, leads = reader_backends(conn, proc.pid)
            counts.append(count)
            leading.append(leads)
        delivered = lines.take(rounds * len(STREAMS) * 2, timeout=60)
        return counts, leading, len(delivered)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_reader_process_holds_two_connections_while_another_process_ticks(
    pgfeed_dsn: str, streams: tuple[str, ...], pgfeed_conn: psycopg.Connection[Any]
) -> None:
    with daemon(pgfeed_dsn):
        counts, leading, delivered = run_and_count(pgfeed_dsn, pgfeed_conn)
    assert delivered == 40 * 3 * 2
    assert not any(leading), "the daemon should lead, not the reader"
    assert max(counts) <= 2, counts
    assert min(counts) >= 2, f"the listener and the read connection were not both found: {counts}"


def test_a_reader_process_holds_three_connections_while_it_ticks(
    pgfeed_dsn: str, streams: tuple[str, ...], pgfeed_conn: psycopg.Connection[Any]
) -> None:
    counts, leading, delivered = run_and_count(pgfeed_dsn, pgfeed_conn)
    assert delivered == 40 * 3 * 2
    assert all(leading), "nobody else may tick: the reader's embedded ticker must lead"
    assert max(counts) <= 3, counts
    assert min(counts) == 3, counts


async def test_a_following_reader_takes_a_resigned_lease_at_once_without_a_connection_of_its_own(
    pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    lease = 30.0  # a follower without the resignation's NOTIFY would claim only after ~lease/3
    first = await pgfeed.AsyncReader(pgfeed_dsn, ticker_lease=lease).open()
    try:
        term = await asyncio.to_thread(wait_for_leader, pgfeed_dsn, kind="reader")
        async with pgfeed.AsyncReader(pgfeed_dsn, ticker_lease=lease) as second:
            assert second._ticker is not None
            assert not second._ticker.leading
            await first.close()
            resigned = time.monotonic()
            await asyncio.to_thread(wait_for_leader, pgfeed_dsn, kind="reader", above_term=term, timeout=lease / 3)
            assert time.monotonic() - resigned < 3
            assert second._ticker.leading
    finally:
        await first.close()


# -- the DSN and the embedded server, through the real CLI ----------------------
def pgfeed_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGFEED, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts: it is not running)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who configured nothing: no DSN, no libpq
    variables, an embedded server home of its own."""
    env = {k: v for k, v in os.environ.items() if k not in LIBPQ_ENV and not k.startswith("PGFEED_")}
    env["PGFEED_HOME"] = str(tmp_path / "home")
    return env


def test_pgfeed_dsn_prints_the_dsn_pgfeed_would_use(bare_env: dict[str, str]) -> None:
    given = pgfeed_cli("--dsn", "host=db.example dbname=shop", "dsn", env=bare_env)
    assert (given.returncode, given.stdout) == (0, "host=db.example dbname=shop\n")
    from_env = pgfeed_cli("dsn", env={**bare_env, "PGFEED_DSN": "postgresql://app@db.example/shop"})
    assert from_env.stdout == "postgresql://app@db.example/shop\n"
    libpq = pgfeed_cli("dsn", env={**bare_env, "PGHOST": "db.example", "PGPORT": "6543"})
    assert libpq.returncode == 0, libpq.stderr
    assert pg_conninfo.conninfo_to_dict(libpq.stdout.strip()) == {"host": "db.example", "port": "6543"}
    assert not (Path(bare_env["PGFEED_HOME"]) / "pgdata").exists(), "no embedded server is needed for those"


def test_the_embedded_server_dsn_psql_status_and_stop(bare_env: dict[str, str]) -> None:
    try:
        started = pgfeed_cli("dsn", env=bare_env)
        assert started.returncode == 0, started.stderr
        dsn = started.stdout.strip()
        assert len(started.stdout.splitlines()) == 1
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The public function says the same.
        code = "import pgfeed; print(pgfeed.embedded_dsn()); print(pgfeed.connect.resolve().conninfo)"
        same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bare_env, check=True)
        assert same.stdout.splitlines() == [dsn, dsn]
        # psql on that DSN, arguments passed through.
        psql = pgfeed_cli("psql", "-Atc", "SELECT 40 + 2", env=bare_env)
        assert (psql.returncode, psql.stdout) == (0, "42\n"), psql.stderr
        status = pgfeed_cli("server", "status", env=bare_env)
        assert status.returncode == 0, status.stderr
        pid = int((Path(bare_env["PGFEED_HOME"]) / "pgdata" / "postmaster.pid").read_text().split()[0])
        assert re.match(rf"running: PostgreSQL \d+, pid {pid}, user ", status.stdout), status.stdout
        assert f"dsn: {dsn}" in status.stdout
        owner = psutil.Process(pid).username()
        if os.geteuid() == 0:
            assert owner != "root", "PostgreSQL runs as an unprivileged user"
        assert f"user {owner}\n" in status.stdout
        # Stopped, as its owner when we are root.
        stopped = pgfeed_cli("server", "stop", env=bare_env)
        assert stopped.returncode == 0, stopped.stderr
        data_dir = Path(bare_env["PGFEED_HOME"]) / "pgdata"
        assert stopped.stdout == f"stopped the embedded PostgreSQL (pid {pid}) in {data_dir}\n"
        assert gone(pid)
        after = pgfeed_cli("server", "status", env=bare_env)
        assert after.returncode == 3
        assert re.match(r"not running: PostgreSQL \d+ in ", after.stdout), after.stdout
        assert pgfeed_cli("server", "stop", env=bare_env).stdout.startswith("not running")
        code = (
            "import pgfeed\ntry:\n    pgfeed.embedded_dsn(start=False)\nexcept pgfeed.ConnectError as e:\n    print(e)"
        )
        refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bare_env, check=True)
        assert "the embedded PostgreSQL is not running" in refused.stdout
    finally:
        pgfeed_cli("server", "stop", env=bare_env)
