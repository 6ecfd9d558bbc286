"""Conversation memory: the oldest turns of a long chat folded into a running summary and its facts.

When a chat's transcript outgrows its token budget, the turns before the most recent ones leave the
working memory and are folded in here. The summary is extractive and deterministic, never free-form
model text (a small model asked to summarise drops or invents facts): for each folded turn, the facts
the extractor finds (``memory/extract.py``, passed in as ``facts_of``) and the first sentence of the user's
message and of the reply, cut to ``sentence_chars``. A fact about a slot replaces the older fact about that
slot ("I moved to Oslo" supersedes "I live in Paris"), as in the long-term store.

``block()`` renders what is injected back into the chat (a system message) within ``max_block_tokens``
tokens counted by the model's tokenizer, the ChatML markers included: the oldest turn lines go first,
then the oldest facts, and a single line too long alone is cut. The state round-trips through
``to_text`` / ``from_text`` (what ``store.put_summary`` keeps), and ``forget`` removes every line that
mentions deleted text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

FactsOf = Callable[[str], list[tuple[str | None, str]]]   # a user message -> (slot or None, fact sentence)
CountTokens = Callable[[str], int]                        # a block's text -> its tokens as a system message

HEADER = "Memory of this conversation (earlier turns, summarised):"
FACTS = "Facts:"
TURNS = "Earlier turns:"
_SENTENCE = re.compile(r"(.+?[.!?])(?:\s|$)", re.DOTALL)


@dataclass(frozen=True)
class ConversationBudget:
    """``max_transcript_tokens``: the working transcript's size that triggers folding; ``keep_recent_turns``:
    turns never folded; ``max_block_tokens``: the injected block's bound (the issue asks <= 1k);
    ``sentence_chars``: the most kept of a message's first sentence; ``max_lines``: turn lines kept at most."""

    max_transcript_tokens: int = 1536
    keep_recent_turns: int = 2
    max_block_tokens: int = 1024
    sentence_chars: int = 160
    max_lines: int = 64

    def __post_init__(self) -> None:
        for name in ("max_transcript_tokens", "max_block_tokens", "sentence_chars", "max_lines"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer (got {value!r})")
        if isinstance(self.keep_recent_turns, bool) or not isinstance(self.keep_recent_turns, int) \
                or self.keep_recent_turns < 0:
            raise ValueError(f"keep_recent_turns: must be an integer >= 0 (got {self.keep_recent_turns!r})")


def first_sentence(text: str, limit: int) -> str:
    """The first sentence of ``text`` on one line, cut to ``limit`` characters (an ellipsis marks a cut)."""
    flat = " ".join(text.split())
    match = _SENTENCE.match(flat)
    sentence = match.group(1) if match else flat
    return sentence if len(sentence) <= limit else sentence[:max(limit - 1, 0)].rstrip() + "…"


def mentions(line: str, needles: Iterable[str]) -> bool:
    """Whether ``line`` holds any of ``needles`` (case-insensitive, whole words at the needle's edges)."""
    low = line.casefold()
    for needle in needles:
        n = " ".join(needle.split()).casefold()
        if n and re.search(rf"(?<!\w){re.escape(n)}(?!\w)", low):
            return True
    return False


@dataclass
class ConversationMemory:
    """The folded part of one chat. ``facts``: slot (or None) and sentence, oldest first; ``lines``: one per
    folded message; ``covers_turns``: how many turns were folded in."""

    budget: ConversationBudget = field(default_factory=ConversationBudget)
    facts: list[tuple[str | None, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    covers_turns: int = 0

    def fold(self, turns: Iterable[Iterable[dict[str, str]]], facts_of: FactsOf) -> None:
        """Fold turns (each a list of messages) in, oldest first. System messages (memory blocks) are
        not summarised: what they held is in the store, and is retrieved again when relevant."""
        for messages in turns:
            for message in messages:
                role = message["role"]
                if role == "system":
                    continue
                if role == "user":
                    for slot, sentence in facts_of(message["content"]):
                        self._add_fact(slot, sentence)
                sentence = first_sentence(message["content"], self.budget.sentence_chars)
                if sentence:
                    self.lines.append(f"{role.capitalize()}: {sentence}")
            self.covers_turns += 1
        del self.lines[:-self.budget.max_lines]

    def _add_fact(self, slot: str | None, sentence: str) -> None:
        self.facts = [(s, f) for s, f in self.facts if f != sentence and (slot is None or s != slot)]
        self.facts.append((slot, sentence))

    def forget(self, needles: Iterable[str]) -> bool:
        """Drop every fact and line mentioning any of ``needles`` (deleted memories' texts and values);
        True when something was dropped."""
        needles = [n for n in needles if n and n.strip()]
        before = (len(self.facts), len(self.lines))
        self.facts = [(s, f) for s, f in self.facts if not mentions(f, needles)]
        self.lines = [line for line in self.lines if not mentions(line, needles)]
        return (len(self.facts), len(self.lines)) != before

    @property
    def empty(self) -> bool:
        return not self.facts and not self.lines

    # ---- the injected block ------------------------------------------------------------------------
    @staticmethod
    def render(entries: list[Entry]) -> str:
        """The block of ``entries`` (newest first, as ``block`` ranks them), shown oldest first per section."""
        facts = [t for section, t in reversed(entries) if section == "fact"]
        lines = [t for section, t in reversed(entries) if section == "line"]
        parts = [HEADER]
        if facts:
            parts += [FACTS, *(f"- {f}" for f in facts)]
        if lines:
            parts += [TURNS, *(f"- {line}" for line in lines)]
        return "\n".join(parts)

    def entries(self) -> list[Entry]:
        """Everything held, best kept first: the facts newest first, then the turn lines newest first."""
        return [("fact", f) for _, f in reversed(self.facts)] + [("line", line) for line in reversed(self.lines)]

    def block(self, count: CountTokens, max_tokens: int | None = None) -> str:
        """The summary as injected text within ``max_tokens`` (default: the budget's) by ``count``: the oldest
        turn lines are dropped first, then the oldest facts; "" when empty or when not even the header fits."""
        limit = self.budget.max_block_tokens if max_tokens is None else min(max_tokens, self.budget.max_block_tokens)
        return fit_block(self.render, self.entries(), count, limit)

    # ---- persistence -------------------------------------------------------------------------------
    def to_text(self) -> str:
        """The whole state as text (the untrimmed block): what ``store.put_summary`` keeps."""
        return self.render(self.entries())

    @classmethod
    def from_text(cls, text: str, covers_turns: int, budget: ConversationBudget | None = None) -> ConversationMemory:
        """The state ``to_text`` wrote (slots are not kept: facts restored are superseded by text only)."""
        memory = cls(budget or ConversationBudget(), covers_turns=covers_turns)
        section = None
        for line in text.splitlines():
            if line in (FACTS, TURNS):
                section = line
            elif line.startswith("- ") and section == FACTS:
                memory.facts.append((None, line[2:]))
            elif line.startswith("- ") and section == TURNS:
                memory.lines.append(line[2:])
        return memory


Entry = tuple[str, str]   # (section, text): what a bounded block is made of


def fit_block(render: Callable[[list[Entry]], str], entries: list[Entry], count: CountTokens, limit: int) -> str:
    """``render`` of the longest prefix of ``entries`` (best first) within ``limit`` tokens by ``count``; when
    not even the first fits alone, it is cut by halves. "" when nothing but the headers would fit.

    The prefix is found by bisection (tokens grow with the entries kept), so a long block costs O(log n)
    tokenizations, not one per dropped entry; the text returned is always one that was counted.
    """
    if not entries:
        return ""
    text = render(entries)
    if count(text) <= limit:
        return text
    low, high = 0, len(entries) - 1          # entries[:low] is known to fit (0: trivially)
    while low < high:
        mid = (low + high + 1) // 2
        if count(render(entries[:mid])) <= limit:
            low = mid
        else:
            high = mid - 1
    for n in range(low, 0, -1):              # normally the first try fits; the loop guards a non-monotone count
        text = render(entries[:n])
        if count(text) <= limit:
            return text
    section, entry = entries[0]
    while len(entry) > 8:
        entry = entry[:len(entry) // 2].rstrip() + "…"
        text = render([(section, entry)])
        if count(text) <= limit:
            return text
    return ""
