"""Grouped-query attention with RoPE/YaRN, and two forms of differential attention.

- ``gqa``:   h query heads over kv shared K/V heads.
- ``diff``:  DIFF Transformer (Ye et al. 2024). Head i has two query/key sub-heads (Q1, Q2, K1, K2 of
             width d) and a value of width 2d: (softmax(Q1 K1^T) - lam * softmax(Q2 K2^T)) V, then a
             per-head RMSNorm and a (1 - lam_init) scale. lam = exp(lq1.lk1) - exp(lq2.lk2) + lam_init.
             In grouped form each K/V head carries its own (K1, K2, V). Research only: llama.cpp has no
             equivalent of the per-head norm.
- ``diff2``: the authors' second version: 2h query heads of width d over shared K/V; head i's output
             is o_{2i} - sigma(lam_i) o_{2i+1}, no norm. With one lambda per head this *is* a GQA layer
             with 2h heads and -sigma(lam) folded into the output projection, which is how it exports.
             ``diff2_lambda="token"`` computes lam from x per token (as published); not exportable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MambaMoEConfig
from ..ops.diff_attention import combine_diff2_heads, diff_lambda_init
from ..ops.rope import apply_rope
from .cache import KVState
from .norms import RMSNorm


class Attention(nn.Module):
    def __init__(self, config: MambaMoEConfig, layer_index: int) -> None:
        super().__init__()
        self.kind = config.attn_type
        self.num_heads = config.attn_num_heads
        self.num_kv_heads = config.attn_num_kv_heads
        self.head_dim = d = config.head_dim
        self.diff2_lambda = config.diff2_lambda
        dm, h, kv = config.d_model, self.num_heads, self.num_kv_heads

        q_heads = h if self.kind == "gqa" else 2 * h
        k_heads = 2 * kv if self.kind == "diff" else kv
        self.value_dim = 2 * d if self.kind == "diff" else d
        self.q_proj = nn.Linear(dm, q_heads * d, bias=False)
        self.k_proj = nn.Linear(dm, k_heads * d, bias=False)
        self.v_proj = nn.Linear(dm, kv * self.value_dim, bias=False)
        self.o_proj = nn.Linear(h * self.value_dim, dm, bias=False)

        if self.kind == "diff":
            self.lambda_init = diff_lambda_init(layer_index)
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                nn.Parameter(torch.randn(d) * 0.1) for _ in range(4))
            self.subln = RMSNorm(2 * d, config.rms_norm_eps)
        elif self.kind == "diff2":
            if self.diff2_lambda == "head":
                # sigma(0) = 0.5: start by subtracting half of the second map.
                self.diff_lambda = nn.Parameter(torch.zeros(h))
                self.diff_lambda._no_weight_decay = True
            else:
                self.lambda_proj = nn.Linear(dm, h, bias=False)

    def new_state(self, batch_size: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> KVState:
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        k_heads = self.k_proj.out_features // self.head_dim
        return KVState(key=torch.zeros(batch_size, k_heads, 0, self.head_dim, device=device, dtype=dtype),
                       value=torch.zeros(batch_size, self.num_kv_heads, 0, self.value_dim, device=device,
                                         dtype=dtype))

    def diff_lambda_value(self) -> Tensor:
        """The scalar lambda of the 2024 form (shared by all heads of the layer)."""
        first = torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
        second = torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
        return first - second + self.lambda_init

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                state: KVState | None = None) -> Tensor:
        """hidden (b, l, d_model); cos/sin (b, l, d); attn_mask (b, 1, l, t) bool or None for plain causal."""
        b, l, _ = hidden.shape
        d = self.head_dim
        q = self.q_proj(hidden).view(b, l, -1, d).transpose(1, 2)
        k = self.k_proj(hidden).view(b, l, -1, d).transpose(1, 2)
        v = self.v_proj(hidden).view(b, l, self.num_kv_heads, self.value_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = state.append(k, v)

        def sdpa(query: Tensor, key: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(query, key, v, attn_mask=attn_mask,
                                                  is_causal=attn_mask is None, enable_gqa=True)

        if self.kind == "gqa":
            out = sdpa(q, k)
        elif self.kind == "diff2":
            out = sdpa(q, k)                                                           # (b, 2h, l, d)
            lam = torch.sigmoid(self.diff_lambda if self.diff2_lambda == "head" else self.lambda_proj(hidden))
            out = combine_diff2_heads(out, lam.to(torch.promote_types(out.dtype, torch.float32)))
        else:  # diff: sub-heads (2i, 2i+1) form head i; K/V head j carries (K1, K2) = k heads (2j, 2j+1)
            o1 = sdpa(q[:, 0::2], k[:, 0::2])
            o2 = sdpa(q[:, 1::2], k[:, 1::2])
            out = o1 - self.diff_lambda_value().to(o1.dtype) * o2                     # (b, h, l, 2d)
            out = self.subln(out) * (1.0 - self.lambda_init)
        out = out.transpose(1, 2).reshape(b, l, -1).to(hidden.dtype)
        return self.o_proj(out)
