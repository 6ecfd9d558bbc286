"""Triton kernels of the causal depthwise conv1d (+ optional SiLU), channels-last; see conv_triton.py.

Forward, per (t, c):  z_t = bias + sum_k w_k x_{t-K+1+k}  (taps outside [0, L) or in another document
are 0);  y_t = silu(z_t) or z_t.
Backward, two passes (nothing stored by the forward but its inputs):
  1. dz_t = dy_t silu'(z_t), z recomputed from x; dz written once in fp32;
  2. dx_t = sum_j w_{K-1-j} dz_{t+j}   (same document),
     dw_k = sum_{b,t} dz_t x_{t-K+1+k},  dbias = sum_{b,t} dz_t  (per-program partial sums, summed by torch).
The first version did it in one pass, recomputing z at the K shifted positions each dx term needs: K x K
shifted loads per tile. On an H100 that pass took 1.48 ms per flagship layer (2 x 8192 x 2304, bf16)
against the forward's 0.09 ms; it was 18% of a training step.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _preactivation(xb, W, BIAS, seq_row, ssl, offs_l, lmask, offs_c, cmask, sxl, sxc,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                   BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """z (BLOCK_L, BLOCK_C) fp32 at positions offs_l: bias + sum_k w_k x_{t-K+1+k}, taps outside [0, L) or in
    another document being 0. The forward and the backward's first pass share it."""
    if HAS_SEQ:
        seq_t = tl.load(seq_row + offs_l * ssl, mask=lmask, other=-1)
    z = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        src = offs_l - (K - 1) + k
        ok = lmask & (src >= 0)
        if HAS_SEQ:
            seq_s = tl.load(seq_row + src * ssl, mask=ok, other=-2)
            ok = ok & (seq_s == seq_t)
        xv = tl.load(xb + src[:, None] * sxl + offs_c[None, :] * sxc, mask=ok[:, None] & cmask[None, :], other=0.0)
        wv = tl.load(W + offs_c * K + k, mask=cmask, other=0.0)
        z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        z += tl.load(BIAS + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, SEQ, Y, L, C,
                     sxb, sxl, sxc, syb, syl, syc, ssb, ssl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    lmask = offs_l < L
    cmask = offs_c < C
    acc = _preactivation(X + pid_b * sxb, W, BIAS, SEQ + pid_b * ssb, ssl, offs_l, lmask, offs_c, cmask, sxl, sxc,
                         K, HAS_BIAS, HAS_SEQ, BLOCK_L, BLOCK_C)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + pid_b * syb + offs_l[:, None] * syl + offs_c[None, :] * syc, acc.to(Y.dtype.element_ty),
             mask=lmask[:, None] & cmask[None, :])


@triton.jit
def _conv_dz_kernel(X, W, BIAS, SEQ, DY, DZ, L, C,
                    sxb, sxl, sxc, sdyb, sdyl, sdyc, ssb, ssl,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward, pass 1: dz_t = dy_t silu'(z_t) (z recomputed like the forward), stored fp32 (b, L, C)."""
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    lmask = offs_l < L
    cmask = offs_c < C
    io_mask = lmask[:, None] & cmask[None, :]
    dz = tl.load(DY + pid_b * sdyb + offs_l[:, None] * sdyl + offs_c[None, :] * sdyc, mask=io_mask,
                 other=0.0).to(tl.float32)
    if SILU:
        z = _preactivation(X + pid_b * sxb, W, BIAS, SEQ + pid_b * ssb, ssl, offs_l, lmask, offs_c, cmask, sxl, sxc,
                           K, HAS_BIAS, HAS_SEQ, BLOCK_L, BLOCK_C)
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    tl.store(DZ + pid_b * L * C + offs_l[:, None] * C + offs_c[None, :], dz, mask=io_mask)


@triton.jit
def _conv_dx_dw_kernel(X, W, SEQ, DZ, DX, DW_PART, DB_PART, L, C, n_lprog,
                       sxb, sxl, sxc, sdxb, sdxl, sdxc, ssb, ssl,
                       K: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                       L_ITERS: tl.constexpr):
    """Backward, pass 2, over L_ITERS blocks of positions: dx_t = sum_j w_{K-1-j} dz_{t+j} (same document),
    and this program's partial sums of dw_k = sum_t dz_t x_{t-K+1+k} and dbias = sum_t dz_t. The partial
    products accumulate elementwise and are reduced over positions once, at the end."""
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    xb = X + pid_b * sxb
    dzb = DZ + pid_b * L * C
    seq_row = SEQ + pid_b * ssb
    db = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw0 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for it in range(L_ITERS):  # a loop, not unrolled: the body is large enough
        offs_l = (pid_l * L_ITERS + it) * BLOCK_L + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        if HAS_SEQ:
            seq_t = tl.load(seq_row + offs_l * ssl, mask=lmask, other=-1)
        dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(K):
            tj = offs_l + j
            ok = lmask & (tj < L)
            if HAS_SEQ:
                seq_j = tl.load(seq_row + tj * ssl, mask=ok, other=-2)
                ok = ok & (seq_j == seq_t)
            dz = tl.load(dzb + tj[:, None] * C + offs_c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(W + offs_c * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)
            dx += dz * wv[None, :]
            if j == 0:  # dz at the block's own positions: the weight and bias gradients
                db += dz
                for k in tl.static_range(K):
                    src = offs_l - (K - 1) + k
                    okk = lmask & (src >= 0)
                    if HAS_SEQ:
                        seq_s = tl.load(seq_row + src * ssl, mask=okk, other=-2)
                        okk = okk & (seq_s == seq_t)
                    xv = tl.load(xb + src[:, None] * sxl + offs_c[None, :] * sxc,
                                 mask=okk[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                    if k == 0:
                        dw0 += dz * xv
                    elif k == 1:
                        dw1 += dz * xv
                    elif k == 2:
                        dw2 += dz * xv
                    else:
                        dw3 += dz * xv
        tl.store(DX + pid_b * sdxb + offs_l[:, None] * sdxl + offs_c[None, :] * sdxc, dx.to(DX.dtype.element_ty),
                 mask=lmask[:, None] & cmask[None, :])
    row = pid_b * n_lprog + pid_l
    tl.store(DB_PART + row * C + offs_c, tl.sum(db, axis=0), mask=cmask)
    base = DW_PART + row * C * K + offs_c * K
    tl.store(base + 0, tl.sum(dw0, axis=0), mask=cmask)
    if K > 1:
        tl.store(base + 1, tl.sum(dw1, axis=0), mask=cmask)
    if K > 2:
        tl.store(base + 2, tl.sum(dw2, axis=0), mask=cmask)
    if K > 3:
        tl.store(base + 3, tl.sum(dw3, axis=0), mask=cmask)
