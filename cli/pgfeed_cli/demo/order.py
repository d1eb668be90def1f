"""The demo's check that both readers delivered the same rows in the same order."""

from __future__ import annotations

from collections import deque
from typing import Any


class OrderCheck:
    """Compares, row by row, what the two readers delivered.

    Memory is bounded by how far one reader runs ahead of the other. Rows at
    or before the later reader's starting position are not compared (the
    earlier reader may legitimately have seen them).
    """

    def __init__(self, names: list[str]) -> None:
        self.pending: dict[str, deque[tuple[int, str]]] = {n: deque() for n in names}
        self.floor: Any = None  # a pgfeed Position, set once every reader is ready
        self.compared = 0
        self.mismatch: str | None = None

    def add(self, name: str, seq: int, position: str) -> None:
        from pgfeed.core.positions import Position

        if self.mismatch is not None or (self.floor is not None and Position.parse(position) <= self.floor):
            return
        self.pending[name].append((seq, position))
        a, b = self.pending.values()
        while a and b:
            left, right = a.popleft(), b.popleft()
            if left != right:
                x, y = self.pending
                self.mismatch = (
                    f"readers disagree after {self.compared} rows: reader {x} delivered seq {left[0]} at "
                    f"{left[1]}, reader {y} delivered seq {right[0]} at {right[1]}"
                )
                return
            self.compared += 1
