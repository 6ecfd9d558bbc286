"""The generator's reader rows (``--format reader``, the training data of a model reader) against the prompts
the memory evaluation actually shows its model reader: same shape, same sentences, nothing a row should not
hold. The reference is the store itself: each conversation is replayed through the extractor into a real
``MemoryStore``, independently of how the rows are built."""

from __future__ import annotations

import json

import pytest

from mamba_moe.data import memory_dialogues as md
from mamba_moe.evaluation.tasks.memory_recall import MemoryRecall, replay
from mamba_moe.memory import MemoryStore
from mamba_moe.memory.reader import READER_SYSTEM, mentions
from mamba_moe.memory.slots import ABSTAIN, fact_text, split_slot

K = 5
HEAD, TAIL = READER_SYSTEM.split("{facts}")
OPENING, INTRO = HEAD.split("{question}")     # "The user asks: " QUESTION "\nYou remember these facts ...:\n"


def _facts(system: str) -> list[str]:
    assert system.startswith(OPENING) and INTRO in system and system.endswith(TAIL)
    listing = system[system.index(INTRO) + len(INTRO):-len(TAIL)]
    return [line[2:] for line in listing.split("\n") if line != "- (nothing)"]


class _NoTokenizer:      # the evaluation asks a backend for token counts; without one it estimates
    max_context = None

    def count_tokens(self, text):
        return None


@pytest.fixture(scope="module")
def eval_case(tmp_path_factory):
    """Two held-out conversations: the evaluation's model-reader items, the generator's reader rows of the
    same conversations, and the stored current facts of each after a replay."""
    task = MemoryRecall({"reader": "model", "conversations": "2", "sessions": "12"}, seed=7)
    items = task.items(_NoTokenizer(), None)
    conversations = task.conversations()
    stored = []
    for i, conversation in enumerate(conversations):
        with MemoryStore(tmp_path_factory.mktemp("store") / f"m{i}.db") as store:
            replay(store, conversation)
            stored.append({r.text for r in store.list(conversation.user)})
    rows = [md.reader_rows(c, k=K) for c in conversations]
    return items, conversations, rows, stored


def test_rows_show_as_many_facts_as_the_evaluation_whatever_the_answer(eval_case):
    items, conversations, rows, stored = eval_case
    by_id = {item.id: item for item in items}
    kinds = set()
    for c, (conversation, conversation_rows) in enumerate(zip(conversations, rows, strict=True)):
        assert len(conversation_rows) == len(conversation.probes)
        for j, (row, probe) in enumerate(zip(conversation_rows, conversation.probes, strict=True)):
            system, question, answer = row["messages"]
            item = by_id[f"memory/{c}/{j}"]
            shown = _facts(item.request.messages[0][1])
            # the (slot, value) the failure breakdown reads are those of the facts shown, in order
            assert len(item.meta["prompt_facts"]) == len(shown)
            assert all(mentions(f, value) for (_, value), f in zip(item.meta["prompt_facts"], shown, strict=True))
            facts = _facts(system["content"])
            # an "I don't know" row must not be told apart by a shorter list (it was: k - 1 facts)
            assert len(facts) == len(shown) == min(K, len(stored[c])), (probe.kind, facts, shown)
            assert set(facts) <= stored[c] and len(set(facts)) == len(facts)
            assert question == {"role": "user", "content": probe.question}
            assert answer == {"role": "assistant", "content": probe.answer}
            if probe.answer != ABSTAIN:      # the gold sentence, word for word as the store holds it
                assert mentions(shown[0], probe.answer) and shown[0] in facts
            assert not any(mentions(f, v) for f in facts for v in probe.stale + probe.forgotten)
            kinds.add(probe.kind)
    assert kinds == set(md.KINDS)


def test_rows_are_seeded():
    config = md.DialogueConfig(sessions=6)
    (first,), (again,) = md.generate(5, 1, config=config), md.generate(5, 1, config=config)
    assert md.reader_rows(first) == md.reader_rows(again)
    assert all(row["split"] == "train" and row["seed"] == 5 for row in md.reader_rows(first))


def _eligible(probe):
    """Whether a probe's attribute can be said of someone else (pets and events are the user's alone)."""
    return split_slot(probe.slot)[1].about_others


@pytest.fixture(scope="module")
def training_conversations():
    return md.generate(11, 40, config=md.DialogueConfig(sessions=8))


def test_hard_negatives_list_the_asked_attribute_of_someone_else(training_conversations):
    added = 0
    for conversation in training_conversations:
        current = {p.slot: fact_text(p.slot, p.answer) for p in conversation.probes if p.answer != ABSTAIN}
        plain, hard = md.reader_rows(conversation), md.reader_rows(conversation, hard_negatives=1.0)
        for probe, before, row in zip(conversation.probes, plain, hard, strict=True):
            facts, facts_before = _facts(row["messages"][0]["content"]), _facts(before["messages"][0]["content"])
            if "hard_negative" not in row:
                assert not _eligible(probe) and row == before
                continue
            added += 1
            negative = row["hard_negative"]
            asked_who, asked = split_slot(probe.slot)
            who, attribute = split_slot(negative["slot"])
            # about someone the conversation says nothing of this attribute for (not a retracted or forgotten
            # slot either: its old value would come back as a fact)
            assert attribute.key == asked.key and who != asked_who
            assert negative["slot"] not in {p.slot for p in conversation.probes}
            assert negative["fact"] in facts and negative["fact"] not in current.values()
            # the rest of the list is the plain row's, less one fact that is not the gold one
            assert [f for f in facts if f != negative["fact"]] == [f for f in facts_before if f in facts]
            assert len(facts) == len(facts_before) or not [f for f in facts_before if f != current.get(probe.slot)]
            if probe.answer != ABSTAIN:
                assert current[probe.slot] in facts
            (value,) = [v for v in md.VALUES[attribute.key] if fact_text(negative["slot"], v) == negative["fact"]]
            assert value not in (probe.answer, *probe.stale, *probe.forgotten, *probe.distractors)
            assert not any(mentions(f, value) for f in facts if f != negative["fact"])
            assert row["messages"][1:] == before["messages"][1:]
    assert added > 100


def test_a_share_of_hard_negatives_leaves_the_other_rows_as_they_were(training_conversations):
    eligible = with_negative = 0
    for conversation in training_conversations:
        plain, half = md.reader_rows(conversation), md.reader_rows(conversation, hard_negatives=0.5)
        assert all("hard_negative" not in row for row in plain)
        for probe, before, row in zip(conversation.probes, plain, half, strict=True):
            eligible += _eligible(probe)
            if "hard_negative" in row:
                with_negative += 1
            else:
                assert row == before
    assert 0.4 < with_negative / eligible < 0.6, (with_negative, eligible)


def test_hard_negatives_are_checked_and_reach_the_cli(tmp_path, capsys):
    from mamba_moe.cli import main
    from mamba_moe.data.config import DataError

    (conversation,) = md.generate(3, 1, config=md.DialogueConfig(sessions=6))
    for bad in (-0.1, 1.5):
        with pytest.raises(DataError, match="hard_negatives"):
            md.reader_rows(conversation, hard_negatives=bad)
    with pytest.raises(DataError, match="hard_negatives.*reader"):
        md.write_rows([conversation], tmp_path / "d.jsonl", "dialogue", hard_negatives=0.5)
    out = tmp_path / "r.jsonl"
    assert main(["data", "memory-dialogues", "--seed", "3", "--conversations", "4", "--sessions", "6",
                 "--format", "reader", "--hard-negatives", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert any("hard_negative" in row for row in rows)
    assert main(["data", "memory-dialogues", "--seed", "3", "--conversations", "1", "--hard-negatives", "0.5",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "hard_negatives" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
