"""The stage-4 dialogue generator: fixed by its seed, gold answers consistent with what was said, seeds held out."""

from __future__ import annotations

import json
import re
from datetime import date, datetime

import pytest
from helpers.toy import build_toy_tokenizer

from mamba_moe.data import memory_dialogues as md
from mamba_moe.data.cli import main
from mamba_moe.data.config import DataError
from mamba_moe.data.sft import SFTDataset, read_chats
from mamba_moe.data.sources import SkipLog
from mamba_moe.memory.slots import ABSTAIN, split_slot

SMALL = md.DialogueConfig(sessions=12)


def train_seed(fresh_seed):
    return fresh_seed % md.TRAIN_SEEDS.stop


def test_fixed_by_seed_and_index(fresh_seed):
    seed = train_seed(fresh_seed)
    a, b = md.generate(seed, 3, config=SMALL), md.generate(seed, 3, config=SMALL)
    assert a == b
    assert md.conversation(seed, 2, config=SMALL) == a[2]                 # independent of how many are made
    other = md.generate((seed + 1) % md.TRAIN_SEEDS.stop, 3, config=SMALL)
    assert [c.messages() for c in other] != [c.messages() for c in a]
    held_out = md.conversation(md.EVAL_SEEDS.start + seed, 0, "eval", SMALL)
    assert held_out.messages() != a[0].messages() and held_out.split == "eval"


def test_seed_ranges_are_disjoint_and_enforced():
    assert md.TRAIN_SEEDS.start == 0 and md.TRAIN_SEEDS.stop <= md.EVAL_SEEDS.start   # disjoint ranges
    with pytest.raises(DataError, match="seed: train seeds are 0..999999"):
        md.generate(md.EVAL_SEEDS.start, 1)
    with pytest.raises(DataError, match="seed: eval seeds are 1000000"):
        md.generate(5, 1, split="eval")
    with pytest.raises(DataError, match="seed"):
        md.generate(-1, 1)
    with pytest.raises(DataError, match="split"):
        md.generate(0, 1, split="test")
    with pytest.raises(DataError, match="sessions: must be an integer >= 4"):
        md.generate(0, 1, config=md.DialogueConfig(sessions=2))


def test_values_are_distinguishable():
    """No value inside another or inside the fixed chit-chat: a mention of one is never a mention of another."""
    values = [v for vs in md.VALUES.values() for v in vs]
    assert len(set(values)) == len(values)
    fixed = " ".join(q for q, _ in md.FILLERS)
    for a in values:
        assert not _said(a, fixed), a
        for b in values:
            assert a == b or not _said(a, b), (a, b)


def _user_turns(conversation):
    return [(s.index, t.content) for s, t in conversation.user_turns()]


def _said(value, text):
    return re.search(r"(?<![\w-])" + re.escape(value.casefold()) + r"(?![\w-])", text.casefold()) is not None


def test_gold_answers_follow_from_what_was_said(fresh_seed):
    """Each probe's gold checked against the conversation's text, without the extractor."""
    seed = train_seed(fresh_seed)
    kinds = set()
    for conversation in md.generate(seed, 6, config=md.DialogueConfig(sessions=15)):
        turns = _user_turns(conversation)
        texts = [text for _, text in turns]
        assert len({p.slot for p in conversation.probes}) == len(conversation.probes)   # one probe per slot
        for probe in conversation.probes:
            kinds.add(probe.kind)
            relation, attribute = split_slot(probe.slot)
            where = [i for i, text in enumerate(texts) if probe.answer != ABSTAIN and _said(probe.answer, text)]
            if attribute.value_kind == "date" and probe.answer != ABSTAIN:
                said = [i for i, text in enumerate(texts) if text.startswith("I ") and (   # the user's own
                        attribute.key in text.lower() or (attribute.key == "haircut" and "hair cut" in text))]
                assert said, probe                                          # the event was told...
                session = turns[said[-1]][0]
                day = datetime.fromisoformat(conversation.sessions[session].started).date()
                assert 0 <= (day - date.fromisoformat(probe.answer)).days <= 6    # ...within the last week
                continue
            if probe.kind == "recall":
                assert where and not probe.stale, probe
                if relation is not None:
                    assert any(t.lower().startswith("my ") and _said(probe.answer, t) for t in texts)
            elif probe.kind == "latest":
                assert probe.stale and all(v.casefold() != probe.answer.casefold() for v in probe.stale)
                first_stale = min(i for i, t in enumerate(texts) if _said(probe.stale[0], t))
                if probe.answer == ABSTAIN:                                 # retracted after the last value
                    last = max(i for i, t in enumerate(texts) if _said(probe.stale[-1], t))
                    assert re.search(r"no longer|anymore|quit|left|died|passed away", texts[last], re.I), texts[last]
                else:
                    assert where and where[-1] > first_stale, probe
            elif probe.kind == "deleted":
                assert probe.answer == ABSTAIN and probe.forgotten
                forget = [i for i, t in enumerate(texts) if re.match(r"(please |can you |could you )?(forget|"
                                                                     r"delete|erase)", t, re.I)]
                mentioned = [i for i, t in enumerate(texts) for v in probe.forgotten if _said(v, t)]
                assert forget and mentioned and max(mentioned) < max(forget), probe
            else:
                assert probe.kind == "abstain" and probe.answer == ABSTAIN and relation is None
                for value in probe.distractors:                             # said, but only about someone else
                    assert all(t.lower().startswith("my ") for t in texts if _said(value, t)), value
        starts = [datetime.fromisoformat(s.started) for s in conversation.sessions]
        assert starts == sorted(starts) and datetime.fromisoformat(conversation.asked_at) > starts[-1]
        for session in conversation.sessions:                              # a session stays on one day
            assert len({datetime.fromisoformat(t.at).date() for t in session.turns}) <= 1
    assert kinds == set(md.KINDS)


def test_rows_are_chats_the_trainer_reads(tmp_path, fresh_seed):
    seed = train_seed(fresh_seed)
    conversations = md.generate(seed, 3, config=SMALL)
    path = md.write_rows(conversations, tmp_path / "memory.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [c.id for c in conversations]
    assert rows[0]["probes"][0]["question"] == conversations[0].probes[0].question
    skips = SkipLog()
    train, _ = read_chats(str(path), skips)
    assert len(train) == 3 and skips.total == 0
    tokenizer = build_toy_tokenizer()
    data = SFTDataset(train, tokenizer, max_tokens=1 << 16)
    assert len(data.ids) == 3 and all(m.sum() > 0 for m in data.masks)
    last = rows[0]["messages"][-2:]
    assert last[0]["role"] == "user" and last[1] == {"role": "assistant",
                                                       "content": conversations[0].probes[-1].answer + "."}
    reader = md.write_rows(conversations, tmp_path / "reader.jsonl", "reader")
    reader_rows = [json.loads(line) for line in reader.read_text().splitlines()]
    assert len(reader_rows) == sum(len(c.probes) for c in conversations)
    for row, probe in zip(reader_rows, [p for c in conversations for p in c.probes], strict=True):
        system, question, answer = row["messages"]
        assert question["content"] == probe.question and answer["content"] == probe.answer
        assert (probe.answer == ABSTAIN) or probe.answer in system["content"]
    with pytest.raises(DataError, match="format"):
        md.write_rows(conversations, tmp_path / "x.jsonl", "csv")


def test_cli_writes_and_refuses_held_out_seeds(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    assert main(["data", "memory-dialogues", "--seed", "7", "--conversations", "2", "--sessions", "6",
                 "--out", str(out)]) == 0
    assert "2 conversations of 6 sessions" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["memory/train/7/0",
                                                                                   "memory/train/7/1"]
    assert main(["data", "memory-dialogues", "--seed", str(md.EVAL_SEEDS.start), "--conversations", "1",
                 "--out", str(tmp_path / "e.jsonl")]) == 2
    assert "held out" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()
