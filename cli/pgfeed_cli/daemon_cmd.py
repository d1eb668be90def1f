"""``pgfeed daemon``: parse, then hand over to :func:`pgfeed.daemon.run_daemon`."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pgfeed.core.durations import parse_duration
from pgfeed.daemon import DaemonOptions, run_daemon
from pgfeed.errors import UsageError


def _duration(what: str, text: str, *, allow_off: bool = False) -> float | None:
    if allow_off and text.strip().lower() in ("off", "none", "0"):
        return None
    try:
        value = parse_duration(text)
    except (UsageError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None
    if value <= 0:
        raise click.BadParameter(f"{text!r} is not a positive duration", param_hint=what)
    return value


@click.command("daemon")
@click.option(
    "--lease", default="10s", show_default=True, help="How long a dead leader keeps the lease (failover bound)."
)
@click.option(
    "--interval",
    default="1ms",
    show_default=True,
    help="Tick check cadence while rows keep arriving: longer means fewer ticks under heavy writes (less work "
    "for the database per row) and more latency.",
)
@click.option("--idle-interval", default="50ms", show_default=True, help="Longest wait in the server for a change.")
@click.option(
    "--retention", default="7d", show_default=True, help="Keep events and ticks this long ('off': keep everything)."
)
@click.option(
    "--prune-consumers", is_flag=True, help="Let retention pass saved consumer positions (they reset instead)."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on http://ADDR:PORT/metrics (0: any free port).",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",  # noqa: S104  # scraped from other hosts, like any exporter
    show_default=True,
    help="The address the metrics server listens on.",
)
@click.option(
    "--metrics-timeout", default="5s", show_default=True, help="How long a scrape may spend reading the database."
)
@click.pass_obj
def daemon_cmd(
    obj: Any,
    lease: str,
    interval: str,
    idle_interval: str,
    retention: str,
    prune_consumers: bool,
    metrics_port: int | None,
    metrics_addr: str,
    metrics_timeout: str,
) -> None:
    """Run the database's ticker (and retention) until SIGTERM/SIGINT.

    Run one or more per database: exactly one ticks, another takes over within
    --lease when it dies. Readers then never write and writers never NOTIFY.
    Logs go to stderr (human on a terminal, JSON otherwise). --metrics-port
    serves its ticker's metrics and the database's status (lag, backlog, open
    writers; its role needs pg_monitor for those), see docs/operating.md.
    """
    options = DaemonOptions(
        lease=_duration("--lease", lease) or 10.0,
        interval=_duration("--interval", interval) or 0.001,
        idle_interval=_duration("--idle-interval", idle_interval) or 0.05,
        retention=_duration("--retention", retention, allow_off=True),
        prune_consumers=prune_consumers,
        metrics_port=metrics_port,
        metrics_addr=metrics_addr,
        metrics_timeout=_duration("--metrics-timeout", metrics_timeout) or 5.0,
    )
    if options.idle_interval < options.interval:
        raise click.BadParameter("must not be shorter than --interval", param_hint="--idle-interval")
    asyncio.run(run_daemon(obj.conninfo, options))
