"""Packed pre-training batches: memory-mapped windows of ``seq_len + 1`` tokens, mixed, sharded, resumable.

:class:`PackedDataset` sees each source's shards of one split as one token stream and cuts it into
windows ``[k * seq_len, k * seq_len + seq_len + 1)`` (consecutive windows share one token, so every
token is predicted exactly once). A window never mixes sources, so it has one domain.

:class:`PackedLoader` walks one global sequence of windows shared by all data-parallel ranks. Sample
``g`` comes from the source whose share lags most behind its target (Megatron's blending rule, no
randomness), and is that source's next window in a seeded permutation that is reshuffled every pass.
Global step ``s`` is samples ``[s * B * W, (s + 1) * B * W)``; rank ``r`` takes its ``B`` consecutive ones.
So ranks never share a window within a pass, and the whole state is the global position plus one counter
per source: ``state_dict()`` is tiny, identical on every rank, and restores the exact next batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import DataError
from .shards import check_tokenizer, load_manifest
from .tokenizer import tokenizer_hash

_STATE_VERSION = 1
_MAX_OPEN = 512


# ---- a seeded permutation of [0, n) in O(1) memory -----------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def permute(i: int, n: int, key: int) -> int:
    """Position ``i`` of a pseudo-random permutation of ``range(n)`` chosen by ``key``.

    A 4-round Feistel network on the smallest even-bit power of two >= n, with cycle walking back into
    range: a true bijection, no table, so shuffling a billion windows costs no memory.
    """
    if not 0 <= i < n:
        raise IndexError(f"permute: {i} not in [0, {n})")
    if n <= 2:
        return i if n == 1 else i ^ (key & 1)
    bits = (n - 1).bit_length()
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for round_ in range(4):
            left, right = right, left ^ (_mix(right ^ (key + round_ * 0x632BE59BD9B4E019) & _MASK64) & mask)
        x = (left << half) | right
        if x < n:
            return x


def _key(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


# ---- the dataset --------------------------------------------------------------------------------------

@dataclass
class _Stream:
    """One source's shards of one split, seen as a single token sequence."""

    name: str
    domain: str
    weight: float
    stems: list[str]
    starts: np.ndarray  # token offset of each shard in the stream, plus the total at the end
    n_windows: int


class PackedDataset:
    """Fixed-length windows over the shards of ``split`` in a prepared folder, read through memory maps.

    Pass the ``tokenizer`` (or its ``tokenizer_hash``) that training uses: the manifest's hash is checked
    and a mismatch is an error, not silently wrong ids.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, split: str = "train", tokenizer: Any = None,
                 expected_hash: str | None = None, sources: list[str] | None = None) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len: must be a positive integer (got {seq_len!r})")
        if split not in ("train", "val"):
            raise DataError(f"split: {split!r} is not 'train' or 'val'")
        self.root = Path(path)
        self.manifest = load_manifest(self.root)
        if tokenizer is not None:
            expected_hash = tokenizer_hash(tokenizer)
        if expected_hash is not None:
            check_tokenizer(self.manifest, expected_hash, str(self.root))
        self.seq_len = seq_len
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id = self.manifest["tokenizer"]["eos_id"]
        names = [s["name"] for s in self.manifest["sources"]]
        for name in sources or []:
            if name not in names:
                raise DataError(f"sources: {name!r} is not in {self.root} (has {names})")
        self.streams: list[_Stream] = []
        for src in self.manifest["sources"]:
            if sources is not None and src["name"] not in sources:
                continue
            shards = [s for s in self.manifest["shards"] if s["source"] == src["name"] and s["split"] == split]
            sizes = [s["n_tokens"] for s in shards]
            for s in shards:
                self._check_shard(s)
            starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
            n_windows = max(int(starts[-1]) - 1, 0) // seq_len
            if n_windows:
                self.streams.append(_Stream(src["name"], src["domain"], float(src["weight"]),
                                            [s["stem"] for s in shards], starts, n_windows))
        if not self.streams:
            raise DataError(f"{self.root}: split {split!r} has no window of {seq_len + 1} tokens "
                            f"(tokens: {self.manifest['totals'].get(split, {}).get('tokens', 0)})")
        self.domains = sorted({s.domain for s in self.streams})
        self.window_base = np.concatenate([[0], np.cumsum([s.n_windows for s in self.streams])]).astype(np.int64)
        self._maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _check_shard(self, shard: dict[str, Any]) -> None:
        path = self.root / f"{shard['stem']}.bin"
        try:
            size = path.stat().st_size
        except OSError as err:
            raise DataError(f"{path}: shard listed in the manifest is missing; re-run prepare") from err
        if size != shard["n_tokens"] * self.dtype.itemsize:
            raise DataError(f"{path}: {size} bytes, manifest says {shard['n_tokens']} {self.dtype} tokens; "
                            "the shard is damaged, re-run prepare")

    def __len__(self) -> int:
        return int(self.window_base[-1])

    def _map(self, stem: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of a shard's tokens and index, the most recently used ``_MAX_OPEN`` kept open
        (two maps per shard; Linux allows ~65k per process, and a large corpus has tens of thousands)."""
        maps = self._maps.pop(stem, None)
        if maps is None:
            tokens = np.memmap(self.root / f"{stem}.bin", dtype=self.dtype, mode="r")
            offsets = np.load(self.root / f"{stem}.idx.npy", mmap_mode="r")
            maps = (tokens, offsets)
            if len(self._maps) >= _MAX_OPEN:
                self._maps.pop(next(iter(self._maps)))
        self._maps[stem] = maps  # re-inserted last: dict order is the recency order
        return maps

    def locate(self, window_id: int) -> tuple[int, int]:
        """(stream index, window index within the stream) of a global window id."""
        stream = int(np.searchsorted(self.window_base, window_id, side="right") - 1)
        return stream, int(window_id - self.window_base[stream])

    def window(self, stream: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of window ``k`` of ``stream`` (``seq_len + 1``, int64) and the positions in it where a
        document starts (position 0 always counts as a start)."""
        s = self.streams[stream]
        if not 0 <= k < s.n_windows:
            raise IndexError(f"window {k} not in [0, {s.n_windows}) of source {s.name!r}")
        a = k * self.seq_len
        b = a + self.seq_len + 1
        pieces, starts = [], [np.zeros(1, dtype=np.int64)]
        shard = int(np.searchsorted(s.starts, a, side="right") - 1)
        pos = a
        while pos < b:
            base = int(s.starts[shard])
            end = min(b, int(s.starts[shard + 1]))
            tokens, offsets = self._map(s.stems[shard])
            pieces.append(np.asarray(tokens[pos - base:end - base], dtype=np.int64))
            lo, hi = np.searchsorted(offsets, [pos - base, end - base], side="left")
            doc_starts = np.asarray(offsets[lo:hi], dtype=np.int64) + base - a
            starts.append(doc_starts[doc_starts > 0])
            pos = end
            shard += 1
        return np.concatenate(pieces), np.concatenate(starts)

    def document_count(self) -> int:
        return sum(s["n_docs"] for s in self.manifest["shards"] if s["split"] == self.split
                   and s["source"] in {st.name for st in self.streams})


def positions_from_starts(length: int, starts: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 at every document start (``starts`` sorted, contains 0)."""
    idx = np.arange(length, dtype=np.int64)
    seg = np.searchsorted(starts, idx, side="right") - 1
    return idx - starts[seg]


# ---- batches --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One rank's batch. ``tokens`` is ``(B, seq_len + 1)``; the model reads ``input_ids`` and is scored on
    ``targets`` (the next token at every position). ``position_ids`` restart at each document start, for
    position resets or variable-length attention; ``domain_ids`` index ``loader.domains``.
    ``last_target_opens`` (B,) bool: the window's last target token is the first token of a document
    (position_ids, which cover the inputs only, cannot say so)."""

    tokens: Tensor
    position_ids: Tensor
    domain_ids: Tensor
    window_ids: Tensor
    last_target_opens: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> Tensor:
        return self.tokens[:, 1:]


class PackedLoader:
    """Batches of ``batch_size`` windows for data-parallel ``rank`` of ``world_size``; see the module doc.

    ``weights`` (source name -> multiplier) override the manifest's; a source's sampling share is
    proportional to ``weight * windows``. With ``loop=False`` iteration ends after one pass (all windows
    once each when every weight is 1) — use that with ``shuffle=False`` for validation.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, weights: dict[str, float] | None = None, loop: bool = True) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: must be a positive integer (got {batch_size!r})")
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank: must satisfy 0 <= rank < world_size (got rank={rank!r}, world_size={world_size!r})")
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        names = [s.name for s in dataset.streams]
        weights = dict(weights or {})
        for name in weights:
            if name not in names:
                raise DataError(f"weights: unknown source {name!r} (sources: {names})")
        self.weights = [float(weights.get(s.name, s.weight)) for s in dataset.streams]
        if any(not w > 0 for w in self.weights):
            raise DataError(f"weights: must all be > 0 (got {dict(zip(names, self.weights, strict=True))})")
        mass = [w * s.n_windows for w, s in zip(self.weights, dataset.streams, strict=True)]
        self._share = [m / sum(mass) for m in mass]
        self.samples_per_pass = int(round(sum(mass)))
        self.domains = dataset.domains
        self._domain_of = [self.domains.index(s.domain) for s in dataset.streams]
        self._keys: dict[tuple[int, int], int] = {}
        self.position = 0
        self.counts = [0] * len(dataset.streams)

    # ---- the global schedule ------------------------------------------------------------------------
    def _next_stream(self) -> int:
        g = self.position + 1
        best, best_gap = 0, -float("inf")
        for i, share in enumerate(self._share):
            gap = share * g - self.counts[i]
            if gap > best_gap + 1e-12:
                best, best_gap = i, gap
        return best

    def _window_of(self, stream: int, j: int) -> int:
        n = self.dataset.streams[stream].n_windows
        epoch, i = divmod(j, n)
        if not self.shuffle:
            return i
        key = self._keys.get((stream, epoch))
        if key is None:
            key = self._keys[(stream, epoch)] = _key(self.seed, self.dataset.streams[stream].name, epoch)
        return permute(i, n, key)

    def steps_per_pass(self) -> int:
        """Whole global batches in one pass (the length of a ``loop=False`` loader)."""
        return self.samples_per_pass // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.steps_per_pass()

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        global_batch = self.batch_size * self.world_size
        if not self.loop and self.position + global_batch > self.steps_per_pass() * global_batch:
            raise StopIteration
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        picks = []
        for offset in range(global_batch):
            stream = self._next_stream()
            j = self.counts[stream]
            self.counts[stream] += 1
            self.position += 1
            if offset in mine:
                picks.append((stream, self._window_of(stream, j)))
        return self._collate(picks)

    def _collate(self, picks: list[tuple[int, int]]) -> Batch:
        ds = self.dataset
        length = ds.seq_len + 1
        tokens = np.empty((len(picks), length), dtype=np.int64)
        positions = np.empty((len(picks), ds.seq_len), dtype=np.int64)
        last_opens = np.zeros(len(picks), dtype=bool)
        for row, (stream, k) in enumerate(picks):
            tokens[row], starts = ds.window(stream, k)
            positions[row] = positions_from_starts(ds.seq_len, starts)
            last_opens[row] = bool(starts[-1] == ds.seq_len)  # starts are sorted and lie in [0, seq_len]
        window_ids = [int(ds.window_base[s]) + k for s, k in picks]
        return Batch(tokens=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions),
                     domain_ids=torch.tensor([self._domain_of[s] for s, _ in picks], dtype=torch.long),
                     window_ids=torch.tensor(window_ids, dtype=torch.long),
                     last_target_opens=torch.from_numpy(last_opens))

    # ---- resume -----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        ds = self.dataset
        return {"seed": self.seed, "shuffle": self.shuffle, "seq_len": ds.seq_len, "split": ds.split,
                "tokenizer_hash": ds.manifest["tokenizer"]["hash"],
                "streams": [[s.name, s.n_windows] for s in ds.streams], "weights": self.weights}

    def state_dict(self) -> dict[str, Any]:
        """Where the global sequence stands; the same on every rank, valid for any rank count to resume."""
        return {"version": _STATE_VERSION, "position": self.position, "counts": list(self.counts), **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batches that produced ``state`` (the data and settings must match)."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"loader state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        mine = self._identity()
        for key, value in mine.items():
            theirs = state.get(key)
            if key == "streams":
                theirs = [list(x) for x in theirs or []]
            if theirs != value:
                raise DataError(f"loader state: {key} differs (saved {theirs!r}, now {value!r}); the data or the "
                                "loader settings changed since the state was saved")
        if len(state["counts"]) != len(self.counts) or sum(state["counts"]) != state["position"]:
            raise DataError("loader state: counts do not add up to position; the state is damaged")
        self.position = int(state["position"])
        self.counts = [int(c) for c in state["counts"]]
