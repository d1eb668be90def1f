"""Latency from commit to a consumer in another process.

Paced writers commit one-row transactions on a fixed schedule (1,000 rows/s
from one writer; 10,000 rows/s from 16), each one autocommit statement, and
note ``time.monotonic_ns()`` when the statement has returned (the commit is
then durable: ``synchronous_commit = on``, fsync on). The consumer notes the
same clock when the row reaches it. p50/p99 of the difference, the first
half second of each run left out. Three ways, interleaved in each round:

* ``raw``: ``INSERT`` into a plain table and ``pg_notify(channel, n)`` in one
  statement, received by a psycopg ``LISTEN`` connection (what a hand-made
  outbox with NOTIFY gets);
* ``ticker`` (the default notify mode): ``pgfeed.append``; ``pgfeed daemon``
  ticks, an ``AsyncReader`` (default options) delivers;
* ``immediate``: the same on a stream whose writers wake the ticker.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg import sql

from bench import harness as h

KINDS = ("raw", "ticker", "immediate")
CHANNEL = "bench_raw"


def raw_listener(dsn: str, channel: str, ready: Any, stop: Any, delivered: Any) -> dict[str, Any]:
    """LISTEN on ``channel``; when each notification n arrived."""
    recv: dict[int, int] = {}

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        ready.set()
        while not stop.is_set():
            async for note in conn.notifies(timeout=0.1):
                recv[int(note.payload)] = time.monotonic_ns()
                delivered.value += 1
        await conn.close()

    asyncio.run(run())
    return {"recv": recv, "rows": len(recv)}


def one_run(db: Any, kind: str, rate: float, writers: int, seconds: float, warmup: float) -> dict[str, Any]:
    with h.Procs() as procs:
        if kind == "raw":
            ready, stop, delivered = h.CTX.Event(), h.CTX.Event(), h.CTX.Value("q", 0, lock=False)
            child = procs.start("listener", raw_listener, db.dsn, CHANNEL, ready, stop, delivered)
            if not ready.wait(30):
                procs.result(child, 5)
            consumer = h.ReaderHandle(child, ready, stop, delivered)
            w = h.run_writers(procs, db.dsn, "notify", CHANNEL, rate, seconds, writers)
            before = after = None
        else:
            (consumer,) = h.start_readers(procs, db.dsn, f"lat_{kind}", 1, times=True)
            before = h.counters(db)
            w = h.run_writers(procs, db.dsn, "append", f"lat_{kind}", rate, seconds, writers)
            after = h.counters(db)
        h.drain_readers([consumer], w["count"], 15)
        (got,) = h.stop_readers(procs, [consumer])
    recv, commits, t0 = got["recv"], w["commits"], w["t0"]
    keep = [n for n, c in commits.items() if c - t0 >= warmup * 1e9]
    lat = [(recv[n] - commits[n]) / 1e6 for n in keep if n in recv]
    # Ticks/s while the writers ran (their connect pause included: no ticks then).
    ticks = None if before is None or after is None else h.rates(before, after).ticks_per_s
    return {
        "written": w["count"],
        "delivered": len(recv),
        "rate": w["achieved_rate"],
        "lat_ms": lat,
        "ticks_per_s": ticks,
    }


def run(ctx: h.Ctx) -> h.Section:
    from pgfeed import admin

    cfg = ctx.cfg
    sec = h.Section("latency", "Latency, commit to consumer in another process")
    results: dict[tuple[float, int, str], list[dict[str, Any]]] = {}
    with ctx.server.database("latency") as db:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
            admin.create_stream(conn, "lat_ticker")
            admin.create_stream(conn, "lat_immediate", notify_mode="immediate")
        with h.Procs() as procs:
            daemon = h.start_daemon(procs, db.dsn)
            for rnd in range(cfg.latency_rounds):
                for rate, writers in cfg.latency_cases:
                    order = KINDS[rnd % 3 :] + KINDS[: rnd % 3]
                    for kind in order:
                        r = one_run(db, kind, rate, writers, cfg.latency_seconds, 0.5 if not cfg.quick else 0.3)
                        results.setdefault((rate, writers, kind), []).append(r)
                        ctx.log(
                            f"  round {rnd + 1} {rate:>6.0f}/s x{writers:<2} {kind:9} p50 {h.pct(r['lat_ms'], 50):6.2f}"
                            f" ms p99 {h.pct(r['lat_ms'], 99):6.2f} ms, writer {r['rate']:6.0f}/s,"
                            f" delivered {r['delivered']}/{r['written']}"
                        )
            procs.stop(daemon)
    rows = []
    summary: dict[str, Any] = {}
    for rate, writers in cfg.latency_cases:
        raw_p50 = h.pct([x for r in results[rate, writers, "raw"] for x in r["lat_ms"]], 50)
        for kind in KINDS:
            runs = results[rate, writers, kind]
            lat = [x for r in runs for x in r["lat_ms"]]
            written = sum(r["written"] for r in runs)
            delivered = sum(r["delivered"] for r in runs)
            p50, p99 = h.pct(lat, 50), h.pct(lat, 99)
            summary[f"{rate:.0f}/{writers}/{kind}"] = {"p50_ms": p50, "p99_ms": p99, "runs": len(runs)}
            rows.append(
                [
                    f"{rate:,.0f} rows/s, {writers} writer{'s' if writers > 1 else ''}",
                    label(kind),
                    "/".join(h.fmt(r["rate"]) for r in runs),
                    f"{delivered:,}/{written:,}",
                    h.fmt(p50, 2),
                    h.fmt(p99, 2),
                    h.fmt(max(lat) if lat else None, 1),
                    # Below 0.05 ms the raw p50 is the clocks' resolution, not a latency to divide by.
                    "1" if kind == "raw" else f"{p50 / raw_p50:.1f}x" if raw_p50 >= 0.05 else "n/a",
                ]
            )
        ticker = [x for r in results[rate, writers, "ticker"] for x in r["lat_ms"]]
        goals = (1.0, 5.0) if writers == 1 else (2.0, 10.0)
        for q, goal in zip((50, 99), goals, strict=True):
            m = h.pct(ticker, q)
            sec.targets.append(
                h.Target(
                    f"latency p{q}, default mode, {rate:,.0f} rows/s from {writers} writer{'s' if writers > 1 else ''}",
                    f"{m:.2f} ms",
                    f"<= {goal:g} ms",
                    m <= goal,
                )
            )
    sec.table(
        ["load", "path", "writer rows/s achieved", "delivered", "p50 ms", "p99 ms", "max ms", "p50 vs raw"],
        rows,
        align=["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"],
    )
    sec.note(
        f"{cfg.latency_rounds} round(s) of {cfg.latency_seconds:g} s per path and load, interleaved; percentiles over "
        "all rounds' rows. Writers and consumer are separate processes; the daemon ticks (a check every 1 ms while "
        "rows arrive; between them it waits in the server, which checks every 1 ms). A negative raw p50: the "
        "consumer stamped the row before the writer process stamped its commit."
    )
    sec.data = summary
    return sec


def label(kind: str) -> str:
    return {
        "raw": "raw: INSERT + NOTIFY -> LISTEN",
        "ticker": "pgfeed default mode (daemon ticks)",
        "immediate": "pgfeed immediate mode",
    }[kind]
