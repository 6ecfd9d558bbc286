"""The reader: questions to slots, the oracle's answers from a real store, the model reader's prompt, exact match."""

from __future__ import annotations

from collections import namedtuple

import pytest

from mamba_moe.data import memory_dialogues as md
from mamba_moe.data.chatml import render_chat_text
from mamba_moe.memory import MemoryStore
from mamba_moe.memory.extract import Extractor, apply_operations
from mamba_moe.memory.reader import (
    READER_SYSTEM,
    answer_choices,
    answers_match,
    is_abstention,
    memory_messages,
    mentions,
    model_answer,
    normalize_answer,
    oracle_answer,
    question_slot,
    retrieve,
)
from mamba_moe.memory.slots import ABSTAIN, RELATIONS, slot_name


@pytest.mark.parametrize("question,slot", [
    ("What is my name?", "name"), ("Who am I?", "name"), ("Where do I live?", "city"),
    ("What's my address?", "city"), ("Where does my brother live?", "brother.city"),
    ("What is my best friend's name?", "friend.name"), ("What's my mum called?", "mother.name"),
    ("Where do I work?", "employer"), ("Which company does my sister work for?", "sister.employer"),
    ("What do I do for a living?", "job"), ("What does my dad do for a living?", "father.job"),
    ("What's my favorite color?", "favourite_colour"), ("What is my favourite dish?", "favourite_food"),
    ("What is my dog called?", "pet_name"), ("When did I last go to the dentist?", "dentist"),
    ("When did I last get a haircut?", "haircut"), ("What is my lucky number?", "lucky_number"),
    ("Tell me a joke.", None), ("What is my brother's dentist called?", None),   # not a slot we keep
])
def test_questions_map_to_slots(question, slot):
    assert question_slot(question) == slot


def test_every_generator_question_maps_to_its_slot():
    for key, questions in md.QUESTIONS.items():
        for q in questions:
            assert question_slot(q) == key, q
    for key, questions in md.OTHER_QUESTIONS.items():
        for q in questions:
            for word, relation in md.RELATIONS:
                assert question_slot(q.format(rel=word)) == slot_name(key, relation), (q, word)
    assert {r for _, r in md.RELATIONS} <= set(RELATIONS.values())


def test_exact_match_rules():
    assert normalize_answer("  São Paulo.\nmore text") == "são paulo"
    assert answers_match("Oslo!", "oslo") and not answers_match("Oslo, I think", "Oslo")
    assert answers_match("I don't know.", ABSTAIN) and answers_match("I do not know", ABSTAIN)
    assert not answers_match("Oslo", ABSTAIN) and not answers_match(ABSTAIN, "Oslo")
    assert is_abstention("unknown") and not is_abstention("")
    assert mentions("You live in New York.", "New York") and not mentions("Newark", "New")
    assert mentions("It is 7.", "7") and not mentions("2026-03-17", "7") and not mentions("on 2025-09-27.", "27")


@pytest.fixture
def store(tmp_path):
    with MemoryStore(tmp_path / "memory.db") as s:
        yield s


def test_oracle_reads_the_current_value_and_abstains_otherwise(store):
    ex = Extractor()
    for i, message in enumerate(["I live in Oslo.", "My brother lives in Bergen.", "I moved to Lisbon.",
                                 "I work at Globex.", "I quit my job.", "My lucky number is 7.",
                                 "Please forget my lucky number."]):
        apply_operations(store, "ada", ex.extract(message, now=f"2026-03-04T10:{i:02d}:00Z"))
    assert oracle_answer(store, "ada", "Where do I live?").text == "Lisbon"
    assert oracle_answer(store, "ada", "Where does my brother live?").text == "Bergen"
    for question in ("Where do I work?", "What is my lucky number?", "What is my name?", "Tell me a joke."):
        assert oracle_answer(store, "ada", question).abstained, question
    assert oracle_answer(store, "bob", "Where do I live?").abstained          # another user knows nothing
    records = retrieve(store, "ada", "Where do I live?", k=3)
    assert records[0].value == "Lisbon" and len({r.id for r in records}) == len(records) <= 3
    assert all(r.is_current for r in records) and all(r.user == "ada" for r in records)


def test_model_prompt_holds_the_facts_and_renders_as_chatml():
    messages = memory_messages("Where do I live?", ["The user lives in Oslo.", "The user's brother lives in Bergen."])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == READER_SYSTEM.format(question="Where do I live?",
                                                          facts="- The user lives in Oslo.\n"
                                                                "- The user's brother lives in Bergen.")
    # the question comes before the facts too (a recurrent layer reads them knowing what is asked)
    assert messages[0]["content"].index("Where do I live?") < messages[0]["content"].index("Oslo")
    assert messages[1] == {"role": "user", "content": "Where do I live?"}
    text = render_chat_text(messages, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "(nothing)" in memory_messages("Where do I live?", [])[0]["content"]


def test_model_answer_asks_the_engine_greedily_with_the_retrieved_facts(store):
    """The wiring of the model reader (the engine itself is tested in tests/inference): what it is asked, how,
    and what comes back."""
    ex = Extractor()
    for i, message in enumerate(["I live in Oslo.", "My brother lives in Bergen.", "I moved to Lisbon."]):
        apply_operations(store, "ada", ex.extract(message, now=f"2026-03-04T10:{i:02d}:00Z"))

    class RecordingEngine:
        def __init__(self):
            self.calls = []

        def chat(self, messages, params):
            self.calls.append((messages, params))
            return type("Completion", (), {"text": "  Lisbon\n"})()

    engine = RecordingEngine()
    answer = model_answer(engine, store, "ada", "Where do I live?", k=2, max_tokens=8)
    ((messages, params),) = engine.calls
    facts = [r.text for r in retrieve(store, "ada", "Where do I live?", k=2)]
    assert messages == memory_messages("Where do I live?", facts) and "Lisbon" in facts[0]
    assert params.temperature == 0.0 and params.max_tokens == 8
    assert answer.text == "Lisbon" and answer.slot == "city" and answer.record.value == "Lisbon"


def test_answer_choices_are_the_shown_values_once_then_the_abstention():
    fact = namedtuple("fact", "value")
    records = [fact("Bergen"), fact("Oslo"), fact(""), fact("Oslo"), fact("I don't know"), fact("Globex")]
    assert answer_choices(records) == ["Bergen", "Oslo", "Globex", ABSTAIN]   # prompt order, once; no empty value
    assert answer_choices([]) == [ABSTAIN]
