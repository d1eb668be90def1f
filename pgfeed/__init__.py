"""pgfeed: a change feed on PostgreSQL for Python worker processes.

Write side (inside your own transaction): :func:`append`, :func:`append_many`,
:func:`invalidate`, then :func:`commit_token` after COMMIT.
Read side: :class:`AsyncReader` (asyncio) and :class:`Reader` (threads), one
per process.
"""

from pgfeed.cache import AsyncCache, Cache
from pgfeed.connect import embedded_dsn
from pgfeed.core.positions import Position
from pgfeed.core.tokens import CommitToken
from pgfeed.errors import (
    AuthenticationFailed,
    CommitTokenUnavailable,
    ConnectError,
    DatabaseMissing,
    EmbeddedUnavailable,
    ForkedReader,
    FutureToken,
    HandlerFailed,
    HandlerNotFound,
    InvalidStreamName,
    MigrationError,
    NotMigrated,
    PayloadError,
    PermissionDenied,
    PgfeedError,
    ReaderClosed,
    RunFailed,
    ServerUnreachable,
    StreamExists,
    TickerUnavailable,
    TokenError,
    UnknownStream,
    UsageError,
    WaitTimeout,
)
from pgfeed.options import ReaderOptions
from pgfeed.reader import AsyncReader, Batch, Row, Subscription
from pgfeed.sync import Reader, SyncSubscription
from pgfeed.writer import append, append_many, commit_token, invalidate

__version__ = "0.2.0.dev0"

__all__ = [
    "AsyncCache",
    "AsyncReader",
    "AuthenticationFailed",
    "Batch",
    "Cache",
    "CommitToken",
    "CommitTokenUnavailable",
    "ConnectError",
    "DatabaseMissing",
    "EmbeddedUnavailable",
    "ForkedReader",
    "FutureToken",
    "HandlerFailed",
    "HandlerNotFound",
    "InvalidStreamName",
    "MigrationError",
    "NotMigrated",
    "PayloadError",
    "PermissionDenied",
    "PgfeedError",
    "Position",
    "Reader",
    "ReaderClosed",
    "ReaderOptions",
    "Row",
    "RunFailed",
    "ServerUnreachable",
    "StreamExists",
    "Subscription",
    "SyncSubscription",
    "TickerUnavailable",
    "TokenError",
    "UnknownStream",
    "UsageError",
    "WaitTimeout",
    "append",
    "append_many",
    "commit_token",
    "embedded_dsn",
    "invalidate",
]
