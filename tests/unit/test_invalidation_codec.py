"""Decoding the payloads of the ``caches`` stream (pgfeed.invalidate_v2 writes them)."""

from __future__ import annotations

from typing import Any

import pytest

from pgfeed.core.invalidation import Invalidation, decode


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"cache": "users", "keys": ["1", "2"]}, Invalidation("users", ["1", "2"])),
        ({"cache": "users", "keys": None}, Invalidation("users", None)),
        ({"cache": "users"}, Invalidation("users", None)),
        ({"cache": "users", "keys": "1"}, Invalidation("users", None)),  # not a list: the whole cache
        ({"cache": 7, "keys": []}, Invalidation("7", [])),
        (["users"], Invalidation("None", None)),  # not an object: a cache nobody registers
        (None, Invalidation("None", None)),
    ],
)
def test_decode(payload: Any, expected: Invalidation) -> None:
    assert decode(payload) == expected


def test_decoded_keys_are_a_fresh_list() -> None:
    keys = ["a"]
    decoded = decode({"cache": "c", "keys": keys})
    assert decoded.keys == keys
    assert decoded.keys is not keys
