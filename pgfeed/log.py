"""pgfeed's loggers: structlog's API on top of the standard library's ``logging``.

pgfeed never configures logging. Its events go to the stdlib logger named
after the module (``pgfeed.reader``, ``pgfeed.migrate``, ...), so they end up
wherever the application's logging sends them (gunicorn, ``basicConfig``,
``dictConfig``) and nowhere when it configures nothing: the ``pgfeed`` logger
has a :class:`logging.NullHandler`, which also keeps Python's last-resort
handler from printing warnings to stderr.

The connection pools pgfeed opens (named ``pgfeed-...``) log through
psycopg_pool's module loggers (``psycopg.pool``), which the application's own
pools share. A filter there moves the records about pgfeed's pools to the
``pgfeed.pool`` logger, under the same ``NullHandler``, leaving the
application's own pool records where they were: a killed backend ("discarding
closed connection") is then pgfeed's to report, in its own words, not a line
on the host's stderr.

Each record's message is the event followed by its key/values
(``listener lost; reconnecting error="..." retry_in=0.5``); the same event as
a dict is the record attribute :data:`EVENT_ATTR`, for structured handlers.
An application rendering with structlog's ``ProcessorFormatter`` puts
:func:`from_record` in its ``foreign_pre_chain`` to get the key/values as
fields again. In tests, pytest's ``caplog`` sees the records and
``structlog.testing.capture_logs()`` the events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from structlog.testing import LogCapture
from structlog.typing import EventDict, WrappedLogger

#: The attribute of pgfeed's log records holding the event as a dict:
#: ``{"event": "reader opened", ...key/values}``.
EVENT_ATTR = "pgfeed_event"

#: Where the records of pgfeed's own connection pools go (see :class:`_PgfeedPools`).
POOL_LOGGER = "pgfeed.pool"
#: The prefix of the names of pgfeed's pools, and so of their tasks ("pgfeed-reader-worker-0").
POOL_PREFIX = "pgfeed-"
#: psycopg_pool's loggers: the pools' own, and their schedulers'.
_PSYCOPG_POOL_LOGGERS = ("psycopg.pool", "psycopg_pool.sched_async", "psycopg_pool.sched")

logging.getLogger("pgfeed").addHandler(logging.NullHandler())

_BARE = re.compile(r"[^\s=\"']+")
_STRUCTLOG_DIR = str(Path(structlog.__file__).parent) + os.sep


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger for ``name`` (``pgfeed.something``) that writes to
    ``logging.getLogger(name)``; it ignores structlog's global configuration."""
    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            _capture_logs,
            # Early, so that a disabled level costs nothing more.
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            _to_stdlib,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    return logger


def _capture_logs(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Inside ``structlog.testing.capture_logs()``, the event goes to its list
    (and no further), as the events of loggers using structlog's global
    configuration do."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, LogCapture):
            processor(logger, method_name, event_dict)  # raises DropEvent
    return event_dict


def _to_stdlib(_: WrappedLogger, __: str, event_dict: EventDict) -> tuple[tuple[str], dict[str, Any]]:
    """The arguments of the stdlib logging call: the event rendered as
    ``event key=value ...``, its exception for the handler's formatter, and the
    event dict under :data:`EVENT_ATTR`."""
    exc_info = event_dict.pop("exc_info", None)
    stack_info = bool(event_dict.pop("stack_info", False))
    event = event_dict.setdefault("event", "")
    fields = " ".join(f"{key}={_value(value)}" for key, value in event_dict.items() if key != "event")
    message = f"{event} {fields}" if fields else str(event)
    return (message,), {
        "exc_info": exc_info,
        "stack_info": stack_info,
        "stacklevel": _structlog_frames(),
        "extra": {EVENT_ATTR: event_dict},
    }


def _structlog_frames() -> int:
    """The ``stacklevel`` that makes the record's file, line and function those
    of pgfeed's call to the logger rather than structlog's: one more than
    structlog's frames around that call."""
    # Frame 2 is structlog's processor loop: gone when logging runs, it is the one more.
    frame: FrameType | None = sys._getframe(2)
    count = 0
    while frame is not None and frame.f_code.co_filename.startswith(_STRUCTLOG_DIR):
        count += 1
        frame = frame.f_back
    return max(count, 1)


def _value(value: Any) -> str:
    """``value`` bare when it is one plain word, else as JSON (strings quoted)."""
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def from_record(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A ``ProcessorFormatter`` pre-chain processor: pgfeed's records become their
    event and key/values again (other records pass unchanged)."""
    record = event_dict.get("_record")
    event = getattr(record, EVENT_ATTR, None)
    if isinstance(event, dict):
        event_dict.update(event)
    return event_dict


class _PgfeedPools(logging.Filter):
    """On psycopg_pool's loggers: a record about one of pgfeed's pools goes to
    :data:`POOL_LOGGER` instead (other records pass unchanged).

    psycopg_pool has one logger for every pool, so a record is pgfeed's when
    it was logged by one of pgfeed's tasks (the pool's own workers are named
    after it) or on the sync reader's loop thread, or when an argument names a
    pgfeed pool: its name, the pool, or a connection lent by it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _about_pgfeed_pool(record):
            return True
        target = logging.getLogger(POOL_LOGGER)
        if target.isEnabledFor(record.levelno):
            record.name = POOL_LOGGER
            target.handle(record)
        return False


def _about_pgfeed_pool(record: logging.LogRecord) -> bool:
    if record.threadName == "pgfeed-reader":
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        task = None
    if task is not None and _pgfeed_name(task.get_name()):
        return True
    args = record.args if isinstance(record.args, tuple) else ()
    return any(_pgfeed_name(arg) or _pgfeed_name(_pool_name(arg)) for arg in args)


def _pool_name(arg: object) -> object:
    """The name of the pool ``arg`` is or belongs to (a pooled connection), if any."""
    pool = getattr(arg, "_pool", None) or arg
    return getattr(pool, "name", None)


def _pgfeed_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(POOL_PREFIX)


for _name in _PSYCOPG_POOL_LOGGERS:
    logging.getLogger(_name).addFilter(_PgfeedPools())
