"""Tests against several real PostgreSQL servers: hot standby, failover, restores, pg_upgrade."""
