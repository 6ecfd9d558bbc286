"""Shared set-up for the training tests: a tiny stdlib corpus prepared once per session, tiny configs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mamba_moe.config import get_preset
from mamba_moe.data import prepare_stdlib, stdlib_tokenizer
from mamba_moe.model.lm import MambaMoEForCausalLM
from mamba_moe.training import TrainConfig

_CORPUS: list[tuple[Path, Path]] = []


def tiny_corpus(root: Path) -> tuple[Path, Path]:
    """(tokenizer dir, shards dir): a 512-id stdlib tokenizer on 300 kB and 30 stdlib files as shards.

    Built once per test session (under the first caller's ``root``; tests only read it) and reused."""
    if _CORPUS and all(p.exists() for p in _CORPUS[0]):
        return _CORPUS[0]
    tok = stdlib_tokenizer(vocab_size=512, max_bytes=300_000, cache_dir=root / "tok")
    shards = root / "shards"
    prepare_stdlib(tok.name_or_path, shards, max_docs=30, workers=1, val_fraction=0.2)
    _CORPUS[:] = [(Path(tok.name_or_path), shards)]
    return _CORPUS[0]


def tiny_config(corpus: tuple[Path, Path], output: Path, **changes: Any) -> TrainConfig:
    tok, shards = corpus
    data = {"model": {"preset": "mamba-moe-tiny", "overrides": {"vocab_size": 512}},
            "data": {"source": "shards", "path": str(shards), "tokenizer": str(tok)},
            "seq_len": 32, "batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup": 2, "max_steps": 6,
            "eval_every": 3, "eval_batches": 2, "save_every": 2, "keep_last": 2, "output": str(output),
            "progress": False, "threads": 1, "sample_tokens": 8}
    data.update(changes)
    return TrainConfig.from_dict(data)


def chat_file(path: Path, kind: str, n: int, seed: int = 0) -> Path:
    """A generated chat JSONL (``explain`` | ``reasoning`` | ``recall``, see training/chatgen.py)."""
    from mamba_moe.training.chatgen import GENERATORS, write_chats

    return write_chats(GENERATORS[kind](n, seed=seed), path)


def two_domain_corpus(root: Path, tok: Path) -> Path:
    """Shards with two domains: ``code`` (20 stdlib files) and ``prose`` (stdlib module docstrings as text)."""
    from mamba_moe.data import PrepareConfig, prepare
    from mamba_moe.training.chatgen import explain_chats

    prose = root / "prose"
    prose.mkdir(parents=True, exist_ok=True)
    for i, chat in enumerate(explain_chats(60, seed=1)):
        (prose / f"{i:03d}.txt").write_text(chat["messages"][1]["content"] * 40)
    shards = root / "shards2"
    prepare(PrepareConfig(tokenizer=str(tok), output=str(shards), val_fraction=0.2, workers=1, progress=False,
                          sources=[{"name": "stdlib", "kind": "stdlib", "domain": "code", "max_docs": 20},
                                   {"name": "prose", "kind": "files", "domain": "prose", "paths": [str(prose)],
                                    "weight": 2.5}]))  # about as many prose windows as code ones per batch
    return shards


def save_tiny_checkpoint(corpus: tuple[Path, Path], path: Path, **overrides: Any) -> Path:
    """A random tiny checkpoint (the preset with ``overrides``, weights moved away from their initial values:
    norms at 1, diff2's lambda at 0, ...) with the tiny corpus's tokenizer beside it, as a trainer leaves one."""
    tok, _ = corpus
    model = MambaMoEForCausalLM(get_preset("mamba-moe-tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy2(f, path / f.name)
    return path
