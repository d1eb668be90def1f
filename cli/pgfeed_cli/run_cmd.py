"""``pgfeed run``: parse, load the handler, hand over to :func:`pgfeed.run.run_consumer`."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from pgfeed.core.cursor import check_spec
from pgfeed.core.durations import parse_duration
from pgfeed.core.names import check_stream_name
from pgfeed.errors import HandlerNotFound, UsageError
from pgfeed.run import RunOptions, load_handler, run_consumer


def _checked(parse: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return parse(value)
        except UsageError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _interval(text: str) -> float:
    if text.strip().lower() in ("0", "off", "none"):
        return 0.0
    seconds = parse_duration(text)
    if seconds <= 0:
        raise UsageError(f"{text!r} is not a positive duration")
    return seconds


def _consumer(name: str) -> str:
    if not name or len(name) > 200:
        raise UsageError(f"invalid consumer name {name!r}: expected 1-200 characters")
    return name


@click.command("run")
@click.argument("handler", metavar="MODULE:FUNCTION")
@click.option("--stream", required=True, callback=_checked(check_stream_name), help="The stream to consume.")
@click.option(
    "--consumer",
    required=True,
    callback=_checked(_consumer),
    help="The consumer name its position is saved under (pgfeed.positions, per role).",
)
@click.option(
    "--since",
    default="earliest",
    show_default=True,
    callback=_checked(check_spec),
    help="Where to start while the consumer has no saved position: earliest, now, or a token.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Rows per batch at most."
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Call a failing handler again with the same batch this often (with backoff), then stop, exit 1.",
)
@click.option(
    "--save-interval",
    default="1s",
    show_default=True,
    callback=_checked(_interval),
    help="Save the delivered position this often (after a SIGKILL up to this much comes again).",
)
@click.option(
    "--heartbeat",
    default="10s",
    show_default=True,
    callback=_checked(_interval),
    help="Send a consumer heartbeat this often (0: none); see `pgfeed status`.",
)
@click.pass_obj
def run_cmd(
    obj: Any,
    handler: str,
    stream: str,
    consumer: str,
    since: str,
    batch_size: int,
    retries: int,
    save_interval: float,
    heartbeat: float,
) -> None:
    """Run a handler as a consumer of a stream until SIGTERM/SIGINT.

    MODULE:FUNCTION is imported (the current directory is importable) and
    called with every batch (a pgfeed.Batch: iterate it for rows) in order,
    one at a time; async def handlers are awaited, others run on a thread.
    A batch counts as delivered only once the handler returned; a handler
    that raises gets the same batch again with backoff, --retries times,
    then the command stops with one line and exit 1, its position before
    that batch. SIGTERM: the batch in hand is finished and saved, exit 0.
    The position is saved every --save-interval: after a crash the rows
    handled since come again, so make the handler idempotent.
    """
    try:
        fn = load_handler(handler)
    except HandlerNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="'MODULE:FUNCTION'") from None
    if save_interval <= 0:
        raise click.BadParameter("must be a positive duration", param_hint="'--save-interval'")
    options = RunOptions(
        stream=stream,
        consumer=consumer,
        since=since,
        batch_size=batch_size,
        retries=retries,
        save_interval=save_interval,
        heartbeat=heartbeat,
        handler_name=f"handler {handler}",
    )
    asyncio.run(run_consumer(obj.conninfo, fn, options))


__all__ = ["run_cmd"]
