"""The ticker lease's rules, checked on the lease row itself (the failover
behaviour with real daemons is in tests/stress/test_ticker_failover.py)."""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def _claim(conn: Conn, who: str, kind: str = "daemon") -> int | None:
    row = conn.execute("SELECT term FROM pgfeed.ticker_claim_v2(%s, %s, 10000)", (who, kind)).fetchone()
    return None if row is None else int(row[0])


def test_a_live_lease_holds_off_claims_until_it_expires(pgfeed_conn: Conn) -> None:
    term = _claim(pgfeed_conn, "first")
    assert term is not None
    assert _claim(pgfeed_conn, "second") is None
    pgfeed_conn.execute("UPDATE pgfeed.ticker SET expires_at = clock_timestamp() - interval '1 second'")
    assert _claim(pgfeed_conn, "second") == term + 1


def test_a_lease_stamped_in_the_servers_future_can_be_claimed(pgfeed_conn: Conn) -> None:
    """After the server's clock went back by an hour, the leader's lease would
    hold off every candidate for an hour more if it died: a heartbeat from
    the future counts as expired (the old leader is fenced by the new term)."""
    term = _claim(pgfeed_conn, "first")
    assert term is not None
    pgfeed_conn.execute(
        "UPDATE pgfeed.ticker SET heartbeat_at = clock_timestamp() + interval '1 hour',"
        " expires_at = clock_timestamp() + interval '1 hour'"
    )
    assert _claim(pgfeed_conn, "second") == term + 1
    assert pgfeed_conn.execute("SELECT pgfeed.ticker_renew_v2(%s, 10000)", (term,)).fetchone() == (False,)
