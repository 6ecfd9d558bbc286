"""Packed loader: windows, document boundaries, mixture weights, disjoint ranks, exact resume, hash check."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import random_docs, session_seed, tiny_tokenizer_dir, write_jsonl

from mamba_moe.data.config import DataError, PrepareConfig
from mamba_moe.data.loader import PackedDataset, PackedLoader, permute
from mamba_moe.data.prepare import prepare
from mamba_moe.data.shards import TokenizerMismatchError
from mamba_moe.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """Two sources (code, web), several small shards each, 10% validation."""
    base = tmp_path_factory.mktemp("loader")
    tok_dir = tiny_tokenizer_dir(str(tmp_path_factory.getbasetemp()))
    rng = random.Random(session_seed())
    write_jsonl(base / "code.jsonl", [{"text": t} for t in random_docs(rng, 120)])
    write_jsonl(base / "web.jsonl", [{"text": t} for t in random_docs(rng, 60)])
    config = PrepareConfig.from_dict({
        "tokenizer": str(tok_dir), "output": str(base / "out"), "progress": False, "workers": 1,
        "shard_mb": 0.01, "val_fraction": 0.1, "seed": rng.randrange(100),
        "sources": [{"name": "code", "kind": "jsonl", "domain": "code", "paths": [str(base / "code.jsonl")]},
                    {"name": "web", "kind": "jsonl", "domain": "web", "paths": [str(base / "web.jsonl")]}]})
    prepare(config)
    return base / "out", tok_dir


def _stream_tokens(root: Path, source: str, split: str = "train") -> np.ndarray:
    manifest = json.loads((root / "manifest.json").read_text())
    return np.concatenate([np.fromfile(root / f"{s['stem']}.bin", dtype=manifest["dtype"])
                           for s in manifest["shards"] if s["source"] == source and s["split"] == split])


def test_windows_tile_each_stream_and_cross_shards(prepared, monkeypatch):
    monkeypatch.setattr("mamba_moe.data.loader._MAX_OPEN", 2)  # exercise closing least-recent shard maps
    root, _ = prepared
    seq = 17
    ds = PackedDataset(root, seq_len=seq)
    for i, stream in enumerate(ds.streams):
        assert len(stream.stems) > 1  # the stream spans several shards
        full = _stream_tokens(root, stream.name)
        assert stream.n_windows == (len(full) - 1) // seq
        for k in range(stream.n_windows):
            tokens, starts = ds.window(i, k)
            assert tokens.shape == (seq + 1,) and tokens.dtype == np.int64
            np.testing.assert_array_equal(tokens, full[k * seq:k * seq + seq + 1])
            # a document starts at 0 and after every separator, nowhere else
            expected = [0] + [p + 1 for p in range(seq) if tokens[p] == ds.eos_id]
            assert starts.tolist() == expected


def test_batches_position_ids_restart_at_documents(prepared):
    root, tok_dir = prepared
    loader = PackedLoader(PackedDataset(root, seq_len=32, tokenizer=load_tokenizer(tok_dir)), batch_size=4)
    for _ in range(5):
        batch = next(loader)
        assert batch.input_ids.shape == batch.targets.shape == batch.position_ids.shape == (4, 32)
        assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
        ids, pos = batch.input_ids, batch.position_ids
        for row in range(4):
            for t in range(1, 32):
                want = 0 if ids[row, t - 1] == 1 else pos[row, t - 1] + 1
                assert pos[row, t] == want
        assert set(batch.domain_ids.tolist()) <= {0, 1} and loader.domains == ["code", "web"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_never_share_a_window_and_cover_the_pass(prepared, world_size):
    root, _ = prepared
    ds = PackedDataset(root, seq_len=8)
    seen: list[int] = []
    per_rank = []
    for rank in range(world_size):
        loader = PackedLoader(ds, batch_size=3, rank=rank, world_size=world_size, seed=7, loop=False)
        ids = [w for batch in loader for w in batch.window_ids.tolist()]
        per_rank.append(set(ids))
        assert len(ids) == len(set(ids)) == len(loader) * 3
        seen += ids
    assert len(seen) == len(set(seen))  # no window on two ranks
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not per_rank[a] & per_rank[b]
    assert len(set(seen)) > len(ds) - 3 * world_size  # only the last partial global batch is dropped


def test_resume_yields_exactly_the_next_batches(prepared, fresh_seed):
    root, _ = prepared
    ds = PackedDataset(root, seq_len=16)
    k, m = random.Random(fresh_seed).randrange(1, 30), 12
    for rank in range(2):
        straight = PackedLoader(ds, batch_size=2, rank=rank, world_size=2, seed=3)
        for _ in range(k):
            next(straight)
        state = json.loads(json.dumps(straight.state_dict()))  # survives a checkpoint file
        expected = [next(straight) for _ in range(m)]
        resumed = PackedLoader(PackedDataset(root, seq_len=16), batch_size=2, rank=rank, world_size=2, seed=3)
        resumed.load_state_dict(state)
        for want in expected:
            got = next(resumed)
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.window_ids, want.window_ids)
            assert torch.equal(got.position_ids, want.position_ids)


def test_resume_on_a_different_rank_count_continues_the_global_order(prepared):
    root, _ = prepared
    ds = PackedDataset(root, seq_len=16)
    single = PackedLoader(ds, batch_size=4, seed=1)
    for _ in range(5):
        next(single)
    state = single.state_dict()
    following = next(single).window_ids.tolist()
    halves = []
    for rank in range(2):
        loader = PackedLoader(ds, batch_size=2, rank=rank, world_size=2, seed=1)
        loader.load_state_dict(state)
        halves += next(loader).window_ids.tolist()
    assert halves == following


def test_mixture_weights_set_the_shares_and_passes_reshuffle(prepared):
    root, _ = prepared
    ds = PackedDataset(root, seq_len=8)
    n_code, n_web = (s.n_windows for s in ds.streams)
    loader = PackedLoader(ds, batch_size=1, seed=5, weights={"web": 3.0})
    picks = [int(next(loader).domain_ids[0]) for _ in range(n_code + 3 * n_web)]
    share = 3 * n_web / (n_code + 3 * n_web)
    for g in (10, 100, len(picks)):
        assert abs(sum(picks[:g]) - share * g) <= 1  # web (domain 1) tracks its target share at every point
    # a source sampled past one pass sees every window once per pass, in a new order each time
    loader = PackedLoader(ds, batch_size=1, seed=5, weights={"web": 50.0})
    web = [int(b.window_ids[0]) for b in (next(loader) for _ in range(4 * n_web)) if int(b.domain_ids[0]) == 1]
    first, second = web[:n_web], web[n_web:2 * n_web]
    assert sorted(first) == sorted(second) == list(range(n_code, n_code + n_web)) and first != second


def test_validation_pass_in_order(prepared):
    root, _ = prepared
    ds = PackedDataset(root, seq_len=8, split="val")
    loader = PackedLoader(ds, batch_size=2, shuffle=False, loop=False)
    ids = [w for b in loader for w in b.window_ids.tolist()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 2 * len(loader) >= len(ds) - 1
    with pytest.raises(StopIteration):
        next(loader)


def test_tokenizer_mismatch_and_damage_are_clear_errors(prepared, tmp_path):
    root, tok_dir = prepared
    other = train_tokenizer(["something else entirely " * 3, "x = 1"] * 20, vocab_size=300)
    with pytest.raises(TokenizerMismatchError, match="re-run prepare with this one"):
        PackedDataset(root, seq_len=8, tokenizer=other)
    PackedDataset(root, seq_len=8, tokenizer=load_tokenizer(tok_dir))  # the right one passes

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = sorted(copy.rglob("*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(DataError, match="damaged"):
        PackedDataset(copy, seq_len=8)
    with pytest.raises(DataError, match="no window"):
        PackedDataset(root, seq_len=10**7)

    loader = PackedLoader(PackedDataset(root, seq_len=8), batch_size=2, seed=1)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataError, match="seq_len differs"):
        PackedLoader(PackedDataset(root, seq_len=9), batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="seed differs"):
        PackedLoader(PackedDataset(root, seq_len=8), batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="rank"):
        PackedLoader(PackedDataset(root, seq_len=8), batch_size=2, rank=2, world_size=2)


def test_permutation_is_a_bijection(fresh_seed):
    rng = random.Random(fresh_seed)
    for n in [1, 2, 3, 5, 64, 65, 1000] + [rng.randrange(1, 5000) for _ in range(5)]:
        key = rng.randrange(2**63)
        image = [permute(i, n, key) for i in range(n)]
        assert sorted(image) == list(range(n))
        if n > 20:
            assert image != list(range(n)) and image != [permute(i, n, key + 1) for i in range(n)]
