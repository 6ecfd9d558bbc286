"""Decode state for a hybrid model: constant-size Mamba2 state and a growing KV cache for attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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

    ``positions`` counts the real (unpadded) tokens of each row; ``key_mask`` records which cached
    positions were real, so attention never looks at padding.
    """

    def __init__(self, layers: list[MambaState | KVState | None], batch_size: int, device: torch.device) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def seen_tokens(self) -> int:
        return self.key_mask.shape[1]

    def state_bytes(self) -> dict[str, int]:
        """Bytes held by Mamba layers (constant in context length) and attention layers (linear)."""
        mamba = sum(s.conv.nbytes + s.ssm.nbytes for s in self.layers if isinstance(s, MambaState))
        kv = sum(s.key.nbytes + s.value.nbytes for s in self.layers if isinstance(s, KVState))
        return {"mamba": mamba, "attention": kv, "total": mamba + kv}
