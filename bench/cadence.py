"""Cadence: what the ticker's ``--interval`` trades, side by side.

The write and latency targets pull the ticker's cadence opposite ways: every
tick costs the server a transaction (and one read per reader process), so a
write-heavy database wants fewer ticks, and a row's latency is at least the
wait for the next tick. For each daemon ``--interval`` (the default 1 ms,
then longer), in one run:

* write: pgbench with 1 and 16 clients, default-mode ``pgfeed.append`` while
  the daemon at that interval and two reader processes follow the stream,
  against the plain INSERT in the same round (as in ``bench.write``), with
  the ticks/s and the server's CPU per transaction;
* latency: commit to consumer at 1,000 rows/s from one writer (as in
  ``bench.latency``), with the daemon at that interval.
"""

from __future__ import annotations

import tempfile
from typing import Any

import psycopg

from bench import harness as h
from bench import latency, write

CLIENTS = (1, 16)
RATE = 1000.0


def run(ctx: h.Ctx) -> h.Section:
    from pgfeed import admin

    cfg, server = ctx.cfg, ctx.server
    sec = h.Section("cadence", "Cadence: the ticker's interval against write cost and latency")
    pgbench_bin = write.require_pgbench(server)
    seconds = max(1, round(cfg.write_seconds))
    intervals = cfg.cadence_intervals
    ratios: dict[tuple[float, int], list[float]] = {}
    live: dict[tuple[float, int], list[dict[str, Any]]] = {}
    lat: dict[float, list[float]] = {}
    lat_ticks: dict[float, list[float]] = {}
    with server.database("cadence") as db, tempfile.TemporaryDirectory(prefix="pgfeed-bench-") as tmp:
        by_key = {s.key: s for s in write.scripts(write.setup(db))}
        plain, appends = by_key["plain"], by_key["ticker_live"]
        files = write.script_files(tmp, [plain, appends])
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            admin.create_stream(conn, "lat_ticker")
        for rnd in range(cfg.cadence_rounds):
            for clients in CLIENTS:
                base, _ = write.pgbench(pgbench_bin, db.dsn, files["plain"], clients, seconds)
                k = rnd % len(intervals)
                for interval in intervals[k:] + intervals[:k]:
                    tx, note = write.live_cell(
                        db, appends, files[appends.key], pgbench_bin, clients, seconds, interval=interval
                    )
                    ratios.setdefault((interval, clients), []).append(tx / base)
                    live.setdefault((interval, clients), []).append(note)
                    ctx.log(
                        f"  round {rnd + 1} {clients:>2} clients interval {interval * 1000:4.0f} ms: {tx / base:.2f}x"
                        f" plain, {note['ticks_per_s']:.0f} ticks/s"
                    )
            for interval in intervals:
                with h.Procs() as procs:
                    daemon = h.start_daemon(procs, db.dsn, interval=interval)
                    r = latency.one_run(db, "ticker", RATE, 1, cfg.latency_seconds, 0.5 if not cfg.quick else 0.3)
                    procs.stop(daemon)
                lat.setdefault(interval, []).extend(r["lat_ms"])
                lat_ticks.setdefault(interval, []).append(r["ticks_per_s"])
                ctx.log(
                    f"  round {rnd + 1} latency interval {interval * 1000:4.0f} ms: p50 {h.pct(r['lat_ms'], 50):.2f} ms"
                    f" p99 {h.pct(r['lat_ms'], 99):.2f} ms"
                )
    rows = []
    data: dict[str, Any] = {}
    for interval in intervals:
        row = [f"{interval * 1000:g} ms{' (default)' if interval == 0.001 else ''}"]
        for clients in CLIENTS:
            row.append(write.ratio_cell(ratios[interval, clients]))
        one = live[interval, 1]
        row.append(h.fmt(h.median([n["ticks_per_s"] for n in one])))
        cpu = [n["server_cpu_s"] / n["rows"] * 1e6 for n in one if n["server_cpu_s"] is not None and n["rows"]]
        row.append(h.fmt(h.median(cpu)) if cpu else "n/a")
        row += [h.fmt(h.pct(lat[interval], 50), 2), h.fmt(h.pct(lat[interval], 99), 2)]
        row.append(h.fmt(h.median(lat_ticks[interval])))
        rows.append(row)
        data[f"{interval * 1000:g}ms"] = {
            "ratio_1": ratios[interval, 1],
            "ratio_16": ratios[interval, 16],
            "live_1": one,
            "live_16": live[interval, 16],
            "lat_p50_ms": h.pct(lat[interval], 50),
            "lat_p99_ms": h.pct(lat[interval], 99),
            "lat_ticks_per_s": lat_ticks[interval],
        }
    sec.table(
        [
            "daemon --interval",
            "write, 1 client, vs plain",
            "write, 16 clients, vs plain",
            "ticks/s, 1 client",
            "server CPU us/tx, 1 client",
            "latency p50 ms at 1,000 rows/s",
            "p99 ms",
            "ticks/s at 1,000 rows/s",
        ],
        rows,
    )
    sec.note(
        f"{cfg.cadence_rounds} round(s); write cells of {seconds} s with the daemon and 2 reader processes live, each "
        "against the plain INSERT of its round, median (min-max); latency over "
        f"{cfg.latency_seconds:g} s per round and interval, percentiles over all rounds' rows. Goals: write >= 0.9x "
        "at 1 client and >= 0.85x at 16; latency p50 <= 1 ms and p99 <= 5 ms."
    )
    sec.data = data
    return sec
