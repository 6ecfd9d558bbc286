"""A toy checkpoint directory (tiny random model + tiny byte-level BPE tokenizer) for tests and demos.

It has the layout the trainer writes (config.json, model.safetensors, HF tokenizer files) and the
project's special tokens (ids 0-3) and ChatML template, both from ``mamba_moe.data.tokenizer``, so
everything that reads checkpoints can be exercised in a second without a trained model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mamba_moe.config import get_preset
from mamba_moe.data.tokenizer import SPECIAL_TOKENS, wrap_tokenizer
from mamba_moe.model.lm import MambaMoEForCausalLM

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A small model reads text one token at a time; "
    "state space layers carry a fixed-size memory while attention layers look back at every key. "
    "Hello! How are you today? I am fine, thank you. What would you like to talk about? "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100. Punctuation, quotes \"like this\" and (brackets). "
    "Non-ASCII text: café, naïve, Größe, 東京, emoji 🙂 — all bytes in the end.\n"
)


def build_toy_tokenizer(text: str | None = None, vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on ``text`` (a few KB), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text or _TEXT * 8], trainer)
    return wrap_tokenizer(tok)  # the project's special tokens, ids and ChatML template, as data sets them


def save_toy_checkpoint(path: str | os.PathLike, preset: str = "mamba-moe-tiny", text: str | None = None,
                        seed: int | None = None, **overrides: Any) -> Path:
    """Write a random ``preset`` model (vocab sized to the toy tokenizer) and the tokenizer to ``path``.

    ``seed`` fixes the random weights (without touching the global RNG), so a test can replay a checkpoint;
    ``None`` draws them from the global RNG.
    """
    path = Path(path)
    tokenizer = build_toy_tokenizer(text)
    config = get_preset(preset, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **overrides)
    if seed is None:
        model = MambaMoEForCausalLM(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MambaMoEForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path
