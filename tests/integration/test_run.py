"""`pgfeed run MODULE:FUNCTION` through the real command: SIGTERM finishes the
batch in hand and loses nothing, SIGKILL loses nothing and repeats exactly
what was handled after the last save, a failing handler stops the run before
its batch, bad input is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import PGFEED, one_line_error, run_cli
from ticking import daemon

import pgfeed
from pgfeed import admin, status
from pgfeed.core.positions import Position
from pgfeed.errors import HandlerNotFound
from pgfeed.run import load_handler

Conn = psycopg.Connection[Any]

#: The handlers under test: each records the rows it handled in table "handled"
#: (one transaction per batch), optionally stopping at a gate row until released.
HANDLERS = """
import asyncio
import os
import time
from pathlib import Path

import psycopg

conn = psycopg.connect(os.environ["HANDLER_DSN"], autocommit=True)
gate_at = int(os.environ.get("GATE_AT", "-1"))
gates = Path(os.environ.get("GATE_DIR", "."))
attempts = {}


def record(batch, run):
    with conn.transaction():
        for row in batch:
            conn.execute(
                "INSERT INTO handled (n, token, batch, run) VALUES (%s, %s, %s, %s)",
                (row.payload["n"], row.token, str(batch.position), run),
            )


def wait_at_gate(batch):
    if any(row.payload["n"] == gate_at for row in batch) and not (gates / "released").exists():
        (gates / "in-hand.tmp").write_text(str(batch.position))
        (gates / "in-hand.tmp").rename(gates / "in-hand")  # whole, or not there
        deadline = time.monotonic() + 60
        while not (gates / "released").exists():
            if time.monotonic() > deadline:
                raise SystemExit("the test never released the gate")
            time.sleep(0.01)


def handle(batch):
    record(batch, os.environ["RUN"])
    wait_at_gate(batch)


def handle_then_gate(batch):
    wait_at_gate(batch)
    record(batch, os.environ["RUN"])


async def handle_async(batch):
    await asyncio.sleep(0)
    key = str(batch.position)
    attempts[key] = attempts.get(key, 0) + 1
    conn.execute("INSERT INTO attempts (token, n) VALUES (%s, %s)", (key, attempts[key]))
    if any(row.payload["n"] == gate_at for row in batch) and attempts[key] <= 2:
        raise RuntimeError(f"flaky, attempt {attempts[key]}")
    record(batch, os.environ["RUN"])


def boom(batch):
    conn.execute("INSERT INTO attempts (token, n) VALUES (%s, %s)", (str(batch.position), 1))
    if any(row.payload["n"] == gate_at for row in batch):
        raise ValueError("poison row")
    record(batch, os.environ["RUN"])


not_callable = 42
"""


@pytest.fixture
def handlers(tmp_path: Path, pgfeed_conn: Conn) -> str:
    """A module of handlers in ``tmp_path`` (the commands' working directory); its name."""
    name = f"handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(HANDLERS))
    pgfeed_conn.execute(
        "CREATE TABLE handled (n int, token text, batch text, run text, at timestamptz DEFAULT clock_timestamp())"
    )
    pgfeed_conn.execute("CREATE TABLE attempts (token text, n int)")
    admin.create_stream(pgfeed_conn, "orders")
    return name


@pytest.fixture
def ticking(pgfeed_dsn: str) -> Iterator[None]:
    with daemon(pgfeed_dsn):
        yield


class Run:
    """`pgfeed -v run` in a process of its own, in the handlers' directory; its
    stderr (JSON log lines, then any error line) read on a thread."""

    def __init__(self, dsn: str, cwd: Path, handler: str, *args: str, run: str = "1", **env: str) -> None:
        self.proc = subprocess.Popen(
            [PGFEED, "--dsn", dsn, "-v", "run", handler, "--stream", "orders", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HANDLER_DSN": dsn, "GATE_DIR": str(cwd), "RUN": run, **env},
        )
        self.lines: list[str] = []
        stderr = self.proc.stderr
        assert stderr is not None
        self._pump = threading.Thread(target=lambda: self.lines.extend(stderr), daemon=True)
        self._pump.start()

    def logged(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait(self, timeout: float = 60) -> tuple[int, list[str]]:
        """Exit code, and the stderr lines that are not log events (errors)."""
        code = self.proc.wait(timeout)
        self._pump.join(timeout)
        return code, [line.rstrip("\n") for line in self.lines if not line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, list[str]]:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(condition: Callable[[], bool], what: str, proc: Run | None = None, timeout: float = 60) -> None:
    """Poll ``condition`` (the state under test), bounded; fail early if the run died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"pgfeed run exited {proc.proc.returncode} before {what}: {proc.lines[-5:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def handled(conn: Conn, run: str | None = None) -> list[tuple[int, str]]:
    """(n, the batch's position) of every row handled, in the order handled."""
    rows = conn.execute(
        "SELECT n, batch FROM handled WHERE %(run)s::text IS NULL OR run = %(run)s ORDER BY at, n", {"run": run}
    ).fetchall()
    return [(int(n), str(t)) for n, t in rows]


def saved(conn: Conn, consumer: str) -> tuple[str, Any] | None:
    row = conn.execute("SELECT token, updated_at FROM pgfeed.positions WHERE consumer = %s", (consumer,)).fetchone()
    return None if row is None else (str(row[0]), row[1])


def append(conn: Conn, ns: range) -> None:
    for start in range(ns.start, ns.stop, 5):
        with conn.transaction():
            pgfeed.append_many(conn, "orders", [{"n": n} for n in range(start, min(start + 5, ns.stop))])


# -- SIGTERM -------------------------------------------------------------------------
def test_sigterm_finishes_the_batch_in_hand_saves_and_exits_0(
    pgfeed_dsn: str, pgfeed_conn: Conn, handlers: str, tmp_path: Path, ticking: None
) -> None:
    append(pgfeed_conn, range(200))
    first = Run(
        pgfeed_dsn, tmp_path, f"{handlers}:handle_then_gate", "--consumer", "c", "--batch-size", "10", GATE_AT="95"
    )
    try:
        wait_until(lambda: (tmp_path / "in-hand").exists(), "the handler holding the batch of row 95", first)
        in_hand = Position.parse((tmp_path / "in-hand").read_text())
        first.proc.send_signal(signal.SIGTERM)  # while the handler holds its batch
        wait_until(lambda: first.logged("stop requested; finishing the batch in hand"), "the stop request", first)
        assert first.proc.poll() is None  # it waits for the handler
        (tmp_path / "released").write_text("")
        code, errors = first.wait()
    finally:
        (tmp_path / "released").write_text("")
        first.kill()
    assert (code, errors) == (0, [])
    rows = handled(pgfeed_conn, "1")
    assert [n for n, _ in rows] == list(range(len(rows)))  # in order, none twice
    assert 95 in [n for n, _ in rows]  # the batch in hand was finished
    assert rows[-1][1] == str(in_hand)  # ... and it was the last one
    position = saved(pgfeed_conn, "c")
    assert position is not None
    assert position[0] == str(in_hand)  # saved up to exactly what was handled
    # ... with the fingerprint of its tick, as the consumer saw it (checked when it resumes).
    fps = pgfeed_conn.execute(
        "SELECT p.tick_fp, t.fp FROM pgfeed.positions p, pgfeed.ticks t WHERE p.consumer = 'c' AND t.id = %s",
        (in_hand.tick,),
    ).fetchone()
    assert fps is not None
    assert fps[0] is not None
    assert fps[0] == fps[1]

    # Rows written while it was stopped are not lost; nothing comes twice.
    append(pgfeed_conn, range(200, 260))
    second = Run(pgfeed_dsn, tmp_path, f"{handlers}:handle", "--consumer", "c", "--batch-size", "10", run="2")
    try:
        wait_until(lambda: len(handled(pgfeed_conn)) >= 260, "every row handled", second)
        code, errors = second.stop(signal.SIGINT)
    finally:
        second.kill()
    assert (code, errors) == (0, [])
    ns = sorted(n for n, _ in handled(pgfeed_conn))
    assert ns == list(range(260))  # exactly once across a clean stop


# -- SIGKILL -------------------------------------------------------------------------
def test_sigkill_loses_nothing_and_repeats_what_was_handled_after_the_last_save(
    pgfeed_dsn: str, pgfeed_conn: Conn, handlers: str, tmp_path: Path, ticking: None
) -> None:
    append(pgfeed_conn, range(300))
    save_interval = 0.2
    first = Run(
        pgfeed_dsn,
        tmp_path,
        f"{handlers}:handle",
        "--consumer",
        "k",
        "--batch-size",
        "10",
        "--save-interval",
        f"{save_interval}s",
        GATE_AT="150",
    )
    try:
        wait_until(lambda: (tmp_path / "in-hand").exists(), "the handler holding the batch of row 150", first)
        in_hand = Position.parse((tmp_path / "in-hand").read_text())
        before = [(n, t) for n, t in handled(pgfeed_conn, "1") if Position.parse(t) < in_hand]
        acknowledged = before[-1][1]  # the batch before the one in hand: taking the next acknowledged it
        # The reader saves within its save interval: wait for the save of everything acknowledged.
        wait_until(lambda: (saved(pgfeed_conn, "k") or ("0", None))[0] == acknowledged, "the save", first)
        last_save = saved(pgfeed_conn, "k")
        first.proc.kill()  # SIGKILL: no goodbye, no save
        first.proc.wait(30)
        killed_at = pgfeed_conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    finally:
        (tmp_path / "released").write_text("")
        first.kill()
    assert last_save is not None
    assert (
        killed_at - last_save[1]
    ).total_seconds() < save_interval + 5  # saved no longer ago than the interval (+ slack)
    first_run = handled(pgfeed_conn, "1")
    after_save = {n for n, t in first_run if Position.parse(t) > Position.parse(last_save[0])}
    assert after_save == {n for n, t in first_run if Position.parse(t) <= in_hand} - {n for n, _ in before}
    assert 150 in after_save
    assert len(after_save) <= 10  # one batch: what was handled since the last save

    second = Run(pgfeed_dsn, tmp_path, f"{handlers}:handle", "--consumer", "k", "--batch-size", "10", run="2")
    try:
        wait_until(lambda: {n for n, _ in handled(pgfeed_conn, "2")} >= set(range(150, 300)), "the rest", second)
        code, errors = second.stop()
    finally:
        second.kill()
    assert (code, errors) == (0, [])
    counts: dict[int, int] = {}
    for n, _ in handled(pgfeed_conn):
        counts[n] = counts.get(n, 0) + 1
    assert sorted(counts) == list(range(300))  # no row lost
    duplicates = {n for n, c in counts.items() if c > 1}
    assert duplicates == after_save  # exactly the rows handled after the last save came again
    assert all(c <= 2 for c in counts.values())


# -- failing handlers -------------------------------------------------------------------
def test_a_handler_that_keeps_raising_stops_the_run_before_its_batch(
    pgfeed_dsn: str, pgfeed_conn: Conn, handlers: str, tmp_path: Path, ticking: None
) -> None:
    append(pgfeed_conn, range(50))
    run = Run(
        pgfeed_dsn,
        tmp_path,
        f"{handlers}:boom",
        "--consumer",
        "b",
        "--batch-size",
        "10",
        "--retries",
        "2",
        GATE_AT="23",
    )
    try:
        code, lines = run.wait()
    finally:
        run.kill()
    assert code == 1
    assert len(lines) == 1, run.lines
    assert lines[0].startswith(f"pgfeed: error: handler {handlers}:boom failed 3 times on the batch after position "), (
        lines[0]
    )
    assert "ValueError: poison row" in lines[0]
    ns = [n for n, _ in handled(pgfeed_conn)]
    # The batches before the poison one, once each; nothing of it or after it.
    assert ns == list(range(len(ns)))
    assert 13 <= len(ns) <= 23  # batches hold at most 10 rows
    position = saved(pgfeed_conn, "b")
    assert position is not None
    assert position[0] == handled(pgfeed_conn)[-1][1]  # saved just before the poison batch
    assert f"consumer 'b' stays at {position[0]}" in lines[0]
    poison = pgfeed_conn.execute("SELECT token, count(*) FROM attempts GROUP BY token HAVING count(*) > 1").fetchall()
    assert [c for _, c in poison] == [3]  # 1 call + 2 retries, on the same batch


def test_an_async_handler_that_fails_twice_then_succeeds_moves_on(
    pgfeed_dsn: str, pgfeed_conn: Conn, handlers: str, tmp_path: Path, ticking: None
) -> None:
    append(pgfeed_conn, range(30))
    run = Run(
        pgfeed_dsn,
        tmp_path,
        f"{handlers}:handle_async",
        "--consumer",
        "a",
        "--batch-size",
        "10",
        "--retries",
        "2",
        GATE_AT="12",
    )
    try:
        wait_until(lambda: len(handled(pgfeed_conn)) >= 30, "every row handled", run)
        code, errors = run.stop()
    finally:
        run.kill()
    assert (code, errors) == (0, [])
    assert sorted(n for n, _ in handled(pgfeed_conn)) == list(range(30))
    retried = pgfeed_conn.execute("SELECT max(n) FROM attempts").fetchone()[0]  # type: ignore[index]
    assert retried == 3
    assert sum("handler failed; retrying the same batch" in line for line in run.lines) == 2


# -- the consumer shows in pgfeed status -----------------------------------------------------
def test_a_running_consumer_is_live_with_a_heartbeat_in_status(
    pgfeed_dsn: str, pgfeed_conn: Conn, handlers: str, tmp_path: Path, ticking: None
) -> None:
    append(pgfeed_conn, range(10))
    run = Run(
        pgfeed_dsn, tmp_path, f"{handlers}:handle", "--consumer", "hb", "--heartbeat", "50ms", "--save-interval", "50ms"
    )
    try:
        wait_until(lambda: len(handled(pgfeed_conn)) >= 10, "every row handled", run)
        wait_until(
            lambda: (
                pgfeed_conn.execute("SELECT seen_at IS NOT NULL FROM pgfeed.positions WHERE consumer = 'hb'").fetchone()
                == (True,)
            ),
            "a heartbeat",
            run,
        )
        (c,) = status.gather(pgfeed_conn).consumers
        assert (c.consumer, c.lag_rows, c.state) == ("hb", 0, "live")
        assert c.seen_by is not None
        name = f"pgfeed reader pid={run.proc.pid} orders consumer=hb"
        assert c.seen_by.startswith(f"{name} @")
        assert c.held_by  # its sessions carry the consumer's name
        assert all(s.application_name == name for s in c.held_by)
        code, _ = run.stop()
    finally:
        run.kill()
    assert code == 0


# -- bad input ----------------------------------------------------------------------------
def test_bad_input_is_one_line(
    pgfeed_dsn: str, pgfeed_conn: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.create_stream(pgfeed_conn, "orders")
    monkeypatch.chdir(tmp_path)
    handlers = f"simple_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{handlers}.py").write_text("def handle(batch):\n    pass\n\n\nnot_callable = 42\n")

    def run(*args: str, code: int) -> str:
        return one_line_error(run_cli(pgfeed_dsn, "run", *args), code)

    assert "unknown stream 'nope'" in run(f"{handlers}:handle", "--stream", "nope", "--consumer", "x", code=1)
    line = run("no_such_module_xyz:handle", "--stream", "orders", "--consumer", "x", code=2)
    assert "cannot import module 'no_such_module_xyz'" in line
    assert "ModuleNotFoundError" in line
    assert "has no attribute 'nothing'" in run(f"{handlers}:nothing", "--stream", "orders", "--consumer", "x", code=2)
    assert "is not callable" in run(f"{handlers}:not_callable", "--stream", "orders", "--consumer", "x", code=2)
    assert "expected MODULE:FUNCTION" in run("justamodule", "--stream", "orders", "--consumer", "x", code=2)
    assert "invalid value for '--since'" in run(
        f"{handlers}:handle", "--stream", "orders", "--consumer", "x", "--since", "yesterday", code=2
    )
    assert "'--consumer'" in run(f"{handlers}:handle", "--stream", "orders", code=2)
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('no config')\n")
    line = run("broken_mod:handle", "--stream", "orders", "--consumer", "x", code=2)
    assert "cannot import module 'broken_mod' of handler 'broken_mod:handle': RuntimeError: no config" in line


def test_load_handler_resolves_dotted_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mod_dotted.py").write_text(
        "class C:\n    @staticmethod\n    def handle(batch):\n        return batch\n"
    )
    assert load_handler("mod_dotted:C.handle")(7) == 7
    with pytest.raises(HandlerNotFound, match="expected MODULE:FUNCTION"):
        load_handler(":x")
