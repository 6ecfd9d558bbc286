"""The train/validation split: one keyed hash of a document's content decides its side.

A document goes to validation with probability ``val_fraction``, decided from its content and the seed
alone: order, worker count, the other documents and re-runs do not move it, and duplicates in different
sources land on the same side. ``data prepare`` (shards) and chat fine-tuning use the same two functions,
so a chat file split for SFT and the same file prepared as shards agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypeVar

from .sources import Document

D = TypeVar("D", bound=Document)


def content_digest(document: Document | str) -> bytes:
    """16-byte blake2b of a document's content (:meth:`Document.key`): the dedup and split identity."""
    key = document if isinstance(document, str) else document.key()
    # surrogatepass: the digest must exist for any str, even one a later check refuses
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def is_validation(digest: bytes, seed: int, val_fraction: float) -> bool:
    """Whether the document with content ``digest`` goes to validation under ``seed``."""
    if val_fraction <= 0:
        return False
    key = seed.to_bytes(8, "little")
    value = int.from_bytes(hashlib.blake2b(digest, key=key, digest_size=8).digest(), "little")
    return value < val_fraction * 2**64


def split_documents(documents: Iterable[D], seed: int, val_fraction: float) -> tuple[list[D], list[D]]:
    """(train, validation) lists of ``documents``, each in its input order."""
    train: list[D] = []
    val: list[D] = []
    for doc in documents:
        (val if is_validation(content_digest(doc), seed, val_fraction) else train).append(doc)
    return train, val
