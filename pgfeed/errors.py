"""pgfeed's errors: one hierarchy, each class's docstring is its default message.

psycopg errors are translated at the I/O boundary by :func:`translate`, so
callers see a message they can act on instead of a driver exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the pure core imports this module: psycopg only where errors are translated
    import psycopg


class PgfeedError(Exception):
    """pgfeed failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "pgfeed failed").strip())


class UsageError(PgfeedError):
    """Invalid argument."""


class InvalidStreamName(UsageError):
    """Invalid stream name."""


class TokenError(UsageError):
    """Malformed position token."""


class PayloadError(UsageError):
    """Invalid payload."""


class ConnectError(PgfeedError):
    """Cannot connect to PostgreSQL."""


class ServerUnreachable(ConnectError):
    """Cannot reach the PostgreSQL server: is it running and accepting connections?"""


class AuthenticationFailed(ConnectError):
    """PostgreSQL refused the login: check the user and password in the DSN."""


class DatabaseMissing(ConnectError):
    """The database named in the DSN does not exist."""


class PermissionDenied(PgfeedError):
    """Permission denied."""


class UnknownStream(PgfeedError):
    """Unknown stream."""


class StreamExists(PgfeedError):
    """Stream already exists."""


class MigrationError(PgfeedError):
    """The database schema cannot be migrated."""


class NotMigrated(PgfeedError):
    """The pgfeed schema is not installed in this database: run `pgfeed migrate`."""


class FutureToken(PgfeedError):
    """The token is beyond anything this database has issued."""


class WaitTimeout(PgfeedError):
    """Timed out waiting for a position."""


class ReaderClosed(PgfeedError):
    """The reader is closed."""


class TickerUnavailable(PgfeedError):
    """This role or server cannot tick (no ticker grant, read-only, or a standby)."""


class HandlerNotFound(UsageError):
    """The handler's MODULE:FUNCTION does not import."""


class RunFailed(PgfeedError):
    """The handler kept failing on one batch; the run stopped before it."""


class EmbeddedUnavailable(PgfeedError):
    """No DSN given and the embedded PostgreSQL is not installed: pip install 'pgfeed[embedded]', \
or pass --dsn / set PGFEED_DSN."""


def translate(exc: psycopg.Error, doing: str) -> PgfeedError:
    """Turn a psycopg error into a one-line pgfeed error; ``doing`` says what failed."""
    import psycopg
    from psycopg import errors as pgerrors

    diag = getattr(exc, "diag", None)
    primary = (diag.message_primary if diag is not None else None) or str(exc).strip().splitlines()[0]
    hint = diag.message_hint if diag is not None else None
    detail = f"{primary}" + (f" ({hint})" if hint else "")
    if isinstance(exc, pgerrors.InsufficientPrivilege):
        return PermissionDenied(f"permission denied while {doing}: {detail}")
    if isinstance(exc, pgerrors.UndefinedObject) and "unknown stream" in primary:
        return UnknownStream(primary.removeprefix("pgfeed: "))
    # Only a missing schema or table means "not installed"; a function that
    # does not exist is more often a call with the wrong argument types.
    schema_gone = isinstance(exc, pgerrors.InvalidSchemaName) and '"pgfeed"' in primary
    table_gone = isinstance(exc, pgerrors.UndefinedTable) and 'relation "pgfeed.' in primary
    if schema_gone or table_gone:
        return NotMigrated()
    if isinstance(exc, pgerrors.ProgramLimitExceeded | pgerrors.NullValueNotAllowed):
        return PayloadError(primary.removeprefix("pgfeed: "))
    if isinstance(exc, psycopg.OperationalError):
        return ConnectError(f"lost or could not open the connection while {doing}: {detail}")
    return PgfeedError(f"{doing} failed: {detail}")


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when it has none), for logs and errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ForkedReader(UsageError):
    """This reader was opened in another process before a fork: open a reader in each worker process after the \
fork (gunicorn: post_fork / post_worker_init, Celery: worker_process_init)."""


def forked_error(kind: str, pid: int) -> ForkedReader:
    """The one-line error for a reader used in a process it was not opened in."""
    return ForkedReader(
        f"this {kind} was opened in process {pid} before a fork; open a reader in each worker process after "
        "the fork (gunicorn: post_fork / post_worker_init, uvicorn: the app's lifespan, Celery: "
        "worker_process_init)"
    )


class CommitTokenUnavailable(PgfeedError):
    """The transaction is committed, but no commit token could be had."""


if TYPE_CHECKING:
    from pgfeed.core.positions import Position


class HandlerFailed(PgfeedError):
    """A subscriber's handler kept failing on the same batch; its subscription stopped before that batch."""

    def __init__(
        self,
        message: str | None = None,
        *,
        stream: str = "",
        position: Position | None = None,
        batch_position: Position | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        #: The stream whose handler failed.
        self.stream = stream
        #: What the subscription delivered (and a named consumer saved): the position before the failed batch.
        self.position = position
        #: The position after the batch the handler could not take.
        self.batch_position = batch_position
        #: How many times the handler was called with that batch.
        self.attempts = attempts
