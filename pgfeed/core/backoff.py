"""Reconnect delays: exponential backoff with full jitter, as a tiny pure class."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``initial * 2**attempt`` capped at ``maximum``, each drawn
    uniformly from ``[delay/2, delay]`` so that many processes reconnecting
    after a server restart do not arrive at the same instant."""

    initial: float = 0.1
    maximum: float = 10.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts as a failure."""
        delay = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Call after a success: the next failure starts from ``initial`` again."""
        self.attempt = 0
