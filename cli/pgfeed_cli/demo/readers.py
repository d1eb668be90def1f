"""The demo's two reader processes: :class:`pgfeed.AsyncReader` (``async``)
and the sync :class:`pgfeed.Reader` in callback form (``sync``). Both follow
the stream from "now", report each row, and answer ``wait_for`` commands."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from pgfeed_cli.demo.protocol import CATCH_UP_TIMEOUT, STREAM, Emitter, caught_up_message, row_message, wait_for_token


async def run_async_reader(conninfo: str, emit: Emitter) -> int:
    import pgfeed

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async with pgfeed.AsyncReader(conninfo) as reader:
        sub = await reader.subscribe(STREAM, "now")
        emit({"type": "ready", "pid": os.getpid(), "position": str(sub.position)})

        async def consume() -> None:
            async for batch in sub:
                for row in batch.rows:
                    emit(row_message(row))

        async def commands() -> None:
            while line := await stdin.readline():
                started = time.monotonic()
                try:
                    position = await reader.wait_for(STREAM, wait_for_token(line), CATCH_UP_TIMEOUT)
                except pgfeed.PgfeedError as exc:
                    emit({"type": "error", "message": str(exc)})
                    continue
                emit(caught_up_message(position, started))

        consumer = asyncio.create_task(consume())
        commander = asyncio.create_task(commands())
        done, _ = await asyncio.wait({consumer, commander}, return_when=asyncio.FIRST_COMPLETED)
        consumer.cancel()
        commander.cancel()
        await asyncio.gather(consumer, commander, return_exceptions=True)
        if consumer in done:
            exc = consumer.exception()
            emit({"type": "error", "message": str(exc) if exc else "the subscription ended"})
            return 1
    return 0


def run_sync_reader(conninfo: str, emit: Emitter) -> int:
    import pgfeed

    def on_batch(batch: pgfeed.Batch) -> None:
        for row in batch.rows:
            emit(row_message(row))

    with pgfeed.Reader(conninfo) as reader:
        sub = reader.on(STREAM, on_batch, since="now")
        emit({"type": "ready", "pid": os.getpid(), "position": str(sub.position)})

        for line in sys.stdin:
            started = time.monotonic()
            try:
                position = reader.wait_for(STREAM, wait_for_token(line), CATCH_UP_TIMEOUT)
            except pgfeed.PgfeedError as exc:
                emit({"type": "error", "message": str(exc)})
                continue
            emit(caught_up_message(position, started))
    return 0
