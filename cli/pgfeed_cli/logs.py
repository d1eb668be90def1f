"""Where the ``pgfeed`` command's logs go: stdlib logging on stderr, rendered by structlog.

The library only logs (see :mod:`pgfeed.log`); the command, being the
application, decides the output.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from pgfeed.log import from_record


def configure(verbose: bool, debug: bool) -> None:
    """Human-readable logs on a terminal, JSON lines otherwise; to stderr.

    pgfeed's warnings and errors by default, its info with ``verbose``,
    everything with ``debug``.
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    renderer: list[Processor] = (
        [structlog.dev.ConsoleRenderer()]
        if sys.stderr.isatty()
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    )
    install(level, [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), *renderer])
    # Falling back to the embedded server is worth a line even when not verbose.
    logging.getLogger("pgfeed.connect").setLevel(min(level, logging.INFO))
    if debug:
        logging.getLogger("psycopg").setLevel(logging.WARNING)


def install(level: int, processors: list[Processor]) -> None:
    """Send pgfeed's records from ``level`` up, and other libraries' warnings
    (psycopg's only when critical), to stderr through structlog's
    ``processors`` (the last one renders a string).

    Calling it again replaces what an earlier call installed.
    """
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[from_record],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *processors],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("pgfeed").setLevel(level)
    # psycopg_pool logs every failed attempt with a traceback; pgfeed reports
    # the failure itself in one line.
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at each record: it may be replaced
    after configuration (click's test runner does)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr
