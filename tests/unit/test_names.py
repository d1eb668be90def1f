"""Stream names, table names and column lists, checked before anything reaches the database."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgfeed.core.names import (
    STREAM_NAME_RULE,
    check_stream_name,
    format_qualified_table,
    parse_column_list,
    parse_qualified_table,
)
from pgfeed.errors import InvalidStreamName, UsageError

#: Every kind of bad name the foundation issue lists, and a few more.
BAD_STREAM_NAMES = [
    "",
    "Orders",
    "ORDERS",
    "order-lines",
    "order lines",
    " orders",
    "orders ",
    "orders\n",
    "\norders",
    "orders\t",
    "it's",
    "'orders'",
    '"orders"',
    "orders;",
    "orders; DROP TABLE pgfeed.streams; --",
    "x'); DROP TABLE pgfeed.streams; --",
    'x"; DROP SCHEMA pgfeed CASCADE; --',
    "café",
    "ｏｒｄｅｒｓ",  # full-width letters
    "orders\u0131",  # dotless i
    "\u212aelvin",  # Kelvin sign, lower()s to ASCII k
    "1orders",
    "_orders",
    "9",
    "a" * 64,
    "a.b",
    "orders\x00",
    "pgfeed.orders",
]


@pytest.mark.parametrize("name", BAD_STREAM_NAMES)
def test_bad_stream_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidStreamName) as err:
        check_stream_name(name)
    message = str(err.value)
    assert STREAM_NAME_RULE in message
    assert "\n" not in message
    assert "\r" not in message
    assert isinstance(err.value, UsageError)


@pytest.mark.parametrize("name", ["a", "orders", "order_lines", "o2", "a" * 63, "a_" + "9" * 61, "caches"])
def test_good_stream_names_pass(name: str) -> None:
    assert check_stream_name(name) == name


@pytest.mark.parametrize("value", [None, 1, b"orders", ["orders"]])
def test_non_string_stream_names_are_refused(value: object) -> None:
    with pytest.raises(InvalidStreamName):
        check_stream_name(value)  # type: ignore[arg-type]


@given(st.text(max_size=70))
def test_stream_name_rule_matches_its_definition(name: str) -> None:
    ascii_lower = "abcdefghijklmnopqrstuvwxyz"
    expected = (
        1 <= len(name) <= 63 and name[0] in ascii_lower and all(c in ascii_lower + "0123456789_" for c in name[1:])
    )
    try:
        check_stream_name(name)
        accepted = True
    except InvalidStreamName:
        accepted = False
    assert accepted == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("orders", ("public", "orders")),
        ("shop.orders", ("shop", "orders")),
        ("Shop.Orders", ("shop", "orders")),
        ('"Shop"."Orders"', ("Shop", "Orders")),
        ('shop."Order Lines"', ("shop", "Order Lines")),
        ('"we.ird"."ta""ble"', ("we.ird", 'ta"ble')),
        ('"MixedCase"', ("public", "MixedCase")),
        (" shop . orders ", ("shop", "orders")),
        ('" padded "', ("public", " padded ")),
        ("CAFÉ", ("public", "cafÉ")),  # PostgreSQL folds only ASCII letters
        ('"Shop".orders', ("Shop", "orders")),
    ],
)
def test_qualified_table_names(text: str, expected: tuple[str, str]) -> None:
    assert parse_qualified_table(text) == expected


@pytest.mark.parametrize("text", ["", " ", ".", "a.", ".b", "a.b.c", '"unterminated', '""', 'a.""', "a. "])
def test_bad_table_names(text: str) -> None:
    with pytest.raises(UsageError, match="invalid table name"):
        parse_qualified_table(text)


def test_column_lists() -> None:
    assert parse_column_list(None) is None
    assert parse_column_list("") is None
    assert parse_column_list("id") == ["id"]
    assert parse_column_list("id, status") == ["id", "status"]
    assert parse_column_list('ID, "CustomerId"') == ["id", "CustomerId"]
    assert parse_column_list('"a,b",c') == ["a,b", "c"]
    with pytest.raises(UsageError, match="invalid column list"):
        parse_column_list('"open')
    with pytest.raises(UsageError, match="invalid column list"):
        parse_column_list("id,,status")
    with pytest.raises(UsageError, match="invalid column list"):
        parse_column_list("id,")


@pytest.mark.parametrize(
    ("schema", "table", "shown"),
    [
        ("public", "orders", "public.orders"),
        ("public", "MixedCase", 'public."MixedCase"'),
        ("we.ird", 'ta"ble', '"we.ird"."ta""ble"'),
        ("s", "order lines", 's."order lines"'),
        ("s", "1st", 's."1st"'),
    ],
)
def test_format_qualified_table(schema: str, table: str, shown: str) -> None:
    assert format_qualified_table(schema, table) == shown


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_format_then_parse_round_trips(schema: str, table: str) -> None:
    assert parse_qualified_table(format_qualified_table(schema, table)) == (schema, table)
