"""Position tokens with a check: the grammar and the check itself (pure)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from pgfeed.core.cursor import check_spec
from pgfeed.core.positions import COMPLETE, Position, PositionToken
from pgfeed.core.tokens import token_check

ids = st.integers(0, 2**62)
positions = st.builds(Position, st.integers(0, 2**62), st.one_of(st.just(COMPLETE), st.integers(0, 2**62)))


def test_a_check_is_six_lowercase_hex_digits_and_depends_on_every_input() -> None:
    check = token_check(3, 17, 123456789)
    assert re.fullmatch(r"[0-9a-f]{6}", check)
    assert token_check(3, 17, 123456789) == check, "a pure function of its inputs"
    others = {token_check(4, 17, 123456789), token_check(3, 18, 123456789), token_check(3, 17, 123456788)}
    assert check not in others, "another stream, another incarnation, another tick"


@given(position=positions, check=st.one_of(st.none(), st.builds(token_check, ids, ids, ids)))
def test_tokens_round_trip_with_and_without_a_check(position: Position, check: str | None) -> None:
    token = PositionToken(position, check)
    text = str(token)
    assert PositionToken.parse(text) == token
    assert Position.parse(text) == position
    assert ("~" in text) == (check is not None)
    assert text.startswith(str(position))


def test_a_bare_token_has_no_check() -> None:
    assert PositionToken.parse("41") == PositionToken(Position(41), None)
    assert PositionToken.parse("41.7") == PositionToken(Position(41, 7), None)
    assert str(PositionToken.parse("41.7~00ff00")) == "41.7~00ff00"


def test_the_command_line_accepts_every_form_a_reader_does() -> None:
    for text in ("earliest", "now", "x1234", "s10:12:10,11", "41", "41.7", "41~00ff00", "41.7~00ff00"):
        assert check_spec(text) == text
