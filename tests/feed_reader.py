"""A reader in its own process, for tests: follow STREAM and write one JSON line
per delivered row (position, payload) to OUT until a row whose payload has
``"end": true`` arrives.

usage: python feed_reader.py DSN STREAM SINCE OUT [READY_FILE]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pgfeed


async def main(dsn: str, stream: str, since: str, out: str, ready: str | None) -> None:
    async with pgfeed.AsyncReader(dsn, poll_interval=1.0, probe_interval=1.0, probe_timeout=2.0) as reader:
        sub = await reader.subscribe(stream, since)
        if ready:
            Path(ready).write_text("ready")
        with open(out, "w") as f:
            async for batch in sub:
                for row in batch.rows:
                    f.write(json.dumps({"position": row.token, "payload": row.payload}) + "\n")
                f.flush()
                if any(isinstance(r.payload, dict) and r.payload.get("end") for r in batch.rows):
                    return


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5], sys.argv[5] if len(sys.argv) > 5 else None))
