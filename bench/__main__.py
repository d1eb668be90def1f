"""``python -m bench [--quick] [--only NAME ...] [--split-cpus] [--dsn DSN]``: run the benchmarks.

It prints a Markdown report and writes it to ``bench/results/latest.md`` for
a full run of every benchmark, ``latest-quick.md`` for ``--quick`` and
``latest-partial.md`` for ``--only`` (with a JSON file of the raw figures
beside each); ``--split-cpus`` adds ``-split`` to the name. The exit status
is non-zero only when a benchmark failed to run, never because of a number:
the machine is shared, so figures are for reading, not for gating.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import harness as h
from bench.servers import bench_server

NAMES = ("write", "tickcost", "latency", "cadence", "fanout", "idle", "ticks", "catchup")
HERE = Path(__file__).resolve().parent


def code_state() -> str:
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "pgfeed")
    return commit + (" (with uncommitted changes to pgfeed/)" if dirty else "")


def render(server: Any, cfg: h.Config, sections: list[h.Section], errors: dict[str, str], started: str) -> str:
    out = [
        f"# pgfeed benchmark{' (--quick: a smoke run, not for reporting)' if cfg.quick else ''}",
        "",
        f"{started}; PostgreSQL {server.version} ({server.source}); "
        f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
        f"load average at the end {h.load_avg()}.",
        "",
        *split_line(),
        "Server: " + ", ".join(f"{k}={v}" for k, v in sorted(server.settings.items()) if v != "") + ".",
        "",
    ]
    targets = [t for s in sections for t in s.targets]
    if targets:
        out += ["## Targets", "", "| target | measured | goal | met |", "|---|---:|---|---|"]
        for t in targets:
            met = "reported" if t.met is None else ("yes" if t.met else "**no**")
            out.append(f"| {t.what} | {t.measured} | {t.target} | {met} |")
        out.append("")
    for s in sections:
        out += [f"## {s.title}", "", *s.lines, f"({s.seconds:.0f} s)", ""]
    for name, err in errors.items():
        out += [f"## {name}: FAILED", "", "```", err.strip(), "```", ""]
    return "\n".join(out)


def split_line() -> list[str]:
    if h.SPLIT is None:
        return []
    db, app = (",".join(map(str, sorted(c))) for c in h.SPLIT)
    return [
        f"**CPUs split** (`--split-cpus`): the server, pgbench and the paced writers on CPUs {{{db}}}; pgfeed's "
        f"daemon, readers and listeners on CPUs {{{app}}}, as if they ran on an application host. Every cell, plain "
        "ones included, runs that way.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes, well under a minute (the CI smoke run)")
    ap.add_argument(
        "--only", action="append", choices=NAMES, metavar="NAME", help=f"run only NAME ({', '.join(NAMES)})"
    )
    ap.add_argument(
        "--dsn", help="benchmark this server (databases are created and dropped) instead of a throwaway one"
    )
    ap.add_argument(
        "--split-cpus",
        action="store_true",
        help="run the server and the writers on half the CPUs and pgfeed's daemon and readers on the other half",
    )
    args = ap.parse_args(argv)
    if args.split_cpus:
        if args.dsn:
            ap.error("--split-cpus pins the server's processes: it needs the throwaway server, not --dsn")
        h.SPLIT = h.split_cpus()
    cfg = h.Config.make(args.quick)
    names = [n for n in NAMES if not args.only or n in args.only]
    h.CTX.set_forkserver_preload(h.PRELOAD)
    # The tree as it was when the processes loaded it (others may commit meanwhile).
    started = f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {code_state()}"
    t_all = time.monotonic()
    sections: list[h.Section] = []
    errors: dict[str, str] = {}
    with bench_server(args.dsn) as server:
        print(f"bench: PostgreSQL {server.version}, {server.source}; load average {h.load_avg()}", flush=True)
        if h.SPLIT is not None:
            print(f"bench: pinned {h.pin_server(server.dsn)} server processes to CPUs {sorted(h.SPLIT[0])}", flush=True)
            h.pin(os.getpid(), "app")
        ctx = h.Ctx(server, cfg, h.log_to_stdout)
        for name in names:
            print(f"[{time.monotonic() - t_all:5.0f}s] {name} ...", flush=True)
            module = importlib.import_module(f"bench.{name}")
            t = time.monotonic()
            try:
                section = module.run(ctx)
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"bench: {name} failed:\n{errors[name]}", file=sys.stderr, flush=True)
                continue
            section.seconds = time.monotonic() - t
            sections.append(section)
        text = render(server, cfg, sections, errors, started)
    print()
    print(text)
    print(f"total {time.monotonic() - t_all:.0f} s")
    stem = "latest-quick" if cfg.quick else ("latest-partial" if args.only else "latest")
    stem += "-split" if h.SPLIT is not None else ""
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    (out_dir / f"{stem}.json").write_text(h.dumps({s.name: s.data for s in sections}) + "\n")
    print(f"wrote bench/results/{stem}.md")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
