"""Facts from a user's message by constrained slot filling: deterministic store operations, never free text.

``Extractor.extract(message, now=...)`` reads one user message and returns :class:`Operation` s:
``set`` (slot = value; the store supersedes the old value and keeps it as history), ``retract`` ("I no
longer work at X": the fact ends, history stays), ``forget`` ("forget my address": the slot's rows are
physically removed) and ``forget_all``. ``apply_operations`` runs them against a ``MemoryStore``.

Rules are the floor (the model is never asked to write JSON or to copy old text; the optional model
check in :func:`confirm_with_model` only scores "yes"/"no" per proposed fact). A message is cut into
clauses; each clause must match one pattern *as a whole*, anchored at its start, so a fact is only taken
from a plain first-person statement:

- questions ("Do I live in Paris?"), conditionals and hedges ("If I moved to Rome", "I might move to
  Rome", "I think I live in …"), negations ("my name is not Bob") and reported speech ("my friend says I
  live in Rome") match nothing;
- third-party statements ("my brother lives in Oslo") are kept as the relative's fact, slot
  ``brother.city`` — never the user's ``city`` — so "where does my brother live?" can still be answered;
- "actually, it's Y" / "sorry, I meant Y" corrects the slot set in the last two messages (and nothing when
  there is none: a correction without a fact to correct is dropped);
- relative dates are resolved against ``now`` (``dates.py``); a vague one ("last week") drops the event;
- each value is checked against its slot's kind (a city is a short name, not "a small flat near the
  river"; a lucky number is digits), so a pattern that matched too much stores nothing.

Messages longer than ``MAX_MESSAGE_CHARS`` are not scanned (counted in ``skipped``): a fact is a
sentence, and a 10 MB paste must not cost a regex pass per clause on the reply's path.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..user_text import check_text
from .dates import find_date, parse_clock
from .slots import ATTRIBUTES, RELATIONS, fact_text, slot_name, split_slot

MAX_MESSAGE_CHARS = 20_000
MAX_VALUE_CHARS = 60
CORRECTION_WINDOW = 2        # user messages after a fact during which "actually, it's Y" may correct it


@dataclass(frozen=True)
class Operation:
    """One deterministic store operation. ``value``: the new value (set) or the value said to end (retract,
    None: whatever is current). ``at``: the message's clock, ISO-8601 UTC (valid_from / the retraction)."""

    op: str                    # set | retract | forget | forget_all
    slot: str | None
    value: str | None
    at: str
    clause: str

    @property
    def text(self) -> str | None:
        """The sentence the store keeps for a ``set`` (readable by a model, findable by keywords)."""
        return fact_text(self.slot, self.value) if self.op == "set" and self.slot and self.value else None


# ---- normalising text ---------------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"', "`": "'"})
_CONTRACTIONS = [(re.compile(p, re.I), r) for p, r in (
    (r"\bi'm\b", "I am"), (r"\bi've\b", "I have"), (r"\bi'd\b", "I would"), (r"\bi'll\b", "I will"),
    (r"\bit's\b", "it is"), (r"\bthat's\b", "that is"), (r"\bwhat's\b", "what is"), (r"\bcan't\b", "cannot"),
    (r"\bwon't\b", "will not"), (r"\b(do|does|did|is|are|was|were|have|has|had)n't\b", r"\1 not"),
    (r"\bfavorite\b", "favourite"), (r"\bcolor\b", "colour"),
    (r"\b(name|number|colour|food|dish|sport|job)'s\b", r"\1 is"))]     # "my lucky number's 13"


def normalize(text: str) -> str:
    """NFKC, straight quotes, single spaces, contractions expanded and US spellings folded (values keep case)."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = re.sub(r"[\u200b-\u200f\u2060\ufeff]", "", text)      # zero-width characters split no word
    text = re.sub(r"\s+", " ", text).strip()
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return text


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n\s*")
_SUBCLAUSE = re.compile(r"(?:[,;]\s*|\s+)(?:and|but|while|whereas|so|also)\s+(?=(?:i|my)\b)|[,:]\s+(?=(?:i|my)\b)",
                        re.I)
_MARKERS = re.compile(
    r"^(?:oh|ah|so|well|ok|okay|also|and|but|yes|yeah|right|anyway|anyways|btw|by the way|fyi|just so you know|"
    r"for the record|guess what|big news|news|update|quick update|fun fact|note|please note|i should mention|"
    r"i wanted to tell you|just to let you know|let me tell you|to be honest|honestly|oh and|and also|sadly|"
    r"unfortunately|happily|luckily|these days|nowadays|anyhow)"
    r"(?: that)?(?:\s*[,:!\-\u2013\u2014]+\s*|\s+)", re.I)
_GREETING = re.compile(r"^(?:hi|hello|hey|good (?:morning|afternoon|evening)|greetings)(?: there)?\b[,!.:\s]*", re.I)
_CORRECTION = re.compile(r"^(?:actually|sorry|oops|whoops|no|wait|no wait|correction|my mistake|my bad)\b[,:!.\s]*",
                         re.I)
_TRAILER = re.compile(r"(?:[,\s]+(?:please\s+)?(?:remember that|remember this|remember it|keep that in mind|"
                      r"note that|thanks|thank you|lol|haha|for now|please))+\W*$", re.I)
_QUESTION_START = re.compile(r"^(?:what|where|who|whom|whose|when|why|how|which|do|does|did|is|are|am|was|were|can|"
                             r"could|would|will|should|shall|may|might|have|has|if|whether|suppose|imagine|"
                             r"pretend)\b", re.I)


_TAG_QUESTION = re.compile(r",\s*(?:what|how|do|does|did|are|is|can|could|would|will|where|who|and you|"
                           r"what about you|how about you)\b[^,]*$", re.I)


@dataclass(frozen=True)
class Clause:
    text: str
    question: bool
    greeting: bool
    correction: bool


def _strip_markers(text: str) -> tuple[str, bool]:
    """``text`` without leading discourse markers; True when one of them marks a correction ("actually, …")."""
    correction = False
    while True:
        stripped = _MARKERS.sub("", text, count=1)
        m = _CORRECTION.match(stripped)
        if m and m.end() < len(stripped):
            stripped, correction = stripped[m.end():], True
        if stripped == text:
            return text, correction
        text = stripped


def _sentences(message: str) -> list[str]:
    """Sentences, with a question tagged onto a statement split off ("My name is Ada, what is yours?")."""
    out = []
    for sentence in _SENTENCE_END.split(normalize(message)):
        sentence = sentence.strip()
        m = _TAG_QUESTION.search(sentence) if sentence.endswith("?") else None
        if m and m.start() > 0:
            out += [sentence[:m.start()] + ".", sentence[m.start():].lstrip(" ,")]
        elif sentence:
            out.append(sentence)
    return out


def clauses(message: str) -> list[Clause]:
    """The message cut into sentences and then at "and I …" / ", my …", each stripped of discourse markers."""
    out, greeted = [], False
    for sentence in _sentences(message):
        greeting = greeted or bool(_GREETING.match(sentence))
        question = sentence.endswith("?")
        sentence, correction = _strip_markers(_GREETING.sub("", sentence, count=1))
        greeted = not sentence.strip(" .!,")       # "Hello there! I am Ada.": the greeting was its own sentence
        for i, part in enumerate(_SUBCLAUSE.split(sentence)):
            text, marked = _strip_markers(part.strip())
            text = _TRAILER.sub("", text)
            text = re.sub(r"[\s.!?;:\u2026\"']+$", "", text).strip(" \"'")
            if text:
                out.append(Clause(text, question or bool(_QUESTION_START.match(text)), greeting,
                                  marked or (correction and i == 0)))
    return out


# ---- values -------------------------------------------------------------------------------------

_STOP_START = frozenset(
    "a an the not no my your his her their our this that these those it its going moving thinking trying planning "
    "about at in on for to from with some any very so really just sure also still never always sometimes maybe "
    "probably here there being getting looking gonna kind sort none nothing something unknown what where who when "
    "why how nowhere anywhere somewhere everywhere like as by of or and night nights home weekends work school "
    "fear peace".split())
_CUT = re.compile(
    r"(?:\s*[,(\u2013\u2014]|\s+-\s|\s+(?:now|these days|nowadays|at the moment|currently|any ?more|any longer|too|"
    r"as well|again|since|for (?:a|the|about|almost|over|nearly|\d+|two|three|four|five|many|several|some|ten|"
    r"years|months|weeks|a while)|because|but|with|which|who|whom|where|when|last (?:week|month|year)|"
    r"recently|a while ago|not|instead|from|after|before|though|although|if|unless|and (?:i|my)|yet|anyway|"
    r"i think|i guess|i believe|apparently|probably|mostly|usually|often|a lot|for (?:work|school|university|"
    r"business|my studies))\b).*$", re.I)
_MAX_WORDS = {"name": 4, "place": 5, "org": 6, "words": 4}


def uses_case(message: str) -> bool:
    """Whether the writer capitalises names: a capital letter starting a word that neither opens a sentence
    nor is the pronoun "I" (one linear pass)."""
    previous = "."
    for m in re.finditer(r"\S+", message):
        word = m.group()
        core = word.strip("\"'()[]{},;")
        first = next((ch for ch in core if ch.isalpha()), "")
        if first.isupper() and previous not in ".!?:" and core.split("'")[0] != "I":
            return True
        previous = word[-1]
    return False


def clean_value(raw: str, kind: str, *, cased: bool = True) -> str | None:
    """The value a pattern captured, cut at qualifiers ("Oslo now", "Acme for years") and checked against its
    kind; None when it is not a plausible value of that kind. A name, place or organisation in lower case
    is refused from a writer who capitalises names (``cased``: "I live in fear of spiders"), and from one
    who does not it may be at most two words ("i live in tokyo")."""
    value = _CUT.sub("", raw).strip(" \"'.!?;:")
    if not value or len(value) > MAX_VALUE_CHARS or "<|" in value:
        return None
    if kind == "number":
        return value if re.fullmatch(r"\d{1,9}", value) else None
    words = value.split()
    if len(words) > _MAX_WORDS[kind] or words[0].lower() in _STOP_START:
        return None
    if not all(re.fullmatch(r"[\w'&.\-]+", w) and re.search(r"[^\W\d_]", w) for w in words):
        return None
    if kind == "name" and any(ch.isdigit() for ch in value):
        return None
    if kind in ("name", "place", "org") and not (value[0].isupper() or value[0].isdigit()):
        if cased or len(words) > 2:
            return None
    return value


# ---- patterns -----------------------------------------------------------------------------------

_REL = "(?P<rel>" + "|".join(sorted(map(re.escape, RELATIONS), key=len, reverse=True)) + ")"
_POSS = r"my (?:" + _REL + r"(?:'s|s'|') )?"          # "my " / "my brother's "
_PET = r"(?:dog|cat|pet|puppy|kitten|rabbit|parrot|hamster)"
_NOW = r"(?:now |currently |still |also |really )?"
_JUST = r"(?:just |recently |finally |now |since )?"

# (attribute or "favourite", pattern); the pattern matches the whole clause. ``rel`` present: a third party.
_SETS: list[tuple[str, str]] = [
    ("pet_name", r"my " + _PET + r"(?:'s name is| is called| is named| goes by) (?P<v>.+)"),
    ("pet_name", r"(?:i|we) (?:have|got|adopted|own) a (?:new |little |young )?" + _PET +
                 r" (?:called|named) (?P<v>.+)"),
    ("name", _POSS + r"(?:first |full )?name is (?:now )?(?P<v>.+)"),
    ("name", r"(?:please )?call me (?P<v>.+)"),
    ("name", r"i am (?:called|named) (?P<v>.+)"),
    ("name", r"i go by (?P<v>.+)"),
    ("name", r"(?:everyone|everybody|people|my friends|friends) (?:call|calls) me (?P<v>.+)"),
    ("name", r"the name is (?P<v>.+)"),
    ("name", r"i am (?P<v>[^,]+), (?:nice|pleased|glad|good) to meet you"),
    ("name", r"my " + _REL + r" is (?:called|named) (?P<v>.+)"),
    ("city", r"(?:i|we) " + _NOW + r"(?:live|am living|are living|reside|am based|are based|am staying|"
             r"have been living) in (?P<v>.+)"),
    ("city", r"(?:i|we) (?:have |had )?" + _JUST + r"(?:moved|relocated) (?:back )?to (?P<v>.+)"),
    ("city", r"my " + _REL + " " + _NOW + r"(?:lives|is living|resides|is based|has been living) in (?P<v>.+)"),
    ("city", r"my " + _REL + r" (?:has |had )?" + _JUST + r"(?:moved|relocated) (?:back )?to (?P<v>.+)"),
    ("job", r"i " + _NOW + r"work as (?:a |an )?(?P<v>.+)"),
    ("job", r"i am (?:a |an )(?P<v>.+?) by (?:profession|trade)"),
    ("job", r"my " + _REL + " " + _NOW + r"works as (?:a |an )?(?P<v>.+)"),
    ("job", _POSS + r"(?:job|profession|occupation)(?: title)? is (?:now )?(?:a |an )?(?P<v>.+)"),
    ("employer", r"i " + _NOW + r"work (?:at|for) (?P<v>.+)"),
    ("employer", r"i (?:have )?" + _JUST + r"(?:started working|started a (?:new )?job|got a (?:new )?job|"
                 r"took a (?:new )?job|accepted a (?:new )?job|am working|got hired|have been working|am employed|"
                 r"have been employed) (?:at|for|with|by) (?P<v>.+)"),
    ("employer", r"i (?:have )?" + _JUST + r"joined (?P<v>.+)"),
    ("employer", r"my " + _REL + " " + _NOW + r"works (?:at|for) (?P<v>.+)"),
    ("employer", r"my " + _REL + r" (?:has )?" + _JUST + r"(?:started working|got a (?:new )?job) (?:at|for|with) "
                 r"(?P<v>.+)"),
    ("employer", _POSS + r"(?:employer|company) is (?:now )?(?P<v>.+)"),
    ("favourite", _POSS + r"(?:new |current |all-time )?favourite (?P<what>colour|food|dish|meal|sport) is "
                  r"(?:now |still |definitely )?(?P<v>.+)"),
    ("lucky_number", _POSS + r"lucky number is (?:now |still )?(?P<v>.+)"),
    ("favourite", r"(?P<v>.+?) is (?:now |still |definitely )?" + _POSS + r"(?:new |current |all-time )?favourite "
                  r"(?P<what>colour|food|dish|meal|sport)"),       # "Purple is my favourite colour"
    ("lucky_number", r"(?P<v>\d+) is " + _POSS + r"lucky number"),
]
_EVENTS: list[tuple[str, str]] = [
    ("dentist", r"i (?:went to|visited|saw|was at) (?:the|my) dentist(?:'s)?(?P<v>.*)"),
    ("dentist", r"i had (?:a|my) (?:dentist(?:'s)?|dental) (?:appointment|check-?up|visit)(?P<v>.*)"),
    ("haircut", r"(?:i )?(?:got|had) (?:a |my )?(?:new )?haircut(?P<v>.*)"),      # "Got a haircut today"
    ("haircut", r"(?:i )?had my hair cut(?P<v>.*)"),
    ("concert", r"i (?:went to|saw|attended|was at) an? (?:[^\W\d_]+ )?(?:live )?concert(?P<v>.*)"),
]
_RETRACTS: list[tuple[str, str]] = [
    ("city", r"i (?:do not|no longer|don't) live in (?P<v>.+)"),
    ("city", r"i am (?:no longer|not) living in (?P<v>.+)"),
    ("city", r"i (?:have )?moved (?:away|out) (?:from|of) (?P<v>.+)"),
    ("city", r"my " + _REL + r" (?:does not|no longer) lives? in (?P<v>.+)"),
    ("employer", r"i (?:do not|no longer) work (?:at|for) (?P<v>.+)"),
    ("employer", r"i (?:have )?(?:quit|left|lost) my job(?: at (?P<v>.+))?"),
    ("employer", r"i (?:have )?(?:quit|left) (?P<v>.+)"),
    ("employer", r"i (?:got|was|have been) (?:fired|laid off|let go)(?: (?:from|by) (?P<v>.+))?"),
    ("employer", r"my " + _REL + r" (?:does not|no longer) works? (?:at|for) (?P<v>.+)"),
    ("job", r"i (?:do not|no longer) work as (?:a |an )?(?P<v>.+)"),
    ("pet_name", r"my (?:old |little |beloved )?" + _PET + r"(?: (?P<v>[^,]+?))? (?:has )?(?:passed away|died)"),
    ("pet_name", r"i (?:no longer|do not) have a " + _PET),
    ("pet_name", r"i (?:gave away|rehomed) my " + _PET + r"(?: (?P<v>.+))?"),
]
_FORGET = re.compile(r"(?:(?:please|can you|could you|would you|will you|kindly)\s+)*"
                     r"(?:forget|delete|erase|remove|drop|wipe|(?:do not|stop) remember(?:ing)?)\s+(?P<what>.+?)"
                     r"(?:\s+(?:from (?:your )?(?:memory|records|notes|database)|any ?more|any longer))?", re.I)
_FORGET_ALL = re.compile(r"(?:everything|all)(?: (?:of )?(?:you know|my data|my information|my details|that you "
                         r"know|you have))?(?: about me)?", re.I)
_FORGET_PREFIX = re.compile(r"^(?:what i (?:told|said to) you about|what you know about|everything (?:about|on)|"
                            r"all about|the fact about|about)\s+", re.I)
_FORGET_WHERE = re.compile(r"(?:where|which city) (?:i|my " + _REL + r") (?P<verb>lives?|works?|am living|"
                           r"is living)(?: in| at)?", re.I)
_CORRECTED = re.compile(r"(?:it is|it was|it is actually|that is|that should be|should be|i meant|i mean|make that|"
                        r"i meant to say|i mean to say)\s+(?P<v>.+)", re.I)


def _compiled(table: list[tuple[str, str]]) -> list[tuple[str, re.Pattern[str]]]:
    return [(key, re.compile(pattern, re.I)) for key, pattern in table]


_SETS_RE, _EVENTS_RE, _RETRACTS_RE = _compiled(_SETS), _compiled(_EVENTS), _compiled(_RETRACTS)
_FAVOURITE = {"colour": "favourite_colour", "food": "favourite_food", "dish": "favourite_food",
              "meal": "favourite_food", "sport": "favourite_sport"}
_FORGET_PHRASES = sorted(((phrase, key) for key, a in ATTRIBUTES.items() for phrase in a.forget_phrases),
                         key=lambda pk: len(pk[0]), reverse=True)


def _relation(m: re.Match[str]) -> str | None:
    word = m.groupdict().get("rel")
    return RELATIONS[word.lower()] if word else None


def _slot(attribute: str, relation: str | None) -> str | None:
    if relation is not None and not ATTRIBUTES[attribute].about_others:
        return None
    return slot_name(attribute, relation)


def _forget_target(what: str) -> str | None:
    """"my address" -> "city", "where my brother lives" -> "brother.city", "everything" -> "*" (all)."""
    if _FORGET_ALL.fullmatch(what.strip()):
        return "*"
    what = _FORGET_PREFIX.sub("", what.strip()).strip()
    m = _FORGET_WHERE.fullmatch(what)
    if m:
        return _slot("city" if m.group("verb").lower().startswith(("live", "am", "is")) else "employer",
                     _relation(m))
    if what.lower() == "what i do for a living":
        return "job"
    m = re.fullmatch(_POSS + r"(?P<phrase>.+)", what, re.I) or re.fullmatch(r"the (?P<phrase>.+)", what, re.I)
    if not m:
        return None
    phrase, relation = m.group("phrase").lower(), _relation(m)
    for candidate, key in _FORGET_PHRASES:
        if phrase == candidate:
            return _slot(key, relation)
    return None


def _without_date(raw: str, now: str) -> str:
    """"New York yesterday" -> "New York": the date says when, it is not part of the value."""
    found = find_date(raw, now)
    return raw if found is None else (raw[:found.start] + raw[found.end:]).strip()


# ---- the extractor ------------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.now(UTC).isoformat()


class Extractor:
    """Slot filling over one conversation: keeps the last slot set, so a correction knows what it corrects."""

    def __init__(self) -> None:
        self.last_slot: str | None = None
        self._since_last = 0
        self._cased = self._capitals = True
        self.skipped: Counter[str] = Counter()

    def extract(self, message: str, *, now: str | None = None) -> list[Operation]:
        """The operations a user message asks for, in the order they were said. ``now``: the message's time
        (ISO-8601; default the wall clock), the day relative dates count from."""
        check_text(message, "message")
        now = now or utc_now()
        parse_clock(now)   # a bad clock fails here, by name, not inside a date phrase
        self._since_last += 1
        if self._since_last > CORRECTION_WINDOW:
            self.last_slot = None
        if len(message) > MAX_MESSAGE_CHARS:
            self.skipped["too-long"] += 1
            return []
        ops: list[Operation] = []
        # lower-case names only from someone who writes no capital at all; places and organisations also
        # from someone who capitalises nothing but sentences and "I" ("I live in tokyo")
        self._cased = uses_case(normalize(message))
        self._capitals = any(ch.isupper() for ch in message)
        for clause in clauses(message):
            op = self._clause(clause, now)
            if op is None:
                continue
            ops.append(op)
            if op.op == "set":
                self.last_slot, self._since_last = op.slot, 0
            elif op.slot == self.last_slot or op.op == "forget_all":
                self.last_slot = None
        return ops

    def _clause(self, clause: Clause, now: str) -> Operation | None:
        text = clause.text
        m = _FORGET.fullmatch(text)
        if m:
            target = _forget_target(m.group("what"))
            if target == "*":
                return Operation("forget_all", None, None, now, text)
            return Operation("forget", target, None, now, text) if target else None
        if clause.question:
            return None
        for key, pattern in _RETRACTS_RE:
            m = pattern.fullmatch(text)
            if m:
                slot = _slot(key, _relation(m))
                raw = m.groupdict().get("v")
                kind = ATTRIBUTES[key].value_kind
                value = clean_value(_without_date(raw, now), kind, cased=self._cased_for(kind)) if raw else None
                if slot is None or (raw and value is None and key != "pet_name"):
                    return None
                return Operation("retract", slot, value, now, text)
        for key, pattern in _EVENTS_RE:
            m = pattern.fullmatch(text)
            if m:
                return self._event(key, m.group("v"), now, text)
        for key, pattern in _SETS_RE:
            m = pattern.fullmatch(text)
            if not m:
                continue
            if key == "favourite":
                key = _FAVOURITE[m.group("what").lower()]
            slot = _slot(key, _relation(m))
            kind = ATTRIBUTES[key].value_kind
            value = clean_value(_without_date(m.group("v"), now), kind, cased=self._cased_for(kind))
            if value and kind == "words" and m.start("v") == 0 and value[1:] == value[1:].lower():
                value = value[0].lower() + value[1:]   # "Purple is my favourite colour": the sentence's capital
            return Operation("set", slot, value, now, text) if slot and value else None
        if clause.greeting:   # "Hi, I'm Ada": an introduction; "I am tired" is not (no greeting, no capital)
            m = re.fullmatch(r"i am (?P<v>.+)", text, re.I)
            value = clean_value(m.group("v"), "name") if m else None
            if value and all(w[0].isupper() for w in value.split()):
                return Operation("set", "name", value, now, text)
        if clause.correction and self.last_slot:
            m = _CORRECTED.fullmatch(text)
            if m:
                _, attribute = split_slot(self.last_slot)
                if attribute.value_kind == "date":   # "Sorry, I meant last Tuesday": resolved as the event was
                    return self._event(self.last_slot, m.group("v"), now, text)
                value = clean_value(m.group("v"), attribute.value_kind, cased=self._cased_for(attribute.value_kind))
                return Operation("set", self.last_slot, value, now, text) if value else None
        return None

    def _cased_for(self, kind: str) -> bool:
        return self._capitals if kind == "name" else self._cased

    def _event(self, key: str, tail: str, now: str, text: str) -> Operation | None:
        found = find_date(tail, now)
        if found is None:
            if tail.strip():          # "last week", "in May": vague or unknown, better nothing than a guess
                return None
            day = parse_clock(now)    # "I went to the dentist." said today
        else:
            rest = (tail[:found.start] + tail[found.end:]).strip(" ,.")
            if rest and not re.fullmatch(r"(?:again|too|as well|finally|at last)", rest, re.I):
                return None
            day = found.day
        return Operation("set", key, day.isoformat(), now, text)


def extract(message: str, *, now: str | None = None) -> list[Operation]:
    """The operations of one message on its own (no conversation: a correction has nothing to correct)."""
    return Extractor().extract(message, now=now)


# ---- running operations on the store ------------------------------------------------------------

def same_value(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold().strip() == b.casefold().strip()


def apply_operations(store: Any, user: str, ops: Sequence[Operation], *, session: str | None = None,
                     agent: str | None = None, source: str | None = "extract") -> list[Any]:
    """Run ``ops`` on a ``MemoryStore`` for ``user``; returns the records written (sets and retractions).

    A ``set`` equal to the current value writes nothing (no empty new version); a ``retract`` naming a
    value ends the fact only when that is the current value ("I no longer live in Rome" while the store
    says Oslo changes nothing); ``forget`` removes every version of the slot (history included) from the
    rows, the keyword index and the vectors, through the store's ``forget``.
    """
    written = []
    for op in ops:
        if op.op == "set":
            current = store.current(user, op.slot, agent=agent)
            if current is not None and same_value(current.value, op.value):
                continue
            kind = "event" if split_slot(op.slot)[1].value_kind == "date" else "fact"
            written.append(store.add(user, op.text, slot=op.slot, value=op.value, kind=kind, session=session,
                                     agent=agent, valid_from=op.at, source=source))
        elif op.op == "retract":
            current = store.current(user, op.slot, agent=agent)
            if current is not None and (op.value is None or same_value(current.value, op.value)):
                ended = store.retract(user, op.slot, at=op.at, agent=agent)
                if ended is not None:
                    written.append(ended)
        elif op.op == "forget":
            ids = [r.id for r in store.history(user, op.slot, agent=agent)]
            if ids:
                store.forget(user, ids=ids)
        elif op.op == "forget_all":
            store.forget(user, everything=True)
        else:
            raise ValueError(f"op: unknown operation {op.op!r}")
    return written


# ---- the model as an option: it only chooses ------------------------------------------------------

CONFIRM_PROMPT = ("Message: {message}\nDoes this message state, as true now, that {fact} Answer yes or no.\n"
                  "Answer:")


def confirm_with_model(message: str, ops: Sequence[Operation],
                       loglikelihood: Callable[[list[tuple[str, str]]], list[float]]) -> list[Operation]:
    """Keep the ``set`` operations the model confirms: log P(" yes") > log P(" no") after a yes/no question
    about the proposed fact (``loglikelihood``: (context, continuation) pairs -> log-probabilities, e.g. an
    evaluation backend's ``loglikelihood`` mapped to ``.logprob``). The model picks between two fixed
    answers; it never writes the fact. Retractions and deletions are the user's explicit commands: kept."""
    sets = [op for op in ops if op.op == "set"]
    if not sets:
        return list(ops)
    pairs = []
    for op in sets:
        context = CONFIRM_PROMPT.format(message=message, fact=op.text)
        pairs += [(context, " yes"), (context, " no")]
    scores = loglikelihood(pairs)
    keep = {id(op) for i, op in enumerate(sets) if scores[2 * i] > scores[2 * i + 1]}
    return [op for op in ops if op.op != "set" or id(op) in keep]
