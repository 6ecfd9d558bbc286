"""Reshaping a running batch's decode state: dropping finished rows and merging in new ones.

This is what lets the engine batch continuously: a request that finishes leaves the batch at once,
and a new request is prefilled on its own fresh cache and then joins the running batch. Mamba states
are per row and simply stacked. Attention caches of different lengths are aligned by left-padding the
shorter one with keys marked invalid in ``key_mask``, the same mechanism that serves left-padded
prompts, so no row ever attends to another row's padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.cache import HybridCache, KVState, MambaState


def _kv(key: Tensor, value: Tensor, reserve: int) -> KVState:
    state = KVState(key=key, value=value)
    state.reserve(max(reserve, key.shape[2]))
    return state


def select_rows(cache: HybridCache, rows: list[int] | Tensor, reserve: int = 0) -> HybridCache:
    """A cache holding only ``rows`` (in that order); leading key positions no kept row uses are trimmed.

    ``reserve``: key positions to preallocate in attention layers (current length + tokens still to come).
    """
    index = torch.as_tensor(rows, dtype=torch.long, device=cache.positions.device)
    key_mask = cache.key_mask.index_select(0, index)
    used = key_mask.any(0)
    first = int(used.nonzero()[0]) if bool(used.any()) else key_mask.shape[1]
    key_mask = key_mask[:, first:]
    layers: list[MambaState | KVState | None] = []
    for state in cache.layers:
        if isinstance(state, MambaState):
            layers.append(MambaState(conv=state.conv.index_select(0, index), ssm=state.ssm.index_select(0, index)))
        elif isinstance(state, KVState):
            layers.append(_kv(state.key.index_select(0, index)[:, :, first:],
                              state.value.index_select(0, index)[:, :, first:], reserve - first))
        else:
            layers.append(state)
    out = HybridCache(layers, len(index), cache.positions.device)
    out.positions = cache.positions.index_select(0, index)
    out.key_mask = key_mask
    return out


def _left_pad(x: Tensor, length: int, dim: int, value: float | bool = 0) -> Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)


def concat(caches: list[HybridCache], reserve: int = 0) -> HybridCache:
    """Stack the rows of several caches of one model into one cache (in order).

    ``reserve``: key positions to preallocate in attention layers, counted from the merged length.
    """
    caches = [c for c in caches if c.batch_size > 0]
    if not caches:
        raise ValueError("concat: no rows to merge")
    if len(caches) == 1 and reserve <= caches[0].seen_tokens:
        return caches[0]
    length = max(c.seen_tokens for c in caches)
    layers: list[MambaState | KVState | None] = []
    for states in zip(*(c.layers for c in caches), strict=True):
        first = states[0]
        if isinstance(first, MambaState):
            layers.append(MambaState(conv=torch.cat([s.conv for s in states]), ssm=torch.cat([s.ssm for s in states])))
        elif isinstance(first, KVState):
            layers.append(_kv(torch.cat([_left_pad(s.key, length, 2) for s in states]),
                              torch.cat([_left_pad(s.value, length, 2) for s in states]), reserve))
        else:
            layers.append(first)
    batch = sum(c.batch_size for c in caches)
    out = HybridCache(layers, batch, caches[0].positions.device)
    out.positions = torch.cat([c.positions for c in caches])
    out.key_mask = torch.cat([_left_pad(c.key_mask, length, 1, False) for c in caches])
    return out


def reserve(cache: HybridCache, length: int) -> None:
    """Preallocate ``length`` key positions in every attention layer."""
    for state in cache.layers:
        if isinstance(state, KVState):
            state.reserve(length)
