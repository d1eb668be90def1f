"""A reader on a hot standby (streaming replication, ``pg_basebackup -R``)
follows the stream by polling the replicated ticks: the same rows in the same
order as a reader on the primary, and read-your-writes with a token taken on
the primary."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ticking import daemon

import pgfeed

from .servers import Server, pg_bin, primary_with_standby, servers, wait_replayed
from .workload import Follower, Writers, assert_in_order, end_marker, stored_rows

pytestmark = pytest.mark.timeout(120)

STREAM = "orders"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Server, Server]]:
    """A primary with pgfeed migrated and a stream, and its hot standby."""
    bin_dir = pg_bin("pg_basebackup")
    with servers() as made:
        yield primary_with_standby(made, bin_dir, "feed", [STREAM])


async def test_a_reader_on_the_standby_delivers_what_a_reader_on_the_primary_does(
    pair: tuple[Server, Server],
) -> None:
    primary, standby = pair
    with daemon(primary.dsn("feed")):
        on_primary = await Follower("primary", primary.dsn("feed"), STREAM).start()
        on_standby = await Follower("standby", standby.dsn("feed"), STREAM).start()
        try:
            writers = Writers(primary.dsn("feed"), STREAM, "live", count=4, per_writer=60).start()
            await asyncio.to_thread(writers.join)
            assert not writers.errors
            token = end_marker(primary.dsn("feed"), STREAM)
            await on_primary.wait_for(token)
            # Read-your-writes through the standby, once it has replayed the commit.
            await asyncio.to_thread(wait_replayed, primary, standby)
            await on_standby.wait_for(token)
        finally:
            await on_primary.close()
            await on_standby.close()
    stored = stored_rows(primary.dsn("feed"), STREAM)
    print(f"\nstandby: {len(writers.committed)} rows committed; {on_primary.summary()}; {on_standby.summary()}")
    assert sorted(stored) == sorted(writers.committed)
    assert len(on_primary.rows) == len(writers.committed) > 100
    assert on_primary.reset_batches == on_standby.reset_batches == 0
    assert_in_order(on_primary)
    # The same rows at the same positions: the order is the primary's order.
    assert [(r.position, r.xid, r.seq) for r in on_standby.rows] == [
        (r.position, r.xid, r.seq) for r in on_primary.rows
    ]
    assert sorted(on_standby.ids) == sorted(writers.committed)


async def test_wait_for_on_the_standby_waits_for_a_commit_it_has_not_replayed_yet(
    pair: tuple[Server, Server],
) -> None:
    """A writer commits on the primary and hands its token to a process whose
    reader is on the standby: the token is real, the standby has simply not
    replayed it yet, so wait_for should wait (and time out if replay stays
    paused), not refuse it as a token from the future."""
    primary, standby = pair
    with daemon(primary.dsn("feed")):
        follower = await Follower("standby", standby.dsn("feed"), STREAM, since="now").start()
        try:
            standby.query("SELECT pg_wal_replay_pause()")
            try:
                token = end_marker(primary.dsn("feed"), STREAM)
                outcome: Any
                try:
                    assert follower.reader is not None
                    outcome = await follower.reader.wait_for(STREAM, token, timeout=1.0)
                except pgfeed.PgfeedError as exc:
                    outcome = exc
            finally:
                standby.query("SELECT pg_wal_replay_resume()")
            await follower.wait_for(token)  # once replayed, it resolves
        finally:
            await follower.close()
    print(f"\nstandby, unreplayed token: wait_for gave {type(outcome).__name__}: {outcome}")
    assert isinstance(outcome, pgfeed.WaitTimeout), f"{type(outcome).__name__}: {outcome}"


async def test_the_listener_falls_back_to_polling_on_a_standby_at_once(
    pair: tuple[Server, Server], caplog: pytest.LogCaptureFixture
) -> None:
    _, standby = pair
    caplog.set_level(logging.INFO, logger="pgfeed")
    reader = pgfeed.AsyncReader(standby.dsn("feed"), ticker="off", poll_interval=0.2, probe_timeout=5.0)
    async with reader:
        started = time.monotonic()
        async with await reader.subscribe(STREAM, since="now"):
            took = time.monotonic() - started
    events = [getattr(r, "pgfeed_event", {}).get("event") for r in caplog.records]
    print(f"\nstandby listener: subscribe took {took:.2f}s; events {sorted(set(filter(None, events)))}")
    assert "listener lost; reconnecting" not in events
    assert took < 2.5, f"subscribe on a standby took {took:.2f}s (probe_timeout 5s)"
