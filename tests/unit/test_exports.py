"""What ``import pgfeed`` offers: every error a public call can raise is catchable by name."""

from __future__ import annotations

import inspect

import pgfeed
from pgfeed import errors


def test_every_error_class_is_exported() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, errors.PgfeedError) and value.__module__ == errors.__name__
    }
    assert len(defined) >= 20  # the hierarchy, not an empty module
    assert sorted(defined - set(pgfeed.__all__)) == []
    for name in defined:
        assert getattr(pgfeed, name) is getattr(errors, name)


def test_everything_in_all_is_there() -> None:
    assert sorted(name for name in pgfeed.__all__ if not hasattr(pgfeed, name)) == []
    assert len(pgfeed.__all__) == len(set(pgfeed.__all__))
