"""Callback subscriptions (:meth:`AsyncReader.on`): a task per handler that
takes each batch, calls the handler (retried with backoff on the same batch),
and stops the subscription before a batch its handler keeps failing on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgfeed.aio import call
from pgfeed.core.backoff import Backoff
from pgfeed.core.positions import Position
from pgfeed.errors import HandlerFailed, PgfeedError, one_line
from pgfeed.log import get_logger

if TYPE_CHECKING:
    from pgfeed.subscription import Batch, Subscription

log = get_logger("pgfeed.reader")

Handler = Callable[["Batch"], Any]
ErrorHook = Callable[[str, HandlerFailed], Any]


class Handlers:
    """The handler tasks of one reader and the subscriptions they stopped.

    ``retries``: how often a failing handler is called again with the same
    batch; ``on_stopped()`` runs when a failure stops a subscription (waits
    for its stream must learn of it).
    """

    def __init__(self, retries: int, on_stopped: Callable[[], None]) -> None:
        self._retries = retries
        self._on_stopped = on_stopped
        self.tasks: set[asyncio.Task[None]] = set()
        self.error_hooks: list[ErrorHook] = []
        #: Subscriptions stopped by a failing handler, with why: they hold
        #: their stream's delivered position back (see AsyncReader.position()).
        self.failed: list[tuple[Subscription, HandlerFailed]] = []

    def start(self, sub: Subscription, fn: Handler) -> None:
        """Feed ``sub``'s batches to ``fn`` in a task; a handler started again on
        the same stream and consumer replaces the one that failed."""
        self.failed = [(s, e) for s, e in self.failed if (s.stream, s.consumer) != (sub.stream, sub.consumer)]

        async def consume() -> None:
            try:
                async for batch in sub:
                    # The next __anext__ acknowledges this batch: reached only once fn took it.
                    await self._handle(sub, fn, batch)
            except HandlerFailed as exc:
                await self._stopped(sub, exc)
            except PgfeedError as exc:
                log.error("subscription stopped; its callback gets no more batches", stream=sub.stream, error=str(exc))

        task = asyncio.create_task(consume(), name=f"pgfeed-callback-{sub.stream}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def failure(self, stream: str, target: Position | None) -> HandlerFailed | None:
        """The failure that keeps ``stream`` from ever being delivered up to
        ``target`` (any failure on ``stream`` when ``target`` is None)."""
        for sub, exc in self.failed:
            if sub.stream == stream and (target is None or not reached(sub.position, target)):
                return exc
        return None

    async def _handle(self, sub: Subscription, fn: Handler, batch: Batch) -> None:
        """``fn(batch)``, retried with backoff on the same batch up to
        ``retries`` times; then :class:`HandlerFailed`."""

        def retrying(exc: Exception, attempts: int, delay: float) -> None:
            log.warning(
                "subscriber callback failed; retrying the same batch",
                stream=sub.stream,
                batch=str(batch.position),
                attempt=attempts,
                retry_in=round(delay, 3),
                error=f"{type(exc).__name__}: {one_line(exc)}",
            )

        def give_up(exc: Exception, attempts: int) -> HandlerFailed:
            return HandlerFailed(
                f"the handler of stream {sub.stream!r} failed {attempts} times on the batch up to "
                f"{batch.position}: {type(exc).__name__}: {one_line(exc)}; its subscription stopped at "
                f"{sub.position} (the batch counts as not delivered)",
                stream=sub.stream,
                position=sub.position,
                batch_position=batch.position,
                attempts=attempts,
            )

        await call_until_taken(fn, batch, self._retries, retrying=retrying, give_up=give_up)

    async def _stopped(self, sub: Subscription, exc: HandlerFailed) -> None:
        """Stop ``sub`` before the batch its handler could not take and say so."""
        log.error("subscriber callback kept failing; its subscription stopped", stream=sub.stream, error=str(exc))
        self.failed.append((sub, exc))
        # Closing never acknowledges the batch in hand: the position (and what
        # a consumer saves from it) stays before it.
        await sub.close()
        self._on_stopped()  # wait_for on this stream now raises
        for hook in self.error_hooks:
            try:
                await call(hook, sub.stream, exc)
            except Exception:
                log.exception("on_error hook failed", stream=sub.stream)


async def call_until_taken(
    fn: Handler,
    batch: Batch,
    retries: int,
    *,
    retrying: Callable[[Exception, int, float], None],
    give_up: Callable[[Exception, int], PgfeedError],
    stop: asyncio.Event | None = None,
) -> bool:
    """Call ``fn(batch)`` until it returns, then True: the handler took the batch.

    After a failure it is called again with the same batch, with backoff, up
    to ``retries`` times; ``retrying(exc, attempts, delay)`` is told before
    each wait. Once they are spent, ``give_up(exc, attempts)`` is raised from
    the handler's exception. With ``stop``, a wait ends when it is set, and
    then False: the batch was not taken (it must not be acknowledged).
    The one retry loop of :meth:`AsyncReader.on` handlers and ``pgfeed run``.
    """
    backoff = Backoff()
    attempts = 0
    while True:
        attempts += 1
        try:
            await call(fn, batch)
            return True
        except Exception as exc:
            if attempts > retries:
                raise give_up(exc, attempts) from exc
            delay = backoff.next_delay()
            retrying(exc, attempts, delay)
            if stop is None:
                await asyncio.sleep(delay)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
            if stop.is_set():
                return False


def reached(pos: Position | None, target: Position) -> bool:
    return pos is not None and pos >= target
