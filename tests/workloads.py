"""Helpers for the reader's adversarial tests: workloads, reader processes (feed_reader.py), checks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pgfeed

HERE = Path(__file__).parent


def committed_order(dsn: str, stream: str) -> list[Any]:
    """Every committed payload id of ``stream``, read straight from the table."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT e.payload FROM pgfeed.events e JOIN pgfeed.streams s ON s.id = e.stream_id WHERE s.name = %s",
            (stream,),
        ).fetchall()
    return [r[0]["id"] for r in rows if isinstance(r[0], dict) and "id" in r[0]]


@dataclass
class Workload:
    """Concurrent writers with random sleeps, rollbacks, multi-row and long transactions."""

    dsn: str
    stream: str
    writers: int = 16
    transactions: int = 12
    rollback_rate: float = 0.15
    long_transactions: int = 2
    long_seconds: float = 3.0
    tolerate_disconnects: bool = False
    seed: int = 1
    committed: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _writer(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        long_tx = n < self.long_transactions
        done = 0
        conn: psycopg.Connection[Any] | None = None
        while done < self.transactions:
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn)
                time.sleep(rng.uniform(0, 0.02))
                ids = [f"w{n}-t{done}-r{k}" for k in range(rng.choice([1, 1, 1, 2, 5]))]
                for i in ids:
                    pgfeed.append(conn, self.stream, {"id": i})
                    if long_tx and done == 0:
                        time.sleep(self.long_seconds / len(ids))
                time.sleep(rng.uniform(0, 0.02))
                if rng.random() < self.rollback_rate:
                    conn.rollback()
                else:
                    conn.commit()
                    with self._lock:
                        self.committed.extend(ids)
                done += 1
            except (psycopg.OperationalError, pgfeed.ConnectError):
                if not self.tolerate_disconnects:
                    raise
                # Outcome unknown: the table is the truth for this transaction.
                done += 1
                conn = None
                time.sleep(0.05)
            except BaseException as exc:
                self.errors.append(exc)
                return
        if conn is not None:
            conn.close()

    def run(self) -> None:
        threads = [threading.Thread(target=self._writer, args=(n,)) for n in range(self.writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def append_end_marker(dsn: str, stream: str) -> None:
    """A last row, committed after every other writer finished."""
    for _ in range(50):
        try:
            with psycopg.connect(dsn) as conn:
                pgfeed.append(conn, stream, {"end": True})
            return
        except psycopg.OperationalError:
            time.sleep(0.2)
    raise AssertionError("could not append the end marker")


@dataclass
class ReaderProcess:
    """A reader running in another OS process (feed_reader.py beside this file)."""

    proc: subprocess.Popen[bytes]
    out: Path

    def rows(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"reader process did not finish; it delivered {len(self.rows())} rows") from None
        assert self.proc.returncode == 0, self.proc.stderr.read().decode() if self.proc.stderr else ""
        return self.rows()


def start_reader_process(dsn: str, stream: str, since: str, tmp: Path, name: str) -> ReaderProcess:
    out = tmp / f"{name}.jsonl"
    ready = tmp / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "feed_reader.py"), dsn, stream, since, str(out), str(ready)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"reader process failed to start: {err}")
        time.sleep(0.05)
    return ReaderProcess(proc, out)


def ids_of(rows: list[dict[str, Any]]) -> list[str]:
    return [r["payload"]["id"] for r in rows if "id" in r["payload"]]


def assert_exactly_once(delivered: list[str], committed: list[str]) -> None:
    dupes = {i for i in delivered if delivered.count(i) > 1}
    assert not dupes, f"delivered twice: {sorted(dupes)[:10]}"
    missing = set(committed) - set(delivered)
    assert not missing, f"never delivered: {sorted(missing)[:10]} ({len(missing)} rows)"
    extra = set(delivered) - set(committed)
    assert not extra, f"delivered but not committed: {sorted(extra)[:10]}"


def assert_positions_increase(rows: list[dict[str, Any]]) -> None:
    positions = [pgfeed.Position.parse(r["position"]) for r in rows]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)
