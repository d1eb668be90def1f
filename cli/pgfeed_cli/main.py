"""The ``pgfeed`` command: parse, call the library, format. Nothing else.

Arguments are checked by click parameter types before anything connects;
errors are mapped once, by the command classes (:func:`_one_line_errors`).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import click
import psycopg

from pgfeed import admin, connect, migrator, rows
from pgfeed.core.cursor import check_spec
from pgfeed.core.durations import parse_duration
from pgfeed.core.names import (
    STREAM_NAME_RULE,
    check_stream_name,
    format_qualified_table,
    parse_column_list,
    parse_qualified_table,
    quote_name,
)
from pgfeed.errors import (
    InvalidStreamName,
    PermissionDenied,
    PgfeedError,
    StreamExists,
    TokenError,
    UsageError,
    translate,
)
from pgfeed.queries import query
from pgfeed.reader import AsyncReader, Row
from pgfeed.writer import append, append_many, commit_token
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
        with _dsn_checked_by_libpq():
            c = connect.connect(self.conninfo, doing=doing)
        try:
            yield c
        finally:
            c.close()


pass_ctx = click.make_pass_decorator(Context)


# -- errors: one line, exit 2 for usage errors and 1 otherwise -------------------
#: Who may run a command: named when PostgreSQL refuses it (``needs=`` of a command).
OWNER = "the schema owner (the role that ran `pgfeed migrate`)"
READER = "the schema owner or a role granted `pgfeed grant reader`"
WRITER = "the schema owner or a role granted `pgfeed grant writer` (for this stream)"


class BadInput(UsageError):
    """Input that is not what the command reads."""


#: What the user typed or piped in is malformed: exit 2, like click's usage errors.
#: Everything else (unknown stream or role, permission, payload over the limit,
#: connection) is a failure of a well-formed command: exit 1.
MALFORMED = (BadInput, InvalidStreamName, TokenError)


class _OwnUsageError(click.UsageError):
    """A usage error whose message says what to do (pgfeed's parsers, --yes): no --help hint."""


class _Reported(click.ClickException):
    """A failure in pgfeed's words, shown as the one line ``pgfeed: error: ...``; exit 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"pgfeed: error: {self.message}", err=True)


class _ReportedUsage(_Reported):
    """A usage error in pgfeed's words; exit 2."""

    exit_code = 2


def _report(message: str, usage: bool) -> _Reported:
    return _ReportedUsage(message) if usage else _Reported(message)


# click >= 8.2 shows a group's help, when it is called without a command, by raising this.
_SHOWS_HELP: type[Exception] = getattr(click.exceptions, "NoArgsIsHelpError", _Reported)


@contextmanager
def _one_line_errors(ctx: click.Context | None) -> Iterator[None]:
    """The one mapping of errors to what the user sees; ``--debug`` adds the traceback."""
    try:
        yield
    except (_Reported, _SHOWS_HELP):
        raise
    except click.UsageError as exc:
        raise _ReportedUsage(_usage_message(exc)) from None
    except click.ClickException as exc:
        raise _report(exc.format_message(), exc.exit_code == 2) from None
    except PgfeedError as exc:
        raise _reported(exc, exc, ctx) from None
    except psycopg.Error as exc:  # not translated by the library: name the command
        raise _reported(translate(exc, ctx.command_path if ctx else "pgfeed"), exc, ctx) from None


def _usage_message(exc: click.UsageError) -> str:
    """click's four-line usage error as one line, keeping its hint to --help."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    if message[1:2].islower():
        message = message[0].lower() + message[1:]
    if isinstance(exc, _OwnUsageError) or exc.ctx is None:
        return message
    return f"{message}; try '{exc.ctx.command_path} --help'"


def _reported(exc: PgfeedError, original: BaseException, ctx: click.Context | None) -> _Reported:
    obj = ctx.find_object(Context) if ctx is not None else None
    if obj is not None and obj.debug:
        click.echo("".join(traceback.format_exception(original)), err=True, nl=False)
    message = str(exc)
    if isinstance(exc, PermissionDenied) and ctx is not None:
        # PostgreSQL names the object it refused; say which grant the command needs.
        message = f"{message}; `{ctx.command_path}` needs {getattr(ctx.command, 'needs', OWNER)}"
    return _report(message, isinstance(exc, MALFORMED))


@contextmanager
def _dsn_checked_by_libpq() -> Iterator[None]:
    """Some DSN mistakes (``port=abc``) show only when connecting: still a usage error."""
    try:
        yield
    except UsageError as exc:
        raise BadInput(str(exc)) from None


class _Command(click.Command):
    """A pgfeed command: errors mapped by :func:`_one_line_errors`; ``needs`` says who may run it."""

    def __init__(self, *args: Any, needs: str = OWNER, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs = needs

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors(ctx):
            return super().invoke(ctx)


class _Group(click.Group):
    """pgfeed and its command groups: errors in parsing and in callbacks mapped the same way."""

    command_class = _Command
    group_class = type  # subgroups are _Group too

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _one_line_errors(parent):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors(ctx):
            return super().invoke(ctx)


# -- arguments: checked before anything connects ------------------------------------
class _Parsed(click.ParamType):  # type: ignore[type-arg]  # generic only in recent click; 8.1 is supported
    """A value checked by one of pgfeed's parsers; a refusal is a usage error in its words."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a parsed default
        try:
            return self.parse(value)
        except PgfeedError as exc:
            raise _OwnUsageError(str(exc), ctx) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadInput(f"invalid JSON on {where}: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:
        raise BadInput(f"invalid JSON on {where}: {exc}") from None
    except RecursionError:
        raise BadInput(f"invalid JSON on {where}: nested too deeply") from None


def _parse_ops(text: str) -> list[str]:
    ops = [o.strip().lower() for o in text.split(",")]
    if not set(ops) <= set(admin.CAPTURE_OPS):
        raise UsageError(f"invalid operations {text!r}: expected a non-empty subset of {','.join(admin.CAPTURE_OPS)}")
    return ops


#: ``append STREAM -``: the payloads are JSON lines on stdin.
STDIN: Final = object()

DSN = _Parsed("dsn", connect.check_dsn)
STREAM = _Parsed("stream", check_stream_name)
SINCE = _Parsed("position", check_spec)
PAYLOAD = _Parsed("json", lambda text: STDIN if text == "-" else _parse_json(text, "the JSON argument"))
TABLE = _Parsed("table", parse_qualified_table)
COLUMNS = _Parsed("columns", parse_column_list)
OPS = _Parsed("ops", _parse_ops)
DURATION = _Parsed("duration", parse_duration)


class _Option(click.Option):
    """An option that, when not given, is read from ``PGFEED_<COMMAND>_<OPTION>``,
    named after its long flag: ``PGFEED_TAIL_FROM`` for ``tail --from`` (click
    would use the parameter's Python name, ``since``). A nested command's path
    is joined: ``PGFEED_STREAM_CREATE_NOTIFY``."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        if self.envvar is not None or not self.allow_from_autoenv or ctx.auto_envvar_prefix is None:
            return super().resolve_envvar_value(ctx)
        flag = next((o for o in self.opts if o.startswith("--")), self.opts[0])
        return os.environ.get(f"{ctx.auto_envvar_prefix}_{flag.lstrip('-').upper().replace('-', '_')}") or None


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` with the environment variable named after the flag (:class:`_Option`)."""
    return click.option(*decls, cls=_Option, **attrs)


@click.group(
    "pgfeed", cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "PGFEED"}
)
@option(
    "--dsn", metavar="DSN", type=DSN, help="PostgreSQL connection string (default: $PGFEED_DSN, libpq env, embedded)."
)
@option("-v", "--verbose", count=True, help="Log what happens (to stderr).")
@option("--debug", is_flag=True, help="Debug logs, and tracebacks on errors.")
@click.version_option(package_name="pgfeed")
@click.pass_context
def cli(ctx: click.Context, dsn: str | None, verbose: int, debug: bool) -> None:
    """pgfeed: a gap-free, ordered change feed on PostgreSQL.

    Every option can also be set in the environment as PGFEED_<COMMAND>_<OPTION>,
    e.g. PGFEED_TAIL_FORMAT=pretty or PGFEED_STREAM_CREATE_NOTIFY=poll (not --yes).
    Errors are one line on stderr; exit 2 for usage errors, 1 for other failures.
    """
    logs.configure(bool(verbose), debug)
    ctx.obj = Context(dsn, debug)


# -- migrate --------------------------------------------------------------
@cli.group(invoke_without_command=True)
@option("--dry-run", is_flag=True, help="Print the SQL that would run; change nothing.")
@option("--status", "show_status", is_flag=True, help="List applied and pending versions.")
@click.pass_context
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
            bootstrap = query("create_schema_version")
            click.echo(f"-- version table (in the first file's transaction)\n{bootstrap};")
        for m in st.pending:
            click.echo(f"-- {m.version:04d}_{m.name}.sql\n{m.sql}")
        return
    with obj.conn("migrating") as conn:
        done = migrator.migrate(conn)
    for m in done:  # nothing at all when up to date: a rerun is a quiet no-op (-v logs it)
        click.echo(f"applied {m.version:04d}_{m.name}")


@migrate.command("status")
@pass_ctx
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
@click.argument("name", type=STREAM)
@option(
    "--max-payload-bytes",
    type=click.IntRange(min=1, max=admin.MAX_MAX_PAYLOAD),
    default=admin.DEFAULT_MAX_PAYLOAD,
    show_default=True,
    help="Refuse payloads larger than this (pg_column_size of the jsonb value).",
)
@option(
    "--notify",
    "notify_mode",
    type=click.Choice(admin.NOTIFY_MODES),
    default="ticker",
    show_default=True,
    help="ticker: writers only INSERT, the ticker wakes readers; immediate: each commit also NOTIFYs the ticker"
    " (pays NOTIFY's commit lock; only a ticker on a schema before 0008 is faster for it);"
    " poll: as ticker (kept for compatibility).",
)
@pass_ctx
def stream_create(obj: Context, name: str, max_payload_bytes: int, notify_mode: str) -> None:
    """Create stream NAME."""
    with obj.conn("creating a stream") as conn:
        try:
            admin.create_stream(conn, name, max_payload_bytes=max_payload_bytes, notify_mode=notify_mode)  # type: ignore[arg-type]
        except StreamExists as exc:
            click.echo(f"pgfeed: {exc}", err=True)
            return
    click.echo(f"created stream {name}")


@stream.command("list", needs=READER)
@option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@pass_ctx
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
@click.argument("name", type=STREAM)
# A confirmation must be typed: no PGFEED_STREAM_DROP_YES.
@option("--yes", is_flag=True, allow_from_autoenv=False, help="Really drop the stream and all its rows.")
@pass_ctx
def stream_drop(obj: Context, name: str, yes: bool) -> None:
    """Drop stream NAME, all its rows and its table captures (needs --yes)."""
    if not yes:
        raise _OwnUsageError(f"dropping stream {name!r} deletes all its rows: repeat with --yes to confirm")
    with obj.conn("dropping a stream") as conn:
        uncaptured = admin.drop_stream(conn, name)
    click.echo(f"dropped stream {name}")
    for table in uncaptured:
        click.echo(f"removed capture of {table} into {name}")


# -- append ------------------------------------------------------------------
@cli.command("append", needs=WRITER)
@click.argument("stream_name", metavar="STREAM", type=STREAM)
@click.argument("payload", metavar="JSON|-", type=PAYLOAD)
@option("--key", default=None, help="Optional key stored with the row (with -: with every row).")
@option(
    "--batch",
    "batch_size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With -: lines per transaction.",
)
@pass_ctx
def append_cmd(obj: Context, stream_name: str, payload: Any, key: str | None, batch_size: int) -> None:
    """Append one JSON value to STREAM and print its commit token, or JSON lines from stdin with -.

    A payload is any JSON value: object, array, string, number, true, false or
    null (NaN and Infinity are not JSON). The server refuses payloads larger
    than the stream's limit (stream create --max-payload-bytes). Put -- before
    a value that starts with a dash: pgfeed append STREAM -- -1.

    A single value is committed at once and its commit token printed: a
    reader's wait_for(STREAM, token), in any process, returns once that
    reader has delivered the row (read-your-writes).

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
    with obj.conn("appending") as conn:
        admin.stream_id(conn, stream_name)  # an unknown stream fails before stdin is read
        if payload is not STDIN:
            with conn.transaction():
                append(conn, stream_name, payload, key)
            click.echo(str(commit_token(conn)))
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
            raise self._stopped(BadInput(f"line {lineno} is not UTF-8 (byte {exc.start + 1})"), lineno) from None
        if not text.strip():
            return
        try:
            value = _parse_json(text, f"line {lineno}")
        except BadInput as exc:
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


# -- capture ------------------------------------------------------------------
@cli.command("capture")
@click.argument("table", type=TABLE)
@option("--stream", "stream_name", type=STREAM, required=True, help="Stream the changes go to.")
@option("--columns", type=COLUMNS, default=None, help="Comma-separated columns to put in row (default: all).")
@option("--ops", type=OPS, default="insert,update,delete,truncate", show_default=True, help="Operations to capture.")
@option("--key", "key_columns", type=COLUMNS, default=None, help="Key columns (default: the primary key).")
@option(
    "--skip-unchanged/--no-skip-unchanged",
    default=False,
    show_default=True,
    help="Append nothing for an UPDATE that changes neither the key nor a captured column.",
)
@pass_ctx
def capture_cmd(
    obj: Context,
    table: tuple[str, str],
    stream_name: str,
    columns: list[str] | None,
    ops: list[str],
    key_columns: list[str] | None,
    skip_unchanged: bool,
) -> None:
    """Capture row changes of [SCHEMA.]TABLE into a stream (triggers).

    Each inserted, updated or deleted row appends {"op", "table", "key",
    "row"} to the stream in the writer's own transaction: op is insert,
    update or delete; table is schema.table quoted as PostgreSQL quotes it
    (for a partitioned table, the table captured, and "partition" the one
    holding the row); key holds the key columns' values; row holds the new
    row (the old one for a delete), limited to --columns. An UPDATE that
    changes the key also carries "old_key". A TRUNCATE appends {"op":
    "truncate", "table"}: drop every row of that table. Renamed columns are
    followed; dropping a key or --columns column makes writes fail until the
    table is captured again. A table without a primary key needs --key.
    Names are read as in SQL: quote capitals, e.g. 'shop."Orders"'.
    Capturing the same table into the same stream again replaces the
    settings. If the append fails (say the payload is over the stream's
    limit), the writer's statement fails with pgfeed's error. See
    docs/capture.md.
    """
    schema, name = table
    with obj.conn("installing capture") as conn:
        key = admin.capture(
            conn,
            schema,
            name,
            stream_name,
            columns=columns,
            key=key_columns,
            ops=ops,
            skip_unchanged=skip_unchanged,
        )
    shown = format_qualified_table(schema, name)
    click.echo(f"capturing {shown} into {stream_name} (key: {', '.join(quote_name(k) for k in key)})")


@cli.command("uncapture")
@click.argument("table", type=TABLE)
@option("--stream", "stream_name", type=STREAM, required=True, help="The stream the table is captured into.")
@pass_ctx
def uncapture_cmd(obj: Context, table: tuple[str, str], stream_name: str) -> None:
    """Remove the capture of [SCHEMA.]TABLE into a stream (a no-op if there is none)."""
    schema, name = table
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
@option(
    "--stream",
    "streams",
    type=STREAM,
    multiple=True,
    help="Only these streams (repeatable; default: all, present and future).",
)
@pass_ctx
def grant_writer_cmd(obj: Context, role: str, streams: tuple[str, ...]) -> None:
    """Let ROLE append (and nothing else)."""
    with obj.conn("granting") as conn:
        admin.grant_writer(conn, role, list(streams) or None)
    click.echo(f"{role} may append to {', '.join(streams) if streams else 'all streams'}")


@grant.command("reader")
@click.argument("role")
@pass_ctx
def grant_reader_cmd(obj: Context, role: str) -> None:
    """Let ROLE read every stream and keep its own positions."""
    with obj.conn("granting") as conn:
        admin.grant_reader(conn, role)
    click.echo(f"{role} may read all streams")


@grant.command("ticker")
@click.argument("role")
@pass_ctx
def grant_ticker_cmd(obj: Context, role: str) -> None:
    """Let ROLE run the ticker (`pgfeed daemon`, or readers' embedded ticker)."""
    with obj.conn("granting") as conn:
        admin.grant_ticker(conn, role)
    click.echo(f"{role} may run the ticker")


# -- prune --------------------------------------------------------------------
@cli.command("prune")
@option(
    "--older-than",
    "older_than",
    type=DURATION,
    required=True,
    metavar="DURATION",
    help="Delete events and ticks older than this (e.g. 7d, 12h, 90m).",
)
@option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@option(
    "--prune-consumers",
    is_flag=True,
    help="Also delete what saved consumer positions still need (those consumers reset).",
)
@pass_ctx
def prune_cmd(obj: Context, older_than: float, dry_run: bool, prune_consumers: bool) -> None:
    """Delete old events and ticks of every stream.

    Never past what a saved consumer position still needs, unless
    --prune-consumers. Readers positioned before what is kept reset instead
    of skipping rows. `pgfeed daemon --retention` does this on a schedule.
    """
    from pgfeed.retention import prune

    with obj.conn("pruning") as conn:
        result = prune(conn, older_than, protect_consumers=not prune_consumers, dry_run=dry_run)
    verb = "would prune" if dry_run else "pruned"
    click.echo(
        f"{verb} {result.events_deleted} events and {result.ticks_deleted} ticks;"
        f" streams {'would ' if dry_run else ''}start at tick {result.floor_tick}"
        + ("; held back by a saved consumer position" if result.held_by_consumers else "")
    )


# -- repair -------------------------------------------------------------------
@cli.command("repair")
@option(
    "--after-restore",
    "after_restore",
    is_flag=True,
    help="Continue the feed on a database restored into another cluster (pg_dump/pg_restore).",
)
@option("--dry-run", is_flag=True, help="Say what is wrong and what the repair would move; change nothing.")
@pass_ctx
def repair_cmd(obj: Context, after_restore: bool, dry_run: bool) -> None:
    """Make a restored database deliver again, with no row skipped.

    The ticker refuses to tick on a dump restored into another cluster while
    rows appended there would be skipped; this advances the cluster's
    transaction ids past the restored ticks' and moves those rows into the
    next interval, after the restored history. Run it as the schema owner.
    """
    from pgfeed.repair import repair_after_restore

    if not after_restore:
        raise click.UsageError("say what to repair: --after-restore")
    with obj.conn("repairing") as conn:
        result = repair_after_restore(conn, dry_run=dry_run)
    if result.reason is None:
        click.echo("nothing to repair: the newest tick continues on this database")
        return
    behind = f"advance {result.xids_behind:,} transaction ids, " if result.xids_behind else ""
    if dry_run:
        click.echo(f"would repair: {result.reason}; would {behind}move {result.rows_moved} rows to the next tick")
    else:
        click.echo(f"repaired: {behind.replace('advance', 'advanced')}moved {result.rows_moved} rows to the next tick")


# -- tail ---------------------------------------------------------------------
@cli.command("tail", needs=READER)
@click.argument("stream_name", metavar="STREAM", type=STREAM)
@option(
    "--from",
    "since",
    type=SINCE,
    default="earliest",
    show_default=True,
    help="earliest, now, a position token, or a commit token.",
)
@option("--follow/--no-follow", default=True, show_default=True, help="Keep following after catching up.")
@option("--format", "fmt", type=click.Choice(["jsonl", "pretty"]), default="jsonl", show_default=True)
@option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N rows.")
@pass_ctx
def tail(obj: Context, stream_name: str, since: str, follow: bool, fmt: str, limit: int | None) -> None:
    """Print the rows of STREAM in order; with --follow, then new ones as they commit.

    jsonl: one object per row (stream, position, created_at, key, payload);
    when continuity is lost (the stream was dropped and recreated, or pruned
    past the position) a line {"stream", "reset": true, "reason"} comes
    first: drop what you derived from the lines before it.

    Ctrl-C or SIGTERM stop it cleanly (exit 0), and so does the reader of its
    output going away (| head).
    """
    conninfo = obj.conninfo
    with suppress(BrokenPipeError), _dsn_checked_by_libpq():
        asyncio.run(_tail(conninfo, stream_name, since, follow, fmt, limit))
    _quiet_stdout_close()


def _format_row(row: Row, fmt: str) -> str:
    if fmt == "jsonl":
        return rows.row_to_jsonl(row)
    stamp = row.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    table = rows.truncated_table(row)
    if table is not None:
        return f"{stamp}  {row.stream}@{row.token}  -- {table} truncated: every row of it above is gone"
    key = f" [{row.key}]" if row.key is not None else ""
    return f"{stamp}  {row.stream}@{row.token}{key}  {json.dumps(row.payload)}"


def _format_reset(stream_name: str, reason: str | None, fmt: str) -> str:
    if fmt == "jsonl":
        return rows.to_jsonl(rows.reset_to_json(stream_name, reason))
    return f"-- {stream_name} reset: {reason or 'continuity lost'}; the rows above are superseded"


async def _tail(conninfo: str, stream_name: str, since: str, follow: bool, fmt: str, limit: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _when_stdout_closed(lambda: loop.call_soon_threadsafe(stop.set))
    reasons: dict[str, str] = {}

    async def remember(stream: str, reason: str) -> None:  # runs before the reset batch is delivered
        reasons[stream] = reason

    out = sys.stdout
    count = 0
    async with AsyncReader(conninfo) as reader:
        reader.on_reset(remember)
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
                if batch.reset:
                    out.write(_format_reset(stream_name, reasons.pop(stream_name, None), fmt) + "\n")
                for row in batch.rows:
                    out.write(_format_row(row, fmt) + "\n")
                    count += 1
                    if limit is not None and count >= limit:
                        out.flush()
                        return
                out.flush()
        finally:
            stopper.cancel()


def _when_stdout_closed(callback: Callable[[], object]) -> None:
    """Call ``callback`` (on a thread) as soon as whoever reads stdout has gone.

    Without it, ``tail S | head -2`` on a quiet stream would learn that head
    exited only from its next write, at the next row. poll() asked for no events
    reports only POLLERR (a pipe whose reader closed), POLLHUP (a hung-up
    terminal or socket) and POLLNVAL, so it never wakes for a file or /dev/null.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file descriptor (click's CliRunner)
    if not hasattr(select, "poll"):
        return

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)
        poller.poll()
        with suppress(RuntimeError):  # the loop is already closed: tail is ending anyway
            callback()

    threading.Thread(target=watch, name="pgfeed-stdout-watch", daemon=True).start()


def _quiet_stdout_close() -> None:
    """After a closed pipe (``| head``), keep Python from complaining at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


@cli.command("demo")
@option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop after this many seconds of writing (default: until Ctrl-C).",
)
@option("--rate", type=click.FloatRange(min=0.1, max=1000), default=20.0, show_default=True, help="Rows per second.")
@option(
    "--log",
    "log_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write every report of the writer and readers to FILE as JSON lines.",
)
@pass_ctx
def demo(obj: Context, duration: float | None, rate: float, log_path: Path | None) -> None:
    """A writer and two reader processes on stream "demo", live, until Ctrl-C.

    Migrates and creates the stream if needed. Ctrl-C or SIGTERM: stop the
    writer, let each reader confirm the writer's last token, print a summary
    and exit 0.
    """
    from pgfeed_cli.demo import run_demo

    run_demo(obj.conninfo, duration=duration, rate=rate, log_path=log_path)


# -- daemon (its own module: it is a service, not a one-shot command) ----------
from pgfeed_cli.daemon_cmd import daemon_cmd  # noqa: E402

cli.add_command(daemon_cmd)

# -- the connection and the embedded server (their own module) ------------------
from pgfeed_cli.server_cmd import dsn_cmd, psql_cmd, server_cmd  # noqa: E402

cli.add_command(dsn_cmd)
cli.add_command(psql_cmd)
cli.add_command(server_cmd)

# -- operating: status and check (their own module) ----------------------------
from pgfeed_cli.status_cmd import check_cmd, status_cmd  # noqa: E402

cli.add_command(status_cmd)
cli.add_command(check_cmd)

# -- a consumer as a service (its own module) ------------------------------------
from pgfeed_cli.run_cmd import run_cmd  # noqa: E402

cli.add_command(run_cmd)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pgfeed")


__all__ = ["STREAM_NAME_RULE", "cli", "main"]
