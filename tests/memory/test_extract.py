"""The rule extractor: statements it must take, sentences it must leave alone, and its operations on a real store."""

from __future__ import annotations

import random

import pytest

from mamba_moe.memory import MemoryStore
from mamba_moe.memory.extract import (
    _STOP_START,
    MAX_MESSAGE_CHARS,
    Extractor,
    Operation,
    apply_operations,
    clean_value,
    confirm_with_model,
    extract,
    uses_case,
)
from mamba_moe.memory.slots import fact_text
from mamba_moe.user_text import InvalidTextError

NOW = "2026-03-04T10:00:00+00:00"   # a Wednesday


def ops(message, extractor=None):
    return [(o.op, o.slot, o.value) for o in (extractor or Extractor()).extract(message, now=NOW)]


@pytest.mark.parametrize("message,expected", [
    ("My name is Ada.", [("set", "name", "Ada")]),
    ("Hi, I'm Søren Kierkegaard!", [("set", "name", "Søren Kierkegaard")]),
    ("Hello there! I am Zoë.", [("set", "name", "Zoë")]),
    ("Call me Łukasz, by the way.", [("set", "name", "Łukasz")]),
    ("I live in São Paulo.", [("set", "city", "São Paulo")]),
    ("hey i live in tokyo", [("set", "city", "tokyo")]),
    ("I moved to New York yesterday!", [("set", "city", "New York")]),
    ("Big news: I relocated to Zürich.", [("set", "city", "Zürich")]),
    ("I\u2019m living in Lisbon these days.", [("set", "city", "Lisbon")]),
    ("I work at Johnson and Johnson now.", [("set", "employer", "Johnson and Johnson")]),
    ("I started working at Globex last Monday.", [("set", "employer", "Globex")]),
    ("I work as a software engineer.", [("set", "job", "software engineer")]),
    ("I'm an architect by profession.", [("set", "job", "architect")]),
    ("My favorite color is blue, please remember that.", [("set", "favourite_colour", "blue")]),
    ("I've changed my mind: my favourite colour is teal.", [("set", "favourite_colour", "teal")]),
    ("My lucky number is 42.", [("set", "lucky_number", "42")]),
    ("I have a dog called Biscuit.", [("set", "pet_name", "Biscuit")]),
    ("I'm Ada and I live in Oslo, my brother lives in Bergen.",
     [("set", "city", "Oslo"), ("set", "brother.city", "Bergen")]),
    ("I went to the dentist last Tuesday.", [("set", "dentist", "2026-03-03")]),
    ("I got a haircut again 3 days ago.", [("set", "haircut", "2026-03-01")]),
    ("I went to a concert.", [("set", "concert", "2026-03-04")]),   # no date said: today
    ("I no longer work at Acme Corp.", [("retract", "employer", "Acme Corp")]),
    ("I don't live in Oslo anymore.", [("retract", "city", "Oslo")]),
    ("I quit my job.", [("retract", "employer", None)]),
    ("Sadly my cat Miso died.", [("retract", "pet_name", "Miso")]),
    ("My old dog Sir Wiggles has passed away.", [("retract", "pet_name", "Sir Wiggles")]),
    ("Please forget my address.", [("forget", "city", None)]),
    ("Could you delete my lucky number, please?", [("forget", "lucky_number", None)]),
    ("Can you forget where I work?", [("forget", "employer", None)]),
    ("Forget where my brother lives.", [("forget", "brother.city", None)]),
    ("Forget everything about me.", [("forget_all", None, None)]),
    ("My name is Ada, what's yours?", [("set", "name", "Ada")]),       # a statement with a question tagged on
    ("I live in Oslo, do you?", [("set", "city", "Oslo")]),
    # more ways to say it (a development set; bench/memory_extract.py keeps its own, separate phrasings)
    ("Purple is my favorite color.", [("set", "favourite_colour", "purple")]),
    ("7 is my lucky number.", [("set", "lucky_number", "7")]),
    ("People call me Jo.", [("set", "name", "Jo")]),
    ("I'm Tariq, pleased to meet you.", [("set", "name", "Tariq")]),
    ("We live in Porto.", [("set", "city", "Porto")]),
    ("We adopted a puppy named Nala.", [("set", "pet_name", "Nala")]),
    ("I moved to Quito for work.", [("set", "city", "Quito")]),
    ("I'm employed by Contoso.", [("set", "employer", "Contoso")]),
    ("I have been working at Hooli since March.", [("set", "employer", "Hooli")]),
    ("Had a haircut this morning.", [("set", "haircut", "2026-03-04")]),
    ("I went to an amazing concert yesterday.", [("set", "concert", "2026-03-03")]),
    ("I am no longer living in Bergen.", [("retract", "city", "Bergen")]),
    ("Please stop remembering my address.", [("forget", "city", None)]),
    ("Delete my favourite food from your memory.", [("forget", "favourite_food", None)]),
    ("i live in lima", [("set", "city", "lima")]),                   # no capitals anywhere: lower case is fine
    ("my sports team's name is hard to say", []),
])
def test_statements_become_operations(message, expected):
    assert ops(message) == expected


@pytest.mark.parametrize("message", [
    "Do I live in Paris?",                        # questions
    "Do you know where I work?",
    "What if my name was Zed?",
    "Is my favourite colour blue?",
    "my name is Ada?",
    "Do I live in Oslo, do you think?",
    "Is my name Ada, or is it Bea?",
    "I might move to Rome.",                      # hedges, plans, conditionals
    "I'm thinking about working at Globex some day.",
    "If I lived in Porto, I would cycle to work.",
    "I think I live in Rome.",
    "I'd love to visit Kyoto someday.",
    "My name is not Bob.",                        # negation
    "I never lived in Paris.",
    "My friend says I live in Rome.",             # reported speech
    "My friend thinks I should move to Lima.",
    "Don't forget my name!",                      # not a request to forget
    "Do not forget where I live.",
    "I live in a small flat near the river.",     # not a value of the slot's kind
    "My lucky number is seven hundred or so.",
    "I am tired.",                                 # "I am X" is a name only after a greeting
    "I went to a concert last week.",             # vague date: no guess
    "My brother's dog is called Rex.",            # not a slot kept about others
    "My sister went to a concert yesterday and loved it.",
    "Actually, it is raining.",                   # a correction with nothing to correct
    "I work at home mostly.",                     # not an organisation
    "My cousin's name is difficult.",             # a writer who capitalises: a lower-case name is no name
    "I live in constant worry about money.",
    "",
    "   \n\n  ",
])
def test_sentences_that_are_not_facts(message):
    assert ops(message) == []


def test_third_party_facts_never_become_the_users():
    got = ops("My brother lives in Oslo. My sister works for Initech. My best friend's name is Zoë. "
              "My mum is called Ingrid. My dad works as a pilot.")
    assert got == [("set", "brother.city", "Oslo"), ("set", "sister.employer", "Initech"),
                   ("set", "friend.name", "Zoë"), ("set", "mother.name", "Ingrid"), ("set", "father.job", "pilot")]
    assert all("." in slot for _, slot, _ in got)


def test_corrections_fix_the_last_slot_within_the_window():
    ex = Extractor()
    assert ops("My favourite colour is blue.", ex) == [("set", "favourite_colour", "blue")]
    assert ops("Sorry, I meant green, not blue.", ex) == [("set", "favourite_colour", "green")]
    assert ops("My brother lives in Oslo.", ex) == [("set", "brother.city", "Oslo")]
    assert ops("Actually, it's Bergen.", ex) == [("set", "brother.city", "Bergen")]
    assert ops("My lucky number is 12.", ex) == [("set", "lucky_number", "12")]
    assert ops("Oops, it is seventeen.", ex) == []          # not a number: not a lucky number
    assert ops("Correction: it's 17.", ex) == [("set", "lucky_number", "17")]
    ex = Extractor()
    ops("I live in Oslo.", ex)
    ops("Tell me a joke.", ex)
    ops("How do I boil an egg?", ex)
    assert ops("Actually, it's Bergen.", ex) == []          # two messages later: too far to be a correction


def test_a_correction_of_an_event_is_a_date():
    ex = Extractor()   # NOW is a Wednesday: yesterday is 2026-03-03, last Monday 2026-03-02
    assert ops("I went to the dentist yesterday.", ex) == [("set", "dentist", "2026-03-03")]
    assert ops("Sorry, I meant last Monday.", ex) == [("set", "dentist", "2026-03-02")]
    assert ops("Actually, it was Bergen.", ex) == []        # not a date: no event day


def test_odd_unicode_and_invisible_characters():
    assert ops("My name is Ｚｏë.") == [("set", "name", "Zoë")]                     # NFKC folds full-width letters
    assert ops("I live in Reyk\u200bjavík.") == [("set", "city", "Reykjavík")]       # zero-width space
    assert ops("I live in 東京.") == [("set", "city", "東京")]
    assert ops("My name is 🙂.") == []                                                # no letter: not a name
    with pytest.raises(InvalidTextError, match="message: a lone surrogate"):
        extract("My name is \ud800", now=NOW)


def test_long_messages_are_skipped_and_counted():
    ex = Extractor()
    assert ex.extract("My name is Ada. " + "blah " * (MAX_MESSAGE_CHARS // 5), now=NOW) == []
    assert ex.skipped["too-long"] == 1
    # long but under the limit: still read, and fast enough to stay linear (no catastrophic backtracking)
    text = "I live in " + "a " * 4000 + "Oslo. My name is Ada."
    assert ops(text) == [("set", "name", "Ada")]


def test_values_of_each_kind(fresh_seed):
    assert clean_value("Oslo for three years now", "place") == "Oslo"
    assert clean_value("the moon", "place") is None
    assert clean_value("42", "number") == "42" and clean_value("4 2", "number") is None
    assert clean_value("R2D2", "name") is None
    rng = random.Random(fresh_seed)
    letters = "abcdefghijklmnopqrstuvwxyzéøßÆ"
    for _ in range(200):   # any plain word of letters is a value of every text kind, unchanged
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 12))).capitalize()
        if word.lower() in _STOP_START or not word.isalpha():
            continue
        for kind in ("name", "place", "org", "words"):
            assert clean_value(word, kind) == word


def test_who_capitalises_names():
    assert uses_case("I moved to Oslo.") and uses_case("hi, I am Ada") and uses_case('She said "Hello".')
    assert not uses_case("I live in tokyo. My cat is old!") and not uses_case("i'm fine") and not uses_case("")


def test_bad_clock_is_named():
    with pytest.raises(ValueError, match="now: expected an ISO-8601 time"):
        extract("My name is Ada.", now="soon")


# ---- the operations on a real store --------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "memory.db") as s:
        yield s


def run(store, user, messages, ex=None, day=4):
    ex = ex or Extractor()
    for i, message in enumerate(messages):
        apply_operations(store, user, ex.extract(message, now=f"2026-03-{day:02d}T10:{i:02d}:00+00:00"))
    return ex


def test_apply_supersedes_retracts_and_forgets(store):
    ex = run(store, "ada", ["I live in Oslo.", "My brother lives in Bergen.", "I work at Globex.",
                            "My favourite colour is blue.", "Sorry, I meant green."])
    assert store.current("ada", "city").value == "Oslo"
    assert store.current("ada", "brother.city").value == "Bergen"
    assert [r.value for r in store.history("ada", "favourite_colour")] == ["blue", "green"]
    assert store.current("ada", "city").text == fact_text("city", "Oslo") == "The user lives in Oslo."
    run(store, "ada", ["I moved to Lisbon yesterday.", "I still live in Lisbon.",   # the same value: no new version
                       "I no longer work at Initech.",                              # not the current employer
                       "Please forget my favourite colour."], ex, day=5)
    assert [r.value for r in store.history("ada", "city")] == ["Oslo", "Lisbon"]
    assert store.current("ada", "employer").value == "Globex"
    assert store.history("ada", "favourite_colour") == []
    assert not any("green" in h.record.text or "blue" in h.record.text
                   for h in store.search("ada", "favourite colour green blue", k=10, include_superseded=True))
    run(store, "ada", ["I quit my job."], ex, day=6)
    assert store.current("ada", "employer") is None
    assert [r.value for r in store.history("ada", "employer")] == ["Globex"]        # history is kept
    run(store, "bob", ["I live in Quito."])
    run(store, "ada", ["Forget everything about me."], ex, day=7)
    assert store.list("ada", include_superseded=True) == []
    assert store.current("bob", "city").value == "Quito"                            # another user: untouched


def test_unknown_operation_is_refused(store):
    with pytest.raises(ValueError, match="op: unknown operation 'merge'"):
        apply_operations(store, "ada", [Operation("merge", "city", "Oslo", NOW, "")])


def test_the_model_only_chooses_between_yes_and_no():
    proposed = Extractor().extract("I live in Oslo and my favourite colour is blue. Forget my name.", now=NOW)
    asked = []

    def loglikelihood(pairs):
        asked.extend(pairs)
        # a model that believes the city and doubts the colour: log P(yes) > log P(no) for the first only
        return [-0.1 if ("lives in Oslo" in context) == (cont == " yes") else -2.0 for context, cont in pairs]

    kept = confirm_with_model("I live in Oslo and my favourite colour is blue. Forget my name.", proposed,
                              loglikelihood)
    assert [(o.op, o.slot) for o in kept] == [("set", "city"), ("forget", "name")]
    assert [cont for _, cont in asked] == [" yes", " no", " yes", " no"]
    assert all(fact in context for (context, _), fact in zip(asked[::2], [o.text for o in proposed[:2]], strict=True))
