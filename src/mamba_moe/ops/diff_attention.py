"""Differential attention helpers (Ye et al. 2024 and its second version) as pure functions."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def diff_lambda_init(layer_index: int) -> float:
    """DIFF Transformer's depth-dependent lambda_init = 0.8 - 0.6 exp(-0.3 * layer_index) (0-based)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def combine_diff2_heads(out: Tensor, lam: Tensor) -> Tensor:
    """Merge 2h head outputs (b, 2h, l, d) into h: o_i = o_{2i} - lam_i * o_{2i+1}.

    ``lam`` is sigma(lambda) already, shaped (h,) for per-head lambda or (b, l, h) for token-wise.
    """
    b, two_h, l, d = out.shape
    pairs = out.view(b, two_h // 2, 2, l, d)
    if lam.dim() == 1:
        lam = lam.view(1, -1, 1, 1)
    else:
        lam = lam.permute(0, 2, 1)[..., None]                                           # (b, h, l, 1)
    return pairs[:, :, 0] - lam.to(out.dtype) * pairs[:, :, 1]


def fold_diff2_output_projection(o_proj_weight: Tensor, lam: Tensor, head_dim: int) -> Tensor:
    """The output projection of a plain GQA layer with 2h heads that computes ``diff2`` exactly.

    o_proj_weight: (d_model, h * head_dim); lam: sigma(lambda), shape (h,). Head 2i gets the columns of
    head i, head 2i+1 the same columns times -lam_i. This is the rewrite the GGUF exporter uses.
    """
    d_model = o_proj_weight.shape[0]
    h = lam.shape[0]
    cols = o_proj_weight.view(d_model, h, 1, head_dim)
    scale = torch.stack([torch.ones_like(lam), -lam], dim=-1).to(o_proj_weight.dtype)  # (h, 2)
    return (cols * scale[None, :, :, None]).reshape(d_model, 2 * h * head_dim)
