"""pgfeed logs through the standard library and configures nothing; the CLI
renders on stderr. No database."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog
from pgfeed_cli import logs

from pgfeed.log import EVENT_ATTR, get_logger

log = get_logger("pgfeed.test")

#: Logs at every level, with key/values, bound context and an exception.
EVERY_LEVEL = """
from pgfeed.log import get_logger

log = get_logger("pgfeed.test")
log.debug("debugging", n=1)
log.info("reader opened")
log.bind(stream="orders").warning("listener lost; reconnecting", error="connection refused", retry_in=0.5)
log.error("subscription failed", stream="orders")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("callback failed", stream="orders")
"""


def run_python(program: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


def test_nothing_is_written_when_the_application_configures_no_logging() -> None:
    """Not even warnings and errors: Python's last-resort handler would print them to stderr."""
    done = run_python(EVERY_LEVEL)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_basic_config_gets_the_events_with_their_key_values() -> None:
    setup = "import logging\nlogging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
    done = run_python(setup + EVERY_LEVEL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[:4] == [
        "INFO pgfeed.test reader opened",
        'WARNING pgfeed.test listener lost; reconnecting stream=orders error="connection refused" retry_in=0.5',
        "ERROR pgfeed.test subscription failed stream=orders",
        "ERROR pgfeed.test callback failed stream=orders",
    ]
    assert lines[4] == "Traceback (most recent call last):"  # the handler's formatter shows the exception
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_records_carry_the_event_as_a_dict_and_the_callers_place(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgfeed")
    log.info("tick failed; retrying", error="two words", retry_in=0.25, stream_id=None, names=["a", "b"])
    (record,) = caplog.records
    assert record.name == "pgfeed.test"
    assert record.levelno == logging.INFO
    assert (
        record.getMessage() == 'tick failed; retrying error="two words" retry_in=0.25 stream_id=null names=["a", "b"]'
    )
    assert getattr(record, EVENT_ATTR) == {
        "event": "tick failed; retrying",
        "error": "two words",
        "retry_in": 0.25,
        "stream_id": None,
        "names": ["a", "b"],
    }
    assert (record.filename, record.funcName) == (
        "test_logging.py",
        "test_records_carry_the_event_as_a_dict_and_the_callers_place",
    )


def test_levels_follow_the_stdlib_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pgfeed")
    log.info("not wanted")
    log.warning("wanted")
    assert [r.getMessage() for r in caplog.records] == ["wanted"]


def test_structlog_capture_logs_sees_the_events() -> None:
    with structlog.testing.capture_logs() as events:
        log.info("reader opened", stream="orders")
    assert events == [{"event": "reader opened", "stream": "orders", "log_level": "info"}]


def test_structlog_global_configuration_does_not_redirect_pgfeed() -> None:
    """Whatever the application did with structlog.configure, pgfeed stays on stdlib logging."""
    done = run_python(
        "import structlog\n"
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])\n"
        "structlog.get_logger().info('the application logs')\n" + EVERY_LEVEL
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ('{"event": "the application logs"}\n', "")


class FakeStderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """Undo what :func:`logs.configure` does to the process's logging."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("pgfeed", "pgfeed.connect", "psycopg")}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def configure(monkeypatch: pytest.MonkeyPatch, *, tty: bool, verbose: bool = False, debug: bool = False) -> FakeStderr:
    err = FakeStderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    logs.configure(verbose, debug)
    return err


def json_lines(err: FakeStderr) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.getvalue().splitlines()]


@pytest.mark.usefixtures("cli_logging")
def test_cli_writes_json_lines_to_stderr_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = configure(monkeypatch, tty=False)
    log.info("reader opened")  # not verbose
    log.warning("listener lost; reconnecting", error="connection refused", retry_in=0.5)
    get_logger("pgfeed.connect").info("using the embedded PostgreSQL", data_dir="/d")  # said even when not verbose
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1'")  # pgfeed says it in one line
    logging.getLogger("elsewhere").warning("another library's warning")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("callback failed", stream="orders")
    events = json_lines(err)
    for event in events:
        assert isinstance(event.pop("timestamp"), str)
    exception = events[-1].pop("exception")
    assert isinstance(exception, str)
    assert exception.endswith("ZeroDivisionError: division by zero")
    assert events == [
        {"event": "listener lost; reconnecting", "error": "connection refused", "retry_in": 0.5, "level": "warning"},
        {"event": "using the embedded PostgreSQL", "data_dir": "/d", "level": "info"},
        {"event": "another library's warning", "level": "warning"},
        {"event": "callback failed", "stream": "orders", "level": "error"},
    ]


@pytest.mark.usefixtures("cli_logging")
def test_cli_verbose_and_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    err = configure(monkeypatch, tty=False, verbose=True)
    log.debug("debugging")
    log.info("reader opened")
    assert [e["event"] for e in json_lines(err)] == ["reader opened"]

    err = configure(monkeypatch, tty=False, debug=True)  # configuring again replaces the handler
    log.debug("debugging")
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1'")
    assert [e["event"] for e in json_lines(err)] == ["debugging", "error connecting in 'pool-1'"]


@pytest.mark.usefixtures("cli_logging")
def test_cli_is_human_readable_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = configure(monkeypatch, tty=True)
    log.warning("listener lost; reconnecting", stream="orders")
    text = re.sub(r"\x1b\[[0-9;]*m", "", err.getvalue())  # without the colours
    (line,) = text.splitlines()
    assert re.fullmatch(r"\S+ \[warning\s*\] listener lost; reconnecting\s+stream=orders", line), line


def test_cli_keeps_the_host_program_stdout_clean_of_logs() -> None:
    """The command's own logging goes to stderr, whatever the level."""
    done = run_python("from pgfeed_cli import logs\nlogs.configure(True, True)\n" + EVERY_LEVEL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert [json.loads(line)["event"] for line in done.stderr.splitlines()] == [
        "debugging",
        "reader opened",
        "listener lost; reconnecting",
        "subscription failed",
        "callback failed",
    ]
