"""The pure core of pgfeed: no psycopg, no asyncio, no I/O. Unit-tested without a database."""
