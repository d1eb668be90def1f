"""Entry point of the demo's child processes (``python -m pgfeed_cli.demo``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from pgfeed_cli.demo.protocol import CONNINFO_ENV, Emitter
from pgfeed_cli.demo.readers import run_async_reader, run_sync_reader
from pgfeed_cli.demo.writer import run_writer


def configure_logging(name: str) -> None:
    """pgfeed's warnings go to stderr (stdout carries the protocol)."""
    import logging

    from pgfeed_cli import logs

    def render(_: Any, level: str, event: Any) -> str:
        text = event.pop("event", "")
        extra = " ".join(f"{k}={v}" for k, v in event.items())
        return f"pgfeed demo {name}: {level}: {text} {extra}".rstrip()

    logs.install(logging.WARNING, [render])


def child_main(argv: list[str]) -> int:
    """Entry point of the demo's child processes (``python -m pgfeed_cli.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m pgfeed_cli.demo", description="A pgfeed demo process.")
    sub = parser.add_subparsers(dest="role", required=True)
    writer = sub.add_parser("writer")
    writer.add_argument("--rate", type=float, required=True)
    reader = sub.add_parser("reader")
    reader.add_argument("--name", required=True)
    reader.add_argument("--api", choices=["async", "sync"], required=True)
    args = parser.parse_args(argv)

    from pgfeed.errors import PgfeedError

    conninfo = os.environ.get(CONNINFO_ENV, "")
    name = "writer" if args.role == "writer" else f"reader {args.name}"
    configure_logging(name)
    emit = Emitter(sys.stdout)
    try:
        if args.role == "writer":
            return run_writer(conninfo, args.rate, emit)
        if args.api == "async":
            return asyncio.run(run_async_reader(conninfo, emit))
        return run_sync_reader(conninfo, emit)
    except PgfeedError as exc:
        emit({"type": "error", "message": str(exc)})
        return 1
    except KeyboardInterrupt:
        return 0
