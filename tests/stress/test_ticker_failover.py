"""The ticker's guarantees under failure, with real processes (issue 8, "Guarantees").

Exactly one ticker per database takes ticks: the holder of the lease row
``pgfeed.ticker``, fenced by its term. These tests kill, stop and race
``pgfeed daemon`` processes and readers' embedded tickers, and restart
PostgreSQL under them, while 16 writer threads commit rows with unique ids;
readers in other processes must still deliver every committed row exactly
once, in one order. Nothing here sleeps to synchronise: every wait is on a
real condition (the lease row, delivered rows, ticks, a process's exit or its
log), polled with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from helpers import PGFEED, one_line_error
from ticking import leader, wait_for_leader
from workloads import append_end_marker, assert_exactly_once, assert_positions_increase, committed_order, ids_of

import pgfeed
from pgfeed.testing import TestServer

HERE = Path(__file__).parent
#: The daemons' lease in these tests (seconds), as tests/ticking.daemon uses.
LEASE = 2.0
#: A candidate retries its claim every lease/3, jittered by up to 20%.
CLAIM_INTERVAL = LEASE / 3 * 1.2
#: Scheduling slack on a loaded 2-core machine, on top of a bound the design promises.
SLACK = 1.5
#: The bound on replacing a dead or stopped leader (pgfeed.ticker: "within lease plus one claim interval").
FAILOVER_BOUND = LEASE + CLAIM_INTERVAL + SLACK

T = TypeVar("T")
#: (tick id, term) in tick order.
Ticks = list[tuple[int, int | None]]


# -- waiting ------------------------------------------------------------------
def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.02) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def wait_exit(proc: subprocess.Popen[Any], timeout: float, what: str) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} (pid {proc.pid}) did not exit within {timeout:g}s") from None


# -- the database's view ------------------------------------------------------
def lease_row(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT term, holder, kind, backend_pid, heartbeat_at::text AS heartbeat_at,"
            " expires_at::text AS expires_at, expires_at > clock_timestamp() AS live FROM pgfeed.ticker"
        )
        row = cur.fetchone()
        assert row is not None
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))


def tick_terms(dsn: str) -> Ticks:
    """(tick id, term) of every tick, in tick order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [(int(i), t) for i, t in conn.execute("SELECT id, term FROM pgfeed.ticks ORDER BY id").fetchall()]


def max_tick(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM pgfeed.ticks").fetchone()
    return int(row[0]) if row else 0


def ticks_of_term(dsn: str, term: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgfeed.ticks WHERE term = %s", (term,)).fetchone()
    return int(row[0]) if row else 0


def assert_terms_never_go_back(ticks: Ticks) -> None:
    """Ticks in id order carry non-decreasing terms (NULL: a stream's creation tick)."""
    terms = [t for _, t in ticks if t is not None]
    assert terms == sorted(terms), f"a tick carries an older term than the tick before it: {terms}"


def assert_only_term_after(ticks: Ticks, first_id: int, term: int) -> None:
    """Every tick from ``first_id`` on carries ``term`` (or NULL)."""
    stray = [(i, t) for i, t in ticks if i >= first_id and t is not None and t != term]
    assert not stray, f"ticks after term {term} took over carry another term: {stray[:10]}"


def first_tick_of(ticks: Ticks, term: int) -> int:
    ids = [i for i, t in ticks if t == term]
    assert ids, f"term {term} took no tick"
    return min(ids)


def row_terms(rows: list[dict[str, Any]], ticks: Ticks) -> dict[str, int | None]:
    """Each delivered row's id -> the term of the tick that made it visible."""
    term_of = dict(ticks)
    return {
        r["payload"]["id"]: term_of[pgfeed.Position.parse(r["position"]).tick] for r in rows if "id" in r["payload"]
    }


def holder_pid(holder: str | None) -> int | None:
    """The pid in a lease holder ("daemon <host> pid <pid>" / "reader <host> pid <pid>")."""
    if not holder or " pid " not in holder:
        return None
    return int(holder.rsplit(" pid ", 1)[1])


# -- writers ------------------------------------------------------------------
@dataclass
class Writers:
    """``n`` threads, each committing 1-3 rows with unique ids per transaction
    (10% rolled back) until stopped. With ``hold``, writer 0 keeps its first
    transaction open until ``hold`` is set (a transaction that spans a failover)."""

    dsn: str
    stream: str
    n: int = 16
    tolerate_disconnects: bool = False
    hold: threading.Event | None = None
    committed: list[str] = field(default_factory=list)
    held_ids: list[str] = field(default_factory=list)
    held_open: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    disconnects: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Writers:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.n)]
        for t in self._threads:
            t.start()
        if self.hold is not None:
            assert self.held_open.wait(15), "writer 0 did not open its long transaction"
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self.hold is not None:
            self.hold.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a writer did not stop"
        if self.errors:
            raise self.errors[0]

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        conn: psycopg.Connection[Any] | None = None
        t = 0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, connect_timeout=5)
                ids = [f"w{n}-t{t}-r{k}" for k in range(rng.choice((1, 1, 2, 3)))]
                for i in ids:
                    pgfeed.append(conn, self.stream, {"id": i})
                if n == 0 and t == 0 and self.hold is not None:
                    self.held_ids = ids
                    self.held_open.set()
                    self.hold.wait(60)
                time.sleep(rng.uniform(0.002, 0.02))  # pacing: ~1,500 rows/s in all, the cores are shared
                if rng.random() < 0.1:
                    conn.rollback()
                else:
                    conn.commit()
                    with self._lock:
                        self.committed.extend(ids)
            except (psycopg.OperationalError, pgfeed.ConnectError):
                if not self.tolerate_disconnects:
                    raise
                # The outcome of this transaction is unknown: the table is the truth for it.
                self.disconnects += 1
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
                self._stop.wait(0.05)  # reconnect backoff, not synchronisation
            except BaseException as exc:
                self.errors.append(exc)
                return
            finally:
                t += 1
        if conn is not None:
            conn.close()


# -- reader processes ---------------------------------------------------------
@dataclass
class Follower:
    """A reader in another OS process (tests/stress/follower.py)."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rows(self) -> list[dict[str, Any]]:
        """Delivered rows so far (complete lines only: a killed process may leave half of one)."""
        if not self.out.exists():
            return []
        text = self.out.read_text()
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def delivered(self) -> set[str]:
        return set(ids_of(self.rows()))

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"reader {self.name} did not finish within {timeout:g}s; it delivered {len(self.rows())} rows"
            ) from None
        assert self.proc.returncode == 0, f"reader {self.name} failed: {self.err.read_text()[-2000:]}"
        return self.rows()


@pytest.fixture
def followers(tmp_path: Path) -> Iterator[Callable[..., list[Follower]]]:
    """Start reader processes: ``followers(dsn, stream, ("a", "earliest"), ...)``,
    each spec ``(name, since)``, with ``ticker`` (``off``: only daemons tick) and
    ``lease`` for all; returns once every subscription is live."""
    started: list[Follower] = []

    def start(
        dsn: str, stream: str, *specs: tuple[str, str], ticker: str = "off", lease: float = LEASE
    ) -> list[Follower]:
        batch = []
        for name, since in specs:
            out, ready, err = (tmp_path / f"{name}.{ext}" for ext in ("jsonl", "ready", "err"))
            with open(err, "wb") as err_file:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(HERE / "follower.py"),
                        dsn,
                        stream,
                        since,
                        *map(str, (out, ready)),
                        ticker,
                        str(lease),
                    ],
                    stderr=err_file,
                    stdout=subprocess.DEVNULL,
                )
            batch.append((Follower(name, proc, out, err), ready))
            started.append(batch[-1][0])
        for f, ready in batch:

            def up(f: Follower = f, ready: Path = ready) -> bool:
                if f.proc.poll() is not None:
                    raise AssertionError(f"reader {f.name} failed to start: {f.err.read_text()[-2000:]}")
                return ready.exists()

            wait_until(up, 30, f"reader {f.name} to subscribe", every=0.05)
        return [f for f, _ in batch]

    yield start
    for f in started:
        if f.proc.poll() is None:
            f.proc.kill()
            f.proc.wait()


@dataclass
class Daemon:
    """``pgfeed -v daemon`` in its own process; its JSON log lines go to a file."""

    proc: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def stderr(self) -> str:
        return self.log.read_text()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``pgfeed daemon`` processes (``daemons(dsn, lease="2s")``); each is
    resumed and stopped with SIGTERM (then SIGKILL) at the end of the test."""
    started: list[Daemon] = []

    def start(dsn: str, lease: str = f"{LEASE:g}s") -> Daemon:
        log = tmp_path / f"daemon{len(started)}.log"
        with open(log, "w") as log_file:
            proc = subprocess.Popen(
                [PGFEED, "-v", "--dsn", dsn, "daemon", "--lease", lease, "--retention", "off"],
                stdout=log_file,
                stderr=log_file,
                text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PGFEED_")},
            )
        started.append(Daemon(proc, log))
        return started[-1]

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)
            d.proc.terminate()
    for d in started:
        try:
            d.proc.wait(15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def writers() -> Iterator[Callable[..., Writers]]:
    """Start :class:`Writers` (``writers(dsn, stream, n=16, ...)``); a test
    that fails midway still has them stopped before its database is dropped."""
    started: list[Writers] = []

    def start(dsn: str, stream: str, **kwargs: Any) -> Writers:
        started.append(Writers(dsn, stream, **kwargs))
        return started[-1].start()

    yield start
    for w in started:
        with contextlib.suppress(BaseException):
            w.stop()


def lead_as(dsn: str, proc_pid: int, kind: str, above_term: int = 0, timeout: float = 15) -> int:
    """Wait until process ``proc_pid`` holds a live lease of ``kind`` above ``above_term``; its term."""

    def check() -> int | None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            term, holder, got_kind, _ = leader(conn)
        if got_kind == kind and term > above_term and holder_pid(holder) == proc_pid:
            return term
        return None

    return wait_until(check, timeout, f"{kind} pid {proc_pid} to lead above term {above_term}")


def delivered_at_least(group: list[Follower], n: int) -> Callable[[], bool]:
    return lambda: all(len(f.rows()) >= n for f in group)


def delivered_beyond(group: list[Follower], ids: list[str], n: int) -> Callable[[], bool]:
    """Every follower delivered ``ids`` and at least ``n`` rows."""
    return lambda: all(set(ids) <= f.delivered() and len(f.rows()) >= n for f in group)


def take_over(
    dsn: str, victim: Any, sig: signal.Signals, successor: int, kind: str, old_term: int, work: Writers, *live: Follower
) -> int:
    """Send ``sig`` to the leading ``victim`` process; wait for process
    ``successor`` to lead within the failover bound; let writer 0's transaction
    (opened under the old leader) commit; wait for ``live`` to deliver it and
    300 more rows. Returns the new term."""
    victim.send_signal(sig)
    sent_at = time.monotonic()
    new_term = lead_as(dsn, successor, kind, above_term=old_term, timeout=FAILOVER_BOUND + 10)
    took = time.monotonic() - sent_at
    assert took < FAILOVER_BOUND, f"pid {successor} took {took:.2f}s to take over (bound {FAILOVER_BOUND:g}s)"
    assert work.hold is not None
    work.hold.set()
    at_takeover = min(len(f.rows()) for f in live)
    wait_until(delivered_beyond(list(live), work.held_ids, at_takeover + 300), 30, f"rows under the new {kind}")
    return new_term


def finish(
    dsn: str,
    stream: str,
    work: Writers,
    live: list[Follower],
    followers: Callable[..., list[Follower]],
    timeout: float = 60,
) -> list[list[dict[str, Any]]]:
    """Stop the writers, commit the end marker, collect every live reader's
    rows and then a catch-up reader's from earliest, and check them all
    (:func:`check_feed`). Returns the rows, the catch-up reader's last."""
    work.stop()
    append_end_marker(dsn, stream)
    all_rows = [f.wait(timeout) for f in live]
    (catch_up,) = followers(dsn, stream, ("catch_up", "earliest"))
    all_rows.append(catch_up.wait(60))
    check_feed(dsn, stream, work, *all_rows)
    return all_rows


def check_feed(dsn: str, stream: str, work: Writers, *all_rows: list[dict[str, Any]]) -> None:
    """Every row in the table delivered exactly once, in one order, with one
    token per row, by every reader; every acknowledged commit is in the table."""
    in_table = committed_order(dsn, stream)
    assert set(work.committed) <= set(in_table), "an acknowledged commit is missing from the table"
    if not work.tolerate_disconnects:
        assert sorted(in_table) == sorted(work.committed)
    for rows in all_rows:
        assert_exactly_once(ids_of(rows), in_table)
        assert_positions_increase(rows)
        assert rows[-1]["payload"] == {"end": True}
    for rows in all_rows[1:]:
        assert rows == all_rows[0], "two readers delivered different rows, orders or tokens"


def check_handover(dsn: str, rows: list[dict[str, Any]], old_term: int, new_term: int, held: list[str]) -> Ticks:
    """Terms never go back in tick order, only ``new_term`` ticks once it
    took over, ``rows`` were delivered under both terms, and the ``held``
    rows under the new one. Returns the ticks."""
    ticks = tick_terms(dsn)
    assert_terms_never_go_back(ticks)
    assert_only_term_after(ticks, first_tick_of(ticks, new_term), new_term)
    terms = row_terms(rows, ticks)
    assert set(terms.values()) == {old_term, new_term}, "rows were not delivered under both tickers"
    assert {terms[i] for i in held} == ({new_term} if held else set())
    return ticks


@dataclass
class DaemonPair:
    """A leading daemon, a standby, two live readers (``ticker="off"``: only
    daemons tick) and 16 writers, writer 0 holding a transaction open."""

    dsn: str
    stream: str
    first: Daemon
    second: Daemon
    old_term: int
    live: list[Follower]
    work: Writers
    followers: Callable[..., list[Follower]]


@pytest.fixture
def daemon_pair(
    pgfeed_dsn: str,
    stream: str,
    daemons: Callable[..., Daemon],
    followers: Callable[..., list[Follower]],
    writers: Callable[..., Writers],
) -> DaemonPair:
    first = daemons(pgfeed_dsn)
    old_term = lead_as(pgfeed_dsn, first.pid, "daemon")
    second = daemons(pgfeed_dsn)
    live = followers(pgfeed_dsn, stream, ("a", "earliest"), ("b", "now"))
    work = writers(pgfeed_dsn, stream, n=16, hold=threading.Event())
    wait_until(delivered_at_least(live, 300), 30, "rows delivered under the first leader")
    return DaemonPair(pgfeed_dsn, stream, first, second, old_term, live, work, followers)


# -- 1. SIGKILL ---------------------------------------------------------------
@pytest.mark.timeout(120)
def test_daemon_leader_sigkilled_mid_stream_another_takes_over_nothing_lost(daemon_pair: DaemonPair) -> None:
    p = daemon_pair
    new_term = take_over(p.dsn, p.first.proc, signal.SIGKILL, p.second.pid, "daemon", p.old_term, p.work, *p.live)
    assert wait_exit(p.first.proc, 10, "the SIGKILLed daemon") == -signal.SIGKILL
    rows_a, _, _ = finish(p.dsn, p.stream, p.work, p.live, p.followers)

    assert len(p.work.committed) > 600
    check_handover(p.dsn, rows_a, p.old_term, new_term, p.work.held_ids)
    assert lease_row(p.dsn)["term"] == new_term


# -- 2. SIGSTOP ---------------------------------------------------------------
@pytest.mark.timeout(120)
def test_daemon_leader_sigstopped_is_replaced_and_fenced_when_it_resumes(daemon_pair: DaemonPair) -> None:
    p = daemon_pair
    # Alive, connected and silent: its lease runs out.
    new_term = take_over(p.dsn, p.first.proc, signal.SIGSTOP, p.second.pid, "daemon", p.old_term, p.work, *p.live)

    p.first.proc.send_signal(signal.SIGCONT)
    # It wakes up believing it leads; its next renewal or tick is refused.
    wait_until(
        lambda: p.first.events("ticker no longer leads"), 3 * LEASE + SLACK, "the resumed daemon to see it was deposed"
    )
    resumed_tick = max_tick(p.dsn)
    wait_until(lambda: max_tick(p.dsn) >= resumed_tick + 20, 30, "ticks after the old leader resumed")
    # The fence itself: the old term can neither tick (even forced) nor renew.
    with psycopg.connect(p.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SELECT * FROM pgfeed.tick_v2(%s, true)", (p.old_term,))
        assert refused.value.sqlstate == "PF001"
        renewed = conn.execute("SELECT pgfeed.ticker_renew_v2(%s, 2000)", (p.old_term,)).fetchone()
        assert renewed == (False,)
    rows_a, _, _ = finish(p.dsn, p.stream, p.work, p.live, p.followers)

    ticks = check_handover(p.dsn, rows_a, p.old_term, new_term, p.work.held_ids)
    assert {t for i, t in ticks if i > resumed_tick and t is not None} == {new_term}, "a tick after the resume"
    lease = lease_row(p.dsn)
    assert (lease["term"], holder_pid(lease["holder"]), lease["live"]) == (new_term, p.second.pid, True)
    assert p.first.proc.poll() is None, f"the resumed daemon died: {p.first.stderr()[-2000:]}"
    assert len(p.first.events("ticker leads")) == 1, "the deposed daemon took the lease again"


# -- 3. two at once -----------------------------------------------------------
@pytest.mark.timeout(90)
def test_two_daemons_started_at_once_exactly_one_leads(
    pgfeed_dsn: str,
    stream: str,
    daemons: Callable[..., Daemon],
    followers: Callable[..., list[Follower]],
    writers: Callable[..., Writers],
) -> None:
    live = followers(pgfeed_dsn, stream, ("a", "earliest"))
    pair = [daemons(pgfeed_dsn), daemons(pgfeed_dsn)]
    term = wait_for_leader(pgfeed_dsn, kind="daemon", timeout=30)
    work = writers(pgfeed_dsn, stream, n=4)
    # Watch the lease through several renewals (each lets the other daemon
    # try a claim or two meanwhile): one holder, one term, never vacant.
    samples: list[dict[str, Any]] = []

    def renewed_four_times() -> bool:
        samples.append(lease_row(pgfeed_dsn))
        return len({s["heartbeat_at"] for s in samples}) >= 5

    wait_until(renewed_four_times, 10 * LEASE, "four renewals of the lease")
    finish(pgfeed_dsn, stream, work, live, followers)

    assert {(s["term"], s["holder"], s["kind"], s["live"]) for s in samples} == {
        (term, samples[0]["holder"], "daemon", True)
    }
    assert term == 1, f"{term} claims succeeded on a fresh database; exactly one should have"
    leading = holder_pid(samples[0]["holder"])
    assert leading in {d.pid for d in pair}
    assert all(d.proc.poll() is None for d in pair), "a daemon exited"
    assert [len(d.events("ticker leads")) for d in pair] == [int(d.pid == leading) for d in pair]
    ticks = tick_terms(pgfeed_dsn)
    assert {t for _, t in ticks if t is not None} == {term}
    assert len([t for _, t in ticks if t is not None]) > 10


# -- 4. PostgreSQL restart ----------------------------------------------------
@pytest.mark.restart
@pytest.mark.timeout(150)
def test_postgres_restart_under_the_daemon_it_reconnects_and_keeps_ticking(
    pgfeed_server: TestServer,
    pgfeed_dsn: str,
    stream: str,
    daemons: Callable[..., Daemon],
    followers: Callable[..., list[Follower]],
    writers: Callable[..., Writers],
) -> None:
    if not pgfeed_server.can_restart:
        pytest.skip(f"this test restarts the server; {pgfeed_server.source} cannot be restarted by the tests")
    ticker = daemons(pgfeed_dsn)
    before = lead_as(pgfeed_dsn, ticker.pid, "daemon")
    live = followers(pgfeed_dsn, stream, ("a", "earliest"), ("b", "now"))
    work = writers(pgfeed_dsn, stream, n=16, tolerate_disconnects=True)
    wait_until(delivered_at_least(live, 300), 30, "rows delivered before the restart")
    last_before = max_tick(pgfeed_dsn)

    pgfeed_server.restart("immediate")  # crash-like: every backend dies at once, the lease row stays

    # It may keep its term or claim a new one; either way it ticks again.
    wait_until(lambda: max_tick(pgfeed_dsn) > last_before + 20, 30, "ticks after the restart")
    after = lead_as(pgfeed_dsn, ticker.pid, "daemon", above_term=0, timeout=5)
    at_restart = min(len(f.rows()) for f in live)
    wait_until(delivered_at_least(live, at_restart + 300), 30, "rows delivered after the restart")
    rows_a, _, _ = finish(pgfeed_dsn, stream, work, live, followers, timeout=90)

    assert work.disconnects >= 1, "the restart did not reach the writers"
    assert ticker.proc.poll() is None, f"the daemon exited: {ticker.stderr()[-2000:]}"
    assert ticker.events("ticker connection lost; reconnecting"), "the daemon never saw the restart"
    assert after >= before
    ticks = tick_terms(pgfeed_dsn)
    assert_terms_never_go_back(ticks)
    assert {t for i, t in ticks if i > last_before and t is not None} <= {before, after}
    assert [i for i, _ in ticks] == list(range(ticks[0][0], ticks[-1][0] + 1)), "tick ids have a hole"
    terms = row_terms(rows_a, ticks)
    assert any(
        pgfeed.Position.parse(r["position"]).tick > last_before and terms[r["payload"]["id"]] == after
        for r in rows_a
        if "id" in r["payload"]
    )


@pytest.mark.timeout(60)
def test_dropped_ticker_connection_costs_no_lease_long_outage(
    pgfeed_dsn: str, stream: str, daemons: Callable[..., Daemon]
) -> None:
    lease = 10.0
    ticker = daemons(pgfeed_dsn, lease=f"{lease:g}s")
    term = lead_as(pgfeed_dsn, ticker.pid, "daemon")
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (lease_row(pgfeed_dsn)["backend_pid"],))
        last = max_tick(pgfeed_dsn)
        pgfeed.append(conn, stream, {"id": "after the drop"})
    # Nobody else holds the lease: reconnecting (backoff from 0.1 s) and
    # ticking should take well under half the lease.
    wait_until(lambda: max_tick(pgfeed_dsn) > last, lease / 2, "a tick after the ticker's connection dropped")
    assert lease_row(pgfeed_dsn)["term"] == term
    assert ticker.events("ticker connection lost; reconnecting")


# -- 5. the embedded ticker ---------------------------------------------------
@pytest.mark.timeout(120)
def test_embedded_ticker_leader_killed_the_other_reader_takes_over_within_lease(
    pgfeed_dsn: str, stream: str, followers: Callable[..., list[Follower]], writers: Callable[..., Writers]
) -> None:
    pair = followers(pgfeed_dsn, stream, ("a", "earliest"), ("b", "earliest"), ticker="auto", lease=LEASE)
    by_pid = {f.pid: f for f in pair}
    old_term = wait_for_leader(pgfeed_dsn, kind="reader", timeout=15)
    lease = lease_row(pgfeed_dsn)
    assert lease["holder"].startswith("reader "), lease
    victim = by_pid[holder_pid(lease["holder"])]
    (survivor,) = [f for f in pair if f is not victim]
    work = writers(pgfeed_dsn, stream, n=16, hold=threading.Event())
    wait_until(delivered_at_least(pair, 300), 30, "rows delivered under the first embedded ticker")

    new_term = take_over(pgfeed_dsn, victim.proc, signal.SIGKILL, survivor.pid, "reader", old_term, work, survivor)
    assert wait_exit(victim.proc, 10, "the SIGKILLed reader") == -signal.SIGKILL
    rows, _ = finish(pgfeed_dsn, stream, work, [survivor], followers)

    partial = victim.rows()
    assert len(partial) >= 300
    assert partial == rows[: len(partial)], "the killed reader's rows are not a prefix of the survivor's"
    check_handover(pgfeed_dsn, rows, old_term, new_term, work.held_ids)


# -- 6. a daemon preempts the embedded ticker ---------------------------------
@pytest.mark.timeout(90)
def test_daemon_started_while_a_reader_ticks_takes_the_lease_over(
    pgfeed_dsn: str,
    stream: str,
    daemons: Callable[..., Daemon],
    followers: Callable[..., list[Follower]],
    writers: Callable[..., Writers],
) -> None:
    reader_lease = 60.0  # the daemon must not wait for it to run out
    (embedded,) = followers(pgfeed_dsn, stream, ("embedded", "earliest"), ticker="auto", lease=reader_lease)
    reader_term = lead_as(pgfeed_dsn, embedded.pid, "reader")
    work = writers(pgfeed_dsn, stream, n=8)
    wait_until(delivered_at_least([embedded], 200), 30, "rows delivered under the embedded ticker")

    ticker = daemons(pgfeed_dsn)
    started_at = time.monotonic()
    daemon_term = lead_as(pgfeed_dsn, ticker.pid, "daemon", above_term=reader_term, timeout=15)
    took = time.monotonic() - started_at
    assert took < reader_lease / 4, f"the daemon took {took:.2f}s: it waited for the reader's lease"
    at_takeover = len(embedded.rows())
    wait_until(
        lambda: ticks_of_term(pgfeed_dsn, daemon_term) >= 20 and len(embedded.rows()) >= at_takeover + 200,
        30,
        "rows delivered under the daemon",
    )
    rows, _ = finish(pgfeed_dsn, stream, work, [embedded], followers)

    lease = lease_row(pgfeed_dsn)
    assert (lease["term"], lease["kind"], holder_pid(lease["holder"])) == (daemon_term, "daemon", ticker.pid)
    ticks = check_handover(pgfeed_dsn, rows, reader_term, daemon_term, [])
    assert {t for _, t in ticks if t is not None} == {reader_term, daemon_term}


# -- 7. the daemon command ----------------------------------------------------
def run_daemon_cmd(dsn: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGFEED, "--dsn", dsn, "daemon", "--lease", "2s"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("PGFEED_")},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(60)
def test_daemon_cli_bad_dsn_is_one_line_and_non_zero() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} dbname=nowhere user=nobody connect_timeout=3"
    line = one_line_error(run_daemon_cmd(dsn))
    assert "127.0.0.1" in line or "connect" in line, line


@pytest.mark.timeout(60)
def test_daemon_cli_unmigrated_database_says_pgfeed_migrate(pgfeed_server: TestServer, fresh_db: str) -> None:
    line = one_line_error(run_daemon_cmd(pgfeed_server.dsn_for(fresh_db)))
    assert "pgfeed migrate" in line, line


@pytest.mark.timeout(90)
def test_daemon_sigterm_exits_zero_and_resigns_so_another_takes_over_at_once(
    pgfeed_dsn: str, stream: str, daemons: Callable[..., Daemon]
) -> None:
    long_lease = 60.0  # a takeover well within it can only come from a resignation

    # Alone: SIGTERM, exit 0, and the lease is left expired under its term.
    alone = daemons(pgfeed_dsn, lease=f"{long_lease:g}s")
    alone_term = lead_as(pgfeed_dsn, alone.pid, "daemon")
    alone.proc.send_signal(signal.SIGTERM)
    assert wait_exit(alone.proc, 15, "the SIGTERMed daemon") == 0, alone.stderr()[-2000:]
    lease = lease_row(pgfeed_dsn)
    assert (lease["term"], lease["live"]) == (alone_term, False), lease
    assert alone.events("ticker resigned")

    # With a standby waiting: it takes over at once, not when the lease would have run out.
    first = daemons(pgfeed_dsn, lease=f"{long_lease:g}s")
    first_term = lead_as(pgfeed_dsn, first.pid, "daemon", above_term=alone_term)
    standby = daemons(pgfeed_dsn, lease=f"{long_lease:g}s")

    def standby_waiting() -> bool:
        # The standby's ticker connection has tried a claim and now idles
        # until its next attempt (lease/3 away) or a resignation's NOTIFY.
        with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'pgfeed ticker' AND state = 'idle' AND query LIKE '%%ticker_claim_v2%%'"
                " AND pid <> (SELECT backend_pid FROM pgfeed.ticker)"
            ).fetchone()
        return bool(row and row[0] >= 1)

    wait_until(standby_waiting, 15, "the standby daemon to wait for the lease")
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        pgfeed.append(conn, stream, {"id": "before"})
    first.proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    new_term = lead_as(pgfeed_dsn, standby.pid, "daemon", above_term=first_term, timeout=long_lease / 4)
    took = time.monotonic() - stopped_at
    assert wait_exit(first.proc, 15, "the SIGTERMed daemon") == 0, first.stderr()[-2000:]
    assert took < long_lease / 6, f"the standby took {took:.2f}s to take over after a clean stop"
    # The new leader ticks: a row appended now becomes visible under its term.
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        pgfeed.append(conn, stream, {"id": "after"})
    wait_until(lambda: ticks_of_term(pgfeed_dsn, new_term) >= 1, 10, "a tick by the new leader")
    assert standby.proc.poll() is None
