"""The tiny training corpus helper builds both splits."""

from __future__ import annotations

from pathlib import Path

from helpers.training import tiny_corpus


def test_tiny_corpus_has_both_splits(tmp_path: Path) -> None:
    from mamba_moe.data import PackedDataset

    tok, shards = tiny_corpus(tmp_path)
    assert len(PackedDataset(shards, 32, "train")) > 10
    assert len(PackedDataset(shards, 32, "val")) >= 2
