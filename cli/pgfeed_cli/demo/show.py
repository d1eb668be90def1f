"""The demo's parent: prepares the stream, starts the writer and the two
readers, prints their progress live, stops them in order and checks that
both readers delivered the same rows in the same order."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pgfeed.errors import one_line
from pgfeed_cli.demo.order import OrderCheck
from pgfeed_cli.demo.protocol import CATCH_UP_TIMEOUT, STREAM, Message
from pgfeed_cli.demo.supervisor import StopSignals, Supervisor

READY_TIMEOUT = 60.0  # seconds for the children to connect and subscribe
WRITER_STOP_TIMEOUT = 10.0  # seconds for the writer to finish its transaction
SAMPLE_EVERY = 5.0  # seconds between sample rows, after the first few


def run_demo(conninfo: str, *, duration: float | None, rate: float, log_path: Path | None = None) -> None:
    """Run the demo until Ctrl-C/SIGTERM or ``duration`` seconds of writing.

    Raises :class:`~pgfeed.errors.PgfeedError` if a child fails or the readers
    disagree; children are never left behind.
    """
    with StopSignals() as stop, _open_log(log_path) as log:
        _prepare(conninfo)
        demo = _Demo(conninfo, rate, stop, log)
        try:
            if not stop.requested.is_set():
                demo.run(duration)
        finally:
            demo.supervisor.kill_all()
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


@dataclass
class _ReaderStats:
    name: str
    api: str
    delivered: int = 0
    last_position: str = "-"
    second_lags: list[float] = field(default_factory=list)
    lags: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    caught_up: str | None = None


class _Demo:
    def __init__(self, conninfo: str, rate: float, stop: StopSignals, log: TextIO | None) -> None:
        self.conninfo = conninfo
        self.rate = rate
        self.stop = stop
        self.log = log
        self.supervisor = Supervisor(conninfo, stop)
        self.children = self.supervisor.children
        self.readers = {"a": _ReaderStats("a", "AsyncReader"), "b": _ReaderStats("b", "Reader")}
        self.order = OrderCheck(list(self.readers))
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

    # -- events -------------------------------------------------------------
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
            event = self.supervisor.next_event(remaining)
            if event is not None:
                self.handle(*event, stopping=stopping)
        return True

    # -- the show -----------------------------------------------------------
    @property
    def wrote_any(self) -> bool:
        return (self.final_token or self.last_token) is not None

    def run(self, duration: float | None) -> None:
        self.say(f'pgfeed demo: stream "{STREAM}" is ready; starting a writer and two reader processes...')
        self.supervisor.spawn("writer", "writer", "--rate", repr(self.rate))
        self.supervisor.spawn("a", "reader", "--name", "a", "--api", "async")
        self.supervisor.spawn("b", "reader", "--name", "b", "--api", "sync")
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
        from pgfeed.queries import query

        try:
            with connect.connect(self.conninfo, doing="reading the ticker lease") as conn:
                row = conn.execute(query("ticker_lease")).fetchone()
        except Exception as exc:  # the demo goes on without this line
            return f"ticker: unknown ({one_line(exc)})"
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
            event = self.supervisor.next_event(until - now)
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
