"""`pgfeed migrate` against a real server: fresh install, rerun, concurrency,
dry run, status, and refusing tampered or newer databases without touching them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from pgfeed_cli.main import cli

from pgfeed.errors import MigrationError, PgfeedError
from pgfeed.migrator import MIGRATE_LOCK, load_migrations, migrate, status
from pgfeed.testing import TestServer

# The pgfeed of the environment running the tests, wherever that is.
PGFEED = str(Path(sys.executable).with_name("pgfeed"))


@pytest.fixture
def fresh_dsn(pgfeed_server: TestServer, fresh_db: str) -> str:
    """An empty database: pgfeed never migrated into it."""
    return pgfeed_server.dsn_for(fresh_db)


def run(dsn: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--dsn", dsn, *args])


def query(dsn: str, text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(text.encode(), params or None).fetchall()


def fingerprint(dsn: str) -> list[tuple[Any, ...]]:
    """Everything a migration could touch: schemas, relations, functions, version rows."""
    return query(
        dsn,
        """
        SELECT 'schema', nspname, '' FROM pg_namespace
            WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
        UNION ALL
        SELECT 'rel', n.nspname || '.' || c.relname, c.relkind::text FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgfeed'
        UNION ALL
        SELECT 'func', p.oid::regprocedure::text, md5(p.prosrc) FROM pg_proc p
            JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgfeed'
        UNION ALL
        SELECT 'version', version || ' ' || name, checksum || ' ' || applied_at FROM pgfeed.schema_version
        ORDER BY 1, 2, 3
        """
        if pgfeed_installed(dsn)
        else "SELECT 'schema', nspname, '' FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' ORDER BY 2",
    )


def pgfeed_installed(dsn: str) -> bool:
    return bool(query(dsn, "SELECT to_regclass('pgfeed.schema_version') IS NOT NULL")[0][0])


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pgfeed: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_fresh_database_to_latest(fresh_dsn: str) -> None:
    shipped = load_migrations()
    result = run(fresh_dsn, "migrate")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"applied {m.version:04d}_{m.name}" for m in shipped]
    rows = query(fresh_dsn, "SELECT version, name, checksum, applied_by FROM pgfeed.schema_version ORDER BY version")
    assert rows == [(m.version, m.name, m.checksum, "postgres") for m in shipped]
    assert query(fresh_dsn, "SELECT name FROM pgfeed.streams") == [("caches",)]


def test_rerun_is_a_quiet_no_op(fresh_dsn: str) -> None:
    assert run(fresh_dsn, "migrate").exit_code == 0
    before = fingerprint(fresh_dsn)
    again = run(fresh_dsn, "migrate")
    assert again.exit_code == 0, again.output
    assert again.stdout == ""
    assert again.stderr == ""
    assert fingerprint(fresh_dsn) == before


def test_three_concurrent_processes_apply_each_file_once(fresh_dsn: str) -> None:
    """Three `pgfeed migrate` processes started at once: to be sure they really
    overlap, the test holds the migration lock until all three wait on it."""
    with psycopg.connect(fresh_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        procs = [
            subprocess.Popen([PGFEED, "--dsn", fresh_dsn, "migrate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(3)
        ]
        try:
            deadline = time.monotonic() + 30
            while waiting_on_advisory_lock(holder) < 3:
                assert time.monotonic() < deadline, "the three migrate processes never all waited on the lock"
                assert all(p.poll() is None for p in procs), "a migrate process ran without waiting for the lock"
                time.sleep(0.05)
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
        outputs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
        assert b"Traceback" not in err
    shipped = load_migrations()
    applied_lines = [line for out, _ in outputs for line in out.decode().splitlines()]
    assert sorted(applied_lines) == sorted(f"applied {m.version:04d}_{m.name}" for m in shipped)
    rows = query(fresh_dsn, "SELECT version, checksum FROM pgfeed.schema_version ORDER BY version")
    assert rows == [(m.version, m.checksum) for m in shipped]
    assert query(fresh_dsn, "SELECT count(*) FROM pgfeed.streams WHERE name = 'caches'") == [(1,)]


def waiting_on_advisory_lock(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()
    return int(row[0]) if row else 0


def test_dry_run_prints_the_sql_and_changes_nothing(fresh_dsn: str) -> None:
    before = fingerprint(fresh_dsn)
    result = run(fresh_dsn, "migrate", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE pgfeed.schema_version" in result.stdout
    for m in load_migrations():
        assert f"-- {m.version:04d}_{m.name}.sql" in result.stdout
        assert m.sql.strip() in result.stdout
    assert query(fresh_dsn, "SELECT to_regnamespace('pgfeed')") == [(None,)]
    assert fingerprint(fresh_dsn) == before

    assert run(fresh_dsn, "migrate").exit_code == 0
    migrated = fingerprint(fresh_dsn)
    again = run(fresh_dsn, "migrate", "--dry-run")
    assert again.exit_code == 0
    assert again.stdout.strip() == "-- nothing to apply: the schema is up to date"
    assert fingerprint(fresh_dsn) == migrated


@pytest.mark.parametrize("form", [["migrate", "status"], ["migrate", "--status"]])
def test_status_lists_pending_then_applied(fresh_dsn: str, form: list[str]) -> None:
    names = [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    before = run(fresh_dsn, *form)
    assert before.exit_code == 0, before.output
    assert before.stdout.splitlines() == [f"pending  {n}" for n in names]
    assert query(fresh_dsn, "SELECT to_regnamespace('pgfeed')") == [(None,)]

    assert run(fresh_dsn, "migrate").exit_code == 0
    after = run(fresh_dsn, *form)
    assert after.exit_code == 0, after.output
    lines = after.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["applied", n] for n in names]


def test_changed_checksum_in_the_database_is_refused(fresh_dsn: str) -> None:
    assert run(fresh_dsn, "migrate").exit_code == 0
    query(fresh_dsn, "UPDATE pgfeed.schema_version SET checksum = repeat('0', 64) WHERE version = 1 RETURNING 1")
    before = fingerprint(fresh_dsn)
    for args in (["migrate"], ["migrate", "status"], ["migrate", "--dry-run"]):
        result = run(fresh_dsn, *args)
        assert_one_line_error(result, "0001_initial.sql was changed after it was applied", "000000000000")
        assert result.exit_code == 1
    assert fingerprint(fresh_dsn) == before


def test_modified_migration_files_are_refused_touching_nothing(fresh_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        migrate(conn)
        before = fingerprint(fresh_dsn)
        for m in load_migrations():
            (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
        first = next(tmp_path.glob("0001_*.sql"))
        first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")
        # A pending file beside it must not run either.
        n = len(load_migrations()) + 1
        (tmp_path / f"{n:04d}_later.sql").write_text("CREATE TABLE pgfeed.should_not_exist ();")
        with pytest.raises(MigrationError, match="was changed after it was applied") as info:
            migrate(conn, directory=tmp_path)
        assert "\n" not in str(info.value)
        with pytest.raises(MigrationError):
            status(conn, directory=tmp_path)
    assert fingerprint(fresh_dsn) == before


def test_database_newer_than_this_pgfeed_is_refused(fresh_dsn: str) -> None:
    assert run(fresh_dsn, "migrate").exit_code == 0
    future = len(load_migrations()) + 1
    query(
        fresh_dsn,
        "INSERT INTO pgfeed.schema_version (version, name, checksum) VALUES (%s, 'future', 'x') RETURNING 1",
        (future,),
    )
    before = fingerprint(fresh_dsn)
    for args in (["migrate"], ["migrate", "status"]):
        result = run(fresh_dsn, *args)
        assert_one_line_error(result, f"version {future}, newer than this pgfeed knows", "upgrade pgfeed")
    assert fingerprint(fresh_dsn) == before


def test_a_failing_migration_leaves_nothing_of_itself(fresh_dsn: str, tmp_path: Path) -> None:
    """Each file runs in its own transaction with its version row; the version
    table is created in the first file's transaction."""
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE pgfeed.one (); SELECT 1/0;")
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        with pytest.raises(PgfeedError, match="division by zero"):
            migrate(conn, directory=tmp_path)
        assert query(fresh_dsn, "SELECT to_regnamespace('pgfeed')") == [(None,)]

        (tmp_path / "0001_first.sql").write_text("CREATE TABLE pgfeed.one ();")
        (tmp_path / "0002_second.sql").write_text("CREATE TABLE pgfeed.two (); SELECT 1/0;")
        with pytest.raises(PgfeedError, match="division by zero"):
            migrate(conn, directory=tmp_path)
        assert query(fresh_dsn, "SELECT version FROM pgfeed.schema_version") == [(1,)]
        assert query(fresh_dsn, "SELECT to_regclass('pgfeed.one') IS NOT NULL, to_regclass('pgfeed.two')") == [
            (True, None)
        ]
        # Nobody is left holding the migration lock.
        assert not conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]
