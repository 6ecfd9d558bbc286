"""Seeded multi-session conversations with gold answers: the stage-4 (memory) training data and its evaluation.

One conversation is ``sessions`` sessions of a few turns each, days apart, between one user and the
assistant. Along the way the user states facts about themself (``memory/slots.py``'s vocabulary),
updates them ("I moved to …"), corrects them at once ("Actually, it's …"), retracts them ("I no longer
work at …"), asks the assistant to forget them, mentions other people ("my brother lives in …": a
distractor for the user's own slot), dates events relatively ("yesterday", "last Tuesday": against the
session's clock), and chats about other things, including sentences that look like facts and are not
("Do you think I should move to Rome?"). At the end come the probes, each with its gold answer and
``kind``:

- ``recall``: a fact stated once, long ago;  ``latest``: a fact changed since (gold: the last value, or
  ``I don't know`` after a retraction; ``stale`` lists the earlier values);
- ``abstain``: a fact never stated (``distractors``: values of the same attribute said about others);
- ``deleted``: a fact the user asked to forget (gold ``I don't know``; ``forgotten`` must never come back).

Gold comes from the plan the generator writes from, never from an extractor. Everything is fixed by
(split, seed, index). Training and evaluation seeds are disjoint ranges: ``TRAIN_SEEDS`` for
``mamba-moe data memory-dialogues``, ``EVAL_SEEDS`` for the ``memory`` evaluation task (its ``--seed s``
reads seed ``EVAL_SEEDS.start + s``); asking for a seed outside its split's range is an error.

A row (JSONL, ``data.source: chat``): ``{"messages": [...], "id", "split", "seed", "probes": [...]}``;
``messages`` opens each session with a system line carrying its date, and ends with the probes asked
and answered with their gold. 50 sessions are ~13k tokens (at 4 characters a token): longer than an 8192 context
on purpose.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..memory.dates import relative_phrase
from ..memory.extract import normalize
from ..memory.reader import memory_messages, mentions, normalize_answer
from ..memory.slots import ABSTAIN, ATTRIBUTES, fact_text, slot_name, split_slot
from .config import DataError

TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 2_000_000)
SPLITS = {"train": TRAIN_SEEDS, "eval": EVAL_SEEDS}
KINDS = ("recall", "latest", "abstain", "deleted")


def check_seed(seed: int, split: str) -> int:
    """``seed`` if it lies in ``split``'s range; a DataError naming both otherwise (held-out stays held out)."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    seeds = SPLITS[split]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed not in seeds:
        raise DataError(f"seed: {split} seeds are {seeds.start}..{seeds.stop - 1} (evaluation seeds are held out "
                        f"from training), got {seed!r}")
    return seed


# ---- the vocabulary of values -------------------------------------------------------------------

VALUES: dict[str, tuple[str, ...]] = {
    "name": ("Ada", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ingrid", "José", "Kwame",
             "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Søren", "Tomasz", "Ulla", "Viktor",
             "Wanjiru", "Xavier", "Yuki", "Zoë", "Łukasz", "Amélie", "Björn", "Chloé", "Dagny", "Emeka"),
    "city": ("Oslo", "Bergen", "Lisbon", "Porto", "Kraków", "Zürich", "Nairobi", "Lagos", "Osaka", "Seoul", "Lima",
             "Quito", "São Paulo", "New York", "San Francisco", "Buenos Aires", "Cape Town", "Hanoi", "Tallinn",
             "Reykjavík", "Montréal", "Dublin", "Vienna", "Ghent", "Toulouse", "Bologna", "Valencia", "Izmir"),
    "employer": ("Acme Corp", "Globex", "Initech", "Umbrella Labs", "Northwind Traders", "Contoso", "Hooli",
                 "Stark Industries", "Wayne Enterprises", "Cyberdyne", "Soylent", "Vandelay Industries",
                 "Pied Piper", "Aperture Science", "Tyrell Systems", "Wonka Foods", "Oceanic Air", "Dunder Mifflin"),
    "job": ("nurse", "software engineer", "teacher", "plumber", "architect", "chef", "pilot", "lawyer",
            "electrician", "pharmacist", "journalist", "carpenter", "data analyst", "paramedic", "baker",
            "librarian", "firefighter", "accountant", "translator", "veterinarian"),
    "favourite_colour": ("blue", "green", "red", "yellow", "purple", "orange", "teal", "crimson", "turquoise",
                         "magenta", "olive", "indigo", "lavender", "amber"),
    "favourite_food": ("pad thai", "sushi", "lasagne", "ramen", "paella", "falafel", "pierogi", "tacos", "biryani",
                       "pho", "moussaka", "risotto", "dumplings", "goulash", "ceviche", "jollof rice"),
    "favourite_sport": ("football", "tennis", "basketball", "cricket", "rugby", "swimming", "cycling", "volleyball",
                        "badminton", "climbing", "rowing", "handball", "squash", "ice hockey"),
    "lucky_number": tuple(str(n) for n in range(2, 100)),
    "pet_name": ("Rex", "Biscuit", "Luna", "Miso", "Pepper", "Nala", "Mochi", "Ziggy", "Peanut", "Pixel", "Tofu",
                 "Sir Wiggles", "Clementine", "Waffles"),
}
# No value occurs inside another (as whole words), so an answer naming one can be told from one naming the other.
USER_KEYS = ("name", "city", "employer", "job", "favourite_colour", "favourite_food", "favourite_sport",
             "lucky_number", "pet_name")
EVENT_KEYS = ("dentist", "haircut", "concert")
OTHER_KEYS = ("name", "city", "employer", "job", "favourite_colour")
RELATIONS = (("brother", "brother"), ("sister", "sister"), ("best friend", "friend"), ("mum", "mother"),
             ("dad", "father"), ("colleague", "colleague"), ("neighbour", "neighbour"))
RETRACTABLE = ("city", "employer", "job", "pet_name")

STATE: dict[str, tuple[str, ...]] = {
    "name": ("My name is {v}.", "Hi! I'm {v}.", "Call me {v}, by the way.", "Hello, I am {v}.",
             "My name is {v}, what's yours?"),
    "city": ("I live in {v}.", "I'm living in {v} these days.", "I live in {v}, it's lovely there.",
             "By the way, I live in {v}."),
    "employer": ("I work at {v}.", "I work for {v}.", "I'm working at {v} at the moment."),
    "job": ("I work as {a} {v}.", "I'm {a} {v} by profession.", "My profession is {v}."),
    "favourite_colour": ("My favourite colour is {v}.", "My favorite color is {v}!",
                         "Fun fact: my favourite colour is {v}."),
    "favourite_food": ("My favourite food is {v}.", "My favourite dish is {v}.", "Oh, and my favourite food is {v}."),
    "favourite_sport": ("My favourite sport is {v}.", "Just so you know, my favourite sport is {v}."),
    "lucky_number": ("My lucky number is {v}.", "Just so you know, my lucky number is {v}."),
    "pet_name": ("My dog's name is {v}.", "I have a cat called {v}.", "My dog is called {v}."),
}
UPDATE: dict[str, tuple[str, ...]] = {
    "name": ("Please call me {v} from now on.", "My name is now {v}."),
    "city": ("I moved to {v} {d}.", "I've just moved to {v}!", "Big news: I relocated to {v}.", "I live in {v} now."),
    "employer": ("I now work at {v}.", "I started working at {v} {d}.", "I got a new job at {v}!"),
    "job": ("I work as {a} {v} now.", "My profession is now {v}."),
    "favourite_colour": ("My favourite colour is now {v}.", "I've changed my mind: my favourite colour is {v}."),
    "favourite_food": ("My favourite food is now {v}.", "These days my favourite food is {v}."),
    "favourite_sport": ("My favourite sport is now {v}.",),
    "lucky_number": ("My lucky number is now {v}.",),
    "pet_name": ("I adopted a new dog called {v}.", "I got a kitten named {v}."),
}
CORRECT = ("Actually, it's {v}.", "Sorry, I meant {v}.", "Oops, I meant {v}, not {old}.", "Correction: it's {v}.",
           "No wait, it's {v}.")
RETRACT: dict[str, tuple[str, ...]] = {
    "city": ("I don't live in {old} anymore.", "I no longer live in {old}."),
    "employer": ("I no longer work at {old}.", "I quit my job at {old}.", "I left {old} last month."),
    "job": ("I no longer work as {a} {old}.",),
    "pet_name": ("My dog {old} passed away.", "Sadly my cat {old} died."),
}
FORGET_PHRASES: dict[str, tuple[str, ...]] = {
    "name": ("my name",), "city": ("my address", "where I live"), "employer": ("my employer", "where I work"),
    "job": ("my job",), "favourite_colour": ("my favourite colour",), "favourite_food": ("my favourite food",),
    "favourite_sport": ("my favourite sport",), "lucky_number": ("my lucky number",), "pet_name": ("my pet's name",),
}
FORGET = ("Please forget {what}.", "Can you forget {what}?", "Could you delete {what}, please?",
          "Please erase {what}.")
EVENT: dict[str, tuple[str, ...]] = {
    "dentist": ("I went to the dentist {d}.", "I had a dentist appointment {d}."),
    "haircut": ("I got a haircut {d}.", "I had my hair cut {d}."),
    "concert": ("I went to a concert {d}.", "I saw a concert {d}."),
}
EVENT_AGAIN: dict[str, tuple[str, ...]] = {
    "dentist": ("I went to the dentist again {d}.",), "haircut": ("I got a haircut again {d}.",),
    "concert": ("I went to a concert again {d}.",),
}
OTHER: dict[str, tuple[str, ...]] = {
    "name": ("My {rel}'s name is {v}.", "My {rel} is called {v}."),
    "city": ("My {rel} lives in {v}.", "My {rel} just moved to {v}."),
    "employer": ("My {rel} works at {v}.", "My {rel} works for {v}."),
    "job": ("My {rel} works as {a} {v}.",),
    "favourite_colour": ("My {rel}'s favourite colour is {v}.",),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "name": ("What is my name?", "Do you remember my name?", "What's my name?"),
    "city": ("Where do I live?", "Which city do I live in?", "What city am I living in now?"),
    "employer": ("Where do I work?", "Which company do I work for?", "Who is my employer?"),
    "job": ("What do I do for a living?", "What is my job?", "What's my profession?"),
    "favourite_colour": ("What is my favourite colour?", "What's my favorite color?"),
    "favourite_food": ("What is my favourite food?",),
    "favourite_sport": ("What is my favourite sport?",),
    "lucky_number": ("What is my lucky number?", "Do you remember my lucky number?"),
    "pet_name": ("What is my pet's name?", "What is my pet called?"),
    "dentist": ("When did I last go to the dentist?", "What was the date of my last dentist visit?"),
    "haircut": ("When did I last get a haircut?",),
    "concert": ("When did I last go to a concert?",),
}
OTHER_QUESTIONS: dict[str, tuple[str, ...]] = {
    "name": ("What is my {rel}'s name?", "What's my {rel} called?"),
    "city": ("Where does my {rel} live?", "Which city does my {rel} live in?"),
    "employer": ("Where does my {rel} work?",),
    "job": ("What does my {rel} do for a living?",),
    "favourite_colour": ("What is my {rel}'s favourite colour?",),
}
ACKS = ("Got it, I'll remember that.", "Thanks for telling me!", "Noted.", "Okay, I've made a note of that.",
        "Good to know.", "Thanks, I'll keep that in mind.")
# Chit-chat that states nothing about the user; some of it looks like a statement and must stay unextracted.
FILLERS: tuple[tuple[str, str], ...] = (
    ("Can you recommend a good book for a long train ride?",
     "A long novel with short chapters works well on a train. Many readers enjoy a classic adventure story, or a "
     "collection of essays you can put down at any stop without losing the thread."),
    ("Do you think I should move to {city}?",
     "That depends on what you are looking for: the cost of living, the climate, your work and the people you "
     "know there. It may help to visit for a week before deciding anything."),
    ("I'm thinking about working at {org} some day.",
     "It is worth looking at what the teams there do, talking to people who work there, and seeing whether the "
     "roles match what you enjoy most in your current work."),
    ("What if my name was {name}?", "It is a lovely name, but I will keep calling you whatever you prefer."),
    ("Don't forget that my birthday is coming up!",
     "I will keep it in mind. Do you have any plans to celebrate this year, maybe with friends or family?"),
    ("How do I boil an egg properly?",
     "Put the egg in boiling water: six minutes gives a soft yolk, nine to ten minutes a firm one. Cool it in "
     "cold water afterwards so that the shell comes off easily."),
    ("My friend thinks I should move to {city}.",
     "It can help to hear what friends think, but the decision is yours. What do you like about the idea?"),
    ("Is {colour} a good colour for a kitchen?",
     "It can be, especially with plenty of light. Many people paint one wall in a strong colour and keep the "
     "rest neutral, so the room does not feel too dark."),
    ("I might get a dog one day.",
     "Dogs are wonderful company, though they need time every day. Thinking about your routine first is wise."),
    ("I'd love to visit {city} someday.",
     "It sounds like a great trip. Spring and early autumn are often pleasant times to travel, with fewer crowds."),
    ("I had a long day today, lots of meetings.",
     "That sounds tiring. A short walk or a quiet evening can help you recover after a day full of meetings."),
    ("Tell me a fun fact about octopuses.",
     "An octopus has three hearts and blue blood, and each of its arms can taste what it touches."),
    ("What's a good way to learn a new language?",
     "Practise a little every day, speak with native speakers as early as you can, and read things you enjoy. "
     "Consistency matters more than long study sessions."),
    ("Should I paint my bedroom {colour}?",
     "Softer shades tend to feel calmer in a bedroom. You could try a sample patch and look at it in the evening."),
    ("My sister went to a concert yesterday and loved it.",
     "That sounds like a great evening. Live music has an energy that recordings rarely capture."),
    ("My neighbour's dog barks every morning.",
     "That can be frustrating. A friendly word with your neighbour is often the quickest way to improve things."),
    ("Can you give me a quick recipe for dinner?",
     "Fry an onion and some garlic, add a tin of tomatoes and a handful of spinach, simmer for ten minutes and "
     "serve it over pasta with a little cheese on top."),
    ("If I lived in {city}, I would cycle to work.",
     "Cycling to work is a great habit: it is cheap, healthy, and often faster than driving in a busy city."),
    ("What should I pack for a weekend hike?",
     "Water, snacks, a rain jacket, a warm layer, a map, a small first aid kit and comfortable boots that are "
     "already broken in."),
)


# ---- the data ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    at: str                   # ISO-8601 UTC: the conversation's clock for this message


@dataclass(frozen=True)
class Session:
    index: int
    started: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str               # gold: a value, or ABSTAIN
    kind: str                 # recall | latest | abstain | deleted
    slot: str
    stale: tuple[str, ...] = ()        # latest: earlier values (answering one is a stale answer)
    forgotten: tuple[str, ...] = ()    # deleted: every value the slot ever had (answering one is a leak)
    distractors: tuple[str, ...] = ()  # abstain: values of the same attribute said about someone else


@dataclass(frozen=True)
class Conversation:
    id: str
    user: str
    split: str
    seed: int
    sessions: tuple[Session, ...]
    probes: tuple[Probe, ...]
    asked_at: str             # the clock when the probes are asked (after the last session)

    def user_turns(self) -> Iterator[tuple[Session, Turn]]:
        for session in self.sessions:
            for turn in session.turns:
                if turn.role == "user":
                    yield session, turn

    def messages(self, with_probes: bool = True) -> list[dict[str, str]]:
        """The chat as the trainer reads it: a dated system line per session, the turns, then the probes."""
        out: list[dict[str, str]] = []
        for session in self.sessions:
            out.append({"role": "system", "content": session_header(session.index, len(self.sessions),
                                                                    session.started)})
            out += [{"role": t.role, "content": t.content} for t in session.turns]
        if with_probes:
            out.append({"role": "system", "content": session_header(len(self.sessions), len(self.sessions),
                                                                    self.asked_at)})
            for probe in self.probes:
                out += [{"role": "user", "content": probe.question},
                        {"role": "assistant", "content": probe.answer + "."}]
        return out

    def to_row(self) -> dict[str, Any]:
        return {"messages": self.messages(), "id": self.id, "split": self.split, "seed": self.seed,
                "probes": [asdict(p) for p in self.probes]}


def session_header(index: int, total: int, started: str) -> str:
    when = datetime.fromisoformat(started)
    return f"Session {index + 1} of {total}. Today is {when:%A}, {when.date().isoformat()}."


@dataclass(frozen=True)
class DialogueConfig:
    """How conversations are shaped (the defaults are the evaluation's acceptance setting)."""

    sessions: int = 50
    min_turns: int = 3                 # user turns per session (facts first, then chit-chat to fill)
    max_turns: int = 6
    p_update: float = 0.3
    p_correct: float = 0.12
    p_retract: float = 0.1
    p_forget: float = 0.12
    relatives: int = 2

    def validate(self) -> None:
        if not isinstance(self.sessions, int) or self.sessions < 4:
            raise DataError(f"sessions: must be an integer >= 4 (facts, changes and probes need room), got "
                            f"{self.sessions!r}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise DataError(f"min_turns/max_turns: need 1 <= min_turns <= max_turns, got {self.min_turns}, "
                            f"{self.max_turns}")


# ---- planning one conversation ------------------------------------------------------------------

def _article(value: str) -> str:
    return "an" if value[:1].lower() in "aeiou" else "a"


@dataclass
class _Plan:
    rng: random.Random
    sessions: int
    used: set[str] = field(default_factory=set)
    # session -> groups of user messages that stay together in order (a fact and its correction); each
    # message with the assistant's reply, or None for an acknowledgement
    said: dict[int, list[list[tuple[str, str | None]]]] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)

    def fresh(self, key: str) -> str:
        pool = [v for v in VALUES[key] if v not in self.used]
        value = self.rng.choice(pool)
        self.used.add(value)
        return value

    def say(self, session: int, *messages: str) -> None:
        self.said.setdefault(session, []).append([(m, None) for m in messages])

    def when(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, max(lo, hi))


def _fill(template: str, **kw: str) -> str:
    value = kw.get("v", kw.get("old", ""))
    return template.format(a=_article(value), **kw)


def _plan_user_slot(plan: _Plan, key: str, config: DialogueConfig, clock: list[datetime],
                    forgets_left: list[int]) -> None:
    rng, last = plan.rng, plan.sessions - 1
    first = plan.when(0, int(plan.sessions * 0.6))
    value = plan.fresh(key)
    values = [value]
    fate = rng.random()
    q = rng.choice(QUESTIONS[key])
    if fate < config.p_correct:
        corrected = plan.fresh(key)
        plan.say(first, _fill(rng.choice(STATE[key]), v=value),
                 _fill(rng.choice(CORRECT), v=corrected, old=value))
        values.append(corrected)
    else:
        plan.say(first, _fill(rng.choice(STATE[key]), v=value))
    fate = rng.random()
    if fate < config.p_update:
        at = first
        for _ in range(rng.randint(1, 2)):
            if at >= last:
                break
            at = plan.when(at + 1, last)
            new = plan.fresh(key)
            day = clock[at] - timedelta(days=rng.randint(0, 6))
            plan.say(at, _fill(rng.choice(UPDATE[key]), v=new, d=relative_phrase(day.date(), clock[at].date())))
            values.append(new)
    elif fate < config.p_update + config.p_retract and key in RETRACTABLE and first < last:
        at = plan.when(first + 1, last)
        plan.say(at, _fill(rng.choice(RETRACT[key]), old=values[-1]))
        plan.probes.append(Probe(q, ABSTAIN, "latest", key, stale=tuple(values)))
        return
    elif fate < config.p_update + config.p_retract + config.p_forget and forgets_left[0] > 0 and first < last:
        forgets_left[0] -= 1
        at = plan.when(first + 1, last)
        plan.say(at, rng.choice(FORGET).format(what=rng.choice(FORGET_PHRASES[key])))
        plan.probes.append(Probe(q, ABSTAIN, "deleted", key, forgotten=tuple(values)))
        return
    kind = "recall" if len(values) == 1 else "latest"
    plan.probes.append(Probe(q, values[-1], kind, key, stale=tuple(values[:-1])))


def _plan_event(plan: _Plan, key: str, clock: list[datetime]) -> None:
    rng, last = plan.rng, plan.sessions - 1
    at = plan.when(0, last - 1)
    days = []
    for template_set in (EVENT, EVENT_AGAIN):
        day = (clock[at] - timedelta(days=rng.randint(0, 6))).date()
        if days and day <= days[-1]:
            break
        plan.say(at, rng.choice(template_set[key]).format(d=relative_phrase(day, clock[at].date())))
        days.append(day)
        if rng.random() < 0.6 or at >= last:
            break
        at = plan.when(at + 1, last)
    iso = [d.isoformat() for d in days]
    plan.probes.append(Probe(rng.choice(QUESTIONS[key]), iso[-1], "recall" if len(iso) == 1 else "latest", key,
                             stale=tuple(iso[:-1])))


def conversation(seed: int, index: int, split: str = "train", config: DialogueConfig | None = None) -> Conversation:
    """Conversation ``index`` of ``seed`` in ``split`` (independent of how many others are generated)."""
    config = config or DialogueConfig()
    config.validate()
    check_seed(seed, split)
    rng = random.Random(f"memory-dialogues-{split}-{seed}-{index}")
    # Sessions 1-4 days apart, each starting between 08:00 and 20:00, so none runs past midnight (the
    # relative dates of a session are said and resolved on one calendar day).
    day = datetime(2025, 1, 6, tzinfo=UTC) + timedelta(days=rng.randint(0, 400))
    clock = []
    for _ in range(config.sessions + 1):
        clock.append(day + timedelta(hours=rng.randint(8, 20), minutes=rng.randint(0, 59)))
        day += timedelta(days=rng.randint(1, 4))
    asked_at = clock.pop()
    plan = _Plan(rng, config.sessions)

    stated = rng.sample(USER_KEYS, rng.randint(5, 7))
    never = [k for k in USER_KEYS if k not in stated]
    forgets_left = [2]
    for key in stated:
        _plan_user_slot(plan, key, config, clock, forgets_left)
    events = rng.sample(EVENT_KEYS, rng.randint(1, 2))
    for key in events:
        _plan_event(plan, key, clock)

    # Other people: preferably the attributes the user never states, so a slip reads as a wrong answer.
    said_about_others: dict[str, list[str]] = {}
    relatives = rng.sample(RELATIONS, config.relatives)
    for word, relation in relatives:
        pool = [k for k in OTHER_KEYS if k in never] or list(OTHER_KEYS)
        keys = rng.sample(pool, min(len(pool), rng.randint(1, 2)))
        for key in keys:
            value = plan.fresh(key)
            at = plan.when(0, plan.sessions - 1)
            plan.say(at, _fill(rng.choice(OTHER[key]), rel=word, v=value))
            said_about_others.setdefault(key, []).append(value)
            question = rng.choice(OTHER_QUESTIONS[key]).format(rel=word)
            plan.probes.append(Probe(question, value, "recall", slot_name(key, relation)))
    for key in never + [k for k in EVENT_KEYS if k not in events]:
        plan.probes.append(Probe(rng.choice(QUESTIONS[key]), ABSTAIN, "abstain", key,
                                 distractors=tuple(said_about_others.get(key, ()))))

    sessions = tuple(_session(plan, i, clock[i], config) for i in range(config.sessions))
    user = f"user-{split}-{seed}-{index}"
    probes = tuple(plan.probes)
    return Conversation(f"memory/{split}/{seed}/{index}", user, split, seed, sessions, probes, asked_at.isoformat())


def _session(plan: _Plan, index: int, started: datetime, config: DialogueConfig) -> Session:
    rng = plan.rng
    messages = list(plan.said.get(index, []))
    n_fillers = max(0, rng.randint(config.min_turns, config.max_turns) - len(messages))
    fillers = [[_filler(plan)] for _ in range(n_fillers)]
    # facts keep their order (an update after its fact, a correction after its statement); fillers go anywhere
    order = messages
    for filler in fillers:
        order.insert(rng.randint(0, len(order)), filler)
    turns, at = [], started
    for group in order:
        for text, reply in group:
            turns += [Turn("user", text, at.isoformat()),
                      Turn("assistant", reply or rng.choice(ACKS), (at + timedelta(seconds=15)).isoformat())]
            at += timedelta(minutes=rng.randint(1, 4))
    return Session(index, started.isoformat(), tuple(turns))


def _filler(plan: _Plan) -> tuple[str, str]:
    rng = plan.rng
    question, answer = rng.choice(FILLERS)

    def unused(key: str) -> str:   # a value no fact of this conversation uses, so a slip is visible
        return rng.choice([v for v in VALUES[key] if v not in plan.used])

    question = question.format(city=unused("city"), org=unused("employer"), name=unused("name"),
                               colour=unused("favourite_colour"))
    return question, answer


def reader_rows(conversation: Conversation, k: int = 5, hard_negatives: float = 0.0) -> list[dict[str, Any]]:
    """One row per probe in the model reader's format (``memory/reader.py``'s ``memory_messages``): the
    question's current fact (when there is one) among other current facts of the conversation, ``k`` facts
    in all where the conversation has them, in a seeded order, then the gold answer. It teaches answering
    from injected memory, abstaining when the facts do not say, and ignoring other people's facts.

    ``hard_negatives`` (0..1): the share of probes whose list also gets the asked attribute of someone
    else (another relative, or the user when a relative is asked) with another value, in place of one of
    the other facts (so a row lists as many as without it): the hard negative behind a reader's most
    frequent miss, a relative's value for the asked one (docs/memory.md). Drawn from its own seeded
    stream, so the fact lists at 0 are those of earlier versions; a row that got one names it under
    ``hard_negative``."""
    if not 0.0 <= hard_negatives <= 1.0:
        raise DataError(f"hard_negatives: must lie in [0, 1], got {hard_negatives!r}")
    current = {p.slot: fact_text(p.slot, p.answer) for p in conversation.probes if p.answer != ABSTAIN}
    probed = {p.slot for p in conversation.probes}   # every slot the conversation says something of
    rng = random.Random(f"memory-reader-rows-{conversation.id}")
    hard_rng = random.Random(f"memory-reader-hard-negatives-{conversation.id}")
    rows = []
    for j, probe in enumerate(conversation.probes):
        others = [text for slot, text in current.items() if slot != probe.slot]
        # As many facts whether or not one answers: the evaluation's reader shows k search hits when the slot
        # has no current fact, so a shorter list for "I don't know" rows would teach a count, not reading.
        facts = rng.sample(others, min(len(others), k - (probe.slot in current)))
        if probe.slot in current:
            facts.insert(rng.randint(0, len(facts)), current[probe.slot])
        hard = _hard_negative(probe, probed, facts, hard_rng) if hard_rng.random() < hard_negatives else None
        if hard is not None:
            replaceable = [i for i, text in enumerate(facts) if text != current.get(probe.slot)]
            if replaceable:   # as many facts as without it, unless the list held the gold alone (or nothing)
                facts.pop(hard_rng.choice(replaceable))
            facts.insert(hard_rng.randint(0, len(facts)), hard[1])
        messages = memory_messages(probe.question, facts)
        messages.append({"role": "assistant", "content": probe.answer})
        row = {"messages": messages, "id": f"{conversation.id}/{j}", "split": conversation.split,
               "seed": conversation.seed, "kind": probe.kind, "answer": probe.answer}
        if hard is not None:
            row["hard_negative"] = {"slot": hard[0], "fact": hard[1]}
        rows.append(row)
    return rows


@functools.cache
def _normalized_values(key: str) -> tuple[tuple[str, str], ...]:
    """(value, its normalized form) of an attribute's values, normalized once (it dominated the rows' time)."""
    return tuple((v, normalize_answer(v)) for v in VALUES[key])


def _hard_negative(probe: Probe, probed: set[str], facts: list[str],
                   rng: random.Random) -> tuple[str, str] | None:
    """(slot, sentence) of the probe's attribute said of another person, with a value neither the probe
    nor the listed facts use, about someone the conversation says nothing of that attribute for — no
    current, changed, retracted, forgotten or never-stated slot of its probes — so it contradicts nothing
    the conversation holds; None when the attribute is the user's alone (pets, events)."""
    attribute = split_slot(probe.slot)[1]
    if not attribute.about_others:
        return None
    # the probe's own person is among the probed slots too
    people = [who for who in (None, *(rel for _, rel in RELATIONS)) if slot_name(attribute.key, who) not in probed]
    taken = {probe.answer, *probe.stale, *probe.forgotten, *probe.distractors}
    listed = normalize(" ".join(facts)).casefold()   # a value not in it as a substring cannot be mentioned
    values = [v for v, plain in _normalized_values(attribute.key) if v not in taken
              and not (plain in listed and any(mentions(f, v) for f in facts))]
    if not people or not values:
        return None
    slot = slot_name(attribute.key, rng.choice(people))
    return slot, fact_text(slot, rng.choice(values))


def generate(seed: int, n: int, *, split: str = "train", config: DialogueConfig | None = None) -> list[Conversation]:
    check_seed(seed, split)
    if not isinstance(n, int) or n < 1:
        raise DataError(f"conversations: must be a positive integer, got {n!r}")
    return [conversation(seed, i, split, config) for i in range(n)]


ROW_FORMATS = ("dialogue", "reader")


def write_rows(conversations: list[Conversation], path: str | os.PathLike, row_format: str = "dialogue",
               hard_negatives: float = 0.0) -> Path:
    """JSONL written atomically: one conversation a line (``dialogue``), or one probe a line in the model
    reader's format (``reader``; ``hard_negatives``: see ``reader_rows``)."""
    if row_format not in ROW_FORMATS:
        raise DataError(f"format: expected one of {', '.join(ROW_FORMATS)}, got {row_format!r}")
    if hard_negatives and row_format != "reader":
        raise DataError(f"hard_negatives: only the reader format lists facts, got format {row_format!r}")
    rows = ([c.to_row() for c in conversations] if row_format == "dialogue"
            else [row for c in conversations for row in reader_rows(c, hard_negatives=hard_negatives)])
    path = Path(path)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


__all__ = ["ATTRIBUTES", "Conversation", "DialogueConfig", "EVAL_SEEDS", "Probe", "Session", "TRAIN_SEEDS", "Turn",
           "check_seed", "conversation", "generate", "reader_rows", "write_rows"]
