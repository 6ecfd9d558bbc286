"""Held-out loss for growth reports, and how much of the routing the experts receive.

Held-out data is either a folder written by ``mamba-moe data prepare`` (its ``val`` windows, the same
windows training evaluates on; the manifest's tokenizer hash is checked against the checkpoint's tokenizer)
or plain text (a file, or a folder of files), tokenised with the checkpoint's tokenizer, documents joined by
the end-of-text token and cut into windows of ``seq_len + 1`` tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.shards import MANIFEST
from ..model.ffn import MoEFeedForward
from .common import GrowthError, model_device


def _shard_windows(path: Path, tokenizer: Any, seq_len: int, max_windows: int) -> list[Tensor]:
    from ..data import PackedDataset

    ds = PackedDataset(path, seq_len, split="val", tokenizer=tokenizer)
    windows: list[Tensor] = []
    k = 0
    while len(windows) < max_windows:  # round-robin over the sources, so each contributes
        added = False
        for s, stream in enumerate(ds.streams):
            if k < stream.n_windows and len(windows) < max_windows:
                windows.append(torch.from_numpy(ds.window(s, k)[0]))
                added = True
        if not added:
            break
        k += 1
    return windows


def _text_windows(path: Path, tokenizer: Any, seq_len: int, max_windows: int) -> list[Tensor]:
    from ..user_text import InvalidTextError, decode_text

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = max_windows * seq_len + 1
    for file in files:
        try:
            text = decode_text(file.read_bytes(), str(file))
        except InvalidTextError:
            continue  # binaries in a folder of text: skipped
        ids += tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])
        if len(ids) >= need:
            break
    n = min(max_windows, (len(ids) - 1) // seq_len)
    return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len + 1]) for i in range(n)]


def heldout_windows(path: str | os.PathLike, tokenizer: Any, seq_len: int = 256, max_windows: int = 32) -> Tensor:
    """(n, seq_len + 1) token windows of held-out data (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise GrowthError(f"eval: {path}: no such file or folder")
    if (path / MANIFEST).exists():
        windows = _shard_windows(path, tokenizer, seq_len, max_windows)
    else:
        windows = _text_windows(path, tokenizer, seq_len, max_windows)
    if not windows:
        raise GrowthError(f"eval: {path} holds no window of {seq_len + 1} tokens; give more text or a smaller "
                          "--seq-len")
    return torch.stack(windows)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy per target token over ``windows`` (n, seq_len + 1), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(model_device(model))
            out = model(batch[:, :-1], targets=batch[:, 1:], router_stats=False)
            n = batch[:, 1:].numel()
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count


def loss_report(before: torch.nn.Module, after: torch.nn.Module, windows: Tensor) -> dict[str, float]:
    """Held-out loss before and after an operation, their difference and the perplexity ratio."""
    a, b = heldout_loss(before, windows), heldout_loss(after, windows)
    return {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1] - 1), "loss_before": a,
            "loss_after": b, "loss_change": b - a, "ppl_ratio": math.exp(min(b - a, 700.0))}


@torch.no_grad()
def expert_load(model: torch.nn.Module, ids: Tensor) -> list[dict[str, list[float]]]:
    """Per MoE layer: each expert's mean routing weight over the tokens of ``ids`` and its share of the tokens
    routed to it (weight > 0; for soft routing, the argmax share), from the router the layer runs."""
    from ..ops.moe import route

    rows: list[dict[str, list[float]]] = []

    def hook(module: MoEFeedForward, inputs: tuple, output: Any) -> None:
        tokens = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = torch.nn.functional.linear(tokens.double(), module.router.weight.double())
        routing = route(logits, module.router_kind, module.top_k, None, module.capacity_factor,
                        module.min_capacity)
        picked = routing.assigned if module.router_kind == "soft" else routing.weights > 0
        rows.append({"weight": routing.weights.mean(0).tolist(),
                     "tokens": (picked.double().sum(0) / max(tokens.shape[0], 1)).tolist()})

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoEFeedForward)]
    was_training = model.training
    model.eval()
    try:
        model(ids.to(model_device(model)), router_stats=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows
