"""The generator's reader rows (``--format reader``, the training data of a model reader) against the prompts
the memory evaluation actually shows its model reader: same shape, same sentences, nothing a row should not
hold. The reference is the store itself: each conversation is replayed through the extractor into a real
``MemoryStore``, independently of how the rows are built."""

from __future__ import annotations

import pytest

from mamba_moe.data import memory_dialogues as md
from mamba_moe.evaluation.tasks.memory_recall import MemoryRecall, replay
from mamba_moe.memory import MemoryStore
from mamba_moe.memory.reader import READER_SYSTEM, mentions
from mamba_moe.memory.slots import ABSTAIN

K = 5
HEAD, TAIL = READER_SYSTEM.split("{facts}")


def _facts(system: str) -> list[str]:
    assert system.startswith(HEAD) and system.endswith(TAIL)
    return [line[2:] for line in system[len(HEAD):-len(TAIL)].split("\n") if line != "- (nothing)"]


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
