"""On-disk token shards: the flat token file, its document index, its sidecar and the manifest.

A shard ``<source>/<split>/<index>`` is three files: ``.bin`` (the ids of its documents, each followed by
the end-of-text id, as raw little-endian ``uint16``/``uint32``), ``.idx.npy`` (``uint64`` offsets of
document starts, ``n_docs + 1`` of them, the last being the token count) and ``.json`` (its counts and a
fingerprint of its inputs). Each file is written to a temporary name, flushed and renamed; the sidecar
comes last, so a shard is complete exactly when its sidecar exists and matches. ``manifest.json`` at the
top lists the shards of the last completed run with the tokenizer's hash, counts, domains and splits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from .config import DataError

MANIFEST = "manifest.json"
FORMAT = "mamba-moe-token-shards"
VERSION = 1
_TMP = ".tmp-"


class TokenizerMismatchError(DataError):
    """The shards were made by a different tokenizer than the one given: their ids would be garbage."""


def _atomic_array(path: Path, array: np.ndarray, npy: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    with open(tmp, "wb") as fh:
        if npy:
            np.save(fh, array, allow_pickle=False)
        else:
            array.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_temporaries(root: Path) -> int:
    """Delete leftovers of interrupted writes under ``root``; returns how many there were."""
    count = 0
    if root.exists():
        for path in root.rglob(f"*{_TMP}*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
    return count


def write_shard(root: Path, stem: str, docs: list[list[int]], eos: int, dtype: str,
                meta: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (tokens, index, sidecar — in that order) and return its sidecar record."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.uint64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=dtype)
    for start, doc in zip(offsets[:-1].tolist(), docs, strict=True):
        tokens[start:start + len(doc)] = doc
        tokens[start + len(doc)] = eos
    _atomic_array(root / f"{stem}.bin", tokens, npy=False)
    _atomic_array(root / f"{stem}.idx.npy", offsets, npy=True)
    record = {**meta, "stem": stem, "n_docs": len(docs), "n_tokens": int(offsets[-1]), "dtype": dtype}
    atomic_write(root / f"{stem}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def finished_shard(root: Path, stem: str, fingerprint: str) -> dict[str, Any] | None:
    """The sidecar of a complete shard made from exactly these inputs, or None if it must be (re)made."""
    try:
        record = json.loads((root / f"{stem}.json").read_text(encoding="utf-8"))
        size = (root / f"{stem}.bin").stat().st_size
        (root / f"{stem}.idx.npy").stat()
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if size != record["n_tokens"] * np.dtype(record["dtype"]).itemsize:
        return None
    return record


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared dataset folder, with a clear error if it is missing or foreign."""
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: no manifest; run `mamba-moe data prepare` for this folder first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest: {err}") from err
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: format version {manifest.get('version')}, this code reads {VERSION}; "
                        "re-run prepare")
    return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer_hash_: str, where: str) -> None:
    """Raise :class:`TokenizerMismatchError` unless the shards were tokenized by this tokenizer."""
    expected = manifest["tokenizer"]["hash"]
    if tokenizer_hash_ != expected:
        raise TokenizerMismatchError(
            f"{where}: shards were tokenized with tokenizer {expected[:16]}… "
            f"({manifest['tokenizer'].get('path')}), but the tokenizer given hashes to {tokenizer_hash_[:16]}…; "
            "use the same tokenizer or re-run prepare with this one")
