"""pgfeed.core.health: consumer states, health problems, formatting. No database."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from pgfeed.core import health
from pgfeed.core.health import (
    AppName,
    ConsumerStatus,
    Session,
    Status,
    StreamStatus,
    Thresholds,
    TickerStatus,
    Writer,
)
from pgfeed.errors import UsageError

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def stream(
    name: str = "orders", *, pending: int = 0, pending_since: datetime | None = None, **kw: object
) -> StreamStatus:
    values: dict[str, object] = dict(
        id=2,
        name=name,
        notify_mode="ticker",
        max_payload_bytes=1048576,
        created_tick=1,
        floor_tick=0,
        created_at=ago(3600),
        rows=120,
        bytes=8192,
        recent_rows=30,
        oldest_kept=ago(600),
        last_append=ago(2),
        pending_rows=pending,
        pending_since=pending_since,
        head=50,
    )
    values.update(kw)
    return StreamStatus(**values)  # type: ignore[arg-type]


def consumer(
    name: str = "billing", *, state: str = "live", lag_rows: int | None = 0, lag: float | None = 0.0
) -> ConsumerStatus:
    return ConsumerStatus(
        owner="app",
        consumer=name,
        stream="orders",
        token="50",
        updated_at=ago(5),
        seen_at=None,
        seen_by=None,
        lag_rows=lag_rows,
        lag_seconds=lag,
        state=state,
    )


LIVE = TickerStatus(
    term=4,
    holder="daemon host pid 9",
    kind="daemon",
    backend_pid=77,
    started_at=ago(600),
    heartbeat_at=ago(1),
    expires_at=NOW + timedelta(seconds=9),
    live=True,
    head_tick=50,
    head_taken_at=ago(0.5),
    ticks_last_minute=120,
)
DEAD = TickerStatus(
    term=4,
    holder="daemon host pid 9",
    kind="daemon",
    heartbeat_at=ago(40),
    live=False,
    head_tick=50,
    head_taken_at=ago(45),
)


def status(
    ticker: TickerStatus = LIVE,
    streams: list[StreamStatus] | None = None,
    consumers: list[ConsumerStatus] | None = None,
) -> Status:
    return Status(NOW, 6, ticker, streams if streams is not None else [stream()], consumers or [])


# -- thresholds ----------------------------------------------------------------
def test_max_lag_takes_a_default_and_per_consumer_values() -> None:
    assert health.parse_max_lag([]) == (300.0, {})
    assert health.parse_max_lag(["2m", "billing=1h", "a=b=5s"]) == (120.0, {"billing": 3600.0, "a=b": 5.0})
    t = Thresholds(max_lag=120.0, lag_overrides={"billing": 3600.0})
    assert t.lag_limit("billing") == 3600.0
    assert t.lag_limit("other") == 120.0


@pytest.mark.parametrize("bad", ["soon", "=5m", "billing=", "billing=5 parsecs"])
def test_max_lag_refuses_what_it_cannot_read(bad: str) -> None:
    with pytest.raises(UsageError):
        health.parse_max_lag([bad])


# -- application names and xids ---------------------------------------------------
def test_application_names_round_trip_and_fit_in_63_bytes() -> None:
    name = health.make_application_name("reader", ["orders", "audit"], "billing", pid=4711)
    assert name == "pgfeed reader pid=4711 orders,audit consumer=billing"
    parsed = health.parse_application_name(name)
    assert parsed is not None
    assert parsed == AppName("reader", ("orders", "audit"), "billing", pid=4711)
    assert parsed.holds("billing", "audit")
    assert not parsed.holds("billing", "payments")
    assert not parsed.holds("bill", "orders")
    # Names without a pid (written by hand, or by an older pgfeed) still parse.
    assert health.parse_application_name("pgfeed reader orders,audit consumer=billing") == AppName(
        "reader", ("orders", "audit"), "billing"
    )
    assert health.parse_application_name("pgfeed ticker") == AppName("ticker")
    assert health.parse_application_name("pgfeed reader pid=7") == AppName("reader", pid=7)
    assert health.parse_application_name("pgfeed reader consumer=a b") == AppName("reader", (), "a b")
    assert not AppName("reader", ("orders",)).holds("billing", "orders")  # no consumer named


def test_what_does_not_fit_in_an_application_name_is_left_out_visibly() -> None:
    streams = [f"stream_{i}" for i in range(20)]
    many = health.make_application_name("reader", streams, "billing", pid=4194304)
    assert many == "pgfeed reader pid=4194304 stream_0,+19 consumer=billing"
    parsed = health.parse_application_name(many)
    assert parsed is not None
    assert (parsed.streams, parsed.more_streams, parsed.consumer) == (("stream_0",), 19, "billing")
    assert parsed.holds("billing", "stream_19")  # may be among those left out
    # A consumer name too long for the rest is cut, marked, and matched as a prefix.
    long = health.make_application_name("reader", ["orders"], "é" * 40, pid=1)
    assert len(long.encode()) <= 63
    assert long.startswith("pgfeed reader pid=1 +1 consumer=éé")
    assert long.endswith(health.CUT_MARK)
    parsed = health.parse_application_name(long)
    assert parsed is not None
    assert parsed.consumer_cut
    assert parsed.holds("é" * 40, "orders")
    assert not parsed.holds("other", "orders")
    for n in range(80):
        fitted = health.make_application_name("reader", [f"s{i}" for i in range(n)], "c" * n, pid=99999)
        assert len(fitted.encode()) <= 63, fitted


@pytest.mark.parametrize("other", [None, "", "psql", "pgfeed", "pgfeedish reader", "pgfeed-victim"])
def test_other_application_names_are_not_pgfeeds(other: str | None) -> None:
    assert health.parse_application_name(other) is None


def test_a_32_bit_xid_is_widened_to_the_epoch_it_belongs_to() -> None:
    assert health.widen_xid(1000, 5000) == 1000
    assert health.widen_xid(1000, 3 * 2**32 + 5000) == 3 * 2**32 + 1000
    # Just before the wrap of the reference's epoch: the previous epoch.
    assert health.widen_xid(2**32 - 10, 3 * 2**32 + 5) == 2 * 2**32 + 2**32 - 10


# -- consumers -------------------------------------------------------------------
def test_reset_reasons_mirror_the_readers_tests() -> None:
    def reason(token: str, exists: bool = True, created: int = 5, floor: int = 10, head: int = 50) -> str | None:
        return health.reset_reason(token, stream_exists=exists, created_tick=created, floor_tick=floor, head=head)

    assert reason("20") is None
    assert reason("10") is None  # a complete position at the floor resumes
    assert reason("11.7") is None
    assert "no longer exists" in (reason("20", exists=False) or "")
    assert "incarnation" in (reason("4", floor=0) or "")
    assert "pruned" in (reason("9") or "")
    assert "pruned" in (reason("10.3") or "")  # a partial position needs its interval, which was pruned
    assert "beyond the newest tick" in (reason("51") or "")
    assert "cannot be resumed" in (reason("12.1.7") or "")  # pgfeed 0.1's partial token
    assert "cannot be resumed" in (reason("x12") or "")


def test_lag_seconds_counts_from_the_later_of_append_and_position_tick() -> None:
    assert health.lag_seconds(NOW, None, ago(5), ago(9)) is None
    assert health.lag_seconds(NOW, 0, ago(5), ago(9)) == 0.0
    assert health.lag_seconds(NOW, 3, ago(5), ago(9)) == 5.0
    # A long transaction appended an hour ago but committed after the position's tick.
    assert health.lag_seconds(NOW, 3, ago(3600), ago(9)) == 9.0
    assert health.lag_seconds(NOW, 3, None, ago(9)) == 9.0


@pytest.mark.parametrize(
    ("kw", "state"),
    [
        (dict(gone=True, reason="the stream no longer exists"), "gone"),
        (dict(reason="pruned"), "reset pending"),
        (dict(lag_rows=5, lag_seconds=301.0), "stalled"),
        (dict(lag_rows=5, lag_seconds=301.0, held=True), "stalled"),
        (dict(lag_rows=0, lag_seconds=0.0, last_seen_age=59.0), "live"),
        (dict(lag_rows=5, lag_seconds=299.0, last_seen_age=500.0, held=True), "live"),
        (dict(lag_rows=0, lag_seconds=0.0, last_seen_age=61.0), "idle"),
        (dict(lag_rows=None, lag_seconds=None, last_seen_age=None), "idle"),
    ],
)
def test_consumer_states(kw: dict[str, object], state: str) -> None:
    args: dict[str, object] = dict(
        reason=None,
        gone=False,
        lag_rows=0,
        lag_seconds=0.0,
        last_seen_age=None,
        held=False,
        max_lag=300.0,
        seen_within=60.0,
    )
    args.update(kw)
    assert health.consumer_state(**args) == state  # type: ignore[arg-type]


# -- problems --------------------------------------------------------------------
def test_an_idle_database_without_a_ticker_is_healthy() -> None:
    assert health.problems(status(DEAD), Thresholds()) == []


def test_a_dead_ticker_with_pending_rows_is_one_line() -> None:
    st = status(DEAD, [stream(pending=3, pending_since=ago(20))])
    (line,) = health.problems(st, Thresholds())
    assert line.startswith("ticker dead: no live lease; last holder 'daemon host pid 9', heartbeat 40.0s ago")
    assert "the newest tick (50) is 45.0s old and 3 committed rows wait for one" in line
    # Within the threshold the last tick is recent enough: not dead yet.
    assert health.problems(st, Thresholds(max_tick_age=60)) == []


def test_a_live_leader_that_does_not_tick_is_stuck() -> None:
    stuck = TickerStatus(**{**LIVE.__dict__, "head_taken_at": ago(100)})
    st = status(stuck, [stream(pending=2, pending_since=ago(80))])
    (line,) = health.problems(st, Thresholds())
    assert line.startswith("ticker stuck: daemon 'daemon host pid 9' holds the lease (term 4) but 2 committed rows")
    assert "waited 1m20s" in line
    # Rows that just committed have not waited long: healthy.
    fresh = status(stuck, [stream(pending=2, pending_since=NOW)])
    assert health.problems(fresh, Thresholds()) == []


def test_stalled_consumers_are_problems_and_lines_join_into_one() -> None:
    st = status(consumers=[consumer("a"), consumer("b", state="stalled", lag_rows=7, lag=400.0)])
    found = health.problems(st, Thresholds(lag_overrides={"b": 350.0}))
    assert found == ["consumer 'b' (role app) on stream 'orders' is stalled: 7 rows, 6m40s behind (max 5m50s)"]
    assert health.one_line(["x", "y", "z"]) == "x (and 2 more: y; z)"
    assert health.one_line(found) == found[0]


def test_check_wants_a_live_ticker_and_the_expected_schema() -> None:
    assert health.check_problems(status(), Thresholds(), expected_version=6) == []
    dead = health.check_problems(status(DEAD), Thresholds(), expected_version=6)
    assert dead == [
        "no live ticker: nobody holds the ticker lease (last holder 'daemon host pid 9', heartbeat 40.0s ago); "
        "start `pgfeed daemon`"
    ]
    old = health.check_problems(status(), Thresholds(), expected_version=7)
    assert old == ["the pgfeed schema is at version 6, this pgfeed expects 7: run `pgfeed migrate`"]
    assert health.check_summary(status()).startswith("ok: schema version 6, ticker daemon 'daemon host pid 9', term 4")


def test_status_and_check_name_a_refusal_to_tick_in_the_same_line() -> None:
    why = "this database was restored into another cluster: run `pgfeed repair --after-restore`"
    for ticker in (LIVE, DEAD):
        refused = status(replace(ticker, history_break=why), [stream(pending=0)])
        line = f"ticker refuses to tick: {why}"
        assert health.problems(refused, Thresholds()) == [line]
        assert health.check_problems(refused, Thresholds(), expected_version=6) == [line]


# -- formatting ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.0123, "12ms"),
        (4.25, "4.2s"),
        (192, "3m12s"),
        (5 * 3600 + 120, "5h02m"),
        (3 * 86400 + 4 * 3600, "3d04h"),
    ],
)
def test_ages(seconds: float | None, text: str) -> None:
    assert health.fmt_age(seconds) == text


def test_sizes() -> None:
    assert [health.fmt_bytes(n) for n in (812, 98304, 3565158, 2**31)] == ["812 B", "96 kB", "3.4 MB", "2.0 GB"]


def test_the_text_report_names_what_matters() -> None:
    blocker = Session(
        pid=4242,
        usename="alice",
        application_name="psql",
        client_addr="10.1.2.3",
        xact_start=ago(312),
        state="idle in transaction",
        query="SELECT pgfeed.append('orders', '{}')",
        backend_xid=9001,
    )
    app = "pgfeed reader pid=4711 orders consumer=billing"
    reader = [Session(pid=b, application_name=app, client_addr="10.0.0.5", usename="app") for b in (12, 11)]
    listener = Session(pid=13, application_name="pgfeed reader pid=4711", client_addr="10.0.0.5", usename="app")
    other = Session(pid=14, application_name="pgfeed reader pid=4711 audit", client_addr="10.0.0.6")
    st = Status(
        NOW,
        6,
        LIVE,
        [stream(captures=("public.orders",), writers=(Writer("orders", blocker, 17),))],
        [replace(consumer(state="stalled", lag_rows=7, lag=400.0), held_by=tuple(reader))],
        sessions=[*reader, listener, other],
    )
    text = health.format_text(st, Thresholds())
    assert "ticker: daemon 'daemon host pid 9' (backend pid 77), term 4, leading since 10m00s ago" in text
    assert "lease expires in 9.0s" in text
    assert "2.00 ticks/s" in text
    assert "public.orders" in text
    assert "orders: pid 4242 (psql, alice, 10.1.2.3) idle in transaction for 5m12s, xid 9001; 17 rows" in text
    assert "live readers: 2 processes, 4 sessions" in text
    lines = text.splitlines()
    header = lines.index("live readers: 2 processes, 4 sessions") + 1
    columns = ["PID", "HOST", "USER", "STREAMS", "CONSUMER", "POSITION", "LAG", "ROWS", "LAG", "BACKENDS"]
    assert lines[header].split() == columns
    # One process (its backends grouped by the pid their names carry), the consumer it holds.
    held = ["4711", "10.0.0.5", "app", "orders", "billing", "(orders)", "50", "7", "6m40s", "11,12,13"]
    assert lines[header + 1].split() == held
    assert lines[header + 2].split() == ["4711", "10.0.0.6", "-", "audit", "-", "-", "-", "-", "14"]
    line = next(li for li in text.splitlines() if li.strip().startswith("billing"))
    assert line.split() == ["billing", "app", "orders", "50", "7", "6m40s", "5.0s", "-", "stalled"]


def test_the_json_report_lists_live_readers_by_process() -> None:
    app = "pgfeed reader pid=4711 audit,orders,+2 consumer=billing"
    sessions = [Session(pid=b, application_name=app, client_addr="10.0.0.5", usename="app") for b in (11, 12)]
    held = replace(consumer(lag_rows=3, lag=1.5), held_by=tuple(sessions))
    old_style = Session(pid=21, application_name="pgfeed reader orders consumer=search")
    st = replace(status(LIVE, consumers=[held, consumer("search")]), sessions=[*sessions, old_style])
    doc = json.loads(json.dumps(health.to_json(st, Thresholds())))
    assert doc["readers"] == [
        {
            "pid": None,
            "host": None,
            "usename": None,
            "application_names": ["pgfeed reader orders consumer=search"],
            "streams": ["orders"],
            "more_streams": 0,
            "consumers": ["search"],
            "backends": [21],
            "positions": [],
        },
        {
            "pid": 4711,
            "host": "10.0.0.5",
            "usename": "app",
            "application_names": [app],
            "streams": ["audit", "orders"],
            "more_streams": 2,
            "consumers": ["billing"],
            "backends": [11, 12],
            "positions": [
                {
                    "consumer": "billing",
                    "stream": "orders",
                    "token": "50",
                    "lag_rows": 3,
                    "lag_seconds": 1.5,
                    "state": "live",
                }
            ],
        },
    ]


def test_the_json_report_is_complete_and_says_why_it_is_unhealthy() -> None:
    st = status(DEAD, [stream(pending=3, pending_since=ago(20))], [consumer()])
    doc = json.loads(json.dumps(health.to_json(st, Thresholds())))
    assert doc["healthy"] is False
    assert doc["problems"][0].startswith("ticker dead")
    assert doc["ticker"]["heartbeat_age"] == 40.0
    assert doc["ticker"]["pending_rows"] == 3
    assert doc["streams"][0]["rows_per_second"] == 0.5
    assert doc["streams"][0]["last_append"] == ago(2).isoformat()
    assert doc["consumers"][0]["last_seen_age"] == 5.0
    assert doc["consumers"][0]["max_lag"] == 300.0
    assert set(doc) >= {
        "now",
        "schema_version",
        "ticker",
        "streams",
        "consumers",
        "sessions",
        "xmin_holders",
        "readers",
    }
