"""Tiny tokenizers, teachers and text windows shared by the distillation tests."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mamba_moe.config import get_preset
from mamba_moe.data.tokenizer import stdlib_tokenizer
from mamba_moe.model import MambaMoEForCausalLM


def tiny_tokenizer(root: Path):
    """The 512-id stdlib tokenizer, trained once per test session under ``root``."""
    return stdlib_tokenizer(vocab_size=512, max_bytes=300_000, cache_dir=root / "distill-tok")


def text_windows(tokenizer, n: int, length: int, offset: int = 0) -> torch.Tensor:
    """(n, length) ids cut from a few stdlib modules' source (fixed text, so runs are comparable)."""
    import argparse
    import dataclasses
    import textwrap

    text = "".join(inspect.getsource(m) for m in (textwrap, dataclasses, argparse))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = offset * length
    assert ids.numel() >= start + n * length, "not enough text for the windows asked"
    return ids[start:start + n * length].view(n, length)


def tiny_model(vocab: int, seed: int) -> MambaMoEForCausalLM:
    torch.manual_seed(seed)
    return MambaMoEForCausalLM(get_preset("mamba-moe-tiny", vocab_size=vocab, n_layers=2,
                                          layer_mixers=["mamba", "attention"], layer_ffns=["moe", "moe"]))


def make_tiny_teacher(root: Path, tokenizer) -> Path:
    """A tiny mamba-moe trained 25 steps on stdlib text (so its predictions are far from uniform), saved as
    a checkpoint directory with its tokenizer."""
    path = root / "tiny-teacher"
    if (path / "config.json").exists():
        return path
    model = tiny_model(len(tokenizer), seed=1)
    data = text_windows(tokenizer, 40, 48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(25):
        x = data[(step * 4) % 40:(step * 4) % 40 + 4]
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path
