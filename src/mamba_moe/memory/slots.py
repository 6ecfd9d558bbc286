"""The slot vocabulary: which facts about a user the memory extracts, how they read back, how they are asked.

One table serves the three parts that must agree on it: the extractor (:mod:`.extract`) writes facts under
these slot names, the reader (:mod:`.reader`) maps a question to the same name, and the dialogue
generator (``data/memory_dialogues.py``) states and asks them. A slot is an attribute of the user
(``city``) or of someone the user mentions, prefixed by the relation (``brother.city``): "my brother lives
in Oslo" is a fact, but never the user's own city. Event slots (``dentist``) hold an ISO date
(``2026-03-04``), resolved from "yesterday" / "last Tuesday" against the conversation's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

ABSTAIN = "I don't know"


@dataclass(frozen=True)
class Attribute:
    """A kind of fact. ``value_kind`` decides which spans are accepted as its value (see ``extract``)."""

    key: str
    value_kind: str            # name | place | org | words | number | date
    fact: str                  # the stored sentence; {who} "The user" / "The user's brother", {whose} "The user's"...
    forget_phrases: tuple[str, ...]   # "forget my …" / "forget where I live"
    about_others: bool = True  # may be stated about a relative or friend (events are the user's own)


ATTRIBUTES: dict[str, Attribute] = {a.key: a for a in (
    Attribute("name", "name", "{whose} name is {value}.", ("name",)),
    Attribute("city", "place", "{who} lives in {value}.",
              ("address", "city", "location", "home town", "where i live", "where i am living")),
    Attribute("employer", "org", "{who} works at {value}.",
              ("employer", "workplace", "company", "where i work")),
    Attribute("job", "words", "{who} works as {article} {value}.",
              ("job", "profession", "occupation", "job title", "what i do for a living")),
    Attribute("favourite_colour", "words", "{whose} favourite colour is {value}.", ("favourite colour",)),
    Attribute("favourite_food", "words", "{whose} favourite food is {value}.", ("favourite food",)),
    Attribute("favourite_sport", "words", "{whose} favourite sport is {value}.", ("favourite sport",)),
    Attribute("lucky_number", "number", "{whose} lucky number is {value}.", ("lucky number",)),
    Attribute("pet_name", "name", "{whose} pet is called {value}.",
              ("pet's name", "dog's name", "cat's name", "pet", "dog", "cat"), about_others=False),
    Attribute("dentist", "date", "{who} last went to the dentist on {value}.",
              ("dentist appointment", "dentist visit", "dentist"), about_others=False),
    Attribute("haircut", "date", "{who} last got a haircut on {value}.", ("haircut",), about_others=False),
    Attribute("concert", "date", "{who} last went to a concert on {value}.", ("concert",), about_others=False),
)}

# The people a fact can be about besides the user; several words name one relation (the slot's prefix).
RELATIONS: dict[str, str] = {
    "brother": "brother", "sister": "sister", "mother": "mother", "mom": "mother", "mum": "mother",
    "father": "father", "dad": "father", "best friend": "friend", "friend": "friend", "partner": "partner",
    "wife": "partner", "husband": "partner", "boyfriend": "partner", "girlfriend": "partner", "son": "son",
    "daughter": "daughter", "boss": "boss", "colleague": "colleague", "coworker": "colleague",
    "neighbour": "neighbour", "neighbor": "neighbour", "cousin": "cousin", "uncle": "uncle", "aunt": "aunt",
}


def slot_name(attribute: str, relation: str | None = None) -> str:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"slot: unknown attribute {attribute!r} (known: {', '.join(ATTRIBUTES)})")
    if relation is None:
        return attribute
    if relation not in RELATIONS.values():
        raise ValueError(f"slot: unknown relation {relation!r}")
    if not ATTRIBUTES[attribute].about_others:
        raise ValueError(f"slot: {attribute!r} is only kept about the user")
    return f"{relation}.{attribute}"


def split_slot(slot: str) -> tuple[str | None, Attribute]:
    """(relation or None, attribute) of a slot name; ValueError naming it when it is not in the vocabulary."""
    relation, dot, key = slot.rpartition(".")
    if key not in ATTRIBUTES or (dot and relation not in RELATIONS.values()):
        raise ValueError(f"slot: {slot!r} is not in the vocabulary")
    return (relation or None), ATTRIBUTES[key]


def fact_text(slot: str, value: str) -> str:
    """The sentence stored for a fact: readable by a model and findable by a keyword search."""
    relation, attribute = split_slot(slot)
    who = "The user" if relation is None else f"The user's {relation}"
    whose = "The user's" if relation is None else f"The user's {relation}'s"
    article = "an" if value[:1].lower() in "aeiou" else "a"
    return attribute.fact.format(who=who, whose=whose, value=value, article=article)
