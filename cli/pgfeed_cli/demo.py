"""`pgfeed demo` (placeholder until the demo lands)."""

from __future__ import annotations


def run_demo(conninfo: str, *, duration: float | None, rate: float) -> None:
    raise NotImplementedError
