"""The ``pgfeed`` command: parse, call the library, format. Nothing else."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg

from pgfeed import admin, connect, migrator
from pgfeed.core.names import (
    STREAM_NAME_RULE,
    check_stream_name,
    format_qualified_table,
    parse_column_list,
    parse_qualified_table,
    quote_name,
)
from pgfeed.errors import PgfeedError, StreamExists, UsageError, translate
from pgfeed.reader import AsyncReader, Row
from pgfeed.writer import append, append_many
from pgfeed_cli import logs

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What the global options decided; opens connections on demand."""

    def __init__(self, dsn: str | None, debug: bool) -> None:
        self.dsn_option = dsn
        self.debug = debug
        self._target: connect.Target | None = None

    @property
    def conninfo(self) -> str:
        if self._target is None:
            self._target = connect.resolve(self.dsn_option)
        return self._target.conninfo

    @contextmanager
    def conn(self, doing: str) -> Iterator[psycopg.Connection[Any]]:
        c = connect.connect(self.conninfo, doing=doing)
        try:
            yield c
        finally:
            c.close()


def fail(message: str, code: int = 1) -> None:
    click.echo(f"pgfeed: error: {message}", err=True)
    sys.exit(code)


def user_errors(fn: F) -> F:
    """One line and a non-zero exit for anything the user can fix; a traceback only with --debug."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_object(Context) and ctx.find_object(Context).debug)  # type: ignore[union-attr]
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            if debug:
                raise
            fail(str(exc), 2)
        except PgfeedError as exc:
            if debug:
                raise
            fail(str(exc))
        except psycopg.Error as exc:
            if debug:
                raise
            fail(str(translate(exc, ctx.command_path)))

    return wrapper  # type: ignore[return-value]


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "PGFEED"})
@click.option("--dsn", metavar="DSN", help="PostgreSQL connection string (default: $PGFEED_DSN, libpq env, embedded).")
@click.option("-v", "--verbose", count=True, help="Log what happens (to stderr).")
@click.option("--debug", is_flag=True, help="Debug logs, and tracebacks on errors.")
@click.version_option(package_name="pgfeed")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None, verbose: int, debug: bool) -> None:
    """pgfeed: a gap-free, ordered change feed on PostgreSQL."""
    logs.configure(bool(verbose), debug)
    ctx.obj = Context(dsn, debug)


# -- migrate --------------------------------------------------------------
@cli.group(invoke_without_command=True)
@click.option("--dry-run", is_flag=True, help="Print the SQL that would run; change nothing.")
@click.option("--status", "show_status", is_flag=True, help="List applied and pending versions.")
@click.pass_context
@user_errors
def migrate(ctx: click.Context, dry_run: bool, show_status: bool) -> None:
    """Install or upgrade the pgfeed schema (safe to run concurrently)."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Context = ctx.obj
    if show_status:
        _print_status(obj)
        return
    if dry_run:
        with obj.conn("planning the migration") as conn:
            st = migrator.status(conn)
        if not st.pending:
            click.echo("-- nothing to apply: the schema is up to date")
        if st.pending and not st.installed:
            click.echo(f"-- version table (in the first file's transaction)\n{migrator.BOOTSTRAP_SQL.strip()};")
        for m in st.pending:
            click.echo(f"-- {m.version:04d}_{m.name}.sql\n{m.sql}")
        return
    with obj.conn("migrating") as conn:
        done = migrator.migrate(conn)
    for m in done:  # nothing at all when up to date: a rerun is a quiet no-op (-v logs it)
        click.echo(f"applied {m.version:04d}_{m.name}")


@migrate.command("status")
@pass_ctx
@user_errors
def migrate_status(obj: Context) -> None:
    """List applied and pending versions."""
    _print_status(obj)


def _print_status(obj: Context) -> None:
    with obj.conn("reading the schema version") as conn:
        st = migrator.status(conn)
    for version, name, applied_at in st.applied:
        click.echo(f"applied  {version:04d}_{name}  {applied_at}")
    for m in st.pending:
        click.echo(f"pending  {m.version:04d}_{m.name}")


# -- streams ---------------------------------------------------------------
@cli.group()
def stream() -> None:
    """Create, list and drop streams."""


@stream.command("create")
@click.argument("name")
@click.option(
    "--max-payload-bytes",
    type=click.IntRange(min=1, max=admin.MAX_MAX_PAYLOAD),
    default=admin.DEFAULT_MAX_PAYLOAD,
    show_default=True,
    help="Refuse payloads larger than this (pg_column_size of the jsonb value).",
)
@click.option(
    "--notify",
    "notify_mode",
    type=click.Choice(admin.NOTIFY_MODES),
    default="immediate",
    show_default=True,
    help="immediate: NOTIFY at each commit; poll: readers rely on polling (no NOTIFY on the write path).",
)
@pass_ctx
@user_errors
def stream_create(obj: Context, name: str, max_payload_bytes: int, notify_mode: str) -> None:
    """Create stream NAME."""
    check_stream_name(name)
    with obj.conn("creating a stream") as conn:
        try:
            admin.create_stream(conn, name, max_payload_bytes=max_payload_bytes, notify_mode=notify_mode)  # type: ignore[arg-type]
        except StreamExists as exc:
            click.echo(f"pgfeed: {exc}", err=True)
            return
    click.echo(f"created stream {name}")


@stream.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@pass_ctx
@user_errors
def stream_list(obj: Context, as_json: bool) -> None:
    """List streams: name, rows, head position, notify mode."""
    with obj.conn("listing streams") as conn:
        infos = admin.list_streams(conn)
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    header = ("NAME", "ROWS", "HEAD", "NOTIFY", "MAX_PAYLOAD", "LAST_APPEND")
    lines = [header] + [
        (i.name, str(i.rows), i.head, i.notify_mode, str(i.max_payload_bytes), i.last_append or "-") for i in infos
    ]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


@stream.command("drop")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Really drop the stream and all its rows.")
@pass_ctx
@user_errors
def stream_drop(obj: Context, name: str, yes: bool) -> None:
    """Drop stream NAME, all its rows and its table captures (needs --yes)."""
    check_stream_name(name)
    if not yes:
        raise UsageError(f"dropping stream {name!r} deletes all its rows: repeat with --yes to confirm")
    with obj.conn("dropping a stream") as conn:
        uncaptured = admin.drop_stream(conn, name)
    click.echo(f"dropped stream {name}")
    for table in uncaptured:
        click.echo(f"removed capture of {table} into {name}")


# -- append ------------------------------------------------------------------
@cli.command("append")
@click.argument("stream_name", metavar="STREAM")
@click.argument("payload", metavar="JSON|-")
@click.option("--key", default=None, help="Optional key stored with the row (with -: with every row).")
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With -: lines per transaction.",
)
@pass_ctx
@user_errors
def append_cmd(obj: Context, stream_name: str, payload: str, key: str | None, batch_size: int) -> None:
    """Append one JSON value to STREAM, or JSON lines from stdin with -.

    A payload is any JSON value: object, array, string, number, true, false or
    null (NaN and Infinity are not JSON). The server refuses payloads larger
    than the stream's limit (stream create --max-payload-bytes). Put -- before
    a value that starts with a dash: pgfeed append STREAM -- -1.

    With -, stdin holds one JSON value per line (UTF-8; blank lines are
    skipped but counted). Lines are appended in order, in transactions of
    --batch lines each (default 1: one transaction per line). At the first
    line that is not valid JSON or that the server refuses, the command stops
    with an error naming that line and exits non-zero: every transaction
    committed before that line's transaction stays committed (the error says
    how many rows), nothing of that line's transaction is written (neither
    the line nor the lines before it in the same batch), and no later line is
    read. If the connection is lost during a COMMIT, the error says that
    transaction may or may not be committed.
    """
    check_stream_name(stream_name)
    with obj.conn("appending") as conn:
        admin.stream_id(conn, stream_name)  # an unknown stream fails before stdin is read
        if payload != "-":
            value = _parse_json(payload, "the JSON argument")
            with conn.transaction():
                seq = append(conn, stream_name, value, key)
            click.echo(f"appended seq {seq}")
            return
        lines = _LineAppender(conn, stream_name, key, batch_size)
        for lineno, raw in enumerate(sys.stdin.buffer, start=1):
            lines.add(lineno, raw)
        lines.flush()
        click.echo(f"appended {lines.committed} rows")


class _LineAppender:
    """``pgfeed append STREAM -``: JSON lines committed in batches (see its --help)."""

    def __init__(self, conn: psycopg.Connection[Any], stream: str, key: str | None, batch_size: int) -> None:
        self.conn = conn
        self.stream = stream
        self.key = key
        self.batch_size = batch_size
        self.committed = 0
        self.pending: list[tuple[int, Any]] = []

    def add(self, lineno: int, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise self._stopped(UsageError(f"line {lineno} is not UTF-8 (byte {exc.start + 1})"), lineno) from None
        if not text.strip():
            return
        try:
            value = _parse_json(text, f"line {lineno}")
        except UsageError as exc:
            raise self._stopped(exc, lineno) from None
        self.pending.append((lineno, value))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        first, last = self.pending[0][0], self.pending[-1][0]
        where = f"line {first}" if first == last else f"lines {first}-{last}"
        values = [v for _, v in self.pending]
        try:
            with self.conn.transaction():
                if len(values) == 1:
                    append(self.conn, self.stream, values[0], self.key)
                else:
                    keys = None if self.key is None else [self.key] * len(values)
                    append_many(self.conn, self.stream, values, keys)
        except PgfeedError as exc:
            raise self._stopped(type(exc)(f"{where}: {exc}"), last) from None
        except psycopg.Error as exc:  # the COMMIT itself failed: its outcome is unknown
            err = translate(exc, f"committing {where}")
            raise type(err)(
                f"{err} ({self.committed} rows committed before line {first}; {where} may or may not be committed)"
            ) from None
        self.committed += len(values)
        self.pending.clear()

    def _stopped(self, exc: PgfeedError, lineno: int) -> PgfeedError:
        first = self.pending[0][0] if self.pending else lineno
        return type(exc)(
            f"{exc} ({self.committed} rows committed before line {first}; nothing from line {first} on was written)"
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid JSON on {where}: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        raise UsageError(f"invalid JSON on {where}: {exc}") from None
    except RecursionError:
        raise UsageError(f"invalid JSON on {where}: nested too deeply") from None


# -- capture ------------------------------------------------------------------
@cli.command("capture")
@click.argument("table")
@click.option("--stream", "stream_name", required=True, help="Stream the changes go to.")
@click.option("--columns", default=None, help="Comma-separated columns to put in row (default: all).")
@click.option("--ops", default="insert,update,delete", show_default=True, help="Operations to capture.")
@click.option("--key", "key_columns", default=None, help="Key columns (default: the primary key).")
@pass_ctx
@user_errors
def capture_cmd(
    obj: Context, table: str, stream_name: str, columns: str | None, ops: str, key_columns: str | None
) -> None:
    """Capture row changes of [SCHEMA.]TABLE into a stream (row triggers).

    Each inserted, updated or deleted row appends {"op", "table", "key",
    "row"} to the stream in the writer's own transaction: op is insert,
    update or delete; table is schema.table (for a partitioned table, the
    partition holding the row); key holds the key columns' values; row
    holds the new row (the old one for a delete), limited to --columns. A
    table without a primary key needs --key. Names are read as in SQL: quote
    capitals, e.g. 'shop."Orders"'. TRUNCATE is not captured.
    Capturing the same table into the same stream again replaces the
    settings. If the append fails (say the payload is over the stream's
    limit), the writer's statement fails with pgfeed's error.
    """
    schema, name = parse_qualified_table(table)
    check_stream_name(stream_name)
    ops_list = [o.strip().lower() for o in ops.split(",")]
    with obj.conn("installing capture") as conn:
        key = admin.capture(
            conn,
            schema,
            name,
            stream_name,
            columns=parse_column_list(columns),
            key=parse_column_list(key_columns),
            ops=ops_list,
        )
    shown = format_qualified_table(schema, name)
    click.echo(f"capturing {shown} into {stream_name} (key: {', '.join(quote_name(k) for k in key)})")


@cli.command("uncapture")
@click.argument("table")
@click.option("--stream", "stream_name", required=True, help="The stream the table is captured into.")
@pass_ctx
@user_errors
def uncapture_cmd(obj: Context, table: str, stream_name: str) -> None:
    """Remove the capture of [SCHEMA.]TABLE into a stream (a no-op if there is none)."""
    schema, name = parse_qualified_table(table)
    check_stream_name(stream_name)
    with obj.conn("removing capture") as conn:
        found = admin.uncapture(conn, schema, name, stream_name)
    shown = format_qualified_table(schema, name)
    click.echo(f"{'removed' if found else 'there was no'} capture of {shown} into {stream_name}")


# -- grants -------------------------------------------------------------------
@cli.group()
def grant() -> None:
    """Give a role the least privileges to write or read."""


@grant.command("writer")
@click.argument("role")
@click.option(
    "--stream", "streams", multiple=True, help="Only these streams (repeatable; default: all, present and future)."
)
@pass_ctx
@user_errors
def grant_writer_cmd(obj: Context, role: str, streams: tuple[str, ...]) -> None:
    """Let ROLE append (and nothing else)."""
    with obj.conn("granting") as conn:
        admin.grant_writer(conn, role, list(streams) or None)
    click.echo(f"{role} may append to {', '.join(streams) if streams else 'all streams'}")


@grant.command("reader")
@click.argument("role")
@pass_ctx
@user_errors
def grant_reader_cmd(obj: Context, role: str) -> None:
    """Let ROLE read every stream and keep its own positions."""
    with obj.conn("granting") as conn:
        admin.grant_reader(conn, role)
    click.echo(f"{role} may read all streams")


# -- prune --------------------------------------------------------------------
@cli.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    help="Delete events and ticks older than this (e.g. 7d, 12h, 90m).",
)
@pass_ctx
@user_errors
def prune_cmd(obj: Context, older_than: str) -> None:
    """Delete old events and ticks of every stream.

    Readers positioned before what is kept reset instead of skipping rows.
    """
    from pgfeed.core.durations import parse_duration
    from pgfeed.retention import prune

    seconds = parse_duration(older_than)
    with obj.conn("pruning") as conn:
        result = prune(conn, seconds)
    click.echo(
        f"pruned {result.events_deleted} events and {result.ticks_deleted} ticks;"
        f" streams now start at tick {result.floor_tick}"
    )


# -- tail ---------------------------------------------------------------------
@cli.command("tail")
@click.argument("stream_name", metavar="STREAM")
@click.option("--from", "since", default="earliest", show_default=True, help="earliest, now, or a position token.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep following after catching up.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "pretty"]), default="jsonl", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N rows.")
@pass_ctx
@user_errors
def tail(obj: Context, stream_name: str, since: str, follow: bool, fmt: str, limit: int | None) -> None:
    """Print the rows of STREAM in order; with --follow, then new ones as they commit.

    Ctrl-C or SIGTERM stop it cleanly (exit 0).
    """
    check_stream_name(stream_name)
    if since not in ("earliest", "now"):
        from pgfeed.core.positions import Position

        Position.parse(since)
    conninfo = obj.conninfo
    with suppress(BrokenPipeError):
        asyncio.run(_tail(conninfo, stream_name, since, follow, fmt, limit))
    _quiet_stdout_close()


def _format_row(row: Row, fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps(
            {
                "stream": row.stream,
                "position": row.token,
                "created_at": row.created_at.isoformat(),
                "key": row.key,
                "payload": row.payload,
            },
            separators=(",", ":"),
        )
    stamp = row.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    key = f" [{row.key}]" if row.key is not None else ""
    return f"{stamp}  {row.stream}@{row.token}{key}  {json.dumps(row.payload)}"


async def _tail(conninfo: str, stream_name: str, since: str, follow: bool, fmt: str, limit: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = sys.stdout
    count = 0
    async with AsyncReader(conninfo) as reader:
        sub = await reader.subscribe(stream_name, since, until=None if follow else "now")
        stopper = asyncio.create_task(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(sub.__anext__())
                done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    break
                try:
                    batch = nxt.result()
                except StopAsyncIteration:
                    break
                for row in batch.rows:
                    out.write(_format_row(row, fmt) + "\n")
                    count += 1
                    if limit is not None and count >= limit:
                        out.flush()
                        return
                out.flush()
        finally:
            stopper.cancel()


def _quiet_stdout_close() -> None:
    """After a closed pipe (``| head``), keep Python from complaining at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@cli.command("demo")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds of writing (default: until Ctrl-C).",
)
@click.option(
    "--rate", type=click.FloatRange(min=0.1, max=1000), default=20.0, show_default=True, help="Rows per second."
)
@click.option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write every report of the writer and readers to FILE as JSON lines.",
)
@pass_ctx
@user_errors
def demo(obj: Context, duration: float | None, rate: float, log_path: Path | None) -> None:
    """A writer and two reader processes on stream "demo", live, until Ctrl-C.

    Migrates and creates the stream if needed. Ctrl-C or SIGTERM: stop the
    writer, let each reader confirm the writer's last token, print a summary
    and exit 0.
    """
    from pgfeed_cli.demo import run_demo

    run_demo(obj.conninfo, duration=duration, rate=rate, log_path=log_path)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pgfeed")


__all__ = ["STREAM_NAME_RULE", "cli", "main"]
