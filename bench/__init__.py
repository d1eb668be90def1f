"""pgfeed's benchmarks: ``python -m bench [--quick] [--only NAME] [--dsn DSN]``.

One module per benchmark (``write``, ``latency``, ``fanout``, ``idle``,
``ticks``, ``catchup``), each with ``run(ctx) -> Section``; :mod:`bench.servers`
starts the PostgreSQL they measure (fsync on), :mod:`bench.harness` holds the
processes and counters they share, :mod:`bench.__main__` runs them and writes
the Markdown report. Nothing in pgfeed is patched: every figure comes from
public APIs, from the processes' own clocks and from the server's statistics.
"""
