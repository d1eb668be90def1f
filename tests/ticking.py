"""Ticks for tests: force one between commits, or run the daemon as the ticker.

Import with ``from ticking import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from helpers import PGFEED

import pgfeed


def take_tick(conn: psycopg.Connection[Any]) -> pgfeed.Position:
    """Force a tick now, as the ticker would (tests place ticks between and
    around commits with it); returns its position."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        row = conn.execute("SELECT id FROM pgfeed._insert_tick_v2(NULL, pgfeed._seq_now_v2())").fetchone()
    assert row is not None
    return pgfeed.Position(int(row[0]))


def leader(conn: psycopg.Connection[Any]) -> tuple[int, str | None, str | None, int | None]:
    """(term, holder, kind, backend pid) of a live lease, or (term, None, None, None)."""
    row = conn.execute(
        "SELECT term, holder, kind, backend_pid FROM pgfeed.ticker WHERE expires_at > clock_timestamp()"
    ).fetchone()
    if row is None:
        term = conn.execute("SELECT term FROM pgfeed.ticker").fetchone()
        return (int(term[0]) if term else 0, None, None, None)
    return (int(row[0]), row[1], row[2], row[3])


def wait_for_leader(dsn: str, *, kind: str | None = None, above_term: int = 0, timeout: float = 30) -> int:
    """Block until a ticker of ``kind`` leads with a term above ``above_term``;
    return its term. Polls the lease row (the state under test), bounded."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            term, _, got_kind, _ = leader(conn)
            if got_kind is not None and term > above_term and (kind is None or got_kind == kind):
                return term
            time.sleep(0.02)
    raise AssertionError(f"no {kind or 'any'} ticker took the lease above term {above_term} within {timeout}s")


@contextmanager
def daemon(dsn: str, *args: str, wait: bool = True) -> Iterator[subprocess.Popen[str]]:
    """`pgfeed daemon` in a process of its own; stopped with SIGTERM on exit."""
    proc = subprocess.Popen(
        [PGFEED, "--dsn", dsn, "daemon", "--lease", "2s", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGFEED_DSN": dsn},
    )
    try:
        if wait:
            wait_for_leader(dsn, kind="daemon")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
