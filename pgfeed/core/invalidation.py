"""The payload of an invalidation row on the ``caches`` stream.

``pgfeed.invalidate_v2(cache_name, keys)`` appends
``{"cache": cache_name, "keys": [key, ...] | null}`` (``null``: the whole
cache); :func:`decode` reads one back. Pure, and lenient: a row some other
writer put on the stream invalidates nothing rather than failing the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The built-in stream that invalidations are appended to.
CACHES_STREAM = "caches"


@dataclass(frozen=True)
class Invalidation:
    """Drop ``keys`` of cache ``cache`` (every key when ``keys`` is None)."""

    cache: str
    keys: list[str] | None


def decode(payload: Any) -> Invalidation:
    """The invalidation a ``caches`` row's payload asks for. A payload that
    is not an object names the cache ``"None"`` (which nobody registers);
    keys that are not a list mean the whole cache."""
    fields = payload if isinstance(payload, dict) else {}
    keys = fields.get("keys")
    return Invalidation(str(fields.get("cache")), list(keys) if isinstance(keys, list) else None)
