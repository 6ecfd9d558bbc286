"""Numbers the demo prints beside the validation loss: unigram entropy of the corpus, and a text sample."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.shards import load_manifest


def unigram_entropy(shards: str | Path, split: str = "train") -> float:
    """Entropy (nats/token) of the token frequencies in ``split``'s shards: the loss of the best model that
    ignores context. A trained LM must beat it to have learned anything beyond token counts."""
    root = Path(shards)
    manifest = load_manifest(root)
    dtype = np.dtype(manifest["dtype"])
    counts = np.zeros(0, dtype=np.int64)
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        ids = np.memmap(root / f"{shard['stem']}.bin", dtype=dtype, mode="r")
        c = np.bincount(ids)
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[:len(c)] += c
    total = counts.sum()
    if total == 0:
        raise ValueError(f"{root}: split {split!r} has no tokens")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unigram_entropy_of(arrays: list[np.ndarray]) -> float:
    """Entropy (nats/token) of the token frequencies in ``arrays`` (e.g. the trained tokens of chats)."""
    ids = np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]) if arrays else np.zeros(0, np.int64)
    if not len(ids):
        raise ValueError("unigram_entropy_of: no tokens")
    counts = np.bincount(ids)
    p = counts[counts > 0] / len(ids)
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def sample_text(model: Any, tokenizer: Any, prompt: str, n_tokens: int, device: torch.device,
                temperature: float = 0.7, top_k: int = 40, seed: int = 0) -> str:
    """Decode ``n_tokens`` lightly sampled tokens after ``prompt`` (seeded, so a run prints the same text)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    stop = {tokenizer.eos_token_id, tokenizer.get_vocab().get("<|im_end|>")}  # end of text / end of a chat turn
    cache = model.new_cache(1, device=device)
    logits = model(ids, cache=cache).logits[:, -1]
    out = []
    for _ in range(n_tokens):
        scaled = logits.float().cpu() / temperature
        kth = scaled.topk(min(top_k, scaled.shape[-1])).values[:, -1:]
        probs = torch.softmax(scaled.masked_fill(scaled < kth, -math.inf), -1)
        token = torch.multinomial(probs, 1, generator=gen)
        if int(token) in stop:
            break
        out.append(int(token))
        logits = model(token.to(device), cache=cache).logits[:, -1]
    model.train(was_training)
    return prompt + tokenizer.decode(out)
