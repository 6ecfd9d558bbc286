"""SFT: template rendering, loss mask exactly on assistant tokens (with <|im_end|>), packing, padding, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers.data import random_text, tiny_tokenizer_dir, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba_moe.data.chat import encode_chat
from mamba_moe.data.config import DataError, SourceConfig
from mamba_moe.data.encode import DocumentEncoder
from mamba_moe.data.sft import IGNORE_INDEX, SFTDataset, SFTLoader
from mamba_moe.data.tokenizer import load_tokenizer, special_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tiny_tokenizer_dir(str(tmp_path_factory.getbasetemp())))


def _chat(rng: random.Random, turns: int | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": random_text(rng, rng.randrange(1, 6))}] if rng.random() < 0.5 else []
    for _ in range(turns or rng.randrange(1, 4)):
        msgs.append({"role": "user", "content": random_text(rng, rng.randrange(1, 12))})
        msgs.append({"role": "assistant", "content": random_text(rng, rng.randrange(0, 12))})
    return msgs


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                 "content": st.text(max_size=40)})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=st.lists(message, min_size=1, max_size=5))
def test_mask_is_exactly_the_assistant_content_and_end_marker(tok, chat):
    encoder = DocumentEncoder(tok)
    special = special_ids(tok)
    ids, mask = encode_chat(encoder.encode, special, chat)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = []
    for m in chat:  # what the assistant must produce: its content, then the end marker
        if m["role"] == "assistant":
            expected += encoder.encode(m["content"]) + [special.im_end]
    assert trained == expected
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if not m] + []) == "".join(
        f"<|im_start|>{m['role']}\n" + ("" if m["role"] == "assistant" else m["content"] + "<|im_end|>") + "\n"
        for m in chat)
    assert tok.decode(ids) == tok.apply_chat_template(chat, tokenize=False)


def test_ids_match_the_chat_template_when_content_does_not_start_with_a_newline(tok, fresh_seed):
    rng = random.Random(fresh_seed)
    encoder = DocumentEncoder(tok)
    for _ in range(20):
        chat = _chat(rng)
        for m in chat:
            m["content"] = m["content"].lstrip()
        ids, _ = encode_chat(encoder.encode, special_ids(tok), chat)
        ref = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        assert ids == list(ref["input_ids"] if isinstance(ref, dict) else ref)


@pytest.mark.parametrize("pack", [True, False])
def test_batches_train_on_assistant_tokens_only(tok, fresh_seed, pack):
    rng = random.Random(fresh_seed)
    chats = [_chat(rng) for _ in range(40)]
    ds = SFTDataset(chats, tok, max_tokens=400)
    loader = SFTLoader(ds, seq_len=400, batch_size=3, pack=pack, loop=False, seed=fresh_seed)
    seen = []
    for batch in loader:
        assert batch.input_ids.shape == batch.targets.shape == batch.position_ids.shape == (3, 400)
        for r, row in enumerate(batch.example_ids):
            seen += row
            at = 0
            for i in row:  # every chat sits whole in the row, with its mask, positions from 0
                n = len(ds.ids[i])
                assert batch.tokens[r, at:at + n].tolist() == ds.ids[i].tolist()
                assert batch.loss_mask[r, at:at + n].tolist() == ds.masks[i].tolist()
                assert batch.position_ids[r, at:min(at + n, 400)].tolist() == list(range(min(n, 400 - at)))
                at += n
            assert not batch.loss_mask[r, at:].any() and (batch.tokens[r, at:] == 0).all()  # <|pad|> is 0
            assert batch.attention_mask[r, :at].all() and not batch.attention_mask[r, at:].any()
        scored = batch.targets != IGNORE_INDEX
        assert torch.equal(scored, batch.loss_mask[:, 1:])
        assert torch.equal(batch.targets[scored], batch.tokens[:, 1:][scored])
        if not pack:
            assert all(len(row) == 1 for row in batch.example_ids)
    assert len(seen) == len(set(seen)) >= len(ds) - (3 * (len(ds) if not pack else 12))


def test_packing_fills_rows(tok, fresh_seed):
    rng = random.Random(fresh_seed)
    ds = SFTDataset([_chat(rng, 1) for _ in range(60)], tok, max_tokens=256)
    packed, padded = SFTLoader(ds, 256, 2, pack=True), SFTLoader(ds, 256, 2, pack=False)
    assert len(packed.rows(0)) < len(padded.rows(0)) == 60
    assert sorted(i for row in packed.rows(0) for i in row) == list(range(60))
    assert all(sum(len(ds.ids[i]) for i in row) <= 257 for row in packed.rows(0))


def test_resume_and_ranks(tok, fresh_seed):
    rng = random.Random(fresh_seed)
    ds = SFTDataset([_chat(rng) for _ in range(30)], tok, max_tokens=300)
    k = rng.randrange(1, 20)
    for rank in range(2):
        a = SFTLoader(ds, 300, 2, rank=rank, world_size=2, seed=9)
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))
        want = [next(a) for _ in range(6)]
        b = SFTLoader(ds, 300, 2, rank=rank, world_size=2, seed=9)
        b.load_state_dict(state)
        for w in want:
            got = next(b)
            assert torch.equal(got.tokens, w.tokens) and got.example_ids == w.example_ids
    r0 = [i for b in SFTLoader(ds, 300, 2, rank=0, world_size=2, loop=False) for row in b.example_ids for i in row]
    r1 = [i for b in SFTLoader(ds, 300, 2, rank=1, world_size=2, loop=False) for row in b.example_ids for i in row]
    assert not set(r0) & set(r1)


def test_bad_chats_are_counted(tok, tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    good = [_chat(rng, 1) for _ in range(5)]
    records = [{"messages": m} for m in good] + [
        {"messages": [{"role": "user", "content": "only a question"}]},  # nothing to train on
        {"messages": [{"role": "user"}]},  # no content
        {"messages": "hello"},
        {"text": "not a chat"},
        {"messages": [{"role": "user", "content": "x " * 500}, {"role": "assistant", "content": "y"}]},  # too long
    ]
    write_jsonl(tmp_path / "c.jsonl", records)
    src = SourceConfig(name="c", kind="jsonl", paths=[str(tmp_path / "c.jsonl")], messages_field="messages",
                       domain="chat")
    ds = SFTDataset.from_sources([src], tok, max_tokens=300)
    assert len(ds) == 5
    counts = {reason: n for (_, reason), n in ds.skips.skipped.items()}
    assert counts == {"no-assistant-turn": 1, "bad-messages": 2, "missing-field": 1, "too-long": 1}
    cut = SFTDataset.from_sources([src], tok, max_tokens=300, truncate=True)
    assert len(cut) == 5  # the long chat, cut to 300 tokens, has no assistant token left
    with pytest.raises(DataError, match="messages_field"):
        SFTDataset.from_sources([SourceConfig(name="t", kind="jsonl", paths=["x"])], tok, 100)
    with pytest.raises(DataError, match="no usable chat"):
        SFTDataset([[{"role": "user", "content": "hi"}]], tok, 100)
    with pytest.raises(DataError, match="longest chat"):
        SFTLoader(ds, seq_len=8, batch_size=1)


def _bad_chat_file(path, rng) -> tuple[int, dict[str, list[int]]]:
    """A chat JSONL with one record of every kind that cannot train; returns (good chats, reason -> lines)."""
    good = [json.dumps({"messages": _chat(rng, 1)}) for _ in range(6)]
    bad = {
        "bad-json": "{not json",
        "bad-record": '["a list"]',
        "missing-field": '{"conversation": []}',
        "bad-messages": '{"messages": [{"role": "user"}]}',
        "invalid-text": '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
        "no-assistant-turn": '{"messages": [{"role": "user", "content": "only a question"}]}',
    }
    lines, where = [], {}
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(bad):
            reason, record = list(bad.items())[i]
            lines.append(record)
            where[reason] = [len(lines)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')  # + invalid UTF-8
    where["non-utf8"] = [len(lines) + 1]
    return len(good), where


def test_read_chats_counts_every_skip_with_file_and_line(tok, tmp_path, fresh_seed):
    from mamba_moe.data.sft import read_chats
    from mamba_moe.data.sources import SkipLog

    path = tmp_path / "c.jsonl"
    n_good, where = _bad_chat_file(path, random.Random(fresh_seed))
    skips = SkipLog()
    train, val = read_chats(str(path), skips, seed=fresh_seed, val_fraction=0.3)
    ds = SFTDataset(train + val, tok, max_tokens=300, skips=skips, source="chat")
    assert len(ds) == n_good
    got = {reason: [int(e.split(": ")[0].rsplit(":", 1)[1]) for e in skips.examples[("chat", reason)]]
           for (_, reason) in skips.skipped}
    assert got == where  # every reason, each with its line of the file
    assert {reason for (_, reason) in skips.skipped} == set(where)
    with pytest.raises(DataError, match=r"data.paths: no file matches"):
        read_chats(str(tmp_path / "absent.jsonl"), SkipLog())


def test_chat_training_reports_read_level_skips(tok, tmp_path, fresh_seed):
    """Training on chats used to drop bad JSON, bad records and missing fields without a word (their skip log
    was thrown away); only 'no assistant turn' was reported."""
    from helpers.data import tiny_tokenizer_dir as tokenizer_dir

    from mamba_moe.training.batches import TrainData
    from mamba_moe.training.config import TrainConfig
    from mamba_moe.training.distributed import DistInfo

    path = tmp_path / "c.jsonl"
    _, where = _bad_chat_file(path, random.Random(fresh_seed))
    cfg = TrainConfig.from_dict({"seq_len": 300, "batch_size": 2, "data": {
        "source": "chat", "path": str(path), "tokenizer": str(tokenizer_dir(str(tmp_path.parent.parent))),
        "val_fraction": 0.0}})
    messages: list[str] = []
    TrainData(cfg, DistInfo(), log=messages.append)
    report = "\n".join(messages)
    for reason, lines in where.items():
        assert f"x {reason} (e.g. {path}:{lines[0]}" in report, (reason, report)


def test_one_split_function_for_shards_and_chats(fresh_seed):
    """prepare and chat SFT share the keyed split (data/split.py): same seed, same side for the same content."""
    import importlib

    from mamba_moe.data.sources import Document
    from mamba_moe.data.split import content_digest, is_validation, split_documents

    assert importlib.import_module("mamba_moe.data.prepare").is_validation is is_validation
    rng = random.Random(fresh_seed)
    docs = [Document(text=None, messages=_chat(rng), where=f"c[{i}]") for i in range(200)]
    train, val = split_documents(docs, fresh_seed % 2**63, 0.25)
    assert {d.where for d in val} == {d.where for d in docs if is_validation(content_digest(d), fresh_seed % 2**63,
                                                                               0.25)}
    assert len(train) + len(val) == 200 and 0 < len(val) < 200  # (all on one side: p < 1e-24)
    again, _ = split_documents(list(reversed(docs)), fresh_seed % 2**63, 0.25)
    assert {d.where for d in again} == {d.where for d in train}  # order does not move a document
    assert split_documents(docs, 0, 0.0) == (docs, [])


def test_ignore_index_has_one_definition():
    from mamba_moe.data import sft
    from mamba_moe.ops import cross_entropy

    assert sft.IGNORE_INDEX is cross_entropy.IGNORE_INDEX == -100


def test_in_memory_chat_with_invalid_text_is_skipped(tok):
    chats = [[{"role": "user", "content": "hi \udc80"}, {"role": "assistant", "content": "no"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]]
    ds = SFTDataset(chats, tok, max_tokens=100)
    assert len(ds) == 1
    assert ds.skips.examples[("chats", "invalid-text")][0].startswith("chats[0]: messages[0].content:")
