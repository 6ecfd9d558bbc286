"""Cutting a document into overlapping chunks whose character spans are kept, so hits can be cited.

A "token" here is a whitespace-separated word: the store must not depend on any model's tokenizer, and
word counts track subword counts closely enough for sizing retrieval units (a word is ~1.3 BPE tokens
in English). Chunks end at sentence or paragraph ends where they can; a sentence longer than a chunk is cut
between words. Every chunk is ``text[start:end]`` exactly, trimmed of surrounding whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_CHUNK_WORDS = 120
DEFAULT_OVERLAP_WORDS = 24

_WORD = re.compile(r"\S+")
_NAME_SEPARATORS = re.compile(r"[-_./\\]+")
# a sentence ends after . ! ? (optionally closed by quotes/brackets) before whitespace, or at a blank line
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*(?=\s)|\n[ \t]*\n")


@dataclass(frozen=True)
class ChunkSpan:
    index: int
    start: int
    end: int


def _units(text: str, max_words: int) -> list[list[tuple[int, int]]]:
    """Sentences as lists of word spans; a sentence over ``max_words`` is split into pieces of that size."""
    units: list[list[tuple[int, int]]] = []
    begin = 0
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    for cut in cuts:
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, begin, cut)]
        begin = cut
        for i in range(0, len(words), max_words):
            units.append(words[i:i + max_words])
    return [u for u in units if u]


def chunk_spans(text: str, *, max_words: int = DEFAULT_CHUNK_WORDS,
                overlap_words: int = DEFAULT_OVERLAP_WORDS) -> list[ChunkSpan]:
    """Chunks of at most ``max_words`` words, whole sentences where possible, consecutive chunks sharing
    the last whole sentences of up to ``overlap_words`` words (so a fact cut at a boundary is whole in one)."""
    if max_words < 1:
        raise ValueError(f"max_words: expected >= 1, got {max_words}")
    if not 0 <= overlap_words < max_words:
        raise ValueError(f"overlap_words: expected 0 <= overlap < max_words ({max_words}), got {overlap_words}")
    units = _units(text, max_words)
    spans: list[ChunkSpan] = []
    first = 0
    while first < len(units):
        last, words = first, len(units[first])
        while last + 1 < len(units) and words + len(units[last + 1]) <= max_words:
            last += 1
            words += len(units[last])
        spans.append(ChunkSpan(len(spans), units[first][0][0], units[last][-1][1]))
        if last + 1 >= len(units):
            break
        # start the next chunk at the earliest trailing sentences that fit the overlap, but always move on
        nxt, overlap = last + 1, 0
        while nxt - 1 > first and overlap + len(units[nxt - 1]) <= overlap_words:
            nxt -= 1
            overlap += len(units[nxt])
        first = nxt
    return spans


def chunk_title(name: str) -> str:
    """The words of a document's name (``"q3-budget_notes.md"`` -> ``"q3 budget notes md"``), indexed with each
    of its chunks: a chunk deep in a document keeps what the document is about (a contextual chunk header)."""
    return _NAME_SEPARATORS.sub(" ", name).strip() or name
