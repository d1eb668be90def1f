"""pgfeed benchmark (issue 3): latency, write throughput, catch-up; one server, side by side.

Run: ``/work/venv/bin/python bench/run.py [--quick] [--dsn DSN]``.

Without ``--dsn`` a throwaway PostgreSQL is started from local binaries
(:class:`pgfeed.testing.LocalServer`, server defaults: fsync and
synchronous_commit on) and stopped at the end. With ``--dsn`` a fresh
database is created on that server and dropped at the end. Prints Markdown
tables and writes JSON to ``bench/results/``.

Every writer, reader and listener is its own OS process. Latencies compare
``time.monotonic()`` stamps taken in different processes: on Linux that is
CLOCK_MONOTONIC, one system-wide clock, immune to NTP steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the venv
import psycopg
import structlog
from psycopg import sql

HERE = Path(__file__).resolve().parent
CTX = mp.get_context("forkserver")

# One payload shape everywhere (~110 bytes of JSON); SQL twin for bulk loads.
BODY = "x" * 80


def payload(n: int) -> dict[str, Any]:
    return {"n": n, "user": f"@user{n % 1000}:example.org", "body": BODY}


#: The same payloads on the server side, and loaders built on it.
BENCH_SQL = """
CREATE FUNCTION bench_payload(g bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('n', g, 'user', '@user' || (g % 1000) || ':example.org', 'body', repeat('x', 80))
$$;
-- Transactions of per_tx rows (n = first..last) appended to a stream, a tick after each.
CREATE PROCEDURE bench_small_tx(stream text, first bigint, last bigint, per_tx int)
LANGUAGE plpgsql AS $$
BEGIN
    FOR lo IN first..last BY per_tx LOOP
        PERFORM pgfeed.append_many_v1(stream, ARRAY(
            SELECT bench_payload(g) FROM generate_series(lo, least(last, lo + per_tx - 1)) g ORDER BY g));
        COMMIT;
        PERFORM * FROM pgfeed.tick_v1();
        COMMIT;
    END LOOP;
END $$;
"""

#: Rows lo..hi into a table (a stream's partition or the plain table) in one statement.
LOAD_SQL = sql.SQL(
    "INSERT INTO {} (payload) SELECT bench_payload(g) FROM generate_series(%s::bigint, %s::bigint) g ORDER BY g"
)


# --------------------------------------------------------------------------- helpers
def quiet_logs() -> None:
    """pgfeed logs through structlog; keep warnings and errors only."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (VmHWM: peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Timers:
    """Wall time spent inside wrapped async functions (per-step profile)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def wrap_async(self, owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr, None)
        if inner is None:  # the reader changed shape; profile what still exists
            return
        calls = self.calls.setdefault(label, [])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - t)

        setattr(owner, attr, timed)

    def wrap_sync(self, owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr, None)
        if inner is None:
            return
        calls = self.calls.setdefault(label, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - t)

        setattr(owner, attr, timed)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {
                "calls": len(v),
                "total_s": sum(v),
                "mean_ms": 1000 * sum(v) / len(v) if v else 0.0,
                "p50_ms": 1000 * pct(v, 50),
                "p99_ms": 1000 * pct(v, 99),
            }
            for k, v in self.calls.items()
        }


def instrument_reader() -> Timers:
    """Time the reader's I/O and planning steps without touching pgfeed's files."""
    from pgfeed import store
    from pgfeed.core import positions
    from pgfeed.reader import AsyncReader

    t = Timers()
    t.wrap_async(AsyncReader, "_tick_now", "tick (pool acquire + take_tick)")
    t.wrap_async(store, "take_tick", "take_tick query")
    t.wrap_async(AsyncReader, "_plan", "plan step (pool acquire + queries + planning)")
    t.wrap_async(store, "fetch_ticks", "fetch_ticks query")
    t.wrap_async(store, "fetch_rows", "fetch_rows queries")
    t.wrap_sync(positions, "plan_window", "plan_window (pure)")
    t.wrap_sync(positions, "plan_interval", "plan_interval (pure)")
    return t


def child(fn: Callable[..., Any], out: Any, *args: Any) -> None:
    """Process entry: run ``fn(*args)`` and put ``("ok", result)`` or ``("error", text)`` on ``out``."""
    quiet_logs()
    try:
        out.put(("ok", fn(*args)))
    except BaseException as exc:
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class Procs:
    """Child processes started by this run; all are joined or terminated on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[Any, Any]] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> int:
        out = CTX.Queue()
        p = CTX.Process(target=child, args=(fn, out, *args), daemon=True)
        p.start()
        self.procs.append((p, out))
        return len(self.procs) - 1

    def result(self, i: int, timeout: float) -> Any:
        p, out = self.procs[i]
        status, value = out.get(timeout=timeout)
        p.join(10)
        if status != "ok":
            raise RuntimeError(f"benchmark process failed: {value}")
        return value

    def stop_all(self) -> None:
        for p, _ in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
        self.procs.clear()


def wait_flag(flag: Any, timeout: float, what: str) -> None:
    if not flag.wait(timeout):
        raise RuntimeError(f"timed out waiting for {what}")


def connect(dsn: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit)


def tagged(dsn: str, role: str) -> str:
    """``dsn`` with ``application_name=bench-<role>``, so the sampler can tell backends apart."""
    return psycopg.conninfo.make_conninfo(dsn, application_name=f"bench-{role}")


class Sampler:
    """Where time goes on the server while a scenario runs.

    A thread samples ``pg_stat_activity`` every ``interval`` seconds (what each
    backend is doing: on CPU, waiting on a lock, on I/O, idle waiting for its
    client) and, when the server runs on this host, the CPU time of each
    server process; backends are grouped by ``application_name``.
    """

    def __init__(self, dsn: str, interval: float = 0.05) -> None:
        import threading

        self.dsn = tagged(dsn, "sampler")
        self.interval = interval
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.states: dict[str, dict[str, int]] = {}
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.group_of: dict[int, str] = {}
        self.samples = 0
        self.error: str | None = None

    def __enter__(self) -> Sampler:
        self.machine0 = psutil.cpu_times()
        self.wall0 = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        self.thread.join(10)
        self.machine1 = psutil.cpu_times()
        self.wall1 = time.monotonic()

    def _run(self) -> None:
        try:
            with connect(self.dsn) as conn:
                postmaster = self._postmaster(conn)
                while not self.stop_flag.wait(self.interval):
                    self._sample(conn, postmaster)
        except Exception as exc:  # a broken sampler must not break the benchmark
            self.error = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _postmaster(conn: psycopg.Connection[Any]) -> Any:
        """The server's main process, if it runs on this host (else no CPU figures)."""
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:
            parent = psutil.Process(int(row[0])).parent() if row else None
        except psutil.Error:
            return None
        return parent if parent is not None and "postgres" in parent.name() else None

    def _sample(self, conn: psycopg.Connection[Any], postmaster: Any) -> None:
        self.samples += 1
        rows = conn.execute(
            "SELECT pid, application_name, backend_type, state, wait_event_type, wait_event"
            "  FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        ).fetchall()
        for pid, app, btype, state, wtype, wevent in rows:
            group = app if app and app.startswith("bench-") else btype
            self.group_of[pid] = group
            if state == "active":
                what = f"{wtype}:{wevent}" if wevent else "CPU"
            elif state is None:
                what = f"{wtype}:{wevent}" if wevent else "running"
            else:
                what = state
            counts = self.states.setdefault(group, {})
            counts[what] = counts.get(what, 0) + 1
        if postmaster is None:
            return
        for proc in postmaster.children():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                cpu = t.user + t.system
                self.cpu_first.setdefault(proc.pid, cpu if self.samples == 1 else 0.0)
                self.cpu_last[proc.pid] = cpu
                self.group_of.setdefault(proc.pid, proc.name())

    def summary(self) -> dict[str, Any]:
        cpu: dict[str, float] = {}
        for pid, last in self.cpu_last.items():
            g = self.group_of.get(pid, "?")
            cpu[g] = cpu.get(g, 0.0) + last - self.cpu_first.get(pid, 0.0)
        wall = self.wall1 - self.wall0
        busy = sum(getattr(self.machine1, f) - getattr(self.machine0, f) for f in ("user", "system", "nice"))
        return {
            "seconds": wall,
            "samples": self.samples,
            "machine_busy_cores": busy / wall if wall else 0.0,
            "server_cpu_s": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
            "backend_states": self.states,
            "error": self.error,
        }


def describe_sampler(s: dict[str, Any], groups: tuple[str, ...]) -> str:
    """One line: server CPU per group, and what the named groups' backends were doing."""
    cpu = ", ".join(f"{g} {v:.2f}" for g, v in s["server_cpu_s"].items() if v >= 0.05)
    parts = [f"machine busy {s['machine_busy_cores']:.2f} of {os.cpu_count()} cores", f"server CPU s: {cpu or 'n/a'}"]
    for g in groups:
        st = s["backend_states"].get(g)
        if st:
            total = sum(st.values())
            top = sorted(st.items(), key=lambda kv: -kv[1])[:4]
            parts.append(f"{g} backends: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top))
    return "; ".join(parts)


# --------------------------------------------------------------------------- 1. latency
def paced_writer(
    dsn: str,
    kind: str,
    target: str,
    rate: float,
    count: int,
    sync_commit: str,
    slot: int,
    writers: int,
    go: Any,
    start: Any,
) -> Any:
    """Commit one-row transactions n = slot, slot + writers, ... on the fixed
    schedule ``t0 + n / rate`` (never sleep-after-each: a late commit does not
    shift the ones after it).

    Each transaction is one autocommit statement, so it has committed when the
    statement returns (one round trip instead of BEGIN/statement/COMMIT).
    ``kind`` ``pgfeed``: ``pgfeed.append`` to stream ``target``; ``notify``:
    ``pg_notify(target, n)``. Returns the commit-return time of each n.
    """
    import pgfeed

    conn = connect(tagged(dsn, "writer"))
    conn.execute(f"SET synchronous_commit = {sync_commit}")
    mine = range(slot, count, writers)
    commits: dict[int, float] = {}
    wait_flag(go, 60, "the start signal")
    t0 = start.value
    for n in mine:
        due = t0 + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if kind == "pgfeed":
            pgfeed.append(conn, target, payload(n))
        else:
            conn.execute("SELECT pg_notify(%s, %s)", (target, str(n)))
        commits[n] = time.monotonic()
    conn.close()
    return {"t0": t0, "commits": commits, "cpu_s": time.process_time()}


def pgfeed_latency_reader(dsn: str, stream: str, count: int, ready: Any, timeout: float) -> Any:
    """An AsyncReader subscribed from "now"; delivery time of each row n."""
    timers = instrument_reader()

    async def run() -> Any:
        from pgfeed import AsyncReader

        recv: dict[int, float] = {}
        dups = 0
        batches = 0
        async with AsyncReader(tagged(dsn, "reader")) as reader:
            sub = await reader.subscribe(stream, "now")
            ready.set()
            cpu0, wall0 = time.process_time(), time.monotonic()

            async def consume() -> None:
                nonlocal dups, batches
                async for batch in sub:
                    t = time.monotonic()
                    batches += 1
                    for row in batch.rows:
                        n = row.payload["n"]
                        if n in recv:
                            dups += 1
                        else:
                            recv[n] = t
                    if len(recv) >= count:
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consume(), timeout)
            cpu = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
        return {"recv": recv, "duplicates": dups, "batches": batches, "cpu_percent": cpu, "steps": timers.summary()}

    return asyncio.run(run())


def raw_listener(dsn: str, channel: str, count: int, ready: Any, timeout: float) -> Any:
    """psycopg async LISTEN; receive time of each notification n."""

    async def run() -> Any:
        recv: dict[int, float] = {}
        conn = await psycopg.AsyncConnection.connect(tagged(dsn, "reader"), autocommit=True)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        ready.set()
        cpu0, wall0 = time.process_time(), time.monotonic()
        deadline = time.monotonic() + timeout
        while len(recv) < count and time.monotonic() < deadline:
            async for note in conn.notifies(timeout=0.5):
                recv[int(note.payload)] = time.monotonic()
                if len(recv) >= count:
                    break
        cpu = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
        await conn.close()
        return {"recv": recv, "duplicates": 0, "batches": len(recv), "cpu_percent": cpu}

    return asyncio.run(run())


def latency_pair(
    dsn: str, kind: str, target: str, cfg: dict[str, Any], warmup: float = 1.0, label: str | None = None
) -> dict[str, Any]:
    rate, seconds, writers = cfg["latency_rate"], cfg["latency_seconds"], cfg["latency_writers"]
    count = int(rate * seconds)
    ready, go, start = CTX.Event(), CTX.Event(), CTX.Value("d", 0.0)
    procs = Procs()
    try:
        reader_fn = pgfeed_latency_reader if kind == "pgfeed" else raw_listener
        r = procs.start(reader_fn, dsn, target, count, ready, seconds + 30)
        ws = [
            procs.start(paced_writer, dsn, kind, target, rate, count, cfg["latency_sync_commit"], i, writers, go, start)
            for i in range(writers)
        ]
        wait_flag(ready, 60, f"the {kind} reader to be ready")
        time.sleep(0.5)  # let the writers connect
        commits: dict[int, float] = {}
        writer_cpu = 0.0
        with Sampler(dsn) as sampler:
            start.value = time.monotonic() + 0.2
            go.set()
            t0 = start.value
            for w in ws:
                done = procs.result(w, seconds + 60)
                commits.update(done["commits"])
                writer_cpu += done["cpu_s"]
            got = procs.result(r, 60)
    finally:
        procs.stop_all()
    recv = got["recv"]
    late = [commits[n] - (t0 + n / rate) for n in range(count)]
    keep = [n for n in range(count) if commits[n] - t0 >= warmup]
    lat = [1000 * (recv[n] - commits[n]) for n in keep if n in recv]
    return {
        "kind": label or kind,
        "rows_written": count,
        "rows_delivered": len(recv),
        "duplicates": got["duplicates"],
        "deliveries": got["batches"],
        "rows_measured": len(lat),
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "writer_achieved_rate": count / (max(commits.values()) - t0),
        "writer_behind_schedule_p50_ms": 1000 * pct(late, 50),
        "writer_behind_schedule_p99_ms": 1000 * pct(late, 99),
        "reader_cpu_percent": got["cpu_percent"],
        "writer_processes_cpu_s": writer_cpu,
        "reader_steps": got.get("steps", {}),
        "server": sampler.summary(),
    }


def bench_latency(dsn: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from pgfeed import admin

    with connect(dsn) as conn:
        admin.create_stream(conn, "bench_latency")
    out = {
        "raw": latency_pair(dsn, "notify", "bench_raw_notify", cfg),
        "pgfeed": latency_pair(dsn, "pgfeed", "bench_latency", cfg),
    }
    if cfg["diagnostics"]:
        # Where does pgfeed's latency go? The same run with the server's fsync
        # off (a diagnostic only: never run a real server like this).
        with connect(dsn) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        try:
            out["pgfeed_fsync_off"] = latency_pair(dsn, "pgfeed", "bench_latency", cfg, label="pgfeed, fsync=off")
        finally:
            with connect(dsn) as conn:
                conn.execute("ALTER SYSTEM RESET fsync")
                conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)
    return out


# --------------------------------------------------------------------------- 2. throughput
def tp_writer(dsn: str, mode: str, target: str, seconds: float, ready: Any, go: Any) -> int:
    """One-row transactions for ``seconds``; return how many committed."""
    import pgfeed
    from pgfeed.writer import encode_payload

    conn = connect(tagged(dsn, "writer"), autocommit=False)
    conn.execute("SELECT 1")
    conn.commit()
    ready.release()
    wait_flag(go, 120, "the start signal")
    stop = time.monotonic() + seconds
    n = 0
    insert = sql.SQL("INSERT INTO {} (payload) VALUES (%s::jsonb)").format(sql.Identifier(target))
    while time.monotonic() < stop:
        if mode == "plain":
            conn.execute(insert, (encode_payload(payload(n)),))
        else:
            pgfeed.append(conn, target, payload(n))
        conn.commit()
        n += 1
    conn.close()
    return n


def tp_reader(dsn: str, stream: str, ready: Any, expected: Any, timeout: float) -> Any:
    """A live AsyncReader from "now" that consumes until ``expected`` rows arrived."""

    async def run() -> Any:
        from pgfeed import AsyncReader

        got = 0
        last_at = 0.0
        async with AsyncReader(tagged(dsn, "reader")) as reader:
            sub = await reader.subscribe(stream, "now")
            ready.set()

            async def consume() -> None:
                nonlocal got, last_at
                async for batch in sub:
                    got += len(batch.rows)
                    last_at = time.monotonic()

            task = asyncio.create_task(consume())
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if 0 <= expected.value <= got:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return {"rows": got, "last_delivery": last_at}

    return asyncio.run(run())


def throughput_run(dsn: str, mode: str, target: str, writers: int, seconds: float) -> dict[str, Any]:
    procs = Procs()
    ready_w = CTX.Semaphore(0)
    go = CTX.Event()
    expected = CTX.Value("q", -1)
    reader = None
    try:
        if mode != "plain":
            ready_r = CTX.Event()
            reader = procs.start(tp_reader, dsn, target, ready_r, expected, seconds + 120)
            wait_flag(ready_r, 60, "the live reader")
        ws = [procs.start(tp_writer, dsn, mode, target, seconds, ready_w, go) for _ in range(writers)]
        for _ in ws:
            if not ready_w.acquire(timeout=120):
                raise RuntimeError("writers did not connect")
        load_before = os.getloadavg()[0]
        with Sampler(dsn) as sampler:
            go.set()
            counts = [procs.result(i, seconds + 120) for i in ws]
        writers_done = time.monotonic()
        total = sum(counts)
        out: dict[str, Any] = {
            "mode": mode,
            "writers": writers,
            "seconds": seconds,
            "rows": total,
            "rows_per_s": total / seconds,
            "loadavg_1m_before": load_before,
            "server": sampler.summary(),
        }
        if reader is not None:
            expected.value = total
            got = procs.result(reader, 180)
            out["reader_rows"] = got["rows"]
            out["reader_drain_after_writers_s"] = max(0.0, got["last_delivery"] - writers_done)
        return out
    finally:
        procs.stop_all()


def bench_throughput(dsn: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    from pgfeed import admin

    with connect(dsn) as conn:
        admin.create_stream(conn, "bench_tp_notify")
        admin.create_stream(conn, "bench_tp_poll", notify_mode="poll")
        conn.execute("CREATE TABLE bench_tp_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
    targets = {"plain": "bench_tp_plain", "notify": "bench_tp_notify", "poll": "bench_tp_poll"}
    results = []
    for writers in cfg["writer_counts"]:
        for mode in ("plain", "notify", "poll"):
            r = throughput_run(dsn, mode, targets[mode], writers, cfg["throughput_seconds"])
            print(f"  {mode:6} x{writers:<2}: {r['rows_per_s']:8.0f} rows/s", flush=True)
            results.append(r)
    return results


# --------------------------------------------------------------------------- 3. catch-up
def catchup_reader(dsn: str, stream: str, until: str, expected: int) -> Any:
    """Catch one reader up from "earliest" to ``until``; rate, per-step time, peak RSS."""
    timers = instrument_reader()

    async def run() -> Any:
        from pgfeed import AsyncReader

        async with AsyncReader(tagged(dsn, "reader")) as reader:
            rss_open = proc_status("VmRSS")
            rows = 0
            last_n = -1
            out_of_order = 0
            batches = 0
            t0, cpu0 = time.perf_counter(), time.process_time()
            sub = await reader.subscribe(stream, "earliest", until=until)
            async for batch in sub:
                batches += 1
                for row in batch.rows:
                    n = row.payload["n"]
                    if n <= last_n:
                        out_of_order += 1
                    last_n = n
                rows += len(batch.rows)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return {
            "client_cpu_s": cpu,
            "rows": rows,
            "expected": expected,
            "out_of_order": out_of_order,
            "batches": batches,
            "seconds": elapsed,
            "rows_per_s": rows / elapsed,
            "rss_after_open_kib": rss_open,
            "peak_rss_kib": proc_status("VmHWM"),
            "steps": timers.summary(),
        }

    return asyncio.run(run())


def raw_scan(dsn: str, query: str, params: tuple[Any, ...], expected: int) -> Any:
    """Run ``query`` (payload is its last column) through a server-side cursor, 1000 rows a fetch."""
    conn = connect(tagged(dsn, "reader"), autocommit=False)
    rss_open = proc_status("VmRSS")
    rows = 0
    last_n = -1
    out_of_order = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    with conn.cursor(name="scan") as cur:
        cur.execute(query.encode(), params)
        while batch := cur.fetchmany(1000):
            for r in batch:
                n = r[-1]["n"]
                if n <= last_n:
                    out_of_order += 1
                last_n = n
            rows += len(batch)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    conn.rollback()
    conn.close()
    return {
        "rows": rows,
        "expected": expected,
        "out_of_order": out_of_order,
        "seconds": elapsed,
        "rows_per_s": rows / elapsed,
        "client_cpu_s": cpu,
        "rss_after_open_kib": rss_open,
        "peak_rss_kib": proc_status("VmHWM"),
    }


def in_fresh_process(fn: Callable[..., Any], *args: Any, timeout: float = 900) -> Any:
    procs = Procs()
    try:
        return procs.result(procs.start(fn, *args), timeout)
    finally:
        procs.stop_all()


def tick(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT id FROM pgfeed.tick_v1()").fetchone()
    assert row is not None
    return str(row[0])


def load_catchup_data(dsn: str, big: int, small: int, in_flight: tuple[int, int]) -> dict[str, Any]:
    """The backlogs, with the same payloads (loading is not measured).

    Ticks are global, so everything that takes ticks is loaded one after the
    other (a tick taken while a bulk transaction runs changes that stream's
    shape); the plain table, which takes none, is loaded meanwhile.
    """
    import threading

    from pgfeed import admin

    chunk = 100_000
    with connect(dsn) as conn:
        bulk_id = admin.create_stream(conn, "bench_bulk")
        admin.create_stream(conn, "bench_small_tx")
        admin.create_stream(conn, "bench_in_flight")
        conn.execute("CREATE TABLE bench_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
        conn.execute(BENCH_SQL)
    out: dict[str, Any] = {"bulk_id": bulk_id, "tokens": {}, "seconds": {}}
    errors: list[BaseException] = []

    def timed(name: str, fn: Callable[[psycopg.Connection[Any]], None], c: psycopg.Connection[Any]) -> None:
        t = time.perf_counter()
        fn(c)
        out["seconds"][name] = time.perf_counter() - t

    def bulk(c: psycopg.Connection[Any]) -> None:
        # (a) Transactions of 100k rows straight into the stream's partition, a tick after each.
        part = sql.Identifier("pgfeed", f"events_{bulk_id}")
        for lo in range(1, big + 1, chunk):
            hi = min(big, lo + chunk - 1)
            c.execute(LOAD_SQL.format(part), (lo, hi))
            out["tokens"][hi] = tick(c)

    def small_tx(c: psycopg.Connection[Any]) -> None:
        # (b) Transactions of 10 rows, a tick after each.
        c.execute("CALL bench_small_tx('bench_small_tx', 1, %s, 10)", (small,))
        out["small_token"] = tick(c)

    def big_in_flight(c: psycopg.Connection[Any]) -> None:
        # (c) One transaction of `rows` rows stays open while `ticks` transactions of 10 rows commit,
        # each followed by a tick (what a live reader's ticks do around any bulk write). Its rows get
        # the higher n: they belong to the interval in which it commits, after the small ones.
        rows, ticks = in_flight
        with connect(tagged(dsn, "load"), autocommit=False) as open_tx:
            open_tx.execute("SET LOCAL synchronous_commit = off")
            open_tx.execute(
                "SELECT pgfeed.append_many_v1('bench_in_flight', "
                "ARRAY(SELECT bench_payload(g) FROM generate_series(%s::bigint, %s::bigint) g ORDER BY g))",
                (10 * ticks + 1, 10 * ticks + rows),
            )
            c.execute("CALL bench_small_tx('bench_in_flight', 1, %s, 10)", (10 * ticks,))
            open_tx.commit()
        out["in_flight_token"] = tick(c)

    def ticking(c: psycopg.Connection[Any]) -> None:
        timed("bulk_stream", bulk, c)
        timed("small_tx_stream", small_tx, c)
        timed("in_flight_stream", big_in_flight, c)

    def plain(c: psycopg.Connection[Any]) -> None:
        t = time.perf_counter()
        for lo in range(1, big + 1, chunk):
            c.execute(LOAD_SQL.format(sql.Identifier("bench_plain")), (lo, min(big, lo + chunk - 1)))
        out["seconds"]["plain_table"] = time.perf_counter() - t

    def loader(fn: Callable[[psycopg.Connection[Any]], None]) -> None:
        try:
            with connect(tagged(dsn, "load")) as c:
                c.execute("SET synchronous_commit = off")
                fn(c)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loader, args=(fn,)) for fn in (ticking, plain)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    with connect(dsn) as conn:
        conn.execute("VACUUM (ANALYZE) pgfeed.events, pgfeed.ticks, bench_plain")
        row = conn.execute("SELECT count(*) FROM pgfeed.ticks").fetchone()
        out["ticks"] = row[0] if row else None
    return out


def bench_catchup(dsn: str, cfg: dict[str, Any]) -> dict[str, Any]:
    big, small, in_flight = cfg["catchup_rows"], cfg["catchup_small_rows"], cfg["catchup_in_flight"]
    t = time.perf_counter()
    data = load_catchup_data(dsn, big, small, in_flight)
    print(f"  loaded in {time.perf_counter() - t:.1f}s ({data['ticks']} ticks)", flush=True)
    tokens = data["tokens"]
    first = min(tokens)
    with connect(dsn) as conn:
        plain_q = sql.SQL("SELECT payload FROM bench_plain WHERE id <= %s ORDER BY id").as_string(conn)
        part_q = (
            # e.xid, not xid: a bare name would sort by the output column xid::text::bigint (no index order)
            sql.SQL(
                "SELECT e.xid::text::bigint, e.seq, e.created_at, e.key, e.payload FROM {} e"
                " ORDER BY e.xid, e.seq LIMIT %s"
            )
            .format(sql.Identifier("pgfeed", f"events_{data['bulk_id']}"))
            .as_string(conn)
        )
    in_flight_rows = in_flight[0] + 10 * in_flight[1]
    out: dict[str, Any] = {"load_seconds": data["seconds"], "ticks": data["ticks"], "runs": []}
    plan: list[tuple[str, int, Callable[..., Any], tuple[Any, ...]]] = [
        ("raw", big, raw_scan, (plain_q, (big,))),
        ("pgfeed", big, catchup_reader, ("bench_bulk", tokens[big])),
        ("raw", first, raw_scan, (plain_q, (first,))),
        ("pgfeed", first, catchup_reader, ("bench_bulk", tokens[first])),
        ("pgfeed_small_tx", small, catchup_reader, ("bench_small_tx", data["small_token"])),
        ("pgfeed_in_flight", in_flight_rows, catchup_reader, ("bench_in_flight", data["in_flight_token"])),
        ("raw_partition_reader_columns", first, raw_scan, (part_q, (first,))),
    ]
    for kind, rows, fn, args in plan:
        with Sampler(dsn) as sampler:
            r = in_fresh_process(fn, dsn, *args, rows)
        r.update(kind=kind, server=sampler.summary())
        print(
            f"  {kind:28} {rows:>8} rows: {r['rows_per_s']:9.0f} rows/s, client CPU {r['client_cpu_s']:.1f}s, "
            f"peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB",
            flush=True,
        )
        out["runs"].append(r)
    return out


# --------------------------------------------------------------------------- report
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def ok(flag: bool) -> str:
    return "yes" if flag else "**NO**"


def render(res: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    cfg = res["config"]
    add(f"pgfeed benchmark, {res['started']}, PostgreSQL {res['server_version']} ({res['server']}), ")
    add(
        f"{os.cpu_count()} CPUs, load average {res['loadavg_start'][0]:.2f} at start, "
        f"{res['loadavg_end'][0]:.2f} at end"
    )
    code = res["code"]
    dirty = f", uncommitted changes in {len(code['uncommitted'])} pgfeed file(s)" if code["uncommitted"] else ""
    add(f"code: {code['commit']}{dirty}")
    add("")
    if "latency" in res:
        lat = res["latency"]
        raw, feed = lat["raw"], lat["pgfeed"]
        diag = lat.get("pgfeed_fsync_off")
        add(
            f"### 1. Commit-to-delivery latency, {cfg['latency_rate']:.0f} one-row transactions/s for "
            f"{cfg['latency_seconds']:.0f} s (first second dropped); {cfg['latency_writers']} paced writer "
            f"process(es), autocommit, synchronous_commit={cfg['latency_sync_commit']}; reader in another process"
        )
        add("")
        head = "| | raw NOTIFY->LISTEN | pgfeed AsyncReader | ratio | target | met |"
        sep = "|---|---:|---:|---:|---|---|"
        if diag:
            head += " diagnostic: pgfeed, server fsync=off |"
            sep += "---:|"
        add(head)
        add(sep)

        def extra(key: str, fmt: str = "{:.2f}") -> str:
            return f" {fmt.format(diag[key])} |" if diag else ""

        for q, lim in (("p50", 3), ("p99", 5)):
            a, b = feed[f"{q}_ms"], raw[f"{q}_ms"]
            add(f"| {q} (ms) | {b:.2f} | {a:.2f} | {ratio(a, b)} | <= {lim}x | {ok(a <= lim * b)} |{extra(q + '_ms')}")
        add(
            f"| p90 (ms) | {raw['p90_ms']:.2f} | {feed['p90_ms']:.2f} | {ratio(feed['p90_ms'], raw['p90_ms'])} | | |"
            + extra("p90_ms")
        )
        add(f"| max (ms) | {raw['max_ms']:.2f} | {feed['max_ms']:.2f} | | | |{extra('max_ms')}")
        for r in (raw, feed, diag):
            if r is not None and r["rows_delivered"] != r["rows_written"]:
                add(f"| **{r['kind']}: delivered {r['rows_delivered']} of {r['rows_written']}** | | | | | |")
        add(
            f"| delivered / written | {raw['rows_delivered']}/{raw['rows_written']} | "
            f"{feed['rows_delivered']}/{feed['rows_written']}, {feed['duplicates']} dup | | | |"
            + (f" {diag['rows_delivered']}/{diag['rows_written']}, {diag['duplicates']} dup |" if diag else "")
        )
        add(f"| deliveries (batches) | {raw['deliveries']} | {feed['deliveries']} | | | |{extra('deliveries', '{}')}")
        add(
            f"| writers' achieved rate (/s) | {raw['writer_achieved_rate']:.0f} | {feed['writer_achieved_rate']:.0f} "
            f"| | | |{extra('writer_achieved_rate', '{:.0f}')}"
        )
        add(
            f"| writers behind schedule p50 / p99 (ms) | {raw['writer_behind_schedule_p50_ms']:.1f} / "
            f"{raw['writer_behind_schedule_p99_ms']:.1f} | {feed['writer_behind_schedule_p50_ms']:.1f} / "
            f"{feed['writer_behind_schedule_p99_ms']:.1f} | | | |"
            + (
                f" {diag['writer_behind_schedule_p50_ms']:.1f} / {diag['writer_behind_schedule_p99_ms']:.1f} |"
                if diag
                else ""
            )
        )
        add(
            f"| reader process CPU (% of one core) | {raw['reader_cpu_percent']:.0f} | "
            f"{feed['reader_cpu_percent']:.0f} | | | |{extra('reader_cpu_percent', '{:.0f}')}"
        )
        for r in (raw, feed, diag):
            if r is not None and r["writer_achieved_rate"] < 0.95 * cfg["latency_rate"]:
                add(
                    f"\n**{r['kind']}: the writer fell behind the {cfg['latency_rate']:.0f}/s schedule "
                    f"({r['writer_achieved_rate']:.0f}/s achieved)**: the offered load was lower and burstier "
                    "than intended; latencies are still measured from each commit's return."
                )
        add("")
        for r in (raw, feed, diag):
            if r is not None:
                add(
                    f"- {r['kind']}: writers' own CPU {r['writer_processes_cpu_s']:.1f} s; "
                    + describe_sampler(r["server"], ("bench-writer", "bench-reader"))
                )
        add("")
    if "throughput" in res:
        tp = res["throughput"]
        by = {(r["mode"], r["writers"]): r for r in tp}
        add(
            f"### 2. Write throughput, one row per transaction, {cfg['throughput_seconds']:.0f} s per cell, "
            "writer processes (one connection each), synchronous_commit=on (server default)"
        )
        add("")
        add(
            "| writers | plain INSERT (rows/s) | pgfeed notify (rows/s) | ratio | pgfeed poll (rows/s) | ratio "
            "| live reader got (notify / poll) |"
        )
        add("|---:|---:|---:|---:|---:|---:|---|")
        for w in cfg["writer_counts"]:
            p, n, q = by[("plain", w)], by[("notify", w)], by[("poll", w)]
            add(
                f"| {w} | {p['rows_per_s']:.0f} | {n['rows_per_s']:.0f} | {ratio(n['rows_per_s'], p['rows_per_s'])} "
                f"| {q['rows_per_s']:.0f} | {ratio(q['rows_per_s'], p['rows_per_s'])} "
                f"| {n['reader_rows']}/{n['rows']} (+{n['reader_drain_after_writers_s']:.1f}s) / "
                f"{q['reader_rows']}/{q['rows']} (+{q['reader_drain_after_writers_s']:.1f}s) |"
            )
        add("")
        for w in cfg["writer_counts"]:
            for mode in ("plain", "notify", "poll"):
                r = by[(mode, w)]
                add(f"- {mode} x{w}: " + describe_sampler(r["server"], ("bench-writer",)))
        add("")
    if "catchup" in res:
        cu = res["catchup"]
        runs = cu["runs"]
        raw_big, feed_big, raw_small, feed_small, feed_tx, feed_flight, raw_part = runs
        add(
            "### 3. Catch-up from earliest to a token taken after loading, one fresh reader process each "
            "(AsyncReader defaults), vs `SELECT payload FROM plain ORDER BY id` (server-side cursor, 1000 rows a fetch)"
        )
        add("")
        add(
            "| backlog | raw scan (rows/s) | pgfeed (rows/s) | ratio | target | met | pgfeed client CPU (us/row) "
            "| raw client CPU (us/row) | pgfeed peak RSS | raw peak RSS |"
        )
        add("|---|---:|---:|---:|---|---|---:|---:|---:|---:|")

        def us(r: dict[str, Any]) -> str:
            return f"{1e6 * r['client_cpu_s'] / max(1, r['rows']):.1f}"

        def row(label: str, raw: dict[str, Any], feed: dict[str, Any]) -> None:
            rr, fr = raw["rows_per_s"], feed["rows_per_s"]
            add(
                f"| {label} | {rr:.0f} | {fr:.0f} | {ratio(fr, rr)} | >= 0.5x | {ok(fr >= 0.5 * rr)} | {us(feed)} "
                f"| {us(raw)} | {feed['peak_rss_kib'] / 1024:.0f} MiB | {raw['peak_rss_kib'] / 1024:.0f} MiB |"
            )

        row(f"{feed_big['rows']:,} rows, 100k-row transactions", raw_big, feed_big)
        row(f"{feed_small['rows']:,} rows, 100k-row transactions", raw_small, feed_small)
        row(f"{feed_tx['rows']:,} rows, 10-row transactions, a tick after each", raw_small, feed_tx)
        rows_open, ticks_open = cfg["catchup_in_flight"]
        row(
            f"{feed_flight['rows']:,} rows: one {rows_open:,}-row transaction open while {ticks_open} 10-row "
            "transactions commit, a tick after each",
            raw_small,
            feed_flight,
        )
        add(
            f"| diagnostic: raw ordered scan of the stream's partition with the reader's columns (xid, seq, "
            f"created_at, key, payload), {raw_part['rows']:,} rows | {raw_part['rows_per_s']:.0f} | | | | | "
            f"| {us(raw_part)} | | {raw_part['peak_rss_kib'] / 1024:.0f} MiB |"
        )
        same = feed_big["peak_rss_kib"] <= 1.1 * feed_small["peak_rss_kib"]
        add("")
        add(
            f"Reader peak RSS (VmHWM) at {feed_small['rows']:,} vs {feed_big['rows']:,} rows of backlog: "
            f"{feed_small['peak_rss_kib'] / 1024:.1f} MiB vs {feed_big['peak_rss_kib'] / 1024:.1f} MiB "
            f"(after open: {feed_small['rss_after_open_kib'] / 1024:.1f} / {feed_big['rss_after_open_kib'] / 1024:.1f}"
            f" MiB); target the same, within 10%: {ok(same)}. Loading took "
            + ", ".join(f"{k} {v:.0f}s" for k, v in cu["load_seconds"].items())
            + f" (streams one after the other, the plain table meanwhile; {cu['ticks']} ticks in the database)."
        )
        bad = [r for r in runs if r["rows"] != r["expected"] or r["out_of_order"]]
        add(
            "Every run delivered exactly the expected rows, in order."
            if not bad
            else f"**Wrong deliveries**: {[(r['kind'], r['rows'], r['expected'], r['out_of_order']) for r in bad]}"
        )
        add("")
        for r in runs:
            add(f"- {r['kind']} {r['rows']:,} rows: " + describe_sampler(r["server"], ("bench-reader",)))
        add("")
    return "\n".join(lines)


def render_steps(res: dict[str, Any]) -> str:
    """Per-step reader timings (where time goes)."""
    lines = []
    sections: list[tuple[str, dict[str, Any]]] = []
    if "latency" in res:
        sections.append(("latency reader", res["latency"]["pgfeed"]["reader_steps"]))
        if "pgfeed_fsync_off" in res["latency"]:
            sections.append(("latency reader, server fsync=off", res["latency"]["pgfeed_fsync_off"]["reader_steps"]))
    if "catchup" in res:
        big = res["catchup"]["runs"][1]
        sections.append((f"catch-up reader, {big['rows']:,} rows in {big['seconds']:.1f}s", big["steps"]))
        tx = res["catchup"]["runs"][4]
        sections.append((f"catch-up reader, {tx['rows']:,} rows of 10-row txns in {tx['seconds']:.1f}s", tx["steps"]))
        fl = res["catchup"]["runs"][5]
        sections.append(
            (f"catch-up reader, {fl['rows']:,} rows, a big transaction in flight, in {fl['seconds']:.1f}s", fl["steps"])
        )
    for title, steps in sections:
        lines.append(f"Reader steps, {title}:")
        lines.append("")
        lines.append("| step | calls | total s | mean ms | p50 ms | p99 ms |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name, s in steps.items():
            if s["calls"]:
                lines.append(
                    f"| {name} | {s['calls']} | {s['total_s']:.2f} | {s['mean_ms']:.3f} | {s['p50_ms']:.3f} "
                    f"| {s['p99_ms']:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def code_state() -> dict[str, Any]:
    """The commit measured, and whether pgfeed's files differed from it (others edit the tree)."""
    import subprocess

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "pgfeed", "migrations").splitlines(),
    }


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[tuple[str, str]]:
    """A server DSN: the given one, or a throwaway local server stopped at exit."""
    if dsn:
        yield dsn, "given DSN"
        return
    from pgfeed.testing import LocalServer, find_pg_bin

    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise SystemExit("bench: no PostgreSQL binaries found; pass --dsn")
    local = LocalServer(bin_dir)
    try:
        yield local.start(), f"throwaway local server from {bin_dir}"
    finally:
        local.stop()


@contextlib.contextmanager
def database(server_dsn: str) -> Iterator[str]:
    """A fresh, migrated database, dropped at exit."""
    from pgfeed.migrator import migrate

    name = f"pgfeed_bench_{uuid.uuid4().hex[:8]}"
    with connect(server_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(server_dsn, dbname=name)
    try:
        with connect(dsn) as conn:
            migrate(conn)
        yield dsn
    finally:
        with contextlib.suppress(psycopg.Error), connect(server_dsn) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short runs, smaller backlogs (a smoke test, not numbers)")
    ap.add_argument("--dsn", help="use this server (a database is created and dropped) instead of a throwaway one")
    ap.add_argument(
        "--only", choices=["latency", "throughput", "catchup"], action="append", help="run only these parts"
    )
    ap.add_argument(
        "--latency-sync-commit",
        default="off",
        choices=["on", "off"],
        help="synchronous_commit for the paced latency writers (default off: one connection cannot commit 1000 "
        "durable transactions/s on a disk doing ~300 fsyncs/s)",
    )
    ap.add_argument(
        "--latency-writers", type=int, default=1, help="paced writer processes sharing the 1000/s schedule (default 1)"
    )
    ap.add_argument(
        "--no-diagnostics", action="store_true", help="skip the fsync=off latency diagnostic (never run with --dsn)"
    )
    args = ap.parse_args(argv)
    quiet_logs()
    cfg: dict[str, Any] = {
        "quick": args.quick,
        "latency_rate": 1000.0,
        "latency_seconds": 3.0 if args.quick else 10.0,
        "latency_sync_commit": args.latency_sync_commit,
        "latency_writers": args.latency_writers,
        "diagnostics": not args.no_diagnostics and not args.dsn,
        "throughput_seconds": 2.0 if args.quick else 5.0,
        "writer_counts": [1, 4, 16],
        "catchup_rows": 300_000 if args.quick else 1_000_000,
        "catchup_small_rows": 20_000 if args.quick else 100_000,
        # (rows of the open transaction, 10-row transactions + ticks committed meanwhile)
        "catchup_in_flight": (2_000, 100) if args.quick else (5_000, 200),
    }
    parts = args.only or ["latency", "throughput", "catchup"]
    CTX.set_forkserver_preload(["psycopg", "psycopg_pool", "structlog", "pgfeed"])
    res: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "loadavg_start": os.getloadavg(),
    }
    res["code"] = code_state()
    t_all = time.perf_counter()
    with server(args.dsn) as (server_dsn, source), database(server_dsn) as dsn:
        with connect(dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            res["server_version"] = str(row[0]) if row else "?"
            res["server_settings"] = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                    (["fsync", "synchronous_commit", "wal_sync_method", "shared_buffers", "max_connections"],),
                ).fetchall()
            )
        res["server"] = source
        for part, fn in (("latency", bench_latency), ("throughput", bench_throughput), ("catchup", bench_catchup)):
            if part in parts:
                print(f"[{time.perf_counter() - t_all:6.1f}s] {part} ...", flush=True)
                t = time.perf_counter()
                res[part] = fn(dsn, cfg)
                res[f"{part}_wall_s"] = time.perf_counter() - t
    res["loadavg_end"] = os.getloadavg()
    res["total_wall_s"] = time.perf_counter() - t_all
    text = render(res) + "\n" + render_steps(res)
    print()
    print(text)
    print(f"total {res['total_wall_s']:.0f}s")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    (out_dir / f"bench-{stamp}{'-quick' if args.quick else ''}.md").write_text(text + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
