"""The demo's writer process: one row per transaction at a steady rate, a
commit token after each, riding out lost connections."""

from __future__ import annotations

import os
import sys
import threading
import time

from pgfeed.errors import one_line
from pgfeed_cli.demo.protocol import STREAM, Emitter


def run_writer(conninfo: str, rate: float, emit: Emitter) -> int:
    import psycopg

    import pgfeed
    from pgfeed import connect
    from pgfeed.core.backoff import Backoff

    conn = connect.connect(conninfo, doing="starting the demo writer")
    emit({"type": "ready", "pid": os.getpid()})
    if sys.stdin.readline().strip() != "go":
        return 0
    stop = threading.Event()

    def watch_stdin() -> None:
        for _ in sys.stdin:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    start = time.monotonic()
    n = 0
    token = None
    backoff = Backoff()
    try:
        while not stop.wait(max(0.0, start + n / rate - time.monotonic())):
            n += 1
            try:
                with conn.transaction():
                    payload = {"n": n, "text": f"hello #{n}", "t": round(time.time(), 6)}
                    seq = pgfeed.append(conn, STREAM, payload)
                token = pgfeed.commit_token(conn)
            except (pgfeed.ConnectError, pgfeed.CommitTokenUnavailable, psycopg.OperationalError) as exc:
                # The server restarted or the connection dropped: whether row n
                # committed is unknown, or known but without a token (the
                # readers will tell; the next token covers it). Reconnect, go on.
                emit({"type": "notice", "message": f"writer: {one_line(exc)}; reconnecting"})
                conn.close()
                while not stop.wait(backoff.next_delay()):
                    try:
                        conn = connect.connect(conninfo, doing="reconnecting the demo writer")
                    except pgfeed.ConnectError:
                        continue
                    emit({"type": "notice", "message": "writer: reconnected"})
                    backoff.reset()
                    break
                start = time.monotonic() - n / rate  # resume the pace, no burst
                continue
            except (pgfeed.PgfeedError, psycopg.Error) as exc:
                emit({"type": "error", "message": one_line(exc)})
                return 1
            emit({"type": "wrote", "n": n, "seq": seq, "token": str(token)})
    finally:
        conn.close()
    emit({"type": "done", "rows": n, "token": str(token) if token is not None else None})
    return 0
