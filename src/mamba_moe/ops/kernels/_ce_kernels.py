"""Triton kernels of the cross-entropy of a logits matrix (N, V), one program per row; see ce_triton.py.

Forward: lse = log sum_v exp(x_v) (online, in fp32 over V in blocks); loss = lse - x_target, 0 where the
target is ignore_index. Backward: dx_v = g (softmax(x)_v - [v == target]), 0 for ignored rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(X, T, LOSS, LSE, V, stride_x, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # Lanes still at -inf (only masked tails) contribute 0 and must not produce NaN.
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    m_all = tl.max(m, axis=0)
    lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), axis=0))
    target = tl.load(T + row)
    valid = target != ignore_index
    safe = tl.minimum(tl.maximum(tl.where(valid, target, 0), 0), V - 1)  # never read out of the row
    x_t = tl.load(x_row + safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(X, T, LSE, G, DX, V, stride_x, stride_dx, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    target = tl.load(T + row)
    scale = tl.where(target != ignore_index, tl.load(G).to(tl.float32), 0.0)
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
        tl.store(dx_row + offs, (p * scale).to(DX.dtype.element_ty), mask=mask)
