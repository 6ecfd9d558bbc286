"""Numbers the demo prints beside the validation loss: unigram entropy of the corpus, and a text sample."""

from __future__ import annotations

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


def sample_text(model: Any, tokenizer: Any, prompt: str, n_tokens: int, device: torch.device,
                temperature: float = 0.7, top_k: int = 40, seed: int = 0) -> str:
    """``prompt`` and up to ``n_tokens`` lightly sampled tokens after it, decoded by the inference engine
    (seeded, so a run prints the same text). The prompt is the run's own config text: it is tokenized as
    training text is, so chat markers in it (stage configs prompt with ``<|im_start|>assistant``) count.
    The engine runs on the model's device; ``device`` is kept for callers that pass it."""
    from ..inference import Engine, SamplingParams
    from .engine_runs import complete

    if n_tokens < 1:
        return prompt
    was_training = model.training
    try:
        params = SamplingParams(max_tokens=n_tokens, temperature=temperature, top_k=top_k, seed=seed)
        [out] = complete(Engine(model, tokenizer, max_batch=1), [tokenizer.encode(prompt)], [params])
    finally:
        model.train(was_training)
    tokens = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids  # the end token is not text
    return prompt + tokenizer.decode(tokens)
