"""Relative dates in a message ("yesterday", "last Tuesday", "3 days ago") resolved against the conversation's clock.

Conventions (the dialogue generator writes dates with the same ones, and the tests check both ways):
"last <weekday>" and "on <weekday>" are the most recent such day strictly before today (said on a
Wednesday, "last Tuesday" is yesterday and "last Wednesday" a week ago); "N days ago" counts calendar
days; "today" / "this morning" / "tonight" are today. Absolute dates are ISO (``2026-03-04``) or
"March 4" / "4 March" (optionally with the year; without it, the latest such day not after today).
Vague phrases ("last week", "recently") are not dates: they resolve to nothing rather than to a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
NUMBER_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
                "ten": 10, "a couple of": 2, "a few": 3}

_MONTH = "|".join(MONTHS)
_DAY = r"(\d{1,2})(?:st|nd|rd|th)?"
_PATTERNS = (
    ("iso", re.compile(r"\b(?:on )?(\d{4})-(\d{2})-(\d{2})\b")),
    ("before_yesterday", re.compile(r"\bthe day before yesterday\b", re.I)),
    ("yesterday", re.compile(r"\byesterday(?: (?:morning|afternoon|evening|night))?\b", re.I)),
    ("today", re.compile(r"\b(?:today|this (?:morning|afternoon|evening)|tonight|earlier today)\b", re.I)),
    ("days_ago", re.compile(r"\b(\d{1,3}|" + "|".join(NUMBER_WORDS) + r") days ago\b", re.I)),
    ("week_ago", re.compile(r"\b(?:a|one) week ago\b", re.I)),
    ("weekday", re.compile(r"\b(?:last|on|this past) (" + "|".join(WEEKDAYS) + r")\b", re.I)),
    ("month_day", re.compile(r"\b(?:on )?(" + _MONTH + r") " + _DAY + r"(?:,? (\d{4}))?\b", re.I)),
    ("day_month", re.compile(r"\b(?:on )?(?:the )?" + _DAY + r"(?: of)? (" + _MONTH + r")(?:,? (\d{4}))?\b", re.I)),
)


@dataclass(frozen=True)
class FoundDate:
    day: date
    start: int     # the phrase's span in the text, so the caller can cut it out of a value
    end: int


def parse_clock(when: str | datetime | date) -> date:
    """The calendar day (UTC) of an ISO-8601 time string, a datetime or a date."""
    if isinstance(when, datetime):
        return (when.astimezone(UTC) if when.tzinfo else when).date()
    if isinstance(when, date):
        return when
    try:
        parsed = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise ValueError(f"now: expected an ISO-8601 time, got {when!r}") from None
    return (parsed.astimezone(UTC) if parsed.tzinfo else parsed).date()


def _latest_not_after(today: date, month: int, day: int) -> date | None:
    for year in range(today.year, today.year - 9, -1):   # February 29 may lie up to 8 years back
        try:
            candidate = date(year, month, day)
        except ValueError:   # no such day this year (Feb 29 of a common year; Feb 30 of any)
            continue
        if candidate <= today:
            return candidate
    return None


def _resolve(kind: str, m: re.Match[str], today: date) -> date | None:
    if kind == "iso":
        try:
            return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            return None
    if kind == "before_yesterday":
        return today - timedelta(days=2)
    if kind == "yesterday":
        return today - timedelta(days=1)
    if kind == "today":
        return today
    if kind == "days_ago":
        word = m.group(1).lower()
        n = NUMBER_WORDS[word] if word in NUMBER_WORDS else int(word)
        return today - timedelta(days=n)
    if kind == "week_ago":
        return today - timedelta(days=7)
    if kind == "weekday":
        back = (today.weekday() - WEEKDAYS.index(m.group(1).lower())) % 7 or 7
        return today - timedelta(days=back)
    if kind == "month_day":
        month, day, year = MONTHS.index(m.group(1).lower()) + 1, int(m.group(2)), m.group(3)
    else:
        day, month, year = int(m.group(1)), MONTHS.index(m.group(2).lower()) + 1, m.group(3)
    if year:
        try:
            return date(int(year), month, day)
        except ValueError:
            return None
    return _latest_not_after(today, month, day)


def find_date(text: str, now: str | datetime | date) -> FoundDate | None:
    """The first date phrase of ``text`` (leftmost; the longer phrase when two start together), resolved."""
    today = parse_clock(now)
    best: tuple[int, int, str, re.Match[str]] | None = None
    for kind, pattern in _PATTERNS:
        m = pattern.search(text)
        if m and (best is None or (m.start(), -m.end()) < (best[0], -best[1])):
            best = (m.start(), m.end(), kind, m)
    if best is None:
        return None
    day = _resolve(best[2], best[3], today)
    return None if day is None else FoundDate(day, best[0], best[1])


def relative_phrase(day: date, today: date) -> str:
    """How a person says ``day`` on ``today`` (the generator's side of the conventions above): the inverse of
    :func:`find_date` for days 0-13 before today, an ISO date otherwise."""
    back = (today - day).days
    if back == 0:
        return "today"
    if back == 1:
        return "yesterday"
    if back == 2:
        return "the day before yesterday"
    if 3 <= back <= 6:
        return f"last {WEEKDAYS[day.weekday()].capitalize()}"
    if back == 7:
        return "a week ago"
    if 8 <= back <= 13:
        return f"{back} days ago"
    return f"on {day.isoformat()}"
