"""Answering a question from the long-term memory: the oracle reader (rules) and the model reader (a prompt).

Both map the question to a slot of the shared vocabulary (``slots.py``) with :func:`question_slot`.
The *oracle reader* then reads ``store.current(user, slot)`` and answers with the stored value, or
``I don't know`` when the user never stated it (or retracted or deleted it): what the store and its
retrieval alone can answer, with no model in the way. The *model reader* retrieves the same current
record plus the best keyword/vector hits (``store.search``), writes them into a system message
(:func:`memory_messages`, rendered with the project's ChatML by whoever encodes it) and lets the model
answer greedily through the inference engine. The *choice reader* shows the model the same prompt but
does not let it write: it takes the most likely of the shown facts' values and ``I don't know``
(:func:`answer_choices`), so what it gets wrong is the choice (whose fact, which attribute, whether
to abstain), never the copy. The evaluation scores all three by exact match (:func:`normalize_answer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .extract import normalize
from .slots import ABSTAIN, RELATIONS, slot_name

_REL = "|".join(sorted(map(re.escape, RELATIONS), key=len, reverse=True))
_RELATION = re.compile(r"\bmy (" + _REL + r")(?:'s|s'|')?(?=\W|$)", re.I)
_FAVOURITE = re.compile(r"\bfavourite (colour|food|dish|meal|sport)\b", re.I)
_FAVOURITE_SLOTS = {"colour": "favourite_colour", "food": "favourite_food", "dish": "favourite_food",
                    "meal": "favourite_food", "sport": "favourite_sport"}
# Ordered: the first rule whose pattern occurs decides (a pet's name before a name, a company before a job).
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((key, re.compile(p, re.I)) for key, p in (
    ("dentist", r"\bdentist|\bdental\b"),
    ("haircut", r"\bhair ?cut|\bhair cut\b"),
    ("concert", r"\bconcert"),
    ("pet_name", r"\b(?:dog|cat|pet|puppy|kitten|rabbit|parrot|hamster)\b"),
    ("lucky_number", r"\blucky number\b"),
    ("employer", r"\bemployer\b|\bcompany\b|\bwhere\b.*\bwork|\bwho\b.*\bwork(?:s|ing)? (?:for|at)\b|"
                 r"\bwork(?:s|ing)? (?:at|for)\b|\bworkplace\b"),
    ("job", r"\bjob\b|\bprofession\b|\boccupation\b|\bfor a living\b|\bwork(?:s|ing)? as\b|\bwhat do(?:es)? .*\bdo\b"),
    ("city", r"\blives?\b|\bliving\b|\bcity\b|\baddress\b|\bbased\b|\breside|\bhome\b|\bmoved\b"),
    ("name", r"\bname\b|\bcalled\b|\bwho am i\b"),
))


def question_slot(question: str) -> str | None:
    """The slot a question asks about ("Where does my brother live?" -> "brother.city"), or None."""
    q = normalize(question)
    m = _RELATION.search(q)
    relation = RELATIONS[m.group(1).lower()] if m else None
    fav = _FAVOURITE.search(q)
    key = _FAVOURITE_SLOTS[fav.group(1).lower()] if fav else None
    if key is None:
        key = next((k for k, pattern in _RULES if pattern.search(q)), None)
    if key is None:
        return None
    try:
        return slot_name(key, relation)
    except ValueError:          # "my brother's dentist": not a slot we keep
        return None


@dataclass(frozen=True)
class Answer:
    text: str
    slot: str | None
    record: Any = None        # the MemoryRecord it read, when it read one

    @property
    def abstained(self) -> bool:
        return is_abstention(self.text)


def oracle_answer(store: Any, user: str, question: str, *, agent: str | None = None) -> Answer:
    """The stored current value of the question's slot, or ``I don't know`` (no slot, or nothing current)."""
    slot = question_slot(question)
    record = store.current(user, slot, agent=agent) if slot else None
    if record is None or not record.value:
        return Answer(ABSTAIN, slot)
    return Answer(record.value, slot, record)


def retrieve(store: Any, user: str, question: str, *, k: int = 5, agent: str | None = None) -> list[Any]:
    """What the model reader sees: the current record of the question's slot first, then the store's best
    search hits (current facts only), without duplicates, at most ``k``."""
    records: list[Any] = []
    slot = question_slot(question)
    if slot:
        current = store.current(user, slot, agent=agent)
        if current is not None:
            records.append(current)
    seen = {r.id for r in records}
    for hit in store.search(user, question, k=k, agent=agent):
        if hit.record.id not in seen:
            records.append(hit.record)
            seen.add(hit.record.id)
    return records[:k]


# The question opens the prompt as well as closing it: a recurrent layer (the Mamba2 backbone) reads the facts
# once, left to right, and keeps what its state can hold; told first what is asked, it can keep the one fact
# that answers ("Just read twice", Arora et al. 2024). On the small GPU readers (eval seeds 0-2, one training
# each) it gave recall 0.90 against 0.71 without, the rows otherwise alike; a second training with it gave 0.71
# on seed 0 alone and 0.65 on unseen seeds 3-4: not yet a measured gain (docs/memory.md, "The question first");
# kept for the argument, at ~18 tokens a prompt.
READER_SYSTEM = ("The user asks: {question}\n"
                 "You remember these facts about the user from earlier conversations:\n{facts}\n"
                 "Answer the user's question from these facts only, with the value alone (a name, a place, a "
                 "number or a date). If the facts do not say, answer exactly: " + ABSTAIN + ".")


def memory_messages(question: str, facts: list[str]) -> list[dict[str, str]]:
    """The chat the model reader answers: the question, then the retrieved facts (their stored sentences), in a
    system message; then the question again as the user's turn. The stage-4 generator writes its reader rows
    with this same function."""
    listing = "\n".join(f"- {fact}" for fact in facts) or "- (nothing)"
    return [{"role": "system", "content": READER_SYSTEM.format(question=question, facts=listing)},
            {"role": "user", "content": question}]


def model_answer(engine: Any, store: Any, user: str, question: str, *, k: int = 5, max_tokens: int = 16,
                 agent: str | None = None) -> Answer:
    """Retrieve, prompt, and let the model answer (greedy, through ``inference.Engine.chat``)."""
    from ..inference import SamplingParams

    records = retrieve(store, user, question, k=k, agent=agent)
    completion = engine.chat(memory_messages(question, [r.text for r in records]), SamplingParams(max_tokens=max_tokens,
                                                                                temperature=0.0))
    return Answer(completion.text.strip(), question_slot(question), records[0] if records else None)


def answer_choices(records: list[Any]) -> list[str]:
    """What the choice reader picks from: each shown fact's value once, in the prompt's order, then the
    abstention (a retracted fact has no value and is not a choice)."""
    values = dict.fromkeys(r.value for r in records if r.value and not is_abstention(r.value))
    return [*values, ABSTAIN]


def normalize_answer(text: str) -> str:
    """The form answers are compared in: the first line, casefolded, single spaces, no closing punctuation."""
    first = (text or "").strip().split("\n", 1)[0]
    first = normalize(first).casefold()
    return re.sub(r"^[\s\"'*]+|[\s.!\"'*]+$", "", first)


_ABSTENTIONS = frozenset({"i do not know", "i don't know", "unknown", "i do not remember", "i don't remember"})


def is_abstention(text: str) -> bool:
    return normalize_answer(text) in {normalize_answer(a) for a in _ABSTENTIONS}


def answers_match(answer: str, gold: str) -> bool:
    """Exact match after :func:`normalize_answer` (an abstention matches an abstention, however phrased)."""
    if is_abstention(gold):
        return is_abstention(answer)
    return normalize_answer(answer) == normalize_answer(gold)


def mentions(answer: str, value: str) -> bool:
    """Whether ``value`` occurs in the answer as a whole word sequence (how a deleted or stale value leaks); a
    hyphen binds like a letter, so the lucky number 27 is not in the date 2025-09-27."""
    pattern = r"(?<![\w-])" + re.escape(normalize_answer(value)) + r"(?![\w-])"
    return re.search(pattern, normalize(answer or "").casefold()) is not None
