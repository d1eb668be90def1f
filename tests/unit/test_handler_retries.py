"""pgfeed.handlers.call_until_taken: the retry loop of on() handlers and ``pgfeed run``. No database."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from pgfeed.errors import PgfeedError
from pgfeed.handlers import call_until_taken
from pgfeed.subscription import Batch


def a_batch() -> Batch:
    """A stand-in: the loop only hands the batch to the handler."""
    return cast(Batch, object())


class Flaky:
    """Raises ValueError on its first ``failures`` calls, recording what it was given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[object] = []

    async def __call__(self, batch: object) -> None:
        self.calls.append(batch)
        if len(self.calls) <= self.failures:
            raise ValueError(f"call {len(self.calls)}")


class Told:
    """What the loop told its caller."""

    def __init__(self) -> None:
        self.retries: list[tuple[str, int, float]] = []

    def retrying(self, exc: Exception, attempts: int, delay: float) -> None:
        self.retries.append((str(exc), attempts, delay))

    def give_up(self, exc: Exception, attempts: int) -> PgfeedError:
        return PgfeedError(f"gave up after {attempts}: {exc}")


async def test_a_failing_handler_gets_the_same_batch_again_with_backoff_until_it_takes_it() -> None:
    fn, told, batch = Flaky(failures=2), Told(), a_batch()
    taken = await call_until_taken(fn, batch, 2, retrying=told.retrying, give_up=told.give_up)
    assert taken is True
    assert fn.calls == [batch, batch, batch]
    assert [(text, n) for text, n, _ in told.retries] == [("call 1", 1), ("call 2", 2)]
    first, second = (delay for _, _, delay in told.retries)
    assert 0.05 <= first <= 0.1
    assert 0.1 <= second <= 0.2


async def test_spent_retries_raise_what_give_up_returns_from_the_handlers_error() -> None:
    fn, told = Flaky(failures=99), Told()
    with pytest.raises(PgfeedError, match=r"gave up after 2: call 2") as raised:
        await call_until_taken(fn, a_batch(), 1, retrying=told.retrying, give_up=told.give_up)
    assert isinstance(raised.value.__cause__, ValueError)
    assert len(fn.calls) == 2
    assert len(told.retries) == 1


async def test_a_stop_during_a_backoff_returns_false_without_calling_again() -> None:
    fn, told, stop = Flaky(failures=99), Told(), asyncio.Event()

    def retrying(*args: Any) -> None:
        told.retrying(*args)
        stop.set()

    async with asyncio.timeout(5):
        taken = await call_until_taken(fn, a_batch(), 5, retrying=retrying, give_up=told.give_up, stop=stop)
    assert taken is False
    assert len(fn.calls) == 1
