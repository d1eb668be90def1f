"""How a reader polls, probes and batches: one definition for both readers.

:class:`ReaderOptions` holds each option's name, type, default and meaning
once. :class:`~pgfeed.sync.Reader` takes the same names as keyword arguments
(its defaults are read from here) or a ready ``options=ReaderOptions(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from pgfeed.errors import UsageError

TICKER_MODES = ("auto", "off")


@dataclass(frozen=True)
class ReaderOptions:
    """A reader's tuning knobs; every value is checked when the options are made.

    Memory per subscription is bounded by ``queue_batches * batch_size`` rows.
    """

    poll_interval: float = 3.0
    """Seconds between fallback polls, which cover lost notifications and streams without NOTIFY."""

    probe_interval: float = 10.0
    """Seconds between the listener's proofs that its connection still answers."""

    probe_timeout: float = 5.0
    """Seconds a probe may take before the listener's connection is replaced."""

    batch_size: int = 1000
    """Rows per batch at most."""

    queue_batches: int = 4
    """Batches a subscription reads ahead of its consumer."""

    tick_window: int = 2000
    """Ticks one range read covers at most while catching up."""

    pool_size: int = 4
    """Connections for range reads (the listener has its own)."""

    save_interval: float = 1.0
    """Seconds between saves of named consumers' positions (they are saved on close too)."""

    ticker: str = "auto"
    """``"auto"``: this process may be the database's ticker while no ``pgfeed daemon`` runs, if its
    role may tick; ``"off"``: it never ticks (readers with only the reader grant, hot standbys)."""

    ticker_lease: float = 10.0
    """Seconds a dead embedded ticker holds the ticker lease before another process takes over."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if isinstance(f.default, int | float) and not isinstance(f.default, bool):
                check_positive(f.name, getattr(self, f.name), integer=isinstance(f.default, int))
        if self.ticker not in TICKER_MODES:
            raise UsageError(
                f"invalid ticker {self.ticker!r}: expected 'auto' (tick here when no daemon does) or 'off'"
            )

    @classmethod
    def merge(cls, base: ReaderOptions | None, given: Mapping[str, Any]) -> ReaderOptions:
        """``base`` (or the defaults) with each value of ``given`` that differs from its default."""
        defaults = cls()
        changed = {name: value for name, value in given.items() if value != getattr(defaults, name)}
        return replace(base or defaults, **changed)


OPTION_NAMES = frozenset(f.name for f in fields(ReaderOptions))


def check_positive(name: str, value: object, *, integer: bool = False) -> None:
    """Raise a one-line :class:`UsageError` naming ``name`` unless ``value`` is a
    positive finite number (a positive integer with ``integer``)."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        expected = "a positive integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        expected = "a positive number of seconds"
    if not ok:
        raise UsageError(f"invalid {name} {value!r}: expected {expected}")
