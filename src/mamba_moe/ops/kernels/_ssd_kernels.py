"""Triton kernels of the chunked SSD scan, forward and backward. Imported only when Triton is.

Notation (one batch row, one head h of group g, one chunk c of Q positions, i/j positions in it):
    s_i   = cumsum(dt * A) inside the chunk (fp32; s_last = s at the chunk's last position)
    CB_ij = C_i . B_j (per group, fp32)        L_ij = exp(s_i - s_j) for j <= i
    S_c   = state entering chunk c (p x n);  Z_c = sum_j exp(s_last - s_j) dt_j x_j B_j^T
    S_c+1 = exp(s_last) S_c + Z_c
    y_i   = exp(s_i) S_c C_i + sum_{j<=i} CB_ij L_ij dt_j x_j + D x_i

Forward: cumsum -> CB (once per group) -> Z_c -> state passing (sequential over chunks, in place)
-> output (per head and block of rows; reads CB tiles).

Backward (G_c = gradient of S_c, dZ_c = G_c+1, dM_ij = dy_i . x_j, P_ij = dM_ij dt_j L_ij CB_ij):
    dS_local_c = sum_i exp(s_i) dy_i C_i^T;  G_c = dS_local_c + exp(s_last) G_c+1
    dCB_ij     = sum_{h in group} dM_ij dt_j L_ij                      (one Q x Q tile set per group)
    dC_i       = sum_j dCB_ij B_j + sum_h exp(s_i) dy_i S_c            (n-wide products per group)
    dB_j       = sum_i dCB_ij C_i + sum_h exp(s_last - s_j) dt_j dZ_c^T x_j
    d(dt x)_j  = exp(s_last - s_j) dZ_c B_j + sum_{i>=j} CB_ij L_ij dy_i
    d(dt A)_k  = sum_{i>=k} dy_i . y_off_i + exp(s_last) <G_c+1, S_c> + sum_{j<k} w_j
                 + sum_{i>=k>j} P_ij,      w_j = dt_j x_j . d(dt x)_state_j
Every term of d(dt A) is summed directly: no difference of large sums, which in 16-bit (and even
fp32) arithmetic cancels to noise over a 256-long chunk.

With seq_idx (documents packed in one row), pairs of positions in different documents are
masked, a chunk's state only collects its last document, and the carried state is dropped where
a document starts inside a chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dA_cumsum_kernel(dt_ptr, A_ptr, s_ptr, L, H, nchunks, sdt_b, sdt_l, sdt_h,
                      Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    """s[b, h, c, :] = cumsum over the chunk of dt * A (padded positions have dt = 0)."""
    c = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    t = c * Q + offs_q
    hmask = offs_h < H
    qmask = offs_q < Q
    dt = tl.load(dt_ptr + b * sdt_b + t[:, None].to(tl.int64) * sdt_l + offs_h[None, :] * sdt_h,
                 mask=(qmask & (t < L))[:, None] & hmask[None, :], other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    s = tl.cumsum(dt * A[None, :], axis=0)
    s_off = ((b * H + offs_h[None, :]) * nchunks + c) * Q + offs_q[:, None]
    tl.store(s_ptr + s_off, s, mask=qmask[:, None] & hmask[None, :])


@triton.jit
def _chunk_state_kernel(X_ptr, Y_ptr, dt_ptr, s_ptr, seq_ptr, out_ptr,
                        L, H, P, N, nchunks, heads_per_group,
                        sx_b, sx_l, sx_h, sx_p, sy_b, sy_l, sy_g, sy_n, sdt_b, sdt_l, sdt_h, sq_b, sq_l,
                        MODE: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PREC: tl.constexpr):
    """out[b, c, h] (p x n) = sum_t w_t X[t, h]^T Y[t, g].

    MODE 0 (the chunk's own state Z_c): X = x, Y = B, w_t = dt_t exp(s_last - s_t).
    MODE 1 (dS_local_c):               X = dy, Y = C, w_t = exp(s_t).
    """
    pid0 = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = pid0 % H
    pn = pid0 // H
    npb = tl.cdiv(P, BLOCK_P)
    pb = pn % npb
    nb = pn // npb
    g = h // heads_per_group
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    nmask = offs_n < N
    s_base = s_ptr + ((b * H + h) * nchunks + c) * Q
    s_last = tl.load(s_base + Q - 1)
    if HAS_SEQ:
        if MODE == 0:
            seq_ref = tl.load(seq_ptr + b * sq_b + (tl.minimum(c * Q + Q, L) - 1) * sq_l)
        else:
            seq_ref = tl.load(seq_ptr + b * sq_b + tl.maximum(c * Q - 1, 0) * sq_l)
    x_base = X_ptr + b * sx_b + h * sx_h
    y_base = Y_ptr + b * sy_b + g * sy_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_T):
        offs_t = k0 + tl.arange(0, BLOCK_T)
        t = c * Q + offs_t
        tmask = t < L
        t64 = t.to(tl.int64)
        xT = tl.load(x_base + offs_p[:, None] * sx_p + t64[None, :] * sx_l,
                     mask=pmask[:, None] & tmask[None, :], other=0.0)
        yk = tl.load(y_base + t64[:, None] * sy_l + offs_n[None, :] * sy_n,
                     mask=tmask[:, None] & nmask[None, :], other=0.0)
        sk = tl.load(s_base + offs_t)
        if MODE == 0:
            dtk = tl.load(dt_ptr + b * sdt_b + t64 * sdt_l + h * sdt_h, mask=tmask, other=0.0).to(tl.float32)
            w = dtk * tl.exp(s_last - sk)
        else:
            w = tl.exp(sk)
        if HAS_SEQ:
            seqk = tl.load(seq_ptr + b * sq_b + t64 * sq_l, mask=tmask, other=-1)
            w = tl.where(seqk == seq_ref, w, 0.0)
        xw = (xT.to(tl.float32) * w[None, :]).to(yk.dtype)
        acc += tl.dot(xw, yk, input_precision=DOT_PREC)
    out_off = (((b * nchunks + c) * H + h) * P + offs_p[:, None]) * N + offs_n[None, :]
    tl.store(out_ptr + out_off, acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _state_fwd_kernel(st_ptr, s_ptr, init_ptr, final_ptr, seq_ptr, L, H, nchunks, PN, sq_b, sq_l,
                      Q: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """In place over st (b, c, h, p*n): Z_c in, S_c (state entering chunk c) out; final = S_nchunks."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_INIT:
        S = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * sq_b)
    chunk_stride = H * PN
    base = st_ptr + (b * nchunks * H + h) * PN + offs
    s_base = s_ptr + bh * nchunks * Q
    Z_next = tl.load(base, mask=mask, other=0.0)
    for c in range(nchunks):
        Z = Z_next
        c64 = tl.cast(c, tl.int64)
        Z_next = tl.load(base + (c64 + 1) * chunk_stride, mask=mask & (c + 1 < nchunks), other=0.0)
        tl.store(base + c64 * chunk_stride, S, mask=mask)
        decay = tl.exp(tl.load(s_base + c64 * Q + Q - 1))
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * sq_b + (tl.minimum(c * Q + Q, L) - 1) * sq_l)
            decay = tl.where(seq_last == seq_prev, decay, 0.0)
            seq_prev = seq_last
        S = decay * S + Z
    tl.store(final_ptr + bh * PN + offs, S, mask=mask)


@triton.jit
def _state_bwd_kernel(dst_ptr, st_ptr, dfinal_ptr, s_ptr, seq_ptr, dinit_ptr, dsend_ptr,
                      L, H, nchunks, PN, NB, sq_b, sq_l,
                      Q: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse state passing, in place over dst (b, c, h, p*n): dS_local_c in, dZ_c = G_c+1 out.

    Also dsend[b, h, c, pid] = exp(s_last) <G_c+1, S_c> over this program's slice (the carried
    state's share of dL/d(dt A) for every position of chunk c), and dinit = G_0.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK,), dtype=tl.float32)
    chunk_stride = H * PN
    dbase = dst_ptr + (b * nchunks * H + h) * PN + offs
    sbase = st_ptr + (b * nchunks * H + h) * PN + offs
    s_base = s_ptr + bh * nchunks * Q
    last = (pid * 0 + nchunks - 1).to(tl.int64)
    Lc_next = tl.load(dbase + last * chunk_stride, mask=mask, other=0.0)
    Sc_next = tl.load(sbase + last * chunk_stride, mask=mask, other=0.0)
    for i in range(nchunks):
        c = nchunks - 1 - i
        c64 = tl.cast(c, tl.int64)
        Lc = Lc_next
        Sc = Sc_next
        pmask = mask & (c > 0)
        Lc_next = tl.load(dbase + (c64 - 1) * chunk_stride, mask=pmask, other=0.0)
        Sc_next = tl.load(sbase + (c64 - 1) * chunk_stride, mask=pmask, other=0.0)
        tl.store(dbase + c64 * chunk_stride, G, mask=mask)
        decay = tl.exp(tl.load(s_base + c64 * Q + Q - 1))
        if HAS_SEQ:
            seq_last = tl.load(seq_ptr + b * sq_b + (tl.minimum(c * Q + Q, L) - 1) * sq_l)
            seq_prev = tl.load(seq_ptr + b * sq_b + tl.maximum(c * Q - 1, 0) * sq_l)
            decay = tl.where(seq_last == seq_prev, decay, 0.0)
        tl.store(dsend_ptr + (bh * nchunks + c64) * NB + pid, tl.sum(G * Sc, axis=0) * decay)
        G = Lc + decay * G
    tl.store(dinit_ptr + bh * PN + offs, G, mask=mask)


@triton.jit
def _causal_tile(t):
    """The t-th (i-block, j-block) pair with j <= i, in the order (0,0), (1,0), (1,1), (2,0), ...

    Computed, not read from a table: a cached device table would be a tensor allocated inside the first
    call, which CUDA-graph capture (torch.compile's reduce-overhead mode) rejects as an untracked live
    allocation. i = floor((sqrt(8t + 1) - 1) / 2), then corrected by one in either direction against
    rounding of the float square root."""
    i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    return i, t - i * (i + 1) // 2


@triton.jit
def _bmm_cb_kernel(B_ptr, C_ptr, cb_ptr, L, G, N, nchunks,
                   sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
                   Q: tl.constexpr, BLK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """CB[b, c, g, i, j] = C_i . B_j (fp32) for the causal blocks (i-block >= j-block) of each chunk.

    Shared by every head of the group, so the n-wide products happen once per group, not per head."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    bg = tl.program_id(2).to(tl.int64)
    b = bg // G
    g = bg % G
    ib, jb = _causal_tile(t)
    offs_i = ib * BLK + tl.arange(0, BLK)
    offs_j = jb * BLK + tl.arange(0, BLK)
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    ti = (c * Q + offs_i).to(tl.int64)
    tj = (c * Q + offs_j).to(tl.int64)
    C_i = tl.load(C_ptr + b * sc_b + g * sc_g + ti[:, None] * sc_l + offs_n[None, :] * sc_n,
                  mask=(ti < L)[:, None] & nmask[None, :], other=0.0)
    B_jT = tl.load(B_ptr + b * sb_b + g * sb_g + offs_n[:, None] * sb_n + tj[None, :] * sb_l,
                   mask=nmask[:, None] & (tj < L)[None, :], other=0.0)
    cb = tl.dot(C_i, B_jT, input_precision=DOT_PREC)
    tl.store(cb_ptr + ((b * nchunks + c) * G + g) * Q * Q + offs_i[:, None] * Q + offs_j[None, :], cb)


@triton.jit
def _chunk_scan_fwd_kernel(x_ptr, dt_ptr, s_ptr, C_ptr, cb_ptr, st_ptr, D_ptr, seq_ptr, y_ptr,
                           L, H, P, N, nchunks, heads_per_group, G,
                           sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h,
                           sc_b, sc_l, sc_g, sc_n, sy_b, sy_l, sy_h, sy_p, sq_b, sq_l,
                           Q: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT_PREC: tl.constexpr):
    """y for BLOCK_M rows of one chunk and head: the carried state read out plus the causal block sum."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = pid0 % H
    pb = pid0 // H
    NMB: tl.constexpr = Q // BLOCK_M
    c = pid1 // NMB
    mb = pid1 % NMB
    g = h // heads_per_group
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_m = c * Q + offs_m
    mmask = t_m < L
    tm64 = t_m.to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    s_base = s_ptr + ((b * H + h) * nchunks + c) * Q
    s_m = tl.load(s_base + offs_m)
    C_m = tl.load(C_ptr + b * sc_b + g * sc_g + tm64[:, None] * sc_l + offs_n[None, :] * sc_n,
                  mask=mmask[:, None] & nmask[None, :], other=0.0)
    st_base = st_ptr + ((b * nchunks + c) * H + h) * P * N
    S_T = tl.load(st_base + offs_n[:, None] + offs_p[None, :] * N, mask=nmask[:, None] & pmask[None, :], other=0.0)
    acc = tl.dot(C_m, S_T.to(C_m.dtype), input_precision=DOT_PREC) * tl.exp(s_m)[:, None]
    if HAS_SEQ:
        seq_m = tl.load(seq_ptr + b * sq_b + tm64 * sq_l, mask=mmask, other=-1)
        seq_prev = tl.load(seq_ptr + b * sq_b + tl.maximum(c * Q - 1, 0) * sq_l)
        acc = tl.where((seq_m == seq_prev)[:, None], acc, 0.0)
    x_base = x_ptr + b * sx_b + h * sx_h
    cb_base = cb_ptr + ((b * nchunks + c) * G + g) * Q * Q
    for k0 in range(0, (mb + 1) * BLOCK_M, BLOCK_M):
        offs_k = k0 + tl.arange(0, BLOCK_M)
        t_k = c * Q + offs_k
        kmask = t_k < L
        tk64 = t_k.to(tl.int64)
        cb = tl.load(cb_base + offs_m[:, None] * Q + offs_k[None, :])
        s_k = tl.load(s_base + offs_k)
        dt_k = tl.load(dt_ptr + b * sdt_b + tk64 * sdt_l + h * sdt_h, mask=kmask, other=0.0).to(tl.float32)
        keep = offs_m[:, None] >= offs_k[None, :]
        if HAS_SEQ:
            seq_k = tl.load(seq_ptr + b * sq_b + tk64 * sq_l, mask=kmask, other=-2)
            keep = keep & (seq_m[:, None] == seq_k[None, :])
        decay = tl.exp(tl.where(keep, s_m[:, None] - s_k[None, :], float("-inf")))
        x_k = tl.load(x_base + tk64[:, None] * sx_l + offs_p[None, :] * sx_p,
                      mask=kmask[:, None] & pmask[None, :], other=0.0)
        Mw = tl.where(keep, cb * decay * dt_k[None, :], 0.0)
        acc += tl.dot(Mw.to(x_k.dtype), x_k, input_precision=DOT_PREC)
    if HAS_D:
        x_m = tl.load(x_base + tm64[:, None] * sx_l + offs_p[None, :] * sx_p,
                      mask=mmask[:, None] & pmask[None, :], other=0.0)
        acc += tl.load(D_ptr + h).to(tl.float32) * x_m.to(tl.float32)
    tl.store(y_ptr + b * sy_b + h * sy_h + tm64[:, None] * sy_l + offs_p[None, :] * sy_p,
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & pmask[None, :])


@triton.jit
def _bwd_dcb_kernel(x_ptr, dt_ptr, s_ptr, dy_ptr, cb_ptr, seq_ptr, dcb_ptr, dsr_ptr, dsc_ptr, dst_ptr,
                    L, H, P, nchunks, heads_per_group, heads_per_split, nsplit, G,
                    sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sd_b, sd_l, sd_h, sd_p, sq_b, sq_l,
                    Q: tl.constexpr, HAS_SEQ: tl.constexpr, BLK: tl.constexpr, BLOCK_P: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One causal block (i, j) of one chunk, summed over this program's heads of the group:
    dCB_ij = sum_h dt_j exp(s_i - s_j) (dy_i . x_j). Per head, P = that * CB feeds
    d(dt A)_k = sum_{i >= k > j} P_ij directly (no difference of large sums):
      diagonal block:  rows part [ib, k] = sum_{i >= k} sum_{j < k} P_ij inside the block;
      below it:        rows part [jb, k in ib] = sum_{i >= k} sum_j P_ij,
                       cols part [ib, k in jb] = sum_i sum_{j < k} P_ij,
                       total [ib, jb] = sum P (for every k in the blocks strictly between)."""
    t = tl.program_id(0)
    c = tl.program_id(1)
    pid2 = tl.program_id(2)
    sp = pid2 % nsplit
    bg = (pid2 // nsplit).to(tl.int64)
    b = bg // G
    g = bg % G
    NB: tl.constexpr = Q // BLK
    ib, jb = _causal_tile(t)
    offs_i = ib * BLK + tl.arange(0, BLK)
    offs_j = jb * BLK + tl.arange(0, BLK)
    ti = (c * Q + offs_i).to(tl.int64)
    tj = (c * Q + offs_j).to(tl.int64)
    imask = ti < L
    jmask = tj < L
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    cb = tl.load(cb_ptr + ((b * nchunks + c) * G + g) * Q * Q + offs_i[:, None] * Q + offs_j[None, :])
    keep = offs_i[:, None] >= offs_j[None, :]
    if HAS_SEQ:
        seq_i = tl.load(seq_ptr + b * sq_b + ti * sq_l, mask=imask, other=-1)
        seq_j = tl.load(seq_ptr + b * sq_b + tj * sq_l, mask=jmask, other=-2)
        keep = keep & (seq_i[:, None] == seq_j[None, :])
    acc = tl.zeros((BLK, BLK), dtype=tl.float32)
    for hh in range(heads_per_split):
        h = g * heads_per_group + sp * heads_per_split + hh
        s_base = s_ptr + ((b * H + h) * nchunks + c) * Q
        s_i = tl.load(s_base + offs_i)
        s_j = tl.load(s_base + offs_j)
        dt_j = tl.load(dt_ptr + b * sdt_b + tj * sdt_l + h * sdt_h, mask=jmask, other=0.0).to(tl.float32)
        dy_i = tl.load(dy_ptr + b * sd_b + h * sd_h + ti[:, None] * sd_l + offs_p[None, :] * sd_p,
                       mask=imask[:, None] & pmask[None, :], other=0.0)
        x_jT = tl.load(x_ptr + b * sx_b + h * sx_h + offs_p[:, None] * sx_p + tj[None, :] * sx_l,
                       mask=pmask[:, None] & jmask[None, :], other=0.0)
        dM = tl.dot(dy_i, x_jT, input_precision=DOT_PREC)
        decay = tl.exp(tl.where(keep, s_i[:, None] - s_j[None, :], float("-inf")))
        dMw = dM * decay * dt_j[None, :]
        acc += dMw
        Pm = dMw * cb
        row = ((b * H + h) * nchunks + c) * NB
        if ib == jb:
            excl = tl.cumsum(Pm, axis=1) - Pm                       # sum_{j < k} P_ik
            diag = tl.sum(tl.where(offs_i[:, None] >= offs_j[None, :], excl, 0.0), axis=0)
            tl.store(dsr_ptr + (row + ib) * Q + offs_j, diag)
        else:
            rows = tl.sum(Pm, axis=1)
            cols = tl.sum(Pm, axis=0)
            tl.store(dsr_ptr + (row + jb) * Q + offs_i, tl.cumsum(rows, axis=0, reverse=True))
            tl.store(dsc_ptr + (row + ib) * Q + offs_j, tl.cumsum(cols, axis=0) - cols)
            tl.store(dst_ptr + (row + ib) * NB + jb, tl.sum(cols, axis=0))
    tl.store(dcb_ptr + (((b * nchunks + c) * nsplit + sp) * G + g) * Q * Q + offs_i[:, None] * Q + offs_j[None, :],
             acc)


@triton.jit
def _bwd_dc_kernel(s_ptr, B_ptr, C_ptr, dy_ptr, st_ptr, dcb_ptr, seq_ptr, dC_ptr, dss_ptr,
                   L, H, P, N, nchunks, heads_per_group, heads_per_split, nsplit, dcb_splits, G,
                   sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n, sd_b, sd_l, sd_h, sd_p, sq_b, sq_l,
                   Q: tl.constexpr, HAS_SEQ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dC for BLOCK_M rows: split 0 adds the group's dCB @ B; every split adds its heads' state part
    exp(s_i) dy_i S_c and stores ds_state[b, h, c, i] = C_i . (that) (= dy_i . y_off_i)."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = pid0 // nsplit
    sp = pid0 % nsplit
    NMB: tl.constexpr = Q // BLOCK_M
    c = pid1 // NMB
    mb = pid1 % NMB
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    t_m = c * Q + offs_m
    mmask = t_m < L
    tm64 = t_m.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if sp == 0:
        for k0 in range(0, (mb + 1) * BLOCK_M, BLOCK_M):
            offs_k = k0 + tl.arange(0, BLOCK_M)
            tk64 = (c * Q + offs_k).to(tl.int64)
            dcb = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
            for s2 in range(dcb_splits):
                dcb += tl.load(dcb_ptr + (((b * nchunks + c) * dcb_splits + s2) * G + g) * Q * Q
                               + offs_m[:, None] * Q + offs_k[None, :])
            dcb = tl.where(offs_m[:, None] >= offs_k[None, :], dcb, 0.0)
            B_k = tl.load(B_ptr + b * sb_b + g * sb_g + tk64[:, None] * sb_l + offs_n[None, :] * sb_n,
                          mask=(tk64 < L)[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(dcb.to(B_k.dtype), B_k, input_precision=DOT_PREC)
    C_m = tl.load(C_ptr + b * sc_b + g * sc_g + tm64[:, None] * sc_l + offs_n[None, :] * sc_n,
                  mask=mmask[:, None] & nmask[None, :], other=0.0)
    if HAS_SEQ:
        seq_m = tl.load(seq_ptr + b * sq_b + tm64 * sq_l, mask=mmask, other=-1)
        seq_prev = tl.load(seq_ptr + b * sq_b + tl.maximum(c * Q - 1, 0) * sq_l)
    for hh in range(heads_per_split):
        h = g * heads_per_group + sp * heads_per_split + hh
        s_m = tl.load(s_ptr + ((b * H + h) * nchunks + c) * Q + offs_m)
        dy_m = tl.load(dy_ptr + b * sd_b + h * sd_h + tm64[:, None] * sd_l + offs_p[None, :] * sd_p,
                       mask=mmask[:, None] & pmask[None, :], other=0.0)
        S = tl.load(st_ptr + ((b * nchunks + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                    mask=pmask[:, None] & nmask[None, :], other=0.0)
        scale = tl.exp(s_m)
        if HAS_SEQ:
            scale = tl.where(seq_m == seq_prev, scale, 0.0)
        dCs = tl.dot(dy_m, S.to(dy_m.dtype), input_precision=DOT_PREC) * scale[:, None]
        tl.store(dss_ptr + ((b * H + h) * nchunks + c) * Q + offs_m, tl.sum(dCs * C_m.to(tl.float32), axis=1))
        acc += dCs
    dC_off = ((b * L + tm64[:, None]) * nsplit + sp) * G * N + g * N + offs_n[None, :]
    tl.store(dC_ptr + dC_off, acc, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _bwd_db_kernel(x_ptr, dt_ptr, s_ptr, C_ptr, dZ_ptr, dcb_ptr, seq_ptr, dB_ptr,
                   L, H, P, N, nchunks, heads_per_group, heads_per_split, nsplit, dcb_splits, G,
                   sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sc_b, sc_l, sc_g, sc_n, sq_b, sq_l,
                   Q: tl.constexpr, HAS_SEQ: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dB for BLOCK_K positions: split 0 adds the group's dCB^T @ C; every split adds its heads'
    chunk-state part exp(s_last - s_j) dt_j x_j dZ_c."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = pid0 // nsplit
    sp = pid0 % nsplit
    NKB: tl.constexpr = Q // BLOCK_K
    c = pid1 // NKB
    kb = pid1 % NKB
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    t_k = c * Q + offs_k
    kmask = t_k < L
    tk64 = t_k.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    if sp == 0:
        for m0 in range(kb * BLOCK_K, Q, BLOCK_K):
            offs_m = m0 + tl.arange(0, BLOCK_K)
            tm64 = (c * Q + offs_m).to(tl.int64)
            dcbT = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
            for s2 in range(dcb_splits):
                dcbT += tl.load(dcb_ptr + (((b * nchunks + c) * dcb_splits + s2) * G + g) * Q * Q
                                + offs_k[:, None] + offs_m[None, :] * Q)
            dcbT = tl.where(offs_m[None, :] >= offs_k[:, None], dcbT, 0.0)
            C_m = tl.load(C_ptr + b * sc_b + g * sc_g + tm64[:, None] * sc_l + offs_n[None, :] * sc_n,
                          mask=(tm64 < L)[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(dcbT.to(C_m.dtype), C_m, input_precision=DOT_PREC)
    if HAS_SEQ:
        seq_k = tl.load(seq_ptr + b * sq_b + tk64 * sq_l, mask=kmask, other=-1)
        seq_last = tl.load(seq_ptr + b * sq_b + (tl.minimum(c * Q + Q, L) - 1) * sq_l)
    for hh in range(heads_per_split):
        h = g * heads_per_group + sp * heads_per_split + hh
        s_base = s_ptr + ((b * H + h) * nchunks + c) * Q
        s_k = tl.load(s_base + offs_k)
        s_last = tl.load(s_base + Q - 1)
        dt_k = tl.load(dt_ptr + b * sdt_b + tk64 * sdt_l + h * sdt_h, mask=kmask, other=0.0).to(tl.float32)
        x_k = tl.load(x_ptr + b * sx_b + h * sx_h + tk64[:, None] * sx_l + offs_p[None, :] * sx_p,
                      mask=kmask[:, None] & pmask[None, :], other=0.0)
        dZ = tl.load(dZ_ptr + ((b * nchunks + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                     mask=pmask[:, None] & nmask[None, :], other=0.0)
        w = tl.exp(s_last - s_k) * dt_k
        if HAS_SEQ:
            w = tl.where(seq_k == seq_last, w, 0.0)
        acc += tl.dot(x_k, dZ.to(x_k.dtype), input_precision=DOT_PREC) * w[:, None]
    dB_off = ((b * L + tk64[:, None]) * nsplit + sp) * G * N + g * N + offs_n[None, :]
    tl.store(dB_ptr + dB_off, acc, mask=kmask[:, None] & nmask[None, :])


@triton.jit
def _bwd_dx_kernel(x_ptr, dt_ptr, s_ptr, B_ptr, dy_ptr, dZ_ptr, cb_ptr, D_ptr, seq_ptr,
                   dx_ptr, ddt_ptr, dsw_ptr, dD_ptr,
                   L, H, P, N, nchunks, heads_per_group, G,
                   sx_b, sx_l, sx_h, sx_p, sdt_b, sdt_l, sdt_h, sb_b, sb_l, sb_g, sb_n,
                   sd_b, sd_l, sd_h, sd_p, sdx_b, sdx_l, sdx_h, sdx_p, sq_b, sq_l,
                   Q: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Per head, BLOCK_K positions j: d(dt x)_j = exp(s_last - s_j) dZ_c B_j + sum_i (CB . L)_ij dy_i;
    then dx, x . d(dt x) (ddt's direct part), w_j = dt_j x_j . d(dt x)_state_j, D's partial sums."""
    h = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    NKB: tl.constexpr = Q // BLOCK_K
    c = pid1 // NKB
    kb = pid1 % NKB
    g = h // heads_per_group
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    t_k = c * Q + offs_k
    kmask = t_k < L
    tk64 = t_k.to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    s_base = s_ptr + ((b * H + h) * nchunks + c) * Q
    s_k = tl.load(s_base + offs_k)
    s_last = tl.load(s_base + Q - 1)
    dt_k = tl.load(dt_ptr + b * sdt_b + tk64 * sdt_l + h * sdt_h, mask=kmask, other=0.0).to(tl.float32)
    x_k = tl.load(x_ptr + b * sx_b + h * sx_h + tk64[:, None] * sx_l + offs_p[None, :] * sx_p,
                  mask=kmask[:, None] & pmask[None, :], other=0.0)
    B_k = tl.load(B_ptr + b * sb_b + g * sb_g + tk64[:, None] * sb_l + offs_n[None, :] * sb_n,
                  mask=kmask[:, None] & nmask[None, :], other=0.0)
    dZT = tl.load(dZ_ptr + ((b * nchunks + c) * H + h) * P * N + offs_n[:, None] + offs_p[None, :] * N,
                  mask=nmask[:, None] & pmask[None, :], other=0.0)
    decay_end = tl.exp(s_last - s_k)
    if HAS_SEQ:
        seq_k = tl.load(seq_ptr + b * sq_b + tk64 * sq_l, mask=kmask, other=-1)
        seq_last = tl.load(seq_ptr + b * sq_b + (tl.minimum(c * Q + Q, L) - 1) * sq_l)
        decay_end = tl.where(seq_k == seq_last, decay_end, 0.0)
    acc = tl.dot(B_k, dZT.to(B_k.dtype), input_precision=DOT_PREC) * decay_end[:, None]
    xf = x_k.to(tl.float32)
    row = ((b * H + h) * nchunks + c) * Q + offs_k
    tl.store(dsw_ptr + row, tl.sum(acc * xf, axis=1) * dt_k)
    cb_base = cb_ptr + ((b * nchunks + c) * G + g) * Q * Q
    for m0 in range(kb * BLOCK_K, Q, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        t_m = c * Q + offs_m
        mmask = t_m < L
        tm64 = t_m.to(tl.int64)
        cbT = tl.load(cb_base + offs_k[:, None] + offs_m[None, :] * Q)
        s_m = tl.load(s_base + offs_m)
        keep = offs_m[None, :] >= offs_k[:, None]
        if HAS_SEQ:
            seq_m = tl.load(seq_ptr + b * sq_b + tm64 * sq_l, mask=mmask, other=-2)
            keep = keep & (seq_m[None, :] == seq_k[:, None])
        decay_t = tl.exp(tl.where(keep, s_m[None, :] - s_k[:, None], float("-inf")))
        dy_m = tl.load(dy_ptr + b * sd_b + h * sd_h + tm64[:, None] * sd_l + offs_p[None, :] * sd_p,
                       mask=mmask[:, None] & pmask[None, :], other=0.0)
        Mt = tl.where(keep, cbT * decay_t, 0.0)
        acc += tl.dot(Mt.to(dy_m.dtype), dy_m, input_precision=DOT_PREC)
    dx = acc * dt_k[:, None]
    if HAS_D:
        dy_k = tl.load(dy_ptr + b * sd_b + h * sd_h + tk64[:, None] * sd_l + offs_p[None, :] * sd_p,
                       mask=kmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
        dx += tl.load(D_ptr + h).to(tl.float32) * dy_k
        tl.store(dD_ptr + ((b * nchunks + c) * NKB + kb) * H + h, tl.sum(tl.sum(dy_k * xf, 1), 0))
    tl.store(dx_ptr + b * sdx_b + h * sdx_h + tk64[:, None] * sdx_l + offs_p[None, :] * sdx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=kmask[:, None] & pmask[None, :])
    tl.store(ddt_ptr + row, tl.sum(acc * xf, axis=1))


@triton.jit
def _bwd_ddt_kernel(dt_ptr, A_ptr, dsr_ptr, dsc_ptr, dst_ptr, dss_ptr, dsw_ptr, ddtp_ptr, dsend_ptr, ddt_ptr,
                    dA_ptr, L, H, nchunks, NBS, sdt_b, sdt_l, sdt_h, sg_b, sg_l, sg_h,
                    Q: tl.constexpr, BLK: tl.constexpr, BLOCK_H: tl.constexpr):
    """d(dt A)_k = sum_{i>=k} ds_state_i + carried-state term + sum_{j<k} w_j + the quadratic form's
    sum_{i>=k>j} P_ij gathered from the dCB kernel's parts; ddt = x . d(dt x) + A d(dt A); dA partials."""
    c = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    NB: tl.constexpr = Q // BLK
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, Q)
    hmask = offs_h < H
    row = (b * H + offs_h) * nchunks + c
    off = row[:, None] * Q + offs_q[None, :]
    m2 = hmask[:, None] & (offs_q < Q)[None, :]
    ds = tl.load(dss_ptr + off, mask=m2, other=0.0)
    dsend = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(NBS):
        dsend += tl.load(dsend_ptr + row * NBS + k, mask=hmask, other=0.0)
    ds += tl.where(offs_q[None, :] == Q - 1, dsend[:, None], 0.0)
    w = tl.load(dsw_ptr + off, mask=m2, other=0.0)
    da = tl.cumsum(ds, axis=1, reverse=True) + tl.cumsum(w, axis=1) - w
    qb = offs_q // BLK
    for k in tl.static_range(NB):
        part = (row[:, None] * NB + k) * Q + offs_q[None, :]
        da += tl.load(dsr_ptr + part, mask=m2 & (qb >= k)[None, :], other=0.0)
        da += tl.load(dsc_ptr + part, mask=m2 & (qb < k)[None, :], other=0.0)
    for ibb in tl.static_range(2, NB):
        for jbb in tl.static_range(0, ibb - 1):
            tot = tl.load(dst_ptr + (row * NB + ibb) * NB + jbb, mask=hmask, other=0.0)
            da += tl.where(((qb > jbb) & (qb < ibb))[None, :], tot[:, None], 0.0)
    t64 = (c * Q + offs_q).to(tl.int64)
    lm = m2 & (t64 < L)[None, :]
    dt = tl.load(dt_ptr + b * sdt_b + t64[None, :] * sdt_l + offs_h[:, None] * sdt_h, mask=lm, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    ddt = tl.load(ddtp_ptr + off, mask=m2, other=0.0) + A[:, None] * da
    tl.store(ddt_ptr + b * sg_b + t64[None, :] * sg_l + offs_h[:, None] * sg_h, ddt, mask=lm)
    tl.store(dA_ptr + (b * nchunks + c) * H + offs_h, tl.sum(dt * da, axis=1), mask=hmask)
