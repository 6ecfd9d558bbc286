"""What the memory store hands back: plain frozen records, no connection or cursor attached.

Times are ISO-8601 UTC strings (``2026-12-02T01:35:00.123456+00:00``), which sort as text in the same
order as in time; that is why SQLite can compare them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("fact", "note", "event")


@dataclass(frozen=True)
class MemoryRecord:
    """One remembered statement of a user, with both of its times.

    ``valid_from``/``valid_to``: when the statement was true in the world (``valid_to`` None: still true).
    ``recorded_at``: when the store learned it. ``superseded_by``: the id of the record that replaced it
    (same ``slot``), so "what did I say before?" follows the chain instead of reading overwritten text.
    """

    id: int
    user: str
    text: str
    slot: str | None
    value: str | None
    kind: str
    session: str | None
    agent: str | None
    valid_from: str
    valid_to: str | None
    recorded_at: str
    superseded_by: int | None
    source: str | None

    @property
    def is_current(self) -> bool:
        return self.valid_to is None and self.superseded_by is None


@dataclass(frozen=True)
class MemoryHit:
    """A record found by :meth:`MemoryStore.search`; ``rank`` starts at 1, higher ``score`` is better."""

    record: MemoryRecord
    score: float
    rank: int


@dataclass(frozen=True)
class DocumentHit:
    """A chunk of a user's document; ``text == document_text[start:end]`` (character offsets), so it can be cited."""

    doc_id: int
    name: str
    chunk_index: int
    start: int
    end: int
    text: str
    score: float
    rank: int
