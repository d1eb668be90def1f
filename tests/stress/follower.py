"""A reader in its own process for the ticker failover tests: follow STREAM and
write one JSON line per delivered row (position, payload) to OUT until a row
whose payload has ``"end": true`` arrives.

usage: python follower.py DSN STREAM SINCE OUT READY TICKER LEASE

TICKER is ``off`` (only daemons tick) or ``auto`` (this process campaigns as
the embedded ticker, with a lease of LEASE seconds). READY is written, holding
this process's pid, once the subscription is live.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pgfeed


async def main(dsn: str, stream: str, since: str, out: str, ready: str, ticker: str, lease: float) -> None:
    async with pgfeed.AsyncReader(
        dsn, poll_interval=0.5, probe_interval=1.0, probe_timeout=2.0, ticker=ticker, ticker_lease=lease
    ) as reader:
        sub = await reader.subscribe(stream, since)
        with open(out, "w") as f:
            Path(ready).write_text(str(os.getpid()))
            async for batch in sub:
                for row in batch.rows:
                    f.write(json.dumps({"position": row.token, "payload": row.payload}) + "\n")
                f.flush()
                if any(isinstance(r.payload, dict) and r.payload.get("end") for r in batch.rows):
                    return


if __name__ == "__main__":
    dsn, stream, since, out, ready, ticker, lease = sys.argv[1:8]
    asyncio.run(main(dsn, stream, since, out, ready, ticker, float(lease)))
