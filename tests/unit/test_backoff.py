"""Reconnect backoff: exponential, capped, jittered, reset after success. No database."""

import random

from pgfeed.core.backoff import Backoff


def test_delays_grow_exponentially_within_jitter_bounds() -> None:
    b = Backoff(initial=0.1, maximum=100.0, rng=random.Random(1))
    for attempt in range(8):
        ceiling = 0.1 * 2**attempt
        delay = b.next_delay()
        assert ceiling / 2 <= delay <= ceiling
    assert b.attempt == 8


def test_delays_are_capped() -> None:
    b = Backoff(initial=0.1, maximum=2.0, rng=random.Random(2))
    delays = [b.next_delay() for _ in range(60)]  # 2**60 must not overflow into huge waits
    assert all(d <= 2.0 for d in delays)
    assert all(d >= 1.0 for d in delays[6:])


def test_reset_starts_again_from_initial() -> None:
    b = Backoff(initial=0.5, maximum=10.0, rng=random.Random(3))
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert 0.25 <= b.next_delay() <= 0.5


def test_jitter_spreads_processes_apart() -> None:
    """Many processes failing at once must not all retry at the same instant."""
    delays = {round(Backoff(initial=1.0, rng=random.Random(seed)).next_delay(), 6) for seed in range(50)}
    assert len(delays) > 40
    assert min(delays) < 0.6
    assert max(delays) > 0.9
