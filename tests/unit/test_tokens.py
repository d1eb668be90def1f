"""Position tokens with a check: the grammar and the check itself (pure)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgfeed.core.cursor import (
    Cursor,
    StreamMeta,
    TickFacts,
    check_spec,
    named_token,
    needs_proof,
    parse_spec,
    prove_token,
    saved_position_distrusted,
)
from pgfeed.core.positions import COMPLETE, Position, PositionToken
from pgfeed.core.tokens import token_check
from pgfeed.errors import FutureToken, TokenError

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


# -- proving a token against what the database holds -------------------------

META = StreamMeta(id=7, created_tick=10, floor_tick=12)
FP = 0x0123456789ABCDE


def checked(text: str, meta: StreamMeta = META, fp: int = FP) -> PositionToken:
    pos = Position.parse(text)
    return PositionToken(pos, token_check(meta.id, meta.created_tick, fp))


def test_a_check_computed_from_the_incarnation_and_the_ticks_fingerprint_is_proven() -> None:
    for text in ("20", "20.5"):
        prove_token("s", checked(text), META, TickFacts(exists=True, fp=FP, names_row=True))


@pytest.mark.parametrize(
    "token",
    [
        checked("20", fp=FP + 1),  # another history: the tick's fingerprint differs
        checked("20", StreamMeta(id=8, created_tick=10)),  # another stream
        checked("20", StreamMeta(id=7, created_tick=3)),  # another incarnation (an id reused after a restore)
        PositionToken(Position(20), "abcdef"),  # hand-altered
    ],
)
def test_a_check_that_does_not_match_is_refused_in_one_line(token: PositionToken) -> None:
    with pytest.raises(TokenError, match=r"does not belong to stream 's' on this database") as refused:
        prove_token("s", token, META, TickFacts(exists=True, fp=FP, names_row=True))
    assert "\n" not in str(refused.value)
    with pytest.raises(TokenError, match="does not belong"):
        prove_token("s", token, META, TickFacts(exists=True, fp=None, names_row=True))


def test_a_partial_token_must_name_a_row_of_the_stream_in_its_tick() -> None:
    for token in (PositionToken(Position(20, 5)), checked("20.5")):
        with pytest.raises(TokenError, match=r"names no row of stream 's'.*resume from 19 to read tick 20 whole"):
            prove_token("s", token, META, TickFacts(exists=True, fp=FP, names_row=False))
    prove_token("s", PositionToken(Position(20)), META, TickFacts(exists=True, fp=FP, names_row=False))


@pytest.mark.parametrize(
    ("token", "facts"),
    [
        (checked("20.5", fp=FP + 1), TickFacts(exists=False)),  # tick pruned: the cursor resets
        (PositionToken(Position(12, 5)), TickFacts(exists=True, fp=FP)),  # partial at the floor: pruned
        (PositionToken(Position(14, 5)), TickFacts(exists=True, fp=FP, floor_tick=14)),  # pruned since the meta
        (PositionToken(Position(8, 5)), TickFacts(exists=True, fp=FP)),  # bare, older than the incarnation
    ],
)
def test_tokens_that_cannot_be_proven_are_left_to_the_cursor_which_resets(
    token: PositionToken, facts: TickFacts
) -> None:
    prove_token("s", token, META, facts)


def test_only_tokens_with_a_check_or_a_seq_need_the_database() -> None:
    assert not needs_proof(PositionToken(Position(20)))
    assert needs_proof(PositionToken(Position(20, 1)))
    assert needs_proof(checked("20"))


def test_named_token_parses_once_and_refuses_the_future() -> None:
    assert named_token("earliest", 30, "since") is None
    assert named_token("now", 30, "since") is None
    assert named_token("20.5~00ff00", 30, "since") == PositionToken(Position(20, 5), "00ff00")
    assert named_token(Position(20, 5), 30, "since") == PositionToken(Position(20, 5))
    assert parse_spec(PositionToken(Position(20, 5), "00ff00"), 30, META, "since") == Position(20, 5)
    with pytest.raises(FutureToken, match="newest tick 30"):
        named_token("31~00ff00", 30, "since")


def test_a_saved_position_is_never_refused_it_resets_when_its_tick_is_another() -> None:
    facts = TickFacts(exists=True, fp=FP, names_row=True)
    assert saved_position_distrusted(Position(20), FP, META, facts) is None
    assert saved_position_distrusted(Position(20), None, META, facts) is None, "saved before 0007: unverified"
    changed = saved_position_distrusted(Position(20, 5), FP + 1, META, facts)
    assert changed is not None
    assert changed.startswith("the database's history changed since this consumer saved its position 20.5")
    no_row = saved_position_distrusted(Position(20, 5), None, META, replace(facts, names_row=False))
    assert no_row is not None
    assert "names no row" in no_row
    assert saved_position_distrusted(Position(20), FP + 1, META, TickFacts(exists=False)) is None, "pruned"


def test_a_distrusted_start_resets_to_the_streams_first_tick() -> None:
    cursor = Cursor("s")
    cursor.start(PositionToken(Position(20, 5)), None, 30, META, distrust="history changed")
    assert (cursor.fetch, cursor.delivered, cursor.pending_reset) == (Position(12), Position(12), "history changed")
