"""What the benchmarks share: child processes, the daemon, readers, paced
writers, the server's counters, percentiles and the report's pieces.

Every writer, reader, listener and daemon is its own OS process (forkserver,
with psycopg and pgfeed preloaded). Times taken in different processes are
compared with ``time.monotonic_ns()``: on Linux that is CLOCK_MONOTONIC, one
clock for the whole machine, which NTP never steps (``time.time_ns()`` may
jump).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg

CTX = mp.get_context("forkserver")
PRELOAD = ["psycopg", "psycopg_pool", "structlog", "pgfeed", "pgfeed.daemon", "bench.harness"]

#: With ``--split-cpus``: the CPUs of the database side (the server, pgbench
#: and the paced writers) and of the application side (the daemon, readers,
#: listeners), as if pgfeed's processes ran on another host; None: every
#: process may run anywhere. Set by ``bench.__main__`` in the parent only.
SPLIT: tuple[frozenset[int], frozenset[int]] | None = None

#: ~110 bytes of JSON per row, the same in every benchmark.
BODY = "x" * 80


def payload(n: int) -> dict[str, Any]:
    return {"n": n, "t": time.monotonic_ns(), "user": f"@user{n % 1000}:example.org", "body": BODY}


# --------------------------------------------------------------------------- processes
Side = Literal["db", "app"]


def split_cpus() -> tuple[frozenset[int], frozenset[int]]:
    """Half the CPUs this process may use for the database side, the rest
    for the application side; a one-line error below two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"bench: --split-cpus needs at least 2 CPUs, this process may use {len(cpus)}")
    if shutil.which("taskset") is None:
        raise SystemExit("bench: --split-cpus runs pgbench through taskset (util-linux), which is not installed")
    half = len(cpus) // 2
    return frozenset(cpus[:half]), frozenset(cpus[half:])


def pin(pid: int | None, side: Side) -> None:
    """Confine process ``pid`` (and the threads and children it starts later) to ``side``'s CPUs."""
    if SPLIT is not None and pid is not None:
        os.sched_setaffinity(pid, SPLIT[0] if side == "db" else SPLIT[1])


def pin_server(dsn: str) -> int:
    """Confine the server to the database side: the postmaster (every backend
    it forks later inherits that) and its live children. How many processes
    were pinned; 0 without :data:`SPLIT`."""
    if SPLIT is None:
        return 0
    postmaster, children = server_processes(dsn)
    pinned = [postmaster, *children]
    for pid in pinned:
        try:
            pin(pid, "db")
        except ProcessLookupError:
            continue  # ended meanwhile
        except PermissionError:
            raise SystemExit(f"bench: --split-cpus may not pin the server's process {pid}: run as root") from None
    return len(pinned)


def pinned_command(cmd: list[str], side: Side) -> list[str]:
    """``cmd`` run on ``side``'s CPUs (through taskset) under :data:`SPLIT`."""
    if SPLIT is None:
        return cmd
    cpus = SPLIT[0] if side == "db" else SPLIT[1]
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]


def _child(fn: Callable[..., Any], out: Any, args: tuple[Any, ...]) -> None:
    try:
        out.put(("ok", fn(*args)))
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


@dataclass
class Child:
    name: str
    process: Any
    out: Any
    result: Any = None
    done: bool = False


class Procs:
    """The child processes of one scenario; all are stopped when it ends."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for c in self.children:
            if c.process.is_alive():
                c.process.terminate()
        for c in self.children:
            c.process.join(10)
            if c.process.is_alive():
                c.process.kill()
                c.process.join(5)

    def start(self, name: str, fn: Callable[..., Any], *args: Any, side: Side = "app") -> Child:
        """Run ``fn(*args)`` in a child process on ``side``'s CPUs (see :data:`SPLIT`)."""
        out = CTX.Queue()
        p = CTX.Process(target=_child, args=(fn, out, args), daemon=True, name=name)
        p.start()
        with contextlib.suppress(ProcessLookupError):  # it died at once: result() says why
            pin(p.pid, side)
        child = Child(name, p, out)
        self.children.append(child)
        return child

    def result(self, child: Child, timeout: float) -> Any:
        """Wait for ``child``'s return value; its exception becomes ours."""
        if child.done:
            return child.result
        try:
            status, value = child.out.get(timeout=timeout)
        except Exception:
            raise RuntimeError(f"{child.name} (pid {child.process.pid}) gave no result within {timeout:g}s") from None
        child.process.join(10)
        if status != "ok":
            raise RuntimeError(f"{child.name} failed: {value}")
        child.result, child.done = value, True
        return value

    def stop(self, child: Child, timeout: float = 20) -> Any:
        """SIGTERM (the daemon's clean stop), then its result."""
        if child.process.is_alive():
            child.process.terminate()
        return self.result(child, timeout)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- daemon
def daemon_main(dsn: str, retention: float | None, prune_every: float, interval: float) -> dict[str, Any]:
    """``pgfeed daemon`` in a process of its own (what the CLI command runs),
    with options the command line does not offer (``prune_every``)."""
    from pgfeed.daemon import DaemonOptions, run_daemon

    options = DaemonOptions(retention=retention, prune_every=prune_every, interval=interval)
    asyncio.run(run_daemon(dsn, options))
    return {"cpu_s": time.process_time()}


def start_daemon(
    procs: Procs,
    dsn: str,
    *,
    retention: float | None = 7 * 86400.0,
    prune_every: float = 60.0,
    interval: float = 0.001,
) -> Child:
    """Start the daemon (``interval``: its ``--interval``, the default 1 ms)
    and wait until it holds the ticker lease."""
    child = procs.start("pgfeed daemon", daemon_main, dsn, retention, prune_every, interval)

    def leads() -> bool:
        if not child.process.is_alive():
            procs.result(child, 5)  # raises with the daemon's error
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT 1 FROM pgfeed.ticker WHERE kind = 'daemon' AND expires_at > clock_timestamp()"
            ).fetchone()
        return row is not None

    wait_for(leads, 30, "the daemon to take the ticker lease", every=0.1)
    return child


# --------------------------------------------------------------------------- readers
@dataclass
class ReaderHandle:
    child: Child
    ready: Any
    stop: Any
    delivered: Any  # shared counter of rows delivered


def reader_main(dsn: str, stream: str, ready: Any, stop: Any, delivered: Any, times: bool) -> dict[str, Any]:
    """An ``AsyncReader`` with default options (it campaigns for the ticker
    lease as ``pgfeed tail`` does), subscribed to ``stream`` from "now", until
    ``stop`` is set. Counts rows; with ``times`` records when row n arrived;
    always the lag from the writer's stamp ``t`` (taken before its append)."""
    from pgfeed import AsyncReader

    recv: dict[int, int] = {}
    lags_us: list[int] = []
    duplicates = 0
    batches = 0
    rows = 0

    async def run() -> None:
        nonlocal duplicates, batches, rows
        seen: set[int] = set()
        async with AsyncReader(dsn) as reader:
            sub = await reader.subscribe(stream, since="now")
            ready.set()

            async def consume() -> None:
                nonlocal duplicates, batches, rows
                async for batch in sub:
                    now = time.monotonic_ns()
                    batches += 1
                    for row in batch.rows:
                        body = row.payload
                        n = body["n"]
                        if n in seen:
                            duplicates += 1
                            continue
                        seen.add(n)
                        if times:
                            recv[n] = now
                        if "t" in body:
                            lags_us.append((now - body["t"]) // 1000)
                    delivered.value += len(batch.rows)
                    rows += len(batch.rows)

            task = asyncio.ensure_future(consume())
            stopper = asyncio.ensure_future(asyncio.to_thread(stop.wait))
            try:
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    task.result()  # the subscription ended or failed: say so
            finally:
                stop.set()  # releases the thread waiting on it
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    cpu0 = time.process_time()
    asyncio.run(run())
    return {
        "recv": recv,
        "lags_us": lags_us,
        "rows": rows,
        "duplicates": duplicates,
        "batches": batches,
        "cpu_s": time.process_time() - cpu0,
    }


def start_readers(procs: Procs, dsn: str, stream: str, count: int, *, times: bool = False) -> list[ReaderHandle]:
    """``count`` reader processes, each subscribed (ready) when this returns."""
    handles = []
    for i in range(count):
        ready, stop, delivered = CTX.Event(), CTX.Event(), CTX.Value("q", 0, lock=False)
        child = procs.start(f"reader {i}", reader_main, dsn, stream, ready, stop, delivered, times)
        handles.append(ReaderHandle(child, ready, stop, delivered))
    for h in handles:
        deadline = time.monotonic() + 60
        while not h.ready.wait(0.2):
            if not h.child.process.is_alive() or time.monotonic() > deadline:
                procs.result(h.child, 5)
                raise RuntimeError(f"{h.child.name} did not subscribe within 60s")
    return handles


def drain_readers(readers: list[ReaderHandle], rows: int, timeout: float) -> float:
    """Seconds until every reader delivered ``rows`` rows (``timeout`` at most)."""
    t0 = time.monotonic()
    with contextlib.suppress(RuntimeError):
        wait_for(lambda: all(h.delivered.value >= rows for h in readers), timeout, "readers", every=0.01)
    return time.monotonic() - t0


def stop_readers(procs: Procs, readers: list[ReaderHandle]) -> list[dict[str, Any]]:
    for h in readers:
        h.stop.set()
    return [procs.result(h.child, 30) for h in readers]


# --------------------------------------------------------------------------- writers
def paced_writer(
    dsn: str, kind: str, target: str, rate: float, count: int, slot: int, writers: int, go: Any, start: Any
) -> dict[str, Any]:
    """Commit one-row transactions n = slot, slot + writers, ... < count on the
    fixed schedule ``start + n / rate`` (a late commit does not shift the
    next ones). Each is one autocommit statement, so it has committed when the
    statement returns; that moment is recorded per n.

    ``kind``: ``append`` (``pgfeed.append`` to stream ``target``) or
    ``notify`` (an INSERT into ``bench_plain`` and ``pg_notify(target, n)``
    in one statement, what a hand-made outbox with NOTIFY does)."""
    import pgfeed
    from pgfeed.writer import encode_payload

    conn = psycopg.connect(dsn, autocommit=True, application_name="bench writer")
    conn.prepare_threshold = 0
    commits: dict[int, int] = {}
    if not go.wait(60):
        raise RuntimeError("no start signal")
    t0 = start.value
    period = 1e9 / rate
    # Behind schedule, a writer goes on as fast as it can, but not past the
    # schedule's end: the run lasts as long whatever the machine manages.
    deadline = t0 + count * period
    for n in range(slot, count, writers):
        due = t0 + n * period
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        elif time.monotonic_ns() > deadline:
            break
        if kind == "append":
            pgfeed.append(conn, target, payload(n))
        else:
            conn.execute(
                "WITH i AS (INSERT INTO bench_plain (payload) VALUES (%s::jsonb)) SELECT pg_notify(%s, %s)",
                (encode_payload(payload(n)), target, str(n)),
            )
        commits[n] = time.monotonic_ns()
    conn.close()
    return {"commits": commits, "cpu_s": time.process_time()}


def run_writers(
    procs: Procs, dsn: str, kind: str, target: str, rate: float, seconds: float, writers: int
) -> dict[str, Any]:
    """Paced writers sharing one schedule of ``rate`` rows/s for ``seconds``;
    returns the commit time of each n written (``count``: how many; fewer than
    scheduled when the writers fell behind), the start, and the achieved rate."""
    scheduled = max(1, int(rate * seconds))
    go, start = CTX.Event(), CTX.Value("q", 0)
    ws = [
        procs.start(f"writer {i}", paced_writer, dsn, kind, target, rate, scheduled, i, writers, go, start, side="db")
        for i in range(writers)
    ]
    time.sleep(0.3)  # let them connect
    start.value = time.monotonic_ns() + 200_000_000
    go.set()
    commits: dict[int, int] = {}
    cpu = 0.0
    for w in ws:
        got = procs.result(w, seconds + 120)
        commits.update(got["commits"])
        cpu += got["cpu_s"]
    t0 = start.value
    last = max(commits.values())
    return {
        "t0": t0,
        "count": len(commits),
        "scheduled": scheduled,
        "commits": commits,
        "achieved_rate": len(commits) / max(1e-9, (last - t0) / 1e9),
        "writer_cpu_s": cpu,
    }


# --------------------------------------------------------------------------- server counters
@dataclass(frozen=True)
class Counters:
    at: float
    xacts: int  # xact_commit + xact_rollback of the database
    statements: int | None  # pg_stat_statements calls (top level) in the database
    tick_max: int
    tick_rows: int


def counters(db: Any) -> Counters:
    """The database's transaction and statement counts (read from the admin
    database, so that reading them is not counted) and its ticks."""
    with psycopg.connect(db.server.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (db.name,)
        ).fetchone()
        xacts = int(row[0]) if row else 0
        stmts = None
        if db.counts_statements:
            srow = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                (db.name,),
            ).fetchone()
            stmts = int(srow[0]) if srow else 0
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        trow = conn.execute("SELECT coalesce(max(id), 0), count(*) FROM pgfeed.ticks").fetchone()
    assert trow is not None
    return Counters(time.monotonic(), xacts, stmts, int(trow[0]), int(trow[1]))


def top_statements(db: Any, limit: int = 6) -> list[tuple[str, int]]:
    """The most frequent statements in the database (pg_stat_statements)."""
    if not db.counts_statements:
        return []
    with psycopg.connect(db.server.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT regexp_replace(query, '\\s+', ' ', 'g'), calls FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s ORDER BY calls DESC LIMIT %s",
            (db.name, limit),
        ).fetchall()
    return [(str(q)[:90], int(c)) for q, c in rows]


def reset_statements(db: Any) -> None:
    if db.counts_statements:
        with psycopg.connect(db.server.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_stat_statements_reset(0, d.oid, 0) FROM pg_database d WHERE d.datname = %s", (db.name,)
            )


@dataclass(frozen=True)
class Rates:
    seconds: float
    ticks: int
    xacts_per_s: float
    statements_per_s: float | None
    ticks_per_s: float


def rates(a: Counters, b: Counters) -> Rates:
    dt = max(1e-9, b.at - a.at)
    stmts = None if a.statements is None or b.statements is None else (b.statements - a.statements) / dt
    ticks = b.tick_max - a.tick_max
    return Rates(dt, ticks, (b.xacts - a.xacts) / dt, stmts, ticks / dt)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def process_cpu(pid: int) -> float:
    """CPU seconds one process has used so far (utime + stime, from /proc)."""
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(dsn: str) -> tuple[int, list[int]]:
    """The local server's postmaster (a backend's parent, from /proc) and its
    live children (backends, WAL writer, checkpointer...)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # While the connection is open: its backend exits when it closes.
        postmaster = int(_stat_fields(int(row[0]))[1])
    children = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.isdigit() and int(_stat_fields(int(entry))[1]) == postmaster:
                children.append(int(entry))
    return postmaster, children


def server_cpu(dsn: str) -> float | None:
    """CPU seconds the server's processes have used so far: the postmaster,
    the children it reaped (backends that ended) and the live ones. None when
    the server does not run on this machine (``--dsn`` elsewhere) or /proc
    cannot tell."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        postmaster, children = server_processes(dsn)
        f = _stat_fields(postmaster)
        own_and_reaped = sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
        live = 0.0
        for pid in children:
            with contextlib.suppress(OSError, IndexError, ValueError):
                live += process_cpu(pid)
    except (OSError, IndexError, ValueError, psycopg.Error):
        return None
    return own_and_reaped / tick + live


# --------------------------------------------------------------------------- numbers and tables
def pct(values: list[float], q: float) -> float:
    """Percentile, linear interpolation, q in 0..100 (NaN when empty)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return pct(values, 50)


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x:,.{digits}f}"


@dataclass
class Target:
    what: str
    measured: str
    target: str
    met: bool | None  # None: reported, no target


@dataclass
class Section:
    """One benchmark's report: a title, Markdown lines, targets and raw figures."""

    name: str
    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self, header: list[str], rows: list[list[str]], align: list[str] | None = None) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join(align or ["---"] + ["---:"] * (len(header) - 1)) + "|")
        self.lines.extend("| " + " | ".join(r) + " |" for r in rows)
        self.lines.append("")

    def note(self, text: str) -> None:
        self.lines.append(text)
        self.lines.append("")


@dataclass(frozen=True)
class Config:
    """Sizes of a run; the defaults are the full run's."""

    quick: bool = False
    write_seconds: float = 3.0
    write_rounds: int = 5
    latency_seconds: float = 6.0
    latency_rounds: int = 2
    latency_cases: tuple[tuple[float, int], ...] = ((1000.0, 1), (10000.0, 16))
    fanout_readers: tuple[int, ...] = (1, 5, 20)
    fanout_seconds: float = 10.0
    idle_readers: int = 20
    idle_seconds: float = 60.0
    volume_seconds: float = 180.0
    volume_retention: float = 10.0
    volume_prune_every: float = 5.0
    catchup_rows: int = 500_000
    catchup_rounds: int = 2
    tickcost_ticks: int = 2000
    cadence_intervals: tuple[float, ...] = (0.001, 0.005, 0.02)
    cadence_rounds: int = 3

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls()
        # A smoke run for CI: every code path once, well under a minute.
        return replace(
            cls(),
            quick=True,
            write_seconds=1.0,
            write_rounds=1,
            latency_seconds=1.0,
            latency_rounds=1,
            latency_cases=((1000.0, 1),),
            fanout_readers=(1, 5),
            fanout_seconds=2.0,
            idle_seconds=5.0,
            volume_seconds=6.0,
            volume_retention=2.0,
            volume_prune_every=1.0,
            catchup_rows=20_000,
            catchup_rounds=1,
            tickcost_ticks=100,
            cadence_intervals=(0.001, 0.02),
            cadence_rounds=1,
        )


@dataclass
class Ctx:
    server: Any
    cfg: Config
    log: Callable[[str], None]


def log_to_stdout(text: str) -> None:
    print(text, flush=True)


def load_avg() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def dumps(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)


@contextlib.contextmanager
def timed(section: Section) -> Iterator[None]:
    t = time.monotonic()
    try:
        yield
    finally:
        section.seconds = time.monotonic() - t
