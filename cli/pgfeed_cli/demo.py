"""``pgfeed demo``: one writer and two reader processes on one stream, live.

The parent (:func:`run_demo`) migrates, creates the ``demo`` stream and starts
three real OS processes with ``python -m pgfeed_cli.demo writer|reader``:

* the writer appends one row per transaction at ``--rate`` rows/s with
  :func:`pgfeed.append` and takes :func:`pgfeed.commit_token` after each commit;
* reader ``a`` follows the stream with :class:`pgfeed.AsyncReader`, reader
  ``b`` with the sync :class:`pgfeed.Reader` (callback form), both from "now".

Children talk to the parent in JSON lines on their stdout. The parent talks
to them on their stdin; closing a child's stdin tells it to stop, so children
also stop on their own if the parent dies. Children run in their own session:
Ctrl-C reaches only the parent, which then stops them in order (writer first,
then each reader waits for the writer's last token with ``wait_for``), checks
that both readers delivered the same rows in the same order, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

#: The stream the demo writes to and reads from.
STREAM = "demo"

#: Environment variable carrying the connection string to the children
#: (not argv, which any local user can read with ``ps``).
CONNINFO_ENV = "PGFEED_DEMO_CONNINFO"

READY_TIMEOUT = 60.0  # seconds for the children to connect and subscribe
WRITER_STOP_TIMEOUT = 10.0  # seconds for the writer to finish its transaction
CATCH_UP_TIMEOUT = 10.0  # seconds for each reader to reach the writer's last token
EXIT_TIMEOUT = 5.0  # seconds for a child to exit once told to, before SIGTERM/SIGKILL
SAMPLE_EVERY = 5.0  # seconds between sample rows, after the first few

Message = dict[str, Any]


# == parent ==================================================================


def run_demo(conninfo: str, *, duration: float | None, rate: float, log_path: Path | None = None) -> None:
    """Run the demo until Ctrl-C/SIGTERM or ``duration`` seconds of writing.

    Raises :class:`~pgfeed.errors.PgfeedError` if a child fails or the readers
    disagree; children are never left behind.
    """
    with _StopSignals() as stop, _open_log(log_path) as log:
        _prepare(conninfo)
        demo = _Demo(conninfo, rate, stop, log)
        try:
            if not stop.requested.is_set():
                demo.run(duration)
        finally:
            demo.kill_all()
    demo.print_summary()
    if demo.failure is not None:
        from pgfeed.errors import PgfeedError

        raise PgfeedError(demo.failure)


def _prepare(conninfo: str) -> None:
    from pgfeed import admin, connect, migrator
    from pgfeed.errors import StreamExists

    with connect.connect(conninfo, doing="preparing the demo") as conn:
        migrator.migrate(conn)
        with contextlib.suppress(StreamExists):
            admin.create_stream(conn, STREAM)


@contextlib.contextmanager
def _open_log(path: Path | None) -> Iterator[TextIO | None]:
    if path is None:
        yield None
        return
    with open(path, "w", encoding="utf-8") as f:
        yield f


class _StopSignals:
    """SIGINT/SIGTERM ask the demo to stop; a second one asks it to hurry."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Child:
    """One child process and what it reported."""

    name: str
    proc: subprocess.Popen[str]
    ready: Message | None = None
    exited: bool = False

    def send(self, message: Message | str) -> None:
        """Write one command line to the child's stdin (ignored if it is gone)."""
        assert self.proc.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        with contextlib.suppress(OSError):
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()

    def close_stdin(self) -> None:
        """Tell the child to stop."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()


@dataclass
class _ReaderStats:
    name: str
    api: str
    delivered: int = 0
    last_position: str = "-"
    second_lags: list[float] = field(default_factory=list)
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    caught_up: str | None = None


class _OrderCheck:
    """Compares, row by row, what the two readers delivered.

    Memory is bounded by how far one reader runs ahead of the other. Rows at
    or before the later reader's starting position are not compared (the
    earlier reader may legitimately have seen them).
    """

    def __init__(self, names: list[str]) -> None:
        self.pending: dict[str, deque[tuple[int, str]]] = {n: deque() for n in names}
        self.floor: Any = None  # a pgfeed Position, set once every reader is ready
        self.compared = 0
        self.mismatch: str | None = None

    def add(self, name: str, seq: int, position: str) -> None:
        from pgfeed.core.positions import Position

        if self.mismatch is not None or (self.floor is not None and Position.parse(position) <= self.floor):
            return
        self.pending[name].append((seq, position))
        a, b = self.pending.values()
        while a and b:
            left, right = a.popleft(), b.popleft()
            if left != right:
                x, y = self.pending
                self.mismatch = (
                    f"readers disagree after {self.compared} rows: reader {x} delivered seq {left[0]} at "
                    f"{left[1]}, reader {y} delivered seq {right[0]} at {right[1]}"
                )
                return
            self.compared += 1


class _Demo:
    def __init__(self, conninfo: str, rate: float, stop: _StopSignals, log: TextIO | None) -> None:
        self.conninfo = conninfo
        self.rate = rate
        self.stop = stop
        self.log = log
        self.events: queue.Queue[tuple[str, Message | None]] = queue.Queue()
        self.children: dict[str, _Child] = {}
        self.readers = {"a": _ReaderStats("a", "AsyncReader"), "b": _ReaderStats("b", "Reader")}
        self.order = _OrderCheck(list(self.readers))
        self.written = 0
        self.last_token: str | None = None
        self.final_token: str | None = None
        self.failure: str | None = None
        self.started = 0.0
        self.stopped = 0.0
        self.samples_shown = 0
        self.next_sample = 0.0
        self.out_broken = False

    # -- output -------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.out_broken:
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # `pgfeed demo | head`: stop quietly.
            self.out_broken = True
            self.stop.requested.set()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())

    # -- children -----------------------------------------------------------
    def spawn(self, name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env[CONNINFO_ENV] = self.conninfo
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgfeed_cli.demo", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C reaches only the parent, which stops the children in order
        )
        child = _Child(name, proc)
        self.children[name] = child
        threading.Thread(target=self._pump, args=(child,), name=f"demo-{name}", daemon=True).start()

    def _pump(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        for line in child.proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                print(f"pgfeed demo: {child.name}: {line.rstrip()}", file=sys.stderr)
                continue
            if isinstance(message, dict):
                self.events.put((child.name, message))
        self.events.put((child.name, None))

    def kill_all(self) -> None:
        """Make sure no child outlives the demo: close stdin, then SIGTERM, then SIGKILL."""
        for child in self.children.values():
            child.close_stdin()
        deadline = time.monotonic() + (0.5 if self.stop.hurry.is_set() else EXIT_TIMEOUT)
        for child in self.children.values():
            _wait(child.proc, deadline)
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 2.0
        for child in self.children.values():
            _wait(child.proc, deadline)
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
            if child.proc.stdout is not None:
                child.proc.stdout.close()

    # -- events -------------------------------------------------------------
    def next_event(self, timeout: float) -> tuple[str, Message | None] | None:
        try:
            return self.events.get(timeout=max(0.0, min(timeout, 0.1)))
        except queue.Empty:
            return None

    def handle(self, name: str, message: Message | None, *, stopping: bool = False) -> None:
        child = self.children[name]
        if message is None:
            child.exited = True
            if not stopping and self.failure is None:
                code = child.proc.wait()
                self.failure = f"the demo {_role(name)} exited unexpectedly (exit code {code})"
            return
        if self.log is not None:
            self.log.write(json.dumps({"from": name, **message}) + "\n")
        kind = message.get("type")
        if kind == "ready":
            child.ready = message
        elif kind == "wrote":
            self.written += 1
            self.last_token = str(message.get("token"))
        elif kind == "done":
            self.final_token = message.get("token")
        elif kind == "row":
            self._row(self.readers[name], message)
        elif kind == "caught_up":
            self.readers[name].caught_up = str(message.get("position"))
        elif kind == "notice":
            self.say(f"  note: {message.get('message')}")
        elif kind == "error" and self.failure is None:
            self.failure = f"the demo {_role(name)} failed: {message.get('message')}"

    def _row(self, stats: _ReaderStats, message: Message) -> None:
        stats.delivered += 1
        stats.last_position = str(message.get("position"))
        lag = message.get("lag_ms")
        if isinstance(lag, int | float):
            stats.second_lags.append(float(lag))
            stats.lags.append(float(lag))
        self.order.add(stats.name, int(message.get("seq", -1)), stats.last_position)
        now = time.monotonic()
        if stats.name == "a" and (self.samples_shown < 3 or now >= self.next_sample):
            self.samples_shown += 1
            self.next_sample = now + SAMPLE_EVERY
            self.say(
                f"  sample: reader a got {STREAM}@{stats.last_position} "
                f"{json.dumps(message.get('payload'), separators=(', ', ': '))}"
            )

    def pump_until(self, done: Callable[[], bool], timeout: float, *, stopping: bool = False) -> bool:
        """Handle events until ``done()`` or ``timeout``; False on timeout or failure."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.failure is not None or (self.stop.hurry.is_set() and stopping):
                return False
            if not stopping and self.stop.requested.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            event = self.next_event(remaining)
            if event is not None:
                self.handle(*event, stopping=stopping)
        return True

    # -- the show -----------------------------------------------------------
    @property
    def wrote_any(self) -> bool:
        return (self.final_token or self.last_token) is not None

    def run(self, duration: float | None) -> None:
        self.say(f'pgfeed demo: stream "{STREAM}" is ready; starting a writer and two reader processes...')
        self.spawn("writer", "writer", "--rate", repr(self.rate))
        self.spawn("a", "reader", "--name", "a", "--api", "async")
        self.spawn("b", "reader", "--name", "b", "--api", "sync")
        if not self.pump_until(lambda: all(c.ready for c in self.children.values()), READY_TIMEOUT):
            if self.failure is None and not self.stop.requested.is_set():
                self.failure = f"the demo processes did not start within {READY_TIMEOUT:g}s"
            elif self.failure is None:
                self.say("stopped before the demo processes were ready; nothing was written")
            return
        from pgfeed.core.positions import Position

        starts = [Position.parse(str(self.children[n].ready["position"])) for n in self.readers]  # type: ignore[index]
        self.order.floor = max(starts)
        self._print_header()
        self.children["writer"].send("go")
        self.started = time.monotonic()
        self._live(duration)
        self._shutdown()

    def _print_header(self) -> None:
        pids = {n: c.proc.pid for n, c in self.children.items()}
        self.say(f"a writer (pid {pids['writer']}) appends {self.rate:g} rows/s, one transaction each;")
        self.say(
            f"reader a (pid {pids['a']}, AsyncReader) and reader b (pid {pids['b']}, Reader) follow it "
            f"from position {self.order.floor}. Ctrl-C to stop."
        )
        self.say(self._ticker_line(pids))
        self.say(_status_header())

    def _ticker_line(self, pids: dict[str, int]) -> str:
        """Who ticks: a daemon if one runs, else one reader's embedded ticker."""
        from pgfeed import connect

        try:
            with connect.connect(self.conninfo, doing="reading the ticker lease") as conn:
                row = conn.execute(
                    "SELECT holder, kind, term FROM pgfeed.ticker WHERE expires_at > clock_timestamp()"
                ).fetchone()
        except Exception as exc:  # the demo goes on without this line
            return f"ticker: unknown ({_one_line(exc)})"
        if row is None:
            return "ticker: none leads yet (readers poll until one does)"
        holder, kind, term = row
        if kind == "daemon":
            return f"ticker: {holder} (term {term}); readers and writer never tick"
        owner = next((n for n, pid in pids.items() if str(holder).endswith(f"pid {pid}")), None)
        who = f"reader {owner}'s embedded ticker" if owner else str(holder)
        return f"ticker: {who} (term {term}) ticks for everyone; a `pgfeed daemon` would take over"

    def _live(self, duration: float | None) -> None:
        next_status = self.started + 1.0
        end = self.started + duration if duration is not None else None
        while not self.stop.requested.is_set() and self.failure is None:
            now = time.monotonic()
            if end is not None and now >= end:
                break
            if now >= next_status:
                self._print_status(now - self.started)
                next_status += 1.0
                continue
            until = min(next_status, end) if end is not None else next_status
            event = self.next_event(until - now)
            if event is not None:
                self.handle(*event)

    def _print_status(self, elapsed: float) -> None:
        cells = [f"{elapsed:5.0f}s", f"{self.written:8d}"]
        for stats in self.readers.values():
            lags = stats.second_lags
            lag = f"{statistics.median(lags):.1f}/{max(lags):.1f}" if lags else "-"
            cells.append(f"| {stats.delivered:7d} {lag:>14} {stats.last_position:<16}")
            stats.second_lags = []
        self.say(" ".join(cells).rstrip())

    def _shutdown(self) -> None:
        self.stopped = time.monotonic()
        if self.failure is None:
            self.say("stopping: the writer finishes its transaction, then each reader waits for its last token")
        writer = self.children["writer"]
        writer.close_stdin()
        self.pump_until(lambda: writer.exited, WRITER_STOP_TIMEOUT, stopping=True)
        token = self.final_token or self.last_token
        if token is None or self.failure is not None:
            return
        for name in self.readers:
            self.children[name].send({"wait_for": token})
        self.pump_until(lambda: all(s.caught_up for s in self.readers.values()), CATCH_UP_TIMEOUT + 2.0, stopping=True)

    def print_summary(self) -> None:
        if not self.started:
            return
        elapsed = (self.stopped or time.monotonic()) - self.started
        self.say("")
        self.say(
            f"summary: the writer committed {self.written} rows in {elapsed:.1f}s "
            f"(last commit token {self.final_token or self.last_token or '-'})"
        )
        for stats in self.readers.values():
            lags = sorted(stats.lags)
            lag = (
                f"lag p50 {_percentile(lags, 0.5):.1f} ms, p99 {_percentile(lags, 0.99):.1f} ms, max {lags[-1]:.1f} ms"
                if lags
                else "no lag measured"
            )
            reached = f"reached {stats.caught_up} (wait_for)" if stats.caught_up else "did not confirm the last token"
            self.say(f"  reader {stats.name} ({stats.api}): delivered {stats.delivered} rows, {lag}; {reached}")
        if self.order.mismatch is not None:
            self.failure = self.failure or self.order.mismatch
            self.say(f"  order: {self.order.mismatch}")
        else:
            self.say(f"  order: identical in both readers ({self.order.compared} rows compared, same positions)")
        caught_up = all(s.caught_up for s in self.readers.values())
        if self.failure is None and self.wrote_any and not self.stop.hurry.is_set() and not caught_up:
            self.failure = "a reader did not reach the writer's last token"


def _status_header() -> str:
    reader = "| {:>7} {:>14} {:<16}"
    cells = ["{:>6}".format("time"), "{:>8}".format("written")]
    cells += [reader.format(f"{n}: rows", "lag p50/max ms", "position") for n in ("a", "b")]
    return " ".join(cells).rstrip()


def _role(name: str) -> str:
    return "writer" if name == "writer" else f"reader {name}"


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _wait(proc: subprocess.Popen[str], deadline: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))


# == children ================================================================


class _Emitter:
    """JSON lines to the parent; thread-safe. If the parent is gone, exit."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, ValueError):
                os._exit(0)  # the parent is gone: nobody is left to report to


def _configure_child_logging(name: str) -> None:
    """pgfeed's warnings go to stderr (stdout carries the protocol)."""
    import logging

    from pgfeed_cli import logs

    def render(_: Any, level: str, event: Any) -> str:
        text = event.pop("event", "")
        extra = " ".join(f"{k}={v}" for k, v in event.items())
        return f"pgfeed demo {name}: {level}: {text} {extra}".rstrip()

    logs.install(logging.WARNING, [render])


def _writer(conninfo: str, rate: float, emit: _Emitter) -> int:
    import psycopg

    import pgfeed
    from pgfeed import connect
    from pgfeed.core.backoff import Backoff

    conn = connect.connect(conninfo, doing="starting the demo writer")
    emit({"type": "ready", "pid": os.getpid()})
    if sys.stdin.readline().strip() != "go":
        return 0
    stop = threading.Event()

    def watch_stdin() -> None:
        for _ in sys.stdin:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    start = time.monotonic()
    n = 0
    token = None
    backoff = Backoff()
    try:
        while not stop.wait(max(0.0, start + n / rate - time.monotonic())):
            n += 1
            try:
                with conn.transaction():
                    payload = {"n": n, "text": f"hello #{n}", "t": round(time.time(), 6)}
                    seq = pgfeed.append(conn, STREAM, payload)
                token = pgfeed.commit_token(conn)
            except (pgfeed.ConnectError, pgfeed.CommitTokenUnavailable, psycopg.OperationalError) as exc:
                # The server restarted or the connection dropped: whether row n
                # committed is unknown, or known but without a token (the
                # readers will tell; the next token covers it). Reconnect, go on.
                emit({"type": "notice", "message": f"writer: {_one_line(exc)}; reconnecting"})
                conn.close()
                while not stop.wait(backoff.next_delay()):
                    try:
                        conn = connect.connect(conninfo, doing="reconnecting the demo writer")
                    except pgfeed.ConnectError:
                        continue
                    emit({"type": "notice", "message": "writer: reconnected"})
                    backoff.reset()
                    break
                start = time.monotonic() - n / rate  # resume the pace, no burst
                continue
            except (pgfeed.PgfeedError, psycopg.Error) as exc:
                emit({"type": "error", "message": _one_line(exc)})
                return 1
            emit({"type": "wrote", "n": n, "seq": seq, "token": str(token)})
    finally:
        conn.close()
    emit({"type": "done", "rows": n, "token": str(token) if token is not None else None})
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _row_message(row: Any) -> Message:
    from pgfeed import rows

    message = rows.to_json(row)
    payload = message["payload"]
    sent = payload.get("t") if isinstance(payload, dict) else None
    lag = round((time.time() - sent) * 1000, 3) if isinstance(sent, int | float) else None
    return {"type": "row", **message, "seq": row.seq, "lag_ms": lag}


async def _async_reader(conninfo: str, emit: _Emitter) -> int:
    import pgfeed

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async with pgfeed.AsyncReader(conninfo) as reader:
        sub = await reader.subscribe(STREAM, "now")
        emit({"type": "ready", "pid": os.getpid(), "position": str(sub.position)})

        async def consume() -> None:
            async for batch in sub:
                for row in batch.rows:
                    emit(_row_message(row))

        async def commands() -> None:
            while line := await stdin.readline():
                started = time.monotonic()
                try:
                    position = await reader.wait_for(STREAM, _wait_for_token(line), CATCH_UP_TIMEOUT)
                except pgfeed.PgfeedError as exc:
                    emit({"type": "error", "message": str(exc)})
                    continue
                emit(_caught_up(position, started))

        consumer = asyncio.create_task(consume())
        commander = asyncio.create_task(commands())
        done, _ = await asyncio.wait({consumer, commander}, return_when=asyncio.FIRST_COMPLETED)
        consumer.cancel()
        commander.cancel()
        await asyncio.gather(consumer, commander, return_exceptions=True)
        if consumer in done:
            exc = consumer.exception()
            emit({"type": "error", "message": str(exc) if exc else "the subscription ended"})
            return 1
    return 0


def _wait_for_token(line: bytes | str) -> str:
    """The token of a ``{"wait_for": TOKEN}`` command from the parent."""
    return str(json.loads(line)["wait_for"])


def _caught_up(position: object, started: float) -> Message:
    return {"type": "caught_up", "position": str(position), "waited_ms": round((time.monotonic() - started) * 1000, 1)}


def _sync_reader(conninfo: str, emit: _Emitter) -> int:
    import pgfeed

    def on_batch(batch: pgfeed.Batch) -> None:
        for row in batch.rows:
            emit(_row_message(row))

    with pgfeed.Reader(conninfo) as reader:
        sub = reader.on(STREAM, on_batch, since="now")
        emit({"type": "ready", "pid": os.getpid(), "position": str(sub.position)})

        for line in sys.stdin:
            started = time.monotonic()
            try:
                position = reader.wait_for(STREAM, _wait_for_token(line), CATCH_UP_TIMEOUT)
            except pgfeed.PgfeedError as exc:
                emit({"type": "error", "message": str(exc)})
                continue
            emit(_caught_up(position, started))
    return 0


def child_main(argv: list[str]) -> int:
    """Entry point of the demo's child processes (``python -m pgfeed_cli.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m pgfeed_cli.demo", description="A pgfeed demo process.")
    sub = parser.add_subparsers(dest="role", required=True)
    writer = sub.add_parser("writer")
    writer.add_argument("--rate", type=float, required=True)
    reader = sub.add_parser("reader")
    reader.add_argument("--name", required=True)
    reader.add_argument("--api", choices=["async", "sync"], required=True)
    args = parser.parse_args(argv)

    from pgfeed.errors import PgfeedError

    conninfo = os.environ.get(CONNINFO_ENV, "")
    name = "writer" if args.role == "writer" else f"reader {args.name}"
    _configure_child_logging(name)
    emit = _Emitter(sys.stdout)
    try:
        if args.role == "writer":
            return _writer(conninfo, args.rate, emit)
        if args.api == "async":
            return asyncio.run(_async_reader(conninfo, emit))
        return _sync_reader(conninfo, emit)
    except PgfeedError as exc:
        emit({"type": "error", "message": str(exc)})
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))


__all__ = ["child_main", "run_demo"]
