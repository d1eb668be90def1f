"""``pgfeed run MODULE:FUNCTION``: a user's handler as a supervised consumer.

One :class:`~pgfeed.AsyncReader` subscription with ``consumer=NAME``; the
handler gets every :class:`~pgfeed.Batch` in order, one at a time (a sync
handler on a worker thread, an async one on the loop). The subscription is
iterated here, not through ``on()``, so that the rules are exact:

* a batch is acknowledged (its position may be saved) only after the handler
  returned for it, by taking the next batch;
* a handler that raises is called again with the same batch, with backoff,
  up to ``retries`` times; then the run stops with one line
  (:class:`RunFailed`) and the saved position stays before that batch:
  nothing is ever skipped;
* SIGTERM/SIGINT: the batch in hand is finished, acknowledged and saved,
  and the run returns (exit 0). During a retry's backoff the batch is left
  unhandled instead (it comes again next time).

The reader saves the position every ``save_interval`` and on close (after the
batch in hand was acknowledged): after a SIGKILL the rows handled since the
last save come again (at-least-once).
Its connections are named ``pgfeed reader pid=<pid> <stream> consumer=<name>``
(as every reader's, see :mod:`pgfeed.naming`), so ``pgfeed status`` shows the
process as the consumer's live reader; with ``heartbeat`` the reader also
sends the consumer's heartbeat (:mod:`pgfeed.heartbeat`) every so often.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgfeed.core.names import check_stream_name
from pgfeed.core.positions import Position
from pgfeed.errors import HandlerNotFound as HandlerNotFound  # re-exported: its former home
from pgfeed.errors import PgfeedError, one_line
from pgfeed.errors import RunFailed as RunFailed  # re-exported: its former home
from pgfeed.handlers import call_until_taken
from pgfeed.log import get_logger
from pgfeed.reader import AsyncReader, Batch, Subscription

log = get_logger("pgfeed.run")

Handler = Callable[[Batch], Any]


@dataclass(frozen=True)
class RunOptions:
    """What ``pgfeed run`` consumes and how."""

    stream: str
    consumer: str
    #: Where a consumer without a saved position starts (ignored once it has one).
    since: str = "earliest"
    batch_size: int = 1000
    #: How often a failing batch is retried before the run stops.
    retries: int = 5
    #: Seconds between saves of the delivered position.
    save_interval: float = 1.0
    #: Seconds between consumer heartbeats (0: none).
    heartbeat: float = 10.0
    #: Shown in messages: the handler as given.
    handler_name: str = "the handler"


@dataclass
class RunStats:
    """What a run did."""

    batches: int = 0
    rows: int = 0
    #: The delivered (acknowledged) position when the run ended.
    position: Position | None = None
    #: Batches the handler failed on, retries included.
    failures: int = 0


def load_handler(spec: str) -> Handler:
    """Import ``MODULE:FUNCTION`` (``FUNCTION`` may be dotted: ``mod:Class.method``).

    The current directory is importable, as with ``python -m``. Raises
    :class:`HandlerNotFound` in one line: a malformed spec, a module that
    does not import (whatever it raised), a missing or non-callable name.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerNotFound(f"invalid handler {spec!r}: expected MODULE:FUNCTION, e.g. myapp.consumers:handle")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise HandlerNotFound(
            f"cannot import module {module_name!r} of handler {spec!r}: {type(exc).__name__}"
            + (f": {text[0]}" if text else "")
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerNotFound(f"handler {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise HandlerNotFound(f"handler {spec!r} is not callable (a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def _one_line(exc: BaseException) -> str:
    """The error's class and the first line of its message."""
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


async def run_consumer(
    conninfo: str, handler: Handler, options: RunOptions, *, stop: asyncio.Event | None = None
) -> RunStats:
    """Consume ``options.stream`` as ``options.consumer`` until ``stop`` is set
    or SIGTERM/SIGINT arrives; return what was done. Raises
    :class:`RunFailed` when a batch failed ``retries + 1`` times, and
    :class:`~pgfeed.errors.UnknownStream` (and other
    :class:`~pgfeed.errors.PgfeedError`) at once for bad input."""
    check_stream_name(options.stream)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []

    def stopping(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("stop requested; finishing the batch in hand", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopping, sig)
            installed.append(sig)
    stats = RunStats()
    try:
        async with AsyncReader(
            conninfo,
            batch_size=options.batch_size,
            save_interval=options.save_interval,
            heartbeat=options.heartbeat if options.heartbeat > 0 else None,
        ) as reader:
            sub = await reader.subscribe(options.stream, options.since, consumer=options.consumer)
            log.info("consumer running", stream=options.stream, consumer=options.consumer, position=str(sub.position))
            try:
                await _consume(sub, handler, options, stop, stats)
            finally:
                stats.position = sub.position
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("consumer stopped", batches=stats.batches, rows=stats.rows, position=str(stats.position))
    return stats


async def _consume(
    sub: Subscription, handler: Handler, options: RunOptions, stop: asyncio.Event, stats: RunStats
) -> None:
    stopping = asyncio.ensure_future(stop.wait())
    handled: Position | None = None  # the end of the last batch handled, not yet acknowledged
    try:
        while not stop.is_set():
            nxt = asyncio.ensure_future(sub.__anext__())
            done, _ = await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                return  # nothing in hand
            try:
                batch = nxt.result()
            except StopAsyncIteration:
                return
            # Taken: handle it even if a stop came meanwhile (finish the batch in hand).
            if not await _handle(sub, handler, batch, options, stop, stats):
                return  # stopped during a retry's backoff: the batch comes again
            stats.batches += 1
            stats.rows += len(batch)
            handled = batch.position
        # Stopping after a handled batch: acknowledge it so that close() saves it.
        if handled is not None:
            await _acknowledge(sub, handled)
    finally:
        stopping.cancel()


async def _handle(
    sub: Subscription, handler: Handler, batch: Batch, options: RunOptions, stop: asyncio.Event, stats: RunStats
) -> bool:
    """Call the handler until it returns (True) or ``retries`` are spent
    (:class:`RunFailed`); False when stopped during a backoff."""

    def retrying(exc: Exception, attempts: int, delay: float) -> None:
        stats.failures += 1
        log.warning(
            "handler failed; retrying the same batch",
            stream=options.stream,
            consumer=options.consumer,
            batch=str(batch.position),
            attempt=attempts,
            retry_in=round(delay, 3),
            error=_one_line(exc),
        )

    def give_up(exc: Exception, attempts: int) -> RunFailed:
        stats.failures += 1
        return RunFailed(
            f"{options.handler_name} failed {attempts} times on the batch after position {sub.position} "
            f"of stream {options.stream!r} (up to {batch.position}): {_one_line(exc)}; consumer "
            f"{options.consumer!r} stays at {sub.position}"
        )

    if await call_until_taken(handler, batch, options.retries, retrying=retrying, give_up=give_up, stop=stop):
        return True
    log.warning(
        "stopping during a retry; the batch was not handled and comes again",
        stream=options.stream,
        consumer=options.consumer,
        batch=str(batch.position),
    )
    return False


async def _acknowledge(sub: Subscription, position: Position) -> None:
    """Mark the batch ending at ``position`` delivered without handling another:
    taking the next batch acknowledges the previous one, and a batch taken but
    never handled is not acknowledged (it comes again)."""
    nxt = asyncio.ensure_future(sub.__anext__())
    for _ in range(100):
        if sub.position is not None and sub.position >= position:
            break
        await asyncio.sleep(0)
    nxt.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, PgfeedError):
        await nxt
    if sub.position is None or sub.position < position:
        log.warning("the last batch could not be acknowledged; it comes again", batch=str(position))
