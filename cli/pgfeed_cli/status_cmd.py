"""``pgfeed status`` and ``pgfeed check``: parse, call :mod:`pgfeed.status`, print.

What is healthy and how it reads is decided in :mod:`pgfeed.core.health`.
Unhealthy is exit 1 with one line on stderr (``pgfeed: error: unhealthy:
...``), after the report: scripts and probes read the exit code.
"""

from __future__ import annotations

import json as jsonlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import click

from pgfeed import connect
from pgfeed import status as status_lib
from pgfeed.core import health
from pgfeed.core.durations import parse_duration
from pgfeed.core.names import check_stream_name
from pgfeed.errors import ConnectError, PgfeedError, UsageError

#: Clears a terminal before each --watch report.
CLEAR = "\x1b[H\x1b[2J"


def _seconds(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None
    return seconds


def _streams(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> list[str]:
    try:
        return [check_stream_name(v) for v in value]
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


def _max_lag(ctx: click.Context, param: click.Parameter, value: Sequence[str]) -> tuple[float, dict[str, float]]:
    try:
        return health.parse_max_lag(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


def threshold_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The thresholds ``status`` and ``check`` share."""
    for decorator in reversed(
        [
            click.option(
                "--max-lag",
                multiple=True,
                metavar="[CONSUMER=]DURATION",
                callback=_max_lag,
                help="A consumer further behind than this is stalled (default 5m); CONSUMER=DURATION sets one "
                "consumer's (repeatable).",
            ),
            click.option(
                "--max-tick-age",
                default="30s",
                metavar="DURATION",
                show_default=True,
                callback=_seconds,
                help="Committed rows waiting longer than this for a tick mean the ticker is dead or stuck.",
            ),
            click.option(
                "--seen-within",
                default="60s",
                metavar="DURATION",
                show_default=True,
                callback=_seconds,
                help="A consumer that moved or sent a heartbeat this recently is live.",
            ),
        ]
    ):
        f = decorator(f)
    return f


def _thresholds(
    max_lag: tuple[float, dict[str, float]], max_tick_age: float, seen_within: float, long_xact: float = 30.0
) -> health.Thresholds:
    return health.Thresholds(
        max_lag=max_lag[0],
        lag_overrides=max_lag[1],
        max_tick_age=max_tick_age,
        seen_within=seen_within,
        long_xact=long_xact,
    )


@click.command("status")
@click.argument("streams", nargs=-1, metavar="[STREAM]...", callback=_streams)
@click.option("--json", is_flag=True, help="The complete report as JSON (with --watch: one object per line).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Report again every SECONDS until Ctrl-C (exit 0).",
)
@click.option("--check", is_flag=True, help="Only the one-line verdict of `pgfeed check`.")
@threshold_options
@click.option(
    "--long-xact",
    default="30s",
    metavar="DURATION",
    show_default=True,
    callback=_seconds,
    help="Name open transactions older than this (writers holding rows, the xmin horizon).",
)
@click.pass_obj
def status_cmd(
    obj: Any,
    streams: list[str],
    json: bool,
    watch: float | None,
    check: bool,
    max_lag: tuple[float, dict[str, float]],
    max_tick_age: float,
    seen_within: float,
    long_xact: float,
) -> None:
    """Ticker, streams, consumers, live readers, and who holds what back.

    Per stream: rows, size on disk, rows/s over the last minute, head, notify
    mode, payload limit, rows waiting for a tick, oldest row kept, captures,
    open transactions that wrote to it. Per saved consumer of every role:
    position, lag in rows and seconds, last seen, state (live, idle,
    stalled, reset pending, gone). Needs the schema owner or a role granted
    pg_monitor. Exit 1 with one line when the ticker is dead or stuck while
    rows wait, or a consumer is past --max-lag.
    """
    thresholds = _thresholds(max_lag, max_tick_age, seen_within, long_xact)
    if check:
        _run_check(obj, thresholds, streams or None)
        return
    if watch is None:
        with obj.conn("reading pgfeed's status") as conn:
            st = status_lib.gather(conn, streams or None, thresholds)
        _known_consumers(thresholds, st, streams)
        _print(st, thresholds, json, watching=False)
        found = health.problems(st, thresholds)
        if found:
            raise PgfeedError("unhealthy: " + health.one_line(found))
        return
    _watch(obj, streams or None, thresholds, json, watch)


class _UnknownConsumer(click.ClickException):
    """A usage error found once the database answered: one line, exit 2 (no --help hint: it names what exists)."""

    exit_code = 2


def _known_consumers(thresholds: health.Thresholds, st: health.Status, streams: Sequence[str] | None) -> None:
    """Exit 2 when --max-lag names a consumer the report does not have."""
    try:
        health.check_lag_overrides(thresholds, (c.consumer for c in st.consumers), some_streams=bool(streams))
    except UsageError as exc:
        raise _UnknownConsumer(str(exc)) from None


def _print(st: health.Status, thresholds: health.Thresholds, as_json: bool, *, watching: bool) -> None:
    if as_json:
        doc = health.to_json(st, thresholds)
        click.echo(jsonlib.dumps(doc, separators=(",", ":")) if watching else jsonlib.dumps(doc, indent=2))
        return
    text = health.format_text(st, thresholds)
    found = health.problems(st, thresholds)
    if watching:
        text += "\n" + ("healthy" if not found else "UNHEALTHY: " + health.one_line(found))
        if sys.stdout.isatty():
            text = CLEAR + text
        else:
            text += "\n"
    click.echo(text)


def _watch(obj: Any, streams: list[str] | None, thresholds: health.Thresholds, as_json: bool, every: float) -> None:
    """Report every ``every`` seconds until SIGINT/SIGTERM; a lost connection
    is reported and retried, never the end."""
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        conn = None
        checked = False
        while not stop.is_set():
            try:
                if conn is None:
                    conn = connect.connect(obj.conninfo, doing="reading pgfeed's status")
                st = status_lib.gather(conn, streams, thresholds)
                if not checked:
                    _known_consumers(thresholds, st, streams)
                    checked = True
                _print(st, thresholds, as_json, watching=True)
            except ConnectError as exc:
                click.echo(f"pgfeed: {exc}; retrying in {every:g}s", err=True)
                if conn is not None:
                    conn.close()
                conn = None
            sys.stdout.flush()
            stop.wait(every)
        if conn is not None:
            conn.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_check(obj: Any, thresholds: health.Thresholds, streams: list[str] | None = None) -> None:
    with obj.conn("checking pgfeed") as conn:
        result = status_lib.check(conn, thresholds, streams)
    if result.status is not None:
        _known_consumers(thresholds, result.status, streams)
    if result.problems:
        raise PgfeedError("unhealthy: " + health.one_line(result.problems))
    assert result.status is not None
    click.echo(health.check_summary(result.status))


@click.command("check")
@threshold_options
@click.pass_obj
def check_cmd(obj: Any, max_lag: tuple[float, dict[str, float]], max_tick_age: float, seen_within: float) -> None:
    """One line and an exit code, for liveness and readiness probes.

    Exit 0 ("ok: ...") when the database answers, its schema is at this
    pgfeed's version, a ticker holds the lease and no consumer is past
    --max-lag; else exit 1 with one line saying why.
    """
    _run_check(obj, _thresholds(max_lag, max_tick_age, seen_within))
