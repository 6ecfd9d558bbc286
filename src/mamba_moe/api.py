"""Seed 004's library API: ``create_mamba_moe(...)`` -> a Mamba / Switch-MoE backbone on (batch, seq, dim)."""

from __future__ import annotations

from typing import Any

import torch

from .config import MambaMoEConfig, get_preset
from .model.backbone import MambaMoEBackbone


def create_mamba_moe(dim: int = 512, depth: int = 12, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                     num_experts: int = 8, expert_dim: int = 2048, max_seq_len: int = 2048,
                     device: str | torch.device | None = None, **extra: Any) -> MambaMoEBackbone:
    """A stack of ``depth`` layers, each a Mamba2 block followed by a Switch (top-1) MoE FFN block.

    Returns a module mapping float inputs (batch, seq, dim) and an optional bool mask (batch, seq)
    to (batch, seq, dim). Switch routing applies its capacity (``moe_capacity_factor``, default 1.25,
    at least ``moe_min_capacity`` = 4 tokens per expert); tokens over capacity are dropped and ride
    the residual. ``extra`` overrides any other ``MambaMoEConfig`` field (e.g. ``ssm_head_dim``).

    The model is placed on ``device``; by default CUDA when available, else CPU, so seed 004's usage
    example, which moves only its inputs to ``cuda:0``, runs unchanged. Nothing is downloaded.
    """
    fields = get_preset("mamba-r1").to_dict()
    fields.update(d_model=dim, n_layers=depth, ssm_state_size=d_state, ssm_conv_kernel=d_conv, ssm_expand=expand,
                  moe_num_experts=num_experts, moe_expert_hidden_size=expert_dim,
                  max_position_embeddings=max_seq_len, layer_mixers=[], layer_ffns=[])
    # Seed 004's small example uses dim 256 with expand 1: keep 64-wide SSM heads when they fit.
    if "ssm_head_dim" not in extra and (dim * expand) % 64:
        fields["ssm_head_dim"] = next(h for h in (32, 16, 8, 4, 2, 1) if (dim * expand) % h == 0)
    fields.update(extra)
    model = MambaMoEBackbone(MambaMoEConfig.from_dict(fields))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)
