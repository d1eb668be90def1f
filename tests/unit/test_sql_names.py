"""The names the Python and the migrations' SQL must agree on: the
notification channels and the built-in ``caches`` stream. Each is defined
once in Python; the migrations spell them too (a released migration never
changes), so this pins that both say the same. No database."""

from __future__ import annotations

import re

import pytest

from pgfeed.core.invalidation import CACHES_STREAM
from pgfeed.migrator import load_migrations
from pgfeed.ticker import LEASE_CHANNEL, TICKS_CHANNEL, WAKE_CHANNEL

SQL = "\n".join(m.sql for m in load_migrations())


@pytest.mark.parametrize("channel", [TICKS_CHANNEL, WAKE_CHANNEL, LEASE_CHANNEL])
def test_every_channel_the_python_listens_on_is_notified_by_the_sql(channel: str) -> None:
    assert f"pg_notify('{channel}'" in SQL


def test_the_sql_notifies_no_channel_the_python_does_not_know() -> None:
    notified = set(re.findall(r"pg_notify\('([a-z0-9_]+)'", SQL))
    current = {c for c in notified if c.startswith("pgfeed_v2_")}
    assert current == {TICKS_CHANNEL, WAKE_CHANNEL, LEASE_CHANNEL}


def test_the_caches_stream_is_the_one_invalidations_append_to() -> None:
    assert f"pgfeed.append_v2('{CACHES_STREAM}'," in SQL
    assert f"pgfeed.create_stream_v1('{CACHES_STREAM}')" in SQL
