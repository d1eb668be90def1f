"""`pgfeed tail` through the real CLI, as a separate process."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
import pytest
from helpers import one_line_error
from ticking import take_tick

import pgfeed
from pgfeed import admin

PGFEED = [sys.executable, "-m", "pgfeed_cli"]


def tail(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PGFEED, "--dsn", dsn, "tail", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def read_lines(proc: subprocess.Popen[str], n: int, timeout: float = 15) -> list[dict[str, Any]]:
    """Read ``n`` JSON lines, failing (not hanging) if they do not come in time."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            got.append(json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic()))))
        except queue.Empty:
            raise AssertionError(f"only {len(got)} of {n} lines arrived: {got[-3:]}") from None
    return got


def test_no_follow_prints_jsonl_and_exits(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    pgfeed.append(pgfeed_conn, stream, {"id": 1}, key="k1")
    pgfeed.append(pgfeed_conn, stream, [1, 2])
    proc = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", stream, "--no-follow"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["payload"] for r in rows] == [{"id": 1}, [1, 2]]
    assert rows[0]["key"] == "k1"
    assert {"stream", "position", "payload", "created_at"} <= set(rows[0])
    assert all(r["stream"] == stream for r in rows)
    pgfeed.Position.parse(rows[0]["position"])


def test_follow_has_no_seam_between_catch_up_and_live(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    for i in range(50):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
    proc = tail(pgfeed_dsn, stream, "--follow")
    try:
        # Writes race with the catch-up: nothing may be missed or repeated at the switch.
        for i in range(50, 150):
            pgfeed.append(pgfeed_conn, stream, {"id": i})
        rows = read_lines(proc, 150, timeout=30)
        assert [r["payload"]["id"] for r in rows] == list(range(150))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_exit_zero_after_flushing(pgfeed_dsn: str, stream: str, sig: signal.Signals) -> None:
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        start = str(take_tick(conn))
    proc = tail(pgfeed_dsn, stream, "--from", start)
    try:
        # Appended after the start token: delivered whenever tail has subscribed.
        with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
            pgfeed.append(conn, stream, {"id": "x"})
        assert [r["payload"] for r in read_lines(proc, 1)] == [{"id": "x"}]
        proc.send_signal(sig)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_from_token_and_limit(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    for i in range(5):
        pgfeed.append(pgfeed_conn, stream, {"id": i})
    first = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", stream, "--limit", "2"], capture_output=True, text=True, timeout=30
    )
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [r["payload"]["id"] for r in rows] == [0, 1]
    rest = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", stream, "--from", rows[-1]["position"], "--no-follow"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert [json.loads(line)["payload"]["id"] for line in rest.stdout.splitlines()] == [2, 3, 4]


def test_from_a_token_of_another_stream_is_refused_in_one_line(
    pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    admin.create_stream(pgfeed_conn, "other")
    pgfeed.append(pgfeed_conn, "other", {"id": 0})
    pgfeed.append(pgfeed_conn, stream, {"id": 0})
    other = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", "other", "--no-follow"], capture_output=True, text=True, timeout=30
    )
    token = json.loads(other.stdout.splitlines()[-1])["position"]
    assert "~" in token
    out = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", stream, "--from", token, "--no-follow"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "does not belong to stream 'orders'" in one_line_error(out, code=2)


def test_pretty_format(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    pgfeed.append(pgfeed_conn, stream, {"id": 1}, key="k")
    out = subprocess.run(
        [*PGFEED, "--dsn", pgfeed_dsn, "tail", stream, "--no-follow", "--format", "pretty"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert f" {stream}@" in out.stdout
    assert '[k]  {"id": 1}' in out.stdout


def test_piped_into_head_exits_quietly(pgfeed_dsn: str, stream: str, pgfeed_conn: psycopg.Connection[Any]) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": i} for i in range(20000)])
    cmd = f"{sys.executable} -m pgfeed_cli --dsn '{pgfeed_dsn}' tail {stream} | head -n 3"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert out.stdout.count("\n") == 3
    assert out.stderr == ""
    assert out.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch", "--no-follow"], "unknown stream 'nosuch'"),
        (["orders", "--from", "banana"], "malformed position token 'banana'"),
        (["orders", "--from", "99999999"], "beyond anything this database has issued"),
        (["Bad-Name"], "invalid stream name 'Bad-Name'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(pgfeed_dsn: str, stream: str, args: list[str], message: str) -> None:
    out = subprocess.run([*PGFEED, "--dsn", pgfeed_dsn, "tail", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pgfeed: error: ")
    assert message in lines[0]
