"""Shared test setup. The real-PostgreSQL fixtures come from the pgfeed.testing plugin."""
