"""Helpers shared by the data tests: random corpora and tiny tokenizers (no tests in this file).

Every corpus is fresh per run (seeded from the OS, or MAMBA_MOE_TEST_SEED to replay) and small, so the
whole data suite stays well under a minute on two cores.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from mamba_moe.data.sources import stdlib_files
from mamba_moe.data.tokenizer import save_tokenizer, train_tokenizer

WORDS = ("def", "class", "return", "self", "import", "value", "index", "token", "matrix", "mamba", "expert",
         "the", "of", "and", "data", "ΣΩ", "naïve", "café", "日本語", "数据", "🙂", "x", "y", "z")
PUNCT = (" ", " ", " ", "\n", "\n    ", "(", ")", ":", ", ", ".", " = ", " + ", "\t", "'", "\"", "#", "  ")


def session_seed() -> int:
    """One seed per test session, printed so a failure can be replayed."""
    return _session_seed()


@functools.cache
def _session_seed() -> int:
    seed = int(os.environ.get("MAMBA_MOE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"data test session seed: {seed} (replay with MAMBA_MOE_TEST_SEED={seed})")
    return seed


def random_text(rng: random.Random, n_words: int) -> str:
    """Code-and-prose-like text with digits, Unicode and odd whitespace."""
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.1:
            parts.append(str(rng.randrange(10 ** rng.randrange(1, 9))))
        elif r < 0.15:
            parts.append(chr(rng.randrange(0x20, 0x3000)))
        else:
            parts.append(rng.choice(WORDS))
        parts.append(rng.choice(PUNCT))
    return "".join(parts)


def random_docs(rng: random.Random, n: int, lo: int = 5, hi: int = 200) -> list[str]:
    return [random_text(rng, rng.randrange(lo, hi)) for _ in range(n)]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_training_corpus(rng: random.Random) -> list[str]:
    """~150 kB: random text plus a few real stdlib modules (sorted by path, then sampled)."""
    files = stdlib_files()
    real = [p.read_text(encoding="utf-8") for p in rng.sample(files, 12)]
    return random_docs(rng, 300) + real


@functools.cache
def tiny_tokenizer_dir(root: str, vocab_size: int = 600) -> Path:
    """Train (once per session and size) and save a small tokenizer under ``root``."""
    rng = random.Random(session_seed())
    tok = train_tokenizer(tiny_training_corpus(rng), vocab_size=vocab_size)
    return save_tokenizer(tok, Path(root) / f"tok-{vocab_size}")
