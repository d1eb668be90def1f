"""wait_for rides out killed backends (issue 10): while another thread
terminates every backend of the reader in a loop, many threads each write a
row, take its commit token and wait for it. Only WaitTimeout may escape, and
most waits must succeed. (tests/stress: marked slow.)"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import psycopg

import pgfeed
from pgfeed import admin

WAITERS = 6
KILL_ROUNDS = 24
KILL_EVERY = 0.5  # seconds between rounds: paces the load, synchronises nothing
WAIT_TIMEOUT = 10.0


def test_wait_for_while_the_readers_backends_are_killed_in_a_loop(
    pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    spared: set[int] = {pgfeed_conn.info.backend_pid}  # the killer's and the writers' own sessions
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    ready = threading.Barrier(WAITERS + 1)

    def waiter(reader: pgfeed.Reader) -> None:
        with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
            with lock:
                spared.add(conn.info.backend_pid)
            ready.wait(30)
            n = 0
            while not stop.is_set():
                n += 1
                pgfeed.append(conn, "orders", n)
                token = pgfeed.commit_token(conn)
                try:
                    reader.wait_for("orders", token, timeout=WAIT_TIMEOUT)
                    outcome = "ok"
                except Exception as exc:  # counted by type: the assertion below is on these
                    outcome = type(exc).__name__
                with lock:
                    outcomes[outcome] += 1

    killed: list[int] = []
    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on("orders", lambda batch: None, since="now")
        threads = [threading.Thread(target=waiter, args=(reader,), name=f"waiter-{i}") for i in range(WAITERS)]
        for t in threads:
            t.start()
        try:
            ready.wait(30)
            started = time.monotonic()
            for _ in range(KILL_ROUNDS):
                with lock:
                    keep = list(spared)
                row = pgfeed_conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> ALL(%s)",
                    (keep,),
                ).fetchone()
                assert row is not None
                killed.append(int(row[0]))
                if stop.wait(KILL_EVERY):
                    break
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            for t in threads:
                t.join(WAIT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in threads)
        # Once the killing stops, the reader is whole again: a fresh token is delivered.
        pgfeed.append(pgfeed_conn, "orders", "after")
        reader.wait_for("orders", pgfeed.commit_token(pgfeed_conn), timeout=30)

    waits = sum(outcomes.values())
    report = f"{dict(outcomes)} in {waits} waits over {elapsed:.1f}s; backends killed per round: {killed}"
    print(report)
    assert set(outcomes) <= {"ok", "WaitTimeout"}, report
    assert sum(killed) >= 2 * KILL_ROUNDS, report  # the listener and a read connection, at least, each round
    assert waits >= 5 * KILL_ROUNDS, report
    assert outcomes["ok"] >= 0.9 * waits, report
