"""Decode state for a hybrid model: constant-size Mamba2 state and a growing KV cache for attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class KeyValueStore(Protocol):
    """What an attention layer needs from its decode state: ``append`` new keys/values, get all of them back.

    ``KVState`` is one; CUDA-graph decode supplies another that writes into static buffers.
    """

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class MambaState:
    """conv: the last kernel - 1 conv inputs (b, conv_dim, K - 1); ssm: (b, heads, head_dim, d_state)."""

    conv: Tensor
    ssm: Tensor


@dataclass
class KVState:
    """Keys after RoPE (b, k_heads, t, d) and values (b, v_heads, t, dv); empty (t = 0) at start.

    ``key``/``value`` are views of the first t positions of preallocated buffers: ``append`` writes the new
    positions in place and grows the buffers by doubling when full, so decoding n tokens copies O(n)
    entries rather than the O(n^2) of concatenating every step. ``reserve`` preallocates when the final
    length is known (a generation's prompt + max new tokens).
    """

    key: Tensor
    value: Tensor
    _key_buffer: Tensor | None = field(default=None, repr=False)
    _value_buffer: Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return self.key.shape[2]

    @property
    def capacity(self) -> int:
        return self.length if self._key_buffer is None else self._key_buffer.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions in all (the filled part is kept)."""
        if capacity <= self.capacity:
            return
        t = self.length
        key = self.key.new_empty(*self.key.shape[:2], capacity, self.key.shape[3])
        value = self.value.new_empty(*self.value.shape[:2], capacity, self.value.shape[3])
        key[:, :, :t].copy_(self.key)
        value[:, :, :t].copy_(self.value)
        self._key_buffer, self._value_buffer = key, value
        self.key, self.value = key[:, :, :t], value[:, :, :t]

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        t, n = self.length, key.shape[2]
        if n == 0:
            return self.key, self.value
        if self._key_buffer is None or t + n > self.capacity:
            self.reserve(max(t + n, 2 * self.capacity))
        self._key_buffer[:, :, t:t + n].copy_(key)
        self._value_buffer[:, :, t:t + n].copy_(value)
        self.key, self.value = self._key_buffer[:, :, :t + n], self._value_buffer[:, :, :t + n]
        return self.key, self.value


class HybridCache:
    """Everything a model needs to continue a batch of sequences where the last call stopped.

    ``positions`` counts the real (unpadded) tokens of each row; ``key_mask`` (b, t) records which cached
    positions were real, so attention never looks at padding. ``key_mask`` is a view of a preallocated
    buffer that grows by doubling (``extend_key_mask``), so decoding does not concatenate it every step.
    Rows are dropped and merged with ``select_rows`` / ``concat`` (continuous batching).
    """

    def __init__(self, layers: list[MambaState | KVState | None], batch_size: int, device: torch.device) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self._key_mask_buffer: Tensor | None = None

    @property
    def seen_tokens(self) -> int:
        return self.key_mask.shape[1]

    def state_bytes(self) -> dict[str, int]:
        """Bytes held by Mamba layers (constant in context length) and attention layers (linear)."""
        mamba = sum(s.conv.nbytes + s.ssm.nbytes for s in self.layers if isinstance(s, MambaState))
        kv = sum(s.key.nbytes + s.value.nbytes for s in self.layers if isinstance(s, KVState))
        return {"mamba": mamba, "attention": kv, "total": mamba + kv}

    def clone(self) -> HybridCache:
        """An independent copy (states, positions, key mask): a snapshot to branch from or roll back to.

        A hybrid cannot reuse a partial prefix the way a transformer's KV cache can (the Mamba state is a
        summary of the whole past), so continuing a conversation from turn k means keeping turn k's
        snapshot. It costs the Mamba states (constant) plus the attention keys so far.
        """
        layers: list[MambaState | KVState | None] = []
        for state in self.layers:
            if isinstance(state, MambaState):
                layers.append(MambaState(conv=state.conv.clone(), ssm=state.ssm.clone()))
            elif isinstance(state, KVState):
                layers.append(_reserved(state.key.clone(), state.value.clone(), state.capacity))
            else:
                layers.append(state)
        out = HybridCache(layers, self.batch_size, self.positions.device)
        out.positions = self.positions.clone()
        out.key_mask = self.key_mask.clone()
        return out

    # ---- the key mask ---------------------------------------------------------------------------
    def extend_key_mask(self, real: Tensor | None = None) -> Tensor:
        """Append ``real`` (b, n) bool (True = a real token; None = one real token per row) to ``key_mask`` and
        return the new mask (b, t + n).

        Written into a buffer kept across calls. A ``key_mask`` assigned from outside (CUDA-graph decode
        points it at its own buffer) is noticed and copied over once.
        """
        b, t = self.key_mask.shape
        n = 1 if real is None else real.shape[1]
        buf = self._key_mask_buffer
        if (buf is None or buf.shape[1] < t + n or buf.shape[0] != b or buf.device != self.key_mask.device
                or self.key_mask.data_ptr() != buf.data_ptr() or self.key_mask.stride() != buf.stride()):
            capacity = max(t + n, 2 * t, self.key_capacity())
            buf = torch.zeros(b, capacity, dtype=torch.bool, device=self.key_mask.device)
            buf[:, :t] = self.key_mask
            self._key_mask_buffer = buf
        buf[:, t:t + n] = True if real is None else real
        self.key_mask = buf[:, :t + n]
        return self.key_mask

    def key_capacity(self) -> int:
        """Key positions every attention layer has room for (0 without attention)."""
        return min((s.capacity for s in self.layers if isinstance(s, KVState)), default=0)

    # ---- reshaping a running batch --------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Preallocate ``length`` key positions in every attention layer."""
        for state in self.layers:
            if isinstance(state, KVState):
                state.reserve(length)

    def select_rows(self, rows: list[int] | Tensor, reserve: int = 0) -> HybridCache:
        """A new cache holding only ``rows`` (in that order); leading key positions no kept row uses are trimmed.

        ``reserve``: key positions to preallocate in attention layers (current length + tokens still to come).
        """
        index = torch.as_tensor(rows, dtype=torch.long, device=self.positions.device)
        key_mask = self.key_mask.index_select(0, index)
        used = key_mask.any(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else key_mask.shape[1]
        key_mask = key_mask[:, first:]
        layers: list[MambaState | KVState | None] = []
        for state in self.layers:
            if isinstance(state, MambaState):
                layers.append(MambaState(conv=state.conv.index_select(0, index), ssm=state.ssm.index_select(0, index)))
            elif isinstance(state, KVState):
                layers.append(_reserved(state.key.index_select(0, index)[:, :, first:],
                                        state.value.index_select(0, index)[:, :, first:], reserve - first))
            else:
                layers.append(state)
        out = HybridCache(layers, len(index), self.positions.device)
        out.positions = self.positions.index_select(0, index)
        out.key_mask = key_mask
        return out

    @staticmethod
    def concat(caches: list[HybridCache], reserve: int = 0) -> HybridCache:
        """The rows of several caches of one model stacked into one cache (in order).

        Attention caches of different lengths are aligned by left-padding the shorter ones with keys marked
        invalid in ``key_mask``, the mechanism that serves left-padded prompts, so no row attends to another
        row's padding. ``reserve``: key positions to preallocate, counted from the merged length.
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
                layers.append(MambaState(conv=torch.cat([s.conv for s in states]),
                                         ssm=torch.cat([s.ssm for s in states])))
            elif isinstance(first, KVState):
                layers.append(_reserved(torch.cat([_left_pad(s.key, length, 2) for s in states]),
                                        torch.cat([_left_pad(s.value, length, 2) for s in states]), reserve))
            else:
                layers.append(first)
        out = HybridCache(layers, sum(c.batch_size for c in caches), caches[0].positions.device)
        out.positions = torch.cat([c.positions for c in caches])
        out.key_mask = torch.cat([_left_pad(c.key_mask, length, 1, False) for c in caches])
        return out


def _reserved(key: Tensor, value: Tensor, reserve: int) -> KVState:
    state = KVState(key=key, value=value)
    state.reserve(max(reserve, key.shape[2]))
    return state


def _left_pad(x: Tensor, length: int, dim: int, value: float | bool = 0) -> Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)
