"""AdamW with two parameter groups: decayed matrices, and everything weight decay would only hurt."""

from __future__ import annotations

import torch
from torch import nn


def no_decay(name: str, param: nn.Parameter) -> bool:
    """True for norms, biases, embeddings, any 1-D (or 0-D) parameter, and parameters the model flags
    ``_no_weight_decay`` (SSM ``A_log``/``D``/``dt_bias``, differential-attention lambdas, embedding table)."""
    if getattr(param, "_no_weight_decay", False) or param.dim() < 2:
        return True
    lowered = name.lower()
    return "norm" in lowered or lowered.endswith("bias") or "embed" in lowered


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: set[str] | None = None) -> list[dict]:
    """[decayed, not decayed]. ``no_decay_names``: the no-decay set decided earlier by :func:`no_decay` (FSDP
    replaces parameters by sharded ones that lose the ``_no_weight_decay`` flag, but keep their names)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = name in no_decay_names if no_decay_names is not None else no_decay(name, p)
            (keep if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device, no_decay_names: set[str] | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA (one launch per step), foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay, no_decay_names), lr=lr, betas=tuple(betas), eps=1e-8,
                             fused=fused or None)
