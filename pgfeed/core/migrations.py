"""Migration planning: which numbered SQL files to apply, or why not to. No I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pgfeed.errors import MigrationError

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    """One migration file: ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text; an applied file must never change."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def parse_file_name(file_name: str) -> tuple[int, str] | None:
    """``0001_initial.sql`` -> ``(1, "initial")``; other names -> ``None``."""
    m = _FILE_NAME.fullmatch(file_name)
    return (int(m.group(1)), m.group(2)) if m else None


def check_sequence(migrations: Iterable[Migration]) -> list[Migration]:
    """Sort by version and insist on 1, 2, 3, ... with no gap or repeat."""
    ordered = sorted(migrations, key=lambda m: m.version)
    for expected, m in enumerate(ordered, start=1):
        if m.version != expected:
            raise MigrationError(
                f"migration files are not numbered 1..N: expected {expected:04d}, found {m.version:04d}_{m.name}.sql"
            )
    return ordered


def plan(available: Iterable[Migration], applied: Mapping[int, str]) -> list[Migration]:
    """The migrations to apply, in order, given ``applied`` (version -> checksum).

    Refuses (raising :class:`MigrationError`, before anything is touched) a
    database that is newer than these files, whose applied versions have a
    hole, or whose applied files differ from the shipped ones.
    """
    known = check_sequence(available)
    newest_known = known[-1].version if known else 0
    newer = sorted(v for v in applied if v > newest_known)
    if newer:
        raise MigrationError(
            f"the database's pgfeed schema is at version {max(newer)}, newer than this pgfeed knows "
            f"(up to {newest_known}): upgrade pgfeed instead of migrating"
        )
    missing = [v for v in range(1, max(applied, default=0)) if v not in applied]
    if missing:
        raise MigrationError(
            f"the database's pgfeed schema records version {max(applied)} but not version {missing[0]}: "
            "its pgfeed.schema_version table was edited; restore it before migrating"
        )
    for m in known:
        recorded = applied.get(m.version)
        if recorded is not None and recorded != m.checksum:
            raise MigrationError(
                f"migration {m.version:04d}_{m.name}.sql was changed after it was applied "
                f"(checksum {recorded[:12]} in the database, {m.checksum[:12]} on disk): restore the original file"
            )
    return [m for m in known if m.version not in applied]
