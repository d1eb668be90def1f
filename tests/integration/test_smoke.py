import pgfeed


def test_append_and_read_back(pgfeed_conn):
    with pgfeed_conn.transaction():
        seq = pgfeed.append(pgfeed_conn, "caches", {"x": 1})
    assert seq >= 1
    rows = pgfeed_conn.execute("SELECT payload FROM pgfeed.events").fetchall()
    assert rows == [({"x": 1},)]
