"""``pgfeed append STREAM JSON`` prints the commit token of its transaction."""

from __future__ import annotations

from typing import Any

from helpers import Run

import pgfeed
from pgfeed.reader import Batch


def test_append_prints_a_token_a_reader_can_wait_for(pgfeed_dsn: str, pgfeed_cmd: Run, stream: str) -> None:
    delivered: list[Any] = []

    def collect(batch: Batch) -> None:
        delivered.extend(row.payload for row in batch)

    with pgfeed.Reader(pgfeed_dsn) as reader:
        reader.on(stream, collect, since="earliest")
        for n in (1, 2):
            result = pgfeed_cmd("append", stream, f'{{"n": {n}}}')
            assert result.exit_code == 0, result.output
            token = result.stdout.strip()
            assert result.stdout == f"{token}\n"
            reader.wait_for(stream, token, timeout=10)  # read-your-writes: the row is delivered
            assert delivered == [{"n": i} for i in range(1, n + 1)]
