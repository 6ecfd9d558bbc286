"""Relative dates: what the generator says and what the extractor resolves agree, by the documented conventions."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta

import pytest

from mamba_moe.memory.dates import find_date, parse_clock, relative_phrase


@pytest.mark.parametrize("text,expected", [
    ("yesterday", date(2026, 3, 3)),
    ("the day before yesterday", date(2026, 3, 2)),
    ("earlier today", date(2026, 3, 4)),
    ("3 days ago", date(2026, 3, 1)),
    ("two days ago", date(2026, 3, 2)),
    ("a week ago", date(2026, 2, 25)),
    ("last Tuesday", date(2026, 3, 3)),       # 2026-03-04 is a Wednesday: the latest Tuesday before today
    ("last Wednesday", date(2026, 2, 25)),    # strictly before today: a week ago, not today
    ("on Friday", date(2026, 2, 27)),
    ("on 2025-12-24", date(2025, 12, 24)),
    ("on March 1st", date(2026, 3, 1)),
    ("on 5 March", date(2025, 3, 5)),         # no year, not after today: last year's
    ("on the 5th of March 2026", date(2026, 3, 5)),
])
def test_phrases_resolve_against_the_clock(text, expected):
    found = find_date(f"I went there {text}, it was fun", "2026-03-04T10:00:00+00:00")
    assert found is not None and found.day == expected
    assert f"I went there {text}, it was fun"[found.start:found.end].lower().endswith(text.split()[-1].lower())


@pytest.mark.parametrize("text", ["last week", "recently", "in May", "on 2026-02-30", "a while ago", "tomorrow?"])
def test_vague_or_impossible_dates_resolve_to_nothing(text):
    assert find_date(f"I did it {text}", "2026-03-04T10:00:00Z") is None


def test_february_29_without_a_year_is_the_latest_leap_day():
    assert find_date("on February 29", "2025-03-01T10:00:00Z").day == date(2024, 2, 29)
    assert find_date("on 29 February", "2024-02-01T10:00:00Z").day == date(2020, 2, 29)
    assert find_date("on February 30", "2025-03-01T10:00:00Z") is None


def test_generator_phrases_round_trip_on_random_days(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(300):
        today = date(2024, 1, 1) + timedelta(days=rng.randint(0, 1500))
        day = today - timedelta(days=rng.randint(0, 60))
        phrase = relative_phrase(day, today)
        found = find_date(f"I got a haircut {phrase}.", datetime(today.year, today.month, today.day, 15).isoformat())
        assert found is not None and found.day == day, (today, day, phrase)


def test_clock_forms_and_errors():
    assert parse_clock("2026-03-04T23:30:00-02:00") == date(2026, 3, 5)    # UTC day
    assert parse_clock("2026-03-04T10:00:00Z") == date(2026, 3, 4)
    assert parse_clock(date(2026, 1, 2)) == date(2026, 1, 2)
    with pytest.raises(ValueError, match="now: expected an ISO-8601 time"):
        parse_clock("yesterday-ish")
