"""Triton kernels of the causal depthwise conv1d (+ optional SiLU), channels-last; see conv_triton.py.

Forward, per (t, c):  z_t = bias + sum_k w_k x_{t-K+1+k}  (taps outside [0, L) or in another document
are 0);  y_t = silu(z_t) or z_t.
Backward, with dz_t = dy_t silu'(z_t) (z recomputed from x, nothing stored but the inputs):
  dx_t = sum_j w_{K-1-j} dz_{t+j}   (same document),
  dw_k = sum_{b,t} dz_t x_{t-K+1+k},  dbias = sum_{b,t} dz_t  (per-program partial sums, summed by torch).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    xb = X + pid_b * sxb
    if HAS_SEQ:
        seq_t = tl.load(SEQ + pid_b * ssb + offs_l * ssl, mask=lmask, other=-1)
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        src = offs_l - (K - 1) + k
        ok = lmask & (src >= 0)
        if HAS_SEQ:
            seq_s = tl.load(SEQ + pid_b * ssb + src * ssl, mask=ok, other=-2)
            ok = ok & (seq_s == seq_t)
        xv = tl.load(xb + src[:, None] * sxl + offs_c[None, :] * sxc, mask=ok[:, None] & cmask[None, :], other=0.0)
        wv = tl.load(W + offs_c * K + k, mask=cmask, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(Y + pid_b * syb + offs_l[:, None] * syl + offs_c[None, :] * syc, acc.to(Y.dtype.element_ty),
             mask=lmask[:, None] & cmask[None, :])


@triton.jit
def _preact(xb, W, bias, seq_row, ssl, t, tmask, offs_c, cmask, sxl, sxc,
            K: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """z at positions t (BLOCK_L,): bias + sum_k w_k x_{t-K+1+k} (fp32)."""
    z = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32) + bias[None, :]
    if HAS_SEQ:
        seq_t = tl.load(seq_row + t * ssl, mask=tmask, other=-1)
    for k in tl.static_range(K):
        src = t - (K - 1) + k
        ok = tmask & (src >= 0)
        if HAS_SEQ:
            seq_s = tl.load(seq_row + src * ssl, mask=ok, other=-2)
            ok = ok & (seq_s == seq_t)
        xv = tl.load(xb + src[:, None] * sxl + offs_c[None, :] * sxc, mask=ok[:, None] & cmask[None, :], other=0.0)
        wv = tl.load(W + offs_c * K + k, mask=cmask, other=0.0)
        z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return z


@triton.jit
def _conv_bwd_kernel(X, W, BIAS, SEQ, DY, DX, DW_PART, DB_PART, L, C, n_lprog,
                     sxb, sxl, sxc, sdyb, sdyl, sdyc, sdxb, sdxl, sdxc, ssb, ssl,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, L_ITERS: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    xb = X + pid_b * sxb
    dyb = DY + pid_b * sdyb
    seq_row = SEQ + pid_b * ssb
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_c, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for it in tl.static_range(L_ITERS):
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
            dz = tl.load(dyb + tj[:, None] * sdyl + offs_c[None, :] * sdyc, mask=ok[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            if SILU:
                z = _preact(xb, W, bias, seq_row, ssl, tj, ok, offs_c, cmask, sxl, sxc,
                            K, HAS_SEQ, BLOCK_L, BLOCK_C)
                s = tl.sigmoid(z)
                dz = dz * s * (1.0 + z * (1.0 - s))
            dz = tl.where(ok[:, None] & cmask[None, :], dz, 0.0)
            wv = tl.load(W + offs_c * K + (K - 1 - j), mask=cmask, other=0.0).to(tl.float32)
            dx += dz * wv[None, :]
            if j == 0:  # dz at the block's own positions: the weight and bias gradients
                db += tl.sum(dz, axis=0)
                for k in tl.static_range(K):
                    src = offs_l - (K - 1) + k
                    okk = lmask & (src >= 0)
                    if HAS_SEQ:
                        seq_s = tl.load(seq_row + src * ssl, mask=okk, other=-2)
                        okk = okk & (seq_s == seq_t)
                    xv = tl.load(xb + src[:, None] * sxl + offs_c[None, :] * sxc,
                                 mask=okk[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                    part = tl.sum(dz * xv, axis=0)
                    if k == 0:
                        dw0 += part
                    elif k == 1:
                        dw1 += part
                    elif k == 2:
                        dw2 += part
                    else:
                        dw3 += part
        tl.store(DX + pid_b * sdxb + offs_l[:, None] * sdxl + offs_c[None, :] * sdxc, dx.to(DX.dtype.element_ty),
                 mask=lmask[:, None] & cmask[None, :])
    row = pid_b * n_lprog + pid_l
    tl.store(DB_PART + row * C + offs_c, db, mask=cmask)
    base = DW_PART + row * C * K + offs_c * K
    tl.store(base + 0, dw0, mask=cmask)
    if K > 1:
        tl.store(base + 1, dw1, mask=cmask)
    if K > 2:
        tl.store(base + 2, dw2, mask=cmask)
    if K > 3:
        tl.store(base + 3, dw3, mask=cmask)
