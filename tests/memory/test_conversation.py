"""Conversation memory: the extractive running summary, its bound in the model's tokens, forgetting."""

from __future__ import annotations

import random

import pytest
from helpers.toy import build_toy_tokenizer

from mamba_moe.memory.conversation import ConversationBudget, ConversationMemory, first_sentence, mentions
from mamba_moe.memory.session import MemorySession, system_tokens

WORDS = ("the quick brown fox jumps over lazy dog small model reads text one token at a time state space "
         "layers carry fixed size memory while attention looks back every key café naïve Größe 東京").split()


class ToyEngine:
    """Just what the token counter needs: the prompt encoder of the toy tokenizer."""

    def __init__(self) -> None:
        from mamba_moe.inference.core.prompt import PromptEncoder

        self.prompts = PromptEncoder(build_toy_tokenizer())


@pytest.fixture(scope="module")
def count():
    return system_tokens(ToyEngine())


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(".!?")


def random_turns(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    turns = []
    for _ in range(n):
        user = " ".join(sentence(rng, rng.randint(1, 40)) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            user = f"I live in {rng.choice(['Paris', 'Oslo', 'Rome', 'Lima'])}. " + user
        if rng.random() < 0.2:
            user = f"My name is {rng.choice(['Ada', 'Bob', 'Cyd'])}. " + user
        reply = " ".join(sentence(rng, rng.randint(1, 60)) for _ in range(rng.randint(1, 3)))
        turns.append([{"role": "system", "content": "Memory: injected facts."}, {"role": "user", "content": user},
                      {"role": "assistant", "content": reply}])
    return turns


def test_the_block_stays_within_its_token_budget(count, fresh_seed):
    rng = random.Random(fresh_seed)
    for limit in (1024, 300, 100):
        memory = ConversationMemory(ConversationBudget(max_block_tokens=limit, max_lines=200))
        memory.fold(random_turns(rng, 80), MemorySession._facts_of)
        block = memory.block(count)
        assert block and count(block) <= limit, (limit, count(block))
        # trimming drops the oldest turn lines first, then the oldest facts: what is left are suffixes
        shown = ConversationMemory.from_text(block, 0)
        facts = [f for _, f in memory.facts]
        assert shown.lines == memory.lines[len(memory.lines) - len(shown.lines):]
        assert [f for _, f in shown.facts] == facts[len(facts) - len(shown.facts):]
        assert not shown.lines or len(shown.facts) == len(facts)
    one = ConversationMemory(ConversationBudget(max_block_tokens=80))
    one.fold([[{"role": "user", "content": "x" * 150 + "."}]], MemorySession._facts_of)
    assert 0 < count(one.block(count)) <= 80 and "xxxx…" in one.block(count)
    assert ConversationMemory(ConversationBudget(max_block_tokens=20)).block(count) == ""


def test_summary_holds_facts_and_first_sentences(count):
    memory = ConversationMemory()
    memory.fold([[{"role": "user", "content": "My name is Ada. I like long walks by the river and more."},
                  {"role": "assistant", "content": "Nice to meet you, Ada! What else?"}],
                 [{"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Lovely."}],
                 [{"role": "user", "content": "I moved to Oslo."}, {"role": "assistant", "content": "Cold!"}]],
                MemorySession._facts_of)
    facts = [f for _, f in memory.facts]
    assert facts == ["The user's name is Ada.", "The user lives in Oslo."]     # Oslo superseded Paris
    assert memory.lines[:2] == ["User: My name is Ada.", "Assistant: Nice to meet you, Ada!"]
    assert memory.covers_turns == 3
    block = memory.block(count)
    assert "The user lives in Oslo." in block and "Lovely." in block and "The user lives in Paris." not in block
    again = ConversationMemory.from_text(memory.to_text(), memory.covers_turns)
    assert [f for _, f in again.facts] == facts and again.lines == memory.lines and again.block(count) == block


def test_forget_removes_every_line_that_mentions_the_text():
    memory = ConversationMemory()
    memory.fold([[{"role": "user", "content": "I live in Paris."}, {"role": "assistant", "content": "Paris is nice."}],
                 [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."}]],
                MemorySession._facts_of)
    assert memory.forget(["The user lives in Paris.", "Paris"])
    text = memory.to_text()
    assert "paris" not in text.casefold() and "Hello there." in text
    assert not memory.forget(["Paris"])
    assert mentions("We met in PARIS!", ["paris"]) and not mentions("Parisian food", ["Paris"])


def test_first_sentence_and_budget_checks():
    assert first_sentence("  Hello   world! Second one.", 100) == "Hello world!"
    assert first_sentence("no end mark here", 7) == "no end…"
    with pytest.raises(ValueError, match="max_block_tokens"):
        ConversationBudget(max_block_tokens=0)
    with pytest.raises(ValueError, match="keep_recent_turns"):
        ConversationBudget(keep_recent_turns=-1)
