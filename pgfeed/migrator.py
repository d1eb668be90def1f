"""Apply the numbered SQL files in ``pgfeed/migrations/`` under an advisory lock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

from pgfeed.core.migrations import Migration, check_sequence, parse_file_name, plan
from pgfeed.errors import MigrationError, PermissionDenied, PgfeedError, translate
from pgfeed.execute import tuples
from pgfeed.log import get_logger
from pgfeed.queries import query

log = get_logger("pgfeed.migrate")

#: Session advisory lock held while migrating ("pgfeed" + 0x0002).
MIGRATE_LOCK = 7451287230471176194


def migrations_dir() -> Path:
    """The shipped migrations, ``pgfeed/migrations`` (in the wheel and in a checkout alike)."""
    packaged = Path(str(resources.files("pgfeed"))) / "migrations"
    if packaged.is_dir():
        return packaged
    raise MigrationError("pgfeed's migrations directory is missing from this installation; reinstall pgfeed")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read every ``NNNN_name.sql`` file, in version order."""
    directory = directory or migrations_dir()
    found = []
    for path in directory.iterdir():
        parsed = parse_file_name(path.name)
        if parsed is not None:
            found.append(Migration(parsed[0], parsed[1], path.read_text(encoding="utf-8")))
    return check_sequence(found)


@dataclass(frozen=True)
class Status:
    """Applied and pending versions."""

    applied: list[tuple[int, str, str]]  # (version, name, applied_at)
    pending: list[Migration]
    installed: bool  # whether pgfeed.schema_version exists


def applied_versions(conn: psycopg.Connection[tuple[object, ...]]) -> dict[int, tuple[str, str, str]] | None:
    """version -> (name, checksum, applied_at); ``None`` when pgfeed was never installed."""
    row = tuples(conn, query("has_schema_version")).fetchone()
    if not row or not row[0]:
        return None
    rows = tuples(conn, query("applied_migrations")).fetchall()
    return {int(str(v)): (str(n), str(c), str(a)) for v, n, c, a in rows}


@contextmanager
def _migrate_lock(conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
    row = tuples(conn, query("try_migrate_lock"), (MIGRATE_LOCK,)).fetchone()
    if not (row and row[0]):
        log.info("waiting for another pgfeed migrate to finish")
        tuples(conn, query("migrate_lock"), (MIGRATE_LOCK,))
    try:
        yield
    finally:
        if not conn.closed:
            tuples(conn, query("migrate_unlock"), (MIGRATE_LOCK,))


def _wrap(exc: psycopg.Error, doing: str) -> PgfeedError:
    err = translate(exc, doing)
    if isinstance(err, PermissionDenied):
        return PermissionDenied(
            f"{err}: run pgfeed migrate as the database owner or a role with CREATE on the database"
        )
    return err


def status(conn: psycopg.Connection[tuple[object, ...]], directory: Path | None = None) -> Status:
    """What is applied and what would be applied; refuses a tampered or newer database.

    ``directory`` overrides the shipped migrations (for tests and tools).
    """
    try:
        applied = applied_versions(conn)
    except psycopg.Error as exc:
        raise _wrap(exc, "reading the pgfeed schema version") from None
    recorded = applied or {}
    pending = plan(load_migrations(directory), {v: c for v, (_, c, _) in recorded.items()})
    return Status(sorted((v, n, a) for v, (n, _, a) in recorded.items()), pending, applied is not None)


def migrate(
    conn: psycopg.Connection[tuple[object, ...]], *, dry_run: bool = False, directory: Path | None = None
) -> list[Migration]:
    """Bring the database to the latest schema; return what was (or would be) applied.

    ``conn`` must be in autocommit mode. Each file runs in its own transaction
    together with its version row; the version table itself is created in the
    first file's transaction, so a failed first run leaves nothing behind.
    Concurrent callers queue on an advisory lock and find nothing left to do.
    A tampered or newer database is refused before anything is changed.
    """
    if not conn.autocommit:
        raise PgfeedError("migrate() needs an autocommit connection")
    if dry_run:
        return status(conn, directory).pending
    try:
        with _migrate_lock(conn):
            st = status(conn, directory)
            installed = st.installed
            for m in st.pending:
                with conn.transaction():
                    if not installed:
                        conn.execute(query("create_schema_version"))
                        installed = True
                    conn.execute(m.sql.encode())  # a trusted file shipped with pgfeed
                    conn.execute(query("record_migration"), (m.version, m.name, m.checksum))
                log.info("migration applied", version=m.version, name=m.name)
            if not st.pending:
                log.info("schema up to date", version=max((v for v, _, _ in st.applied), default=0))
            return st.pending
    except psycopg.Error as exc:
        raise _wrap(exc, "migrating") from None
