"""The reader's asyncio plumbing: one wake mechanism, stopping tasks, calling
user functions that may be sync or async."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


class Signal:
    """Wakes every waiter on each :meth:`fire`; each waiter re-checks its own
    condition. The only wake mechanism of the reader: a waiter that was busy
    when it fired still sees it, by comparing :attr:`fired` with the count it
    last handled (see :meth:`wait_fired`)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.fired = 0

    def fire(self) -> None:
        self.fired += 1
        fired, self._event = self._event, asyncio.Event()
        fired.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._event.wait()

    async def wait_fired(self, seen: int) -> int:
        """Wait until fired more than ``seen`` times; return the new count."""
        await self.wait_until(lambda: self.fired != seen)
        return self.fired


async def stop(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if a
    cancellation was swallowed (a library may catch it while cleaning up)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``: awaited on the loop if async, else in a worker thread
    (awaiting what it returns if that is awaitable)."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    if isinstance(result, Awaitable):
        return await result
    return result
