"""Durations given on the command line ("50ms", "90s", "15m", "12h", "7d")."""

from __future__ import annotations

import re

from pgfeed.errors import UsageError

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|[smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; a number with a unit ms, s, m, h or d."""
    m = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if m is None:
        raise UsageError(
            f"invalid duration {text!r}: expected a number and a unit ms, s, m, h or d, e.g. 7d, 90m or 50ms"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]
