"""Failover to a lagging asynchronous standby (issue 9's scenario).

A primary with a hot standby; 8 writers append on the primary; two live
followers connect through a DSN listing both servers with
``target_session_attrs=read-write`` (so they follow whichever is primary), a
third follows the standby itself. The standby is detached from streaming
(it keeps what it replayed: an async standby that fell behind), the writers go
on, the primary is stopped hard (``pg_ctl stop -m immediate``) under load and
the standby promoted; a daemon ticks there and 8 writers go on writing. A
reader resumed from the token a follower had reached on the old primary
joins afterwards (the token's check proves it is of another history: it is
refused), and so does a named consumer whose saved position is the one the
follower had reached (its tick's fingerprint differs: it resets).

Every row that exists on the new primary must be held by every follower: it
delivered it, or it reset (``batch.reset`` / ``on_reset``) and re-delivered
from the start. Rows the old primary committed after the standby fell behind
are gone; a follower that delivered them must have reset since.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from ticking import daemon, wait_for_leader

import pgfeed
from pgfeed.errors import TokenError

from .servers import detach_standby, either, pg_bin, poll, primary_with_standby, servers, wait_replayed
from .workload import Follower, Writers, assert_in_order, end_marker, stored_rows

pytestmark = pytest.mark.timeout(180)

STREAM = "orders"
Id = tuple[str, int, int]


@dataclass
class Outcome:
    """What the failover left: the new primary's rows and each reader's."""

    stored: list[Id] = field(default_factory=list)
    before: list[Id] = field(default_factory=list)  # committed (COMMIT returned) on the old primary
    after: list[Id] = field(default_factory=list)  # committed on the promoted standby
    delivered_before_failover: set[Id] = field(default_factory=set)  # by follower a
    saved: str = ""  # the token of follower a's last batch on the old primary
    saved_position: Any = None  # a's delivered position as a consumer's save writes it
    followers: dict[str, Follower] = field(default_factory=dict)
    resumed_error: BaseException | None = None
    resumed_refusals: list[str] = field(default_factory=list)
    stalled: dict[str, str] = field(default_factory=dict)  # followers that missed the first end marker
    unfinished: dict[str, str] = field(default_factory=dict)  # followers that missed the last one
    standby_ticks: int = 0
    old_primary_ticks: int = 0

    def report(self) -> str:
        stored = set(self.stored)
        lines = [
            f"failover: {len(self.before)} rows committed on the old primary, "
            f"{len(stored & set(self.before))} of them on the new one ({len(set(self.before) - stored)} lost with it); "
            f"{len(self.after)} committed after the failover; the new primary holds {len(stored)}; "
            f"old primary ticked to {self.old_primary_ticks}, the standby had {self.standby_ticks}; "
            f"resumed token {self.saved}, refused first: {self.resumed_refusals or 'no'}"
        ]
        for f in self.followers.values():
            held = set(f.ids)
            lines.append(
                f"  {f.summary()}; missing {len(stored - held)} "
                f"({len((stored - held) & set(self.after))} written after the failover), not on the new primary "
                f"{len(held - stored)}"
            )
        for name, why in {**self.stalled, **self.unfinished}.items():
            lines.append(f"  {name} {'never finished' if name in self.unfinished else 'stalled'}: {why}")
        if self.resumed_error is not None:
            lines.append(f"  resumed reader failed: {self.resumed_error!r}")
        return "\n".join(lines)


async def _scenario(bin_dir: Any) -> Outcome:
    out = Outcome()
    with servers() as made, contextlib.ExitStack() as stack:
        primary, standby = primary_with_standby(made, bin_dir, "feed", [STREAM])
        old, new = primary.dsn("feed"), standby.dsn("feed")
        both = either(primary, standby, "feed", read_write=True)
        old_daemon = stack.enter_context(daemon(old))
        # a, b: on whichever server is primary; c: on the standby itself.
        followers = [Follower("a", both, STREAM), Follower("b", both, STREAM), Follower("c", new, STREAM)]
        for f in followers:
            await f.start()
            out.followers[f.name] = f
        a = out.followers["a"]
        try:
            writers = Writers(old, STREAM, "before", count=8).start()
            await _until(lambda: len(a.rows) >= 150, "a delivered 150 rows")
            await asyncio.to_thread(detach_standby, standby)
            behind = len(a.rows)
            await _until(lambda: len(a.rows) >= behind + 150, "a delivered 150 rows the standby never got")
            # What a worker would have saved: a's last batch token, and the rows up to it;
            # and what a named consumer's save writes (its delivered position, with its tick's fingerprint).
            out.saved = a.token
            out.saved_position = a.sub.saved
            out.delivered_before_failover = set(a.ids)
            await asyncio.to_thread(primary.stop, "immediate")  # under load
            writers.stop()
            out.before = list(writers.committed)
            old_daemon.terminate()
            # The newest tick of the old primary the followers know of (they can learn no other now).
            out.old_primary_ticks = max(
                f.reader._refresher.head.id for f in (a, out.followers["b"]) if f.reader._refresher.head
            )
            out.standby_ticks = _head(new)
            assert out.standby_ticks < out.old_primary_ticks, "the standby did not lag"

            await asyncio.to_thread(standby.promote)
            stack.enter_context(daemon(new, wait=False))
            await asyncio.to_thread(wait_for_leader, new, kind="daemon")
            # A worker restarted from its saved token at once: the new primary's
            # ticks are behind it, so it is refused (correct).
            resumed = Follower("resumed", new, STREAM, since=out.saved)
            with contextlib.suppress(pgfeed.FutureToken):
                await _start_resumed(resumed, out)
            after = Writers(new, STREAM, "after", count=8, per_writer=40).start()
            await asyncio.to_thread(after.join)
            assert not after.errors, after.errors
            out.after = list(after.committed)
            # Every follower should now deliver the new primary's rows.
            out.stalled = await _wait_all(list(out.followers.values()), end_marker(new, STREAM), 5)
            # Past the old primary's tick ids (and the saved token's), any follower waiting
            # for a tick id of the old history wakes up.
            saved_tick = pgfeed.Position.parse(out.saved).tick
            out.after += await asyncio.to_thread(_write_until_head_passes, new, max(saved_tick, out.old_primary_ticks))
            # The same worker restarted again, as an operator retrying would.
            if resumed.reader is None:
                try:
                    await _start_resumed(resumed, out)
                except pgfeed.PgfeedError as exc:
                    out.resumed_error = exc
            # A named consumer whose last save reached the new primary (its pool
            # reconnects there before its reader notices the new history).
            await asyncio.to_thread(_save_position, new, "billing", out.saved_position)
            consumer = Follower("consumer", new, STREAM, consumer="billing")
            await consumer.start()
            out.followers[consumer.name] = consumer
            out.unfinished = await _wait_all(out.followers.values(), end_marker(new, STREAM), 30)
            out.stored = stored_rows(new, STREAM)
        finally:
            for f in out.followers.values():
                await f.close()
    return out


async def _wait_all(followers: Any, token: pgfeed.CommitToken, timeout: float) -> dict[str, str]:
    """wait_for ``token`` in every follower; why it failed, by follower."""
    failed: dict[str, str] = {}
    for f in followers:
        try:
            await f.wait_for(token, timeout=timeout)
        except AssertionError as exc:
            failed[f.name] = str(exc)
    return failed


def _head(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT max(id) FROM pgfeed.ticks").fetchone()
    return int(row[0]) if row else 0


def _save_position(dsn: str, consumer: str, saved: Any) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgfeed.positions (consumer, stream, token, tick_fp) VALUES (%s, %s, %s, %s)",
            (consumer, STREAM, saved.token, saved.tick_fp),
        )


def _write_until_head_passes(dsn: str, tick: int) -> list[Id]:
    """Single-row transactions until the newest tick is past ``tick``."""
    written: list[Id] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(5000):
            if _head(dsn) > tick:
                return written
            with conn.transaction():
                pgfeed.append(conn, STREAM, {"phase": "after", "w": 99, "i": i})
            written.append(("after", 99, i))
    raise AssertionError(f"the new primary's ticks did not pass {tick}")


def _ticks_ahead(dsn: str, count: int) -> None:
    """``count`` more ticks, one row each (waiting for the daemon's tick each time)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(count):
            head = _head(dsn)
            with conn.transaction():
                pgfeed.append(conn, STREAM, {"phase": "lost", "w": 99, "i": i})
            poll(lambda head=head: _head(dsn) > head, 10, "the daemon ticked")


async def _start_resumed(resumed: Follower, out: Outcome) -> None:
    try:
        await resumed.start()
    except pgfeed.FutureToken as exc:
        resumed.reader = None
        out.resumed_refusals.append(str(exc))
        raise
    out.followers[resumed.name] = resumed


async def _until(condition: Any, what: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def failover() -> Outcome:
    bin_dir = pg_bin("pg_basebackup")
    out = asyncio.run(_scenario(bin_dir))
    print("\n" + out.report())
    return out


def test_the_standby_lagged_and_rows_were_lost_with_the_old_primary(failover: Outcome) -> None:
    stored = set(failover.stored)
    assert len(failover.stored) == len(stored), "duplicate rows on the new primary"
    assert set(failover.before) - stored, "no committed row was lost: the standby did not lag"
    assert set(failover.after) <= stored
    assert len(failover.after) >= 300


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_every_live_follower_holds_exactly_the_new_primarys_rows(failover: Outcome, name: str) -> None:
    f = failover.followers[name]
    stored = set(failover.stored)
    held = f.ids
    assert len(held) == len(set(held)), f"{name} holds duplicates"
    missing, phantom = stored - set(held), set(held) - stored
    assert not missing, f"{name} silently skipped {len(missing)} rows: {sorted(missing)[:5]}"
    assert not phantom, f"{name} still holds {len(phantom)} rows the new primary does not have"
    assert_in_order(f)
    if set(r for r in map(_id, f.delivered)) - stored:
        # It delivered rows that the failover lost: it must have said so.
        assert f.reset_batches >= 1, f"{name} delivered lost rows and never reset"
        assert f.reset_reasons, f"{name} reset without calling on_reset"


def test_the_followers_agree(failover: Outcome) -> None:
    a, b, c = (failover.followers[n] for n in "abc")
    key = [(r.position, r.xid, r.seq) for r in c.rows]
    assert [(r.position, r.xid, r.seq) for r in a.rows] == key
    assert [(r.position, r.xid, r.seq) for r in b.rows] == key


def test_the_followers_on_the_old_primary_detected_the_history_change(failover: Outcome) -> None:
    for name in "ab":
        f = failover.followers[name]
        assert f.reset_batches == 1, f.summary()
        assert any("history changed" in r for r in f.reset_reasons), f.reset_reasons
    # The follower on the standby saw one history only.
    assert failover.followers["c"].reset_batches == 0


def test_a_reader_resumed_from_a_token_of_the_old_primary_is_refused_in_one_line(failover: Outcome) -> None:
    # The token's tick id exists on the new primary by then: only its check
    # (the tick's fingerprint) tells that it names a point of another history.
    assert "~" in failover.saved, failover.saved
    assert "resumed" not in failover.followers, failover.followers["resumed"].summary()
    error = failover.resumed_error
    assert isinstance(error, TokenError), repr(error)
    assert "does not belong to stream 'orders' on this database" in str(error)
    assert "history has changed since" in str(error)
    assert "\n" not in str(error)


def test_a_consumer_saved_on_the_old_primary_resets_and_holds_exactly_the_new_primarys_rows(
    failover: Outcome,
) -> None:
    assert failover.saved_position.tick_fp is not None
    f = failover.followers["consumer"]
    assert f.failure is None, repr(f.failure)
    assert f.reset_batches == 1, f.summary()
    assert "the database's history changed since this consumer saved its position" in f.reset_reasons[0]
    assert len(f.ids) == len(set(f.ids))
    assert sorted(f.ids) == sorted(failover.stored), f.summary()
    assert_in_order(f)


def _id(row: pgfeed.Row) -> Id:
    return (row.payload["phase"], row.payload["w"], row.payload["i"])


# -- the same failover, with the followers idle when the primary stops -----


@dataclass
class QuietOutcome:
    """A failover with nothing in flight, and what two followers on the old
    primary did with the new primary's first row."""

    old_head: int = 0
    standby_head: int = 0
    first_wait: str = ""  # what idle's wait_for did with the first row's token
    first_held: bool = False  # whether idle held that row when wait_for returned
    idle_reset_in_time: bool = False  # idle reset within 3 s of noticing the new history
    stored: list[Id] = field(default_factory=list)
    followers: dict[str, Follower] = field(default_factory=dict)

    def report(self) -> str:
        lines = [
            f"quiet failover: old primary's head tick {self.old_head}, the standby's {self.standby_head}; "
            f"the new primary holds {len(self.stored)} rows; idle's wait_for on the first new row: "
            f"{self.first_wait} (row held then: {self.first_held}); idle reset before the new ticks passed "
            f"the old head: {self.idle_reset_in_time}"
        ]
        for f in self.followers.values():
            lines.append(f"  {f.summary()}")
            lines.append(f"    batches (reset, rows, position): {f.batches}")
        return "\n".join(lines)


async def _quiet_scenario(bin_dir: Any) -> QuietOutcome:
    """``idle``: caught up with the old primary's newest tick, waiting for the
    next one. ``slow``: its consumer holds a batch while the next one waits in
    its (full) queue and its subscription waits to put a third."""
    out = QuietOutcome()
    with servers() as made, contextlib.ExitStack() as stack:
        primary, standby = primary_with_standby(made, bin_dir, "feed", [STREAM])
        old, new = primary.dsn("feed"), standby.dsn("feed")
        both = either(primary, standby, "feed", read_write=True)
        old_daemon = stack.enter_context(daemon(old))
        idle = Follower("idle", both, STREAM)
        slow = Follower("slow", both, STREAM, options={"batch_size": 10, "queue_batches": 1}, gate=asyncio.Event())
        for f in (idle, slow):
            await f.start()
            out.followers[f.name] = f
        try:
            await asyncio.to_thread(Writers(old, STREAM, "replicated", count=4, per_writer=20).start().join)
            await asyncio.to_thread(wait_replayed, primary, standby)
            await asyncio.to_thread(detach_standby, standby)
            await asyncio.to_thread(Writers(old, STREAM, "lost", count=4, per_writer=20).start().join)
            await asyncio.to_thread(_ticks_ahead, old, 4)  # the standby surely lags by 4 ticks or more
            await idle.wait_for(end_marker(old, STREAM))
            # The daemon ticks only when something changed: this head stays the newest.
            out.old_head = _head(old)
            await idle.wait_for(pgfeed.Position(out.old_head))
            await _until(
                # The subscription is blocked putting its next batch (asyncio.Queue's waiters).
                lambda: slow.sub._queue.full() and len(slow.sub._queue._putters) > 0,
                "the slow follower's subscription waits on its full queue",
            )
            await asyncio.to_thread(primary.stop, "immediate")
            old_daemon.terminate()
            out.standby_head = _head(new)
            assert out.old_head - out.standby_head >= 4, (out.old_head, out.standby_head)

            await asyncio.to_thread(standby.promote)
            stack.enter_context(daemon(new, wait=False))
            await asyncio.to_thread(wait_for_leader, new, kind="daemon")
            # The first row after the failover, and read-your-writes on it.
            with psycopg.connect(new, autocommit=True) as conn:
                with conn.transaction():
                    pgfeed.append(conn, STREAM, {"phase": "first", "w": 0, "i": 0})
                token = pgfeed.commit_token(conn)
            try:
                pos = await idle.wait_for(token, timeout=5)
                out.first_wait = f"returned {pos}"
                out.first_held = ("first", 0, 0) in idle.ids
            except AssertionError as exc:
                out.first_wait = str(exc)
            assert _head(new) < out.old_head
            # The slow follower's reader notices the new history while its consumer is away.
            await _until(lambda: bool(slow.reset_reasons), "the slow follower resets", timeout=15)
            assert slow.gate is not None
            slow.gate.set()
            # The idle follower's reader notices too (its head is the new primary's now): does it reset?
            assert idle.reader is not None
            await _until(
                lambda: idle.reader is not None and idle.reader._refresher.head is not None
                and idle.reader._refresher.head.id < out.old_head,
                "the idle follower's reader reads the new primary's ticks",
                timeout=15,
            )  # fmt: skip
            with contextlib.suppress(AssertionError):
                await _until(lambda: idle.reset_batches > 0, "the idle follower resets", timeout=3)
            out.idle_reset_in_time = idle.reset_batches > 0
            assert _head(new) < out.old_head
            # Once the new primary's tick ids pass the old head, a stalled follower goes on.
            await asyncio.to_thread(_write_until_head_passes, new, out.old_head)
            token = end_marker(new, STREAM)
            for f in (idle, slow):
                if f.failure is None:
                    with contextlib.suppress(AssertionError):
                        await f.wait_for(token, timeout=15)
            out.stored = stored_rows(new, STREAM)
        finally:
            for f in out.followers.values():
                await f.close()
    return out


@pytest.fixture(scope="module")
def quiet_failover() -> QuietOutcome:
    bin_dir = pg_bin("pg_basebackup")
    out = asyncio.run(_quiet_scenario(bin_dir))
    print("\n" + out.report())
    return out


@pytest.mark.xfail(
    strict=False,  # passes when the reader saw the new history (and reset its head) before wait_for
    reason="known gap (commit tokens carry no history: x<xid> names a transaction id, which the promoted "
    "standby reuses): when wait_for runs before the reader has noticed the failover, Resolver.commit settles "
    "the token in memory against the old history's cached head, whose snapshot counts that xid as ended, so "
    "wait_for can return before the row is delivered. Position tokens' checks do not help here; closing it "
    "needs the commit token to name the history it was taken on, or a query per wait_for",
)
def test_wait_for_after_the_failover_returns_only_once_the_row_is_delivered(quiet_failover: QuietOutcome) -> None:
    assert quiet_failover.first_wait.startswith("returned"), quiet_failover.first_wait
    assert quiet_failover.first_held, f"wait_for {quiet_failover.first_wait}, but the row was not delivered"


def test_an_idle_follower_resets_as_soon_as_it_sees_the_new_history(quiet_failover: QuietOutcome) -> None:
    assert quiet_failover.idle_reset_in_time


def test_an_idle_follower_ends_with_exactly_the_new_primarys_rows(quiet_failover: QuietOutcome) -> None:
    f = quiet_failover.followers["idle"]
    assert f.failure is None
    assert len(f.ids) == len(set(f.ids))
    assert sorted(f.ids) == sorted(quiet_failover.stored)
    assert_in_order(f)
    assert f.reset_batches == 1, f.summary()
    assert any("history changed" in r for r in f.reset_reasons), f.summary()


def test_a_slow_consumer_gets_the_reset_and_then_exactly_the_new_primarys_rows(
    quiet_failover: QuietOutcome,
) -> None:
    f = quiet_failover.followers["slow"]
    assert f.failure is None, repr(f.failure)
    assert f.reset_batches == 1, f.summary()
    assert sorted(f.ids) == sorted(quiet_failover.stored)
