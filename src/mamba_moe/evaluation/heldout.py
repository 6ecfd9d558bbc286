"""Held-out loss on token shards: the mean and the loss by position, for a model in any numeric form.

The training loop's validation (``Trainer.evaluate``) answers "how is this run doing"; this module answers the
study's questions about a finished checkpoint, where the trainer is not running: the loss on the same
held-out windows after a change that is not training — fake 4-bit weights, YaRN switched on, a longer
context than the model was trained on. Windows come from ``data prepare`` shards (``PackedDataset``, split
``val``: documents that never enter training), read in file order so every model sees the same tokens.

``position_losses`` runs each window in one forward pass and keeps the loss of every position: for a causal
model the loss at position t of a 32k window is the loss that an 8k window ending past t would give, so one
pass yields the curve for every shorter context too (``bucket_means`` cuts it into ranges).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import PackedDataset
from ..data.shards import load_manifest


@dataclass(frozen=True)
class HeldOut:
    """Mean loss (nats per token) over ``tokens`` predicted tokens and bits per byte of the split's text."""
    loss: float
    tokens: int
    windows: int
    bits_per_byte: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def bytes_per_token(shards: str | os.PathLike, split: str = "val") -> float:
    """UTF-8 bytes of text per token in a split (the manifest's per-shard counts), to turn nats per token
    into bits per byte, which compares models with different tokenizers."""
    manifest = load_manifest(shards)
    rows = [s for s in manifest["shards"] if s["split"] == split]
    tokens = sum(s["n_tokens"] for s in rows)
    if not tokens:
        raise ValueError(f"{shards}: split {split!r} has no tokens")
    return sum(s["text_bytes"] for s in rows) / tokens


def windows(shards: str | os.PathLike, seq_len: int, count: int, split: str = "val") -> Iterator[torch.Tensor]:
    """The first ``count`` windows of ``seq_len + 1`` tokens of a split, in file order (stream by stream)."""
    ds = PackedDataset(shards, seq_len, split)
    if count < 1:
        raise ValueError(f"windows: count must be at least 1, got {count}")
    if count > len(ds):
        raise ValueError(f"{shards}: split {split!r} has {len(ds)} windows of {seq_len + 1} tokens, "
                         f"{count} were asked for")
    for i in range(count):
        tokens, _ = ds.window(*ds.locate(i))
        yield torch.from_numpy(np.asarray(tokens, dtype=np.int64))


@torch.no_grad()
def position_losses(model: Any, batch: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Per-position loss (b, l) in float32 of windows ``batch`` (b, l + 1): position t predicts token t + 1.

    The logits are computed once and turned into losses ``chunk`` positions at a time, so a 32k window of a
    32k vocabulary never holds its float32 log-softmax whole."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs, router_stats=False).logits
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[1], chunk):
        part = logits[:, start:start + chunk].float()
        out[:, start:start + chunk] = F.cross_entropy(part.transpose(1, 2), targets[:, start:start + chunk],
                                                      reduction="none")
    if not torch.isfinite(out).all():
        raise FloatingPointError("held-out loss: the model produced non-finite logits")
    return out


def heldout_loss(model: Any, shards: str | os.PathLike, seq_len: int, count: int, *, batch_size: int = 1,
                 device: str | torch.device = "cpu", autocast: torch.dtype | None = None) -> HeldOut:
    """Mean loss of ``model`` over the first ``count`` held-out windows of ``seq_len``."""
    total, n = 0.0, 0
    for batch in _batches(windows(shards, seq_len, count), batch_size):
        with _autocast(device, autocast):
            losses = position_losses(model, batch.to(device))
        total += float(losses.double().sum())
        n += losses.numel()
    loss = total / n
    return HeldOut(loss=loss, tokens=n, windows=count,
                   bits_per_byte=loss / math.log(2) / bytes_per_token(shards))


def loss_by_position(model: Any, shards: str | os.PathLike, seq_len: int, count: int, *,
                     context: int | None = None, device: str | torch.device = "cpu",
                     autocast: torch.dtype | None = None) -> np.ndarray:
    """Mean loss at each position (``seq_len``,) over the first ``count`` held-out windows (one at a time:
    long windows are what this is for).

    With ``context`` (a divisor of ``seq_len``), each window is scored in consecutive pieces of ``context``
    tokens, so every token is predicted from at most ``context`` tokens before it: the same tokens and targets
    as the whole window, which makes the two curves comparable position by position (what a longer context
    adds, apart from which text happens to sit at which position)."""
    piece = context or seq_len
    if seq_len % piece:
        raise ValueError(f"context {piece} must divide the window length {seq_len}")
    total = torch.zeros(seq_len, dtype=torch.float64)
    for window in windows(shards, seq_len, count):
        # window holds seq_len + 1 tokens; piece i scores targets [i * piece + 1, (i + 1) * piece]
        pieces = torch.stack([window[a:a + piece + 1] for a in range(0, seq_len, piece)])
        with _autocast(device, autocast):
            total += position_losses(model, pieces.to(device)).reshape(-1).double().cpu()
    return (total / count).numpy()


def bucket_means(per_position: Sequence[float] | np.ndarray, edges: Sequence[int]) -> list[tuple[int, int, float]]:
    """(start, end, mean loss) of ``per_position`` over [edges[i], edges[i + 1]) for each pair of edges."""
    values = np.asarray(per_position, dtype=np.float64)
    if list(edges) != sorted(set(edges)) or edges[0] < 0 or edges[-1] > len(values):
        raise ValueError(f"bucket edges {list(edges)} must increase within [0, {len(values)}]")
    return [(a, b, float(values[a:b].mean())) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _batches(items: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    group: list[torch.Tensor] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)


def _autocast(device: str | torch.device, dtype: torch.dtype | None) -> Any:
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype, enabled=dtype is not None)
