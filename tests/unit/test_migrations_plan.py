"""The pure migration planner: which files to apply, or why to refuse. No database."""

import pytest

from pgfeed.core.migrations import Migration, check_sequence, parse_file_name, plan
from pgfeed.errors import MigrationError
from pgfeed.migrator import load_migrations, migrations_dir

M1 = Migration(1, "initial", "CREATE TABLE a ();")
M2 = Migration(2, "more", "CREATE TABLE b ();")
M3 = Migration(3, "yet_more", "CREATE TABLE c ();")


def applied(*ms: Migration) -> dict[int, str]:
    return {m.version: m.checksum for m in ms}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0001_initial.sql", (1, "initial")),
        ("0042_add_x_2.sql", (42, "add_x_2")),
        ("0001_initial.sql~", None),
        ("001_initial.sql", None),
        ("0001-initial.sql", None),
        ("0001_Initial.sql", None),
        ("0001_.sql", None),
        ("README.md", None),
        ("0001_initial.SQL", None),
    ],
)
def test_parse_file_name(name: str, expected: tuple[int, str] | None) -> None:
    assert parse_file_name(name) == expected


def test_fresh_database_gets_everything_in_order() -> None:
    assert plan([M3, M1, M2], {}) == [M1, M2, M3]


def test_partially_applied_gets_the_rest() -> None:
    assert plan([M1, M2, M3], applied(M1)) == [M2, M3]


def test_up_to_date_is_an_empty_plan() -> None:
    assert plan([M1, M2], applied(M1, M2)) == []


def test_no_files_and_nothing_applied() -> None:
    assert plan([], {}) == []


def test_checksum_is_sha256_of_the_text_and_changes_with_it() -> None:
    assert len(M1.checksum) == 64
    assert Migration(1, "initial", M1.sql + " ").checksum != M1.checksum
    assert Migration(9, "other", M1.sql).checksum == M1.checksum  # content only


def test_changed_applied_file_is_refused_naming_it() -> None:
    tampered = Migration(1, "initial", M1.sql + "\n-- edited")
    with pytest.raises(MigrationError, match=r"0001_initial\.sql was changed after it was applied") as info:
        plan([tampered, M2], applied(M1))
    assert M1.checksum[:12] in str(info.value)
    assert tampered.checksum[:12] in str(info.value)
    assert "\n" not in str(info.value)


def test_changed_pending_file_is_fine() -> None:
    edited = Migration(2, "more", M2.sql + "-- not applied yet")
    assert plan([M1, edited], applied(M1)) == [edited]


def test_database_newer_than_the_files_is_refused() -> None:
    with pytest.raises(MigrationError, match=r"version 3, newer than this pgfeed knows \(up to 2\)"):
        plan([M1, M2], applied(M1, M2, M3))


def test_database_newer_than_no_files_at_all() -> None:
    with pytest.raises(MigrationError, match="newer than this pgfeed knows"):
        plan([], applied(M1))


def test_hole_in_applied_versions_is_refused() -> None:
    with pytest.raises(MigrationError, match="records version 3 but not version 2"):
        plan([M1, M2, M3], applied(M1, M3))


@pytest.mark.parametrize(
    "files",
    [[M2, M3], [M1, M3], [M1, M1], [Migration(0, "zero", ""), M1]],
    ids=["no-1", "gap", "repeat", "zero"],
)
def test_files_must_be_numbered_1_to_n(files: list[Migration]) -> None:
    with pytest.raises(MigrationError, match=r"not numbered 1\.\.N"):
        check_sequence(files)
    with pytest.raises(MigrationError, match=r"not numbered 1\.\.N"):
        plan(files, {})


def test_shipped_migrations_load_and_plan(tmp_path) -> None:  # type: ignore[no-untyped-def]
    shipped = load_migrations()
    assert [m.version for m in shipped] == list(range(1, len(shipped) + 1))
    assert shipped[0].name == "initial"
    assert plan(shipped, {}) == shipped
    assert migrations_dir().is_dir()
    # Files that are not migrations are ignored; a directory is read as a whole.
    for m in shipped:
        (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    (tmp_path / "notes.txt").write_text("not a migration")
    assert load_migrations(tmp_path) == shipped
