"""Dense vectors for the memory store, computed offline (nothing is downloaded).

Two embedders:

- :class:`HashedNgramEmbedder` (the default): signed feature hashing of a text's words and of the
  character n-grams of each word into ``dim`` buckets, L2-normalised. It is a *lexical-fuzzy* embedding:
  "adress" lands near "address" and "running" near "run", which BM25's exact tokens miss; it knows nothing of
  meaning ("car" is not near "automobile"). Deterministic (a keyed BLAKE2 hash, not Python's per-process
  ``hash``), so the same text gives the same vector in every process and on every machine, and cheap
  (pure Python + numpy, ~0.1 ms for a sentence).
- :class:`ModelEmbedder`: mean-pooled final hidden states (after the backbone's final norm) of one of our
  checkpoints, for when a trained model is at hand.

The store records the embedder's ``name`` and ``dim`` in the DB and refuses to open with another one, since
vectors of two embedders cannot be compared.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Texts -> (n, dim) float32 rows of unit L2 norm (an all-zero row only for a text with no features)."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


_WORD = re.compile(r"\w+")


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm, in float32; zero rows stay zero (cosine 0 with everything)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


class HashedNgramEmbedder:
    """Signed hashing of words (weight ``word_weight``) and of the character ``ngrams`` of ``<word>``.

    The sign bit of each hash makes colliding features cancel on average instead of piling up, so the
    inner product of two vectors estimates the overlap of their feature bags without bias.
    """

    def __init__(self, dim: int = 384, ngrams: tuple[int, ...] = (3, 4), word_weight: float = 2.0) -> None:
        if not isinstance(dim, int) or dim < 8:
            raise ValueError(f"dim: expected an integer >= 8, got {dim!r}")
        if not ngrams or any(not isinstance(n, int) or n < 1 for n in ngrams):
            raise ValueError(f"ngrams: expected positive integers, got {ngrams!r}")
        self.dim = dim
        self.ngrams = tuple(ngrams)
        self.word_weight = float(word_weight)
        self.name = f"hashed-ngram-v1(dim={dim},n={'.'.join(map(str, self.ngrams))},w={self.word_weight:g})"
        self._cache: dict[str, tuple[int, float]] = {}

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._cache.get(feature)
        if hit is None:
            digest = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
            hit = (digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0)
            if len(self._cache) < 1_000_000:  # bounded: a long-running server must not grow without end
                self._cache[feature] = hit
        return hit

    def features(self, text: str) -> dict[str, float]:
        """The weighted feature bag of ``text`` (words and the n-grams of each word, case- and width-folded)."""
        bag: dict[str, float] = {}
        for word in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
            key = "w:" + word
            bag[key] = bag.get(key, 0.0) + self.word_weight
            padded = f"<{word}>"
            for n in self.ngrams:
                for i in range(max(1, len(padded) - n + 1)):
                    key = padded[i:i + n]
                    bag[key] = bag.get(key, 0.0) + 1.0
        return bag

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self.features(text).items():
                bucket, sign = self._bucket(feature)
                # sqrt damps a word repeated many times (sublinear term frequency)
                out[row, bucket] += sign * np.sqrt(weight)
        return normalise_rows(out)


def weights_fingerprint(model) -> str:
    """A short hash of the start of *every* weight tensor (name, shape, first 64 values): a fine-tune that left
    the embeddings alone (a LoRA merge, frozen embeddings) still changes it, and it costs no full pass."""
    digest = hashlib.blake2b(digest_size=6)
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(param.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return digest.hexdigest()


class ModelEmbedder:
    """Mean of the final hidden states (after the final norm) over a text's tokens, for one checkpoint.

    Texts are cut to ``max_tokens`` tokens (the tokenizer's ids; no special tokens are added) and run one at
    a time, so no padding can leak into the mean.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, *, device: str | None = None, max_tokens: int = 512) -> None:
        import torch

        from ..checkpoint_dirs import resolve_model_dir
        from ..inference.core.checkpoint import load_checkpoint

        self._torch = torch
        path = resolve_model_dir(checkpoint_dir)
        self.model, self.tokenizer = load_checkpoint(path, device=device)
        self.dim = int(self.model.config.d_model)
        self.max_tokens = max_tokens
        # the directory name plus a fingerprint of the weights: another checkpoint is another embedder
        self.name = f"model-mean-v1({os.path.basename(os.path.normpath(path))}:{weights_fingerprint(self.model)})"

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for row, text in enumerate(texts):
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
                if not ids:
                    continue
                tokens = torch.tensor([ids], dtype=torch.long, device=device)
                hidden = self.model.backbone.run(self.model.embed(tokens), None, None, router_stats=False).hidden
                out[row] = hidden[0].float().mean(dim=0).cpu().numpy()
        return normalise_rows(out)


def default_embedder() -> HashedNgramEmbedder:
    return HashedNgramEmbedder()
