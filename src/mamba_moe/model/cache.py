"""Decode state for a hybrid model: constant-size Mamba2 state and a growing KV cache for attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MambaState:
    """conv: the last kernel - 1 conv inputs (b, conv_dim, K - 1); ssm: (b, heads, head_dim, d_state)."""

    conv: Tensor
    ssm: Tensor


@dataclass
class KVState:
    """Keys after RoPE (b, k_heads, t, d) and values (b, v_heads, t, dv); empty (t = 0) at start."""

    key: Tensor
    value: Tensor

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.key = torch.cat([self.key, key], dim=2)
        self.value = torch.cat([self.value, value], dim=2)
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
