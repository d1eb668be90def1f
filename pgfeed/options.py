"""How a reader polls, probes, batches, retries and connects: one definition for both readers.

:class:`ReaderOptions` holds each option's name, type, default and meaning
once, and checks every value in one place (``__post_init__``).
:class:`~pgfeed.reader.AsyncReader` and :class:`~pgfeed.sync.Reader` take the
same names as keyword arguments (their defaults are read from here) or a ready
``options=ReaderOptions(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from pgfeed.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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

    pool_size: int | None = None
    """Pooled connections for reads; None (the default): ``max_connections - 1``, what the budget leaves
    beside the listener. A pool_size that does not fit in ``max_connections`` is refused."""

    max_connections: int = 2
    """The connections this reader keeps open: its listener plus ``max_connections - 1`` pooled for reads
    (at least 2). The embedded ticker holds one more only while it leads (a follower campaigns through
    the reader's pool), so a reader process holds 2 backends by default, 3 while it is the ticker."""

    handler_retries: int = 5
    """How often a raising :meth:`~pgfeed.reader.AsyncReader.on` handler is called again with the same
    batch (with backoff) before its subscription stops with :class:`~pgfeed.errors.HandlerFailed`
    (0: stop at the first failure)."""

    save_interval: float = 1.0
    """Seconds between saves of named consumers' positions (they are saved on close too)."""

    ticker: str = "auto"
    """``"auto"``: this process may be the database's ticker while no ``pgfeed daemon`` runs, if its
    role may tick; ``"off"``: it never ticks (readers with only the reader grant, hot standbys)."""

    ticker_lease: float = 10.0
    """Seconds a dead embedded ticker holds the ticker lease before another process takes over."""

    heartbeat: float | None = None
    """Seconds between heartbeats of the named consumers this reader follows (``pgfeed.consumer_heartbeat_v2``:
    ``pgfeed status`` then shows them live on a quiet stream); None (the default): none. See
    :mod:`pgfeed.heartbeat`."""

    metrics: CollectorRegistry | bool | None = None
    """A ``prometheus_client.CollectorRegistry`` (the application's own) in which the reader registers its
    metrics and counts what it delivers, reconnects, resets and its lag (``True``: the default registry;
    None: no metrics). Readers of one process given the same registry share its series. Nothing is served;
    see :mod:`pgfeed.metrics`."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _LEAST:
                check_integer(f.name, value, least=_LEAST[f.name])
            elif isinstance(f.default, int | float) and not isinstance(f.default, bool):
                check_positive(f.name, value, integer=isinstance(f.default, int))
        if self.pool_size is not None:
            check_positive("pool_size", self.pool_size, integer=True)
            if self.pool_size + 1 > self.max_connections:
                raise UsageError(
                    f"pool_size {self.pool_size} does not fit in max_connections {self.max_connections} (the "
                    f"listener takes one): raise max_connections to {self.pool_size + 1} or leave pool_size unset"
                )
        if self.heartbeat is not None:
            check_positive("heartbeat", self.heartbeat)
        if not (self.metrics is None or isinstance(self.metrics, bool)):
            from prometheus_client import CollectorRegistry

            if not isinstance(self.metrics, CollectorRegistry):
                raise UsageError(
                    f"invalid metrics {self.metrics!r}: expected a prometheus_client.CollectorRegistry, "
                    "True (the default registry) or None"
                )
        if self.ticker not in TICKER_MODES:
            raise UsageError(
                f"invalid ticker {self.ticker!r}: expected 'auto' (tick here when no daemon does) or 'off'"
            )

    @property
    def read_connections(self) -> int:
        """The size of the read pool: ``pool_size``, or what ``max_connections`` leaves beside the listener."""
        return self.pool_size if self.pool_size is not None else self.max_connections - 1

    @classmethod
    def merge(cls, base: ReaderOptions | None, given: Mapping[str, Any]) -> ReaderOptions:
        """``base`` (or the defaults) with each value of ``given`` that differs from its default."""
        defaults = cls()
        changed = {name: value for name, value in given.items() if value != getattr(defaults, name)}
        return replace(base or defaults, **changed)


OPTION_NAMES = frozenset(f.name for f in fields(ReaderOptions))

#: Integer options whose least value is not 1: handlers may get no retry; the
#: listener and at least one read connection.
_LEAST = {"handler_retries": 0, "max_connections": 2}


def check_integer(name: str, value: object, *, least: int) -> None:
    """Raise a one-line :class:`UsageError` naming ``name`` unless ``value`` is an integer >= ``least``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise UsageError(f"invalid {name} {value!r}: expected an integer of at least {least}")


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
