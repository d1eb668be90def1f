"""The write side: append rows inside the caller's own transaction.

Each function accepts a psycopg ``Connection`` (returns the result) or an
``AsyncConnection`` (returns an awaitable). Nothing here commits: the rows
exist if and only if the caller's transaction commits (the transactional
outbox).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Sequence
from typing import Any, overload

import psycopg
from psycopg.rows import tuple_row

from pgfeed.core.names import check_stream_name
from pgfeed.core.tokens import CommitToken
from pgfeed.errors import CommitTokenUnavailable, PayloadError, PermissionDenied, PgfeedError, UsageError, translate
from pgfeed.queries import query

_Query = tuple[str, tuple[Any, ...], str]


def encode_payload(payload: Any) -> str:
    """``payload`` as JSON text, or :class:`PayloadError` if it is not JSON.

    Any JSON value is a valid payload: object, array, string, number, boolean
    or null (Python ``None`` is JSON null). NaN and infinities are not JSON.
    """
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        text.encode()  # a lone surrogate cannot be sent to the server
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise PayloadError(f"payload is not JSON: {exc}") from None
    return text


def _check_key(key: object) -> None:
    if key is not None and not isinstance(key, str):
        raise UsageError(f"invalid key {key!r}: expected a string or None")


def _append_query(stream: str, payload: Any, key: str | None) -> _Query:
    check_stream_name(stream)
    _check_key(key)
    return (
        query("append"),
        (stream, encode_payload(payload), key),
        f"appending to {stream!r}",
    )


def _append_many_query(stream: str, payloads: Sequence[Any], keys: Sequence[str | None] | None) -> _Query:
    check_stream_name(stream)
    if isinstance(payloads, str | bytes) or not isinstance(payloads, Sequence):
        raise UsageError("payloads must be a sequence (a list of JSON values), not a single value")
    if keys is not None:
        if isinstance(keys, str | bytes) or len(keys) != len(payloads):
            raise UsageError(f"{len(keys)} keys given for {len(payloads)} payloads: give one key per payload or none")
        for k in keys:
            _check_key(k)
    return (
        query("append_many"),
        (stream, [encode_payload(p) for p in payloads], list(keys) if keys is not None else None),
        f"appending to {stream!r}",
    )


def _invalidate_query(cache_name: str, keys: Sequence[str] | None) -> _Query:
    if not isinstance(cache_name, str) or not cache_name:
        raise UsageError(f"invalid cache name {cache_name!r}: expected a non-empty string")
    if isinstance(keys, str):
        raise UsageError("keys must be a sequence of strings (or None for the whole cache), not a single string")
    return (
        query("invalidate"),
        (cache_name, [str(k) for k in keys] if keys is not None else None),
        f"invalidating cache {cache_name!r}",
    )


def _translate(exc: psycopg.Error, doing: str) -> PgfeedError:
    # JSON the server cannot store (a \u0000 escape, a character the database
    # encoding lacks) is the payload's fault, not a server failure.
    if isinstance(exc, psycopg.errors.InsufficientPrivilege) and "row-level security" in str(exc):
        return PermissionDenied(
            f"permission denied while {doing}: this role has no writer grant for that stream "
            "(pgfeed grant writer ROLE --stream NAME)"
        )
    if isinstance(exc, psycopg.errors.UntranslatableCharacter | psycopg.errors.CharacterNotInRepertoire):
        return PayloadError(f"{doing} failed: the server cannot store this payload: {exc.diag.message_primary}")
    return translate(exc, doing)


def _run(conn: Any, query: _Query) -> Any:
    text, params, doing = query
    if isinstance(conn, psycopg.AsyncConnection):
        return _run_async(conn, text, params, doing)
    if not isinstance(conn, psycopg.Connection):
        raise UsageError(f"expected a psycopg Connection or AsyncConnection, got {type(conn).__name__}")
    try:
        # tuple_row: the caller's connection may have any row factory (dict_row, ...).
        row = conn.cursor(row_factory=tuple_row).execute(text, params).fetchone()
    except psycopg.Error as exc:
        raise _translate(exc, doing) from None
    return row[0] if row else None


async def _run_async(conn: psycopg.AsyncConnection[Any], text: str, params: tuple[Any, ...], doing: str) -> Any:
    try:
        cur = await conn.cursor(row_factory=tuple_row).execute(text, params)
        row = await cur.fetchone()
    except psycopg.Error as exc:
        raise _translate(exc, doing) from None
    return row[0] if row else None


@overload
def append(conn: psycopg.AsyncConnection[Any], stream: str, payload: Any, key: str | None = None) -> Awaitable[int]: ...
@overload
def append(conn: psycopg.Connection[Any], stream: str, payload: Any, key: str | None = None) -> int: ...
def append(conn: Any, stream: str, payload: Any, key: str | None = None) -> Any:
    """Append ``payload`` to ``stream`` in the connection's current
    transaction; return the row's sequence number.

    ``payload`` is any JSON value: a dict, list, str, int, float, bool, or
    ``None`` (stored as JSON null). The row exists if and only if the caller's
    transaction commits; this function never commits. Call
    :func:`commit_token` after committing for a read-your-writes token.
    Raises :class:`~pgfeed.errors.UnknownStream`, :class:`~pgfeed.errors.PayloadError`
    (not JSON, or over the stream's size limit: the transaction is then
    aborted, roll it back) or :class:`~pgfeed.errors.PermissionDenied`.
    """
    return _run(conn, _append_query(stream, payload, key))


@overload
def append_many(
    conn: psycopg.AsyncConnection[Any], stream: str, payloads: Sequence[Any], keys: Sequence[str | None] | None = None
) -> Awaitable[int]: ...
@overload
def append_many(
    conn: psycopg.Connection[Any], stream: str, payloads: Sequence[Any], keys: Sequence[str | None] | None = None
) -> int: ...
def append_many(conn: Any, stream: str, payloads: Sequence[Any], keys: Sequence[str | None] | None = None) -> Any:
    """Append many payloads in one call (one round trip); return how many.

    All or nothing: if one payload is refused (not JSON, over the size
    limit), none is appended. ``keys``, if given, holds one key per payload.
    """
    return _run(conn, _append_many_query(stream, payloads, keys))


@overload
def invalidate(conn: psycopg.AsyncConnection[Any], cache_name: str, keys: Sequence[str] | None) -> Awaitable[int]: ...
@overload
def invalidate(conn: psycopg.Connection[Any], cache_name: str, keys: Sequence[str] | None) -> int: ...
def invalidate(conn: Any, cache_name: str, keys: Sequence[str] | None) -> Any:
    """Tell every reader to drop ``keys`` from ``cache_name``; ``keys=None``
    drops the whole cache. Appends one row to the built-in ``caches`` stream."""
    return _run(conn, _invalidate_query(cache_name, keys))


@overload
def commit_token(conn: psycopg.AsyncConnection[Any]) -> Awaitable[CommitToken]: ...
@overload
def commit_token(conn: psycopg.Connection[Any]) -> CommitToken: ...
def commit_token(conn: Any) -> Any:
    """A read-your-writes token for what this connection committed; call it
    right after COMMIT and hand ``str(token)`` to ``Reader.wait_for`` in any
    process. It writes nothing and waits for nothing.

    It asks the server for a snapshot token (``s...``): every transaction
    committed so far, this connection's last one included, whatever wrote it
    (:func:`append`, plain SQL, another driver). It leaves the connection idle.
    If that fails (the connection was lost after the COMMIT), it raises
    :class:`~pgfeed.errors.CommitTokenUnavailable`, whose message says that
    the write itself is committed: take a token on another connection, which
    covers it too. To hold a token before COMMIT, so that nothing can fail
    after it, run ``SELECT pgfeed.commit_token()`` inside the writing
    transaction (any driver): it names that transaction (``x<xid>``).
    """
    if not isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
        raise UsageError(f"expected a psycopg Connection or AsyncConnection, got {type(conn).__name__}")
    # A token cached from an earlier write could not be trusted: nothing says
    # which transaction the connection committed last (a later one in plain
    # SQL, or a rollback since). The server's snapshot now covers whichever it was.
    status = conn.info.transaction_status
    if status == psycopg.pq.TransactionStatus.UNKNOWN:
        raise _token_unavailable("the connection is closed or was lost")
    if status != psycopg.pq.TransactionStatus.IDLE:
        raise UsageError("commit_token() must be called after COMMIT, outside any transaction")
    if isinstance(conn, psycopg.AsyncConnection):
        return _commit_token_async(conn)
    try:
        row = conn.cursor(row_factory=tuple_row).execute(query("commit_token")).fetchone()
        if not conn.autocommit:
            with contextlib.suppress(psycopg.Error):  # the token is had; a failure shows at the next use
                conn.rollback()  # end the transaction the query opened, which wrote nothing
    except psycopg.Error as exc:
        raise _token_unavailable(translate(exc, "taking a commit token")) from None
    return _parse_token(row)


async def _commit_token_async(conn: psycopg.AsyncConnection[Any]) -> CommitToken:
    try:
        cur = await conn.cursor(row_factory=tuple_row).execute(query("commit_token"))
        row = await cur.fetchone()
        if not conn.autocommit:
            with contextlib.suppress(psycopg.Error):
                await conn.rollback()
    except psycopg.Error as exc:
        raise _token_unavailable(translate(exc, "taking a commit token")) from None
    return _parse_token(row)


def _token_unavailable(reason: object) -> PgfeedError:
    return CommitTokenUnavailable(
        f"the write is committed (COMMIT returned), but no commit token could be had on this connection: {reason}; "
        "take one with commit_token() on another connection: it covers the write too"
    )


def _parse_token(row: Any) -> CommitToken:
    token = CommitToken.parse(str(row[0])) if row else None
    if token is None:
        raise PgfeedError(f"the server returned an unexpected commit token {row!r}")
    return token
